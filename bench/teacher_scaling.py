"""Teacher work per rank against the world size: one training step on gloo CPU processes.

    python bench/teacher_scaling.py                                  # world sizes 1 2 4, batch 8 per rank (~30 s)
    python bench/teacher_scaling.py --world-sizes 1 2 4 8 --batch-size 16 --k 4

Each rank holds a fixed batch of distinct images. Text->image negatives are mined from the
batch gathered over all ranks, so the teacher's pairs reference other ranks' images; the
figure that must not grow with the world size is the number of images the teacher's image
encoder runs on per rank (counted at ``_image_features``). Also reported: the rows of the
``images`` tensor handed to ``teacher.logit``, the pairs the rank's teacher scored, and the
pixel bytes a rank received through ``all_gather`` (4-D tensors: images). Tiny random
models: kl scores every negative, so its counts do not depend on the weights; cprd's mined
negatives do (a random student mines a few images often, so their ranks score more pairs).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIGURES = ("teacher_images", "logit_image_rows", "teacher_pairs", "pixel_mb_gathered")
# cprd: K mined hard negatives per query (the default); kl: every negative of the gathered batch.
LOSSES = ("cprd", "kl")


def _count_teacher_work(teacher, counts: dict) -> None:
    """Wrap this teacher instance's image encoder and ``logit`` to count what they receive."""
    encode, logit = teacher._image_features, teacher.logit

    def counted_encode(pixels):
        counts["teacher_images"] += int(pixels.shape[0])
        return encode(pixels)

    def counted_logit(images, captions, pairs, image_ids=None):
        counts["logit_image_rows"] += int(images.shape[0])
        counts["teacher_pairs"] += int(pairs.shape[0])
        return logit(images, captions, pairs, image_ids=image_ids)

    teacher._image_features, teacher.logit = counted_encode, counted_logit


def _count_gathered_pixels(counts: dict) -> None:
    """Wrap ``torch.distributed.all_gather`` (LAVIS's gathers call it) to count image bytes received."""
    all_gather = dist.all_gather

    def counted(tensor_list, tensor, *args, **kwargs):
        if tensor.dim() == 4 and "pixel_mb_gathered" in counts:
            counts["pixel_mb_gathered"] += sum(t.numel() * t.element_size() for t in tensor_list) / 2**20
        return all_gather(tensor_list, tensor, *args, **kwargs)

    dist.all_gather = counted


def _tiny_model(k: int, loss: str):
    from omegaconf import OmegaConf

    import lavis_cprd  # noqa: F401
    from bench.common import TOKENIZER
    from lavis_cprd.models.dual_encoder import CprdDualEncoder

    cfg = OmegaConf.load(CprdDualEncoder.default_config_path("tiny")).model
    cfg.tokenizer_path = TOKENIZER
    cfg.distill.num_hard_negatives = k
    cfg.distill.loss = loss
    torch.manual_seed(0)
    return CprdDualEncoder.from_config(cfg).eval()


def _worker(rank: int, worlds, init_dir: str, batch_size: int, k: int, results) -> None:
    """One process for every world size it belongs to: a process group per (loss, world),
    joined in turn (imports and model builds are paid once)."""
    torch.set_num_threads(1)
    from bench.common import make_batch

    batch = make_batch(batch_size, 48, seed=rank)
    batch["image_id"] = batch["image_id"] + rank * batch_size  # distinct images over all ranks
    counts = {}
    _count_gathered_pixels(counts)
    for loss in LOSSES:
        model = _tiny_model(k, loss)
        _count_teacher_work(model.teacher, counts)
        for world in worlds:
            if rank >= world:
                continue
            dist.init_process_group("gloo", init_method=f"file://{init_dir}/{loss}_{world}", rank=rank,
                                    world_size=world, timeout=timedelta(seconds=120))
            try:
                counts.update({name: 0 for name in FIGURES})
                model.zero_grad(set_to_none=True)
                model(batch).loss.backward()
                results[(loss, world, rank)] = dict(counts)
            finally:
                dist.destroy_process_group()


def measure(worlds, batch_size: int, k: int) -> dict:
    """Per-rank figures of one step: ``{(loss, world): {figure: max over ranks}}``, and the
    mean over ranks of the pairs scored (``teacher_pairs_mean``)."""
    results = mp.Manager().dict()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(sorted(worlds), tmp, batch_size, k, results), nprocs=max(worlds), join=True)
    table = {}
    for loss in LOSSES:
        for world in sorted(worlds):
            ranks = [results[(loss, world, rank)] for rank in range(world)]
            table[(loss, world)] = {name: max(r[name] for r in ranks) for name in FIGURES}
            table[(loss, world)]["teacher_pairs_mean"] = sum(r["teacher_pairs"] for r in ranks) / world
    return table


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=8, help="per rank (distinct images)")
    parser.add_argument("--k", type=int, default=3, help="hard negatives per query")
    args = parser.parse_args(argv)
    table = measure(args.world_sizes, args.batch_size, args.k)
    print(f"teacher work per rank (max over ranks): {args.batch_size} distinct images per rank, gloo on CPU")
    print(f"{'loss':<12} {'world':>5} {'teacher images':>15} {'logit image rows':>17} {'pairs max':>10} "
          f"{'pairs mean':>11} {'pixel MB gathered':>18}")
    for (loss, world), row in table.items():
        label = f"{loss} (K={args.k})" if loss == "cprd" else f"{loss} (all)"
        print(f"{label:<12} {world:>5} {row['teacher_images']:>15} {row['logit_image_rows']:>17} "
              f"{row['teacher_pairs']:>10} {row['teacher_pairs_mean']:>11.1f} {row['pixel_mb_gathered']:>18.2f}")
    return table


if __name__ == "__main__":
    main()
