"""Evaluate with a LAVIS config: ``python -m lavis_cprd.apps.evaluate --cfg-path X.yaml --ckpt C.pth``.

Mirrors LAVIS's ``evaluate.py`` (but honours ``run.runner``). ``--ckpt`` loads a checkpoint
written by training (the same as ``--options model.load_finetuned=True model.finetuned=C``).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from lavis.common.dist_utils import is_main_process

from lavis_cprd.training.launch import build_runner, make_parser, shutdown_distributed


def main(argv: Optional[List[str]] = None) -> dict:
    parser = make_parser("Evaluate a lavis-cprd model on the config's test splits.")
    parser.add_argument("--ckpt", default=None, help="checkpoint written by training (checkpoint_best.pth).")
    args = parser.parse_args(argv)
    if args.ckpt is not None:
        if not os.path.isfile(args.ckpt):
            raise FileNotFoundError(f"--ckpt {args.ckpt!r} does not exist")
        args.options += ["model.load_finetuned=True", f"model.finetuned={os.path.abspath(args.ckpt)}"]
    completed = False
    try:
        runner = build_runner(args, evaluate_only=True)
        results = runner.evaluate(skip_reload=True) or {}
        if is_main_process():
            with open(os.path.join(runner.output_dir, "metrics.json"), "w") as f:
                json.dump(results, f, indent=2)
            print(json.dumps(results, indent=2))
        completed = True
    finally:
        shutdown_distributed(completed)
    return results


if __name__ == "__main__":
    main()
