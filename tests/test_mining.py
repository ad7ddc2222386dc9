import pytest
import torch

from lavis_cprd.distill.mining import all_negatives, first_occurrence_mask, mine_hard_negatives


def test_never_returns_positives_and_returns_k_sorted():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6])
    for _ in range(20):
        sim = torch.randn(10, 10, generator=g)
        sim[ids[:, None] == ids[None, :]] += 5.0  # positives are the most similar
        neg = mine_hard_negatives(sim, ids, ids, k=4)
        assert neg.shape == (10, 4)
        assert not (ids[neg] == ids[:, None]).any()
        picked = sim.gather(1, neg)
        assert torch.all(picked[:, :-1] >= picked[:, 1:])
        # They are the top-4 among non-positives.
        masked = sim.masked_fill(ids[:, None] == ids[None, :], float("-inf"))
        torch.testing.assert_close(picked, masked.topk(4, dim=1).values)


def test_candidate_mask_excludes_repeated_images():
    ids = torch.tensor([0, 1, 1, 2])
    sim = torch.tensor([[0.0, 0.9, 0.8, 0.1]])
    neg = mine_hard_negatives(sim, ids[:1], ids, k=2, cand_mask=first_occurrence_mask(ids))
    assert neg.tolist() == [[1, 3]]


def test_first_occurrence_mask():
    assert first_occurrence_mask(torch.tensor([3, 3, 1, 3, 2, 1])).tolist() == [True, False, True, False, True, False]


def test_k_not_smaller_than_batch_is_a_clear_error():
    ids = torch.arange(4)
    with pytest.raises(ValueError, match=r"num_hard_negatives \(K=4\) must be smaller than the batch size \(4"):
        mine_hard_negatives(torch.randn(4, 4), ids, ids, k=4)


def test_too_few_negatives_is_a_clear_error():
    ids = torch.tensor([0, 0, 0, 1])
    with pytest.raises(ValueError, match="only 1 candidates with a different image_id"):
        mine_hard_negatives(torch.randn(4, 4), ids, ids, k=2)


def test_all_negatives_every_non_positive_sorted_and_padded():
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.3, 0.4]])
    query_ids = torch.tensor([0, 1])
    cand_ids = torch.tensor([0, 1, 1, 2])
    idx, mask = all_negatives(sim, query_ids, cand_ids, cand_mask=torch.tensor([True, True, True, True]))
    # query 0: negatives 3 (0.7), 2 (0.5), 1 (0.1); query 1: 3 (0.4), 0 (0.2), then padding
    assert idx[0].tolist() == [3, 2, 1] and mask[0].tolist() == [True, True, True]
    assert idx[1, :2].tolist() == [3, 0] and mask[1].tolist() == [True, True, False]
    idx, mask = all_negatives(sim, query_ids, cand_ids, cand_mask=torch.tensor([True, True, False, True]))
    assert idx[0].tolist() == [3, 1] and mask.tolist() == [[True, True], [True, True]]
