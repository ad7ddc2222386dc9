import collections


from lavis_cprd.training.sampling import GroupedBatchSampler


def test_groups_stay_together_and_every_item_appears_once():
    groups = [i // 9 for i in range(90)]  # 10 groups of 9 (a family: 3 images x 3 captions)
    sampler = GroupedBatchSampler(groups, batch_size=18, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(90))
    for b in batches:  # batch size 18 = two whole groups
        assert all(n == 9 for n in collections.Counter(groups[i] for i in b).values())


def test_new_order_each_epoch_deterministic_in_seed():
    groups = [i // 4 for i in range(64)]
    a, b = GroupedBatchSampler(groups, 8, seed=3), GroupedBatchSampler(groups, 8, seed=3)
    first, second = list(a), list(a)
    assert first != second and first == list(b) and second == list(b)
    assert list(GroupedBatchSampler(groups, 8, seed=4)) != first


def test_ranks_split_batches():
    groups = [i // 4 for i in range(64)]
    r0 = list(GroupedBatchSampler(groups, 8, seed=0, num_replicas=2, rank=0))
    r1 = list(GroupedBatchSampler(groups, 8, seed=0, num_replicas=2, rank=1))
    assert len(r0) == len(r1) == 4
    assert not {i for b in r0 for i in b} & {i for b in r1 for i in b}
