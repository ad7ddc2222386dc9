"""Checkpoint files that survive interruption: atomic writes, RNG states, safe loading."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import zipfile
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch

LATEST, PREVIOUS, BEST = "checkpoint_latest.pth", "checkpoint_previous.pth", "checkpoint_best.pth"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated by a crash, or not a checkpoint)."""


class OutOfDiskSpaceError(OSError):
    """A write that ran out of disk space, with the file, the disk and the space it needed."""


# What torch's zip writer raises when a write comes up short (it hides the OSError).
_SHORT_WRITE = ("file write failed", "unexpected pos")


def atomic_write(path: str, write: Callable[[str], None], size_hint: int = 0) -> None:
    """``write(tmp)`` to a temporary file in the same folder, then rename onto ``path``: a
    reader (or a resume after a crash) sees the old file or the whole new one, never a torn write.
    A full disk is an :class:`OutOfDiskSpaceError` naming the file, the disk, the space free and
    about how much was needed (``size_hint``, or what was written before it failed)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        full = _out_of_space(e, os.path.abspath(path), max(size_hint, written))
        if full is None:
            raise
        raise full from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _out_of_space(error: BaseException, path: str, needed: int) -> Optional[OutOfDiskSpaceError]:
    """The error to raise when ``error`` means the disk ``path`` is on is full, else None."""
    import errno
    import shutil

    if isinstance(error, OSError) and error.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None  # e.g. a missing folder: its own error says so
    if not isinstance(error, OSError) and not any(s in str(error) for s in _SHORT_WRITE):
        return None
    folder = os.path.dirname(path)
    free = shutil.disk_usage(folder).free
    if not isinstance(error, OSError) and free >= max(needed, 1 << 20):
        return None  # torch's short write on a disk with room: not a full disk
    mount = folder
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    need = f"about {_size(needed)} needed, {_size(free)} free" if needed else f"more needed than the {_size(free)} free"
    return OutOfDiskSpaceError(
        errno.ENOSPC, f"out of disk space writing {path}: {need} on the disk mounted at {mount}. Free space there "
        "or write elsewhere (run.output_dir); the file was left as it was before",
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _payload_bytes(obj: Any) -> int:
    """The tensor bytes in ``obj`` (nested dicts, lists, tuples): about what ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_payload_bytes(v) for v in obj)
    return 0


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), size_hint=_payload_bytes(obj))


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
    """Every RNG a training step draws from, in a form ``weights_only`` loading accepts: this
    process's CPU streams and its own GPU's (the one it trains on; not every visible GPU's, so
    a resume on a machine that sees fewer GPUs works)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s streams. Its tensors may arrive on a GPU (a checkpoint loaded
    with ``map_location="cuda"``): they are read on the CPU. An older checkpoint's list of every
    GPU's state restores this process's GPU from its own entry."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # every visible GPU's, as saved before
            index = torch.cuda.current_device()
            if index >= len(cuda):
                logging.warning("resume: no saved CUDA RNG state for GPU %d (%d saved); it starts fresh", index, len(cuda))
                return
            cuda = cuda[index]
        torch.cuda.set_rng_state(cuda.cpu())


def rank_rng_states() -> list:
    """Every rank's :func:`rng_state`, in rank order (a collective: call it on every rank)."""
    from lavis_cprd import distributed

    states = distributed.gather_objects({distributed.get_rank(): rng_state()})
    return [states[r] for r in sorted(states)]


def own_rng_state(checkpoint: Dict[str, Any], rank: int, world_size: int) -> Optional[Dict[str, Any]]:
    """The RNG state this rank resumes with: its own from ``rng_per_rank`` when the checkpoint
    was saved by as many ranks; else the saved one (rank 0's), which a run resumed with
    another number of ranks cannot avoid."""
    per_rank = checkpoint.get("rng_per_rank")
    if per_rank and len(per_rank) == world_size:
        return per_rank[rank]
    if world_size > 1:
        logging.warning("resume: the checkpoint holds %s RNG state(s) for %d ranks; every rank starts from rank 0's",
                        len(per_rank) if per_rank else "no per-rank", world_size)
    return checkpoint.get("rng")


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


# Keys one side of a load may lack, by design: BLIP's momentum encoders and queues (training
# state of its momentum distillation); the cross-encoder parts a dual encoder has none of (ITM
# head, cross-attention, captioning decoder) when it reads a BLIP retrieval checkpoint; the ITC
# temperature, which an ITM-only model (a teacher) has none of. A checkpoint may hold them
# beyond the model's keys; an initialisation (``pretrained``) may lack them (they start fresh).
# Any other extra key, and every other missing one, is an error.
OPTIONAL_KEYS = re.compile(r"(^|\.)\w+_m\.|_queue$|(^|\.)queue_ptr$|^temp$|^itm_head\.|\.crossattention\.|^text_decoder\.|^teacher\.")
SHOWN_KEYS = 5  # how many mismatched keys an error lists


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose weights do not fit the model: missing or unexpected keys, or shapes."""


def load_state(model: torch.nn.Module, path: str, where: str = "checkpoint", initialisation: bool = False) -> Dict[str, Any]:
    """A checkpoint's weights into ``model``, strictly: keys the model has and the file lacks,
    or the file has and the model lacks (beyond :data:`OPTIONAL_KEYS`), are an error that
    lists the first few of them. (LAVIS loads with ``strict=False`` and logs one INFO line, so
    a checkpoint of another model would leave random weights.) Parameters the model freezes may
    be missing: LAVIS's runner leaves them out of its checkpoints. ``initialisation``: the file
    initialises a larger model (a cross-encoder from ITC-trained towers), which may lack the
    :data:`OPTIONAL_KEYS` parts. Returns the checkpoint."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    own = model.state_dict()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in own if k not in state and k not in frozen and not (initialisation and OPTIONAL_KEYS.search(k))]
    unexpected = [k for k in state if k not in own and not OPTIONAL_KEYS.search(k)]
    shapes = [f"{k} {tuple(state[k].shape)} vs the model's {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for what, keys in (("missing from it", missing), ("unexpected in it", unexpected), ("of another shape", shapes)):
        if keys:
            more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            problems.append(f"{len(keys)} key(s) {what}: {', '.join(keys[:SHOWN_KEYS])}{more}")
    if problems:
        raise CheckpointMismatchError(
            f"{where}={path!r} does not fit {type(model).__name__}: {'; '.join(problems)}. Is it a checkpoint of "
            "this model and config (the sizes in model:)? Loading it anyway would leave those weights random"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return ckpt


@contextlib.contextmanager
def download_errors(url: str, key: str, what: str = "a local copy") -> Iterator[None]:
    """A failed download names the URL and the config key that can point at ``what`` instead."""
    from lavis_cprd.errors import NETWORK_ERRORS, first_line

    try:
        yield
    except NETWORK_ERRORS as e:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
        raise ConnectionError(
            f"could not download {url} ({key}): {first_line(e)}. Offline? "
            f"Set {key} to {what} (a path), or put the file at {cached}, where LAVIS looks before downloading"
        ) from e


def load_weights(model, cfg, name: str, key: str = "model", local_pretrained_as_checkpoint: bool = False,
                 random_is_expected: bool = True) -> Optional[str]:
    """LAVIS's rule (``load_checkpoint_from_config``), the one place our models apply it:
    with ``load_finetuned``, the ``finetuned`` checkpoint (empty: none); else ``pretrained``;
    else nothing, said in the log (a WARNING unless ``random_is_expected``, e.g. a teacher).
    A local file must exist and its keys fit the model (:func:`load_state`); a URL that cannot
    be downloaded names the config key to point at a local copy. ``key``: where the config sits
    (``model``, or a teacher's ``model.distill.teacher.checkpoint``), for errors.
    ``local_pretrained_as_checkpoint``: a local ``pretrained`` file loads as a runner checkpoint
    (``BlipBase.load_from_pretrained`` expects BLIP's momentum keys, which LAVIS runner
    checkpoints never hold). Returns what was loaded."""
    from lavis.common.utils import is_url

    which = configured_weights(cfg)
    if which is None:
        logging.log(logging.INFO if random_is_expected else logging.WARNING,
                    "%s: no checkpoint configured (%s), weights are randomly initialised", name, key)
        return None
    path = cfg.finetuned if which == "finetuned" else cfg.pretrained
    where = key if key.endswith(".checkpoint") else f"{key}.{which}"
    if is_url(path):
        with download_errors(path, where, "a local checkpoint file"):
            model.load_checkpoint(path) if which == "finetuned" else model.load_from_pretrained(path)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"{where}={path!r} does not exist (a checkpoint file or a URL)")
    elif which == "finetuned" or local_pretrained_as_checkpoint:
        load_state(model, path, where, initialisation=which == "pretrained")
    else:
        model.load_from_pretrained(path)
    return which
