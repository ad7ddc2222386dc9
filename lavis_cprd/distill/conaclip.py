"""ConaCLIP's objective: the graph of edge losses between the student's and a frozen dual
encoder teacher's image and text features (``distill.conaclip`` terms)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lavis_cprd.distill.config import DistillConfig
from lavis_cprd.distill.objective import DistillObjective, Step
from lavis_cprd.losses import conaclip_loss, positive_mask


class ConaclipObjective(DistillObjective):
    """ConaCLIP's teacher-student edges compare embeddings across the two models: the student's
    features are mapped into the teacher's space by the student's ``conaclip_proj`` (identity
    when the sizes agree; it is trained with the student and saved in its checkpoints)."""

    def __init__(self, cfg: DistillConfig, tokenizer_path: Optional[str] = None):
        super().__init__(cfg, tokenizer_path)
        self.teacher_embed_dim = self.teacher_cls.embed_dim_of(OmegaConf.create(cfg.teacher))

    def loss(self, step: Step, student) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """ConaCLIP's graph loss on this rank's batch (DDP averages the ranks' gradients)."""
        t_img, t_txt = self.teacher.encode(step.image, step.captions)
        if t_img.shape[1] != self.teacher_embed_dim:
            raise ValueError(
                f"the teacher ({self.cfg.teacher.get('arch')}) embeds in {t_img.shape[1]} dimensions, but its config "
                f"said {self.teacher_embed_dim}: check model.distill.teacher"
            )
        features = {"img": step.image_feat, "txt": step.text_feat}
        projected = {k: F.normalize(student.conaclip_proj[k](v), dim=-1) for k, v in features.items()}
        total, _ = conaclip_loss(
            features, projected, {"img": t_img, "txt": t_txt}, positive_mask(step.image_ids, step.image_ids), self.cfg.conaclip
        )
        return total, None
