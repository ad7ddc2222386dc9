"""Each training run's own job folder, and which earlier run ``--resume auto`` continues.

LAVIS names a run's folder ``run.output_dir/<job_id>``, ``job_id`` being the start time cut to
ten minutes (``lavis.common.utils.now``): two runs started in one window shared a folder and
overwrote each other's checkpoints. Here rank 0 claims a folder named to the second
(``20261207175301``; ``20261207175301-2``, ``-3`` ... when taken) with ``os.mkdir``, which
fails when the folder exists, so two runs, at once or in a row, never get the same one; every
rank is told its name. A run's rank 0 holds an advisory lock on ``.run.lock`` in its folder
while it runs (the OS drops it when the process ends, however it ends), so ``--resume auto``
never continues a folder that a live run is writing.

``--resume auto`` continues the newest readable checkpoint of a run of the *same config*
(:func:`launch_differences` ignores only what a launch fills in: rank, world size, the resume
path); checkpoints of other configs are skipped, and the log says which and how they differ.
"""
from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any, Dict, List, Mapping, Optional

from lavis_cprd.checkpoints import LATEST, PREVIOUS, CorruptCheckpointError, load_checkpoint
from lavis_cprd.config_diff import SHOWN, Difference, config_differences, describe

try:  # POSIX; elsewhere runs are not locked (folders are still unique)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

LOCK = ".run.lock"
# What a launch fills into run: (distributed set-up, the resume path): never a reason to call
# two configs different.
LAUNCH_KEYS = frozenset({
    "run.rank", "run.world_size", "run.gpu", "run.distributed", "run.dist_backend", "run.dist_url",
    "run.resume_ckpt_path",
})


class ClaimedJob(str):
    """A job id whose folder this process has claimed already (the runner uses it as it is)."""


def launch_differences(old: Mapping, new: Mapping) -> List[Difference]:
    """How two run configs differ, beyond what a launch fills in."""
    return config_differences(old, new, ignore=LAUNCH_KEYS)


# --------------------------------------------------------------------------- folders
def claim_job_folder(output_root: str, stamp: Optional[str] = None) -> ClaimedJob:
    """Create and return a new job folder name under ``output_root`` (rank 0 only)."""
    stamp = stamp or time.strftime("%Y%m%d%H%M%S")
    os.makedirs(output_root, exist_ok=True)
    n = 1
    while True:
        job_id = stamp if n == 1 else f"{stamp}-{n}"
        try:
            os.mkdir(os.path.join(output_root, job_id))
        except FileExistsError:
            n += 1
            continue
        return ClaimedJob(job_id)


def shared_job_folder(output_root: str) -> ClaimedJob:
    """The job folder of this run on every rank: rank 0 claims it, the others are told its name
    (their clocks may differ, or straddle a second: they never name it themselves)."""
    from lavis_cprd.distributed import broadcast_object, get_rank

    return ClaimedJob(broadcast_object(claim_job_folder(output_root) if get_rank() == 0 else None))


_held: Dict[str, Any] = {}  # job folder -> its open lock file, while this process runs in it


def lock_job_folder(folder: str) -> bool:
    """Take ``folder``'s run lock for this process; False when another process holds it."""
    folder = os.path.abspath(folder)
    if folder in _held or fcntl is None:
        return True
    handle = open(os.path.join(folder, LOCK), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return False
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    _held[folder] = handle
    return True


def release_job_folder(folder: str) -> None:
    handle = _held.pop(os.path.abspath(folder), None)
    if handle is not None:
        handle.close()  # closing drops the flock


def in_use(folder: str) -> bool:
    """Whether another live process runs in ``folder`` (holds its lock)."""
    folder = os.path.abspath(folder)
    if folder in _held or fcntl is None or not os.path.isfile(os.path.join(folder, LOCK)):
        return False
    with open(os.path.join(folder, LOCK), "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


# --------------------------------------------------------------------------- resuming
def find_resume_checkpoint(output_root: str, config: Optional[Mapping] = None) -> Optional[str]:
    """The newest readable ``checkpoint_latest``/``checkpoint_previous`` under
    ``output_root/<job>/`` of a run whose config equals ``config`` (any run when None), in a
    folder no live run holds. Unreadable files are skipped with a warning, so a checkpoint torn
    by a crash falls back to the one before it; so are other configs' checkpoints, saying how
    the newest of them differs."""
    candidates = glob.glob(os.path.join(output_root, "*", LATEST)) + glob.glob(os.path.join(output_root, "*", PREVIOUS))
    scored, other = [], []
    for path in candidates:
        if in_use(os.path.dirname(path)):
            logging.warning("--resume auto: skipping %s: another run is writing that folder", path)
            continue
        try:
            ckpt = load_checkpoint(path)
        except CorruptCheckpointError as e:
            logging.warning("--resume auto: skipping %s", e)
            continue
        key = (int(ckpt.get("epoch", -1)), os.path.getmtime(path), path)
        differences = launch_differences(ckpt.get("config", {}), config) if config is not None else []
        (other if differences else scored).append((key, differences))
    if other:
        (_, _, path), differences = max(other)
        logging.warning("--resume auto: skipping %d checkpoint(s) of runs with another config; the newest, %s, "
                        "differs in %s (to continue it anyway: --resume %s)", len(other), path, describe(differences), path)
    return max(scored)[0][2] if scored else None


def check_resume_fits(path: str, checkpoint: Mapping, config: Mapping, model) -> None:
    """A resume from ``checkpoint`` into ``model`` under ``config``: a config that differs from
    the one the checkpoint was trained with is a warning that lists the differences; weights
    of another shape (the model's sizes changed) are an error that lists them."""
    from lavis_cprd.checkpoints import CheckpointMismatchError

    differences = launch_differences(checkpoint.get("config", {}), config)
    own = model.state_dict()
    state = checkpoint.get("model", {})
    shapes = [f"{k} {tuple(v.shape)} vs the model's {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        model_keys = [d for d in differences if d[0].startswith("model.")]
        raise CheckpointMismatchError(
            f"cannot resume from {path}: {len(shapes)} weight(s) of another shape ({'; '.join(shapes[:SHOWN // 2])}); "
            f"the model config differs from the checkpoint's in {describe(model_keys) or 'no key (the code changed?)'}"
        )
    if differences:
        logging.warning("resuming %s under a config that differs from the one it was trained with: %s",
                        path, describe(differences))
