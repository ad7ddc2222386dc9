"""``cprd_runner``: LAVIS's ``RunnerBase`` made safe off CUDA.

LAVIS 1.0.2's runner assumes a GPU: ``PrefetchLoader`` creates a CUDA stream, the ``model``
property returns ``None`` when the model already sits on the device (always so on CPU),
``train()`` calls ``dist.barrier()`` even without a process group, metric sync all-reduces
on ``cuda``, and DDP is given ``device_ids`` of a GPU. This subclass fixes those and otherwise defers to LAVIS.
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace
from unittest import mock

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized
from lavis.common.logger import SmoothedValue
from lavis.common.registry import registry
from lavis.datasets.datasets import dataloader_utils
from lavis.runners import runner_base
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from lavis_cprd.sampling import GroupedBatchSampler


def resolve_device(name: str) -> torch.device:
    """``run.device``: ``cuda``, ``cpu`` or ``auto`` (CUDA when present)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@registry.register_runner("cprd_runner")
class CprdRunner(RunnerBase):
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

    def create_loaders(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            if not self.cuda_enabled:
                # PrefetchLoader only overlaps host-to-GPU copies; off CUDA it cannot be built.
                stack.enter_context(mock.patch.object(runner_base, "PrefetchLoader", lambda loader: loader))
            key = self.config.run_cfg.get("group_batches_by", None)
            if key:
                stack.enter_context(mock.patch.object(runner_base, "DataLoader", self._grouping_loader(key)))
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

    def train(self):
        with _barrier_without_process_group(), _metric_sync_on(self.device), self._no_epoch_sleep():
            return super().train()

    def _no_epoch_sleep(self):
        """LAVIS's ``IterLoader`` sleeps 2 s at each epoch boundary to let loader worker
        processes settle; with ``num_workers: 0`` there are none, and small runs lose minutes."""
        if int(self.config.run_cfg.get("num_workers", 0)) > 0:
            return contextlib.nullcontext()
        return mock.patch.object(dataloader_utils, "time", SimpleNamespace(sleep=lambda seconds: None))


@contextlib.contextmanager
def _metric_sync_on(device: torch.device):
    """LAVIS's ``SmoothedValue`` all-reduces its counters on ``cuda`` even under gloo."""
    if device.type == "cuda":
        yield
        return

    def synchronize_between_processes(meter):
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([meter.count, meter.total], dtype=torch.float64)
        dist.all_reduce(t)
        meter.count, meter.total = int(t[0]), float(t[1])

    with mock.patch.object(SmoothedValue, "synchronize_between_processes", synchronize_between_processes):
        yield


@contextlib.contextmanager
def _barrier_without_process_group():
    """``dist.barrier()`` is a no-op when no process group exists (single process)."""
    if is_dist_avail_and_initialized():
        yield
        return
    with mock.patch.object(dist, "barrier", lambda *a, **k: None):
        yield
