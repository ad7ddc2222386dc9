"""Train with a LAVIS config: ``python -m lavis_cprd.train --cfg-path X.yaml [--options k=v ...]``.

Mirrors LAVIS's ``train.py``, with lavis-cprd's registrations imported first.
"""
from __future__ import annotations

from typing import List, Optional

from lavis_cprd.launch import build_runner


def main(argv: Optional[List[str]] = None) -> None:
    runner = build_runner(argv, "Train a lavis-cprd experiment.")
    runner.train()


if __name__ == "__main__":
    main()
