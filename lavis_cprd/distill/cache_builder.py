"""``lavis-cprd cache-teacher``'s builder: a training split's teacher scores, written shard by
shard in the format of ``distill.cache_integrity`` (its module docstring has the layout), to be
read by ``distill.teacher_cache``. Only the cache command uses it; training does not.

Queries are every caption (against its own image and its top-M other images) and every image
(against its own captions and its top-M other captions). Each shard covers ``shard_size``
queries, is written to a temporary file and renamed, and its checksum then goes into the
manifest (also replaced atomically).

A rerun with the same settings resumes or repairs: every file already there is checked against
the checksum the manifest recorded, and the missing or damaged ones (named in the log with
the reason) are computed again; the others are left untouched.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from lavis_cprd.checkpoints import atomic_json, atomic_save
from lavis_cprd.distill.cache_integrity import (
    CAPTIONS, EMBEDDINGS, MISSING, file_problem, new_manifest, read_manifest, shard_name, shard_path, write_manifest,
)
from lavis_cprd.hashing import sha256_of_file

# Not compared when a build resumes: what it has written so far, and how it was invoked.
_PROGRESS_KEYS = ("files", "command")


class CacheItems:
    """A training split seen as the cache sees it: per item its image index and caption
    index; per image one item to load it from."""

    def __init__(self, dataset):
        self.dataset = dataset
        captions: Dict[str, int] = {}
        self.item_image: List[int] = []
        self.item_caption: List[int] = []
        self.image_item: Dict[int, int] = {}
        for n, ann in enumerate(dataset.annotation):
            image = int(dataset.img_ids[ann["image_id"]])
            text = dataset.text_processor(ann["caption"])
            self.item_image.append(image)
            self.item_caption.append(captions.setdefault(text, len(captions)))
            self.image_item.setdefault(image, n)
        self.captions = list(captions)
        self.images = sorted(self.image_item)  # image ids, in the order of embedding rows
        row = {g: r for r, g in enumerate(self.images)}
        self.item_row = [row[g] for g in self.item_image]
        self.captions_of_row: List[List[int]] = [[] for _ in self.images]
        for r, c in zip(self.item_row, self.item_caption):
            if c not in self.captions_of_row[r]:
                self.captions_of_row[r].append(c)

    def load_images(self, image_ids: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.dataset[self.image_item[int(g)]]["image"] for g in image_ids])


def _encode(items: CacheItems, encode_images, encode_texts, batch_size: int, device) -> Dict[str, torch.Tensor]:
    t0 = time.time()
    texts = [encode_texts(items.captions[i : i + batch_size]).float().cpu() for i in range(0, len(items.captions), batch_size)]
    images = []
    for i in range(0, len(items.images), batch_size):
        images.append(encode_images(items.load_images(items.images[i : i + batch_size]).to(device)).float().cpu())
        if (i // batch_size) % 50 == 0:
            logging.info("cache-teacher: embedded %d / %d images", min(i + batch_size, len(items.images)), len(items.images))
    logging.info("cache-teacher: embedded %d images, %d captions in %.1fs", len(items.images), len(items.captions),
                 time.time() - t0)
    return {"image": torch.cat(images), "caption": torch.cat(texts)}


def _shard_pairs(items: CacheItems, emb: Dict[str, torch.Tensor], queries: range, top_m: int) -> torch.Tensor:
    """Distinct ``(image row, caption index)`` pairs of one block of queries: each caption
    query with its own image and its top-M others, each image query with its own captions
    and its top-M others."""
    n_items = len(items.item_image)
    pairs = []
    text_queries = [q for q in queries if q < n_items]
    if text_queries:
        cap = torch.tensor([items.item_caption[q] for q in text_queries])
        own = torch.tensor([items.item_row[q] for q in text_queries])
        pairs.append(torch.stack([own, cap], 1))
        m = min(top_m, len(items.images) - 1)
        if m > 0:
            sims = emb["caption"][cap] @ emb["image"].t()
            sims[torch.arange(len(own)), own] = float("-inf")
            top = sims.topk(m, dim=1).indices
            pairs.append(torch.stack([top.reshape(-1), cap.repeat_interleave(m)], 1))
    image_queries = [q - n_items for q in queries if q >= n_items]
    if image_queries:
        rows = torch.tensor(image_queries)
        sims = emb["image"][rows] @ emb["caption"].t()
        for i, r in enumerate(image_queries):
            own = torch.tensor(items.captions_of_row[r])
            sims[i, own] = float("-inf")
            pairs.append(torch.stack([torch.full_like(own, r), own], 1))
        m = min(top_m, sims.shape[1])
        top = sims.topk(m, dim=1)
        keep = torch.isfinite(top.values)  # fewer other captions than M
        pairs.append(torch.stack([rows.repeat_interleave(m)[keep.view(-1)], top.indices.reshape(-1)[keep.view(-1)]], 1))
    return torch.unique(torch.cat(pairs), dim=0)


def build_teacher_cache(
    dataset,
    teacher_logit: Callable[[torch.Tensor, List[str], torch.Tensor], torch.Tensor],
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    encode_texts: Callable[[List[str]], torch.Tensor],
    output: str,
    top_m: int,
    shard_size: int = 512,
    image_chunk: int = 64,
    batch_size: int = 128,
    device: torch.device = torch.device("cpu"),
    settings: Optional[dict] = None,
    teacher_identity: Optional[dict] = None,
    command: Optional[str] = None,
) -> dict:
    """Build, finish or repair a cache under ``output``; returns counts (shards computed and
    skipped, pairs) and the damaged files it rebuilt.

    ``teacher_logit(images, captions, pairs)``: a cross-encoder's logits (``CrossEncoderTeacher.logit``);
    ``encode_images``/``encode_texts``: the fixed dual encoder's unit embeddings. ``settings``
    (teacher config, encoder...) and ``teacher_identity`` (``cache_integrity.teacher_identity``:
    training compares it with its teacher's) are recorded in the manifest; a rerun must match
    them. ``command`` is recorded as the repair a reader of a damaged cache is told to run.
    """
    if top_m < 1 or shard_size < 1:
        raise ValueError(f"--top-m and --shard-size must be >= 1, got {top_m} and {shard_size}")
    os.makedirs(output, exist_ok=True)
    items = CacheItems(dataset)
    num_queries = len(items.item_image) + len(items.images)
    num_shards = (num_queries + shard_size - 1) // shard_size
    old = read_manifest(output)
    manifest = new_manifest(
        num_shards, len(items.captions), num_items=len(items.item_image), num_images=len(items.images),
        top_m=top_m, shard_size=shard_size, settings=settings, teacher=teacher_identity,
        command=command or (old or {}).get("command"), files=(old or {}).get("files"),
    )
    if old is not None:
        diff = sorted(k for k in set(old) | set(manifest) if k not in _PROGRESS_KEYS and old.get(k) != manifest.get(k))
        if diff:
            raise ValueError(
                f"{output!r} holds a teacher cache built with other settings ({diff}); "
                "choose a new --output, or delete it to rebuild"
            )
    damaged: List[str] = []

    def stale(name: str) -> bool:
        """Whether ``name`` must be (re)written: missing, or not the bytes the manifest recorded."""
        problem = file_problem(output, name, manifest)
        if problem is not None and (problem != MISSING or name in manifest["files"]):
            logging.warning("cache-teacher: %s is damaged (%s): rebuilding it", os.path.join(output, name), problem)
            damaged.append(name)
        return problem is not None

    def written(name: str) -> None:
        """Record the checksum of a file just written; until then it counts as not built."""
        manifest["files"][name] = sha256_of_file(os.path.join(output, name))
        write_manifest(output, manifest)

    if stale(CAPTIONS):  # before the manifest: a reader never sees one without its captions
        atomic_json(items.captions, os.path.join(output, CAPTIONS))
        written(CAPTIONS)
    todo = [k for k in range(num_shards) if stale(shard_name(k))]
    stats = {"shards": num_shards, "computed": len(todo), "skipped": num_shards - len(todo), "pairs": 0,
             "damaged": damaged}
    if not todo:
        logging.info("cache-teacher: all %d shards of %s built and verified", num_shards, output)
        return stats
    if stale(EMBEDDINGS):
        with torch.no_grad():
            emb = _encode(items, encode_images, encode_texts, batch_size, device)
        atomic_save(emb, os.path.join(output, EMBEDDINGS))
        written(EMBEDDINGS)
    else:
        emb = torch.load(os.path.join(output, EMBEDDINGS), map_location="cpu", weights_only=True)

    t0 = time.time()
    for done, k in enumerate(todo, 1):
        pairs = _shard_pairs(items, emb, range(k * shard_size, min((k + 1) * shard_size, num_queries)), top_m)
        logits = torch.empty(len(pairs))
        # Pairs grouped by image: each chunk loads and encodes its images once for all their captions.
        order = pairs[:, 0].argsort(stable=True)
        rows, counts = pairs[order, 0].unique_consecutive(return_counts=True)
        start = 0
        for c in range(0, len(rows), image_chunk):
            n = int(counts[c : c + image_chunk].sum())
            sel = order[start : start + n]
            start += n
            chunk_rows, local_image = pairs[sel, 0].unique(return_inverse=True)
            chunk_caps, local_caption = pairs[sel, 1].unique(return_inverse=True)
            images = items.load_images([items.images[r] for r in chunk_rows.tolist()]).to(device)
            local = torch.stack([local_image, local_caption], 1).to(device)
            logits[sel] = teacher_logit(images, [items.captions[i] for i in chunk_caps.tolist()], local).float().cpu()
        image_ids = torch.tensor(items.images)[pairs[:, 0]]
        atomic_save({"image": image_ids, "caption": pairs[:, 1].clone(), "logit": logits}, shard_path(output, k))
        written(shard_name(k))
        stats["pairs"] += len(pairs)
        elapsed = time.time() - t0
        logging.info(
            "cache-teacher: shard %d/%d (%d pairs) done; %d of %d left this run, eta %.0fs",
            k + 1, num_shards, len(pairs), len(todo) - done, len(todo), elapsed / done * (len(todo) - done),
        )
    return stats
