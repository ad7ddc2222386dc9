"""ConaCLIP (Wang et al., ACL 2023 Industry): dual-to-dual distillation over the fully
connected graph of the four encoders {S_img, S_txt, T_img, T_txt}.

- Formulas: one function per edge loss, and :func:`conaclip_loss`, the weighted sum over the
  configured terms (``model.distill.conaclip``). Rows of every feature matrix are the batch's
  samples (unit vectors); ``a``/``b`` are the two ends of an edge. B = batch size.
- :class:`ConaclipObjective`: the teacher is a frozen *dual* encoder; the student owns linear
  maps into the teacher's space (``conaclip_proj``) for the edges that touch a teacher node.
- The ``conaclip`` registry entry.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from lavis_cprd.distill.config import DistillConfig
from lavis_cprd.distill.objective import DistillObjective, DistillResult, Step
from lavis_cprd.distill.registry import DistillLoss, register_loss
from lavis_cprd.losses import contrastive_loss, positive_mask


def infonce_edge_loss(a: torch.Tensor, b: torch.Tensor, pos: torch.Tensor, temp: float) -> torch.Tensor:
    """Symmetric InfoNCE between the two ends of an edge::

        L = 1/2 ( CE(a b^T / temp, y) + CE(b a^T / temp, y^T) )

    the target of row ``i`` uniform over ``pos[i]`` (samples of the same image).
    """
    logits = a.float() @ b.float().t() / temp
    return 0.5 * (contrastive_loss(logits, pos) + contrastive_loss(logits.t(), pos.t()))


def feature_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FD: ``L = 1/B sum_i ||s_i - t_i||^2`` (same modality, same space)."""
    return (student.float() - teacher.float()).pow(2).sum(dim=1).mean()


def similarity_distill_loss(student_sim: torch.Tensor, teacher_sim: torch.Tensor) -> torch.Tensor:
    """SD: ``L = ||S - T||_F^2 / (B C)`` for ``[B, C]`` similarity matrices (``/ B^2`` when square).
    Sym-SD is the same formula with two student matrices as mutual targets, both trained."""
    return (student_sim.float() - teacher_sim.float()).pow(2).mean()


def _row_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``1/B sum_i KL(p_i || q_i)`` from row log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def similarity_kl_loss(student_sim: torch.Tensor, teacher_sim: torch.Tensor, temp: float) -> torch.Tensor:
    """KL: ``L = 1/B sum_i KL( softmax(T_i / temp) || softmax(S_i / temp) )`` over rows."""
    return _row_kl(F.log_softmax(teacher_sim.float() / temp, dim=1), F.log_softmax(student_sim.float() / temp, dim=1))


def sym_similarity_kl_loss(sim_a: torch.Tensor, sim_b: torch.Tensor, temp: float) -> torch.Tensor:
    """Sym-KL: ``L = 1/B sum_i KL(p_i || q_i) + KL(q_i || p_i)``, ``p = softmax(A / temp)``,
    ``q = softmax(B / temp)`` row-wise, both trained."""
    log_p, log_q = F.log_softmax(sim_a.float() / temp, dim=1), F.log_softmax(sim_b.float() / temp, dim=1)
    return _row_kl(log_p, log_q) + _row_kl(log_q, log_p)


def conaclip_loss(
    student: Dict[str, torch.Tensor],
    student_in_teacher_space: Dict[str, torch.Tensor],
    teacher: Dict[str, torch.Tensor],
    pos: torch.Tensor,
    terms: Sequence,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """ConaCLIP's graph loss ``L = sum_e w_e L_e`` over configured edge terms.

    ``student``: ``{"img", "txt"}`` unit features in the student's space (used on student-student
    edges); ``student_in_teacher_space``: the same projected into the teacher's space (used on
    edges that touch a teacher node); ``teacher``: ``{"img", "txt"}``. Each term has ``loss``
    (``infonce``, ``fd``, ``sd``, ``kl``, ``sym_sd``, ``sym_kl``), ``edge`` and ``mirror``
    (pairs of node names), ``weight`` and ``temp``. For ``sd``/``kl`` the target of edge
    ``(A, B)`` is the teacher's similarity between the modalities of ``A`` and ``B``; the
    ``sym_*`` losses make the similarity matrices of ``edge`` and ``mirror`` mutual targets.
    Returns the total and each term's value, keyed ``"loss:A-B"``.
    """

    def feats(edge):
        space = student_in_teacher_space if any(n.startswith("T") for n in edge) else student
        return [teacher[n[2:]] if n.startswith("T") else space[n[2:]] for n in edge]

    def teacher_sim(edge):
        return teacher[edge[0][2:]] @ teacher[edge[1][2:]].t()

    values: Dict[str, torch.Tensor] = {}
    total = pos.new_zeros((), dtype=torch.float32)
    for term in terms:
        a, b = feats(term.edge)
        if term.loss == "infonce":
            value = infonce_edge_loss(a, b, pos, term.temp)
        elif term.loss == "fd":
            value = feature_distill_loss(a, b)
        elif term.loss == "sd":
            value = similarity_distill_loss(a @ b.t(), teacher_sim(term.edge))
        elif term.loss == "kl":
            value = similarity_kl_loss(a @ b.t(), teacher_sim(term.edge), term.temp)
        elif term.loss in ("sym_sd", "sym_kl"):
            c, d = feats(term.mirror)
            if term.loss == "sym_sd":
                value = similarity_distill_loss(a @ b.t(), c @ d.t())  # Sym-SD: both matrices trained
            else:
                value = sym_similarity_kl_loss(a @ b.t(), c @ d.t(), term.temp)
        else:
            raise ValueError(f"ConaCLIP term loss={term.loss!r} has no implementation")
        key = f"{term.loss}:{'-'.join(term.edge)}" + (f"~{'-'.join(term.mirror)}" if term.loss.startswith("sym") else "")
        values[key] = value
        total = total + term.weight * value
    return total, values


class ConaclipObjective(DistillObjective):
    """ConaCLIP's teacher-student edges compare embeddings across the two models: the student's
    features are mapped into the teacher's space by the ``conaclip_proj`` maps the student owns
    (:meth:`student_modules`: identity when the sizes agree; trained with the student and saved
    in its checkpoints). Retrieval uses the student's own space."""

    def __init__(self, cfg: DistillConfig, tokenizer_path: Optional[str] = None):
        super().__init__(cfg, tokenizer_path)
        self.teacher_embed_dim = self.teacher_cls.embed_dim_of(OmegaConf.create(cfg.teacher))

    def student_modules(self, embed_dim: int) -> Dict[str, nn.Module]:
        dim = self.teacher_embed_dim
        return {"conaclip_proj": nn.ModuleDict(
            {m: nn.Identity() if dim == embed_dim else nn.Linear(embed_dim, dim) for m in ("img", "txt")}
        )}

    def loss(self, step: Step) -> DistillResult:
        """ConaCLIP's graph loss on this rank's batch (DDP averages the ranks' gradients)."""
        t_img, t_txt = self.teacher.encode(step.image, step.captions)
        if t_img.shape[1] != self.teacher_embed_dim:
            raise ValueError(
                f"the teacher ({self.cfg.teacher.get('arch')}) embeds in {t_img.shape[1]} dimensions, but its config "
                f"said {self.teacher_embed_dim}: check model.distill.teacher"
            )
        features = {"img": step.image_feat, "txt": step.text_feat}
        proj = step.modules["conaclip_proj"]
        projected = {k: F.normalize(proj[k](v), dim=-1) for k, v in features.items()}
        total, _ = conaclip_loss(
            features, projected, {"img": t_img, "txt": t_txt}, positive_mask(step.image_ids, step.image_ids), self.cfg.conaclip
        )
        return DistillResult(total)


register_loss(DistillLoss(
    "conaclip", "ConaCLIP: graph of feature/similarity losses against a dual-encoder teacher",
    objective=ConaclipObjective, teacher="dual",
    compare_options=("model.distill.teacher.arch=blip_feature_extractor",)))  # the shared teacher's own ITC towers
