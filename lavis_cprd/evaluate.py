"""Evaluate with a LAVIS config: ``python -m lavis_cprd.evaluate --cfg-path X.yaml --ckpt C.pth``.

Mirrors LAVIS's ``evaluate.py`` (but honours ``run.runner``). ``--ckpt`` loads a checkpoint
written by training (the same as ``--options model.load_finetuned=True model.finetuned=C``).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional

from lavis.common.dist_utils import is_main_process

from lavis_cprd.launch import build_runner


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--ckpt", default=None)
    known, rest = parser.parse_known_args(argv)
    if known.ckpt is not None:
        if not os.path.isfile(known.ckpt):
            raise FileNotFoundError(f"--ckpt {known.ckpt!r} does not exist")
        rest = _append_options(rest, [f"model.load_finetuned=True", f"model.finetuned={os.path.abspath(known.ckpt)}"])
    runner = build_runner(rest, "Evaluate a lavis-cprd model.", evaluate_only=True)
    results = runner.evaluate(skip_reload=True) or {}
    if is_main_process():
        with open(os.path.join(runner.output_dir, "metrics.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(results, indent=2))
    return results


def _append_options(argv: List[str], options: List[str]) -> List[str]:
    argv = list(argv)
    if "--options" in argv:
        i = argv.index("--options") + 1
        while i < len(argv) and not argv[i].startswith("--"):
            i += 1
        return argv[:i] + options + argv[i:]
    return argv + ["--options"] + options


if __name__ == "__main__":
    main()
