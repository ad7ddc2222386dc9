"""The contest's tables (docs/contest/README.md) from compare's results.json files.

    python run_scripts/contest_tables.py RESULTS.json [RESULTS.json ...]

Per file: test split, mean ± std over seeds, of rel mAP@R, R-Precision (the mean of the two
directions), LAVIS r_mean and rank tau, with each run's winning epochs; then, for each method,
whether it beats, ties or trails CPRD: "beats"/"trails" when the two means differ by more than
the larger of the two seed spreads, "ties" otherwise.
"""
import json
import sys

import numpy as np

COLUMNS = (("rel mAP@R", "rel_map_at_r"), ("R-Precision", None), ("LAVIS r_mean", "r_mean"), ("rank tau", "rank_tau"))


def values(runs, key):
    if key is None:
        return [0.5 * (r["i2t_r_precision"] + r["t2i_r_precision"]) for r in runs]
    return [float(r[key]) for r in runs if key in r]


def cell(vals, digits=1):
    if not vals:  # rank tau needs graded relevance, which only cprd_shapes records
        return "—"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals):.{digits}f}" if len(vals) > 1 else f"{vals[0]:.{digits}f}"


def table(results):
    lines = ["| model | " + " | ".join(c for c, _ in COLUMNS) + " | best epochs |", "|---" * (len(COLUMNS) + 2) + "|"]
    if results.get("teacher"):
        t = results["teacher"]
        rp = 0.5 * (t["i2t_r_precision"] + t["t2i_r_precision"])
        lines.append(f"| teacher: its ITM on every pair | {t['rel_map_at_r']:.1f} | {rp:.1f} | {t['r_mean']:.1f} | "
                     f"{cell([t['rank_tau']], 3) if 'rank_tau' in t else '—'} | — |")
    for name, runs in results["runs"].items():
        cells = [cell(values(runs, k), 3 if k == "rank_tau" else 1) for _, k in COLUMNS]
        epochs = ", ".join(str(r.get("best_epoch")) for r in runs)
        lines.append(f"| {results['labels'][name]} | " + " | ".join(cells) + f" | {epochs} |")
    return "\n".join(lines)


def verdicts(results, metric="rel_map_at_r"):
    by_label = {results["labels"][n]: values(r, metric) for n, r in results["runs"].items()}
    cprd = by_label.get("cprd")
    if cprd is None:
        return ""
    out = []
    for label, vals in by_label.items():
        if label == "cprd":
            continue
        gap, spread = np.mean(cprd) - np.mean(vals), max(np.std(cprd), np.std(vals))
        word = "beats" if gap > spread else "trails" if -gap > spread else "ties"
        out.append(f"- CPRD {word} {label}: {np.mean(cprd):.1f} vs {np.mean(vals):.1f} (gap {gap:+.1f}, larger spread {spread:.1f})")
    return "\n".join(out)


def main(paths):
    for path in paths:
        results = json.load(open(path))
        print(f"### {path}\n\nTest split, seeds {results.get('seeds')}:\n\n{table(results)}\n\n{verdicts(results)}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
