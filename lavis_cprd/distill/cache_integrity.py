"""A teacher-score cache's format, and what it is checked against: the sha256 of each of its
files, recorded in its ``manifest.json`` as each file is written, and the identity of the
teacher that scored it. Both writers use it: ``distill.cache_builder`` (``lavis-cprd
cache-teacher``) and ``distill.teacher_cache.TeacherScoreRecord`` (``distill.teacher_record``);
``distill.teacher_cache.TeacherScoreCache`` reads what they write.

Layout of a cache folder::

    manifest.json     written only by :func:`write_manifest`, its keys :data:`MANIFEST_KEYS`:
                      the settings the cache was built with (checked on resume), the identity
                      of the teacher that scored it and the sha256 of every file written so far
    captions.json     the distinct processed captions; shards refer to them by index
    embeddings.pt     a built cache's fixed-encoder image and caption embeddings (reused on resume)
    shard_00000.pt    {"image": [P], "caption": [P], "logit": [P]} for one block of queries

A file whose bytes do not match its recorded checksum (a truncated copy, a bad disk) or
that has none (written just before a crash, the manifest not yet updated) is not trusted:
``lavis-cprd cache-teacher`` rebuilds it, training refuses the cache naming it. Training also
refuses a cache whose teacher (arch, checkpoint bytes, precision on the training device) is
not the configured one: its scores would silently stand in for another model's.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlparse

import torch

from lavis_cprd.checkpoints import atomic_json
from lavis_cprd.hashing import file_sha256, sha256_of_file
from lavis_cprd.precision import resolve

# 2: per-file checksums (``files``) and the teacher's identity (``teacher``) in the manifest.
CACHE_VERSION = 2
MANIFEST, CAPTIONS, EMBEDDINGS = "manifest.json", "captions.json", "embeddings.pt"
# Identity fields, in the order errors list them. ``checkpoint`` (the configured path) is
# informative where ``checkpoint_sha256`` is a digest: a copied or moved file is the same teacher.
IDENTITY_FIELDS = ("arch", "checkpoint", "checkpoint_sha256", "seed", "precision")
MISSING, NO_CHECKSUM, MISMATCH = "missing", "no checksum recorded", "checksum mismatch"
# Every manifest's keys, whichever writer; a key that does not apply to a cache is null
# (a recorded cache has no top_m, a built one no num_pairs). ``recorded``: written by a
# training run (``distill.teacher_record``), which decides how a damaged one is repaired;
# ``command``: the ``cache-teacher`` command line that repairs a built one.
MANIFEST_KEYS = ("version", "recorded", "num_shards", "num_items", "num_images", "num_captions", "num_pairs",
                 "top_m", "shard_size", "settings", "teacher", "command", "files")


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used as it is: damaged, too old, or another teacher's."""


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.pt"


def shard_path(root: str, index: int) -> str:
    return os.path.join(root, shard_name(index))


# --------------------------------------------------------------------------- manifest
def new_manifest(num_shards: int, num_captions: int, *, recorded: bool = False, num_items: Optional[int] = None,
                 num_images: Optional[int] = None, num_pairs: Optional[int] = None, top_m: Optional[int] = None,
                 shard_size: Optional[int] = None, settings: Optional[dict] = None,
                 teacher: Optional[Mapping[str, Any]] = None, command: Optional[str] = None,
                 files: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """A manifest of this :data:`CACHE_VERSION`, every key of :data:`MANIFEST_KEYS` set.
    ``teacher``: :func:`teacher_identity`, what a reader's teacher must match; ``files``:
    name -> sha256 of each file written so far."""
    def count(n):
        return None if n is None else int(n)

    manifest = {
        "version": CACHE_VERSION, "recorded": bool(recorded), "num_shards": int(num_shards),
        "num_items": count(num_items), "num_images": count(num_images), "num_captions": int(num_captions),
        "num_pairs": count(num_pairs), "top_m": count(top_m), "shard_size": count(shard_size),
        "settings": settings or {}, "teacher": None if teacher is None else dict(teacher), "command": command,
        "files": dict(files or {}),
    }
    assert tuple(manifest) == MANIFEST_KEYS
    return manifest


def write_manifest(root: str, manifest: Mapping[str, Any]) -> None:
    """Write (atomically replace) ``root``'s manifest: the only writer of one. Write it after
    the files whose checksums it records, so that a reader never sees one it does not vouch for."""
    if set(manifest) != set(MANIFEST_KEYS) or manifest["version"] != CACHE_VERSION:
        raise ValueError(f"a teacher cache manifest has the keys {MANIFEST_KEYS} at version {CACHE_VERSION}; "
                         f"got {sorted(manifest)} at version {manifest.get('version')}")
    atomic_json(dict(manifest), os.path.join(root, MANIFEST))


# --------------------------------------------------------------------------- checksums
def file_problem(root: str, name: str, manifest: Mapping[str, Any]) -> Optional[str]:
    """Why ``root/name`` is not the file the manifest recorded (``missing``, ``no checksum
    recorded``, ``checksum mismatch``), or None when its bytes match."""
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return MISSING
    recorded = manifest.get("files", {}).get(name)
    if recorded is None:
        return NO_CHECKSUM
    return None if sha256_of_file(path) == recorded else MISMATCH


def verified_bytes(root: str, name: str, manifest: Mapping[str, Any]) -> bytes:
    """The bytes of ``root/name`` (read once: hashed, then parsed by the caller), or a
    :class:`TeacherCacheError` naming the file, why it is refused and how to repair it."""
    path = os.path.join(root, name)
    recorded = manifest.get("files", {}).get(name)
    problem = MISSING
    if os.path.isfile(path):
        with open(path, "rb") as f:
            data = f.read()
        if recorded is not None and hashlib.sha256(data).hexdigest() == recorded:
            return data
        problem = NO_CHECKSUM if recorded is None else MISMATCH
    raise TeacherCacheError(f"teacher cache file {path} is damaged ({problem}); {repair_hint(root, manifest)}")


def repair_hint(root: str, manifest: Mapping[str, Any]) -> str:
    """How to rebuild the damaged files of the cache at ``root``."""
    if manifest.get("recorded"):
        return (f"it was recorded by a training run (model.distill.teacher_record): delete {root} and rerun "
                "that run, or train without it (model.distill.teacher_cache: null)")
    command = manifest.get("command") or (f"lavis-cprd cache-teacher --output {root} ... "
                                          f"(with the settings in {os.path.join(root, MANIFEST)})")
    return f"rerun `{command}`: it verifies every shard and rebuilds the damaged ones"


def read_manifest(root: str) -> Optional[dict]:
    """``root``'s manifest, None if there is none; one of another cache version is an error.
    Keys an older writer of this version left out (a built cache's ``recorded`` and
    ``num_pairs``, a recorded one's build settings) are filled in as :func:`new_manifest` would."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError as e:
        raise TeacherCacheError(f"teacher cache manifest {path} is damaged ({e}): delete {root} and rebuild it"
                                ) from None
    version = manifest.get("version")
    if version != CACHE_VERSION:
        raise TeacherCacheError(
            f"{root} holds a teacher cache of version {version}; this lavis-cprd reads version {CACHE_VERSION} "
            f"(with checksums of its files and the teacher's identity): rebuild it into a new folder or delete {root}"
        )
    absent = {key: value for key, value in new_manifest(0, 0).items()
              if key not in manifest and key not in ("num_shards", "num_captions")}  # those two: every writer's
    return {**manifest, **absent}


# --------------------------------------------------------------------------- identity
def teacher_identity(teacher: Mapping[str, Any], arch: str, device: Union[str, torch.device]) -> Dict[str, Any]:
    """What makes a teacher's scores its own: ``arch``, the checkpoint as configured, its
    bytes' sha256 (a URL stands for itself: nothing is downloaded), the seed of a teacher
    without a checkpoint file (random init or the model type's default weights), and the
    precision as resolved for ``device`` (``auto`` is bf16 or fp32 by device)."""
    checkpoint = teacher.get("checkpoint")
    if checkpoint and urlparse(str(checkpoint)).scheme in ("http", "https"):
        digest: Optional[str] = str(checkpoint)
    elif checkpoint:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"model.distill.teacher.checkpoint={checkpoint!r} does not exist")
        digest = file_sha256(str(checkpoint))
    else:
        digest = None
    return {
        "arch": arch,
        "checkpoint": checkpoint,
        "checkpoint_sha256": digest,
        "seed": int(teacher.get("seed", 0)) if digest is None else None,
        # fp32: the adapters' default (``FrozenTeacher``)
        "precision": resolve(str(teacher.get("precision", "fp32")), device, "model.distill.teacher.precision"),
    }


def identity_differences(cached: Mapping[str, Any], configured: Mapping[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(field, cache's value, configured value)`` for each identity field that differs."""
    same_bytes = cached.get("checkpoint_sha256") is not None and (
        cached.get("checkpoint_sha256") == configured.get("checkpoint_sha256"))
    return [(key, cached.get(key), configured.get(key)) for key in IDENTITY_FIELDS
            if cached.get(key) != configured.get(key) and not (key == "checkpoint" and same_bytes)]


def check_teacher_identity(manifest: Mapping[str, Any], configured: Mapping[str, Any], root: str) -> None:
    """Refuse the cache at ``root`` unless its manifest's teacher is ``configured``."""
    cached = manifest.get("teacher") or {}
    differences = identity_differences(cached, configured)
    if not differences:
        return
    lines = "\n".join(f"  {key}: cache {a!r} vs configured {b!r}" for key, a, b in differences)
    hint = ""
    if any(key == "precision" for key, _, _ in differences):
        hint = (" The precision is compared as resolved for the training device (auto: bf16 where native): "
                "set model.distill.teacher.precision to the cache's.")
    recorded = "" if manifest.get("teacher") else " (its manifest records no teacher)"
    raise TeacherCacheError(
        f"model.distill.teacher_cache={root!r} was scored by another teacher than model.distill.teacher"
        f"{recorded}:\n{lines}\nTrain with the teacher it was scored by, rebuild it for this teacher "
        f"(lavis-cprd cache-teacher into a new folder), or set model.distill.teacher_cache: null.{hint}"
    )
