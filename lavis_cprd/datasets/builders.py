"""Dataset builders registered into LAVIS: ``cprd_shapes`` (the embedded default)."""
from __future__ import annotations

import json
import logging
import os

from lavis.common.dist_utils import is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset
import torch.distributed as dist

from lavis_cprd.datasets.shapes import ShapesSpec, generate

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "datasets")


@registry.register_builder("cprd_shapes")
class ShapesBuilder(BaseDatasetBuilder):
    """Generates the synthetic shapes dataset under LAVIS's cache root (once per parameter
    set: ``datasets.cprd_shapes.generator``), then builds LAVIS retrieval datasets on it."""

    train_dataset_cls = RetrievalDataset
    eval_dataset_cls = RetrievalEvalDataset
    DATASET_CONFIG_DICT = {"default": os.path.join(_CONFIG_DIR, "cprd_shapes.yaml")}

    def spec(self) -> ShapesSpec:
        params = dict(self.config.get("generator", {}) or {})
        valid = set(ShapesSpec.__dataclass_fields__)
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ValueError(f"unknown key(s) datasets.cprd_shapes.generator.{unknown}; valid keys: {sorted(valid)}")
        return ShapesSpec(**params)

    def build_datasets(self):
        spec = self.spec()
        root = os.path.join(registry.get_path("cache_root"), "cprd_shapes", spec.key)
        done = os.path.join(root, "DONE")
        if is_main_process() and not os.path.isfile(done):
            logging.info("Generating cprd_shapes %s into %s", spec, root)
            generate(root, spec)
            with open(done, "w") as f:
                json.dump(spec.__dict__, f)
        if is_dist_avail_and_initialized():
            dist.barrier()
        for split in ("train", "val", "test"):
            path = os.path.join(root, "annotations", f"{split}.json")
            self.config.build_info.annotations[split] = {"url": path, "storage": path}
        self.config.build_info.images.storage = root
        return self.build()
