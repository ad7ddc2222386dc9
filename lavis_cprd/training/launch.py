"""What LAVIS's ``train.py``/``evaluate.py`` do before building a runner, shared by our entry
points: parse ``--cfg-path``/``--options``, build LAVIS's ``Config``, initialise distributed
mode, seed, log, and build task, datasets and model with LAVIS's own functions."""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import random
from typing import Any, Optional, Tuple

import numpy as np
import torch
import torch.backends.cudnn as cudnn

import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, is_main_process, setup_for_distributed
from lavis.common.logger import setup_logger
from lavis.common.registry import registry
from lavis.common.utils import now
from omegaconf import OmegaConf

from lavis_cprd.distributed import broadcast_object, resolve_device
from lavis_cprd.errors import ConfigError
from lavis_cprd.training import lavis_patches
from lavis_cprd.training.job_folder import ClaimedJob, find_resume_checkpoint, lock_job_folder
from lavis_cprd.training.validation import name_problems, validate_config

# (Importing this module imports the package lavis_cprd first: its registrations exist before
# any Config is built.)
DEFAULT_RUNNER = "cprd_runner"  # LAVIS's default runner needs CUDA


def make_parser(description: str, resume: bool = False) -> argparse.ArgumentParser:
    """LAVIS's train.py/evaluate.py arguments: ``--cfg-path`` and ``--options``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the experiment YAML.")
    parser.add_argument(
        "--options", nargs="+", default=[], help="override config entries, as key=value (e.g. run.max_epoch=2)."
    )
    if not resume:
        return parser
    parser.add_argument(
        "--resume", default=None,
        help="a checkpoint to resume from, or 'auto': the newest readable checkpoint_latest/previous of a run of "
        "this same config under run.output_dir (the run continues in that job folder); none = start fresh.",
    )
    return parser


def load_config(args: argparse.Namespace) -> Config:
    """LAVIS's ``Config`` of ``--cfg-path`` and ``--options``, checked in full and prepared
    (:func:`prepare_config`). What LAVIS's ``Config`` itself asserts on (the sections, the
    model's arch, the dataset names) is checked first, with errors that name the key."""
    if not os.path.isfile(args.cfg_path):
        raise FileNotFoundError(f"--cfg-path {args.cfg_path!r} does not exist")
    check_names(args.cfg_path, args.options)
    cfg = Config(args)
    prepare_config(cfg, source=args.cfg_path)
    return cfg


def check_names(cfg_path: str, options) -> None:
    """``validation.name_problems`` of the experiment file with its ``--options``, before LAVIS's
    ``Config`` looks the names up (and asserts)."""
    dotlist = Config._convert_to_dot_list(None, list(options or []))  # LAVIS also takes "key value" pairs
    raw = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(dotlist))
    problems = name_problems(OmegaConf.to_container(raw))
    if problems:
        raise ConfigError(problems, cfg_path)


def prepare_config(cfg, source: str = "config") -> None:
    """What every entry point does to LAVIS's merged ``Config`` before anything is built (ours
    in :func:`load_config`; LAVIS's train.py/evaluate.py through ``cprd_retrieval``'s
    ``setup_task``): fill in what LAVIS 1.0.2 gets wrong off Salesforce's machines, then
    ``validation.validate_config``. Idempotent.

    - ``run.output_dir``: LAVIS joins a relative one onto its own package folder; users mean
      their working directory.
    - ``run.runner``: ``cprd_runner`` unless set (LAVIS's default runner needs CUDA).
    - ``run.device: auto``: CUDA when present, else CPU (LAVIS's runner takes a device name).
    - LAVIS's cache root (its default is Salesforce's ``/export/home``): ``run.cache_root``,
      else ``$LAVIS_CACHE_ROOT``, else ``~/.cache/lavis``.
    """
    validate_config(cfg.config, source)
    run = cfg.run_cfg
    run.output_dir = os.path.abspath(os.path.expanduser(run.get("output_dir", "output")))
    run.runner = run.get("runner", None) or DEFAULT_RUNNER
    if str(run.get("device", "auto")) == "auto":
        run.device = str(resolve_device("auto"))
    lavis_patches.set_cache_root(run.get("cache_root", None) or os.environ.get("LAVIS_CACHE_ROOT") or "~/.cache/lavis")


# How long a collective may wait: rank 0 downloads checkpoints and datasets while the others
# wait at a barrier (LAVIS's main-process-first), and BLIP-large or COCO can take long.
DIST_TIMEOUT_MINUTES = 120


def ranks_from_slurm(env=os.environ) -> bool:
    """Under ``srun`` without torchrun, SLURM says each task's rank: RANK, WORLD_SIZE and
    LOCAL_RANK are set from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID (else every task would
    train alone on cuda:0), and MASTER_ADDR/MASTER_PORT default to the node srun was launched
    from and 29500. False when this is not a multi-task SLURM step or torchrun set the ranks."""
    if "RANK" in env or int(env.get("SLURM_NTASKS", "1")) < 2 or "SLURM_PROCID" not in env:
        return False
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        if "SLURM_LAUNCH_NODE_IPADDR" not in env:
            raise RuntimeError("srun started this task without torchrun and without MASTER_ADDR: set MASTER_ADDR "
                               "(and MASTER_PORT) to the first node of the job, e.g. "
                               "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)")
        env["MASTER_ADDR"] = env["SLURM_LAUNCH_NODE_IPADDR"]
    env.setdefault("MASTER_PORT", "29500")
    return True


def init_distributed(run_cfg) -> None:
    """``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK (so does ``srun``, through
    :func:`ranks_from_slurm`): NCCL on GPUs, gloo otherwise."""
    ranks_from_slurm()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        run_cfg.distributed = False
        return
    run_cfg.rank = int(os.environ["RANK"])
    run_cfg.world_size = int(os.environ["WORLD_SIZE"])
    run_cfg.gpu = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and resolve_device(run_cfg.get("device", "auto")).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(run_cfg.gpu)
    run_cfg.distributed = True
    run_cfg.dist_backend = "nccl" if use_cuda else "gloo"
    torch.distributed.init_process_group(
        backend=run_cfg.dist_backend,
        init_method=run_cfg.get("dist_url", "env://"),
        world_size=run_cfg.world_size,
        rank=run_cfg.rank,
        timeout=datetime.timedelta(minutes=float(run_cfg.get("dist_timeout_minutes", DIST_TIMEOUT_MINUTES))),
    )
    torch.distributed.barrier()
    setup_for_distributed(run_cfg.rank == 0)


def shutdown_distributed(completed: bool) -> None:
    """Leave the process group explicitly. Left to interpreter exit, a gloo group's threads
    can abort a rank that finished first ("terminate called without an active exception",
    pytorch/pytorch#190489) and fail a run that succeeded: seen once in CI. After a completed
    run the ranks first wait for each other; after an error they do not (a peer may be gone)."""
    if not torch.distributed.is_initialized():
        return
    if completed:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def setup_seeds(cfg: Config) -> None:
    seed = int(cfg.run_cfg.get("seed", 42)) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cudnn.benchmark = False
    cudnn.deterministic = True


def setup_logging() -> None:
    """LAVIS's ``setup_logger`` (INFO on the main process, WARNING elsewhere), made to hold when
    something logged first: ``logging.basicConfig`` is a no-op once the root logger has a
    handler, so one early warning (a skipped checkpoint, say) left the console at WARNING and
    silent for the rest of the run."""
    setup_logger()
    logging.getLogger().setLevel(logging.INFO if is_main_process() else logging.WARNING)


def resolve_resume(resume: str, cfg: Config) -> Optional[ClaimedJob]:
    """``--resume PATH|auto`` into ``run.resume_ckpt_path`` (rank 0 decides, every rank is
    told). ``auto``: the newest checkpoint of a run of this same config, continued in its own
    job folder (so its best checkpoint and logs stay in one place), which is returned."""
    def decide() -> Tuple[Optional[str], Optional[str]]:
        if resume != "auto":
            return resume, None
        output_root = cfg.run_cfg.output_dir
        path = find_resume_checkpoint(output_root, cfg.to_dict())
        if path is None:
            logging.info("--resume auto: no readable checkpoint of this config under %s; starting from scratch", output_root)
            return None, None
        folder = os.path.dirname(path)
        if not lock_job_folder(folder):  # a run started in it since we looked
            raise RuntimeError(f"--resume auto: {folder} is in use by another run")
        logging.info("--resume auto: resuming from %s", path)
        return path, os.path.basename(folder)

    decision: Any = None
    if get_rank() == 0:
        try:
            decision = decide()
        except Exception as e:  # the other ranks wait on the broadcast: tell them too
            broadcast_object(("error", f"{type(e).__name__}: {e}"))
            raise
    decision = broadcast_object(decision)
    if decision[0] == "error":
        raise RuntimeError(f"rank 0 could not resume: {decision[1]}")
    path, job_id = decision
    if path is not None:
        cfg.run_cfg.resume_ckpt_path = path
    return ClaimedJob(job_id) if job_id else None


def build_runner(args: argparse.Namespace, evaluate_only: bool = False):
    """Everything up to a ready runner, as LAVIS's train.py does it."""
    cfg = load_config(args)
    if evaluate_only:
        cfg.run_cfg.evaluate = True
    init_distributed(cfg.run_cfg)
    setup_seeds(cfg)
    setup_logging()
    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    # After the build, whose checks and filled-in paths are part of the config a resume compares.
    # A fresh job id is claimed by the runner itself (so LAVIS's own train.py gets one too).
    job_id = resolve_resume(args.resume, cfg) if getattr(args, "resume", None) and not evaluate_only else None
    runner_cls = registry.get_runner_class(cfg.run_cfg.runner)
    if runner_cls is None:
        raise ValueError(
            f"run.runner={cfg.run_cfg.runner!r} is not registered; available: "
            f"{sorted(registry.mapping['runner_name_mapping'])}"
        )
    return runner_cls(cfg=cfg, job_id=job_id or now(), task=task, model=model, datasets=datasets)

