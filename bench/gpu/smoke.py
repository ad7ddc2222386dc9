"""The GPU kit's smoke run of the training and evaluation entry points, on the embedded
default (configs/cprd_tiny_shapes.yaml, distilling from epoch 0, small generated data):

1. ``torchrun --nproc_per_node 1 -m lavis_cprd.apps.train``, killed (SIGKILL to the launcher
   and its worker at once, as a crash would) as soon as its first ``checkpoint_latest.pth``
   exists;
2. the same command with ``--resume auto``: it must continue in the same job folder, from
   the epoch after the checkpoint's, and finish (val every epoch, test at the end);
3. ``lavis-cprd evaluate --ckpt <job>/checkpoint_best.pth`` with the same config: its test
   metrics must equal the run's (``metrics.json``'s ``test/best``).

    python bench/gpu/smoke.py --work /tmp/kit/smoke --json smoke.json [--small]

Every check and its outcome goes into the JSON; the exit status is 0 when all passed.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "cprd_tiny_shapes.yaml")
_children: list = []


def options(args) -> list:
    n_train, n_eval, epochs = (64, 16, 3) if args.small else (512, 64, 4)
    return ["model.distill.start_epoch=0", f"run.max_epoch={epochs}", f"run.batch_size_train={16 if args.small else 32}",
            f"datasets.cprd_shapes.generator.num_train={n_train}", f"datasets.cprd_shapes.generator.num_val={n_eval}",
            f"datasets.cprd_shapes.generator.num_test={n_eval}", "run.warmup_steps=4", f"run.seed={args.seed}"]


def torchrun(args, output_dir: str, *extra) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "-m", "lavis_cprd.apps.train", "--cfg-path", CONFIG,
            "--options", *options(args), f"run.output_dir={output_dir}", *extra]


def evaluate_cmd(args, output_dir: str, ckpt: str) -> list:
    # `lavis-cprd evaluate`: the console script's own dispatcher, run by this Python (a
    # `lavis-cprd` on PATH may belong to another environment)
    return [sys.executable, "-m", "lavis_cprd_cli", "evaluate", "--cfg-path", CONFIG, "--ckpt", ckpt, "--options", *options(args),
                   f"run.output_dir={output_dir}"]


def start(cmd, log):
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    _children.append(proc)
    return proc


def descendants(pid: int) -> list:
    """Every live process below ``pid`` (from /proc): torchrun starts its workers in sessions of
    their own, so killing its process group alone would leave them training."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill(proc) -> None:
    """SIGKILL to ``proc``, its process group and every process below it, at once (a crash)."""
    if proc.poll() is None:
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run(cmd, log_path: str, timeout: float) -> int:
    with open(log_path, "w") as log:
        proc = start(cmd, log)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
            return 124


def close(a, b) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="a folder of its own (emptied first)")
    parser.add_argument("--json", required=True)
    parser.add_argument("--small", action="store_true", help="fewer samples and epochs (the CPU rehearsal)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=170, help="seconds for all three stages together")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))  # the kit's step timeout: clean up below
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    train_out, eval_out = os.path.join(args.work, "train"), os.path.join(args.work, "evaluate")
    deadline = time.time() + args.timeout
    result = {"config": CONFIG, "options": options(args), "checks": {}}
    checks = result["checks"]

    def finish():
        result["passed"] = bool(checks) and all(checks.values())
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
        return result

    try:
        # 1. train until the first resumable checkpoint, then kill the whole launcher group
        t0 = time.time()
        with open(os.path.join(args.work, "train_killed.log"), "w") as log:
            proc = start(torchrun(args, train_out), log)
            while not glob.glob(os.path.join(train_out, "*", "checkpoint_latest.pth")):
                if proc.poll() is not None or time.time() > deadline:
                    break
                time.sleep(0.05)
            ended_by_itself = proc.poll() is not None
            kill(proc)
        result["first_run_s"] = time.time() - t0
        jobs = glob.glob(os.path.join(train_out, "*", "checkpoint_latest.pth"))
        checks["first_run_wrote_checkpoint_latest"] = bool(jobs)
        checks["first_run_killed_before_its_end"] = bool(jobs) and not ended_by_itself
        if not jobs:
            return finish()
        job = os.path.dirname(jobs[0])
        import torch

        killed_at = int(torch.load(jobs[0], map_location="cpu", weights_only=True)["epoch"])
        result.update(job=job, killed_after_epoch=killed_at)

        # 2. --resume auto: the same job folder, from the next epoch, to the end
        t0 = time.time()
        resume_log = os.path.join(args.work, "train_resumed.log")
        rc = run(torchrun(args, train_out, "--resume", "auto"), resume_log, deadline - time.time())
        result.update(resume_rc=rc, resume_s=time.time() - t0)
        text = open(resume_log, errors="replace").read()
        checks["resume_exit_0"] = rc == 0
        checks["resumed_from_the_killed_checkpoint"] = (
            f"Resumed from {os.path.join(job, 'checkpoint_latest.pth')} at epoch {killed_at + 1}" in text)
        checks["resume_stayed_in_its_job_folder"] = glob.glob(os.path.join(train_out, "*")) == [job]
        metrics_path = os.path.join(job, "metrics.json")
        logged = json.load(open(metrics_path)) if os.path.exists(metrics_path) else {}
        epochs = int(next(o for o in options(args) if o.startswith("run.max_epoch=")).split("=")[1])
        result["logged_splits"] = sorted(logged)
        checks["val_every_epoch_and_test"] = all(f"val/{e}" in logged for e in range(epochs)) and "test/best" in logged
        best = os.path.join(job, "checkpoint_best.pth")
        if rc != 0 or not os.path.exists(best) or "test/best" not in logged:
            return finish()

        # 3. lavis-cprd evaluate --ckpt best: the run's test metrics again
        t0 = time.time()
        eval_log = os.path.join(args.work, "evaluate.log")
        result["evaluate_command"] = " ".join(evaluate_cmd(args, eval_out, best))
        rc = run(evaluate_cmd(args, eval_out, best), eval_log, deadline - time.time())
        result.update(evaluate_rc=rc, evaluate_s=time.time() - t0)
        checks["evaluate_exit_0"] = rc == 0
        found = glob.glob(os.path.join(eval_out, "*", "metrics.json"))
        evaluated = json.load(open(found[0])) if found else {}
        evaluated = evaluated.get("test", evaluated)
        run_test = logged["test/best"]
        result["test_metrics_run"], result["test_metrics_evaluate"] = run_test, evaluated
        differ = sorted(k for k in run_test if not close(run_test[k], evaluated.get(k)))
        result["metrics_that_differ"] = differ
        result["metrics_bit_equal"] = bool(evaluated) and all(evaluated.get(k) == v for k, v in run_test.items())
        checks["evaluate_metrics_equal_the_runs_test_metrics"] = bool(evaluated) and not differ
        return finish()
    finally:
        for proc in _children:
            kill(proc)
        if "passed" not in result:
            checks.setdefault("completed_within_its_time", False)
            finish()


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
