"""``cprd_retrieval``: LAVIS's retrieval task, trained through the distilling model's forward."""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Dict, List, Optional

import json

import torch
from lavis.common.dist_utils import get_world_size, is_main_process
from lavis.common.registry import registry
from lavis.tasks.retrieval import RetrievalTask

from lavis_cprd.checkpoints import atomic_write
from lavis_cprd.distributed import resolve_device
from lavis_cprd.precision import AUTO, resolve_amp
from lavis_cprd.training.launch import prepare_config
from lavis_cprd.training.nonfinite import NonfiniteSteps
from lavis_cprd.training.tensorboard import TrainingBoard
from lavis_cprd.datasets.annotation_files import check_annotation_files, download_hints
from lavis_cprd.datasets.checks import caption_checker, check_split
from lavis_cprd.datasets.split_sizes import check_hard_negatives, check_split_sizes
from lavis_cprd.datasets.coco_eccv import CONFIG_KEY as COCO_CAPTIONS_KEY
from lavis_cprd.datasets.coco_eccv import eccv_metrics, resolve_captions_path, tag_coco_ids
from lavis_cprd.datasets.true_matches import dataset_relevance
from lavis_cprd.models.student import build_teacher_now
from lavis_cprd.relevance import relevance_metrics
from lavis_cprd.teachers.oracle import fill_oracle_annotations

# Loss terms the model returns next to ``loss``; their epoch means go to log.txt.
_LOGGED_TERMS = ("loss_itc", "loss_distill", "valid_negatives", "contributing_queries", "teacher_cache_hit_rate")


@registry.register_task("cprd_retrieval")
class CprdRetrievalTask(RetrievalTask):
    """Training: ``model(samples).loss`` (ITC + distillation). Evaluation: LAVIS's
    ``RetrievalTask.evaluation`` (``model.compute_sim_matrix`` + ``_report_metrics``), so the
    metric keys are LAVIS's: ``txt_r1 ... img_r10, r_mean, agg_metrics``."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self._epoch_terms: Dict[str, List[float]] = defaultdict(list)
        # run.skip_nonfinite_loss: false = a non-finite loss stops training with a message
        # naming the term; true = the optimizer step is skipped and counted (training/nonfinite.py).
        self.nonfinite = NonfiniteSteps.from_config(cfg)
        self.autocast_dtype = autocast_dtype(cfg)
        self.board = TrainingBoard(cfg.get("tensorboard", False) if cfg is not None else False)
        self._optimizer = None  # this epoch's, for the learning rate TensorBoard shows

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for a non-finite loss so far (``run.skip_nonfinite_loss``)."""
        return self.nonfinite.skipped_steps

    @property
    def epoch_terms(self) -> Dict[str, List[float]]:
        """This epoch's per-step values of the logged loss terms (their means go to log.txt)."""
        return dict(self._epoch_terms)

    # ----------------------------------------------------------------- building
    @classmethod
    def setup_task(cls, cfg, **kwargs):
        """Where LAVIS's own ``train.py``/``evaluate.py`` hand over first: the config is checked
        in full and prepared as in lavis-cprd's entry points (``launch.prepare_config``)."""
        prepare_config(cfg, source=getattr(getattr(cfg, "args", None), "cfg_path", "config"))
        return super().setup_task(cfg=cfg, **kwargs)

    def build_datasets(self, cfg):
        """LAVIS's builders, with every split checked for bad data (see ``datasets.checks``):
        ``datasets.NAME.skip_bad: true`` leaves bad entries out with a warning instead of
        failing; ``check_images: false`` skips opening every image (huge, trusted sets).
        ``coco_captions``: COCO's ``captions_val2014.json``, for ECCV Caption / CxC metrics."""
        for name, dcfg in cfg.datasets_cfg.items():
            check_annotation_files(name, dcfg)
        with download_hints(cfg.datasets_cfg):
            datasets = super().build_datasets(cfg)
        caption_problem = caption_checker(_caption_tokenizer(cfg.model_cfg))
        for name, splits in datasets.items():
            dcfg = cfg.datasets_cfg[name]
            if dcfg.get("check_images", True):
                work_dir = os.path.join(registry.get_path("cache_root"), "lavis_cprd_filtered")
                for split in list(splits):
                    splits[split] = check_split(
                        name, split, splits[split], bool(dcfg.get("skip_bad", False)), caption_problem, work_dir
                    )
            captions = dcfg.get(COCO_CAPTIONS_KEY)
            if captions:  # COCO: map the eval splits to COCO ids for the ECCV Caption / CxC metrics
                tag_coco_ids(splits, resolve_captions_path(name, str(captions), registry.get_path("cache_root")))
        self._train_images = check_split_sizes(datasets, cfg, get_world_size())
        return datasets

    def build_model(self, cfg):
        fill_oracle_annotations(cfg)
        model = super().build_model(cfg)
        distill = getattr(model, "distill", None)
        if distill is not None and distill.needs_teacher:
            batch = int(cfg.run_cfg.get("batch_size_train", 0)) * get_world_size()
            check_hard_negatives(distill.num_hard_negatives, batch, getattr(self, "_train_images", None))
        if distill is not None and distill.needs_teacher and not cfg.run_cfg.get("evaluate", False):
            build_teacher_now(model, resolve_device(cfg.run_cfg.get("device", "auto")))
        return model

    # --------------------------------------------------------------- evaluation
    def evaluation(self, model, data_loader, **kwargs):
        """LAVIS's retrieval evaluation (``compute_sim_matrix`` + ``_report_metrics``, its keys
        and its ``evaluate.txt`` line unchanged), plus the relevance-aware metrics where the
        dataset records true matches (``datasets.true_matches.dataset_relevance``), on the main process.
        They go to ``log.txt`` and ``metrics.json`` (``after_evaluation``)."""
        score_i2t, score_t2i = model.compute_sim_matrix(data_loader, task_cfg=self.cfg)
        if not is_main_process():
            return None
        dataset = data_loader.dataset
        result = self._report_metrics(score_i2t, score_t2i, dataset.txt2img, dataset.img2txt)
        truth = dataset_relevance(dataset)
        if truth is not None:
            rel = relevance_metrics(score_i2t, truth["true"], truth["annotated"], truth.get("grades"), score_t2i)
            result.update(rel)  # in log.txt and metrics.json; evaluate.txt keeps LAVIS's one line per evaluation
        ids = getattr(dataset, "coco_ids", None)  # set by tag_coco_ids at build time
        if ids is not None:  # COCO with datasets.coco_retrieval.coco_captions: ECCV Caption and CxC positives
            result.update(eccv_metrics(score_i2t, score_t2i, *ids))
        logging.info(result)
        return result

    def after_evaluation(self, val_result, split_name=None, epoch=None, **kwargs):
        """Every evaluation's metrics also go to ``output_dir/metrics.json``, keyed by split and epoch."""
        if val_result is not None and is_main_process():
            path = os.path.join(registry.get_path("output_dir"), "metrics.json")
            metrics = {}
            if os.path.isfile(path):
                with open(path) as f:
                    metrics = json.load(f)
            metrics[f"{split_name}/{epoch}"] = val_result
            atomic_write(path, lambda tmp: _dump_json(metrics, tmp))
            # the test split is evaluated at "best": after the last epoch on TensorBoard's axis
            last = int(self.cfg.get("max_epoch", 1)) - 1 if self.cfg is not None else 0
            self.board.evaluation(str(split_name), epoch if isinstance(epoch, int) else last + 1, val_result)
        return val_result

    # ----------------------------------------------------------------- training
    def train_step(self, model, samples):
        if self.autocast_dtype is None:
            output = model(samples)
        else:  # bf16: LAVIS's own autocast is CUDA fp16 only
            with torch.autocast(device_type=samples["image"].device.type, dtype=self.autocast_dtype):
                output = model(samples)
        if self.nonfinite.found(output):  # on any rank: every rank skips (or stops) alike
            return self.nonfinite.skip(model, samples, output)
        terms = {}
        for term in _LOGGED_TERMS:
            value = output.get(term) if hasattr(output, "get") else None
            if value is not None:
                terms[term] = float(value.detach())
                self._epoch_terms[term].append(terms[term])
        if self.board.enabled and "iters" in samples:
            terms["loss"] = float(output["loss"].detach())
            step = int(samples["epoch"]) * int(samples["num_iters_per_epoch"]) + int(samples["iters"])
            lr = self._optimizer.param_groups[0]["lr"] if self._optimizer is not None else None
            self.board.step(step, terms, lr)
        return output["loss"]

    def _train_inner_loop(self, **kwargs):  # LAVIS's step loop, under train_epoch and train_iters alike
        with self.nonfinite.window(kwargs["optimizer"], int(kwargs.get("accum_grad_iters", 1))):
            return super()._train_inner_loop(**kwargs)

    def train_epoch(self, epoch, model, **kwargs):  # LAVIS's runner passes keywords
        unwrapped = getattr(model, "module", model)  # DDP wraps the model
        if hasattr(unwrapped, "set_epoch"):
            unwrapped.set_epoch(epoch)
        self._epoch_terms.clear()
        self._optimizer = kwargs.get("optimizer")
        stats = super().train_epoch(epoch=epoch, model=model, **kwargs)
        self.nonfinite.report(stats)
        for term, values in self._epoch_terms.items():
            stats[term] = "{:.4f}".format(sum(values) / len(values))
        last = self.cfg is not None and epoch == int(self.cfg.get("max_epoch", 0)) - 1
        if last and hasattr(unwrapped, "save_teacher_record"):  # distill.teacher_record, when training ends
            unwrapped.save_teacher_record()
        logging.info("Epoch means: %s", {k: stats[k] for k in self._epoch_terms})
        self.board.flush()
        return stats


AMP_DTYPES = ("fp16", "bf16", AUTO)


def amp_mode(run_cfg) -> Optional[str]:
    """The student's mixed precision under ``run.amp: true``: ``fp16`` (``run.amp_dtype``'s
    default) is LAVIS's own CUDA fp16 autocast with a gradient scaler; ``bf16`` autocasts to
    bfloat16 on any device (CPU included) and needs no scaler; ``auto`` is bf16 where the
    device runs it natively, else fp16 on CUDA and float32 on a CPU (``precision.resolve_amp``).
    None when mixed precision is off."""
    if run_cfg is None or not bool(run_cfg.get("amp", False)):
        return None
    dtype = str(run_cfg.get("amp_dtype", "fp16"))
    if dtype not in AMP_DTYPES:
        raise ValueError(f"run.amp_dtype={dtype!r} is not one of {list(AMP_DTYPES)}")
    return resolve_amp(dtype, resolve_device(str(run_cfg.get("device", "auto"))))


def autocast_dtype(run_cfg) -> Optional[torch.dtype]:
    """The dtype the task autocasts the training forward to itself (bf16); None when LAVIS
    handles it (fp16) or mixed precision is off."""
    return torch.bfloat16 if amp_mode(run_cfg) == "bf16" else None


def _dump_json(obj, path: str) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _caption_tokenizer(model_cfg):
    """The student's tokenizer, for the unknown-token check (None: none applies, e.g. CLIP's
    byte-level BPE has no unknown token)."""
    model_cls = registry.get_model_class(model_cfg.get("arch", ""))
    make = getattr(model_cls, "caption_tokenizer", None)
    return make(model_cfg) if make is not None else None
