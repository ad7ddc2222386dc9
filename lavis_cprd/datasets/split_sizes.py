"""Start-up checks that the splits a run uses can feed it: none empty, a training split of at
least one batch, at least two pairs in a batch for ITC, more distinct training images than
``num_hard_negatives``. Each would otherwise fail late (LAVIS's ``data_loader for split val is
None`` after a whole epoch; torch's ``num_samples=0``) or train silently on a loss of 0."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

ROLES = (("train", "train_splits"), ("valid", "valid_splits"), ("test", "test_splits"))


def _files(dcfg, split: str) -> List[str]:
    storage = dcfg.get("build_info", {}).get("annotations", {}).get(split, {}).get("storage", None)
    return [storage] if isinstance(storage, str) else list(storage or [])


def _sources(datasets_cfg, datasets: Mapping[str, Mapping], split: str) -> str:
    """Where a split came from, for messages: ``datasets.NAME (its annotation files)``."""
    return "; ".join(f"datasets.{name} ({', '.join(_files(datasets_cfg[name], split)) or 'generated'})"
                     for name, splits in datasets.items() if split in splits)


def check_split_sizes(datasets: Mapping[str, Mapping], cfg, world_size: int = 1) -> Optional[int]:
    """Raise a ``ValueError`` naming the split, its files and the key when a split the run uses
    cannot feed it; return the number of distinct training images (None when not training)."""
    run = cfg.run_cfg
    training = not bool(run.get("evaluate", False))
    batch = int(run.get("batch_size_train", 1)) * world_size
    if training and list(run.get("train_splits", [])) and batch < 2:
        raise ValueError(
            f"run.batch_size_train={run.get('batch_size_train')} (x world size {world_size}): ITC contrasts each "
            "pair with the other pairs of its batch; with one pair per batch there are none and the loss is 0. "
            "Use a batch of at least 2"
        )
    images: Optional[int] = None
    for role, key in ROLES:
        if role == "train" and not training:
            continue
        for split in run.get(key, []) or []:
            parts = {name: splits[split] for name, splits in datasets.items() if split in splits}
            if not parts:
                raise ValueError(f"run.{key} lists {split!r}, but no dataset has that split "
                                 f"(they have: { {n: sorted(s) for n, s in datasets.items()} })")
            size = sum(len(d) for d in parts.values())
            where = f"split {split!r} (run.{key}) of {_sources(cfg.datasets_cfg, datasets, split)}"
            if size == 0:
                raise ValueError(f"{where} is empty: no entries (after any left out as bad). Add entries, or "
                                 f"remove {split!r} from run.{key}")
            if role == "train":
                if size < batch:
                    raise ValueError(
                        f"{where} has {size} items, fewer than one batch (run.batch_size_train="
                        f"{run.get('batch_size_train')} x world size {world_size}): training drops incomplete "
                        "batches, so no step would run. Lower run.batch_size_train or add items"
                    )
                images = (images or 0) + sum(_distinct_images(d) for d in parts.values())
    return images


def _distinct_images(dataset) -> int:
    ids: Optional[Dict] = getattr(dataset, "img_ids", None)  # LAVIS's retrieval training splits
    if ids is not None:
        return len(ids)
    return len({ann.get("image") for ann in getattr(dataset, "annotation", [])}) or len(dataset)


def check_hard_negatives(num_hard_negatives: int, batch: int, train_images: Optional[int]) -> None:
    """A query's K hard negatives are other images of its gathered batch (``batch``: the batch
    size x world size; 0 when unknown): a batch of K or fewer, or a split of K or fewer
    distinct images, never has K of them."""
    if batch and num_hard_negatives >= batch:
        raise ValueError(
            f"model.distill.num_hard_negatives (K={num_hard_negatives}) must be smaller than "
            f"the gathered batch size (run.batch_size_train x world size = {batch})"
        )
    if train_images is not None and num_hard_negatives >= train_images:
        raise ValueError(
            f"model.distill.num_hard_negatives (K={num_hard_negatives}) must be smaller than the training split's "
            f"number of distinct images ({train_images}): no query could ever have K negatives"
        )
