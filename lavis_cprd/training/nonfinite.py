"""Non-finite losses: stop with the term named, or skip the optimizer step, on every rank alike.

The whole mechanism, used by ``CprdRetrievalTask`` at two points of LAVIS's step loop
(``BaseTask._train_inner_loop``, which both ``train_epoch`` and ``train_iters`` run):

* ``train_step``: ``found(output)`` looks at this rank's loss terms and asks every rank
  (one all-reduce of one flag), so all ranks take the same branch and DDP never hangs. On a
  non-finite loss ``skip(...)`` raises ``FloatingPointError`` naming the term, the epoch,
  the step and the values, unless ``run.skip_nonfinite_loss: true``; then the micro-batch's
  accumulation window is marked bad, counted once, logged, and the loss LAVIS backpropagates
  and logs is a zero that reaches every trainable parameter. So DDP's gradient hooks fire as
  on any step, the window's gradients stay finite (the fp16 scaler does not back off its
  scale for a step skipped here) and the epoch's loss mean stays finite.
* the step loop runs inside ``window(optimizer, accum_grad_iters)``: LAVIS steps the
  optimizer after every ``run.accum_grad_iters`` micro-batches, then calls ``zero_grad``.
  ``optimizer.step`` does nothing for a window marked bad, ``zero_grad`` ends the window
  (``lavis_patches.skippable_steps``). A non-finite micro-batch thus discards its whole
  window's update (the good micro-batches' gradients too); no weight, AdamW moment, weight
  decay or step count moves, and the next window starts from zeroed gradients. With
  ``accum_grad_iters: 1`` a window is one step.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Dict, Iterator, List

import torch
from lavis.common.dist_utils import get_world_size

from lavis_cprd.training import lavis_patches

# The loss terms a message names, checked in this order (``loss`` is their sum).
LOSS_TERMS = ("loss_itc", "loss_distill")


class NonfiniteSteps:
    """One run's policy (``run.skip_nonfinite_loss``), skipped-step count and accumulation window."""

    def __init__(self, skip: bool):
        self.skip_enabled = bool(skip)
        self.skipped_steps = 0  # optimizer steps (accumulation windows) skipped so far
        self._window_bad = False  # a non-finite micro-batch since the last zero_grad
        self._bad: List[str] = []
        self._accum = 1

    @classmethod
    def from_config(cls, run_cfg) -> "NonfiniteSteps":
        return cls(bool(run_cfg.get("skip_nonfinite_loss", False)) if run_cfg is not None else False)

    # ------------------------------------------------------------------ train_step
    def found(self, output) -> bool:
        """Whether any rank's loss is non-finite (a collective: every rank calls it each step)."""
        self._bad = nonfinite_terms(output)
        return any_rank(bool(self._bad))

    def skip(self, model, samples, output) -> torch.Tensor:
        """After ``found``: raise, or mark the window bad and return the zero loss to backpropagate."""
        where = f"epoch {samples.get('epoch', '?')}, step {samples.get('iters', '?')}"
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in loss_terms(output).items())
        bad = self._bad
        if not self.skip_enabled:
            raise FloatingPointError(
                f"non-finite loss at {where}: {bad or 'on another rank'} ({values}). Lower run.init_lr, check the "
                "data, or set run.skip_nonfinite_loss: true to skip such steps"
            )
        if not self._window_bad:
            self.skipped_steps += 1
            self._window_bad = True
        window = f" (the whole run.accum_grad_iters={self._accum} window's update)" if self._accum > 1 else ""
        logging.warning("skipping step at %s%s: non-finite %s (%s); %d skipped so far", where, window,
                        bad or "loss on another rank", values, self.skipped_steps)
        params = [p for p in model.parameters() if p.requires_grad]
        return sum(p.sum() * 0.0 for p in params)

    # ------------------------------------------------------------- the step loop
    @contextlib.contextmanager
    def window(self, optimizer, accum_grad_iters: int = 1) -> Iterator[None]:
        """LAVIS's step loop with ``optimizer`` skipping the steps of windows marked bad."""
        self._accum = int(accum_grad_iters)
        with lavis_patches.skippable_steps(optimizer, lambda: self._window_bad, self._close_window):
            yield

    def _close_window(self) -> None:
        self._window_bad = False

    def report(self, stats: Dict[str, str]) -> None:
        """The count in an epoch's stats (``log.txt``), once a step was skipped."""
        if self.skipped_steps:
            stats["skipped_nonfinite_steps"] = str(self.skipped_steps)


def loss_terms(output) -> Dict[str, torch.Tensor]:
    """``loss`` and the loss terms the model returned next to it."""
    names = ("loss",) + LOSS_TERMS
    return {k: output[k] for k in names if hasattr(output, "get") and output.get(k) is not None}


def nonfinite_terms(output) -> List[str]:
    """Names of the loss terms (``loss_itc``, ``loss_distill``, then ``loss``) that are NaN or inf."""
    terms = loss_terms(output)
    bad = [k for k, v in terms.items() if k != "loss" and not bool(torch.isfinite(v.detach()).all())]
    if not bad and "loss" in terms and not bool(torch.isfinite(terms["loss"].detach()).all()):
        bad = ["loss"]
    return bad


def any_rank(flag: bool) -> bool:
    """``flag`` or-ed over the ranks: one all-reduce (none in a single process)."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())
