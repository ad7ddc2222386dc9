"""Train with a LAVIS config: ``python -m lavis_cprd.apps.train --cfg-path X.yaml [--options k=v ...]``.

Mirrors LAVIS's ``train.py``, with lavis-cprd's registrations imported first.
"""
from __future__ import annotations

from typing import List, Optional

from lavis_cprd.training.launch import build_runner, make_parser, shutdown_distributed


def main(argv: Optional[List[str]] = None) -> None:
    args = make_parser("Train a lavis-cprd experiment.", resume=True).parse_args(argv)
    completed = False
    try:
        build_runner(args).train()
        completed = True
    finally:
        shutdown_distributed(completed)


if __name__ == "__main__":
    main()
