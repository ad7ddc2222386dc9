"""Compute per training step, counted rather than timed: what the teacher adds to an ITC step,
at any size, on any machine (``torch.utils.flop_counter``, matrix products and attention).

    python bench/flops.py                          # BLIP-base towers, 384 px: batch 32, K = 8
    python bench/flops.py --size tiny --batch-size 32 --k 4

Counts are taken on a small batch and extended linearly, which is exact for these terms: the
student's forward + backward per sample, the teacher's image encoding per image, its
cross-encoder per pair (text path plus attention to the patches) and, with keys/values shared
per image, the cross-attention projections per image. The step's pairs: each image query with
its K mined captions and each caption query with its K mined images (positives not scored,
as for CPRD without ``drop_above_positive``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import lavis_cprd  # noqa: E402,F401
from bench.common import make_batch, student_config, write_json  # noqa: E402
from lavis_cprd.models.dual_encoder import CprdDualEncoder  # noqa: E402


def count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def step_pairs(n: int, k: int) -> torch.Tensor:
    """Each image with k other captions, each caption with k other images (n images, n captions)."""
    query = torch.arange(n).repeat_interleave(k)
    other = (query + torch.arange(1, k + 1).repeat(n)) % n
    return torch.cat([torch.stack([query, other], 1), torch.stack([other, query], 1)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "base"], default="base")
    parser.add_argument("--batch-size", type=int, default=32, help="the batch to report")
    parser.add_argument("--k", type=int, default=8, help="hard negatives per query to report")
    parser.add_argument("--count-batch", type=int, default=4, help="the batch the counts are taken on")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    n = args.count_batch
    torch.manual_seed(0)
    model = CprdDualEncoder.from_config(student_config(args.size, "none", 1)).train()
    batch = make_batch(n, int(model.visual_encoder.patch_embed.img_size[0]))

    def itc_step():
        model(batch)["loss"].backward()

    per_sample = count(itc_step) / n
    model.zero_grad(set_to_none=True)
    teacher = model.teacher
    images, captions = batch["image"], batch["text_input"]
    per_image_vit = count(lambda: teacher.model.visual_encoder.forward_features(images)) / n
    costs = {}
    for shared in (False, True):
        teacher.shares_image_projections = shared
        one, two = (count(lambda k=k: teacher.logit(images, captions, step_pairs(n, k))) for k in (1, 2))
        per_pair = (two - one) / (2 * n)  # k = 2 has 2n more pairs than k = 1, the same images
        per_image_rest = (one - 2 * n * per_pair) / n - per_image_vit  # shared projections, per image
        costs[shared] = (per_pair, per_image_rest)
    teacher.shares_image_projections = True

    b, k = args.batch_size, args.k
    pairs = 2 * b * k
    itc = per_sample * b
    rows = [("ITC step (student forward + backward)", itc)]
    for shared, label in ((False, "keys/values per pair"), (True, "keys/values per image (ours)")):
        per_pair, per_image_rest = costs[shared]
        teacher_flops = b * (per_image_vit + per_image_rest) + pairs * per_pair
        rows.append((f"teacher, {label}", teacher_flops))
    print(f"FLOPs per step, {args.size} towers, batch {b}, K = {k} ({pairs} teacher pairs); counted at batch {n}")
    print("| part | GFLOP | x ITC step |")
    print("|---|---|---|")
    for label, flops in rows:
        print(f"| {label} | {flops / 1e9:.1f} | {flops / itc:.2f} |")
    print(f"| CPRD step, ours (ITC + teacher) | {(itc + rows[2][1]) / 1e9:.1f} | {(itc + rows[2][1]) / itc:.2f} |")
    result = {"size": args.size, "batch_size": b, "k": k, "itc_step_flops": itc,
              "teacher_flops_kv_per_pair": rows[1][1], "teacher_flops_kv_per_image": rows[2][1],
              "per_sample_student": per_sample, "per_image_teacher_vit": per_image_vit,
              "per_pair_teacher": {str(s): c[0] for s, c in costs.items()}}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
