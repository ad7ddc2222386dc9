"""``lavis-cprd compare``: every distillation method on the embedded default, same teacher,
same seeds, same schedule, evaluated with LAVIS's retrieval metrics.

Runs, per seed: the baseline (``none``), each peer loss, and the ablations of the CPRD
paper: ``cprd`` vs ``listmle_full`` (the order of hard negatives vs every order, finding 2)
and sweeps of the CPRD weight and of K (finding 3). For finding 1 it records, per method,
the teacher's and the student's score statistics on positives, hard and easy negatives.
Writes ``results.md`` (mean ± std over seeds), ``results.json``, ``metrics.png`` (each metric per
method, a dot per seed) and ``score_distributions.png``.
Finished runs are reused when trained for the same resolved config, lavis_cprd version and
checkpoint contents (``apps.run_reuse``), so an interrupted comparison resumes and a changed one
retrains; the log and the final summary say which runs were reused and why the others trained.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from lavis_cprd.apps.run_reuse import RunDecision, summarize_decisions
from lavis_cprd.apps.tuning import tune, tuned_from, tuning_table
from lavis_cprd.apps.runs import common_parser, ensure_teacher, eval_split, load_trained, train_run
from lavis_cprd.distill.registry import get_loss, list_losses
from lavis_cprd.datasets.true_matches import dataset_relevance
from lavis_cprd.relevance import relevance_metrics
from lavis_cprd.apps.reporting import (
    ScoreTable,
    checkpoint_label,
    best_epoch,
    kendall_tau_on_hard_negatives,
    markdown_table,
    plot_metrics_per_method,
    plot_score_distributions,
    relevance_table,
    score_distributions,
    summarize,
    teacher_all_pairs,
    val_at_best,
)

log = logging.getLogger("lavis_cprd.apps.compare")
LABEL_BASELINE = "ITC only (baseline)"


def parse_args(argv: Optional[List[str]], prog: str = "lavis-cprd compare", description: Optional[str] = None,
               default_output: str = "output/compare"):
    """``compare``'s flags; ``demo`` shows them under its own name, description and output folder."""
    p = common_parser(prog, description or __doc__.split("\n\n")[0], default_output)
    p.add_argument("--methods", nargs="+", default=list_losses(), help="losses to train (default: all)")
    p.add_argument("--weights", type=float, nargs="*", default=[0.5, 2.0], help="extra CPRD weights to sweep")
    p.add_argument("--ks", type=int, nargs="*", default=[2, 8], help="extra CPRD numbers of hard negatives to sweep")
    p.add_argument("--temperatures", nargs="*", default=[], help="extra CPRD distillation temperatures to sweep "
                   "(numbers or 'itc')")
    p.add_argument("--oracle", nargs="*", default=None, metavar="METHOD",
                   help="also distil these cross-encoder methods (all of them when none is named) from the "
                   "shapes_oracle teacher (ground truth of cprd_shapes: the upper bound of what a teacher can give)")
    p.add_argument("--no-trained-teacher", action="store_true", help="with --oracle: only the oracle runs "
                   "(the trained teacher is still used for the score statistics)")
    p.add_argument("--tune", type=int, default=0, metavar="N", help="first give every method N val trials over its "
                   "own knobs (DistillLoss.tune: the weights a grid, so N a multiple of 6; the other knobs drawn) "
                   "on --tune-seeds, then run each winner on --seeds (apps.tuning)")
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1], help="seeds of every tuning trial")
    p.add_argument("--tune-seed", type=int, default=0, help="seed of the trials' draw")
    p.add_argument("--tuned-from", default=None, help="results.json of an earlier --tune: its winners, untouched "
                   "(demo: the packaged winners, lavis_cprd/configs/tuned/; 'none': the configured knobs)")
    p.add_argument("--no-shared-scores", action="store_true", help="every run scores its own teacher pairs (by "
                   "default the runs of one seed draw the same batches, so its first all-pair run records the "
                   "trained teacher's logits and its other cross-encoder runs read them: the same numbers, "
                   "less time)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods) - set(list_losses()))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list_losses()}")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    unknown = sorted(set(args.oracle or []) - set(args.methods))
    if unknown:
        p.error(f"--oracle {unknown}: not among --methods {args.methods}")
    if args.tuned_from == "none":
        args.tuned_from = None
    if args.tune and args.tuned_from:
        p.error("--tune and --tuned-from: give one (tune here, or apply an earlier contest's winners)")
    return args


ORACLE_OPTIONS = ["model.distill.teacher.arch=shapes_oracle"]
LABEL_TEACHER = "teacher: ITM on every pair"
PLOTTED_METRICS = ("r_mean", "rel_map_at_r", "rank_tau")
MAX_TEACHER_PAIRS = 400_000  # the teacher scores every test pair when there are at most this many


def plan(args, tuned: Optional[Dict[str, Tuple[str, str, List[str]]]] = None) -> List[Tuple[str, str, List[str]]]:
    """``(run name, table label, config overrides)`` of every student configuration (a tuned
    method: its winning trial, ``apps.tuning``); with ``--oracle`` each cross-encoder run also
    with the ``shapes_oracle`` teacher."""
    runs = [
        (tuned or {}).get(m) or
        (m, LABEL_BASELINE if m == "none" else m, [f"model.distill.loss={m}", *get_loss(m).compare_options])
        for m in args.methods
    ]
    cprd = "model.distill.loss=cprd"
    runs += [(f"cprd_weight{w:g}", f"cprd, weight {w:g}", [cprd, f"model.distill.weight={w}"]) for w in args.weights]
    runs += [(f"cprd_k{k}", f"cprd, K = {k}", [cprd, f"model.distill.num_hard_negatives={k}"]) for k in args.ks]
    runs += [(f"cprd_temp{t}", f"cprd, temperature {t}", [cprd, f"model.distill.temperature={t}"])
             for t in args.temperatures]
    if args.oracle is None:
        return runs
    out = []
    for name, label, options in runs:
        method = _loss_of(options)
        cross = get_loss(method).teacher == "cross" and (not args.oracle or method in args.oracle)
        if not (cross and args.no_trained_teacher):
            out.append((name, label, options))
        if cross:
            out.append((f"{name}_oracle", f"{label} (oracle teacher)", [*options, *ORACLE_OPTIONS]))
    return out


def _loss_of(options: List[str]) -> str:
    return next(o for o in options if o.startswith("model.distill.loss=")).split("=", 1)[1]


def _reads_trained_teacher(options: List[str]) -> bool:
    """Whether a run scores pairs with the shared trained cross-encoder."""
    return get_loss(_loss_of(options)).teacher == "cross" and not set(ORACLE_OPTIONS) <= set(options)


def score_recorders(args, todo: List[Tuple[str, int, List[str]]]) -> Dict[int, str]:
    """``{seed: run name}``: per seed, the first run of the plan that scores every in-batch pair
    with the trained teacher (kl, listmle_full). It records the teacher's logits; the seed's
    other cross-encoder runs draw the same batches and read them. None with
    ``--no-shared-scores`` or when the overrides set a teacher cache themselves."""
    given = [*args.options, *args.student_options]
    if args.no_shared_scores or any(o.startswith(("model.distill.teacher_cache=", "model.distill.teacher_record="))
                                    for o in given):
        return {}
    recorders: Dict[int, str] = {}
    for name, seed, options in todo:
        if _reads_trained_teacher(options) and get_loss(_loss_of(options)).candidates == "all":
            recorders.setdefault(seed, name)
    return recorders


def run_order(job: Tuple[str, int, List[str]], recorders: Dict[int, str], seeds: List[int]) -> Tuple[int, int, bool]:
    """Sort key of a run: the recorders first (the longest runs: no long run is left alone at
    the end), then the runs that read no recorded scores, then the readers seed by seed, so a
    worker picks a reader only once its recorder has (nearly always) finished; all-pair runs
    first within each group."""
    name, seed, options = job
    if recorders.get(seed) == name:
        return (0, 0, False)
    reads = seed in recorders and _reads_trained_teacher(options)
    return (1, 1 + seeds.index(seed) if reads else 0, get_loss(_loss_of(options)).candidates != "all")


def train_students(args, out: str, teacher_ckpt: str, runs: List[Tuple[str, str, List[str]]],
                   decisions: Optional[List[RunDecision]] = None,
                   trained: Optional[Dict[str, Dict[int, str]]] = None) -> Dict[str, Dict[int, str]]:
    """Every (run, seed) of the plan trained (or reused) into ``out/NAME_seedS``, ``args.jobs``
    at a time; returns ``{name: {seed: checkpoint}}`` in plan order. The teacher's scores are
    shared within a seed (``score_recorders``): a reading run waits for its recorder.

    ``trained``: checkpoints of this invocation already trained (``--tune``'s trials), taken as
    they are. Sent through the plan again, a trial's request could differ in which run
    recorded its seed's scores, and it would retrain for identical results."""
    trained = trained or {}
    todo = [(name, seed, options) for seed in args.seeds for name, _, options in runs
            if seed not in trained.get(name, {})]
    recorders = score_recorders(args, todo)
    todo.sort(key=lambda job: run_order(job, recorders, args.seeds))
    threads = None if args.jobs == 1 else max(1, torch.get_num_threads() // args.jobs)
    recording: Dict[int, object] = {}  # seed -> the recorder's future

    def scores_of(seed: int) -> str:
        return os.path.join(out, f"{recorders[seed]}_seed{seed}", "teacher_scores")

    def one(n: int, name: str, seed: int, options: List[str]) -> str:
        shared = None  # the distill key that shares this seed's teacher scores, if any
        if recorders.get(seed) == name:
            shared = "teacher_record"
        elif seed in recorders and _reads_trained_teacher(options):
            recording[seed].result()  # queued before this run: never waits on a run not yet started
            if os.path.isfile(os.path.join(scores_of(seed), "manifest.json")):  # absent if reused from before recording
                shared = "teacher_cache"
        log.info("[%d/%d] %s, seed %d%s", n, len(todo), name, seed, f" ({shared})" if shared else "")
        opts = [*args.options, *args.student_options, *options, f"run.seed={seed}",
                f"model.distill.teacher.checkpoint={teacher_ckpt}",
                *([f"model.distill.{shared}={scores_of(seed)}"] if shared else [])]
        return train_run(args.student_cfg, opts, os.path.join(out, f"{name}_seed{seed}"), threads, decisions)

    eval_split(args.student_cfg, [*args.options, *args.student_options])  # data generated once, before runs side by side
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = []
        for n, job in enumerate(todo, start=1):
            futures.append(pool.submit(one, n, *job))
            if recorders.get(job[1]) == job[0]:
                recording[job[1]] = futures[-1]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            done = [f.result() for f in futures]
        except BaseException:  # the first failure (or Ctrl-C): start no more runs, let the running ones end
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    ckpts: Dict[str, Dict[int, str]] = {name: {} for name, _, _ in runs}
    for (name, seed, _), ckpt in zip(todo, done):
        ckpts[name][seed] = ckpt
    for name in ckpts:
        ckpts[name].update({s: c for s, c in trained.get(name, {}).items() if s in args.seeds})
        ckpts[name] = dict(sorted(ckpts[name].items()))
    return ckpts


@torch.no_grad()
def teacher_metrics(teacher, images: torch.Tensor, dataset, truth: Dict[str, np.ndarray],
                    i2t: Optional[np.ndarray] = None) -> Dict[str, float]:
    """LAVIS's metrics and the relevance-aware ones of the teacher's ITM on every pair of a
    split (``i2t``, scored here when not given): its full ranking, which LAVIS's ITC top-k
    re-rank hides."""
    from lavis.tasks.retrieval import RetrievalTask

    if i2t is None:
        i2t = teacher_all_pairs(teacher, images, dataset.text)
    metrics = RetrievalTask._report_metrics(i2t, i2t.T, dataset.txt2img, dataset.img2txt)
    metrics.update(relevance_metrics(i2t, truth["true"], truth["annotated"], truth.get("grades")))
    return metrics


@torch.no_grad()
def evaluate(args, out: str, teacher_ckpt: str, ckpts: Dict[str, Dict[int, str]], labels: Dict[str, str]) -> Dict:
    from lavis.tasks.retrieval import RetrievalTask
    from torch.utils.data import DataLoader

    from lavis_cprd.training import lavis_patches
    from lavis_cprd.distributed import resolve_device
    from lavis_cprd.teachers import BlipITMTeacher

    device = resolve_device("auto")
    dataset, cfg = eval_split(args.student_cfg, [*args.options, *args.student_options])
    lavis_patches.set_output_dir(out)  # LAVIS's _report_metrics appends to evaluate.txt here
    loader = DataLoader(dataset, batch_size=64, shuffle=False)
    images = torch.cat([b["image"] for b in loader]).to(device)
    teacher = BlipITMTeacher(load_trained(teacher_ckpt, device))
    k_hard = max(int(cfg.model_cfg.distill.num_hard_negatives), 8)
    # The teacher scores every test pair once (when there are few enough); the score statistics
    # and tau of every method look their pairs up in that table.
    all_pairs = teacher_all_pairs(teacher, images, dataset.text) if len(images) * len(dataset.text) <= MAX_TEACHER_PAIRS else None
    scorer = teacher if all_pairs is None else ScoreTable(all_pairs)

    truth = dataset_relevance(dataset)
    plotted = next((n for n in ckpts if labels[n] == "cprd"), next(iter(ckpts)))  # whose score distributions are drawn
    runs: Dict[str, List[Dict]] = {}
    finding1: Dict[str, Dict] = {}
    tau: Dict[str, float] = {}
    for name, by_seed in ckpts.items():
        for seed in sorted(by_seed):
            i2t, t2i = load_trained(by_seed[seed], device).compute_sim_matrix(loader)
            metrics = RetrievalTask._report_metrics(i2t, t2i, dataset.txt2img, dataset.img2txt)
            if truth is not None:
                metrics.update(relevance_metrics(i2t, truth["true"], truth["annotated"], truth.get("grades"), t2i))
            metrics["best_epoch"] = best_epoch(by_seed[seed])
            runs.setdefault(name, []).append(metrics)
            if seed == min(by_seed):  # score statistics and tau on the first seed
                dists = score_distributions(scorer, images, dataset, i2t, k_hard, true=None if truth is None else truth["true"])
                finding1[name] = {k: v["summary"] for k, v in dists.items()}
                tau[name] = kendall_tau_on_hard_negatives(scorer, images, dataset, i2t, k=k_hard)
                if name == plotted:
                    plot_score_distributions(dists, os.path.join(out, "score_distributions.png"), "teacher " + checkpoint_label(teacher_ckpt),
                                             f"student {labels[name]}, seed {seed}")
    table = [summarize(labels[name], runs[name]) for name in ckpts]
    val = {name: [val_at_best(os.path.dirname(by_seed[s])) for s in sorted(by_seed)] for name, by_seed in ckpts.items()}
    val_table = [summarize(labels[n], v) for n, v in val.items() if v and all(m is not None for m in v)]
    teacher_row = None
    if truth is not None and all_pairs is not None:
        teacher_row = summarize(LABEL_TEACHER, [teacher_metrics(teacher, images, dataset, truth, all_pairs)])
    return {"table": table, "val_table": val_table, "teacher": teacher_row, "runs": runs, "labels": {n: labels[n] for n in ckpts},
            "score_distributions": finding1, "kendall_tau": tau, "score_distributions_plotted": plotted,
            "device": str(device)}


def main(argv: Optional[List[str]] = None, **parser_options) -> Dict:
    """``parser_options``: ``parse_args``'s ``prog``, ``description``, ``default_output`` (``demo``'s)."""
    args = parse_args(argv, **parser_options)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    t_start = time.time()

    decisions: List[RunDecision] = []  # per run folder: reused or trained, and why
    teacher_ckpt = os.path.abspath(ensure_teacher(args, out, decisions))
    tuning, tuned, trials = tune(args, out, teacher_ckpt, decisions, train_students) if args.tune else (None, None, {})
    if args.tuned_from:
        tuning, tuned, args.tune_seeds = tuned_from(args.tuned_from, args.methods)
    runs = plan(args, tuned)
    ckpts = train_students(args, out, teacher_ckpt, runs, decisions, trained=trials)

    results = evaluate(args, out, teacher_ckpt, ckpts, {name: label for name, label, _ in runs})
    results.update(seeds=args.seeds, teacher_checkpoint=teacher_ckpt, seconds=time.time() - t_start, tuning=tuning,
                   tune_seeds=args.tune_seeds if tuning else None, tuned_from=args.tuned_from,
                   run_reuse={os.path.basename(d.run_dir): {"reused": d.reused, "reason": d.reason} for d in decisions})
    report = write_report(results, out)
    print("\n" + report + "\n" + summarize_decisions(decisions))
    print(f"Wrote {out}/results.md, results.json, metrics.png, score_distributions.png ({results['seconds'] / 60:.1f} min)")
    return results


def findings_table(results: Dict) -> str:
    """Per method: the r_mean gap to the baseline (means over seeds) and, on the first seed,
    the Kendall tau of the student's order of its hard negatives against the teacher's and the
    finding-1 score means (student cosine, teacher match probability) on positives, hard and
    easy negatives."""
    base = next((r["r_mean"] for r in results["table"] if r["name"] == LABEL_BASELINE), None)
    head = ("| model | r_mean − baseline | Kendall tau | student cos: pos / hard / easy | "
            "teacher p(match): pos / hard / easy |")
    lines = [head, "|---|---|---|---|---|"]
    groups = ("positive", "hard negative", "easy negative")
    for name, row in zip(results["kendall_tau"], results["table"]):
        stats = results["score_distributions"][name]
        gap = "—" if base is None or row["name"] == LABEL_BASELINE else f"{row['r_mean'] - base:+.1f}"
        student = " / ".join(f"{stats[g]['student_mean']:.2f}" for g in groups)
        teacher = " / ".join(f"{stats[g]['teacher_mean']:.2f}" for g in groups)
        lines.append(f"| {row['name']} | {gap} | {results['kendall_tau'][name]:.2f} | {student} | {teacher} |")
    return "\n".join(lines)


def write_report(results: Dict, out: str) -> str:
    """``results.json``, ``results.md`` (metrics over seeds, then the findings table), ``metrics.png``."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    seeds = ", ".join(str(s) for s in results.get("seeds", []))
    report = (
        f"Test split, mean ± std over seeds {seeds}:\n\n{markdown_table(results['table'])}\n\n"
        + (f"Relevance-aware metrics (every true match counted; ranking correlation: Kendall tau of the "
           f"student's scores with the graded relevance of its 8 hardest negatives), test split:\n\n"
           f"{relevance_table(([results['teacher']] if results.get('teacher') else []) + results['table'])}\n\n"
           if "rel_map_at_r" in results["table"][0] else "")
        +
        f"Gap to the baseline (means over seeds); on the first seed, the order agreement with the "
        f"teacher on the student's hard negatives and the mean scores (finding 1):\n\n{findings_table(results)}\n"
    )
    if results.get("tuning"):
        origin = (f"the contest of {results['tuned_from']} (`--tuned-from`; its trials were not re-run here)"
                  if results.get("tuned_from") else "this run")
        report += (f"\nTuning (apps.tuning) in {origin}: every trial's val score at its best epoch, the winners in "
                   f"bold, each method's row above is its winner:\n\n"
                   f"{tuning_table(results['tuning'], results['tune_seeds'])}\n")
    if results.get("val_table") and "rel_map_at_r" in results["val_table"][0]:
        report += ("\nThe same on the val split, at each run's best epoch (what choices are made on):\n\n"
                   f"{relevance_table(results['val_table'])}\n")
    plot_metrics_per_method(results["runs"], results["labels"], PLOTTED_METRICS, os.path.join(out, "metrics.png"),
                            baseline="none", title=f"test split: mean over seeds {seeds} (bars), each seed (dots)")
    plotted = results["labels"][results["score_distributions_plotted"]]
    report += (f"\nFigures: [metrics per method](metrics.png) (a dot per seed, dashed: ITC alone); "
               f"[score distributions](score_distributions.png) (the teacher and the {plotted} student, first seed).\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)
    return report


if __name__ == "__main__":
    main()
