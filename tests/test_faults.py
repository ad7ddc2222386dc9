"""Numerical safety: a non-finite loss stops training naming its term, or skips the step."""
import pytest
import torch
from lavis.common.optims import LinearWarmupCosineLRScheduler
from lavis.datasets.datasets.dataloader_utils import IterLoader
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, default_collate

from conftest import tiny_model_cfg
from lavis_cprd.models.dual_encoder import CprdDualEncoder
from lavis_cprd.tasks import CprdRetrievalTask


def samples(n=16):
    torch.manual_seed(0)
    return [{"image": torch.randn(3, 48, 48), "text_input": f"a {c} thing number {i}", "image_id": i}
            for i, c in zip(range(n), ["red", "blue", "green", "black"] * 4)]


class NanAtStep:
    """The model's forward, with ``term`` turned NaN on the given calls."""

    def __init__(self, model, steps, term="loss_distill"):
        self.model, self.steps, self.term, self.calls = model, set(steps), term, 0
        self.forward = model.forward

    def __call__(self, batch):
        out = self.forward(batch)
        if self.calls in self.steps:
            out[self.term] = out[self.term] * float("nan")
            out["loss"] = out["loss"] * float("nan")
        self.calls += 1
        return out


def run_epoch(model, skip, nan_steps, items=None):
    task = CprdRetrievalTask(OmegaConf.create({"skip_nonfinite_loss": skip, "k_test": 4}))
    model.forward = NanAtStep(model, nan_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    loader = IterLoader(DataLoader(items or samples(), batch_size=8, collate_fn=default_collate))
    sched = LinearWarmupCosineLRScheduler(optimizer, max_epoch=1, min_lr=1e-4, init_lr=1e-3)
    snapshots = []
    original_zero = optimizer.zero_grad

    def zero_grad(*a, **k):  # called after every (possibly skipped) step: snapshot the weights
        snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return original_zero(*a, **k)

    optimizer.zero_grad = zero_grad
    stats = task.train_epoch(epoch=0, model=model, data_loader=loader, optimizer=optimizer, scaler=None,
                             lr_scheduler=sched, cuda_enabled=False, log_freq=100, accum_grad_iters=1)
    return task, stats, snapshots


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3)).eval()


def test_nonfinite_loss_stops_with_the_term_named(model):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 0, step 1: \['loss_distill'\] \(loss=nan, "
                                                 r"loss_itc=[\d.]+, loss_distill=nan\).*run.skip_nonfinite_loss: true"):
        run_epoch(model, skip=False, nan_steps=[1])


def test_nonfinite_step_is_skipped_without_touching_the_weights(model):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task, stats, snapshots = run_epoch(model, skip=True, nan_steps=[0])
    assert task.skipped_steps == 1 and stats["skipped_nonfinite_steps"] == "1"
    first, second = snapshots
    assert all(torch.equal(first[n], before[n]) for n in before)  # the skipped step changed nothing
    assert any(not torch.equal(second[n], first[n]) for n in before)  # the next one trained
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # as if the bad batch never was: one step on the second batch alone, from the same weights
    # and a fresh AdamW, lands on the same weights (no moment or weight-decay update leaked)
    torch.manual_seed(0)
    fresh = CprdDualEncoder.from_config(tiny_model_cfg(num_hard_negatives=3)).eval()
    _, _, (ref,) = run_epoch(fresh, skip=True, nan_steps=[], items=samples()[8:])
    assert all(torch.allclose(ref[n], second[n], atol=1e-6) for n in before)
