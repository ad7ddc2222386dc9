"""Checkpoints that survive faults: kill -9 and --resume auto, torn files, weights-only loading."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, experiment_yaml
from lavis_cprd.checkpoints import CorruptCheckpointError, atomic_save, load_checkpoint
from lavis_cprd.training.job_folder import find_resume_checkpoint

EPOCHS = 3


def train_cmd(cfg, *extra):
    return [sys.executable, "-m", "lavis_cprd.apps.train", "--cfg-path", cfg, *extra]


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def final_test_metrics(job_dir):
    return [json.loads(line) for line in open(os.path.join(job_dir, "evaluate.txt"))][-1]


@pytest.fixture(scope="module")
def runs(retrieval_data, tmp_path_factory):
    """One uninterrupted run, and one killed with SIGKILL once its first resumable checkpoint
    exists, then resumed with --resume auto."""
    root, splits = retrieval_data
    work = tmp_path_factory.mktemp("resume")
    overrides = {"run.max_epoch": EPOCHS, "model.distill.start_epoch": 1}
    full_cfg = experiment_yaml(work / "full.yaml", root, splits, work / "full", **overrides)
    subprocess.run(train_cmd(full_cfg), cwd=REPO, env=env(), check=True, capture_output=True, timeout=900)
    (full_job,) = glob.glob(str(work / "full" / "*"))

    cfg = experiment_yaml(work / "killed.yaml", root, splits, work / "killed", **overrides)
    proc = subprocess.Popen(train_cmd(cfg), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not glob.glob(str(work / "killed" / "*" / "checkpoint_latest.pth")):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (job,) = glob.glob(str(work / "killed" / "*"))
    killed_at = load_checkpoint(os.path.join(job, "checkpoint_latest.pth"))["epoch"]
    out = subprocess.run(train_cmd(cfg, "--resume", "auto"), cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return full_job, job, killed_at, out.stdout + out.stderr


def test_killed_run_resumes_to_the_same_final_metrics(runs):
    full_job, job, killed_at, output = runs
    assert killed_at < EPOCHS - 1  # it really was interrupted before the end
    assert f"Resumed from {os.path.join(job, 'checkpoint_latest.pth')} at epoch {killed_at + 1}" in output
    assert glob.glob(os.path.join(os.path.dirname(job), "*")) == [job]  # continued in its own job folder
    assert final_test_metrics(job) == final_test_metrics(full_job)  # bit-for-bit on CPU
    train_full = [json.loads(line) for line in open(os.path.join(full_job, "log.txt")) if line.startswith('{"train_')]
    train_resumed = [json.loads(line) for line in open(os.path.join(job, "log.txt")) if line.startswith('{"train_')]
    assert train_resumed[-1] == train_full[-1]  # the last epoch's training losses, to the last digit


def test_checkpoints_load_weights_only_and_carry_resume_state(runs):
    _, job, _, _ = runs
    latest = load_checkpoint(os.path.join(job, "checkpoint_latest.pth"))  # weights_only=True inside
    assert latest["epoch"] == EPOCHS - 1
    assert {"model", "optimizer", "config", "scaler", "epoch", "rng", "rng_per_rank", "best_agg_metric",
            "best_epoch"} <= set(latest)
    assert set(latest["rng"]) >= {"torch", "numpy", "python"}
    assert len(latest["rng_per_rank"]) == 1 and torch.equal(latest["rng_per_rank"][0]["torch"], latest["rng"]["torch"])
    best = load_checkpoint(os.path.join(job, "checkpoint_best.pth"))
    assert best["best_agg_metric"] == latest["best_agg_metric"] and best["epoch"] == latest["best_epoch"]
    assert not glob.glob(os.path.join(job, "*.tmp.*"))


def test_truncated_checkpoint_is_detected_and_auto_resume_falls_back(tmp_path):
    job = tmp_path / "out" / "20260101000"
    job.mkdir(parents=True)
    atomic_save({"epoch": 3, "model": {"w": torch.ones(1000)}}, str(job / "checkpoint_previous.pth"))
    atomic_save({"epoch": 4, "model": {"w": torch.ones(1000)}}, str(job / "checkpoint_latest.pth"))
    assert find_resume_checkpoint(str(tmp_path / "out")) == str(job / "checkpoint_latest.pth")
    data = (job / "checkpoint_latest.pth").read_bytes()
    (job / "checkpoint_latest.pth").write_bytes(data[: len(data) // 2])  # a crash mid-write, without atomic_save
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint_latest.pth' \(\d+ bytes\) is unreadable, truncated or corrupt"):
        load_checkpoint(str(job / "checkpoint_latest.pth"))
    assert find_resume_checkpoint(str(tmp_path / "out")) == str(job / "checkpoint_previous.pth")
    (job / "checkpoint_previous.pth").write_bytes(b"not a checkpoint")
    assert find_resume_checkpoint(str(tmp_path / "out")) is None


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(retrieval_data, tmp_path):
    root, splits = retrieval_data
    bad = tmp_path / "checkpoint_latest.pth"
    bad.write_bytes(b"PK\x03\x04 torn")
    cfg = experiment_yaml(tmp_path / "x.yaml", root, splits, tmp_path / "o", **{"run.max_epoch": 1})
    out = subprocess.run(train_cmd(cfg, "--resume", str(bad)), cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=900)
    assert out.returncode != 0
    assert "is unreadable, truncated or corrupt" in out.stderr


def test_a_full_disk_names_the_file_and_the_space_needed(tmp_path, monkeypatch):
    """torch's own message for a full disk is ``[enforce fail at inline_container.cc:672]
    unexpected pos``; a write that raises ENOSPC, and that message on a disk with no room, both
    become an error naming the file, the disk and the space; the old file stays whole."""
    import errno
    import shutil
    from collections import namedtuple

    from lavis_cprd.checkpoints import OutOfDiskSpaceError, atomic_json

    target = tmp_path / "checkpoint_latest.pth"
    target.write_bytes(b"the previous checkpoint")
    state = {"model": {"w": torch.ones(1000)}, "epoch": 2}  # 4000 tensor bytes

    def short_of_space(obj, f):
        open(f, "wb").write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", short_of_space)
    with pytest.raises(OutOfDiskSpaceError, match=rf"out of disk space writing {target}: about 3.9 KiB needed, "
                       r"[\d.]+ \w+ free on the disk mounted at /"):
        atomic_save(state, str(target))
    assert target.read_bytes() == b"the previous checkpoint" and os.listdir(tmp_path) == [target.name]

    def torn(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(RuntimeError, match="unexpected pos") as plenty:  # room on the disk: not a full disk
        atomic_save(state, str(target))
    assert not isinstance(plenty.value, OutOfDiskSpaceError)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 << 20, 10 << 20, 0))
    with pytest.raises(OutOfDiskSpaceError, match=r"about 3.9 KiB needed, 0 B free"):
        atomic_save(state, str(target))

    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, mode="r", *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")) if "w" in mode else real_open(f, mode, *a, **k))
    with pytest.raises(OutOfDiskSpaceError, match=r"writing .*metrics.json: more needed than the 0 B free"):
        atomic_json({"val/0": {}}, str(tmp_path / "metrics.json"))
