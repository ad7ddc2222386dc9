"""What ``demo`` and ``compare`` share: their common arguments, training runs as
child processes that are reused once finished, the evaluation split, the teacher (packaged,
given, or retrained by the documented two-stage recipe).

Each training run is ``lavis_cprd.apps.train`` (as ``python -m lavis_cprd.apps.train``) in a
child process of its own, writing into its own folder; a finished run (its
``checkpoint_best.pth`` exists) is reused when it was trained for the same resolved config,
package version and checkpoint contents (``apps.run_reuse``), so an interrupted comparison
picks up where it stopped and a changed one retrains what changed. The children fork from a
server that has imported lavis_cprd once: importing LAVIS (torch, torchvision and every LAVIS
model) took 7 s of each 31-s run of the embedded default.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from typing import List, Optional, Sequence

from omegaconf import OmegaConf

from lavis_cprd.errors import existing_file
from lavis_cprd.checkpoints import atomic_write, export_half, load_checkpoint, model_from_checkpoint
from lavis_cprd.apps.run_reuse import RunDecision, prepare_run_folder, run_request
from lavis_cprd.paths import ASSETS, EXPERIMENTS
from lavis_cprd.training.launch import load_config

TEACHER_ITC_CFG = os.path.join(EXPERIMENTS, "teacher_itc_tiny_shapes.yaml")
TEACHER_CFG = os.path.join(EXPERIMENTS, "teacher_blip_tiny_shapes.yaml")
STUDENT_CFG = os.path.join(EXPERIMENTS, "cprd_tiny_shapes.yaml")
PACKAGED_TEACHER = os.path.join(ASSETS, "teacher_blip_tiny_shapes.pth")
TEACHER_EXPORT = "teacher_fp16.pth"  # what --retrain-teacher writes next to its run: PACKAGED_TEACHER's format
log = logging.getLogger("lavis_cprd.apps.runs")


def common_parser(prog: str, description: str, default_output: str) -> argparse.ArgumentParser:
    """Arguments shared by ``demo`` and ``compare``: data, teacher, students, overrides."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--output", default=default_output, help=f"output folder (default: {default_output})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="student seeds (default: 0 1 2)")
    p.add_argument("--teacher-itc-cfg", default=TEACHER_ITC_CFG, help="teacher stage 1: ITC pre-training of its towers")
    p.add_argument("--teacher-cfg", default=TEACHER_CFG, help="teacher stage 2: BLIP ITC + ITM fine-tuning")
    p.add_argument("--student-cfg", default=STUDENT_CFG)
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher-ckpt", default=None, type=existing_file("--teacher-ckpt"),
                         help="use this teacher checkpoint (default: the packaged one)")
    teacher.add_argument("--retrain-teacher", action="store_true", help="train the teacher by the two-stage recipe "
                   f"(--teacher-itc-cfg, --teacher-cfg) and use its fp16 export ({TEACHER_EXPORT}, the packaged "
                   "teacher's format), instead of the packaged one")
    p.add_argument("--options", nargs="+", default=[], help="config overrides applied to every run (key=value)")
    p.add_argument("--teacher-options", nargs="+", default=[], help="overrides for the teacher runs only (with --retrain-teacher)")
    p.add_argument("--student-options", nargs="+", default=[], help="overrides for the student runs only")
    p.add_argument("--jobs", type=int, default=1, help="student runs side by side, the CPU threads shared out "
                   "(default 1; on CPU, small students train faster two at a time than one at a time with two threads)")
    return p


def train_run(cfg_path: str, options: Sequence[str], run_dir: str, threads: Optional[int] = None,
              decisions: Optional[List[RunDecision]] = None) -> str:
    """Train into ``run_dir`` unless it holds a finished run of this same request
    (``run_reuse.prepare_run_folder``); return its ``checkpoint_best.pth``. ``threads`` caps the
    run's CPU threads (for runs side by side); ``decisions`` gets whether it was reused and why."""
    final = os.path.join(run_dir, "checkpoint_best.pth")
    jobs = os.path.join(run_dir, "jobs")
    overrides = [f"run.output_dir={jobs}", *options]
    # --resume auto: a run of this same request that was interrupted continues from its last
    # epoch (only a checkpoint of the same config is ever picked: training.job_folder).
    argv = ["--cfg-path", cfg_path, "--resume", "auto", "--options", *overrides]
    decision = prepare_run_folder(run_dir, run_request(cfg_path, overrides, run_dir))
    if decisions is not None:
        decisions.append(decision)
    if decision.reused:
        return final
    cmd = [sys.executable, "-m", "lavis_cprd.apps.train", *argv]
    log.info("running: %s", " ".join(cmd))
    t0 = time.time()
    child = _trainer().Process(target=_train, args=(argv, threads), name=os.path.basename(run_dir))
    child.start()
    try:
        child.join()
    finally:
        if child.is_alive():  # the parent was interrupted: the run stops too
            child.terminate()
            child.join()
    if child.exitcode != 0:
        raise subprocess.CalledProcessError(child.exitcode, cmd)
    newest = max(glob.glob(os.path.join(jobs, "*", "checkpoint_best.pth")), key=os.path.getmtime)
    atomic_write(final, lambda tmp: shutil.copyfile(newest, tmp))  # a half-copied file never looks finished
    with open(os.path.join(run_dir, "train_seconds.json"), "w") as f:
        json.dump({"seconds": time.time() - t0}, f)
    return final


def _trainer():
    """Where training runs start: a fork server that imported lavis_cprd (and so LAVIS and
    torch) once, but ran nothing, so no thread pool or CUDA state is forked; ``spawn`` where
    the platform has no fork."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["lavis_cprd"])
    return context


def _train(argv: Sequence[str], threads: Optional[int]) -> None:
    """A training run, in its child process; ``threads`` caps its CPU threads."""
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    from lavis_cprd.apps.train import main

    main(list(argv))


def eval_split(cfg_path: str, options: Sequence[str], split: str = "test"):
    """The split's LAVIS dataset, built by the experiment's own builder and processors."""
    from lavis.common.registry import registry

    cfg = load_config(Namespace(cfg_path=cfg_path, options=list(options)))
    (name,) = list(cfg.datasets_cfg)
    datasets = registry.get_builder_class(name)(cfg.datasets_cfg[name]).build_datasets()
    return datasets[split], cfg


# A model rebuilt from a LAVIS runner checkpoint (its stored config + weights), on a device.
load_trained = model_from_checkpoint


def ensure_teacher(args: argparse.Namespace, out: str, decisions: Optional[List[RunDecision]] = None) -> str:
    """``--teacher-ckpt``; with ``--retrain-teacher``, the fp16 export of a teacher trained into
    ``out`` in two stages (each reused when done for the same request, see ``train_run``): stage 1
    ITC-trains its towers, stage 2 fine-tunes them with BLIP's ITC + ITM; otherwise the packaged
    teacher."""
    if args.teacher_ckpt is not None:
        return args.teacher_ckpt
    if not args.retrain_teacher:
        if not os.path.isfile(PACKAGED_TEACHER):
            raise FileNotFoundError(f"the packaged teacher {PACKAGED_TEACHER} is missing: reinstall lavis-cprd, "
                                    "or train one with --retrain-teacher")
        warn_if_other_data(args)
        return PACKAGED_TEACHER
    return train_teacher(args.teacher_itc_cfg, args.teacher_cfg, out, [*args.options, *args.teacher_options], decisions)


def train_teacher(stage1_cfg: str, stage2_cfg: str, out: str, options: Sequence[str] = (),
                  decisions: Optional[List[RunDecision]] = None) -> str:
    """The two-stage teacher recipe (``lavis-cprd train-teacher``, ``--retrain-teacher``): stage 1
    ITC-trains its towers into ``out/teacher_itc``, stage 2 fine-tunes them with BLIP's ITC + ITM
    into ``out/teacher`` (each reused when done for the same request: ``train_run``); returns
    the fp16 export of stage 2's best, the packaged teacher's format."""
    towers = train_run(stage1_cfg, list(options), os.path.join(out, "teacher_itc"), decisions=decisions)
    trained = train_run(stage2_cfg, [*options, f"model.pretrained={towers}"], os.path.join(out, "teacher"),
                        decisions=decisions)
    export = os.path.join(out, "teacher", TEACHER_EXPORT)
    if not os.path.isfile(export) or os.path.getmtime(export) < os.path.getmtime(trained):
        export_half(trained, export)
    return export


def warn_if_other_data(args: argparse.Namespace) -> None:
    """The packaged teacher learned ``cprd_shapes`` with its own generator settings (partial
    captions, seed 0, 1200 train images); say so when the students' data differ: another
    caption mode, or other splits, whose val/test scenes may be among its train scenes."""
    stored = load_checkpoint(PACKAGED_TEACHER)["config"].get("datasets", {}).get("cprd_shapes", {}).get("generator", {})
    cfg = load_config(Namespace(cfg_path=args.student_cfg, options=[*args.options, *args.student_options]))
    ours = OmegaConf.to_container(cfg.datasets_cfg.get("cprd_shapes", {}).get("generator", {}) or {})
    # captions/image_size: what its ITM learned to read; seed/num_*: its train scenes may be the students' val/test ones
    differ = sorted(k for k in set(stored) | set(ours) if k != "extra_train" and stored.get(k) != ours.get(k))
    if differ:
        log.warning("the packaged teacher was trained on cprd_shapes with %s; the students' data differ in %s "
                    "(use --retrain-teacher for a teacher of this data)", {k: stored.get(k) for k in differ}, differ)
