"""Every distillation method at the weight chosen on val under issue 16's recall bound: the
weight with the best val rel mAP@R among those whose val LAVIS r_mean is at least ITC alone's
minus ``--slack`` (1), over ``lavis-cprd compare`` outputs that each ran every method at one
weight (``--student-options model.distill.weight=W``). Prints, per method, the chosen weight,
its val means and its test mean ± std over seeds, with each seed's test mAP@R.

    python run_scripts/constrained_weights.py 1=output/demo 0.5=output/w0.5 0.25=output/w0.25
"""
import argparse
import json
import os
import statistics

BASELINE = "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outputs", nargs="+", help="WEIGHT=FOLDER: a compare output whose runs used that weight")
    p.add_argument("--slack", type=float, default=1.0, help="r_mean below ITC alone's allowed on val (default 1)")
    args = p.parse_args()
    runs = {}  # (method, weight) -> (val row, test rows per seed)
    for item in args.outputs:
        weight, folder = item.split("=", 1)
        results = json.load(open(os.path.join(folder, "results.json")))
        labels = results["labels"]
        val = {row["name"]: row for row in results["val_table"]}
        for method, tests in results["runs"].items():
            if method == BASELINE or method in labels and labels[method] in val:
                runs[(method, float(weight))] = (val[labels[method]], tests)
    base_val, base_test = next(v for (m, _), v in runs.items() if m == BASELINE)
    bound = base_val["r_mean"] - args.slack
    rows = [("ITC only", "-", base_val, base_test)]
    for method in sorted({m for m, _ in runs} - {BASELINE, "cprd_oracle"}):
        allowed = [(w, v, t) for (m, w), (v, t) in runs.items() if m == method and v["r_mean"] >= bound]
        if not allowed:
            rows.append((method, "none within the bound", None, None))
            continue
        w, v, t = max(allowed, key=lambda x: x[1]["rel_map_at_r"])
        rows.append((method, f"{w:g}", v, t))
    print(f"val r_mean bound: {bound:.1f} (ITC alone {base_val['r_mean']:.1f} - {args.slack:g})\n")
    print("| method | weight | val rel mAP@R | val r_mean | test rel mAP@R | test r_mean | test mAP@R per seed |")
    print("|---|---|---|---|---|---|---|")
    for method, w, v, t in rows:
        if v is None:
            print(f"| {method} | {w} | | | | | |")
            continue
        test_map = [r["rel_map_at_r"] for r in t]
        test_r = [r["r_mean"] for r in t]
        print(f"| {method} | {w} | {v['rel_map_at_r']:.1f} | {v['r_mean']:.1f} | "
              f"{statistics.mean(test_map):.1f} ± {statistics.stdev(test_map):.1f} | "
              f"{statistics.mean(test_r):.1f} ± {statistics.stdev(test_r):.1f} | "
              f"{', '.join(f'{x:.1f}' for x in test_map)} |")


if __name__ == "__main__":
    main()
