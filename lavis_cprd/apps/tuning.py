"""``compare --tune N``: every method gets the same number of val trials over its own knobs.

Each registered loss names its knobs and their values (``DistillLoss.tune``: CPRD's weight,
``valid_threshold``, normalisation and temperature; kl's and loopitr's weight and
``teacher_temp``; margin_mse's weight and the scale of its logits; ...). Per method:

- its weights are a grid: each gets N / (number of weights) trials;
- within each weight, its other knobs are drawn without replacement from the product of their
  values by a random generator seeded with ``--tune-seed`` and the method's name, so a
  method's draw does not depend on which other methods run;
- every trial trains on the ``--tune-seeds`` (2 by default) and is scored by the mean over
  them of its val ``run.select_metric`` at the best epoch (the same metric picked that epoch).

The winner of each method is then run on every ``--seeds`` seed and reported on test; its
tuning seeds are the same runs, reused. Nothing is chosen on test.
"""
from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import random
from argparse import Namespace
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from lavis_cprd.apps.reporting import val_at_best
from lavis_cprd.distill.registry import get_loss
from lavis_cprd.training.launch import load_config
from lavis_cprd.training.selection import AUTO, selected_key

log = logging.getLogger(__name__)

Trial = Tuple[str, ...]  # config overrides of one trial: its weight, then its other knobs


def draw_trials(method: str, n: int, seed: int = 0) -> List[Trial]:
    """``n`` trials of ``method``: its weights (``DistillLoss.tune["weight"]``) as a grid, each
    ``n / len(weights)`` times, and every other knob drawn at random within each weight, without
    repeating a setting, with ``seed``.

    The weight is gridded because it is the knob every method shares and the one that moves
    val most: random draws of equal number covered it unevenly (section 1 of docs/contest:
    kl and loopitr never drew the largest weight)."""
    space = get_loss(method).tune
    weights = tuple(space["weight"])
    if n <= 0 or n % len(weights):
        raise ValueError(f"--tune {n}: give a multiple of {len(weights)}, so that each of {method}'s weights "
                         f"{list(weights)} gets the same number of trials")
    others = sorted(k for k in space if k != "weight")
    combos = list(itertools.product(*(space[k] for k in others)))
    per_weight = n // len(weights)
    if per_weight > len(combos):
        raise ValueError(f"--tune {n}: {method} has only {len(weights) * len(combos)} distinct settings "
                         f"({len(weights)} weights x {len(combos)} of {others}); give every method the same smaller budget")
    rng = random.Random(f"tune:{seed}:{method}")
    return [(f"model.distill.weight={w}", *(f"model.distill.{k}={v}" for k, v in zip(others, c)))
            for w in weights for c in rng.sample(combos, per_weight)]


def trial_label(method: str, trial: Trial) -> str:
    return f"{method} ({', '.join(o.split('model.distill.', 1)[1] for o in trial)})"


def trial_runs(methods: Sequence[str], n: int, seed: int = 0) -> Dict[str, List[Tuple[str, str, List[str]]]]:
    """Per method, its trials as compare runs ``(run name, label, overrides)``: the ITC
    baseline (``none``: nothing to tune) is left out."""
    plan: Dict[str, List[Tuple[str, str, List[str]]]] = {}
    for method in methods:
        if get_loss(method).teacher is None:
            continue
        base = [f"model.distill.loss={method}", *get_loss(method).compare_options]
        plan[method] = [(f"tune_{method}_t{k}", trial_label(method, t), [*base, *t])
                        for k, t in enumerate(draw_trials(method, n, seed))]
    return plan


def pick_winners(plan: Dict[str, List[Tuple[str, str, List[str]]]], ckpts: Dict[str, Dict[int, str]],
                 metric: str) -> Dict[str, Dict[str, Any]]:
    """Per method, every trial's val ``metric`` (``run.select_metric``, resolved per run) per
    seed and mean, and the trial with the best mean (the first on a tie: the smaller weight)."""
    report: Dict[str, Dict[str, Any]] = {}
    for method, trials in plan.items():
        rows, key = [], metric
        for name, label, options in trials:
            vals = []
            for seed, ckpt in sorted(ckpts[name].items()):
                val = val_at_best(os.path.dirname(ckpt))
                if not val:
                    raise KeyError(f"run {name} seed {seed} logged no val metrics at its best epoch")
                key = selected_key(metric, val)
                vals.append(float(val[key]))
            rows.append({"run": name, "label": label, "options": options, "val": vals, "mean": float(np.mean(vals))})
        best = max(range(len(rows)), key=lambda i: (rows[i]["mean"], -i))
        report[method] = {"trials": rows, "winner": best, "metric": key if key == metric else f"{key} ({metric})"}
        log.info("tuning %s: %s wins (val %s %.2f)", method, rows[best]["label"], metric, rows[best]["mean"])
    return report


def tuning_table(report: Dict[str, Dict[str, Any]], seeds: Sequence[int]) -> str:
    """Every trial's val score, the winners in bold."""
    lines = [f"| method | trial | val {next(iter(report.values()))['metric'] if report else ''} per seed "
             f"({', '.join(map(str, seeds))}) | mean |", "|---|---|---|---|"]
    for method, r in report.items():
        for i, t in enumerate(r["trials"]):
            mark = "**" if i == r["winner"] else ""
            per_seed = " / ".join(f"{v:.1f}" for v in t["val"])
            lines.append(f"| {method} | {mark}{t['label']}{mark} | {per_seed} | {mark}{t['mean']:.2f}{mark} |")
    return "\n".join(lines)


def winners_plan(report: Dict[str, Dict[str, Any]], plan: Dict[str, List[Tuple[str, str, List[str]]]]
                 ) -> Dict[str, Tuple[str, str, List[str]]]:
    """Per method, its winning trial as a compare run: the same run name (its tuning seeds
    reused), the method's name as its table label."""
    out = {}
    for method, r in report.items():
        name, _, options = plan[method][r["winner"]]
        out[method] = (name, method, options)
    return out


Train = Callable[..., Dict[str, Dict[int, str]]]  # compare.train_students


def tune(args: Namespace, out: str, teacher_ckpt: str, decisions: list, train: Train
         ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Tuple[str, str, List[str]]], Dict[str, Dict[int, str]]]:
    """Run every method's ``args.tune`` trials on ``args.tune_seeds`` (``train``: compare's
    ``train_students``, teacher scores shared within a seed) and pick each winner on val.
    Returns the report, each winner as a compare run and every trial's checkpoints (the
    winners' tuning seeds are reused from them)."""
    cfg = load_config(Namespace(cfg_path=args.student_cfg, options=[*args.options, *args.student_options]))
    metric = str(cfg.run_cfg.get("select_metric", AUTO))
    plan = trial_runs(args.methods, args.tune, args.tune_seed)
    log.info("tuning: %d trials x %d seeds for each of %s (val %s)", args.tune, len(args.tune_seeds), list(plan), metric)
    tune_args = copy.copy(args)
    tune_args.seeds, tune_args.oracle = list(args.tune_seeds), None
    ckpts = train(tune_args, out, teacher_ckpt, [run for runs in plan.values() for run in runs], decisions)
    report = pick_winners(plan, ckpts, metric)
    return report, winners_plan(report, plan), ckpts


def tuned_from(path: str, methods: Sequence[str]
               ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Tuple[str, str, List[str]]], List[int]]:
    """``--tuned-from``: the winners of an earlier ``compare --tune`` (its ``results.json``, or a
    file holding its ``tuning`` and ``tune_seeds``), applied unchanged: another teacher or
    dataset gets the hyperparameters chosen on the first one's val split, and no trial of its
    own. Returns the report, each method's winning run and the seeds its trials ran on."""
    with open(path) as f:
        contest = json.load(f)
    report = contest.get("tuning")
    if not report:
        raise ValueError(f"--tuned-from {path}: no tuning report in it (made by compare --tune?)")
    missing = [m for m in methods if get_loss(m).teacher is not None and m not in report]
    if missing:
        raise ValueError(f"--tuned-from {path}: no tuned {missing}; it tuned {sorted(report)}")
    runs = {m: (m, m, list(report[m]["trials"][report[m]["winner"]]["options"])) for m in methods if m in report}
    return report, runs, list(contest.get("tune_seeds") or [])
