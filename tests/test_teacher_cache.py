"""Teacher-score cache: same loss as online scoring, resumable sharded builds, the CLI."""
import glob
import os

import pytest
import torch
from torch.utils.data import default_collate

from conftest import experiment_yaml, tiny_model_cfg
from lavis_cprd.apps import cache_command as cache_teacher
from lavis_cprd.training.launch import load_config
from lavis_cprd.models.dual_encoder import CprdDualEncoder
from lavis_cprd.distill.teacher_cache import TeacherScoreCache, build_teacher_cache, shard_path


@pytest.fixture(scope="module")
def setup(retrieval_data, tmp_path_factory):
    import lavis.tasks as tasks

    root, splits = retrieval_data
    work = tmp_path_factory.mktemp("cache")
    cfg_path = experiment_yaml(work / "exp.yaml", root, splits, work / "out")
    cfg = load_config(type("Args", (), {"cfg_path": cfg_path, "options": []})())
    dataset = tasks.setup_task(cfg).build_datasets(cfg)["flickr30k"]["train"]
    torch.manual_seed(0)
    model = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.5)).eval()
    return cfg_path, dataset, model, work


def build(model, dataset, out, top_m, shard_size=16, teacher_logit=None):
    return build_teacher_cache(
        dataset, teacher_logit or model.teacher.logit, model.encode_image,
        lambda captions: model.encode_captions(captions, "cpu"), str(out), top_m, shard_size=shard_size, image_chunk=5,
    )


def batch_of(dataset, items):
    return default_collate([dataset[i] for i in items])


class CountingTeacher:
    def __init__(self, teacher, fail_after=None):
        self.logit, self.fail_after, self.pairs, self.calls = teacher.logit, fail_after, 0, 0

    def __call__(self, images, captions, pairs, image_ids=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.pairs += len(pairs)
        return self.logit(images, captions, pairs)


def loss_with_cache(model, batch, cache_dir, monkeypatch):
    counter = CountingTeacher(model.teacher)
    monkeypatch.setattr(model.teacher, "logit", counter)
    model.objective.use_teacher_cache(cache_dir)
    try:
        out = model(batch)
    finally:
        model.objective.use_teacher_cache(None)
        monkeypatch.undo()
    return out, counter


def test_cached_pairs_hold_the_teachers_logits(setup):
    _, dataset, model, work = setup
    build(model, dataset, work / "full", top_m=100)
    cache = TeacherScoreCache.load(str(work / "full"))
    n_images = len(set(dataset.img_ids.values()))
    assert len(cache) == n_images * len(cache.caption_index)  # M >= everything: every pair is cached
    items = [0, 5, 17, 30, 41]
    batch = batch_of(dataset, items)
    pairs = torch.cartesian_prod(torch.arange(len(items)), torch.arange(len(items)))
    want = model.teacher.logit(batch["image"], batch["text_input"], pairs)
    got, hit = cache.lookup(batch["image_id"][pairs[:, 0]], [batch["text_input"][j] for j in pairs[:, 1]])
    assert hit.all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _, miss = cache.lookup(torch.tensor([0, 10_000]), ["a caption nobody wrote", batch["text_input"][0]])
    assert not miss.any()


@pytest.mark.parametrize("top_m", [100, 8])
def test_cache_gives_the_online_loss(setup, top_m, monkeypatch):
    _, dataset, model, work = setup
    out_dir = work / f"m{top_m}"
    if not os.path.isdir(out_dir):
        build(model, dataset, out_dir, top_m=top_m)
    batch = batch_of(dataset, [0, 1, 6, 7, 12, 13, 20, 21, 30, 31, 40, 50])
    online, all_pairs = loss_with_cache(model, batch, None, monkeypatch)
    cached, counter = loss_with_cache(model, batch, str(out_dir), monkeypatch)
    assert cached.loss_distill.item() == pytest.approx(online.loss_distill.item(), rel=1e-5)
    assert cached.loss.item() == pytest.approx(online.loss.item(), rel=1e-5)
    rate = float(cached.teacher_cache_hit_rate)
    if top_m == 100:
        assert rate == 1.0 and counter.calls == 0  # nothing left for the teacher
    else:
        assert 0.0 < rate < 1.0 and counter.calls == 1  # only the misses, in one call
        assert counter.pairs == round((1 - rate) * all_pairs.pairs)


def test_interrupted_build_resumes_without_redoing_shards(setup):
    _, dataset, model, work = setup
    reference = work / "uninterrupted"
    stats = build(model, dataset, reference, top_m=3)
    assert stats["shards"] >= 4 and stats["computed"] == stats["shards"]

    out = work / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        build(model, dataset, out, top_m=3, teacher_logit=CountingTeacher(model.teacher, fail_after=7))
    finished = sorted(glob.glob(str(out / "shard_*.pt")))
    assert 0 < len(finished) < stats["shards"]
    assert not glob.glob(str(out / "*.tmp.*"))  # no half-written shard
    mtimes = {p: os.path.getmtime(p) for p in finished}

    counter = CountingTeacher(model.teacher)
    resumed = build(model, dataset, out, top_m=3, teacher_logit=counter)
    assert resumed["skipped"] == len(finished) and resumed["computed"] == stats["shards"] - len(finished)
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())  # finished shards untouched
    assert 0 < counter.pairs < stats["pairs"]
    a, b = TeacherScoreCache.load(str(reference)), TeacherScoreCache.load(str(out))
    assert torch.equal(a.keys, b.keys)
    torch.testing.assert_close(a.logits, b.logits)

    again = build(model, dataset, out, top_m=3, teacher_logit=CountingTeacher(model.teacher, fail_after=0))
    assert again["computed"] == 0  # a finished cache never calls the teacher
    with pytest.raises(ValueError, match=r"other settings \(\['num_shards', 'shard_size', 'top_m'\]\)"):
        build(model, dataset, out, top_m=4, shard_size=8)


def test_cli_builds_and_the_task_logs_the_hit_rate(setup):
    from lavis_cprd.training.task import CprdRetrievalTask

    cfg_path, dataset, _, work = setup
    out = str(work / "cli_cache")
    args = ["--cfg-path", cfg_path, "--output", out, "--top-m", "2", "--shard-size", "20", "--device", "cpu"]
    stats = cache_teacher.main(args)
    assert stats["computed"] == stats["shards"] == len(glob.glob(os.path.join(out, "shard_*.pt")))
    assert os.path.isfile(shard_path(out, stats["shards"] - 1))
    assert cache_teacher.main(args)["computed"] == 0
    with pytest.raises(ValueError, match=r"--split 'dev' is not a split of flickr30k; available: \['test', 'train', 'val'\]"):
        cache_teacher.main(args + ["--split", "dev"])

    student = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3, teacher_cache=out)).eval()
    task = CprdRetrievalTask.setup_task(cfg=load_config(type("Args", (), {"cfg_path": cfg_path, "options": []})()))
    task.train_step(student, batch_of(dataset, list(range(0, 48, 4))))
    (rate,) = task.epoch_terms["teacher_cache_hit_rate"]  # the epoch mean of this goes to log.txt
    assert 0.0 < rate < 1.0  # M=2 holds some of the step's pairs, not all
    with pytest.raises(ValueError, match="teacher_cache holds cross-encoder scores; loss='conaclip'"):
        CprdDualEncoder.from_config(tiny_model_cfg(loss="conaclip", teacher_cache=out))


def test_a_record_saves_what_was_scored_as_a_cache(tmp_path):
    """``TeacherScoreRecord``: every added pair is found in the saved folder with the logit it
    was first recorded with; rewriting after more steps keeps the earlier pairs."""
    from lavis_cprd.distill.teacher_cache import TeacherScoreRecord

    record = TeacherScoreRecord()
    record.add(torch.tensor([3, 3, 7]), ["a red cube", "two balls", "a red cube"], torch.tensor([1.5, -2.0, 0.25]))
    assert record.save(str(tmp_path)) == 3
    record.add(torch.tensor([7, 9]), ["a red cube", "two balls"], torch.tensor([9.0, -0.5]))  # (7, a red cube) again
    assert record.save(str(tmp_path)) == 4
    cache = TeacherScoreCache.load(str(tmp_path))
    logits, hit = cache.lookup(torch.tensor([3, 3, 7, 9, 9]), ["a red cube", "two balls", "a red cube", "two balls", "a red cube"])
    assert hit.tolist() == [True, True, True, True, False]
    assert logits[:4].tolist() == [1.5, -2.0, 0.25, -0.5]


def test_a_dual_encoder_teacher_cannot_record():
    from lavis_cprd.distill.config import DistillConfig

    with pytest.raises(ValueError, match="model.distill.teacher_record holds cross-encoder scores"):
        DistillConfig.from_cfg({"loss": "conaclip", "teacher_record": "somewhere"})
