"""Scaling: how CPRD's step time grows with batch size and K, and how retrieval time grows with
gallery size (student vs LAVIS two-stage), with the fitted exponent ``t ~ size^p``.

    python bench/scaling.py [--json out.json]

Same towers and random inputs as ``bench/train_step.py`` and ``bench/retrieval.py``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import OmegaConf  # noqa: E402

import lavis_cprd  # noqa: E402,F401
from bench.common import make_batch, measure, tower_sizes, write_json  # noqa: E402
from bench.retrieval import Gallery  # noqa: E402
from bench.train_step import student  # noqa: E402
from lavis_cprd.models.blip_retrieval import CprdBlipRetrieval  # noqa: E402


def exponent(sizes, times) -> float:
    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


def step_time(model, batch, steps: int) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(steps + 2):
        def one():
            model(batch)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _, t, _ = measure(one)
        if i >= 2:
            times.append(t)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--galleries", type=int, nargs="+", default=[100, 200, 400, 800])
    parser.add_argument("--lavis-galleries", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--k-test", type=int, default=16, help="LAVIS re-rank depth, fixed across galleries")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sizes = tower_sizes()
    px = int(sizes["image_size"])
    out: dict = {}

    model = student("cprd", 4)
    by_batch = [step_time(model, make_batch(b, px), args.steps) for b in args.batch_sizes]
    print("| CPRD step, K = 4 | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " | exponent |")
    print("|---|" + "---|" * (len(args.batch_sizes) + 1))
    print("| s/step | " + " | ".join(f"{t:.3f}" for t in by_batch) + f" | {exponent(args.batch_sizes, by_batch):.2f} |")
    out["step_vs_batch"] = dict(zip(map(str, args.batch_sizes), by_batch))

    by_k = []
    for k in args.ks:
        model.distill.num_hard_negatives = k
        by_k.append(step_time(model, make_batch(32, px), args.steps))
    print("\n| CPRD step, batch 32 | " + " | ".join(f"K = {k}" for k in args.ks) + " | exponent |")
    print("|---|" + "---|" * (len(args.ks) + 1))
    print("| s/step | " + " | ".join(f"{t:.3f}" for t in by_k) + f" | {exponent(args.ks, by_k):.2f} |")
    out["step_vs_k"] = dict(zip(map(str, args.ks), by_k))

    model.eval()
    blip = CprdBlipRetrieval.from_config(OmegaConf.load(CprdBlipRetrieval.default_config_path("tiny")).model).eval()

    def retrieval(m, n):
        loader = torch.utils.data.DataLoader(Gallery(n, 5, px), batch_size=64)
        cfg = OmegaConf.create({"k_test": min(args.k_test, n), "text_batch_size": 256})
        with torch.no_grad():
            return measure(lambda: m.compute_sim_matrix(loader, cfg))[1]

    ours = [retrieval(model, n) for n in args.galleries]
    theirs = [retrieval(blip, n) for n in args.lavis_galleries]
    print("\n| retrieval, images (x5 captions) | " + " | ".join(map(str, args.galleries)) + " | exponent |")
    print("|---|" + "---|" * (len(args.galleries) + 1))
    print("| student s | " + " | ".join(f"{t:.2f}" for t in ours) + f" | {exponent(args.galleries, ours):.2f} |")
    print("\n| retrieval, images (x5 captions) | " + " | ".join(map(str, args.lavis_galleries)) + " | exponent |")
    print("|---|" + "---|" * (len(args.lavis_galleries) + 1))
    print(f"| LAVIS two-stage s (k_test = {args.k_test}) | " + " | ".join(f"{t:.2f}" for t in theirs)
          + f" | {exponent(args.lavis_galleries, theirs):.2f} |")
    out["retrieval_student"] = dict(zip(map(str, args.galleries), ours))
    out["retrieval_lavis"] = dict(zip(map(str, args.lavis_galleries), theirs))
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
