"""``compare --tune N``: every method gets the same number of val trials over its own knobs.

Each registered loss names its knobs and their values (``DistillLoss.tune``: CPRD's weight,
``valid_threshold``, normalisation and temperature; kl's and loopitr's weight and
``teacher_temp``; margin_mse's weight and the scale of its logits; ...). Per method:

- trial 0 is the method as configured (no override);
- trials 1 .. N-1 are drawn without replacement from the product of its knob values by a
  random generator seeded with ``--tune-seed`` and the method's name, so a method's draw does
  not depend on which other methods run;
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
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from lavis_cprd.apps.reporting import val_at_best
from lavis_cprd.distill.config import DistillConfig
from lavis_cprd.distill.registry import get_loss
from lavis_cprd.training.launch import load_config
from lavis_cprd.training.selection import AUTO, selected_key

log = logging.getLogger(__name__)

Trial = Tuple[str, ...]  # config overrides of one trial (empty: the method as configured)


def draw_trials(method: str, n: int, configured: Mapping[str, Any], seed: int = 0) -> List[Trial]:
    """``n`` trials of ``method``: the configured values first, then ``n - 1`` distinct other
    combinations of its knobs (``DistillLoss.tune``), drawn with ``seed``."""
    space = get_loss(method).tune
    keys = sorted(space)
    combos = [c for c in itertools.product(*(space[k] for k in keys))
              if any(not _same(v, configured.get(k)) for k, v in zip(keys, c))]
    if n - 1 > len(combos):
        raise ValueError(f"--tune {n}: {method} has only {len(combos) + 1} distinct settings of {keys}; "
                         f"give every method the same smaller budget")
    picked = random.Random(f"tune:{seed}:{method}").sample(combos, n - 1)
    return [()] + [tuple(f"model.distill.{k}={v}" for k, v in zip(keys, c)) for c in picked]


def _same(a, b) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def trial_label(method: str, trial: Trial) -> str:
    knobs = ", ".join(o.split("model.distill.", 1)[1] for o in trial)
    return f"{method} ({knobs})" if knobs else f"{method} (as configured)"


def trial_runs(methods: Sequence[str], n: int, configured: Mapping[str, Any], seed: int = 0
               ) -> Dict[str, List[Tuple[str, str, List[str]]]]:
    """Per method, its trials as compare runs ``(run name, label, overrides)``: the ITC
    baseline (``none``: nothing to tune) is left out."""
    plan: Dict[str, List[Tuple[str, str, List[str]]]] = {}
    for method in methods:
        if get_loss(method).teacher is None:
            continue
        base = [f"model.distill.loss={method}", *get_loss(method).compare_options]
        plan[method] = [(f"tune_{method}_t{k}", trial_label(method, t), [*base, *t])
                        for k, t in enumerate(draw_trials(method, n, configured, seed))]
    return plan


def pick_winners(plan: Dict[str, List[Tuple[str, str, List[str]]]], ckpts: Dict[str, Dict[int, str]],
                 metric: str) -> Dict[str, Dict[str, Any]]:
    """Per method, every trial's val ``metric`` (``run.select_metric``, resolved per run) per
    seed and mean, and the trial with the best mean (the first on a tie: the configured values)."""
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
         ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Tuple[str, str, List[str]]]]:
    """Run every method's ``args.tune`` trials on ``args.tune_seeds`` (``train``: compare's
    ``train_students``, teacher scores shared within a seed) and pick each winner on val."""
    cfg = load_config(Namespace(cfg_path=args.student_cfg, options=[*args.options, *args.student_options]))
    distill = DistillConfig.from_cfg(cfg.model_cfg.get("distill", {}))
    knobs = {k for m in args.methods for k in get_loss(m).tune}  # whatever the registered losses tune
    configured = {k: getattr(distill, k) for k in knobs}
    metric = str(cfg.run_cfg.get("select_metric", AUTO))
    plan = trial_runs(args.methods, args.tune, configured, args.tune_seed)
    log.info("tuning: %d trials x %d seeds for each of %s (val %s)", args.tune, len(args.tune_seeds), list(plan), metric)
    tune_args = copy.copy(args)
    tune_args.seeds, tune_args.oracle = list(args.tune_seeds), None
    ckpts = train(tune_args, out, teacher_ckpt, [run for runs in plan.values() for run in runs], decisions)
    report = pick_winners(plan, ckpts, metric)
    return report, winners_plan(report, plan)


def tuned_from(path: str, methods: Sequence[str]) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Tuple[str, str, List[str]]]]:
    """``--tuned-from``: the winners of an earlier ``compare --tune`` (its ``results.json``),
    applied unchanged: another teacher or dataset gets the hyperparameters chosen on the first
    one's val split, and no trial of its own."""
    with open(path) as f:
        report = json.load(f).get("tuning")
    if not report:
        raise ValueError(f"--tuned-from {path}: no tuning report in it (made by compare --tune?)")
    missing = [m for m in methods if get_loss(m).teacher is not None and m not in report]
    if missing:
        raise ValueError(f"--tuned-from {path}: no tuned {missing}; it tuned {sorted(report)}")
    runs = {m: (m, m, list(report[m]["trials"][report[m]["winner"]]["options"])) for m in methods if m in report}
    return report, runs
