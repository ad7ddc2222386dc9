"""Teacher-score cache: same loss as online scoring, resumable sharded builds, the CLI, every
file checked against its recorded checksum, and the teacher identity checked at start-up."""
import glob
import hashlib
import json
import logging
import os
import re
import shutil

import pytest
import torch
from torch.utils.data import default_collate

from conftest import experiment_yaml, tiny_model_cfg
from lavis_cprd.apps import cache_command as cache_teacher
from lavis_cprd.training.launch import load_config
from lavis_cprd.models.dual_encoder import CprdDualEncoder
from lavis_cprd.distill.cache_builder import build_teacher_cache
from lavis_cprd.distill.teacher_cache import TeacherScoreCache, shard_path


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


def build(model, dataset, out, top_m, shard_size=16, teacher_logit=None, **kwargs):
    return build_teacher_cache(
        dataset, teacher_logit or model.teacher.logit, model.encode_image,
        lambda captions: model.encode_captions(captions, "cpu"), str(out), top_m, shard_size=shard_size, image_chunk=5,
        **kwargs,
    )


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def manifest_of(root) -> dict:
    with open(os.path.join(root, "manifest.json")) as f:
        return json.load(f)


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
    teacher = manifest_of(out)["teacher"]  # the experiment's random-init teacher, on this CPU
    assert {k: teacher[k] for k in ("arch", "checkpoint", "checkpoint_sha256", "seed")} == {
        "arch": "blip_image_text_matching", "checkpoint": "", "checkpoint_sha256": None, "seed": 0}
    damage(shard_path(out, 1), "truncated")  # the error names the file and the very command that repairs it
    with pytest.raises(ValueError, match=re.escape(f"{shard_path(out, 1)} is damaged (checksum mismatch); rerun "
                                                   f"`lavis-cprd cache-teacher {' '.join(args)}`")):
        TeacherScoreCache.load(out)
    repaired = cache_teacher.main(args)
    assert repaired["computed"] == 1 and repaired["damaged"] == ["shard_00001.pt"]
    assert len(TeacherScoreCache.load(out)) > 0
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


# ------------------------------------------------------------------ verification (issue 30)
CPU = torch.device("cpu")


def student_reading(cache_dir, **teacher):
    """A tiny student whose distill.teacher_cache is ``cache_dir``, its teacher config overridden by ``teacher``."""
    cfg = tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.5, teacher_cache=str(cache_dir))
    for key, value in teacher.items():
        cfg.distill.teacher[key] = value
    return CprdDualEncoder.from_config(cfg).eval()


def damage(path, how):
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "one logit changed":  # still a well-formed file: only its checksum tells
        logits = torch.load(path, weights_only=True)["logit"]
        with open(path, "rb") as f:
            data = bytearray(f.read())
        data[data.index(logits.numpy().tobytes())] ^= 1  # the lowest mantissa bit of the first logit
        with open(path, "wb") as f:
            f.write(data)
    else:
        os.remove(path)


@pytest.fixture(scope="module")
def verified_cache(setup):
    """A finished cache (M = 3, 6 shards) with its teacher's identity; tests damage copies of it."""
    _, dataset, model, work = setup
    out = str(work / "verified")
    stats = build(model, dataset, out, top_m=3, teacher_identity=model.objective.teacher_identity(CPU))
    return out, stats


def copy_of(cache, where) -> str:
    shutil.copytree(cache, where)
    return str(where)


def test_a_rebuild_verifies_every_shard_and_rebuilds_only_the_damaged_ones(setup, verified_cache, tmp_path, caplog):
    """Rerunning the build checks every shard against the checksum its manifest recorded: a
    truncated shard and one whose checksum was never recorded (a crash between writing it and
    updating the manifest) are rebuilt and named in the log with the reason; the others are
    left untouched, and the repaired cache holds exactly the original logits."""
    _, dataset, model, _ = setup
    reference, stats = verified_cache
    out = copy_of(reference, tmp_path / "repaired")
    shards = sorted(glob.glob(os.path.join(out, "shard_*.pt")))
    assert len(shards) == stats["shards"] >= 4
    recorded = manifest_of(out)["files"]
    assert all(recorded[os.path.basename(p)] == sha256_of(p) for p in shards)
    original = TeacherScoreCache.load(reference)

    truncated, unrecorded = shard_path(out, 1), shard_path(out, 3)
    damage(truncated, "truncated")
    manifest = manifest_of(out)
    del manifest["files"][os.path.basename(unrecorded)]
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    untouched = {p: os.stat(p).st_mtime_ns for p in shards if p not in (truncated, unrecorded)}

    counter = CountingTeacher(model.teacher)
    with caplog.at_level(logging.WARNING):
        again = build(model, dataset, out, top_m=3, teacher_logit=counter,
                      teacher_identity=model.objective.teacher_identity(CPU))
    assert (again["computed"], again["skipped"]) == (2, stats["shards"] - 2)
    assert f"{truncated} is damaged (checksum mismatch)" in caplog.text
    assert f"{unrecorded} is damaged (no checksum recorded)" in caplog.text
    assert {p: os.stat(p).st_mtime_ns for p in untouched} == untouched
    rebuilt_pairs = sum(len(torch.load(p, weights_only=True)["logit"]) for p in (truncated, unrecorded))
    assert counter.pairs == rebuilt_pairs  # the teacher scored those two shards and nothing else
    recorded = manifest_of(out)["files"]
    assert all(recorded[os.path.basename(p)] == sha256_of(p) for p in shards)
    repaired = TeacherScoreCache.load(out)
    assert torch.equal(repaired.keys, original.keys)
    assert torch.equal(repaired.logits, original.logits)


@pytest.mark.parametrize("how", ["truncated", "one logit changed", "deleted"])
def test_a_damaged_shard_is_refused_at_start_up_naming_the_file_and_the_repair(verified_cache, tmp_path, how):
    """``TeacherScoreCache.load`` checks every shard; training loads the cache in
    ``build_teacher_now``, before the first step, so a damaged shard stops start-up, not the
    first distilled step. A recorded shard that is gone is lost, not "not built yet"."""
    from lavis_cprd.models.student import build_teacher_now

    out = copy_of(verified_cache[0], tmp_path / "damaged")
    TeacherScoreCache.load(out)  # as built, it loads
    bad = shard_path(out, 2)
    damage(bad, how)
    reason = "missing" if how == "deleted" else "checksum mismatch"
    with pytest.raises(ValueError) as error:
        TeacherScoreCache.load(out)
    message = str(error.value)
    assert f"{bad} is damaged ({reason})" in message and "lavis-cprd cache-teacher" in message
    with pytest.raises(ValueError, match="is damaged") as error:
        build_teacher_now(student_reading(out), CPU)
    assert bad in str(error.value)


@pytest.fixture(scope="module")
def identity_cache(setup):
    """A cache whose manifest names the teacher checkpoint ``teacher.pth``, at fp32."""
    _, dataset, model, work = setup
    checkpoint = work / "teacher.pth"
    checkpoint.write_bytes(b"trained teacher weights")
    shutil.copy(checkpoint, work / "same_bytes_elsewhere.pth")
    (work / "other.pth").write_bytes(b"other teacher weights")
    scored_by = student_reading(work / "unused", checkpoint=str(checkpoint), precision="fp32")
    out = str(work / "identity")
    build(model, dataset, out, top_m=1, shard_size=64, teacher_identity=scored_by.objective.teacher_identity(CPU))
    return out, work


@pytest.mark.parametrize("configured, differing", [
    ({"checkpoint": "teacher.pth", "precision": "fp32"}, []),
    ({"checkpoint": "same_bytes_elsewhere.pth", "precision": "fp32"}, []),  # a copy is the same teacher
    ({"checkpoint": "other.pth", "precision": "fp32"}, ["checkpoint", "checkpoint_sha256"]),
    ({"checkpoint": "teacher.pth", "precision": "bf16"}, ["precision"]),
    ({"checkpoint": "", "precision": "fp32"}, ["checkpoint", "checkpoint_sha256", "seed"]),  # random init
    ({"checkpoint": "https://example.com/teacher.pth", "precision": "fp32"}, ["checkpoint", "checkpoint_sha256"]),
    ({"checkpoint": "teacher.pth", "precision": "fp32", "arch": "albef_retrieval"}, ["arch"]),
])
def test_start_up_refuses_a_cache_of_another_teacher(identity_cache, configured, differing):
    """The configured teacher's identity (arch, checkpoint bytes or URL, seed of a random
    init, precision resolved for the device) must be the one the manifest records."""
    from lavis_cprd.models.student import build_teacher_now

    out, work = identity_cache
    teacher = dict(configured)
    if teacher["checkpoint"].endswith(".pth") and "://" not in teacher["checkpoint"]:
        teacher["checkpoint"] = str(work / teacher["checkpoint"])
    student = student_reading(out, **teacher)
    if not differing:
        build_teacher_now(student, CPU)
        assert student.objective.teacher_cache_loaded  # at start-up, not at the first distilled step
        return
    with pytest.raises(ValueError) as error:
        build_teacher_now(student, CPU)
    message = str(error.value)
    assert "model.distill.teacher" in message and f"model.distill.teacher_cache={out!r}" in message
    assert sorted(re.findall(r"^\s+(\w+): cache ", message, re.M)) == differing
    if "checkpoint_sha256" in differing:  # both values, each computed independently here
        want = teacher["checkpoint"] if "://" in teacher["checkpoint"] else (
            sha256_of(teacher["checkpoint"]) if teacher["checkpoint"] else None)
        assert f"checkpoint_sha256: cache {sha256_of(work / 'teacher.pth')!r} vs configured {want!r}" in message


@pytest.mark.parametrize("native_bf16, accepted", [(False, True), (True, False)])
def test_auto_precision_is_compared_as_resolved_for_the_training_device(identity_cache, monkeypatch, native_bf16, accepted):
    """``precision: auto`` is the fp32 the cache was scored at only where the device has no bf16 units."""
    from lavis_cprd import precision
    from lavis_cprd.models.student import build_teacher_now

    out, work = identity_cache
    monkeypatch.setattr(precision, "native_bf16", lambda device: (native_bf16, "as the test says"))
    student = student_reading(out, checkpoint=str(work / "teacher.pth"), precision="auto")
    if accepted:
        build_teacher_now(student, CPU)
        return
    with pytest.raises(ValueError, match=r"precision: cache 'fp32' vs configured 'bf16'"):
        build_teacher_now(student, CPU)


def test_a_cache_of_an_older_version_is_refused_with_what_to_do(setup, tmp_path):
    _, dataset, model, _ = setup
    with open(tmp_path / "manifest.json", "w") as f:
        json.dump({"version": 1, "num_shards": 0, "settings": {}}, f)
    for load in (lambda: TeacherScoreCache.load(str(tmp_path)), lambda: build(model, dataset, tmp_path, top_m=1)):
        with pytest.raises(ValueError, match=r"version 1.*rebuild it into a new folder or delete"):
            load()


def test_a_recorded_cache_is_verified_and_read_by_a_run_with_the_same_teacher(setup, tmp_path):
    """The ``compare`` path: a run records its teacher's logits (``distill.teacher_record``);
    a run with the same teacher reads them at start-up and gets the recorder's loss without
    building the teacher; a run with another teacher precision is refused."""
    from lavis_cprd.models.student import build_teacher_now

    _, dataset, _, _ = setup
    scores = str(tmp_path / "scores")
    torch.manual_seed(1)
    recorder = CprdDualEncoder.from_config(
        tiny_model_cfg(num_hard_negatives=3, valid_threshold=0.5, teacher_record=scores)).eval()
    build_teacher_now(recorder, CPU)
    batch = batch_of(dataset, [0, 1, 6, 7, 12, 13, 20, 21, 30, 31])
    online = recorder(batch)
    recorder.save_teacher_record()
    manifest = manifest_of(scores)
    assert manifest["teacher"] == {"arch": "blip_image_text_matching", "checkpoint": "", "checkpoint_sha256": None,
                                   "seed": 0, "precision": "fp32"}  # the tiny config's random-init teacher
    assert manifest["files"] == {name: sha256_of(os.path.join(scores, name)) for name in ("captions.json", "shard_00000.pt")}

    reader = student_reading(scores)
    reader.load_state_dict(recorder.state_dict())
    build_teacher_now(reader, CPU)
    cached = reader(batch)
    assert float(cached.teacher_cache_hit_rate) == 1.0 and not reader.objective.teacher_built
    assert cached.loss_distill.item() == pytest.approx(online.loss_distill.item(), rel=1e-6)
    with pytest.raises(ValueError, match=r"precision: cache 'fp32' vs configured 'bf16'"):
        build_teacher_now(student_reading(scores, precision="bf16"), CPU)
