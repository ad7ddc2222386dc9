"""Teacher-score cache, as training uses it: cross-encoder logits precomputed for each
training item against its top-M candidates under a fixed dual encoder, read by the training
step instead of running the teacher (:class:`TeacherScoreCache`), and the logits a run
computed, recorded to be read by a later run (:class:`TeacherScoreRecord`).

The folder's layout, its manifest and checksums are ``distill.cache_integrity``'s; building,
resuming and repairing one (``lavis-cprd cache-teacher``) are ``distill.cache_builder``'s.
Loading refuses a damaged file.

Keys are ``(image_id, caption text)``: ``image_id`` as the training dataset hands it to the
model (LAVIS's per-split image index) and the caption after the split's text processor.
Images are scored as the split's ``vis_processor`` returns them; with random augmentation
the cached logit belongs to one view, while online scoring sees the step's view.
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lavis_cprd import distributed
from lavis_cprd.checkpoints import atomic_json, atomic_save
from lavis_cprd.distill.cache_integrity import (
    CAPTIONS, MANIFEST, new_manifest, read_manifest, shard_name, shard_path, verified_bytes, write_manifest,
)
from lavis_cprd.hashing import sha256_of_file


# --------------------------------------------------------------------------- reading
class TeacherScoreCache:
    """Cached teacher logits, looked up by ``(image_id, caption text)``.

    Stored as one sorted tensor of keys ``image_id * num_captions + caption_index`` and one of
    logits, so a lookup is a vectorised ``searchsorted`` and memory is 12 bytes a pair.
    """

    def __init__(self, captions: Sequence[str], image_ids: torch.Tensor, caption_ids: torch.Tensor,
                 logits: torch.Tensor, root: str = ""):
        """Pairs ``(image_ids[p], captions[caption_ids[p]])`` with teacher ``logits[p]``."""
        self.caption_index: Dict[str, int] = {c: i for i, c in enumerate(captions)}
        self.num_captions = max(len(captions), 1)
        keys = image_ids.long() * self.num_captions + caption_ids.long()
        order = keys.argsort(stable=True)
        keys, logits = keys[order], logits[order].float()
        first = torch.ones_like(keys, dtype=torch.bool)
        first[1:] = keys[1:] != keys[:-1]  # shards overlap (a pair can be a caption's and an image's candidate)
        self.keys, self.logits = keys[first].contiguous(), logits[first].contiguous()
        self.root = root
        self.manifest: Optional[dict] = None  # set by ``load``: the teacher's identity is checked against it

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, root: str) -> "TeacherScoreCache":
        """Every finished shard under ``root``, each file checked against the checksum its
        manifest recorded. A partial build is usable (misses are scored online); a damaged file,
        or a recorded one that is gone, is a :class:`TeacherCacheError` naming it and the repair."""
        manifest = read_manifest(root)
        if manifest is None:
            raise FileNotFoundError(
                f"model.distill.teacher_cache={root!r}: no {MANIFEST} there; build one with `lavis-cprd cache-teacher`"
            )
        captions = json.loads(verified_bytes(root, CAPTIONS, manifest))
        shards = []
        for k in range(manifest["num_shards"]):
            if shard_name(k) in manifest["files"] or os.path.isfile(shard_path(root, k)):  # else: not built yet
                data = verified_bytes(root, shard_name(k), manifest)  # read once: hashed, then parsed
                shards.append(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        if len(shards) < manifest["num_shards"]:
            logging.warning("teacher cache %s: %d of %d shards built; misses are scored online", root,
                            len(shards), manifest["num_shards"])
        empty = {"image": torch.zeros(0, dtype=torch.long), "caption": torch.zeros(0, dtype=torch.long),
                 "logit": torch.zeros(0)}
        image_ids, caption_ids, logits = (torch.cat([empty[k]] + [s[k] for s in shards]) for k in ("image", "caption", "logit"))
        cache = cls(captions, image_ids, caption_ids, logits, root=root)
        cache.manifest = manifest
        logging.info("teacher cache %s: %d pairs, %d captions", root, len(cache), len(captions))
        return cache

    def lookup(self, image_ids: torch.Tensor, captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logits [P], hit [P] bool)`` for pairs ``(image_ids[p], captions[p])``; logits
        of misses are 0."""
        cap = torch.tensor([self.caption_index.get(c, -1) for c in captions], dtype=torch.long)
        image_ids = image_ids.detach().cpu().long().view(-1)
        query = image_ids * self.num_captions + cap.clamp(min=0)
        pos = torch.searchsorted(self.keys, query).clamp(max=max(len(self.keys) - 1, 0))
        hit = (cap >= 0) & (len(self.keys) > 0)
        if len(self.keys):
            hit &= self.keys[pos] == query
            logits = torch.where(hit, self.logits[pos], torch.zeros_like(self.logits[pos]))
        else:
            logits = torch.zeros(len(query))
        return logits, hit


# --------------------------------------------------------------------------- recording
class TeacherScoreRecord:
    """The teacher logits a training run computed, kept to be saved as a cache folder
    (``distill.teacher_record``): a later run on the same data with the same frozen teacher
    reads it as its ``distill.teacher_cache``. Runs that draw the same batches (one seed, the
    same data and batch size) then score no pair twice: ``compare`` lets one run of each seed
    that scores every in-batch pair (kl) record, and that seed's other runs read it."""

    def __init__(self):
        self.caption_index: Dict[str, int] = {}
        self.parts: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, image_ids: torch.Tensor, captions: Sequence[str], logits: torch.Tensor) -> None:
        caption_ids = torch.tensor([self.caption_index.setdefault(c, len(self.caption_index)) for c in captions],
                                   dtype=torch.long)
        self.parts.append((image_ids.detach().cpu().long().view(-1), caption_ids, logits.detach().float().cpu().view(-1)))

    def save(self, root: str, settings: Optional[dict] = None, teacher_identity: Optional[dict] = None) -> int:
        """Write (or rewrite) ``root`` as a one-shard cache of every pair recorded so far, the
        records of all ranks merged; returns its number of distinct pairs. Call it on every rank.
        ``teacher_identity`` (``cache_integrity.teacher_identity``) is what a reader's teacher must match."""
        parts = distributed.gather_objects({distributed.get_rank(): (list(self.caption_index), self.parts)})
        captions: Dict[str, int] = {}
        image_ids, caption_ids, logits = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)], [torch.zeros(0)]
        for rank in sorted(parts):
            names, blocks = parts[rank]
            remap = torch.tensor([captions.setdefault(c, len(captions)) for c in names] or [0], dtype=torch.long)
            for img, cap, logit in blocks:
                image_ids.append(img)
                caption_ids.append(remap[cap])
                logits.append(logit)
        cache = TeacherScoreCache(list(captions), torch.cat(image_ids), torch.cat(caption_ids), torch.cat(logits))
        if distributed.get_rank() == 0:
            os.makedirs(root, exist_ok=True)
            # Sorted keys decode back to (image id, caption index); captions before the shard
            # before the manifest with their checksums: a rewrite cut short leaves files the
            # manifest does not vouch for, and a reader refuses them.
            atomic_json(list(captions), os.path.join(root, CAPTIONS))
            atomic_save({"image": cache.keys // cache.num_captions, "caption": cache.keys % cache.num_captions,
                         "logit": cache.logits}, shard_path(root, 0))
            files = {name: sha256_of_file(os.path.join(root, name)) for name in (CAPTIONS, shard_name(0))}
            write_manifest(root, new_manifest(1, len(captions), recorded=True, num_pairs=len(cache), settings=settings,
                                              teacher=teacher_identity, files=files))
        return len(cache)
