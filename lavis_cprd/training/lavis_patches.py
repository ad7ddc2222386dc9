"""Every runtime patch of LAVIS 1.0.2 in one place, each with its reason (``PATCHES``).

None is applied at import: each is a context manager (or a one-off setter) that the runner,
the task or an application enters where LAVIS would misbehave, so stock LAVIS objects in the
same process are left alone. Workarounds that are subclass overrides stay with their classes
and are listed in ``OVERRIDES``.
"""
from __future__ import annotations

import contextlib
import functools
import os
from types import SimpleNamespace
from typing import Callable, Dict, Iterator, NamedTuple
from unittest import mock

import torch
import torch.distributed as torch_dist
from lavis.common.dist_utils import is_dist_avail_and_initialized
from lavis.common.logger import SmoothedValue
from lavis.common.registry import registry
from lavis.datasets.datasets import dataloader_utils
from lavis.runners import runner_base


class Patch(NamedTuple):
    name: str
    target: str
    why: str


PATCHES = (
    Patch("adamw_impl", "torch.optim.AdamW, as RunnerBase.optimizer reads it",
          "run.adamw_impl picks fused/foreach/loop; LAVIS hard-codes the default"),
    Patch("no_prefetch_loader", "runner_base.PrefetchLoader",
          "it only overlaps host-to-GPU copies and creates a CUDA stream: off CUDA it cannot be built"),
    Patch("loader_factory", "runner_base.DataLoader",
          "run.group_batches_by: training batches from our GroupedBatchSampler"),
    Patch("barrier_without_process_group", "torch.distributed.barrier",
          "RunnerBase.train() calls it even when no process group exists (single process)"),
    Patch("metric_sync_on", "SmoothedValue.synchronize_between_processes",
          "it all-reduces its counters on cuda, even under gloo"),
    Patch("no_epoch_sleep", "dataloader_utils.time",
          "IterLoader sleeps 2 s at each epoch boundary for loader workers; with num_workers 0 there are none"),
    Patch("skippable_steps", "optimizer.step and optimizer.zero_grad inside BaseTask._train_inner_loop "
          "(entered by CprdRetrievalTask._train_inner_loop through NonfiniteSteps.window)",
          "the loop steps every run.accum_grad_iters micro-batches with no hook: an accumulation window "
          "with a non-finite loss (training/nonfinite.py) must not move the weights, and a zero gradient "
          "still would, through AdamW's moments and weight decay; zero_grad, called after every step, "
          "ends the window"),
    Patch("set_cache_root", 'registry.mapping["paths"]["cache_root"]',
          "LAVIS's default is Salesforce's /export/home; register_path refuses to change it once set"),
    Patch("strict_image_loading", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES",
          "LAVIS's COCO caption module sets it process-wide on import: a truncated gallery image would be "
          "indexed with its missing part grey, silently"),
    Patch("set_output_dir", 'registry.mapping["paths"]["output_dir"]',
          "_report_metrics appends to evaluate.txt there, and outside a runner nothing sets it"),
)

OVERRIDES = {  # LAVIS 1.0.2 behaviour our subclasses replace, where they live
    "RunnerBase.model returns None when the model already sits on the device; DDP gets GPU device_ids on CPU":
        "training/runner.py: CprdRunner.model",
    "RunnerBase's best-checkpoint counter restarts at 0 after a resume": "training/runner.py: CprdRunner._save_checkpoint",
    "BlipBase.init_tokenizer always loads bert-base-uncased from the hub": "tokenization.py: with_local_tokenizer",
    "Blip2's init_Qformer loads bert-base from the hub and casts the ViT to fp16": "teachers/blip2_itm.py: _Blip2ITM",
    "BlipRetrieval.from_config copies momentum encoders before weights load": "models/blip_retrieval.py: CprdBlipRetrieval",
    "LAVIS's autocast is CUDA fp16 only (bf16 on CPU is the task's)": "training/task.py: CprdRetrievalTask.train_step",
    "init_distributed_mode hard-codes CUDA and nccl; evaluate.py ignores run.runner": "training/launch.py",
    "Config asserts (bare AssertionError) on an unknown model_type": "models/model_types.py: NamedModelTypes",
    "Config validates nothing; a relative output_dir lands in LAVIS's package; device 'auto' is unknown to RunnerBase":
        "training/launch.py: prepare_config (from launch.load_config and CprdRetrievalTask.setup_task)",
    "BaseModel.load_checkpoint loads with strict=False (a wrong checkpoint leaves random weights)":
        "checkpoints.py: load_state",
    "No plugin mechanism: LAVIS's train.py/evaluate.py never import lavis_cprd": "lavis_cprd_hook.py (lavis_cprd.pth)",
    "VisionTransformerEncoder.from_config knows only base/large": "towers.py: build_vision_encoder",
    "Importing LAVIS prints FutureWarnings on every command (the timm paths it imports are deprecated; "
    "transformers 4.36 uses torch's deprecated pytree registration)":
        "environment.py: quiet_lavis_import ignores exactly those, only while lavis_cprd and LAVIS import",
    "The ViT's gradient checkpointing (fairscale checkpoint_wrapper) recomputes under CUDA fp16 autocast "
    "whatever the forward ran under (bf16 became fp16 with no loss scaler; CPU autocast became fp32)":
        "towers.py: build_vision_encoder builds it unwrapped, checkpoint_vit_blocks wraps with torch's "
        "non-reentrant checkpoint",
}

_ADAMW = torch.optim.AdamW  # the original, so nested use never wraps a wrapper


def adamw_impl(options: Dict) -> contextlib.AbstractContextManager:
    """``torch.optim.AdamW`` with ``options`` (e.g. ``fused=True``) while LAVIS builds its optimizer."""
    return mock.patch.object(torch.optim, "AdamW", functools.partial(_ADAMW, **options))


def no_prefetch_loader(active: bool) -> contextlib.AbstractContextManager:
    """LAVIS's loaders without ``PrefetchLoader`` (when ``active``: off CUDA)."""
    if not active:
        return contextlib.nullcontext()
    return mock.patch.object(runner_base, "PrefetchLoader", lambda loader: loader)


def loader_factory(make: Callable) -> contextlib.AbstractContextManager:
    """LAVIS's ``create_loaders`` building its loaders with ``make`` instead of ``DataLoader``."""
    return mock.patch.object(runner_base, "DataLoader", make)


@contextlib.contextmanager
def barrier_without_process_group() -> Iterator[None]:
    """``torch.distributed.barrier()`` is a no-op when no process group exists."""
    if is_dist_avail_and_initialized():
        yield
        return
    with mock.patch.object(torch_dist, "barrier", lambda *a, **k: None):
        yield


@contextlib.contextmanager
def metric_sync_on(device: torch.device) -> Iterator[None]:
    """``SmoothedValue`` all-reduces its counters on ``device``'s backend (CPU under gloo)."""
    if device.type == "cuda":
        yield
        return

    def synchronize_between_processes(meter):
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([meter.count, meter.total], dtype=torch.float64)
        torch_dist.all_reduce(t)
        meter.count, meter.total = int(t[0]), float(t[1])

    with mock.patch.object(SmoothedValue, "synchronize_between_processes", synchronize_between_processes):
        yield


def no_epoch_sleep(num_workers: int) -> contextlib.AbstractContextManager:
    """No 2 s sleep at LAVIS's epoch boundaries when there are no loader workers."""
    if int(num_workers) > 0:
        return contextlib.nullcontext()
    return mock.patch.object(dataloader_utils, "time", SimpleNamespace(sleep=lambda seconds: None))


@contextlib.contextmanager
def skippable_steps(optimizer, skip: Callable[[], bool], window_closed: Callable[[], None]) -> Iterator[None]:
    """``optimizer.step`` does nothing while ``skip()``; ``optimizer.zero_grad`` calls
    ``window_closed()`` first (LAVIS calls it after every window, also one whose step the fp16
    GradScaler declined)."""
    step, zero_grad = optimizer.step, optimizer.zero_grad

    def guarded(*args, **kwargs):
        if skip():
            return None
        return step(*args, **kwargs)

    def closing(*args, **kwargs):
        window_closed()
        return zero_grad(*args, **kwargs)

    with mock.patch.object(optimizer, "step", guarded), mock.patch.object(optimizer, "zero_grad", closing):
        yield


@contextlib.contextmanager
def strict_image_loading() -> Iterator[None]:
    """PIL refuses truncated images (``OSError: image file is truncated``) in this block."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def set_cache_root(path: str) -> None:
    """LAVIS's cache root (datasets, downloads), as an absolute path."""
    registry.mapping["paths"]["cache_root"] = os.path.abspath(os.path.expanduser(path))


def set_output_dir(path: str) -> None:
    """Where ``_report_metrics`` writes ``evaluate.txt``, for evaluation outside a runner."""
    registry.mapping["paths"]["output_dir"] = path
