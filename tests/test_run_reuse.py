"""``compare``/``demo`` reuse a finished run only when it was trained for the same resolved
config, lavis_cprd version and checkpoint contents; otherwise the old run is moved aside (never
deleted) and the run retrained, and the log says which and why."""
import glob
import json
import logging
import os
import shutil

import pytest
import torch

from conftest import experiment_yaml
from lavis_cprd.apps.runs import train_run
from lavis_cprd.checkpoints import load_checkpoint

TINY = ["run.max_epoch=1"]


@pytest.fixture
def experiment(retrieval_data, tmp_path):
    root, splits = retrieval_data
    return experiment_yaml(tmp_path / "exp.yaml", root, splits, tmp_path / "unused", **{"model.distill.loss": "none"})


def superseded(run_dir):
    return sorted(glob.glob(f"{run_dir}.superseded-*"))


def request(experiment, run_dir, *options):
    """``run_request`` as ``train_run`` makes it (its run writes into ``run_dir/jobs``)."""
    from lavis_cprd.apps.run_reuse import run_request

    return run_request(experiment, [f"run.output_dir={os.path.join(run_dir, 'jobs')}", *TINY, *options], str(run_dir))


def test_changed_option_retrains_and_keeps_the_old_run_then_the_same_request_reuses(experiment, tmp_path, caplog):
    run_dir = str(tmp_path / "none_seed0")
    with caplog.at_level(logging.INFO, logger="lavis_cprd.apps.runs"):
        first = train_run(experiment, TINY, run_dir, threads=1)
        first_bytes = open(first, "rb").read()
        assert load_checkpoint(first)["config"]["run"]["init_lr"] == 1e-3
        caplog.clear()

        second = train_run(experiment, [*TINY, "run.init_lr=1e-2"], run_dir, threads=1)
        retrain_log = caplog.text
        caplog.clear()
        mtime = os.stat(second).st_mtime_ns
        third = train_run(experiment, [*TINY, "run.init_lr=1e-2"], run_dir, threads=1)

    # retrained under the new setting: the checkpoint's own config and its weights say so
    stored = load_checkpoint(second)
    assert stored["config"]["run"]["init_lr"] == 1e-2 and stored["config"]["run"]["max_epoch"] == 1
    assert json.load(open(os.path.join(run_dir, "run_request.json")))["config"]["run"]["init_lr"] == 1e-2
    # the old run is kept aside, untouched, with its own record
    (kept,) = superseded(run_dir)
    old_weights = torch.load(os.path.join(kept, "checkpoint_best.pth"), map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(old_weights[k], v) for k, v in stored["model"].items() if v.is_floating_point())
    assert open(os.path.join(kept, "checkpoint_best.pth"), "rb").read() == first_bytes
    assert json.load(open(os.path.join(kept, "run_request.json")))["config"]["run"]["init_lr"] == 1e-3
    assert "run.init_lr: 0.001 -> 0.01" in retrain_log and f"the old run is kept as {kept}" in retrain_log
    # the identical request reuses the run: same file, untouched, and the log says why
    assert third == second and os.stat(third).st_mtime_ns == mtime
    assert f"reusing {third}: same config and lavis_cprd version" in caplog.text
    assert "lavis_cprd.apps.train" not in caplog.text


def test_a_run_folder_without_a_record_is_retrained_and_kept(experiment, tmp_path, caplog):
    """A finished run from before requests were recorded: nothing says what it was trained for."""
    from lavis_cprd.apps.run_reuse import prepare_run_folder

    run_dir = tmp_path / "none_seed0"
    os.makedirs(run_dir)
    (run_dir / "checkpoint_best.pth").write_bytes(b"an old run")
    with caplog.at_level(logging.INFO, logger="lavis_cprd.apps.runs"):
        decision = prepare_run_folder(str(run_dir), request(experiment, run_dir))
    assert not decision.reused and decision.reason == "no record of its config"
    (kept,) = superseded(run_dir)
    assert open(os.path.join(kept, "checkpoint_best.pth"), "rb").read() == b"an old run"
    assert os.listdir(run_dir) == ["run_request.json"]  # ready for the new run, its request recorded
    assert "no record of its config" in caplog.text
    # that run interrupted, then asked for again: it trains again in the same folder
    again = prepare_run_folder(str(run_dir), request(experiment, run_dir))
    assert (again.reused, again.reason) == (False, "unfinished run of this config") and superseded(run_dir) == [kept]


def test_checkpoints_are_compared_by_content_and_the_version_counts(experiment, tmp_path, monkeypatch):
    """A teacher retrained and exported to the same path makes its students retrain; a copy of
    the same teacher elsewhere does not; another lavis_cprd version does."""
    from lavis_cprd.apps.run_reuse import request_differences
    from lavis_cprd.hashing import file_sha256

    teacher = tmp_path / "teacher_fp16.pth"
    teacher.write_bytes(b"teacher v1")
    options = ["model.distill.loss=cprd", f"model.distill.teacher.checkpoint={teacher}"]
    run_dir = tmp_path / "cprd_seed0"
    before = request(experiment, run_dir, *options)
    assert before["checkpoint_sha256"] == {"model.distill.teacher.checkpoint": file_sha256(str(teacher))}

    copy = tmp_path / "elsewhere.pth"
    shutil.copyfile(teacher, copy)
    assert request_differences(before, request(experiment, run_dir, *options, f"model.distill.teacher.checkpoint={copy}")) == []

    teacher.write_bytes(b"teacher v2")  # same size: only the mtime tells the hash memo it changed
    os.utime(teacher, ns=(1, 1))
    (changed,) = request_differences(before, request(experiment, run_dir, *options))
    assert changed[0] == "model.distill.teacher.checkpoint" and changed[1] != changed[2]

    monkeypatch.setattr("lavis_cprd.__version__", "99.0")
    differences = request_differences(before, request(experiment, run_dir, *options))
    assert ("lavis_cprd.__version__", before["lavis_cprd_version"], "99.0") in differences


def test_identical_requests_agree_wherever_they_are_made(experiment, tmp_path, monkeypatch):
    """Nothing that varies between two invocations of one request (working folder, LAVIS cache
    root, where the output folder lives) makes them differ."""
    from lavis_cprd.apps.run_reuse import request_differences

    def recording(out):  # a kl run recording its seed's teacher scores, as compare has it
        return request(experiment, out / "kl_seed0", "model.distill.loss=kl",
                       f"model.distill.teacher_record={out / 'kl_seed0' / 'teacher_scores'}")

    first = recording(tmp_path / "out")
    assert first["config"]["run"]["output_dir"] == str(tmp_path / "out" / "kl_seed0" / "jobs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LAVIS_CACHE_ROOT", str(tmp_path / "other_cache"))
    assert request_differences(first, recording(tmp_path / "out")) == []
    assert request_differences(first, recording(tmp_path / "moved")) == []  # the output folder renamed
    elsewhere = request(experiment, tmp_path / "out" / "kl_seed0", "model.distill.loss=kl",
                        f"model.distill.teacher_record={tmp_path / 'other' / 'teacher_scores'}")
    (changed,) = request_differences(first, elsewhere)
    assert changed[0] == "model.distill.teacher_record"
