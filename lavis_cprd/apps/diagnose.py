"""``lavis-cprd diagnose``: is this cross-encoder a good teacher for this student?

Before spending GPU days, on ``--batches`` training batches of the experiment config it
reports, for the student (``--ckpt``, or a fresh one with ``--random-init``) and the
configured teacher (``--teacher-ckpt`` overrides ``model.distill.teacher.checkpoint``):

- how often the teacher ranks the positive above all K mined hard negatives;
- valid hard negatives per query at ``distill.valid_threshold``;
- teacher and student scores of positives, mined hard and random easy negatives (CPRD's
  finding 1), as means and a figure;
- Kendall tau between the teacher's and the student's order of the mined negatives, and on
  ``cprd_shapes`` between the teacher's and the ground truth's (the ``shapes_oracle``);
- the distillation gradient's norm against ITC's, and their cosine, at the configured
  distillation temperature.

Writes ``diagnose.md``, ``diagnose.json`` and ``diagnose.png`` into ``--output``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from argparse import Namespace
from typing import Dict, List, Optional

import numpy as np
import torch

from lavis_cprd.errors import existing_file

log = logging.getLogger("lavis_cprd.apps.diagnose")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lavis-cprd diagnose", description=__doc__.split("\n\n")[0])
    p.add_argument("--cfg-path", required=True, help="experiment config (student, teacher, dataset)")
    p.add_argument("--ckpt", default=None, type=existing_file("--ckpt"),
                   help="student checkpoint (a LAVIS runner checkpoint_*.pth)")
    p.add_argument("--random-init", action="store_true", help="diagnose a freshly initialised student (no --ckpt)")
    p.add_argument("--teacher-ckpt", default=None, type=existing_file("--teacher-ckpt"),
                   help="teacher checkpoint (overrides model.distill.teacher.checkpoint)")
    p.add_argument("--batches", type=int, default=8, help="training batches to look at (default 8)")
    p.add_argument("--output", default="output/diagnose", help="output folder (default output/diagnose)")
    p.add_argument("--seed", type=int, default=0, help="batch sampling seed")
    p.add_argument("--options", nargs="+", default=[], help="config overrides (key=value)")
    args = p.parse_args(argv)
    if args.ckpt is None and not args.random_init:
        p.error("give --ckpt PATH (a trained student), or --random-init to diagnose a fresh one")
    if args.batches < 1:
        p.error("--batches must be >= 1")
    return args


def _kendall(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import kendalltau

    taus = [kendalltau(x, y).statistic for x, y in zip(a, b)]
    return float(np.nanmean(taus)) if np.isfinite(taus).any() else float("nan")


def collect(model, teacher, oracle, batches, k: int, threshold: float, seed: int = 0) -> Dict[str, np.ndarray]:
    """Per query (both directions) of every batch: teacher and student scores of the positive,
    the K mined hard negatives and K random easy negatives (and the oracle's of the hard ones)."""
    from lavis_cprd.distill.mining import first_occurrence_mask, mine_hard_negatives

    rng = torch.Generator().manual_seed(seed)
    out: Dict[str, list] = {key: [] for key in ("t_pos", "t_hard", "t_easy", "s_pos", "s_hard", "s_easy", "o_hard")}
    for samples in batches:
        image, captions, ids = samples["image"], list(samples["text_input"]), samples["image_id"].view(-1)
        with torch.no_grad():
            v = model.encode_image(image)
            t = model.encode_captions(captions, image.device)
        sim = (v @ t.t()).float()
        unique = first_occurrence_mask(ids)
        iq = torch.nonzero(unique).view(-1)
        directions = (
            # (queries, [Q, B] student scores, query ids, candidate mask, pair(query, candidate))
            (iq, sim[iq], torch.ones_like(unique), lambda q, c: (q, c)),
            (torch.arange(len(ids)), sim.t(), unique, lambda q, c: (c, q)),
        )
        for queries, s, cand_ok, pair in directions:
            qids = ids[queries]
            hard = mine_hard_negatives(s, qids, ids, k, cand_mask=cand_ok)
            negative = (qids.view(-1, 1) != ids.view(1, -1)) & cand_ok.view(1, -1)
            easy = torch.stack([torch.nonzero(row).view(-1)[torch.randperm(int(row.sum()), generator=rng)[:k]]
                                for row in negative])
            own = queries.view(-1, 1)  # each query's own batch row is its positive
            for name, cands in (("pos", own), ("hard", hard), ("easy", easy)):
                q = queries.view(-1, 1).expand_as(cands)
                pairs = torch.stack([torch.tensor(pair(a, b)) for a, b in zip(q.reshape(-1).tolist(), cands.reshape(-1).tolist())])
                out[f"t_{name}"].append(teacher.score(image, captions, pairs, image_ids=ids).view(cands.shape).cpu().numpy())
                out[f"s_{name}"].append(s.gather(1, cands).cpu().numpy())
                if name == "hard" and oracle is not None:
                    out["o_hard"].append(oracle.score(image, captions, pairs, image_ids=ids).view(cands.shape).cpu().numpy())
    return {key: np.concatenate(v) for key, v in out.items() if v}


def gradient_balance(model, samples) -> Dict[str, float]:
    """Norms of the ITC and distillation gradients over the student's trainable parameters,
    their ratio and cosine (one batch, distillation on, eval mode: no dropout noise)."""
    model.set_epoch(max(model.distill.start_epoch, model.epoch))
    out = model(samples)
    params = [p for p in model.parameters() if p.requires_grad]
    flat = {}
    for term in ("loss_itc", "loss_distill"):
        grads = torch.autograd.grad(out[term], params, retain_graph=True, allow_unused=True)
        flat[term] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    itc, dis = flat["loss_itc"], flat["loss_distill"]
    return {
        "itc_grad_norm": float(itc.norm()),
        "distill_grad_norm": float(dis.norm()),
        "norm_ratio": float(dis.norm() / itc.norm().clamp(min=1e-12)),
        "cosine": float(torch.nn.functional.cosine_similarity(itc, dis, dim=0)),
        "loss_itc": float(out["loss_itc"]),
        "loss_distill": float(out["loss_distill"]),
    }


def summarize(raw: Dict[str, np.ndarray], threshold: float) -> Dict[str, float]:
    res = {
        "queries": int(len(raw["t_pos"])),
        "positive_first_rate": float(np.mean(raw["t_pos"][:, 0] > raw["t_hard"].max(axis=1))),
        "valid_negatives_per_query": float(np.mean((raw["t_hard"] >= threshold).sum(axis=1))),
        "tau_teacher_student": _kendall(raw["t_hard"], raw["s_hard"]),
    }
    if "o_hard" in raw:
        res["tau_teacher_oracle"] = _kendall(raw["t_hard"], raw["o_hard"])
        res["tau_student_oracle"] = _kendall(raw["s_hard"], raw["o_hard"])
    for who in ("t", "s"):
        for group in ("pos", "hard", "easy"):
            res[f"{'teacher' if who == 't' else 'student'}_{group}_mean"] = float(raw[f"{who}_{group}"].mean())
    return res


def plot(raw: Dict[str, np.ndarray], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = {"pos": "positive", "hard": "mined hard negative", "easy": "random easy negative"}
    for ax, who, xlabel, lim in ((axes[0], "t", "teacher match probability", (0.0, 1.0)),
                                 (axes[1], "s", "student cosine similarity", (-1.0, 1.0))):
        values = np.concatenate([raw[f"{who}_{g}"].ravel() for g in labels])
        lo, hi = (lim if who == "t" else (float(values.min()), float(values.max())))
        bins = np.linspace(lo, hi + 1e-6, 41)
        for g, label in labels.items():
            ax.hist(raw[f"{who}_{g}"].ravel(), bins=bins, alpha=0.5, density=True, label=f"{label} (n={raw[f'{who}_{g}'].size})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: Dict) -> str:
    rows = [
        ("teacher ranks the positive above all K mined negatives", "positive_first_rate", "{:.3f}"),
        ("valid hard negatives per query (of K)", "valid_negatives_per_query", "{:.2f}"),
        ("Kendall tau, teacher vs student order of the mined negatives", "tau_teacher_student", "{:.3f}"),
        ("Kendall tau, teacher vs ground truth (oracle)", "tau_teacher_oracle", "{:.3f}"),
        ("Kendall tau, student vs ground truth (oracle)", "tau_student_oracle", "{:.3f}"),
        ("teacher p(match): positive / hard / easy", ("teacher_pos_mean", "teacher_hard_mean", "teacher_easy_mean"), "{:.3f}"),
        ("student cosine: positive / hard / easy", ("student_pos_mean", "student_hard_mean", "student_easy_mean"), "{:.3f}"),
        ("distillation / ITC gradient norm", "norm_ratio", "{:.2f}"),
        ("cosine(distillation gradient, ITC gradient)", "cosine", "{:.3f}"),
    ]
    lines = ["| question | value |", "|---|---|"]
    for label, key, fmt in rows:
        keys = key if isinstance(key, tuple) else (key,)
        if all(k in res for k in keys):
            lines.append(f"| {label} | {' / '.join(fmt.format(res[k]) for k in keys)} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lavis.tasks as tasks
    from torch.utils.data import DataLoader

    from lavis_cprd.training.launch import load_config
    from lavis_cprd.teachers import ShapesOracleTeacher

    options = list(args.options)
    if args.teacher_ckpt:
        options.append(f"model.distill.teacher.checkpoint={os.path.abspath(args.teacher_ckpt)}")
    if args.ckpt:
        options += [f"model.finetuned={os.path.abspath(args.ckpt)}", "model.load_finetuned=True"]
    cfg = load_config(Namespace(cfg_path=args.cfg_path, options=options))
    torch.manual_seed(args.seed)
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg).eval()
    distill = model.distill
    if distill.teacher_kind != "cross":
        raise SystemExit(f"lavis-cprd diagnose: model.distill.loss={distill.loss!r} has no cross-encoder teacher to diagnose")
    (name,) = list(datasets)
    train = datasets[name]["train"]
    loader = DataLoader(train, batch_size=int(cfg.run_cfg.batch_size_train), shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed), collate_fn=getattr(train, "collater", None))
    batches = []
    for samples in loader:
        batches.append(samples)
        if len(batches) == args.batches:
            break
    oracle = None
    if train.annotation and "scene" in train.annotation[0]:
        oracle = ShapesOracleTeacher.for_annotation(train.annotation)
    log.info("diagnosing %d batches, teacher %s", len(batches), distill.teacher.get("arch"))
    raw = collect(model, model.teacher, oracle, batches, distill.num_hard_negatives, distill.valid_threshold, args.seed)
    res = summarize(raw, distill.valid_threshold)
    res.update(gradient_balance(model, batches[0]))
    res.update(teacher=dict(distill.teacher), student_checkpoint=args.ckpt, temperature=distill.temperature,
               num_hard_negatives=distill.num_hard_negatives, valid_threshold=distill.valid_threshold, batches=len(batches))
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "diagnose.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    np.savez(os.path.join(out, "diagnose_scores.npz"), **raw)
    table = markdown(res)
    with open(os.path.join(out, "diagnose.md"), "w") as f:
        f.write(table + "\n")
    teacher_name = f"{distill.teacher.get('arch')} {os.path.basename(str(distill.teacher.get('checkpoint') or ''))}".strip()
    plot(raw, f"teacher {teacher_name} vs student {os.path.basename(args.ckpt or 'random init')} "
              f"({len(batches)} training batches, K={distill.num_hard_negatives})", os.path.join(out, "diagnose.png"))
    print(table)
    print(f"Wrote {out}/diagnose.md, diagnose.json, diagnose.png")
    return res


if __name__ == "__main__":
    main()
