"""Where a CPRD training step's time goes, and what the speed options buy.

    python bench/step_breakdown.py                                   # CPU, tiny towers (4 x 128, 48 px)
    python bench/step_breakdown.py --size base --device cuda --batch-size 32 --k 8 \\
        --variants fused+bf16,fp32,fused+bf16+compile,fused+bf16+ckpt   # BLIP-base, 384 px, one GPU

1. Variants, each built, warmed up, measured and freed alone, one after the other (median
   s/step, samples/s, peak memory): ``fp32`` (LAVIS's defaults: eager, float32, foreach
   AdamW), ``fused`` (fused AdamW, ``run.adamw_impl``'s default), ``bf16`` (autocast, as
   ``run.amp_dtype: bf16``), ``compile`` (``model.compile``, inductor), ``ckpt`` (ViT
   gradient checkpointing of the last ``--ckpt-layer`` blocks: the config's
   ``vit_ckpt_layer``, 4 for BLIP-base; every block where the config names none), ``itc``
   (no distillation: ITC alone, no teacher), ``cached`` (CPRD with every teacher score read
   from a ``TeacherScoreCache`` holding the batch's pairs: the floor a cache reaches; the
   teacher that filled it is freed first), and ``+`` combinations. Compilation happens in the
   warm-up steps, timed apart.
2. A breakdown of one variant's step (``--breakdown``, default the last): student encoders
   (forward), hard-negative mining, teacher scoring, the rest of the forward (similarities,
   losses), backward, optimizer, each timed with device synchronisation around it.
3. FLOPs of that step (``torch.utils.flop_counter``: student forward + backward, teacher
   forward) and the throughput achieved; on a GPU with a known bf16 peak (or
   ``--peak-tflops``), the fraction of that peak.

Random weights and pixels: speed does not depend on them. Peak memory on a GPU:
``peak_bytes`` is ``torch.cuda.max_memory_allocated`` during the measured steps above what was
allocated before the variant was built (its weights, gradients, optimizer state, teacher and
activations; no other variant is on the device then), ``step_peak_bytes`` the rise above the
allocation at a step's start (activations and temporaries). On CPU both are the resident-set
rise during a step.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import lavis_cprd  # noqa: E402,F401
from bench.common import full_cache, make_batch, measure_on, release, student_config, sync, write_json  # noqa: E402
from lavis_cprd.distill import objective  # noqa: E402
from lavis_cprd.models.dual_encoder import CprdDualEncoder  # noqa: E402

OPTIONS = ("fp32", "fused", "bf16", "compile", "ckpt", "itc", "cached")
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10G": 70.0}


def parse_variant(name: str) -> set:
    parts = set(name.split("+"))
    unknown = parts - set(OPTIONS)
    if unknown:
        raise SystemExit(f"--variants: {sorted(unknown)} not among {list(OPTIONS)} (join with '+')")
    if {"itc", "cached"} <= parts:
        raise SystemExit(f"--variants: {name!r}: itc has no teacher to cache")
    return parts


def config(args, variant: set):
    cfg = student_config(args.size, "none" if "itc" in variant else "cprd", args.k,
                         teacher_precision="bf16" if "bf16" in variant else "fp32")
    if "ckpt" in variant:
        cfg.vit_grad_ckpt, cfg.vit_ckpt_layer = True, ckpt_layer(args, cfg)
    if "compile" in variant:
        cfg.compile = True
    return cfg


def ckpt_layer(args, cfg) -> int:
    """``--ckpt-layer``, else the config's ``vit_ckpt_layer``, else every block."""
    if args.ckpt_layer is not None:
        return int(args.ckpt_layer)
    return int(cfg.get("vit_ckpt_layer", 0) or 0) or 1000


def build(args, variant: set, cache=None) -> CprdDualEncoder:
    torch.manual_seed(0)
    model = CprdDualEncoder.from_config(config(args, variant)).train().to(args.device)
    if "cached" in variant:
        model.objective.use_teacher_cache(cache)
    return model


def batch_cache(args, variant: set, batch):
    """The cached variants' teacher scores, from a model built and freed before any variant."""
    model = build(args, variant - {"cached", "compile", "ckpt"})
    cache = full_cache(model, batch)  # in the teacher's own precision (bf16 in bf16 variants)
    del model
    release(args.device)
    return cache


def step(model, batch, opt, bf16: bool, device: torch.device) -> None:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def phase_timers(model: CprdDualEncoder, device: torch.device, spent: Dict[str, float]):
    """Time the student's encoders, mining and the teacher inside ``model``'s forward."""
    def timed(name, fn):
        def wrapper(*args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            return out
        return wrapper

    targets = [(model, "encode_image", "student encoders (forward)"),
               (model, "encode_captions", "student encoders (forward)"),
               (objective, "mine_hard_negatives", "hard-negative mining")]
    if model.objective.teacher_built:  # ITC and fully cached steps never build it
        targets.append((model.teacher, "logit", "teacher scoring"))
    saved = [(owner, attr, vars(owner).get(attr, _MISSING)) for owner, attr, _ in targets]
    for owner, attr, name in targets:
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr, value in saved:  # instance attributes (e.g. compiled encoders) come back as they were
            delattr(owner, attr) if value is _MISSING else setattr(owner, attr, value)


_MISSING = object()


def breakdown(model, batch, opt, bf16: bool, device: torch.device, steps: int) -> Dict[str, float]:
    totals: List[Dict[str, float]] = []
    for _ in range(steps):
        spent: Dict[str, float] = {}
        with phase_timers(model, device, spent):
            sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(batch)["loss"]
            sync(device)
            t1 = time.perf_counter()
            loss.backward()
            sync(device)
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            t3 = time.perf_counter()
        inner = sum(spent.values())
        spent["rest of forward (similarities, losses)"] = (t1 - t0) - inner
        spent["backward"], spent["optimizer step"], spent["total"] = t2 - t1, t3 - t2, t3 - t0
        totals.append(spent)
    return {k: statistics.median(t[k] for t in totals) for k in totals[0]}


def step_flops(model, batch, bf16: bool, device: torch.device) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_tflops(device: torch.device, override) -> float | None:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=4, help="hard negatives per query")
    parser.add_argument("--variants", default="fp32,fused,fused+bf16,fused+compile,fused+ckpt,fused+bf16+compile",
                        help=f"comma-separated; options {list(OPTIONS)}")
    parser.add_argument("--breakdown", default=None, help="the variant to break down (default: the last)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ckpt-layer", type=int, default=None,
                        help="ViT blocks the ckpt variants recompute (default: the config's vit_ckpt_layer, else all)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak, if not in the table")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    variants = {name: parse_variant(name) for name in args.variants.split(",")}
    chosen = args.breakdown or list(variants)[-1]
    if chosen not in variants:
        raise SystemExit(f"--breakdown {chosen!r} is not among --variants {list(variants)}")
    base_cfg = student_config(args.size, "cprd", args.k)
    image_size, layers = int(base_cfg.image_size), ckpt_layer(args, base_cfg)
    batch = make_batch(args.batch_size, image_size, device=device)
    caches = {}
    for name, parts in variants.items():
        if "cached" in parts and ("bf16" in parts) not in caches:
            caches["bf16" in parts] = batch_cache(args, parts, batch)
    med, peaks, step_peaks, warm = {}, {}, {}, {}
    phases = flops = None
    release(device)
    for name, parts in variants.items():  # each alone: built, measured, freed
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        model = build(args, parts, caches.get("bf16" in parts))
        impl = {"fused": True} if "fused" in parts else {"foreach": True}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, **impl)
        bf16 = "bf16" in parts
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.warmup):  # compiles, builds the teacher, warms the allocator
            step(model, batch, opt, bf16, device)
        sync(device)
        warm[name] = time.perf_counter() - t0
        times, peaks[name], step_peaks[name] = [], 0, 0
        for _ in range(args.steps):
            start = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            _, t, rise = measure_on(lambda: step(model, batch, opt, bf16, device), device)
            times.append(t)
            step_peaks[name] = max(step_peaks[name], rise)
            peaks[name] = max(peaks[name], start + rise - before if device.type == "cuda" else rise)
        med[name] = statistics.median(times)
        if name == chosen:
            phases = breakdown(model, batch, opt, bf16, device, args.steps)
            flops = step_flops(model, batch, bf16, device)
        del model, opt
        release(device)
    first = next(iter(variants))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"CPRD step, {args.size} towers, batch {args.batch_size}, K = {args.k}, {where}, median of {args.steps}")
    print(f"| variant | s/step | samples/s | x {first} | peak MB | step peak MB | warm-up s ({args.warmup} steps) |")
    print("|---|---|---|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {med[name]:.3f} | {args.batch_size / med[name]:.1f} | {med[name] / med[first]:.2f} | "
              f"{peaks[name] / 2**20:.0f} | {step_peaks[name] / 2**20:.0f} | {warm[name]:.1f} |")
    if any("ckpt" in parts for parts in variants.values()):
        print(f"ckpt: the last {layers} ViT blocks recomputed" if layers < 1000 else "ckpt: every ViT block recomputed")
    print(f"\nBreakdown of the {chosen} step (synchronised timers; total {phases['total']:.3f} s)")
    print("| phase | s | share |")
    print("|---|---|---|")
    for name, seconds in phases.items():
        if name != "total":
            print(f"| {name} | {seconds:.4f} | {100 * seconds / phases['total']:.0f}% |")

    achieved = flops / med[chosen] / 1e12
    peak = peak_tflops(device, args.peak_tflops)
    share = f", {100 * achieved / peak:.1f}% of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
    print(f"\nFLOPs per {chosen} step (student fwd + bwd, teacher fwd): {flops / 1e12:.4f} TFLOP; achieved "
          f"{achieved * 1e3:.1f} GFLOP/s{share}")
    result = {"size": args.size, "device": where, "batch_size": args.batch_size, "k": args.k,
              "median_s": med, "peak_bytes": peaks, "step_peak_bytes": step_peaks, "warmup_s": warm,
              "ckpt_layer": layers, "breakdown_of": chosen, "breakdown_s": phases,
              "flops_per_step": flops, "achieved_tflops": achieved, "peak_tflops": peak}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
