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
    parser.add_argument("--random-init", action="store_true", help="evaluate randomly initialised weights (plumbing only)")
    args = parser.parse_args(argv)
    if args.ckpt is None and not args.random_init and not _config_names_weights(args):
        parser.error("the model would be randomly initialised: give --ckpt PATH (a trained checkpoint), set "
                     "model.pretrained or model.finetuned (with model.load_finetuned) in the config, or pass --random-init")
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


def _config_names_weights(args) -> bool:
    """Whether the config itself loads weights (``checkpoints.configured_weights``), or a CLIP
    student's ``model.clip.pretrained``."""
    from lavis_cprd.checkpoints import configured_weights
    from lavis_cprd.training.launch import load_config

    model = load_config(args).model_cfg
    clip = model.get("clip", None)
    return configured_weights(model) is not None or bool(clip is not None and clip.get("pretrained", "openai"))


if __name__ == "__main__":
    main()
