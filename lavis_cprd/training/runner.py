"""``cprd_runner``: LAVIS's ``RunnerBase`` made safe off CUDA, with checkpoints that survive
interruption.

LAVIS 1.0.2's runner assumes a GPU: ``PrefetchLoader`` creates a CUDA stream, the ``model``
property returns ``None`` when the model already sits on the device (always so on CPU),
``train()`` calls ``dist.barrier()`` even without a process group, metric sync all-reduces
on ``cuda``, and DDP is given ``device_ids`` of a GPU. This subclass fixes those and otherwise defers to LAVIS.
Its job id is the start time cut to ten minutes, so runs started in one window shared a folder:
here every run claims a folder of its own (``job_folder``).

Checkpoints: after each epoch's validation, ``checkpoint_latest.pth`` (the one before it is
kept as ``checkpoint_previous.pth``) holds model, optimizer, scaler, epoch, every RNG state
and the best validation score so far; ``checkpoint_best.pth`` as in LAVIS. All are written
atomically and load with ``weights_only=True``. Resuming restores the RNG streams and the
data order, so on CPU a resumed run ends bit-for-bit where an uninterrupted one does.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from typing import Optional

from lavis.common.dist_utils import get_rank, get_world_size, main_process
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from lavis_cprd.checkpoints import (
    BEST, LATEST, PREVIOUS, atomic_save, load_checkpoint, own_rng_state, rank_rng_states, rng_state, set_rng_state,
)
from lavis_cprd.distributed import resolve_device
from lavis_cprd.training import lavis_patches
from lavis_cprd.training.job_folder import (
    ClaimedJob, check_resume_fits, lock_job_folder, release_job_folder, shared_job_folder,
)
from lavis_cprd.training.sampling import GroupedBatchSampler
from lavis_cprd.training.selection import AUTO, with_selection
from lavis_cprd.training.task import amp_mode

ADAMW_IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def adamw_options(run_cfg) -> dict:
    """``torch.optim.AdamW`` keyword arguments for ``run.adamw_impl``."""
    impl = str(run_cfg.get("adamw_impl", "fused"))
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"run.adamw_impl={impl!r} is not one of {list(ADAMW_IMPLS)}")
    return dict(ADAMW_IMPLS[impl])


@registry.register_runner("cprd_runner")
class CprdRunner(RunnerBase):
    """LAVIS's runner, safe off CUDA, with resumable checkpoints (see the module docstring)."""

    @property
    def device(self):
        if self._device is None:
            self._device = resolve_device(self.config.run_cfg.get("device", "auto"))
        return self._device

    @property
    def model(self):
        if self._wrapped_model is None:
            self._model = self._model.to(self.device)
            if self.use_distributed:
                device_ids = [self.config.run_cfg.gpu] if self.device.type == "cuda" else None
                self._wrapped_model = DDP(self._model, device_ids=device_ids)
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    @property
    def optimizer(self):
        """LAVIS's AdamW (its parameter groups, lr, weight decay, betas), run by the
        implementation ``run.adamw_impl`` names: ``fused`` (default; one kernel over all
        tensors: 5.5 ms vs 17 ms per step for the 5.7M-parameter bench student on 2 CPU
        cores), ``foreach`` (LAVIS's default) or ``loop``."""
        if self._optimizer is None:
            with lavis_patches.adamw_impl(adamw_options(self.config.run_cfg)):
                return super().optimizer
        return self._optimizer

    @property
    def scaler(self):
        """LAVIS's fp16 gradient scaler when the student's mixed precision is fp16; none for
        bf16 (bfloat16 has float32's range: nothing underflows), where the task autocasts
        itself, nor when ``run.amp_dtype: auto`` chose float32."""
        if amp_mode(self.config.run_cfg) != "fp16":
            return None
        return super().scaler

    def create_loaders(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(lavis_patches.no_prefetch_loader(not self.cuda_enabled))
            key = self.config.run_cfg.get("group_batches_by", None)
            if key:
                stack.enter_context(lavis_patches.loader_factory(self._grouping_loader(key)))
            return super().create_loaders(*args, **kwargs)

    def _grouping_loader(self, key: str):
        """``run.group_batches_by: KEY``: training batches keep items whose annotations share
        ``KEY`` together (see ``GroupedBatchSampler``); evaluation loaders are unchanged."""
        seed = int(self.config.run_cfg.get("seed", 42))

        def make(dataset, batch_size=1, shuffle=False, sampler=None, drop_last=False, **kwargs):
            if not (shuffle or sampler is not None) or not drop_last:  # an evaluation loader
                return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last, **kwargs)
            parts = getattr(dataset, "datasets", [dataset])  # LAVIS concatenates each split's datasets
            annotation = [ann for part in parts for ann in (getattr(part, "annotation", None) or [{}])]
            if len(annotation) != len(dataset) or any(key not in ann for ann in annotation):
                raise ValueError(f"run.group_batches_by={key!r}: every training annotation needs a {key!r} entry")
            batches = GroupedBatchSampler(
                [ann[key] for ann in annotation], batch_size, seed=seed,
                num_replicas=get_world_size(), rank=get_rank(),
            )
            return DataLoader(dataset, batch_sampler=batches, **kwargs)

        return make

    def setup_output_dir(self):
        """The run's own job folder (``job_folder``): LAVIS's job id is the start time cut to
        ten minutes, which two runs in one window shared. Rank 0 claims a new one, unless the
        entry point claimed it already (``--resume auto`` continues a folder), and locks it."""
        if not isinstance(self.job_id, ClaimedJob):
            self.job_id = shared_job_folder(self.config.run_cfg.output_dir)
        super().setup_output_dir()
        if get_rank() == 0 and not lock_job_folder(str(self.output_dir)):
            raise RuntimeError(f"job folder {self.output_dir} is in use by another run")

    def train(self):
        try:
            with lavis_patches.barrier_without_process_group(), lavis_patches.metric_sync_on(self.device), \
                    lavis_patches.no_epoch_sleep(self.config.run_cfg.get("num_workers", 0)):
                return super().train()
        finally:
            release_job_folder(str(self.output_dir))

    # -------------------------------------------------------------- checkpoints
    _resume_rng = None
    _best_agg_metric = None  # best val agg_metrics so far, across resumes
    _best_epoch = None
    _last_val_agg = None

    def train_epoch(self, epoch):
        if not self.evaluate_only and epoch > self.start_epoch:
            self._save_latest(epoch - 1)  # epoch - 1 is complete: trained and validated
        if self._resume_rng is not None:
            self._continue_data_order(epoch)
        return super().train_epoch(epoch)

    def evaluate(self, cur_epoch="best", skip_reload=False):
        if not self.evaluate_only and self.max_epoch > self.start_epoch:
            self._save_latest(self.max_epoch - 1)  # training is over; only the test split is left
        return super().evaluate(cur_epoch=cur_epoch, skip_reload=skip_reload)

    def eval_epoch(self, split_name, cur_epoch, skip_reload=False):
        log = super().eval_epoch(split_name, cur_epoch, skip_reload=skip_reload)
        if split_name == "val" and isinstance(log, dict) and "agg_metrics" in log:
            # LAVIS keeps the epoch of the highest agg_metrics: make it run.select_metric's value.
            log = with_selection(self.config.run_cfg.get("select_metric", AUTO), log)
            if self._before_distillation(cur_epoch):
                # The best checkpoint of a distilled run must have seen distillation: epochs
                # of ITC alone are validated and logged, but never selected.
                log = {**log, "agg_metrics_before_distillation": log["agg_metrics"], "agg_metrics": float("-inf")}
            self._last_val_agg = float(log["agg_metrics"])
        return log

    def _before_distillation(self, cur_epoch) -> bool:
        """Whether ``cur_epoch`` is an epoch of ITC alone in a run that distils later."""
        distill = getattr(self.unwrap_dist_model(self.model), "distill", None)
        if distill is None or not distill.needs_teacher or not isinstance(cur_epoch, int):
            return False
        return cur_epoch < distill.start_epoch < self.max_epoch

    def _checkpoint_state(self, cur_epoch: int, rng_per_rank: Optional[list] = None) -> dict:
        model = self.unwrap_dist_model(self.model)
        frozen = {k for k, v in model.named_parameters() if not v.requires_grad}
        return {
            # LAVIS's keys and conventions (frozen parameters left out), so LAVIS reads ours
            "model": {k: v for k, v in model.state_dict().items() if k not in frozen},
            "optimizer": self.optimizer.state_dict(),
            "config": self.config.to_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
            "rng": rng_per_rank[0] if rng_per_rank else rng_state(),  # rank 0's, as LAVIS-style readers expect
            "rng_per_rank": rng_per_rank,  # every rank's own streams (latest only: what a resume restores)
            "best_agg_metric": self._best_agg_metric,
            "best_epoch": self._best_epoch,
        }

    @main_process
    def _save_checkpoint(self, cur_epoch, is_best=False):
        """LAVIS calls this on a new best val score (its own best counter restarts at 0 after
        a resume, so the score is compared with the best across resumes first)."""
        if is_best:
            agg = self._last_val_agg
            if agg is not None and self._best_agg_metric is not None and agg <= self._best_agg_metric:
                logging.info("val agg_metrics (run.select_metric) %.4f does not beat %.4f (epoch %s); best checkpoint kept",
                             agg, self._best_agg_metric, self._best_epoch)
                return
            self._best_agg_metric, self._best_epoch = agg, cur_epoch
        path = os.path.join(self.output_dir, BEST if is_best else f"checkpoint_{cur_epoch}.pth")
        logging.info("Saving checkpoint at epoch %s to %s.", cur_epoch, path)
        atomic_save(self._checkpoint_state(cur_epoch), path)

    def _save_latest(self, cur_epoch: int) -> None:
        """Every rank gives its RNG streams (a collective); rank 0 writes."""
        rngs = rank_rng_states()
        if get_rank() != 0:
            return
        latest, previous = os.path.join(self.output_dir, LATEST), os.path.join(self.output_dir, PREVIOUS)
        state = self._checkpoint_state(cur_epoch, rngs)
        if os.path.exists(latest):
            os.replace(latest, previous)  # kept until the new one is whole: a torn write falls back to it
        atomic_save(state, latest)
        logging.info("Saved resumable checkpoint (epoch %d) to %s", cur_epoch, latest)

    def _load_checkpoint(self, url_or_filename):
        """Resume: model, optimizer, scaler, epoch; RNG streams and data order (restored at the
        first resumed epoch); the best val score and its checkpoint."""
        if not os.path.isfile(url_or_filename):
            return super()._load_checkpoint(url_or_filename)  # a URL: LAVIS downloads it
        # On the CPU: load_state_dict copies onto each parameter's device, and the RNG states
        # must be CPU tensors (a CUDA copy of numpy's keys cannot become numpy again).
        checkpoint = load_checkpoint(url_or_filename, map_location="cpu")
        check_resume_fits(url_or_filename, checkpoint, self.config.to_dict(), self.unwrap_dist_model(self.model))
        self.unwrap_dist_model(self.model).load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = int(checkpoint["epoch"]) + 1
        self._resume_rng = own_rng_state(checkpoint, get_rank(), get_world_size())
        self._best_agg_metric, self._best_epoch = checkpoint.get("best_agg_metric"), checkpoint.get("best_epoch")
        # A resume into a new job folder brings the best checkpoint along: the final test reloads it.
        source_best = os.path.join(os.path.dirname(os.path.abspath(url_or_filename)), BEST)
        own_best = os.path.join(self.output_dir, BEST)
        if get_rank() == 0 and os.path.isfile(source_best) and not os.path.exists(own_best):
            shutil.copyfile(source_best, own_best)
        logging.info("Resumed from %s at epoch %d (best val agg_metrics so far: %s)",
                     url_or_filename, self.start_epoch, self._best_agg_metric)

    def _continue_data_order(self, epoch: int) -> None:
        """Put the RNGs and the training loader where the interrupted run had them when it
        started ``epoch``: same shuffling, same dropout, same sampler epoch under DDP."""
        loader = self.train_loader  # built now, so its construction draws are behind us
        set_rng_state(self._resume_rng)
        self._resume_rng = None
        if hasattr(loader, "iter_loader"):  # LAVIS's IterLoader: new epoch iterator, as at an epoch boundary
            loader._epoch = epoch
            sampler = getattr(loader._dataloader, "sampler", None)
            if self.use_distributed and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            loader.iter_loader = iter(loader._dataloader)
