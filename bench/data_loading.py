"""Is data loading the bottleneck? The training loader of an experiment config (default: the
embedded default, ``configs/cprd_tiny_shapes.yaml``), built by our runner exactly as training
builds it, against the training step it feeds.

    python bench/data_loading.py [--cfg-path configs/cprd_tiny_shapes.yaml] [--workers 0,1,2]

For each ``run.num_workers``: the loader alone (batches/s and samples/s: decode, processors,
collation, pinned host memory and, on CUDA, LAVIS's prefetching copy), and the full loop
(next batch, then the CPRD step: forward, backward, optimizer), both timed over --batches
batches after --warmup. The model step alone, on one batch held in memory, is the ceiling.
Then the per-worker cost of a COCO-sized training image, to size ``run.num_workers`` for a
GPU's step rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from types import SimpleNamespace

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lavis_cprd  # noqa: E402,F401
from bench.common import sync, write_json  # noqa: E402
from lavis_cprd.training.launch import build_runner  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def coco_like_ms_per_sample(n: int = 40) -> float:
    """One worker's cost per training image at COCO's sizes: decode a 640 x 480 JPEG, then
    LAVIS's ``blip_image_train`` at 384 px (random resized crop, flip, RandAugment), one thread."""
    import io

    import numpy as np
    from lavis.processors.blip_processors import BlipImageTrainProcessor
    from PIL import Image

    pixels = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    data, processor = buffer.getvalue(), BlipImageTrainProcessor(image_size=384)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # LAVIS's RandAugment overflows a uint8 harmlessly
            t0 = time.perf_counter()
            for _ in range(n):
                processor(Image.open(io.BytesIO(data)).convert("RGB"))
    finally:
        torch.set_num_threads(threads)
    return (time.perf_counter() - t0) / n * 1e3


def train_step(runner, samples) -> None:
    loss = runner.task.train_step(runner.model, samples)
    loss.backward()
    runner.optimizer.step()
    runner.optimizer.zero_grad(set_to_none=True)


def timed(fn, n: int, device) -> float:
    """Seconds per call of ``fn`` over ``n`` calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", default=os.path.join(REPO, "configs", "cprd_tiny_shapes.yaml"))
    parser.add_argument("--options", nargs="*", default=[])
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--batches", type=int, default=40, help="per phase; below an epoch's batches")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    options = ["run.output_dir=/tmp/lavis_cprd_bench_data"] + list(args.options)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    runner = build_runner(SimpleNamespace(cfg_path=args.cfg_path, options=options))
    model = runner.model
    model.train()
    if hasattr(model, "set_epoch"):  # a distilling epoch: the teacher runs
        model.set_epoch(int(model.distill.start_epoch))
    device, batch_size = runner.device, int(runner.config.run_cfg.batch_size_train)
    from lavis.datasets.data_utils import prepare_sample

    def next_batch(loader):
        return prepare_sample(next(loader), cuda_enabled=runner.cuda_enabled)

    rows, result = [], {"config": args.cfg_path, "batch_size": batch_size, "device": str(device),
                        "threads": torch.get_num_threads(), "workers": {}}
    held = None
    runner.train_loader  # noqa: B018  (LAVIS merges the splits' datasets here)
    train_set = runner.datasets["train"]
    for workers in [int(w) for w in args.workers.split(",")]:
        # The training loader as LAVIS's ``dataloaders`` builds it, with this many workers; a
        # fresh one per phase, so that no phase crosses an epoch's end (LAVIS sleeps 2 s there).
        def fresh_loader():
            return runner.create_loaders(datasets=[train_set], num_workers=workers, batch_sizes=[batch_size],
                                         is_trains=[True], collate_fns=[getattr(train_set, "collater", None)])[0]

        loader = fresh_loader()
        for _ in range(args.warmup):
            held = next_batch(loader)
        load_s = timed(lambda ld=loader: next_batch(ld), args.batches, device)
        loader = fresh_loader()
        for _ in range(args.warmup):
            train_step(runner, next_batch(loader))
        loop_s = timed(lambda ld=loader: train_step(runner, next_batch(ld)), args.batches, device)
        del loader
        rows.append((workers, load_s, loop_s))
        result["workers"][workers] = {"load_s_per_batch": load_s, "loop_s_per_batch": loop_s}
    for _ in range(args.warmup):
        train_step(runner, held)
    step_s = timed(lambda: train_step(runner, held), args.batches, device)
    result["step_s_in_memory"] = step_s

    print(f"Training loader vs CPRD step: {os.path.relpath(args.cfg_path, REPO)}, batch {batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, {args.batches} batches")
    print("| run.num_workers | loader alone: samples/s | loop (load + step): samples/s | x step alone |")
    print("|---|---|---|---|")
    for workers, load_s, loop_s in rows:
        print(f"| {workers} | {batch_size / load_s:.0f} | {batch_size / loop_s:.0f} | {step_s / loop_s:.2f} |")
    print(f"| (batch in memory) | | {batch_size / step_s:.0f} | 1.00 |")
    coco_ms = coco_like_ms_per_sample()
    result["coco_like_ms_per_sample_per_worker"] = coco_ms
    print(f"\nCOCO-sized images (640 x 480 JPEG, blip_image_train at 384 px): {coco_ms:.1f} ms per image per worker, "
          f"so one worker feeds {1e3 / coco_ms:.0f} samples/s")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
