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
from lavis.common.dist_utils import is_dist_avail_and_initialized
from lavis.common.logger import SmoothedValue
from lavis.common.registry import registry
from lavis.datasets.datasets import dataloader_utils
from lavis.runners import runner_base
from lavis.runners.runner_base import RunnerBase
from torch.nn.parallel import DistributedDataParallel as DDP


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
        if self.cuda_enabled:
            return super().create_loaders(*args, **kwargs)
        # PrefetchLoader only overlaps host-to-GPU copies; off CUDA it cannot even be built.
        with mock.patch.object(runner_base, "PrefetchLoader", lambda loader: loader):
            return super().create_loaders(*args, **kwargs)

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
