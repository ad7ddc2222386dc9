"""Reporting helpers: metric tables over seeds, the teacher's scores of every pair, the
paper's finding-1 score distributions and Kendall's tau between teacher and student orders."""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

METRICS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


# Relevance-aware metrics (``relevance.relevance_metrics``) summarised when present.
REL_METRICS = ("rel_map_at_r", "i2t_map_at_r", "t2i_map_at_r", "i2t_r_precision", "t2i_r_precision", "rank_tau")


def summarize(name: str, runs: List[Dict[str, float]]) -> Dict:
    """Mean and (sample) standard deviation of each metric over runs (seeds)."""
    row: Dict = {"name": name, "n": len(runs)}
    present = [m for m in REL_METRICS if all(m in r for r in runs)]
    if all("best_epoch" in r for r in runs):
        row["best_epochs"] = [r["best_epoch"] for r in runs]
    for m in (*METRICS, *present):
        values = np.array([r[m] for r in runs], dtype=float)
        row[m] = float(values.mean())
        row[m + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return row


def markdown_table(rows: List[Dict]) -> str:
    head = "| model | seeds | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for row in rows:
        cells = [
            f"{row[m]:.1f} ± {row[m + '_std']:.1f}" if row["n"] > 1 else f"{row[m]:.1f}" for m in METRICS
        ]
        lines.append(f"| {row['name']} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def relevance_table(rows: List[Dict]) -> str:
    """LAVIS r_mean next to mAP@R (both directions' mean, then each), R-Precision and the
    ranking correlation, mean ± std over seeds."""
    cols = ("r_mean", *REL_METRICS)
    lines = ["| model | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for row in rows:
        fmt = lambda m: f"{row[m]:.3f} ± {row[m + '_std']:.3f}" if m == "rank_tau" else f"{row[m]:.1f} ± {row[m + '_std']:.1f}"  # noqa: E731
        lines.append(f"| {row['name']} | {row['n']} | " + " | ".join(fmt(m) if m in row else "—" for m in cols) + " |")
    return "\n".join(lines)


def best_epoch(checkpoint: str):
    """The epoch a LAVIS runner checkpoint was saved at (for ``checkpoint_best.pth``: the
    epoch that won on val), or None when it records none."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    epoch = state.get("epoch")
    return int(epoch) if isinstance(epoch, int) else None


def checkpoint_label(path: str) -> str:
    """A checkpoint named by its run folder and file (``teacher/checkpoint_best.pth``), for titles."""
    return os.path.join(*os.path.normpath(path).split(os.sep)[-2:])


def val_at_best(run_dir: str) -> Optional[Dict[str, float]]:
    """The val metrics a run logged (``metrics.json``) at the epoch its ``checkpoint_best.pth``
    won: what choices are made on. None when the run logged none."""
    logs = sorted(glob.glob(os.path.join(run_dir, "jobs", "*", "metrics.json")), key=os.path.getmtime)
    epoch = best_epoch(os.path.join(run_dir, "checkpoint_best.pth"))
    if not logs or epoch is None:
        return None
    with open(logs[-1]) as f:
        return json.load(f).get(f"val/{epoch}")


def teacher_all_pairs(teacher, images: torch.Tensor, texts: Sequence[str], chunk: int = 8192) -> np.ndarray:
    """The teacher's match probability for every (image, caption) pair, ``[n_img, n_txt]``:
    its full ranking, which a top-k re-rank hides (a relevance metric needs every true match)."""
    n_img, n_txt = len(images), len(texts)
    grid = torch.stack(torch.meshgrid(torch.arange(n_img), torch.arange(n_txt), indexing="ij"), -1).view(-1, 2)
    scores = torch.cat([teacher.score(images, list(texts), grid[s : s + chunk]).cpu() for s in range(0, len(grid), chunk)])
    return scores.view(n_img, n_txt).numpy()


class ScoreTable:
    """A teacher's scores of every pair of a split (``teacher_all_pairs``) standing in for the
    teacher: ``score`` looks the pairs up instead of running it again."""

    def __init__(self, scores: np.ndarray):
        self.scores = torch.from_numpy(np.asarray(scores))

    def score(self, images, captions, pairs: torch.Tensor) -> torch.Tensor:
        pairs = torch.as_tensor(pairs).long()
        return self.scores[pairs[:, 0], pairs[:, 1]]


def _negatives(student_i2t: np.ndarray, img2txt: Dict[int, List[int]], k: int, seed: int = 0,
               true: Optional[np.ndarray] = None):
    """Per image query: its ``k`` hardest non-positive texts by the student, and ``k`` easy
    ones drawn at random from the rest. With ``true`` (``[n_img, n_txt]`` true matches),
    true matches are not negatives: they are left out of both."""
    rng = np.random.default_rng(seed)
    hard, easy = [], []
    for i, row in enumerate(student_i2t):
        positives = set(img2txt[i]) if true is None else set(np.flatnonzero(true[i])) | set(img2txt[i])
        ranked = [t for t in np.argsort(-row, kind="stable") if t not in positives]
        hard.append(ranked[:k])
        easy.append(rng.choice(ranked[k:], size=k, replace=False))
    return np.array(hard), np.array(easy)


def score_distributions(teacher, images, dataset, student_i2t: np.ndarray, k_hard: int = 8,
                        true: Optional[np.ndarray] = None) -> Dict[str, Dict]:
    """Teacher match probabilities and student similarities of positives, hard negatives
    (the student's top-``k_hard`` non-positives) and easy (random) negatives, image queries.
    With ``true`` (every true match, e.g. of partial captions) also the *true-match
    negatives*: true matches LAVIS does not annotate, which ITC pushes away as negatives."""
    hard, easy = _negatives(student_i2t, dataset.img2txt, k_hard, true=true)
    groups = {"positive": np.array([(i, t) for i, ts in dataset.img2txt.items() for t in ts])}
    if true is not None:
        unannotated = np.asarray(true, dtype=bool).copy()
        for i, ts in dataset.img2txt.items():
            unannotated[i, ts] = False
        if unannotated.any():
            groups["true-match negative"] = np.argwhere(unannotated)
    groups["hard negative"] = np.array([(i, t) for i, ts in enumerate(hard) for t in ts])
    groups["easy negative"] = np.array([(i, t) for i, ts in enumerate(easy) for t in ts])
    out = {}
    for name, pairs in groups.items():
        t = teacher.score(images, list(dataset.text), torch.from_numpy(pairs)).cpu().numpy()
        s = student_i2t[pairs[:, 0], pairs[:, 1]]
        out[name] = {
            "teacher": t,
            "student": s,
            "summary": {
                "pairs": int(len(pairs)),
                "teacher_mean": float(t.mean()),
                "teacher_median": float(np.median(t)),
                "student_mean": float(s.mean()),
                "student_median": float(np.median(s)),
            },
        }
    return out


def log_odds(p: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """``log(p / (1 - p))``, clipped to ``[eps, 1 - eps]``: spreads the match probabilities
    that pile up near 0 and 1."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return np.log(p / (1 - p))


def plot_score_distributions(dists: Dict[str, Dict], path: str, teacher_name: str = "teacher",
                             student_name: str = "student", split: str = "test") -> None:
    """Two panels, teacher and student, one histogram per pair group on shared bins. The
    teacher's probabilities are binned in log-odds, so negatives near 0 separate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = (
        (axes[0], "teacher", log_odds, f"{teacher_name}: ITM match log-odds, log(p / (1 - p))"),
        (axes[1], "student", np.asarray, f"{student_name}: cosine similarity"),
    )
    for ax, who, transform, xlabel in panels:
        values = {name: transform(d[who]) for name, d in dists.items()}
        lo, hi = min(v.min() for v in values.values()), max(v.max() for v in values.values())
        bins = np.linspace(lo, hi, 50)
        for name, v in values.items():
            ax.hist(v, bins=bins, alpha=0.5, density=True, label=f"{name} (n={len(v)})", histtype="stepfilled")
            ax.axvline(np.median(v), color=ax.patches[-1].get_facecolor(), alpha=1.0, lw=1, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
    axes[0].legend(fontsize=8, title="pairs (dashed: median)", title_fontsize=8)
    fig.suptitle(f"Score distributions, {split} split, image queries: {teacher_name} vs {student_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metrics_per_method(runs: Dict[str, List[Dict[str, float]]], labels: Dict[str, str], metrics: Sequence[str],
                            path: str, baseline: Optional[str] = None, title: str = "") -> None:
    """One panel per metric: a bar at each method's mean over seeds, a dot per seed, a dashed
    line at the baseline's mean, and the axis from 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if all(m in r for rs in runs.values() for r in rs)]
    names = list(runs)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.0, 0.55 * len(names)) * len(metrics), 4.2), squeeze=False)
    x = np.arange(len(names))
    for ax, m in zip(axes[0], metrics):
        values = [np.array([r[m] for r in runs[n]], dtype=float) for n in names]
        ax.bar(x, [v.mean() for v in values], color="tab:blue", alpha=0.35, width=0.7)
        for i, v in enumerate(values):
            ax.scatter(np.full(len(v), i) + np.linspace(-0.15, 0.15, len(v)), v, color="tab:blue", s=14, zorder=3)
        if baseline in runs:
            ax.axhline(np.mean([r[m] for r in runs[baseline]]), color="black", ls="--", lw=1,
                       label=f"{labels.get(baseline, baseline)} (mean)")
            ax.legend(fontsize=7, loc="lower right")
        top = max(v.max() for v in values)
        ax.set_ylim(min(0.0, min(v.min() for v in values)), top * 1.08 if top > 0 else 1.0)
        ax.set_xticks(x, [labels.get(n, n) for n in names], rotation=35, ha="right", fontsize=8)
        ax.set_title(m)
    fig.suptitle(title or "mean over seeds (bars), each seed (dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def kendall_tau_on_hard_negatives(teacher, images, dataset, student_i2t: np.ndarray, k: int = 8) -> float:
    """Mean Kendall tau-b, over image queries, between the student's and the teacher's scores
    of the query's ``k`` hard negatives (the student's top-``k`` non-positive texts, the
    candidates CPRD ranks). 1 = the student orders its hard negatives as the teacher does."""
    from scipy.stats import kendalltau

    hard, _ = _negatives(student_i2t, dataset.img2txt, k)
    pairs = np.stack([np.repeat(np.arange(len(hard)), k), hard.reshape(-1)], 1)
    t = teacher.score(images, list(dataset.text), torch.from_numpy(pairs)).cpu().numpy().reshape(-1, k)
    s = student_i2t[pairs[:, 0], pairs[:, 1]].reshape(-1, k)
    taus = [kendalltau(a, b).statistic for a, b in zip(s, t)]
    return float(np.nanmean(taus))
