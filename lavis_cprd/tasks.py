"""``cprd_retrieval``: LAVIS's retrieval task, trained through the distilling model's forward."""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Dict, List

from lavis.common.dist_utils import get_world_size
from lavis.common.registry import registry
from lavis.common.utils import get_cache_path, is_url
from lavis.tasks.retrieval import RetrievalTask

# Loss terms the model returns next to ``loss``; their epoch means go to log.txt.
_LOGGED_TERMS = ("loss_itc", "loss_distill", "valid_negatives", "teacher_cache_hit_rate")


@registry.register_task("cprd_retrieval")
class CprdRetrievalTask(RetrievalTask):
    """Training: ``model(samples).loss`` (ITC + distillation). Evaluation: LAVIS's
    ``RetrievalTask.evaluation`` (``model.compute_sim_matrix`` + ``_report_metrics``), so the
    metric keys are LAVIS's: ``txt_r1 ... img_r10, r_mean, agg_metrics``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self._epoch_terms: Dict[str, List[float]] = defaultdict(list)

    # ----------------------------------------------------------------- building
    def build_datasets(self, cfg):
        for name, dcfg in cfg.datasets_cfg.items():
            check_annotation_files(name, dcfg)
        datasets = super().build_datasets(cfg)
        for name, splits in datasets.items():
            if cfg.datasets_cfg[name].get("check_images", True):
                for split, dataset in splits.items():
                    check_image_files(name, split, dataset)
        return datasets

    def build_model(self, cfg):
        model = super().build_model(cfg)
        distill = getattr(model, "distill", None)
        batch = int(cfg.run_cfg.get("batch_size_train", 0)) * get_world_size()
        if distill is not None and distill.needs_teacher and batch and distill.num_hard_negatives >= batch:
            raise ValueError(
                f"model.distill.num_hard_negatives (K={distill.num_hard_negatives}) must be smaller than "
                f"the gathered batch size (run.batch_size_train x world size = {batch})"
            )
        return model

    # ----------------------------------------------------------------- training
    def train_step(self, model, samples):
        output = model(samples)
        for term in _LOGGED_TERMS:
            value = output.get(term) if hasattr(output, "get") else None
            if value is not None:
                self._epoch_terms[term].append(float(value))
        return output["loss"]

    def train_epoch(self, epoch, model, **kwargs):  # LAVIS's runner passes keywords
        unwrapped = getattr(model, "module", model)  # DDP wraps the model
        if hasattr(unwrapped, "set_epoch"):
            unwrapped.set_epoch(epoch)
        self._epoch_terms.clear()
        stats = super().train_epoch(epoch=epoch, model=model, **kwargs)
        for term, values in self._epoch_terms.items():
            stats[term] = "{:.4f}".format(sum(values) / len(values))
        logging.info("Epoch means: %s", {k: stats[k] for k in self._epoch_terms})
        return stats


def _as_list(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def check_annotation_files(name: str, dcfg) -> None:
    """Fail before LAVIS tries to download: every local annotation file must exist."""
    annotations = dcfg.get("build_info", {}).get("annotations", {})
    for split, info in annotations.items():
        urls, storages = _as_list(info.get("url")), _as_list(info.get("storage"))
        for i, storage in enumerate(storages):
            path = storage if os.path.isabs(storage) else get_cache_path(storage)
            if os.path.isfile(path):
                continue
            url = urls[i] if i < len(urls) else None
            if url and (is_url(url) or os.path.isfile(url)):
                continue  # LAVIS downloads or copies it
            raise FileNotFoundError(
                f"datasets.{name}.build_info.annotations.{split}: annotation file {path!r} does not exist"
                + (f" (and url {url!r} is neither a URL nor a file)" if url else "")
            )


def check_image_files(name: str, split: str, dataset, show: int = 3) -> None:
    """Every image an annotation names must exist under the split's image root."""
    annotation = getattr(dataset, "annotation", None)
    vis_root = getattr(dataset, "vis_root", None)
    if annotation is None or vis_root is None:
        return
    images = sorted({ann["image"] for ann in annotation if "image" in ann})
    missing = [p for p in images if not os.path.isfile(os.path.join(vis_root, p))]
    if missing:
        raise FileNotFoundError(
            f"datasets.{name} split {split!r}: {len(missing)} of {len(images)} image files do not exist "
            f"under {vis_root!r}, e.g. {missing[:show]} (set datasets.{name}.build_info.images.storage)"
        )
