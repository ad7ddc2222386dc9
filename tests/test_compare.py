"""`lavis-cprd compare` at tiny sizes: every method and ablation trains, and the table is
LAVIS's metrics of exactly those runs."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from test_demo import DATA, STUDENT

# compare's mechanics on the unique-caption mode (a mined negative is never a true match), with
# the packaged teacher
OPTIONS = [*DATA, "datasets.cprd_shapes.generator.captions=unique"]
MICRO = ["--options", *OPTIONS, "--student-options", *STUDENT]
STUDENT_OPTIONS = [*OPTIONS, *STUDENT]  # a student run's config overrides

RUNS = {  # run name -> (table label, expected distill config)
    "none": ("ITC only (baseline)", {"loss": "none"}),
    "cprd": ("cprd", {"loss": "cprd", "num_hard_negatives": 3}),
    "margin_mse": ("margin_mse", {"loss": "margin_mse"}),
    "loopitr": ("loopitr", {"loss": "loopitr"}),
    "kl": ("kl", {"loss": "kl"}),
    "listmle_full": ("listmle_full", {"loss": "listmle_full"}),
    "conaclip": ("conaclip", {"loss": "conaclip", "teacher": {"arch": "blip_feature_extractor"}}),
    "cprd_weight0.5": ("cprd, weight 0.5", {"loss": "cprd", "weight": 0.5}),
    "cprd_k2": ("cprd, K = 2", {"loss": "cprd", "num_hard_negatives": 2}),
}


def compare(out, *extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "lavis_cprd.apps.cli", "compare", "--output", str(out), "--seeds", "0", "--weights", "0.5", "--ks", "2",
         *MICRO, *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    proc = compare(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.load(open(out / "results.json"))


def test_every_method_and_ablation_is_a_row_of_its_own_run(compare_run):
    out, results = compare_run
    assert [row["name"] for row in results["table"]] == [label for label, _ in RUNS.values()]
    for name, (label, distill) in RUNS.items():
        ckpt = out / f"{name}_seed0" / "checkpoint_best.pth"
        stored = torch.load(ckpt, map_location="cpu", weights_only=True)["config"]["model"]["distill"]
        assert {k: stored[k] for k in distill if k != "teacher"} == {k: v for k, v in distill.items() if k != "teacher"}, name
        assert stored["teacher"]["arch"] == distill.get("teacher", {}).get("arch", "blip_image_text_matching"), name
        (job,) = glob.glob(str(out / f"{name}_seed0" / "jobs" / "*"))
        logged = [json.loads(line) for line in open(os.path.join(job, "evaluate.txt"))][-1]
        row = next(r for r in results["table"] if r["name"] == label)
        for key in ("txt_r1", "img_r5", "r_mean"):
            assert row[key] == pytest.approx(logged[key]), (name, key)


def test_finding1_statistics_tau_table_and_plot(compare_run):
    out, results = compare_run
    assert set(results["score_distributions"]) == set(RUNS) == set(results["kendall_tau"])
    for stats in results["score_distributions"].values():
        assert stats["positive"]["pairs"] == 12 * 3
        assert 0 <= stats["easy negative"]["teacher_mean"] <= 1
    assert all(-1 <= t <= 1 for t in results["kendall_tau"].values())
    md = open(out / "results.md").read()
    assert "| model | seeds | txt_r1" in md
    rows = {r["name"]: r for r in results["table"]}
    base = rows["ITC only (baseline)"]["r_mean"]
    findings = md.split("| model | r_mean − baseline")[1]
    for name, (label, _) in RUNS.items():
        stats = results["score_distributions"][name]
        gap = "—" if name == "none" else f"{rows[label]['r_mean'] - base:+.1f}"
        easy = f"{stats['positive']['student_mean']:.2f} / {stats['hard negative']['student_mean']:.2f} / "
        assert f"| {label} | {gap} | {results['kendall_tau'][name]:.2f} | {easy}" in findings, label
    for figure in ("metrics.png", "score_distributions.png"):
        with Image.open(out / figure) as img:
            assert img.size[0] > 500
        assert f"]({figure})" in md  # results.md links it


def test_unknown_method_lists_the_choices(tmp_path):
    proc = compare(tmp_path, "--methods", "cprd", "distill_typo")
    assert proc.returncode == 2
    assert "unknown method(s) ['distill_typo']" in proc.stderr and "'listmle_full'" in proc.stderr
    proc = compare(tmp_path, "--methods", "none", "cprd", "--oracle", "kl")
    assert proc.returncode == 2 and "--oracle ['kl']: not among --methods ['none', 'cprd']" in proc.stderr


def test_oracle_runs_and_relevance_metrics(compare_run):
    """``--oracle`` adds a shapes_oracle-distilled run of each cross-encoder method (the
    teacher and the baseline are reused); the table carries the relevance-aware metrics, equal
    to an independent recomputation from the run's own val/test log."""
    out, _ = compare_run
    proc = compare(out, "--methods", "none", "cprd", "--weights", "--ks", "--oracle", "--no-trained-teacher")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.load(open(out / "results.json"))
    assert [r["name"] for r in results["table"]] == ["ITC only (baseline)", "cprd (oracle teacher)"]
    stored = torch.load(out / "cprd_oracle_seed0" / "checkpoint_best.pth", map_location="cpu", weights_only=True)
    teacher = stored["config"]["model"]["distill"]["teacher"]
    assert teacher["arch"] == "shapes_oracle" and teacher["annotations"].endswith("train.json")
    (job,) = glob.glob(str(out / "cprd_oracle_seed0" / "jobs" / "*"))
    logged = json.load(open(os.path.join(job, "metrics.json")))["test/best"]
    row = results["table"][1]
    for key in ("r_mean", "rel_map_at_r", "rank_tau"):
        assert row[key] == pytest.approx(logged[key]), key
    assert "| model | seeds | r_mean | rel_map_at_r" in open(out / "results.md").read()
    # val, at the epoch the run's best checkpoint won (choices are made on it)
    epoch = torch.load(out / "cprd_oracle_seed0" / "checkpoint_best.pth", map_location="cpu", weights_only=True)["epoch"]
    logged_val = json.load(open(os.path.join(job, "metrics.json")))[f"val/{epoch}"]
    val_row = next(r for r in results["val_table"] if r["name"] == "cprd (oracle teacher)")
    for key in ("r_mean", "rel_map_at_r", "rank_tau"):
        assert val_row[key] == pytest.approx(logged_val[key]), key
    assert "The same on the val split" in open(out / "results.md").read()

    # the teacher's row: its ITM score of every test pair, assembled here one image at a time
    from lavis.tasks.retrieval import RetrievalTask
    from torch.utils.data import DataLoader

    from lavis_cprd.apps.runs import eval_split, load_trained
    from lavis_cprd.datasets.true_matches import dataset_relevance
    from lavis_cprd.relevance import relevance_metrics
    from lavis_cprd.teachers import BlipITMTeacher

    dataset, _ = eval_split("configs/cprd_tiny_shapes.yaml", STUDENT_OPTIONS)
    images = torch.cat([b["image"] for b in DataLoader(dataset, batch_size=64)])
    itm = BlipITMTeacher(load_trained(results["teacher_checkpoint"], torch.device("cpu")))
    n_txt = len(dataset.text)
    scores = np.stack([itm.score(images, dataset.text, torch.tensor([[i, j] for j in range(n_txt)])).numpy()
                       for i in range(len(images))])
    from lavis.common.registry import registry

    registry.mapping["paths"]["output_dir"] = str(out)  # _report_metrics appends to evaluate.txt there
    expected = RetrievalTask._report_metrics(scores, scores.T, dataset.txt2img, dataset.img2txt)
    truth = dataset_relevance(dataset)
    expected.update(relevance_metrics(scores, truth["true"], truth["annotated"], truth["grades"]))
    assert results["teacher"]["name"] == "teacher: ITM on every pair"
    for key in ("r_mean", "rel_map_at_r", "rank_tau"):
        assert results["teacher"][key] == pytest.approx(expected[key], abs=1e-4), key


def test_diagnose_reports_teacher_quality(compare_run, tmp_path):
    """``lavis-cprd diagnose`` on the compare run's student: with the trained teacher, its
    positive-first rate equals a direct count over the scores it saved; with the oracle as
    teacher, the positive always comes first (no mined negative is a true match on unique-caption
    data) and the teacher agrees with the ground truth perfectly."""
    out, results = compare_run
    ckpt = out / "cprd_seed0" / "checkpoint_best.pth"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    reports = {}
    for name, extra in (("trained", ["--teacher-ckpt", results["teacher_checkpoint"]]),
                        ("oracle", ["--options", *STUDENT_OPTIONS, "model.distill.teacher.arch=shapes_oracle"])):
        args = ["--options", *STUDENT_OPTIONS] if name == "trained" else []
        proc = subprocess.run(
            [sys.executable, "-m", "lavis_cprd.apps.cli", "diagnose", "--cfg-path", "configs/cprd_tiny_shapes.yaml", "--ckpt", str(ckpt),
             "--batches", "2", "--output", str(tmp_path / name), *args, *extra],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        reports[name] = json.load(open(tmp_path / name / "diagnose.json"))
    raw = np.load(tmp_path / "trained" / "diagnose_scores.npz")
    first = sum(1 for pos, hard in zip(raw["t_pos"][:, 0], raw["t_hard"]) if all(pos > h for h in hard))
    assert reports["trained"]["positive_first_rate"] == pytest.approx(first / len(raw["t_pos"]))
    assert reports["trained"]["queries"] == len(raw["t_pos"]) > 16  # two batches of 16, both directions
    assert reports["oracle"]["positive_first_rate"] == 1.0
    assert reports["oracle"]["tau_teacher_oracle"] == pytest.approx(1.0)
    assert reports["trained"]["norm_ratio"] > 0 and -1 <= reports["trained"]["cosine"] <= 1
    with Image.open(tmp_path / "trained" / "diagnose.png") as img:
        assert img.size[0] > 500


def _logged_epochs(run_dir):
    (job,) = glob.glob(str(run_dir / "jobs" / "*"))
    return [json.loads(line) for line in open(os.path.join(job, "log.txt")) if "train_loss" in line]


def test_runs_of_a_seed_share_the_teachers_scores(compare_run, tmp_path):
    """kl (the first all-pair run) records the trained teacher's logits; the seed's other
    cross-encoder runs read every pair they need from it (they draw the same batches), and train
    as they would have without it (``--no-shared-scores``)."""
    out, _ = compare_run
    readers = ["cprd", "loopitr", "margin_mse", "listmle_full", "cprd_weight0.5", "cprd_k2"]
    assert os.path.isfile(out / "kl_seed0" / "teacher_scores" / "manifest.json")
    for name in readers:
        rates = [float(e["train_teacher_cache_hit_rate"]) for e in _logged_epochs(out / f"{name}_seed0")]
        assert rates and all(r == 1.0 for r in rates), (name, rates)
    for name in ("none", "kl", "conaclip"):  # no teacher, the recorder, another teacher
        assert all("train_teacher_cache_hit_rate" not in e for e in _logged_epochs(out / f"{name}_seed0")), name

    proc = compare(tmp_path, "--methods", "cprd", "listmle_full", "--weights", "--ks", "--no-shared-scores")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name in ("cprd", "listmle_full"):
        assert all("train_teacher_cache_hit_rate" not in e for e in _logged_epochs(tmp_path / f"{name}_seed0")), name
        shared, own = (torch.load(d / f"{name}_seed0" / "checkpoint_best.pth", map_location="cpu", weights_only=True)["model"]
                       for d in (out, tmp_path))
        assert shared.keys() == own.keys()
        for key in shared:  # bf16 teacher: a pair's logit may round differently in another call's company
            assert torch.allclose(shared[key].float(), own[key].float(), atol=1e-3), (name, key)


def test_a_changed_config_retrains_the_recorder_and_its_readers_read_the_new_scores(compare_run, tmp_path):
    """The seed's recorder (kl) and a reader (cprd), copied to another output folder, are reused
    there as they are (paths inside it compare relative to it). With another learning rate both
    retrain: the old runs, the old recorded scores with them, are kept aside, and cprd reads what
    the retrained kl recorded, not the superseded recording."""
    import shutil

    out, _ = compare_run
    for name in ("kl_seed0", "cprd_seed0"):
        shutil.copytree(out / name, tmp_path / name)
    two = ["--methods", "kl", "cprd", "--weights", "--ks"]
    proc = compare(tmp_path, *two)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.load(open(tmp_path / "results.json"))["run_reuse"] == {
        n: {"reused": True, "reason": "same config and version"} for n in ("kl_seed0", "cprd_seed0")}
    assert "lavis_cprd.apps.train" not in proc.stderr and "Runs trained: none" in proc.stdout

    proc = compare(tmp_path, *two, "--student-options", *STUDENT, "run.init_lr=0.002")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.load(open(tmp_path / "results.json"))["run_reuse"] == {
        n: {"reused": False, "reason": "request differs in run.init_lr"} for n in ("kl_seed0", "cprd_seed0")}
    assert proc.stderr.count("run.init_lr: 0.0005 -> 0.002") == 2
    assert "Runs reused (same config and lavis_cprd version): none" in proc.stdout
    recording = tmp_path / "kl_seed0" / "teacher_scores" / "manifest.json"
    (old_kl,) = glob.glob(str(tmp_path / "kl_seed0.superseded-*"))
    (old_cprd,) = glob.glob(str(tmp_path / "cprd_seed0.superseded-*"))
    assert open(os.path.join(old_kl, "teacher_scores", "manifest.json"), "rb").read() == \
        open(out / "kl_seed0" / "teacher_scores" / "manifest.json", "rb").read()  # the old recording, kept
    assert os.path.getmtime(recording) > os.path.getmtime(os.path.join(old_cprd, "checkpoint_best.pth"))
    stored = torch.load(tmp_path / "cprd_seed0" / "checkpoint_best.pth", map_location="cpu", weights_only=True)["config"]
    assert stored["run"]["init_lr"] == 0.002
    assert stored["model"]["distill"]["teacher_cache"] == str(recording.parent)
    rates = [float(e["train_teacher_cache_hit_rate"]) for e in _logged_epochs(tmp_path / "cprd_seed0")]
    assert rates and all(r == 1.0 for r in rates)


def test_score_statistics_equal_direct_teacher_scoring(compare_run):
    """compare looks the finding-1 pairs up in the teacher's all-pairs table; scoring them
    with the teacher directly gives the same means and tau."""
    from torch.utils.data import DataLoader

    from lavis_cprd.apps.reporting import kendall_tau_on_hard_negatives, score_distributions
    from lavis_cprd.apps.runs import eval_split, load_trained
    from lavis_cprd.datasets.true_matches import dataset_relevance
    from lavis_cprd.teachers import BlipITMTeacher

    out, results = compare_run
    dataset, _ = eval_split("configs/cprd_tiny_shapes.yaml", STUDENT_OPTIONS)
    loader = DataLoader(dataset, batch_size=64, shuffle=False)
    images = torch.cat([b["image"] for b in loader])
    teacher = BlipITMTeacher(load_trained(results["teacher_checkpoint"], torch.device("cpu")))
    i2t, _ = load_trained(str(out / "cprd_seed0" / "checkpoint_best.pth"), torch.device("cpu")).compute_sim_matrix(loader)
    truth = dataset_relevance(dataset)
    direct = score_distributions(teacher, images, dataset, i2t, 8, true=None if truth is None else truth["true"])
    for group, stats in direct.items():
        assert results["score_distributions"]["cprd"][group]["teacher_mean"] == pytest.approx(stats["summary"]["teacher_mean"], abs=1e-5)
    assert results["kendall_tau"]["cprd"] == pytest.approx(kendall_tau_on_hard_negatives(teacher, images, dataset, i2t, k=8), abs=1e-6)


def test_run_order_puts_readers_after_every_run_that_cannot_wait():
    """The headline plan's order: kl of each seed first (they record), then every run that reads
    no recorded scores, then the readers seed by seed; so with two workers no reader waits on a
    recorder that is still running while other work is left."""
    from lavis_cprd.apps import compare
    from lavis_cprd.apps.demo import HEADLINE

    args = compare.parse_args(list(HEADLINE))
    todo = [(n, s, o) for s in args.seeds for n, _, o in compare.plan(args)]
    recorders = compare.score_recorders(args, todo)
    assert recorders == {0: "kl", 1: "kl", 2: "kl"}
    order = [(n, s) for n, s, _ in sorted(todo, key=lambda j: compare.run_order(j, recorders, args.seeds))]
    assert order[:3] == [("kl", 0), ("kl", 1), ("kl", 2)]
    readers = {"listmle_full", "cprd", "loopitr", "margin_mse"}
    first_reader = next(i for i, (n, _) in enumerate(order) if n in readers)
    assert {n for n, _ in order[3:first_reader]} == {"none", "cprd_oracle", "conaclip"}
    assert [s for n, s in order[first_reader:]] == sorted(s for n, s in order[first_reader:])
    assert compare.score_recorders(compare.parse_args([*HEADLINE, "--no-shared-scores"]), todo) == {}
