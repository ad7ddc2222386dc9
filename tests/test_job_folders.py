"""Runs in one output folder never touch each other's files; ``--resume auto`` continues a run of
the same config; a resume under another config says how it differs (an error for weights of
another shape); the console keeps logging on every resume path."""
import glob
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, experiment_yaml
from lavis_cprd.checkpoints import CheckpointMismatchError, load_checkpoint
from lavis_cprd.training import job_folder
from lavis_cprd.training.job_folder import check_resume_fits, claim_job_folder, launch_differences


def train(cfg, *extra, **popen):
    cmd = [sys.executable, "-m", "lavis_cprd.apps.train", "--cfg-path", cfg, *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc):
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def shared_output(retrieval_data, tmp_path_factory):
    """Three ITC runs into one output folder within a minute: seed 1, then seeds 2 and 3 at once."""
    root, splits = retrieval_data
    work = tmp_path_factory.mktemp("jobs")
    out = work / "out"
    cfgs = {seed: experiment_yaml(work / f"s{seed}.yaml", root, splits, out, **{
        "run.max_epoch": 1, "run.seed": seed, "model.distill.loss": "none"}) for seed in (1, 2, 3)}
    finish(train(cfgs[1]))
    finish_together = [train(cfgs[2]), train(cfgs[3])]
    for proc in finish_together:
        finish(proc)
    return out, cfgs


def seed_of(path):
    return load_checkpoint(path)["config"]["run"]["seed"]


def test_runs_in_one_output_folder_keep_their_own_checkpoints(shared_output):
    out, _ = shared_output
    jobs = sorted(glob.glob(str(out / "*")))
    assert len(jobs) == 3  # LAVIS's ten-minute job id gave all three one folder
    for job in jobs:
        best, latest = os.path.join(job, "checkpoint_best.pth"), os.path.join(job, "checkpoint_latest.pth")
        assert seed_of(best) == seed_of(latest)  # both files of one run
        assert not os.path.exists(os.path.join(job, "checkpoint_previous.pth"))  # nobody's latest was rotated
        runs_logged = [line for line in open(os.path.join(job, "evaluate.txt"))]
        assert len(runs_logged) == 2  # one run's val and test evaluations, not two runs' interleaved
    assert sorted(seed_of(os.path.join(j, "checkpoint_best.pth")) for j in jobs) == [1, 2, 3]


def test_job_folders_are_claimed_once_each(tmp_path):
    names = [claim_job_folder(str(tmp_path), stamp="20261207120000") for _ in range(3)]
    assert names == ["20261207120000", "20261207120000-2", "20261207120000-3"]
    assert sorted(os.listdir(tmp_path)) == names


def test_auto_resume_continues_the_run_of_the_same_config_and_keeps_logging(shared_output):
    """Seed 1's run is the oldest of three; its latest checkpoint is torn, so the resume falls
    back to the one before it, and the console still shows the resumed run's progress."""
    out, cfgs = shared_output
    (job,) = [j for j in glob.glob(str(out / "*")) if seed_of(os.path.join(j, "checkpoint_best.pth")) == 1]
    latest, previous = os.path.join(job, "checkpoint_latest.pth"), os.path.join(job, "checkpoint_previous.pth")
    data = open(latest, "rb").read()
    open(previous, "wb").write(data)
    open(latest, "wb").write(data[: len(data) // 2])  # torn
    output = finish(train(cfgs[1], "--resume", "auto"))
    assert "skipping 2 checkpoint(s) of runs with another config" in output
    assert re.search(r"the newest, .*checkpoint_latest.pth, differs in run.seed: [23] -> 1", output)
    assert f"Resumed from {previous} at epoch 1" in output  # an INFO line: the console was left at WARNING before
    assert "'agg_metrics'" in output  # the final test's metrics reach the console too
    assert len(glob.glob(str(out / "*"))) == 3  # continued in its own folder
    assert len(open(os.path.join(job, "evaluate.txt")).readlines()) == 3  # + the resumed run's test


def test_auto_resume_never_picks_a_folder_a_live_run_holds(tmp_path):
    from lavis_cprd.checkpoints import atomic_save

    old, new = (tmp_path / name for name in ("20260101000000", "20260101000001"))
    for epoch, folder in enumerate((old, new)):
        folder.mkdir()
        atomic_save({"epoch": epoch, "config": {"run": {"seed": 1}}}, str(folder / "checkpoint_latest.pth"))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from lavis_cprd.training.job_folder import lock_job_folder as lock; "
        f"assert lock({str(new)!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert job_folder.in_use(str(new))
        assert job_folder.find_resume_checkpoint(str(tmp_path), {"run": {"seed": 1}}) == str(old / "checkpoint_latest.pth")
    finally:
        holder.kill()
        holder.wait()
    assert not job_folder.in_use(str(new))  # a killed run's lock goes with it
    assert job_folder.find_resume_checkpoint(str(tmp_path), {"run": {"seed": 1}}) == str(new / "checkpoint_latest.pth")


def test_config_differences_ignore_only_what_a_launch_fills_in():
    old = {"run": {"seed": 1, "rank": 0, "resume_ckpt_path": None}, "model": {"distill": {"loss": "cprd"}}}
    new = {"run": {"seed": 2, "rank": 3, "resume_ckpt_path": "x"}, "model": {"distill": {"loss": "kl", "k": 4}}}
    assert launch_differences(old, new) == [
        ("model.distill.k", None, 4), ("model.distill.loss", "cprd", "kl"), ("run.seed", 1, 2)]


def test_resume_under_another_config_lists_the_differences_and_refuses_other_shapes(caplog):
    model = torch.nn.Linear(4, 3)
    config = {"model": {"embed_dim": 3, "distill": {"loss": "cprd"}}, "run": {"seed": 1}}
    checkpoint = {"model": model.state_dict(), "config": {"model": {"embed_dim": 3, "distill": {"loss": "kl"}},
                                                          "run": {"seed": 0}}}
    with caplog.at_level(logging.WARNING):
        check_resume_fits("ck.pth", checkpoint, config, model)
    assert "model.distill.loss: 'kl' -> 'cprd', run.seed: 0 -> 1" in caplog.text
    wider = {"model": torch.nn.Linear(4, 5).state_dict(), "config": {"model": {"embed_dim": 5}, "run": {"seed": 1}}}
    with pytest.raises(CheckpointMismatchError, match=r"weight\(s\) of another shape \(weight \(5, 4\) vs the model's "
                       r"\(3, 4\).*model.embed_dim: 5 -> 3"):
        check_resume_fits("ck.pth", wider, config, model)
