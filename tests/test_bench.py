"""The benchmark scripts' methods (not their timings): FLOP counts extended from a small batch
must equal counts taken on the full batch."""
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.common import make_batch, student_config  # noqa: E402
from bench.flops import count, main as flops_main, step_pairs  # noqa: E402
from lavis_cprd.models.dual_encoder import CprdDualEncoder  # noqa: E402


def test_step_pairs_are_k_other_captions_and_k_other_images_per_query():
    pairs = step_pairs(4, 2)
    assert pairs.shape == (16, 2)
    assert not bool((pairs[:, 0] == pairs[:, 1]).any())  # no positives
    assert torch.bincount(pairs[:8, 0]).tolist() == [2, 2, 2, 2]  # image queries, K captions each
    assert torch.bincount(pairs[8:, 1]).tolist() == [2, 2, 2, 2]  # caption queries, K images each


def test_flops_extended_from_a_small_batch_equal_a_full_count():
    result = flops_main(["--size", "tiny", "--batch-size", "16", "--k", "3", "--count-batch", "4"])
    torch.manual_seed(0)
    model = CprdDualEncoder.from_config(student_config("tiny", "none", 1)).train()
    batch = make_batch(16, 48)
    itc = count(lambda: model(batch)["loss"].backward())
    teacher = count(lambda: model.teacher.logit(batch["image"], batch["text_input"], step_pairs(16, 3)))
    # The similarity matrix and the loss grow as batch^2; they are a few thousand FLOPs here.
    assert abs(result["itc_step_flops"] - itc) / itc < 1e-3
    assert result["teacher_flops_kv_per_image"] == teacher
    model.teacher.shares_image_projections = False
    plain = count(lambda: model.teacher.logit(batch["image"], batch["text_input"], step_pairs(16, 3)))
    assert result["teacher_flops_kv_per_pair"] == plain > teacher


# Each bench script at its smallest: the figures it reports must have the documented shape.
SMOKE = {
    "retrieval": ["--images", "6", "--captions-per-image", "2", "--k-test", "3"],
    "train_step": ["--batch-size", "8", "--k", "2", "--steps", "1", "--warmup", "0"],
    "scaling": ["--batch-sizes", "8", "12", "--ks", "2", "3", "--galleries", "6", "12", "--lavis-galleries", "4", "8",
                "--k-test", "2", "--steps", "1"],
    "teacher_cost": ["--batch-size", "8", "--steps", "1", "--warmup", "0"],
    "step_breakdown": ["--batch-size", "8", "--k", "2", "--variants", "fp32,fused+ckpt", "--steps", "1", "--warmup", "1"],
}


def _positive(values) -> bool:
    return all(isinstance(v, float) and 0 < v < float("inf") for v in values)


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_bench_script_reports_its_figures(script, tmp_path):
    module = importlib.import_module(f"bench.{script}")
    out = tmp_path / "out.json"
    argv = SMOKE[script] + ([] if script == "teacher_cost" else ["--json", str(out)])
    result = module.main(argv)
    if script == "retrieval":
        assert result["score_shapes"] == [[6, 12], [6, 12]] and _positive([result["student_s"], result["lavis_two_stage_s"]])
    elif script == "train_step":
        assert len(result["median_s"]) == 4 and _positive(result["median_s"].values())
    elif script == "scaling":
        assert [list(result[k]) for k in ("step_vs_batch", "step_vs_k", "retrieval_student", "retrieval_lavis")] == [
            ["8", "12"], ["2", "3"], ["6", "12"], ["4", "8"]]
    elif script == "teacher_cost":
        assert set(result) == {"no teacher", "online", "cached"} and _positive(result.values())
    else:
        phases = result["breakdown_s"]
        assert result["breakdown_of"] == "fused+ckpt" and set(result["median_s"]) == {"fp32", "fused+ckpt"}
        assert phases["teacher scoring"] > 0 and phases["student encoders (forward)"] > 0 and result["flops_per_step"] > 0
    if script != "teacher_cost":
        assert json.loads(out.read_text()) is not None


def test_data_loading_bench_reports_loader_and_step_rates(tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, LAVIS_CACHE_ROOT=str(tmp_path / "cache"))
    options = ["datasets.cprd_shapes.generator.num_train=64", "datasets.cprd_shapes.generator.num_val=8",
               "datasets.cprd_shapes.generator.num_test=8", "run.batch_size_train=8", "model.distill.start_epoch=0"]
    subprocess.run([sys.executable, os.path.join(REPO, "bench", "data_loading.py"), "--workers", "0,1", "--batches", "2",
                    "--warmup", "1", "--json", str(out), "--options", *options], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    result = json.loads(out.read_text())
    assert set(result["workers"]) == {"0", "1"} and result["batch_size"] == 8
    assert _positive([v for w in result["workers"].values() for v in w.values()] + [result["step_s_in_memory"]])


def test_step_breakdown_measures_each_variant_alone_and_ckpt_follows_the_config(monkeypatch):
    import argparse
    import weakref

    breakdown = importlib.import_module("bench.step_breakdown")
    # The ckpt variant recomputes the config's blocks: BLIP-base's last 4; every block where the
    # config names none (tiny); --ckpt-layer wins.
    options = dict(k=2, ckpt_layer=None)
    assert breakdown.config(argparse.Namespace(size="base", **options), {"fused", "ckpt"}).vit_ckpt_layer == 4
    assert breakdown.config(argparse.Namespace(size="tiny", **options), {"ckpt"}).vit_ckpt_layer >= 1000
    assert breakdown.config(argparse.Namespace(size="tiny", k=2, ckpt_layer=1), {"ckpt"}).vit_ckpt_layer == 1
    assert breakdown.config(argparse.Namespace(size="tiny", **options), {"itc"}).distill.loss == "none"

    alive = []
    real_build = breakdown.build

    def build_alone(args, parts, cache=None):
        assert all(ref() is None for ref in alive), "a model of an earlier variant is still held"
        model = real_build(args, parts, cache)
        alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(breakdown, "build", build_alone)
    result = breakdown.main(["--batch-size", "8", "--k", "2", "--variants", "fused+itc,fused+cached,fused+ckpt",
                             "--steps", "1", "--warmup", "1", "--breakdown", "fused+cached"])
    assert len(alive) == 4  # the cache's teacher-scoring model, then one per variant
    assert set(result["median_s"]) == set(result["step_peak_bytes"]) == {"fused+itc", "fused+cached", "fused+ckpt"}
    # Every pair of the batch was cached: the cached step never built (nor ran) its teacher.
    assert "teacher scoring" not in result["breakdown_s"] and result["breakdown_s"]["student encoders (forward)"] > 0


def test_gpu_kit_spacy_standin_and_summary(tmp_path):
    """The GPU kit's pieces that run without a GPU: the spaCy stand-in wheel imports and refuses
    any use; the summary marks a run passed only when every step passed."""
    import zipfile

    standin = importlib.import_module("bench.gpu.spacy_standin")
    wheel = standin.build(str(tmp_path))
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    probe = "import spacy\ntry:\n    spacy.load\nexcept AttributeError as e:\n    print('refused:', e)\n"
    out = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")),
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("refused: spacy.load: this is lavis-cprd's GPU-kit stand-in")

    report = importlib.import_module("bench.gpu.kit_report")
    steps, jsons = tmp_path / "steps.jsonl", tmp_path / "json"
    jsons.mkdir()
    (jsons / "smoke.json").write_text(json.dumps({"passed": True}))
    steps.write_text("\n".join(json.dumps(s) for s in [
        {"step": "install", "status": "passed", "rc": 0, "seconds": 1.0, "timeout_s": None},
        {"step": "smoke", "status": "passed", "rc": 0, "seconds": 2.0, "timeout_s": 10},
        {"step": "retrieval", "status": "timed_out", "rc": 124, "seconds": 3.0, "timeout_s": 3}]) + "\n")
    out = tmp_path / "summary.json"
    assert report.main(["summary", "--steps", str(steps), "--json-dir", str(jsons), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["passed"] == {"install": True, "smoke": True, "retrieval": False} and not summary["all_passed"]
    assert summary["steps"][1]["result"] == {"passed": True} and summary["total_s"] == 6.0
