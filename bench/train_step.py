"""Training-step cost: CPRD vs ITC-only (our student) vs LAVIS ``blip_retrieval``'s own
training step (ITC with momentum encoders and queues + ITM on hard negatives), at equal batch
size and equal tower sizes.

    python bench/train_step.py [--batch-size 32] [--k 4] [--steps 8] [--json out.json]

Random weights and pixels; the CPRD teacher is a BLIP ITM head with the same towers. Variants
take turns step by step (forward, backward, AdamW step) so machine-load drift hits them alike;
times are medians. Peak memory: the largest resident-set rise during one of the variant's
steps (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import OmegaConf  # noqa: E402

import lavis_cprd  # noqa: E402,F401
from bench.common import make_batch, measure, student_config, tower_sizes, write_json  # noqa: E402
from bench.teacher_cost import full_cache  # noqa: E402
from lavis_cprd.models.blip_retrieval import CprdBlipRetrieval  # noqa: E402
from lavis_cprd.models.dual_encoder import CprdDualEncoder  # noqa: E402


def student(loss: str, k: int, teacher_precision: str = "fp32") -> CprdDualEncoder:
    # The teacher: the same towers plus cross-attention.
    return CprdDualEncoder.from_config(student_config("tiny", loss, k, teacher_precision)).train()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=4, help="CPRD hard negatives per query")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--adamw", choices=["fused", "foreach"], default="fused",
                        help="AdamW implementation for every variant (fused: our runner's default; foreach: LAVIS's)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for every variant, teacher in bf16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sizes = tower_sizes()
    lavis_cfg = OmegaConf.load(CprdBlipRetrieval.default_config_path("tiny")).model
    lavis_cfg.queue_size = max(int(lavis_cfg.queue_size) // args.batch_size, 1) * args.batch_size
    batch = make_batch(args.batch_size, int(sizes["image_size"]))
    teacher_precision = "bf16" if args.bf16 else "fp32"
    cached = student("cprd", args.k, teacher_precision)
    cached.objective.use_teacher_cache(full_cache(cached, batch))  # every pair of the batch: hit rate 1.0
    models = {
        "ITC only (student)": student("none", args.k, teacher_precision),
        f"CPRD, K={args.k}, online teacher": student("cprd", args.k, teacher_precision),
        f"CPRD, K={args.k}, cached teacher scores": cached,
        "LAVIS blip_retrieval step": CprdBlipRetrieval.from_config(lavis_cfg).train(),
    }
    impl = {"fused": True} if args.adamw == "fused" else {"foreach": True}
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5, **impl)
                  for n, m in models.items()}
    times = {n: [] for n in models}
    peaks = {n: 0 for n in models}

    def step(name):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = models[name](batch)["loss"]
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for i in range(args.warmup + args.steps):
        for name in models:
            _, t, m = measure(lambda: step(name))
            if i >= args.warmup:
                times[name].append(t)
                peaks[name] = max(peaks[name], m)
    med = {n: statistics.median(t) for n, t in times.items()}
    itc = med["ITC only (student)"]
    print(f"Training step, batch {args.batch_size}, towers ViT/BERT {sizes['vit_depth']}x{sizes['vit_width']}, "
          f"{sizes['image_size']} px, {args.adamw} AdamW, {'bf16' if args.bf16 else 'fp32'}, "
          f"{torch.get_num_threads()} threads, median of {args.steps} steps")
    print("| variant | s/step | x ITC only | peak MB rise in a step |")
    print("|---|---|---|---|")
    for name in models:
        print(f"| {name} | {med[name]:.3f} | {med[name] / itc:.2f} | {peaks[name] / 2**20:.0f} |")
    lavis = "LAVIS blip_retrieval step"
    result = {"batch_size": args.batch_size, "k": args.k, "adamw": args.adamw, "bf16": args.bf16,
              "median_s": med, "peak_bytes": peaks}
    for name in (n for n in models if n.startswith("CPRD")):
        print(f"{name}: / ITC only {med[name] / itc:.2f} (goal <= 1.3), / LAVIS BLIP step {med[name] / med[lavis]:.2f} "
              "(goal < 1)")
        result[name] = {"over_itc": med[name] / itc, "over_lavis": med[name] / med[lavis]}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
