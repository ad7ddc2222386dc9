"""``lavis-cprd demo``: the embedded default end to end, offline.

1. data: ``cprd_shapes`` is generated (once) by its LAVIS builder;
2. teacher: ITC pre-training of its towers, then LAVIS's BLIP retrieval objective (ITC + ITM
   with hard negatives) trains a tiny cross-encoder from them (skipped when its checkpoint
   exists);
3. students: the same dual encoder, seed and schedule, trained with ITC only (baseline),
   with ITC + CPRD distilled from that teacher, and with ITC + CPRD from the
   ``shapes_oracle`` teacher (the upper bound of what a teacher can give), for each seed;
4. evaluation with LAVIS's ``_report_metrics`` on the test split, a Markdown table,
   ``results.json``, a figure of score distributions and Kendall's tau on hard negatives.

Each training run is a ``python -m lavis_cprd.train`` subprocess writing into the output
folder; a finished run (its ``checkpoint_best.pth`` exists) is reused, so an interrupted demo
picks up where it stopped.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from lavis_cprd.checkpoints import atomic_write
from lavis_cprd.launch import load_config
from lavis_cprd.reporting import (
    checkpoint_label,
    family_chance,
    family_pairs,
    kendall_tau_on_hard_negatives,
    markdown_table,
    plot_score_distributions,
    score_distributions,
    summarize,
    teacher_rerank,
    within_family_accuracy,
)

REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TEACHER_ITC_CFG = os.path.join(REPO_CONFIGS, "teacher_itc_tiny_shapes.yaml")
TEACHER_CFG = os.path.join(REPO_CONFIGS, "teacher_blip_tiny_shapes.yaml")
STUDENT_CFG = os.path.join(REPO_CONFIGS, "cprd_tiny_shapes.yaml")
METHODS = {
    "baseline": ["model.distill.loss=none"],
    "cprd": ["model.distill.loss=cprd"],
    # the upper bound of what a teacher can give: CPRD from the scene specs' graded relevance
    "cprd_oracle": ["model.distill.loss=cprd", "model.distill.teacher.arch=shapes_oracle"],
}
log = logging.getLogger("lavis_cprd.demo")


def common_parser(prog: str, description: str, default_output: str) -> argparse.ArgumentParser:
    """Arguments shared by ``demo`` and ``compare``: data, teacher, students, overrides."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--output", default=default_output, help=f"output folder (default: {default_output})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default: 0 1 2)")
    p.add_argument("--teacher-itc-cfg", default=TEACHER_ITC_CFG, help="teacher stage 1: ITC pre-training of its towers")
    p.add_argument("--teacher-cfg", default=TEACHER_CFG, help="teacher stage 2: BLIP ITC + ITM fine-tuning")
    p.add_argument("--student-cfg", default=STUDENT_CFG)
    p.add_argument("--teacher-ckpt", default=None, help="use this teacher checkpoint instead of training one")
    p.add_argument("--options", nargs="+", default=[], help="config overrides applied to every run (key=value)")
    p.add_argument("--teacher-options", nargs="+", default=[], help="overrides for the teacher run only")
    p.add_argument("--student-options", nargs="+", default=[], help="overrides for the student runs only")
    return p


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = common_parser("lavis-cprd demo", __doc__.split("\n\n")[0], "output/demo")
    p.add_argument("--rerank-k", type=int, default=16, help="student top-k the teacher re-ranks (default 16)")
    return p.parse_args(argv)


def train_run(cfg_path: str, options: Sequence[str], run_dir: str) -> str:
    """Train (unless already done) into ``run_dir``; return its ``checkpoint_best.pth``."""
    final = os.path.join(run_dir, "checkpoint_best.pth")
    if os.path.isfile(final):
        log.info("reusing %s", final)
        return final
    jobs = os.path.join(run_dir, "jobs")
    cmd = [sys.executable, "-m", "lavis_cprd.train", "--cfg-path", cfg_path, "--options", f"run.output_dir={jobs}", *options]
    log.info("running: %s", " ".join(cmd))
    t0 = time.time()
    subprocess.run(cmd, check=True)
    newest = max(glob.glob(os.path.join(jobs, "*", "checkpoint_best.pth")), key=os.path.getmtime)
    atomic_write(final, lambda tmp: shutil.copyfile(newest, tmp))  # a half-copied file never looks finished
    with open(os.path.join(run_dir, "train_seconds.json"), "w") as f:
        json.dump({"seconds": time.time() - t0}, f)
    return final


def eval_split(cfg_path: str, options: Sequence[str], split: str = "test"):
    """The split's LAVIS dataset, built by the experiment's own builder and processors."""
    from lavis.common.registry import registry

    cfg = load_config(Namespace(cfg_path=cfg_path, options=list(options)))
    (name,) = list(cfg.datasets_cfg)
    datasets = registry.get_builder_class(name)(cfg.datasets_cfg[name]).build_datasets()
    return datasets[split], cfg


def load_trained(checkpoint: str, device: torch.device):
    """A model rebuilt from a LAVIS runner checkpoint (its stored config + weights)."""
    from lavis.common.registry import registry

    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]["model"]
    mcfg = OmegaConf.create(stored)
    mcfg.load_finetuned, mcfg.finetuned, mcfg.pretrained = True, checkpoint, None
    mcfg.pop("text_pretrained", None)  # weights come from the checkpoint
    model = registry.get_model_class(mcfg.arch).from_config(mcfg)
    return model.to(device).eval()


def ensure_teacher(args: argparse.Namespace, out: str) -> str:
    """``--teacher-ckpt``, or the teacher trained into ``out`` in two stages (reused when
    done): stage 1 ITC-trains its towers, stage 2 fine-tunes them with BLIP's ITC + ITM."""
    if args.teacher_ckpt is not None:
        return args.teacher_ckpt
    teacher_options = [*args.options, *args.teacher_options]
    towers = train_run(args.teacher_itc_cfg, teacher_options, os.path.join(out, "teacher_itc"))
    return train_run(args.teacher_cfg, [*teacher_options, f"model.pretrained={towers}"], os.path.join(out, "teacher"))


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    timings: Dict[str, float] = {}

    # 1-2. data + teacher
    t0 = time.time()
    teacher_ckpt = ensure_teacher(args, out)
    timings["teacher"] = time.time() - t0

    # 3. students
    student_ckpts: Dict[str, Dict[int, str]] = {m: {} for m in METHODS}
    t0 = time.time()
    for seed in args.seeds:
        for method, method_options in METHODS.items():
            options = [*args.options, *args.student_options, *method_options, f"run.seed={seed}",
                       f"model.distill.teacher.checkpoint={os.path.abspath(teacher_ckpt)}"]
            student_ckpts[method][seed] = train_run(args.student_cfg, options, os.path.join(out, f"{method}_seed{seed}"))
    timings["students"] = time.time() - t0

    # 4. evaluation on the test split
    t0 = time.time()
    results = evaluate(args, out, teacher_ckpt, student_ckpts)
    timings["evaluation"] = time.time() - t0
    timings["total"] = time.time() - t_start
    results["seconds"] = timings

    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown_table(results["table"])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    print("\n" + table)
    print(f"\nKendall tau (teacher vs student order on hard negatives): {results['kendall_tau']}")
    if results["within_family_accuracy"]:
        binding = {k: round(float(np.mean(v)), 3) for k, v in results["within_family_accuracy"].items()}
        print(f"Within-family (binding) accuracy, mean over seeds: {binding}")
    print(f"Wrote {out}/results.md, results.json, score_distributions.png ({timings['total'] / 60:.1f} min)")
    return results


@torch.no_grad()
def evaluate(args, out: str, teacher_ckpt: str, student_ckpts: Dict[str, Dict[int, str]]) -> Dict:
    from lavis.common.registry import registry
    from lavis.tasks.retrieval import RetrievalTask
    from torch.utils.data import DataLoader

    from lavis_cprd.models.dual_encoder import dual_encoder_sim_matrix
    from lavis_cprd.runner import resolve_device
    from lavis_cprd.teachers import BlipITMTeacher

    device = resolve_device("auto")
    dataset, cfg = eval_split(args.student_cfg, [*args.options, *args.student_options])
    registry.mapping["paths"]["output_dir"] = out  # LAVIS's _report_metrics appends to evaluate.txt here
    loader = DataLoader(dataset, batch_size=64, shuffle=False)
    images = torch.cat([b["image"] for b in loader]).to(device)
    report = lambda i2t, t2i: RetrievalTask._report_metrics(i2t, t2i, dataset.txt2img, dataset.img2txt)  # noqa: E731

    runs: Dict[str, List[Dict]] = {}
    sims: Dict[str, np.ndarray] = {}
    for method, by_seed in student_ckpts.items():
        for seed, ckpt in by_seed.items():
            student = load_trained(ckpt, device)
            i2t, t2i = student.compute_sim_matrix(loader)
            runs.setdefault(method, []).append(report(i2t, t2i))
            sims[f"{method}_seed{seed}"] = i2t

    teacher_model = load_trained(teacher_ckpt, device)
    k_test = int(cfg.run_cfg.get("k_test", 16))
    own = teacher_model.compute_sim_matrix(loader, task_cfg=OmegaConf.create({"k_test": k_test}))
    teacher_itc = dual_encoder_sim_matrix(teacher_model, loader)
    # The adapter only needs BLIP's ITM parts, which the loaded BlipRetrieval already has.
    teacher = BlipITMTeacher(teacher_model)
    first_seed = min(student_ckpts["baseline"])
    baseline_i2t = sims[f"baseline_seed{first_seed}"]
    reranked = teacher_rerank(teacher, images, dataset.text, baseline_i2t, args.rerank_k)

    table = [
        summarize(f"teacher: ITM re-rank of its own ITC top-{k_test} (LAVIS two-stage)", [report(*own)]),
        summarize(f"teacher: ITM re-rank of the baseline student's top-{args.rerank_k}", [report(*reranked)]),
        summarize("teacher: its dual (ITC) part only", [report(*teacher_itc)]),
        summarize("student: ITC only (baseline)", runs["baseline"]),
        summarize("student: ITC + CPRD", runs["cprd"]),
        summarize("student: ITC + CPRD, oracle teacher (upper bound)", runs["cprd_oracle"]),
    ]
    k_hard = int(cfg.model_cfg.distill.num_hard_negatives)
    dists = score_distributions(teacher, images, dataset, sims[f"cprd_seed{first_seed}"], k_hard=max(k_hard, 8))
    plot_score_distributions(dists, os.path.join(out, "score_distributions.png"),
                             "teacher " + checkpoint_label(teacher_ckpt), f"student ITC + CPRD, seed {first_seed}")
    tau = {
        method: kendall_tau_on_hard_negatives(teacher, images, dataset, sims[f"{method}_seed{first_seed}"], k=max(k_hard, 8))
        for method in student_ckpts
    }
    binding = None
    if dataset.annotation and "family" in dataset.annotation[0]:  # minimal-pair data (cprd_shapes)
        pairs = family_pairs([a["family"] for a in dataset.annotation], dataset.txt2img)
        itm = teacher.score(images, list(dataset.text), torch.from_numpy(pairs)).cpu().numpy()
        accuracy = lambda i2t: within_family_accuracy(i2t[pairs[:, 0], pairs[:, 1]], pairs, dataset.txt2img)  # noqa: E731
        binding = {
            "chance": family_chance(pairs),
            "teacher_itm": within_family_accuracy(itm, pairs, dataset.txt2img),
            "teacher_itc": accuracy(teacher_itc[0]),
            **{m: [accuracy(sims[f"{m}_seed{seed}"]) for seed in sorted(by_seed)] for m, by_seed in student_ckpts.items()},
        }
    return {
        "table": table,
        "within_family_accuracy": binding,
        "runs": runs,
        "seeds": sorted(student_ckpts["baseline"]),
        "kendall_tau": tau,
        "score_distributions": {k: v["summary"] for k, v in dists.items()},
        "teacher_checkpoint": teacher_ckpt,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    main()
