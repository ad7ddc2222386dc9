"""Teacher cost per training step: no teacher (ITC only) vs online teacher vs cached scores.

    python bench/teacher_cost.py                      # CPU, tiny sizes (the embedded default's)
    python bench/teacher_cost.py --size base --device cuda --precision bf16   # BLIP-base, 384 px
    python bench/teacher_cost.py --json out.json   # also as JSON

Each variant runs the same student, batch and optimizer; times are medians over --steps
steps after --warmup, measured in one process so the ratios compare like with like. The
cached variant holds every pair of the batch (hit rate 1.0), so it shows the floor the cache
reaches; a real cache's cost lies between that and online, by its hit rate. Random weights:
speed does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import OmegaConf  # noqa: E402

import lavis_cprd  # noqa: E402,F401
from bench.common import TOKENIZER, full_cache, make_batch, student_config, write_json  # noqa: E402
from lavis_cprd.models.dual_encoder import CprdDualEncoder  # noqa: E402


def model_config(size: str, loss: str, precision: str):
    """``base``: BLIP-base student and teacher (``student_config``); ``tiny``: the library's
    own tiny student (2 x 64) with its tiny teacher."""
    if size == "base":
        return student_config("base", loss, 8, precision)
    cfg = OmegaConf.load(CprdDualEncoder.default_config_path("tiny")).model
    cfg.tokenizer_path = TOKENIZER
    cfg.distill.loss = loss
    cfg.distill.num_hard_negatives = 4
    cfg.distill.teacher.checkpoint = ""
    cfg.distill.teacher.precision = precision
    return cfg


def one_step(model, batch, opt, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def configure(model, variant: str, cache) -> None:
    model.distill.loss = "none" if variant == "no teacher" else "cprd"
    model.objective.use_teacher_cache(cache if variant == "cached" else None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="teacher precision")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 (tiny), 64 (base)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the medians (and the settings) here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch_size = args.batch_size or (32 if args.size == "tiny" else 64)
    torch.manual_seed(0)
    model = CprdDualEncoder.from_config(model_config(args.size, "cprd", args.precision)).to(device).train()
    image_size = int(model.visual_encoder.patch_embed.img_size[0])
    batch = make_batch(batch_size, image_size, device)
    cache = full_cache(model, batch)

    # Variants take turns step by step, so load drift on the machine hits them alike.
    variants = ("no teacher", "online", "cached")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times = {v: [] for v in variants}
    for i in range(args.warmup + args.steps):
        for variant in variants:
            configure(model, variant, cache)
            t = one_step(model, batch, opt, device)
            if i >= args.warmup:
                times[variant].append(t)
    configure(model, "cached", cache)
    assert float(model(batch).teacher_cache_hit_rate) == 1.0
    results = {v: statistics.median(t) for v, t in times.items()}

    base = results["no teacher"]
    print(f"teacher cost per step: {args.size} sizes, batch {batch_size}, {image_size} px, device {device}, "
          f"teacher {args.precision}, median of {args.steps} steps")
    print(f"{'variant':<12} {'s/step':>8} {'x no teacher':>13}")
    for name, t in results.items():
        print(f"{name:<12} {t:8.3f} {t / base:13.2f}")
    print(f"teacher share of an online step: {100 * (results['online'] - base) / results['online']:.0f}%; "
          f"cached step / online step: {results['cached'] / results['online']:.2f}")
    write_json(args.json, {"size": args.size, "device": str(device), "precision": args.precision,
                           "batch_size": batch_size, "image_size": image_size, "steps": args.steps, "median_s": results})
    return results


if __name__ == "__main__":
    main()
