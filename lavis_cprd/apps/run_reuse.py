"""When ``demo`` and ``compare`` may reuse a finished training run, and what they do otherwise.

A run folder holds ``run_request.json``, written when its run starts: the fully resolved config
(LAVIS's ``Config`` of the experiment file and its overrides, as ``load_config`` builds it),
``lavis_cprd.__version__``, and the sha256 of each local checkpoint file the model config points
at (``pretrained``, ``finetuned``, ``checkpoint`` keys under ``model``: a teacher retrained and
exported to the same path is another teacher). A finished run is reused only when that record
equals the new request; otherwise the old folder is moved aside (``<run>.superseded-<time>``,
nothing is deleted) and the run retrained.

What the comparison leaves out, because it changes no result: a checkpoint's path (its content
is compared instead), and where the runs' output folder lives (paths under a run folder's parent
are compared relative to it, so a moved or renamed output folder keeps its runs). Two identical
requests from other working folders, ``LAVIS_CACHE_ROOT`` or thread counts resolve to the same
config (checked): nothing else needs excluding.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from argparse import Namespace
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from omegaconf import OmegaConf

import lavis_cprd
from lavis_cprd.checkpoints import atomic_json
from lavis_cprd.hashing import file_sha256
from lavis_cprd.config_diff import Difference, config_differences, describe, flatten
from lavis_cprd.training.launch import load_config

REQUEST = "run_request.json"
FINAL = "checkpoint_best.pth"
CHECKPOINT_KEYS = frozenset({"pretrained", "finetuned", "checkpoint"})  # leaf names under model.* holding weights
VERSION_KEY = "lavis_cprd.__version__"
RUNS_ROOT = "<runs>"  # stands for a run folder's parent in compared paths
log = logging.getLogger("lavis_cprd.apps.runs")

_config_lock = threading.Lock()  # LAVIS's Config registers itself globally: one build at a time


@dataclass
class RunDecision:
    """What ``train_run`` did with a run folder: ``reused`` or trained, and why (short)."""

    run_dir: str
    reused: bool
    reason: str


def run_request(cfg_path: str, options: Sequence[str], run_dir: str) -> Dict[str, Any]:
    """What a run into ``run_dir`` is asked for, as ``run_request.json`` records it."""
    with _config_lock:
        cfg = load_config(Namespace(cfg_path=cfg_path, options=list(options)))
    config = OmegaConf.to_container(cfg.config, resolve=True)
    checkpoints = {
        key: file_sha256(value) for key, value in flatten(config).items()
        if key.startswith("model.") and key.rsplit(".", 1)[-1] in CHECKPOINT_KEYS
        and isinstance(value, str) and value and os.path.isfile(value)
    }
    request = {"lavis_cprd_version": lavis_cprd.__version__, "runs_root": os.path.dirname(os.path.abspath(run_dir)),
               "checkpoint_sha256": checkpoints, "config": config}
    return json.loads(json.dumps(request, default=str))  # as it reads back from the file (lists, floats)


def compared(request: Mapping[str, Any]) -> Dict[str, Any]:
    """The flat view two requests are compared in: checkpoints by content, paths under the runs'
    parent folder relative to it, the package version as one more key."""
    root = request["runs_root"].rstrip(os.sep) + os.sep
    view: Dict[str, Any] = {}
    for key, value in flatten(request["config"]).items():
        if key in request["checkpoint_sha256"]:
            value = "sha256:" + request["checkpoint_sha256"][key]
        elif isinstance(value, str) and value.startswith(root):
            value = os.path.join(RUNS_ROOT, value[len(root):])
        view[key] = value
    view[VERSION_KEY] = request["lavis_cprd_version"]
    return view


def request_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[Difference]:
    """``(dotted key, old, new)`` for each compared key that differs (missing: None), sorted."""
    return config_differences(compared(old), compared(new))


def stored_request(run_dir: str) -> Optional[Dict[str, Any]]:
    """The run folder's ``run_request.json``; None when absent or unreadable."""
    try:
        with open(os.path.join(run_dir, REQUEST)) as f:
            stored = json.load(f)
        compared(stored)  # every field there
        return stored
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def move_aside(run_dir: str) -> str:
    """Rename ``run_dir`` to a free ``<run_dir>.superseded-<YYYYmmddHHMMSS>[-n]``; return it."""
    stamp = f"{run_dir}.superseded-{time.strftime('%Y%m%d%H%M%S')}"
    target, n = stamp, 1
    while os.path.exists(target):
        n += 1
        target = f"{stamp}-{n}"
    os.rename(run_dir, target)
    return target


def prepare_run_folder(run_dir: str, request: Dict[str, Any]) -> RunDecision:
    """Reuse ``run_dir``'s finished run if it was trained for ``request``; otherwise make the
    folder ready for training (an earlier run of another request moved aside, ``request``
    recorded) and say why, in the log and in the returned decision."""
    final = os.path.join(run_dir, FINAL)
    stored = stored_request(run_dir)
    differences = request_differences(stored, request) if stored is not None else None
    if differences == [] and os.path.isfile(final):
        log.info("reusing %s: same config and lavis_cprd version (%s) as requested", final, request["lavis_cprd_version"])
        return RunDecision(run_dir, True, "same config and version")
    if differences == []:
        reason, detail = "unfinished run of this config", "its earlier run of this config did not finish"
    elif not os.path.isdir(run_dir) or not os.listdir(run_dir):
        reason = detail = "new run"
    else:
        if stored is None and os.path.isfile(os.path.join(run_dir, REQUEST)):
            reason = "unreadable record of its config"
        elif stored is None:
            reason = "no record of its config"
        else:
            reason = "request differs in " + ", ".join(k for k, _, _ in differences)
        detail = describe(differences) if differences else reason
        detail = f"{detail}; the old run is kept as {move_aside(run_dir)}"
    log.info("training %s: %s", run_dir, detail)
    os.makedirs(run_dir, exist_ok=True)
    atomic_json(request, os.path.join(run_dir, REQUEST))
    return RunDecision(run_dir, False, reason)


def summarize_decisions(decisions: Sequence[RunDecision]) -> str:
    """One line each for the reused and the trained runs (with why), for a final summary."""
    reused = [os.path.basename(d.run_dir) for d in decisions if d.reused]
    trained = [f"{os.path.basename(d.run_dir)} ({d.reason})" for d in decisions if not d.reused]
    return (f"Runs reused (same config and lavis_cprd version): {', '.join(reused) or 'none'}\n"
            f"Runs trained: {', '.join(trained) or 'none'}")
