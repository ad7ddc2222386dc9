"""Dataset builders registered into LAVIS: ``cprd_shapes`` (the embedded default)."""
from __future__ import annotations

import json
import logging
import os
import random

from lavis.common.dist_utils import is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.datasets.retrieval_datasets import RetrievalDataset, RetrievalEvalDataset
import torch.distributed as dist

from lavis_cprd.datasets.shapes import ShapesSpec, generate
from lavis_cprd.datasets.shapes_truth import hard_false_caption, lookalike_caption, other_true_caption, relevance
from lavis_cprd.paths import DATASET_CONFIGS


class ShapesTrainDataset(RetrievalDataset):
    """LAVIS's ``RetrievalDataset``, plus verified-false captions for a cross-encoder's ITM
    (``cprd_blip_retrieval``), drawn anew each time:

    - ``lookalike_negatives``: ``lookalike_text``, a minimal edit of the caption that is false
      of its scene;
    - ``verified_negatives``: ``negative_text``, the most relevant caption false of the scene
      among ``NEGATIVE_DRAWS`` random train captions (a generator-checked hard negative: under
      partial captions, an in-batch "negative" is often true of the image),
      ``random_negative_text``, the first false one (a random, mostly easy negative), and
      ``positive_text``, one of those captions that is true of the scene (another image's).
    An unedited caption (no false one found) is marked by an equal string; the model skips it.
    Each false caption comes with its graded relevance to the scene (``lookalike_grade``,
    ``negative_grade``, ``random_negative_grade``: the fraction of its facts that hold), which
    ``cprd_blip_retrieval``'s ``itm_targets: graded`` trains towards."""

    lookalike_negatives = False
    verified_negatives = False
    NEGATIVE_DRAWS = 16

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        ann = self.annotation[index]
        if self.lookalike_negatives:
            text = lookalike_caption(ann["caption"], ann["scene"], random) or ann["caption"]
            sample["lookalike_text"] = self.text_processor(text)
            sample["lookalike_grade"] = relevance(text, ann["scene"])
        if self.verified_negatives:
            draws = [a["caption"] for a in random.choices(self.annotation, k=self.NEGATIVE_DRAWS)]
            grades = [relevance(c, ann["scene"]) for c in draws]  # parsed once per draw, read three times
            false = [(c, rel) for c, rel in zip(draws, grades) if rel < 1.0]
            hardest = hard_false_caption(draws, ann["scene"], grades)
            positive = other_true_caption(draws, ann["scene"], ann["caption"], grades)
            sample["negative_text"] = self.text_processor(hardest or ann["caption"])
            sample["negative_grade"] = grades[draws.index(hardest)] if hardest is not None else 1.0
            sample["random_negative_text"] = self.text_processor(false[0][0] if false else ann["caption"])
            sample["random_negative_grade"] = false[0][1] if false else 1.0
            sample["positive_text"] = self.text_processor(positive or ann["caption"])
        return sample



@registry.register_builder("cprd_shapes")
class ShapesBuilder(BaseDatasetBuilder):
    """Generates the synthetic shapes dataset under LAVIS's cache root (once per parameter
    set: ``datasets.cprd_shapes.generator``), then builds LAVIS retrieval datasets on it.
    ``datasets.cprd_shapes.lookalike_negatives`` / ``verified_negatives: true`` add verified
    false captions to the train samples (:class:`ShapesTrainDataset`)."""

    train_dataset_cls = ShapesTrainDataset
    eval_dataset_cls = RetrievalEvalDataset
    DATASET_CONFIG_DICT = {"default": os.path.join(DATASET_CONFIGS, "cprd_shapes.yaml")}

    def spec(self) -> ShapesSpec:
        return ShapesSpec.from_config(self.config.get("generator", None))

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
        datasets = self.build()
        if "train" in datasets:
            datasets["train"].lookalike_negatives = bool(self.config.get("lookalike_negatives", False))
            datasets["train"].verified_negatives = bool(self.config.get("verified_negatives", False))
        return datasets
