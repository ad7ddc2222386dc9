"""Losses of lavis-cprd: pure functions over tensors.

Every formula follows ``shared/method.md`` (the project's method reference). The model reads
the ``*_per_query`` forms (``distill.registry``); ``cprd_loss``, ``listmle_full_loss``,
``kl_distill_loss`` and ``margin_mse_loss`` are their means over contributing queries, for use
outside a student (evaluation scripts, other trainers). Shapes:
``Q`` queries, ``K`` hard negatives per query, ``C`` candidates. Student logits are
similarities divided by the learnable temperature (``s / tau``).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Stands in for -inf when a candidate is removed from a denominator: exp() of it is 0, but
# unlike -inf it keeps logcumsumexp's backward free of NaN (inf - inf).
_REMOVED = -1e9


def positive_mask(query_ids: torch.Tensor, cand_ids: torch.Tensor) -> torch.Tensor:
    """``pos[q, c] = (query_ids[q] == cand_ids[c])``: candidates sharing the query's image id."""
    return query_ids.view(-1, 1) == cand_ids.view(1, -1)


def contrastive_loss(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target uniform over the positives of each row.

    ``L = mean_q  -sum_c y[q,c] log softmax(logits[q])[c]``,  ``y[q] = pos[q] / |pos[q]|``.
    """
    pos = pos.to(logits.dtype)
    targets = pos / pos.sum(dim=1, keepdim=True).clamp(min=1)
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    logits_i2t: torch.Tensor,
    logits_t2i: torch.Tensor,
    pos_i2t: torch.Tensor,
    pos_t2i: torch.Tensor,
) -> torch.Tensor:
    """Image-text contrastive loss (BLIP's ITC without momentum encoder).

    ``L_itc = 1/2 (CE(s(I,T)/tau, y) + CE(s(T,I)/tau, y))``, the target of each query uniform
    over its positives (all candidates with the same ``image_id``).
    """
    return 0.5 * (contrastive_loss(logits_i2t, pos_i2t) + contrastive_loss(logits_t2i, pos_t2i))


def cprd_loss_per_query(
    student_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    valid_mask: Optional[torch.Tensor] = None,
    keep_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-query CPRD loss ``L_q`` and whether query ``q`` contributes (``J_q`` non-empty).

    With ``pi`` the teacher order (descending score, ties kept in mining order) and
    ``x_k = s(q, n_k) / tau``::

        L_q = 1/|J_q| sum_{j in J_q} -log( exp(x_pi(j)) / sum_{l >= j} exp(x_pi(l)) )
        J_q = { j valid : j is not the last position }

    ``keep_mask`` (``drop_above_positive``) removes positions entirely, from terms and
    denominators, before ranking; "last position" then means the last kept one.
    Inputs are ``[Q, K]`` in mining order; computed in float32.
    """
    x = student_logits.float()
    t = teacher_scores.to(x.device).float()
    valid = torch.ones_like(x, dtype=torch.bool) if valid_mask is None else valid_mask.bool()
    keep = torch.ones_like(x, dtype=torch.bool) if keep_mask is None else keep_mask.bool()

    # Removed candidates go to the end of the teacher order, so they never sit above a kept one.
    sort_key = t.masked_fill(~keep, float("-inf"))
    order = torch.sort(sort_key, dim=1, descending=True, stable=True).indices
    x_sorted = x.gather(1, order)
    valid_sorted = valid.gather(1, order)
    keep_sorted = keep.gather(1, order)

    x_kept = x_sorted.masked_fill(~keep_sorted, _REMOVED)
    # log sum_{l >= j} exp(x_pi(l)): a reversed cumulative logsumexp.
    suffix_lse = torch.logcumsumexp(x_kept.flip(1), dim=1).flip(1)
    kept_after = keep_sorted.flip(1).long().cumsum(1).flip(1) - keep_sorted.long()
    in_j = valid_sorted & keep_sorted & (kept_after > 0)

    terms = (suffix_lse - x_sorted) * in_j
    count = in_j.sum(dim=1)
    per_query = terms.sum(dim=1) / count.clamp(min=1)
    return per_query, count > 0


def cprd_loss(
    student_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    valid_mask: Optional[torch.Tensor] = None,
    keep_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Contrastive partial ranking distillation: mean of ``L_q`` over contributing queries.

    See :func:`cprd_loss_per_query` for ``L_q``. Queries with empty ``J_q`` contribute
    nothing; if no query contributes the loss is 0 (still attached to the graph).
    """
    return _masked_mean(*cprd_loss_per_query(student_logits, teacher_scores, valid_mask, keep_mask))


def _masked_mean(per_query: torch.Tensor, contributes: torch.Tensor) -> torch.Tensor:
    n = contributes.sum()
    if n == 0:
        return per_query.sum() * 0.0
    return (per_query * contributes).sum() / n


def listmle_full_loss_per_query(
    student_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    candidate_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full ranking distillation (ListMLE over the teacher's order of *every* candidate)::

        L_q = 1/(M_q - 1) sum_{j < M_q} -log( exp(x_pi(j)) / sum_{l >= j} exp(x_pi(l)) )

    the CPRD formula with every position valid; ``candidate_mask`` marks the ``M_q`` real
    candidates of a ragged row (the rest are left out of terms and denominators).
    """
    return cprd_loss_per_query(student_logits, teacher_scores, valid_mask=None, keep_mask=candidate_mask)


def listmle_full_loss(student_logits, teacher_scores, candidate_mask=None) -> torch.Tensor:
    """Mean of :func:`listmle_full_loss_per_query` over queries with at least two candidates."""
    return _masked_mean(*listmle_full_loss_per_query(student_logits, teacher_scores, candidate_mask))


def kl_distill_loss_per_query(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    candidate_mask: Optional[torch.Tensor] = None,
    teacher_temp: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logit distillation over one candidate list per query (positive and negatives)::

        L_q = KL( softmax(z_q / T_t) || softmax(x_q) ) = sum_c p_c (log p_c - log softmax(x_q)_c)

    ``z`` are teacher logits ``log p1 - log p0``, ``x`` student logits ``s / tau``, ``T_t`` the
    teacher temperature. Masked-out candidates take part in neither softmax. Vanilla ``kl``
    uses every in-batch candidate, ``loopitr`` the positive and the K mined hard negatives.
    """
    x = student_logits.float()
    z = teacher_logits.to(x.device).float()
    mask = torch.ones_like(x, dtype=torch.bool) if candidate_mask is None else candidate_mask.bool()
    log_q = F.log_softmax(x.masked_fill(~mask, _REMOVED), dim=1)
    log_p = F.log_softmax((z / teacher_temp).masked_fill(~mask, _REMOVED), dim=1)
    terms = (log_p.exp() * (log_p - log_q)).masked_fill(~mask, 0.0)
    return terms.sum(dim=1), mask.sum(dim=1) > 0


def kl_distill_loss(student_logits, teacher_logits, candidate_mask=None, teacher_temp: float = 1.0) -> torch.Tensor:
    """Mean of :func:`kl_distill_loss_per_query` over queries (``kl`` and ``loopitr``)."""
    return _masked_mean(*kl_distill_loss_per_query(student_logits, teacher_logits, candidate_mask, teacher_temp))


def margin_mse_loss_per_query(
    student_pos: torch.Tensor,
    student_neg: torch.Tensor,
    teacher_pos: torch.Tensor,
    teacher_neg: torch.Tensor,
    candidate_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Margin-MSE (Hofstätter et al.; sentence-transformers' ``MarginMSELoss``)::

        L_q = 1/|N_q| sum_{n in N_q} ( (x_pos - x_n) - (z_pos - z_n) )^2

    with student logits ``x`` (``s / tau``) and teacher logits ``z`` of the query's positive
    ``[Q]`` and its hard negatives ``[Q, K]``.
    """
    xp, xn = student_pos.float(), student_neg.float()
    zp, zn = teacher_pos.to(xp.device).float(), teacher_neg.to(xp.device).float()
    mask = torch.ones_like(xn, dtype=torch.bool) if candidate_mask is None else candidate_mask.bool()
    sq = ((xp.view(-1, 1) - xn) - (zp.view(-1, 1) - zn)).pow(2).masked_fill(~mask, 0.0)
    count = mask.sum(dim=1)
    return sq.sum(dim=1) / count.clamp(min=1), count > 0


def margin_mse_loss(student_pos, student_neg, teacher_pos, teacher_neg, candidate_mask=None) -> torch.Tensor:
    """Mean of :func:`margin_mse_loss_per_query` over queries."""
    return _masked_mean(*margin_mse_loss_per_query(student_pos, student_neg, teacher_pos, teacher_neg, candidate_mask))


# ---------------------------------------------------------------------------------------------
# ConaCLIP (dual-to-dual): edge losses of the fully connected graph over the four encoders
# {S_img, S_txt, T_img, T_txt}. Rows of every feature matrix are the batch's samples (unit
# vectors); ``a``/``b`` are the two ends of an edge, hats the teacher's nodes of the same
# modalities. B = batch size.
# ---------------------------------------------------------------------------------------------
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
