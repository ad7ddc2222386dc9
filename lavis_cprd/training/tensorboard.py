"""``run.tensorboard: true``: training loss terms and the learning rate per step, every
evaluation's metrics per epoch, and the whole config once, as TensorBoard events in
``output_dir/tensorboard`` next to LAVIS's ``log.txt`` (main process only).

    tensorboard --logdir output/<experiment>/<job>/tensorboard
"""
from __future__ import annotations

import atexit
import numbers
import os
from typing import Dict, Optional

from lavis.common.dist_utils import is_main_process
from lavis.common.registry import registry


class TrainingBoard:
    """A ``SummaryWriter`` opened on first use, under LAVIS's ``output_dir`` of this run."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled) and is_main_process()
        self._writer = None
        if self.enabled:  # a missing package fails at start-up, not at the first step
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("run.tensorboard: true needs the tensorboard package: pip install tensorboard "
                                  "(or set run.tensorboard: false)") from e
            self._writer_cls = SummaryWriter

    @property
    def writer(self):
        if self._writer is None:
            folder = os.path.join(registry.get_path("output_dir"), "tensorboard")
            self._writer = self._writer_cls(folder)
            atexit.register(self._writer.close)
            config = registry.get("configuration")  # LAVIS's Config registers itself
            if config is not None:
                from omegaconf import OmegaConf

                self._writer.add_text("config", "```\n" + OmegaConf.to_yaml(config.config) + "\n```")
        return self._writer

    def step(self, step: int, terms: Dict[str, float], lr: Optional[float]) -> None:
        if not self.enabled:
            return
        for name, value in terms.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        if lr is not None:
            self.writer.add_scalar("train/lr", lr, step)

    def evaluation(self, split: str, epoch: int, metrics: Dict) -> None:
        if not self.enabled:
            return
        for name, value in metrics.items():
            if isinstance(value, numbers.Number) and not isinstance(value, bool):
                self.writer.add_scalar(f"{split}/{name}", float(value), epoch)
        self.writer.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
