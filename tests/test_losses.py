"""Losses against independent, slow, formula-by-formula computations (method.md)."""
import math

import pytest
import torch

from lavis_cprd.distill.losses.cprd import cprd_loss, cprd_loss_per_query
from lavis_cprd.distill.losses.kl import kl_distill_loss
from lavis_cprd.distill.losses.listmle_full import listmle_full_loss
from lavis_cprd.distill.losses.margin_mse import margin_mse_loss
from lavis_cprd.losses import itc_loss


def cprd_reference(x, t, valid=None, keep=None):
    """method.md's CPRD formula, written as loops over python scalars."""
    Q, K = x.shape
    per_query = []
    for q in range(Q):
        kept = [k for k in range(K) if keep is None or keep[q, k]]
        order = sorted(kept, key=lambda k: -float(t[q, k]))  # stable: ties keep mining order
        terms = []
        for j, k in enumerate(order):
            if (valid is None or valid[q, k]) and j < len(order) - 1:
                denom = sum(torch.exp(x[q, order[i]]) for i in range(j, len(order)))
                terms.append(-torch.log(torch.exp(x[q, k]) / denom))
        if terms:
            per_query.append(sum(terms) / len(terms))
    return sum(per_query) / len(per_query) if per_query else x.sum() * 0


def test_cprd_hand_computed_example():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[0.9, 0.5, 0.7]])  # teacher order: n1, n3, n2
    e = math.exp
    expected = 0.5 * (-math.log(e(1) / (e(1) + e(3) + e(2))) - math.log(e(3) / (e(3) + e(2))))
    assert cprd_loss(x, t).item() == pytest.approx(expected, rel=1e-6)


def test_cprd_only_valid_terms_but_full_denominators():
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    t = torch.tensor([[0.8, 0.6, 0.3, 0.1]])
    valid = torch.tensor([[True, True, False, False]])
    e = math.exp
    all4 = e(0.5) + e(-1.0) + e(2.0) + e(0.0)
    expected = 0.5 * (-math.log(e(0.5) / all4) - math.log(e(-1.0) / (all4 - e(0.5))))
    assert cprd_loss(x, t, valid).item() == pytest.approx(expected, rel=1e-6)


def test_cprd_ties_keep_mining_order():
    x = torch.tensor([[3.0, 1.0, 0.0]])
    t = torch.tensor([[0.5, 0.5, 0.5]])  # all tied: order = mining order
    e = math.exp
    expected = 0.5 * (-math.log(e(3) / (e(3) + e(1) + e(0))) - math.log(e(1) / (e(1) + e(0))))
    assert cprd_loss(x, t).item() == pytest.approx(expected, rel=1e-6)
    # Tied with a different mining order gives a different target.
    assert cprd_loss(x.flip(1), t).item() != pytest.approx(expected, rel=1e-3)


def test_cprd_queries_without_two_valid_negatives():
    x = torch.randn(3, 4)
    t = torch.tensor([[0.9, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.9, 0.8, 0.1, 0.1]])
    valid = t >= 0.5
    per_query, contributes = cprd_loss_per_query(x, t, valid)
    # q0: one valid negative at position 1 of 4 -> still a term (it has later candidates).
    assert contributes.tolist() == [True, False, True]
    assert cprd_loss(x, t, valid).item() == pytest.approx(cprd_reference(x, t, valid).item(), rel=1e-5)
    # Only the last position valid: no term at all (j < K excludes it).
    last_only = torch.tensor([[False, False, False, True]])
    t_last = torch.tensor([[0.1, 0.2, 0.3, 0.05]])
    assert cprd_loss_per_query(x[:1], t_last, last_only)[1].tolist() == [False]
    # No query contributes: zero loss, still differentiable.
    x0 = torch.randn(2, 3, requires_grad=True)
    loss = cprd_loss(x0, torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x0.grad == 0)


@pytest.mark.parametrize("seed", range(5))
def test_cprd_matches_slow_loop_values_and_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    Q, K = 6, 7
    x = torch.randn(Q, K, generator=g) * 3
    t = torch.rand(Q, K, generator=g).round(decimals=1)  # coarse: many ties
    valid = torch.rand(Q, K, generator=g) > 0.4  # a general, non-prefix mask
    keep = torch.rand(Q, K, generator=g) > 0.2
    for v, k in [(None, None), (valid, None), (valid, keep), (None, keep)]:
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        fast, slow = cprd_loss(xa, t, v, k), cprd_reference(xb, t, v, k)
        fast.backward()
        slow.backward()
        assert fast.item() == pytest.approx(slow.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


def test_keep_mask_removes_from_denominators():
    x = torch.tensor([[1.0, 5.0, 2.0]])
    t = torch.tensor([[0.9, 0.95, 0.2]])
    keep = torch.tensor([[True, False, True]])  # n2 scored above the positive: dropped
    e = math.exp
    expected = -math.log(e(1) / (e(1) + e(2)))  # one term: n1 vs n3
    assert cprd_loss(x, t, keep_mask=keep).item() == pytest.approx(expected, rel=1e-6)


def test_itc_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    tt = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    ids = torch.tensor([0, 0, 1, 2])
    tau = 0.1
    sim = v @ tt.t() / tau
    pos = ids[:, None] == ids[None, :]

    def ce(logits):
        total = 0.0
        for q in range(4):
            positives = [c for c in range(4) if pos[q, c]]
            logz = math.log(sum(math.exp(float(logits[q, c])) for c in range(4)))
            total += sum(-(float(logits[q, c]) - logz) / len(positives) for c in positives)
        return total / 4

    expected = 0.5 * (ce(sim) + ce(sim.t()))
    assert itc_loss(sim, sim.t(), pos, pos.t()).item() == pytest.approx(expected, rel=1e-5)


def kl_reference(x, z, mask=None, teacher_temp=1.0):
    """KL(softmax(z / T) || softmax(x)) over each row's masked-in candidates, as loops."""
    per_query = []
    for q in range(x.shape[0]):
        cands = [c for c in range(x.shape[1]) if mask is None or mask[q, c]]
        if not cands:
            continue
        zq = [float(z[q, c]) / teacher_temp for c in cands]
        p = [math.exp(v) / sum(math.exp(u) for u in zq) for v in zq]
        denom = sum(torch.exp(x[q, c]) for c in cands)
        per_query.append(sum(pc * (math.log(pc) - torch.log(torch.exp(x[q, c]) / denom)) for pc, c in zip(p, cands)))
    return sum(per_query) / len(per_query)


def margin_mse_reference(xp, xn, zp, zn, mask=None):
    per_query = []
    for q in range(xn.shape[0]):
        terms = [((xp[q] - xn[q, k]) - (zp[q] - zn[q, k])) ** 2 for k in range(xn.shape[1]) if mask is None or mask[q, k]]
        if terms:
            per_query.append(sum(terms) / len(terms))
    return sum(per_query) / len(per_query)


def test_kl_hand_computed_example():
    x = torch.tensor([[0.0, 0.0]])
    z = torch.tensor([[math.log(3.0), 0.0]])  # teacher distribution (3/4, 1/4)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_distill_loss(x, z).item() == pytest.approx(expected, rel=1e-6)
    assert kl_distill_loss(x, z, teacher_temp=1e6).item() == pytest.approx(0.0, abs=1e-6)  # flat teacher
    same = torch.tensor([[5.0, 0.0]])
    assert kl_distill_loss(same, same).item() == pytest.approx(0, abs=1e-6)  # student = teacher


def test_margin_mse_hand_computed_example():
    # student margins 1 - 0 = 1 and 1 - 3 = -2; teacher margins 2 - 0 = 2 and 2 - 1 = 1
    loss = margin_mse_loss(torch.tensor([1.0]), torch.tensor([[0.0, 3.0]]), torch.tensor([2.0]), torch.tensor([[0.0, 1.0]]))
    assert loss.item() == pytest.approx(((1 - 2) ** 2 + (-2 - 1) ** 2) / 2)


def test_listmle_full_hand_computed_example():
    x = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.1, 0.9, 0.5]])  # teacher order: n2, n3, n1
    e = math.exp
    expected = (-math.log(e(2) / (e(2) + e(0.5) + e(1))) - math.log(e(0.5) / (e(0.5) + e(1)))) / 2
    assert listmle_full_loss(x, t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_peer_losses_match_slow_loops_values_and_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    Q, K = 5, 6
    x = torch.randn(Q, K, generator=g) * 3
    z = torch.randn(Q, K, generator=g) * 2
    xp, zp = torch.randn(Q, generator=g), torch.randn(Q, generator=g)
    mask = torch.rand(Q, K, generator=g) > 0.3  # ragged rows, as "all in-batch negatives" gives
    mask[0] = False
    mask[0, 2] = True  # a row with a single candidate
    cases = {
        "kl": (lambda a: kl_distill_loss(a, z, mask, 0.7), lambda b: kl_reference(b, z, mask, 0.7)),
        "kl_full": (lambda a: kl_distill_loss(a, z), lambda b: kl_reference(b, z)),
        "listmle_full": (lambda a: listmle_full_loss(a, z, mask), lambda b: cprd_reference(b, z, None, mask)),
        "margin_mse": (
            lambda a: margin_mse_loss(xp, a, zp, z, mask),
            lambda b: margin_mse_reference(xp, b, zp, z, mask),
        ),
    }
    for name, (fast_fn, slow_fn) in cases.items():
        xa = x.clone().requires_grad_(True)
        xb = x.clone().requires_grad_(True)
        fast, slow = fast_fn(xa), slow_fn(xb)
        fast.backward()
        slow.backward()
        assert fast.item() == pytest.approx(slow.item(), rel=1e-5, abs=1e-6), name
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.all(xa.grad[~mask] == 0) or name == "kl_full", name  # absent candidates get no gradient
