"""Checkpoint files that survive interruption: atomic writes, RNG states, safe loading, and
finding the newest readable checkpoint to resume from (``--resume auto``)."""
from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import random
import zipfile
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

LATEST, PREVIOUS, BEST = "checkpoint_latest.pth", "checkpoint_previous.pth", "checkpoint_best.pth"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated by a crash, or not a checkpoint)."""


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file in the same folder, then rename onto ``path``: a
    reader (or a resume after a crash) sees the old file or the whole new one, never a torn write."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj: Any, path: str) -> None:
    """``json.dump`` through :func:`atomic_write`."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)``, with a clear error for a damaged file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CorruptCheckpointError(
            f"checkpoint {path!r} ({os.path.getsize(path)} bytes) is unreadable, truncated or corrupt: "
            f"{str(e).splitlines()[0]}"
        ) from e


def rng_state() -> Dict[str, Any]:
    """Every RNG a training step draws from, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def find_resume_checkpoint(output_root: str) -> Optional[str]:
    """The newest readable ``checkpoint_latest``/``checkpoint_previous`` under
    ``output_root/<job>/`` (LAVIS writes one job folder per run). Unreadable files are skipped
    with a warning, so a checkpoint torn by a crash falls back to the one before it."""
    candidates = glob.glob(os.path.join(output_root, "*", LATEST)) + glob.glob(os.path.join(output_root, "*", PREVIOUS))
    scored = []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CorruptCheckpointError as e:
            logging.warning("--resume auto: skipping %s", e)
            continue
        scored.append((int(ckpt.get("epoch", -1)), os.path.getmtime(path), path))
    if not scored:
        return None
    return max(scored)[2]


def export_half(src: str, dst: str) -> None:
    """A runner checkpoint reduced to what loading it needs: its weights in fp16 and its
    ``model`` and ``datasets`` configs (no optimizer, scaler or RNG states). Small enough to
    ship with the package (the embedded default's teacher); loading casts the weights back to
    the model's dtype."""
    ckpt = load_checkpoint(src)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    config = {k: ckpt["config"][k] for k in ("model", "datasets") if k in ckpt.get("config", {})}
    atomic_save({"model": weights, "config": config}, dst)


def stored_model_config(path: str, where: str = "checkpoint",
                        what: str = "expected a trained checkpoint written by LAVIS's runner") -> Dict[str, Any]:
    """The ``model`` config a LAVIS runner checkpoint was trained with (it says the sizes)."""
    if not path or not os.path.isfile(path):
        raise ValueError(f"{where}={path!r}: {what} (its config says the sizes)")
    return load_checkpoint(path)["config"]["model"]


def model_from_checkpoint(path: str, device: Optional[torch.device] = None, where: str = "checkpoint",
                          stored: Optional[Dict[str, Any]] = None, **overrides):
    """The model a LAVIS runner checkpoint holds, rebuilt by its registry name from the config
    stored with it (``stored``, when the caller has read it already) and loaded with its weights
    (``overrides``: model config keys to replace, e.g. ``distill={"loss": "none"}``). In eval
    mode, on ``device`` when given."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    mcfg = OmegaConf.create(stored if stored is not None else stored_model_config(path, where))
    mcfg.load_finetuned, mcfg.finetuned, mcfg.pretrained = True, path, None
    mcfg.pop("text_pretrained", None)  # the weights come from the checkpoint
    for key, value in overrides.items():
        mcfg[key] = value
    model = registry.get_model_class(mcfg.arch).from_config(mcfg)
    return (model if device is None else model.to(device)).eval()


def configured_weights(cfg) -> Optional[str]:
    """Which weights a model config loads by LAVIS's rule (``load_checkpoint_from_config``):
    ``"finetuned"`` (``load_finetuned`` with a ``finetuned`` checkpoint; empty: none),
    ``"pretrained"`` (no ``load_finetuned``, a ``pretrained`` one), or None."""
    if cfg.get("load_finetuned", False):
        return "finetuned" if cfg.get("finetuned") else None
    return "pretrained" if cfg.get("pretrained") else None


def load_weights(model, cfg, name: str, local_pretrained_as_checkpoint: bool = False) -> Optional[str]:
    """LAVIS's rule (``load_checkpoint_from_config``), the one place our models apply it:
    with ``load_finetuned``, the ``finetuned`` checkpoint (empty: none); else ``pretrained``;
    else nothing, said in the log. ``local_pretrained_as_checkpoint``: a local ``pretrained``
    file loads as a runner checkpoint (``BlipBase.load_from_pretrained`` expects BLIP's
    momentum keys, which LAVIS runner checkpoints never hold). Returns what was loaded."""
    which = configured_weights(cfg)
    if which == "finetuned":
        model.load_checkpoint(cfg.finetuned)
    elif which == "pretrained" and local_pretrained_as_checkpoint and os.path.isfile(cfg.pretrained):
        model.load_checkpoint(cfg.pretrained)
    elif which == "pretrained":
        model.load_from_pretrained(cfg.pretrained)
    else:
        logging.info("%s: no checkpoint configured, weights are randomly initialised", name)
    return which
