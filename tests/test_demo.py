"""`lavis-cprd demo` at tiny sizes: every output exists and agrees with its sources."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

MICRO = [
    "--options", "datasets.cprd_shapes.generator.num_train=48", "datasets.cprd_shapes.generator.num_val=12",
    "datasets.cprd_shapes.generator.num_test=12", "run.max_epoch=1", "run.batch_size_train=16", "run.k_test=8",
    "model.distill.num_hard_negatives=3", "model.distill.start_epoch=0",  # one epoch: distil from the start
]


def demo(out, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "lavis_cprd.cli", "demo", "--output", str(out), "--seeds", "0", "--rerank-k", "8", *MICRO, *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo(out)


def test_demo_writes_table_json_figure(demo_run):
    out, log = demo_run
    results = json.load(open(out / "results.json"))
    names = [row["name"] for row in results["table"]]
    assert len(names) == 6 and names[-3:] == ["student: ITC only (baseline)", "student: ITC + CPRD",
                                              "student: ITC + CPRD, oracle teacher (upper bound)"]
    assert sum(n.startswith("teacher") for n in names) == 3
    for row in results["table"]:
        assert {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"} <= set(row)
    assert set(results["kendall_tau"]) == {"baseline", "cprd", "cprd_oracle"}
    assert all(-1 <= t <= 1 for t in results["kendall_tau"].values())
    assert set(results["score_distributions"]) == {"positive", "hard negative", "easy negative"}
    assert results["score_distributions"]["positive"]["pairs"] == 12 * 3
    binding = results["within_family_accuracy"]
    assert set(binding) == {"chance", "teacher_itm", "teacher_itc", "baseline", "cprd", "cprd_oracle"}
    assert len(binding["baseline"]) == len(binding["cprd"]) == 1
    assert 1 / 3 <= binding["chance"] <= 1  # families of at most 3 images
    assert all(0 <= a <= 1 for v in binding.values() for a in np.atleast_1d(v))
    table = open(out / "results.md").read()
    assert table.startswith("| model | seeds | txt_r1") and "student: ITC + CPRD" in table
    assert "| student: ITC + CPRD |" in log  # printed too
    with Image.open(out / "score_distributions.png") as img:
        assert img.size[0] > 500 and img.size[1] > 200


def test_demo_student_rows_match_training_test_metrics(demo_run):
    """The table's student metrics are the test metrics LAVIS logged for the same checkpoint."""
    out, _ = demo_run
    results = json.load(open(out / "results.json"))
    for method in ("baseline", "cprd", "cprd_oracle"):
        (job,) = glob.glob(str(out / f"{method}_seed0" / "jobs" / "*"))
        logged = [json.loads(line) for line in open(os.path.join(job, "evaluate.txt"))][-1]
        ours = results["runs"][method][0]
        for key in ("txt_r1", "img_r1", "r_mean"):
            assert ours[key] == pytest.approx(logged[key]), (method, key)


def test_demo_reuses_finished_runs(demo_run):
    out, _ = demo_run
    teacher = out / "teacher" / "checkpoint_best.pth"
    mtime = os.path.getmtime(teacher)
    log = demo(out)
    assert os.path.getmtime(teacher) == mtime
    assert log.count("reusing") == 5  # teacher (two stages) + three students
    assert "lavis_cprd.train" not in log.split("reusing")[0]
