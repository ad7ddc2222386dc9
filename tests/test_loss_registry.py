"""A loss of one's own is one ``register_loss`` entry: the config accepts its name, the student
builds the objective the entry names, and a training step computes the entry's formula (checked
against an independent computation) and moves the weights by its gradient."""
import pytest
import torch

from conftest import tiny_model_cfg
from lavis_cprd.distill import registry
from lavis_cprd.distill.config import DistillConfig
from lavis_cprd.distill.objective import DistillObjective
from lavis_cprd.distill.registry import DistillLoss, get_loss, list_losses, register_loss
from lavis_cprd.models.dual_encoder import CprdDualEncoder

K = 3


@pytest.fixture
def toy_loss():
    """``toy_l2``: squared error between student and teacher logits of the hard negatives."""
    seen = []

    def per_query(d, cfg):
        seen.append(d)
        sq = (d.x_neg - d.z_neg).pow(2) * d.mask
        return sq.sum(1) / d.mask.sum(1).clamp(min=1), d.mask.any(1), d.mask

    register_loss(DistillLoss("toy_l2", "a toy: L2 of the logits", objective=DistillObjective, candidates="hard",
                              per_query=per_query, reads_positive=lambda cfg: False))
    try:
        yield seen
    finally:
        registry._LOSSES.pop("toy_l2")


def test_a_registered_loss_trains_a_step(toy_loss, batch):
    assert "toy_l2" in list_losses() and DistillConfig.from_cfg({"loss": "toy_l2"}).candidates == "hard"
    with pytest.raises(KeyError, match="already registered"):
        register_loss(get_loss("toy_l2"))

    torch.manual_seed(0)
    model = CprdDualEncoder.from_config(tiny_model_cfg(loss="toy_l2", num_hard_negatives=K, start_epoch=0))
    assert type(model.objective) is DistillObjective
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    # The step moved every trained weight by -lr * grad.
    for n, p in model.named_parameters():
        assert torch.allclose(p.detach(), before[n] - 0.5 * grads[n] if n in grads else before[n], atol=1e-6), n

    # The formula, independently: the mean over each direction's queries, then over directions.
    i2t, t2i = toy_loss
    assert i2t.x_neg.shape == (6, K) and t2i.x_neg.shape == (8, K)  # 6 distinct images, 8 captions
    expected = 0.5 * sum(((d.x_neg - d.z_neg) ** 2).mean(1).mean() for d in (i2t, t2i))
    assert float(out.loss_distill) == pytest.approx(float(expected), rel=1e-6) and float(expected) > 0
    assert float(out.loss) == pytest.approx(float(out.loss_itc + model.distill.weight * expected), rel=1e-6)

    # x_neg are the student's similarities to its K hardest negative captions, over tau_d.
    with torch.no_grad():
        model.load_state_dict({**model.state_dict(), **before})
        img, txt = model.encode_image(batch["image"]), model.encode_captions(batch["text_input"], "cpu")
        first = [0, 2, 3, 4, 6, 7]  # each image's first row in the batch
        sim = img[first] @ txt.t()
        sim[batch["image_id"][first].view(-1, 1) == batch["image_id"].view(1, -1)] = float("-inf")
        hardest = sim.topk(K, dim=1).values / float(model.distill_temperature)
    assert torch.allclose(i2t.x_neg.detach().sort(1).values, hardest.sort(1).values, atol=1e-5)

    # The toy term reaches the towers: without it (weight 0) the text tower's gradient differs.
    weight0 = CprdDualEncoder.from_config(tiny_model_cfg(loss="toy_l2", num_hard_negatives=K, start_epoch=0, weight=0.0))
    weight0.load_state_dict({**weight0.state_dict(), **before})
    weight0.train()
    weight0(batch).loss.backward()
    name = next(n for n in grads if n.startswith("text"))
    assert not torch.allclose(dict(weight0.named_parameters())[name].grad, grads[name])
