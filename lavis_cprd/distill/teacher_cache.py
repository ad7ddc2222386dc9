"""Teacher-score cache: cross-encoder logits precomputed for each training item against its
top-M candidates under a fixed dual encoder, read by the training step instead of running
the teacher.

Layout of a cache folder (``lavis-cprd cache-teacher``)::

    manifest.json     settings the cache was built with (checked on resume)
    captions.json     the distinct processed captions; shards refer to them by index
    embeddings.pt     the fixed encoder's image and caption embeddings (reused on resume)
    shard_00000.pt    {"image": [P], "caption": [P], "logit": [P]} for one block of queries

Queries are every caption (against its own image and its top-M other images) and every image
(against its own captions and its top-M other captions). Each shard covers ``shard_size``
queries, is written to a temporary file and renamed, so an interrupted build leaves only
whole shards and a rerun computes just the missing ones.

Keys are ``(image_id, caption text)``: ``image_id`` as the training dataset hands it to the
model (LAVIS's per-split image index) and the caption after the split's text processor.
Images are scored as the split's ``vis_processor`` returns them; with random augmentation
the cached logit belongs to one view, while online scoring sees the step's view.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lavis_cprd.checkpoints import atomic_json, atomic_save

CACHE_VERSION = 1
MANIFEST, CAPTIONS, EMBEDDINGS = "manifest.json", "captions.json", "embeddings.pt"


def shard_path(root: str, index: int) -> str:
    return os.path.join(root, f"shard_{index:05d}.pt")


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

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, root: str) -> "TeacherScoreCache":
        """Every finished shard under ``root`` (a partial build is usable: misses are scored online)."""
        manifest = _read_manifest(root)
        if manifest is None:
            raise FileNotFoundError(
                f"model.distill.teacher_cache={root!r}: no {MANIFEST} there; build one with `lavis-cprd cache-teacher`"
            )
        with open(os.path.join(root, CAPTIONS)) as f:
            captions = json.load(f)
        done = [k for k in range(manifest["num_shards"]) if os.path.isfile(shard_path(root, k))]
        if len(done) < manifest["num_shards"]:
            logging.warning("teacher cache %s: %d of %d shards built; misses are scored online", root,
                            len(done), manifest["num_shards"])
        shards = [torch.load(shard_path(root, k), map_location="cpu", weights_only=True) for k in done]
        empty = {"image": torch.zeros(0, dtype=torch.long), "caption": torch.zeros(0, dtype=torch.long),
                 "logit": torch.zeros(0)}
        image_ids, caption_ids, logits = (torch.cat([empty[k]] + [s[k] for s in shards]) for k in ("image", "caption", "logit"))
        cache = cls(captions, image_ids, caption_ids, logits, root=root)
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


def _read_manifest(root: str) -> Optional[dict]:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


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

    def save(self, root: str, settings: Optional[dict] = None) -> int:
        """Write (or rewrite) ``root`` as a one-shard cache of every pair recorded so far, the
        records of all ranks merged; returns its number of distinct pairs. Call it on every rank."""
        from lavis_cprd import distributed

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
            # before the manifest, so a reader never sees a shard whose captions are missing.
            atomic_json(list(captions), os.path.join(root, CAPTIONS))
            atomic_save({"image": cache.keys // cache.num_captions, "caption": cache.keys % cache.num_captions,
                         "logit": cache.logits}, shard_path(root, 0))
            atomic_json({"version": CACHE_VERSION, "num_shards": 1, "recorded": True, "num_pairs": len(cache),
                         "num_captions": len(captions), "settings": settings or {}}, os.path.join(root, MANIFEST))
        return len(cache)


# --------------------------------------------------------------------------- building
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
) -> dict:
    """Build (or finish) a cache under ``output``; returns counts: shards computed/skipped, pairs.

    ``teacher_logit(images, captions, pairs)``: a cross-encoder's logits (``CrossEncoderTeacher.logit``);
    ``encode_images``/``encode_texts``: the fixed dual encoder's unit embeddings. ``settings``
    (teacher config, encoder...) is recorded in the manifest; a rerun must match it.
    """
    if top_m < 1 or shard_size < 1:
        raise ValueError(f"--top-m and --shard-size must be >= 1, got {top_m} and {shard_size}")
    os.makedirs(output, exist_ok=True)
    items = CacheItems(dataset)
    num_queries = len(items.item_image) + len(items.images)
    num_shards = (num_queries + shard_size - 1) // shard_size
    manifest = {
        "version": CACHE_VERSION, "top_m": int(top_m), "shard_size": int(shard_size), "num_shards": num_shards,
        "num_items": len(items.item_image), "num_images": len(items.images), "num_captions": len(items.captions),
        "settings": settings or {},
    }
    old = _read_manifest(output)
    if old is not None and old != manifest:
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        raise ValueError(
            f"{output!r} holds a teacher cache built with other settings ({diff}); "
            "choose a new --output, or delete it to rebuild"
        )
    if old is None:
        atomic_json(items.captions, os.path.join(output, CAPTIONS))
        atomic_json(manifest, os.path.join(output, MANIFEST))

    todo = [k for k in range(num_shards) if not os.path.isfile(shard_path(output, k))]
    stats = {"shards": num_shards, "computed": len(todo), "skipped": num_shards - len(todo), "pairs": 0}
    if not todo:
        logging.info("cache-teacher: all %d shards of %s already built", num_shards, output)
        return stats
    emb_path = os.path.join(output, EMBEDDINGS)
    if os.path.isfile(emb_path):
        emb = torch.load(emb_path, map_location="cpu", weights_only=True)
    else:
        with torch.no_grad():
            emb = _encode(items, encode_images, encode_texts, batch_size, device)
        atomic_save(emb, emb_path)

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
        stats["pairs"] += len(pairs)
        elapsed = time.time() - t0
        logging.info(
            "cache-teacher: shard %d/%d (%d pairs) done; %d of %d left this run, eta %.0fs",
            k + 1, num_shards, len(pairs), len(todo) - done, len(todo), elapsed / done * (len(todo) - done),
        )
    return stats
