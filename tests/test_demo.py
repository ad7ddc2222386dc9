"""`lavis-cprd demo` at tiny sizes: every output exists and agrees with its sources."""
import glob
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO

DATA = [  # every run, teachers included
    "datasets.cprd_shapes.generator.num_train=48", "datasets.cprd_shapes.generator.num_val=12",
    "datasets.cprd_shapes.generator.num_test=12", "run.max_epoch=1", "run.batch_size_train=16", "run.k_test=8",
]
STUDENT = ["model.distill.num_hard_negatives=3", "model.distill.start_epoch=0"]  # one epoch: distil from the start
MICRO = ["--options", *DATA, "--student-options", *STUDENT]


REDUCED = ["--methods", "none", "cprd", "kl", "--oracle", "cprd", "--retrain-teacher"]  # the headline plan, fewer peers


def demo(out, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "lavis_cprd.apps.cli", "demo", "--output", str(out), "--seeds", "0", *REDUCED, *MICRO, *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo(out)


def test_demo_writes_tables_and_figures(demo_run):
    out, log = demo_run
    results = json.load(open(out / "results.json"))
    assert [row["name"] for row in results["table"]] == ["ITC only (baseline)", "cprd", "cprd (oracle teacher)", "kl"]
    assert results["teacher"]["name"] == "teacher: ITM on every pair"
    for row in results["table"]:
        assert {"txt_r1", "img_r1", "r_mean", "rel_map_at_r", "rank_tau"} <= set(row)
    assert set(results["kendall_tau"]) == {"none", "cprd", "cprd_oracle", "kl"}
    assert all(-1 <= t <= 1 for t in results["kendall_tau"].values())
    assert results["teacher_checkpoint"] == str(out / "teacher" / "teacher_fp16.pth")
    report = open(out / "results.md").read()
    assert "[metrics per method](metrics.png)" in report and "[score distributions](score_distributions.png)" in report
    assert "| cprd (oracle teacher) |" in report and "| cprd (oracle teacher) |" in log  # printed too
    for figure in ("metrics.png", "score_distributions.png"):
        with Image.open(out / figure) as img:
            assert img.size[0] > 500 and img.size[1] > 200


def test_demo_student_rows_match_training_test_metrics(demo_run):
    """The table's student metrics are the test metrics LAVIS logged for the same checkpoint."""
    out, _ = demo_run
    results = json.load(open(out / "results.json"))
    for method in ("none", "cprd", "cprd_oracle", "kl"):
        (job,) = glob.glob(str(out / f"{method}_seed0" / "jobs" / "*"))
        logged = [json.loads(line) for line in open(os.path.join(job, "evaluate.txt"))][-1]
        ours = results["runs"][method][0]
        for key in ("txt_r1", "img_r1", "r_mean"):
            assert ours[key] == pytest.approx(logged[key]), (method, key)


def test_retrained_teacher_is_exported_in_fp16_and_scores_as_trained(demo_run):
    """``--retrain-teacher`` distils from the fp16 export of its run: every weight is the
    trained one rounded to fp16, and the ITM adapter scores with it as with the fp32 original."""
    import torch
    from omegaconf import OmegaConf

    from lavis_cprd.teachers import build_teacher

    out, _ = demo_run
    full = torch.load(out / "teacher" / "checkpoint_best.pth", map_location="cpu", weights_only=True)
    half = torch.load(out / "teacher" / "teacher_fp16.pth", map_location="cpu", weights_only=True)
    assert set(half) == {"model", "config"} and half["config"]["model"] == full["config"]["model"]
    assert half["model"].keys() == full["model"].keys()
    for key, value in full["model"].items():
        if value.is_floating_point():
            assert half["model"][key].dtype == torch.float16
            torch.testing.assert_close(half["model"][key], value.half(), rtol=0, atol=0, msg=key)
    teachers = [build_teacher(OmegaConf.create({"arch": "blip_image_text_matching", "checkpoint": str(out / "teacher" / f)}))
                for f in ("checkpoint_best.pth", "teacher_fp16.pth")]
    torch.manual_seed(0)
    images, pairs = torch.randn(4, 3, 48, 48), torch.cartesian_prod(torch.arange(4), torch.arange(2))
    captions = ["there is a red circle", "there is a large blue square to the left of a green shape"]
    full_scores, half_scores = (t.score(images, captions, pairs) for t in teachers)
    torch.testing.assert_close(half_scores, full_scores, rtol=0, atol=5e-3)


RUN_FOLDERS = {"teacher_itc", "teacher", "none_seed0", "cprd_seed0", "cprd_oracle_seed0", "kl_seed0"}


def test_demo_reuses_finished_runs(demo_run):
    out, first_log = demo_run
    assert "Runs reused (same config and lavis_cprd version): none" in first_log
    export = out / "teacher" / "teacher_fp16.pth"
    mtime = os.path.getmtime(export)
    log = demo(out)
    assert os.path.getmtime(export) == mtime
    assert log.count("reusing") == 6  # teacher (two stages) + four students
    assert log.count(": same config and lavis_cprd version (") == 6  # each says why
    assert "lavis_cprd.apps.train" not in log.split("reusing")[0]
    assert "Runs trained: none" in log and not glob.glob(str(out / "*.superseded-*"))
    reuse = json.load(open(out / "results.json"))["run_reuse"]
    assert reuse == {name: {"reused": True, "reason": "same config and version"} for name in RUN_FOLDERS}


def test_demo_warns_when_the_packaged_teachers_data_differ(caplog):
    from argparse import Namespace

    from lavis_cprd.apps.runs import STUDENT_CFG, warn_if_other_data

    args = Namespace(student_cfg=STUDENT_CFG, options=[], student_options=[])
    with caplog.at_level("WARNING", logger="lavis_cprd.apps.runs"):
        warn_if_other_data(args)
        assert not caplog.records  # the default config is the teacher's data
        warn_if_other_data(Namespace(**{**vars(args), "options": ["datasets.cprd_shapes.generator.captions=unique"]}))
    (record,) = caplog.records
    assert "differ in ['captions']" in record.getMessage() and "--retrain-teacher" in record.getMessage()


def test_demo_runs_every_method_with_the_packaged_contest_winners(demo_run):
    """The main job trains each method with the knobs that won the contest on val
    (``paths.TUNED_SHAPES``), CPRD's oracle run included; ITC alone has none to tune."""
    from lavis_cprd.paths import TUNED_SHAPES

    out, _ = demo_run
    contest = json.load(open(TUNED_SHAPES))
    results = json.load(open(out / "results.json"))
    assert results["tuned_from"] == TUNED_SHAPES and results["tune_seeds"] == contest["tune_seeds"]
    assert "Tuning (apps.tuning) in the contest of" in open(out / "results.md").read()
    for run, method in (("cprd_seed0", "cprd"), ("cprd_oracle_seed0", "cprd"), ("kl_seed0", "kl")):
        report = contest["tuning"][method]
        winner = report["trials"][report["winner"]]["options"]
        knobs = dict(o.split("model.distill.", 1)[1].split("=") for o in winner)
        assert "weight" in knobs and knobs["loss"] == method
        distill = json.load(open(out / run / "run_request.json"))["config"]["model"]["distill"]
        for key, value in knobs.items():
            assert str(distill[key]) == value or float(distill[key]) == float(value), (run, key)
    assert json.load(open(out / "none_seed0" / "run_request.json"))["config"]["model"]["distill"]["loss"] == "none"


def test_demo_takes_the_packaged_winners_unless_told_otherwise():
    from lavis_cprd.apps import compare
    from lavis_cprd.apps.demo import compare_argv
    from lavis_cprd.paths import TUNED_SHAPES

    assert compare.parse_args(compare_argv([])).tuned_from == TUNED_SHAPES
    assert compare.parse_args(compare_argv(["--tuned-from", "none"])).tuned_from is None  # the configured knobs
    assert compare.parse_args(compare_argv(["--tuned-from", "other.json"])).tuned_from == "other.json"
    tuned = compare.parse_args(compare_argv(["--tune", "6"]))
    assert tuned.tune == 6 and tuned.tuned_from is None
    assert compare.parse_args(compare_argv(["--methods", "none", "kl"])).oracle is None  # no CPRD, no oracle run
