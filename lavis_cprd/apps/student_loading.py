"""A trained student loaded for serving (``lavis-cprd index`` and ``search``): the experiment
YAML's model with a checkpoint's weights, in eval mode, with its eval image processor, and the
content hashes that tell whether two loads make the same embeddings.

Rebuilding a model from a LAVIS runner checkpoint's own stored config (no YAML) is
``checkpoints.model_from_checkpoint``; this module reads the experiment config through
``training.launch.load_config``, so it sits above ``training``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from typing import Dict, Optional, Sequence

import lavis.tasks as tasks
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_cprd.checkpoints import load_state
from lavis_cprd.hashing import file_sha256
from lavis_cprd.training.launch import load_config


def model_fingerprint(cfg, ckpt: Optional[str]) -> Dict[str, str]:
    """Content hashes of what makes the embeddings: the checkpoint file's bytes (or the seeded
    random init) and the resolved model and eval-processor config."""
    ckpt_sha256 = file_sha256(ckpt) if ckpt else hashlib.sha256(b"random-init, seed 0").hexdigest()
    config = {"model": OmegaConf.to_container(cfg.model_cfg, resolve=True), "vis_processor": _eval_processor(cfg)}
    config["model"].pop("finetuned", None)  # where the checkpoint lies, not what it holds
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return {"ckpt_sha256": ckpt_sha256, "config_sha256": hashlib.sha256(blob).hexdigest()}


def _eval_processor(cfg) -> Optional[dict]:
    for dcfg in cfg.datasets_cfg.values():
        vis = dcfg.get("vis_processor", {}).get("eval")
        if vis is not None:
            return OmegaConf.to_container(vis, resolve=True)
    vis = cfg.model_cfg.get("preprocess", {}).get("vis_processor", {}).get("eval")
    if vis is None:
        vis = cfg.config.get("preprocess", {}).get("vis_processor", {}).get("eval")
    return None if vis is None else OmegaConf.to_container(vis, resolve=True)


def load_student(cfg_path: str, ckpt: Optional[str], options: Sequence[str] = (), with_fingerprint: bool = False):
    """The config's student with ``ckpt`` loaded (its keys must fit: ``checkpoints.load_state``),
    in eval mode, and its eval image processor; with ``with_fingerprint``, also
    :func:`model_fingerprint`."""
    cfg = load_config(argparse.Namespace(cfg_path=cfg_path, options=list(options)))
    cfg.run_cfg.evaluate = True  # serving never distils: the teacher is built only for --rerank
    if ckpt and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt!r} does not exist")
    if not ckpt:  # --random-init: the same random weights in index and every search
        torch.manual_seed(0)
    model = tasks.setup_task(cfg).build_model(cfg)
    if ckpt:
        load_state(model, ckpt, "--ckpt")
    model.eval()
    vis = _eval_processor(cfg)
    if vis is None:
        raise ValueError(f"{cfg_path}: no eval vis_processor in its datasets or model preprocess")
    processor = registry.get_processor_class(vis["name"]).from_config(OmegaConf.create(vis))
    if with_fingerprint:
        return model, processor, model_fingerprint(cfg, ckpt)
    return model, processor
