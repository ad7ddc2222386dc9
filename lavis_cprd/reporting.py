"""Reporting helpers: metric tables over seeds, teacher re-ranking, the paper's finding-1
score distributions, Kendall's tau between teacher and student orders, and within-family
(binding) accuracy on minimal-pair data."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

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


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def teacher_rerank(teacher, images: torch.Tensor, texts: Sequence[str], student_i2t: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Two-stage retrieval: the student's top-``k`` per query re-ordered by the teacher.

    Re-ranked candidates score ``2 + c(i, j)`` (above every dual-encoder score, which is a
    cosine <= 1); the rest keep the student's order below them.
    """
    n_img, n_txt = student_i2t.shape
    top_t = _topk(student_i2t, k)  # [n_img, k] texts per image
    top_i = _topk(student_i2t.T, k)  # [n_txt, k] images per text
    pairs = np.concatenate([
        np.stack([np.repeat(np.arange(n_img), k), top_t.reshape(-1)], 1),
        np.stack([top_i.reshape(-1), np.repeat(np.arange(n_txt), k)], 1),
    ])
    scores = teacher.score(images, list(texts), torch.from_numpy(pairs)).cpu().numpy()
    i2t, t2i = student_i2t.copy(), student_i2t.T.copy()
    i2t[np.repeat(np.arange(n_img), k), top_t.reshape(-1)] = 2 + scores[: n_img * k]
    t2i[np.repeat(np.arange(n_txt), k), top_i.reshape(-1)] = 2 + scores[n_img * k :]
    return i2t, t2i


def _negatives(student_i2t: np.ndarray, img2txt: Dict[int, List[int]], k: int, seed: int = 0):
    """Per image query: its ``k`` hardest non-positive texts by the student, and ``k`` easy
    ones drawn at random from the rest."""
    rng = np.random.default_rng(seed)
    hard, easy = [], []
    for i, row in enumerate(student_i2t):
        positives = set(img2txt[i])
        ranked = [t for t in np.argsort(-row, kind="stable") if t not in positives]
        hard.append(ranked[:k])
        easy.append(rng.choice(ranked[k:], size=k, replace=False))
    return np.array(hard), np.array(easy)


def score_distributions(teacher, images, dataset, student_i2t: np.ndarray, k_hard: int = 8) -> Dict[str, Dict]:
    """Teacher match probabilities and student similarities of positives, hard negatives
    (the student's top-``k_hard`` non-positives) and easy (random) negatives, image queries."""
    hard, easy = _negatives(student_i2t, dataset.img2txt, k_hard)
    groups = {
        "positive": np.array([(i, t) for i, ts in dataset.img2txt.items() for t in ts]),
        "hard negative": np.array([(i, t) for i, ts in enumerate(hard) for t in ts]),
        "easy negative": np.array([(i, t) for i, ts in enumerate(easy) for t in ts]),
    }
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


def plot_score_distributions(dists: Dict[str, Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, who, xlabel in ((axes[0], "teacher", "teacher ITM match probability"), (axes[1], "student", "student cosine similarity")):
        lo = min(d[who].min() for d in dists.values())
        hi = max(d[who].max() for d in dists.values())
        bins = np.linspace(lo, hi, 40)
        for name, d in dists.items():
            ax.hist(d[who], bins=bins, alpha=0.55, density=True, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.set_title(who)
    axes[0].legend()
    fig.suptitle("Score distributions on the test split (image queries)")
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


def family_pairs(families: Sequence, txt2img: Dict[int, int]) -> np.ndarray:
    """``(image, text)`` pairs ``[P, 2]``: every text with every image of its own image's
    minimal-pair family (``families[i]`` is image ``i``'s family id), its own image included."""
    by_family: Dict = {}
    for i, f in enumerate(families):
        by_family.setdefault(f, []).append(i)
    return np.array([(i, t) for t in sorted(txt2img) for i in by_family[families[txt2img[t]]]], dtype=np.int64)


def within_family_accuracy(pair_scores: np.ndarray, pairs: np.ndarray, txt2img: Dict[int, int]) -> float:
    """Fraction of texts whose own image scores highest among their family's images (ties
    count as misses). Family members share their words and differ in which attribute binds to
    which object, so this measures binding; chance is the mean of 1 / family size."""
    best: Dict[int, Tuple[float, List[int]]] = {}
    for (i, t), s in zip(pairs.tolist(), np.asarray(pair_scores, dtype=float).tolist()):
        top, arg = best.get(t, (-np.inf, []))
        if s > top:
            best[t] = (s, [i])
        elif s == top:
            arg.append(i)
    return float(np.mean([arg == [txt2img[t]] for t, (_, arg) in best.items()]))


def family_chance(pairs: np.ndarray) -> float:
    """Expected within-family accuracy of a random scorer: mean over texts of 1 / family size."""
    sizes = np.bincount(pairs[:, 1])
    return float(np.mean(1.0 / sizes[sizes > 0]))
