"""``lavis-cprd demo``: the embedded default end to end, offline: ``lavis-cprd compare`` with
the headline plan.

1. data: ``cprd_shapes`` with partial captions (a caption is true of several images, graded
   relevance recorded) is generated (once) by its LAVIS builder;
2. teacher: the cross-encoder shipped with the package (``PACKAGED_TEACHER``, fp16), or with
   ``--retrain-teacher`` one trained by the documented two-stage recipe: ITC pre-training of
   its towers on a larger set from the same generator, then LAVIS's BLIP retrieval objective
   with verified-false ITM negatives (``configs/teacher_*_tiny_shapes.yaml``);
3. students, for each seed: ITC alone, CPRD from the teacher and from the ``shapes_oracle``
   (the upper bound of what a teacher can give), and the peers kl, loopitr, margin_mse,
   listmle_full and conaclip, each with the knobs that won the fair contest on this data's
   val split (``paths.TUNED_SHAPES``: ``compare --tuned-from``; ``--tuned-from none`` runs
   the configured knobs instead, ``--tune N`` or ``--tuned-from FILE`` other winners);
4. evaluation on the test split: LAVIS's metrics, the relevance-aware ones, the ranking
   correlation; ``results.md``, ``results.json``, ``metrics.png``, ``score_distributions.png``.

Finished runs are reused when trained for the same resolved config, lavis_cprd version and
checkpoint contents (``apps.run_reuse``), so an interrupted demo picks up where it stopped and
a changed one retrains.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from lavis_cprd.apps import compare
from lavis_cprd.paths import TUNED_SHAPES

# The headline plan (see compare's flags): every method, the oracle for CPRD, no sweeps.
HEADLINE = ["--methods", "none", "cprd", "kl", "loopitr", "margin_mse", "listmle_full", "conaclip",
            "--oracle", "cprd", "--weights", "--ks", "--jobs", "2"]


def compare_argv(argv: List[str]) -> List[str]:
    """compare's arguments: the headline plan, then ``argv``. The packaged contest winners
    unless ``argv`` tunes or names other winners (``--tuned-from none``: the configured knobs);
    CPRD's oracle run only when CPRD is among the ``--methods`` given."""
    given = argparse.ArgumentParser(add_help=False)
    given.add_argument("--methods", nargs="+")
    given.add_argument("--oracle", nargs="*")
    given.add_argument("--tune", type=int, default=0)
    given.add_argument("--tuned-from")
    given = given.parse_known_args(argv)[0]
    headline = list(HEADLINE)
    if not (given.tune or given.tuned_from):
        headline += ["--tuned-from", TUNED_SHAPES]
    if given.methods is not None and given.oracle is None:
        at = headline.index("--oracle")
        kept = [m for m in headline[at + 1:at + 2] if m in given.methods]
        headline[at:at + 2] = ["--oracle", *kept] if kept else []
    return [*headline, *argv]


def main(argv: Optional[List[str]] = None) -> Dict:
    """``compare`` with the headline plan, the packaged contest winners and ``output/demo``;
    later flags override."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return compare.main(compare_argv(argv), prog="lavis-cprd demo", description=__doc__.split("\n\n")[0],
                        default_output="output/demo")


if __name__ == "__main__":
    main()
