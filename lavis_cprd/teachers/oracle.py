"""``shapes_oracle``: a perfect teacher for ``cprd_shapes``, read from the scene specs.

It scores a pair by the graded relevance of the caption to the image's scene (the fraction of
the caption's facts that hold, ``datasets.shapes_truth``): 1 for a true match, and a lower
value the less of the caption holds. It reads ground truth, not pixels, so it is the upper
bound of what a teacher can give on that data; it is never a default teacher.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch
from omegaconf import open_dict

from lavis_cprd.datasets.shapes_truth import CaptionParseError, relevance, scenes_by_image_id
from lavis_cprd.teachers.base import CrossEncoderTeacher
from lavis_cprd.teachers.registry import register_teacher


@register_teacher("shapes_oracle")
class ShapesOracleTeacher(CrossEncoderTeacher):
    """The ground truth of cprd_shapes as a cross-encoder: the upper bound of what a teacher can give.

    Config: ``annotations`` (the cprd_shapes train annotation file; the ``cprd_retrieval``
    task fills it in from the dataset it built), ``eps`` (match probabilities are clipped to
    ``[eps, 1 - eps]``, so teacher logits stay finite: ``log((1 - eps) / eps)`` at most)."""

    needs_image_ids = True

    def __init__(self, scenes: dict, eps: float = 0.02):
        if not 0 < eps < 0.5:
            raise ValueError(f"teacher eps must be in (0, 0.5), got {eps}")
        self.scenes = scenes
        self.eps = float(eps)
        self.precision, self.batch_size = "fp32", 0
        self.model = torch.nn.Identity()  # nothing to run: FrozenTeacher's model slot
        self._device = torch.device("cpu")

    @classmethod
    def from_config(cls, cfg, tokenizer_path: Optional[str] = None) -> "ShapesOracleTeacher":
        path = cfg.get("annotations", None)
        if not path:
            raise ValueError(
                "model.distill.teacher.annotations is not set: shapes_oracle reads scene specs from cprd_shapes "
                "annotations (the cprd_retrieval task sets it when the dataset is cprd_shapes)"
            )
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model.distill.teacher.annotations={path!r} does not exist")
        with open(path) as f:
            annotation = json.load(f)
        try:
            scenes = scenes_by_image_id(annotation)
        except ValueError as e:
            raise ValueError(f"shapes_oracle: {path}: {e}") from None
        return cls(scenes, eps=float(cfg.get("eps", 0.02)))

    @classmethod
    def for_annotation(cls, annotation: List[dict], eps: float = 0.02) -> "ShapesOracleTeacher":
        """An oracle over an in-memory annotation list (e.g. an eval split: ids = positions)."""
        return cls(scenes_by_image_id(annotation), eps=eps)

    def to(self, device):
        self._device = torch.device(device)
        return self

    @property
    def device(self) -> torch.device:
        return self._device

    def _match_logits(self, images, captions, pairs):  # pragma: no cover - needs_image_ids routes around it
        raise ValueError("shapes_oracle needs image ids")

    def _match_logits_by_id(self, images, captions, pairs, image_ids) -> torch.Tensor:
        if image_ids is None:
            raise ValueError("shapes_oracle scores pairs by dataset image id: pass image_ids (one per image row)")
        ids = image_ids.view(-1).tolist()
        probs = []
        for i, j in pairs.tolist():
            scene = self.scenes.get(int(ids[i]))
            if scene is None:
                raise ValueError(f"shapes_oracle: image id {ids[i]} is not in its annotations (other data?)")
            try:
                p = relevance(captions[j], scene)
            except CaptionParseError as e:
                raise ValueError(f"shapes_oracle only knows cprd_shapes captions: {e}") from None
            probs.append(min(max(p, self.eps), 1.0 - self.eps))
        p = torch.tensor(probs, dtype=torch.float32, device=images.device)
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)  # softmax(.)[:, 1] = p


def fill_oracle_annotations(cfg) -> None:
    """A ``shapes_oracle`` teacher reads the scene specs of the training annotations it scores:
    point it at those of the (already built) ``cprd_shapes`` dataset unless it names a file."""
    distill = cfg.model_cfg.get("distill", None)
    teacher = distill.get("teacher", None) if distill is not None else None
    if teacher is None or teacher.get("arch", None) != "shapes_oracle" or teacher.get("annotations", None):
        return
    if "cprd_shapes" not in cfg.datasets_cfg:
        raise ValueError(
            f"model.distill.teacher.arch=shapes_oracle reads cprd_shapes scene specs, but the datasets are "
            f"{list(cfg.datasets_cfg)}: set model.distill.teacher.annotations, or use another teacher"
        )
    train = cfg.datasets_cfg.cprd_shapes.build_info.annotations.get("train", None)
    path = train.get("storage", None) if train is not None else None
    if not path:
        raise ValueError("shapes_oracle: the cprd_shapes train annotations were not built before the model")
    with open_dict(teacher):
        teacher.annotations = path
