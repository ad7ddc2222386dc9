"""Package a contest's winners for the main job: ``lavis_cprd/configs/tuned/cprd_tiny_shapes.json``
(``paths.TUNED_SHAPES``) gets the ``tuning`` report and ``tune_seeds`` of a ``compare --tune``
``results.json``, and where they came from. ``lavis-cprd demo`` applies them (``--tuned-from``).

Usage: python run_scripts/package_tuned.py RESULTS_JSON SOURCE_NOTE
"""
import json
import sys

from lavis_cprd.checkpoints import atomic_json
from lavis_cprd.paths import TUNED_SHAPES


def main(results_path: str, source: str) -> None:
    with open(results_path) as f:
        results = json.load(f)
    if not results.get("tuning"):
        sys.exit(f"{results_path}: no tuning report (made by compare --tune?)")
    winners = {m: r["trials"][r["winner"]]["label"] for m, r in results["tuning"].items()}
    atomic_json({"source": source, "winners": winners, "tune_seeds": results["tune_seeds"],
                 "tuning": results["tuning"]}, TUNED_SHAPES)
    print(f"wrote {TUNED_SHAPES}:\n" + "\n".join(f"  {w}" for w in winners.values()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
