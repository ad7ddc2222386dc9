"""``lavis-cprd cache-teacher``: precompute teacher scores for a training split.

    lavis-cprd cache-teacher --cfg-path configs/cprd_tiny_shapes.yaml --output output/teacher_cache \\
        --top-m 16 [--encoder-ckpt output/.../checkpoint_best.pth] [--options k=v ...]

The teacher is the experiment's ``model.distill.teacher``; candidates are mined by a fixed
dual encoder: the experiment's student (optionally loaded from ``--encoder-ckpt``) or any
dual-encoder adapter (``--encoder-arch clip_feature_extractor --encoder-options
model_type=ViT-B-16``). Interrupted builds resume and damaged ones are repaired: rerun the
same command (every file already there is checked against its recorded sha256). Train with
``--options model.distill.teacher_cache=output/teacher_cache``: training checks the files
again, and that its teacher (arch, checkpoint bytes, precision on its device) is the one
recorded here.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import List, Optional

from omegaconf import OmegaConf

from lavis_cprd.checkpoints import load_state
from lavis_cprd.training.launch import load_config, setup_seeds
from lavis_cprd.distill.cache_builder import build_teacher_cache
from lavis_cprd.distributed import resolve_device


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavis-cprd cache-teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", required=True, help="experiment YAML (its dataset, teacher and student).")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides key=value.")
    parser.add_argument("--output", required=True, help="cache folder (created; resumed if it exists).")
    parser.add_argument("--top-m", type=int, default=16, help="candidates per caption and per image (default 16).")
    parser.add_argument("--shard-size", type=int, default=512, help="queries per shard file (default 512).")
    parser.add_argument("--split", default="train", help="dataset split to cache (default train).")
    parser.add_argument("--dataset", default=None, help="dataset name when the config has several.")
    parser.add_argument("--encoder-ckpt", default=None, help="student checkpoint to mine candidates with.")
    parser.add_argument("--encoder-arch", default=None, help="a dual-encoder adapter to mine with instead of the student.")
    parser.add_argument(
        "--encoder-options", nargs="+", default=[], help="its config, key=value (checkpoint=..., model_type=...)."
    )
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available).")
    return parser


def main(argv: Optional[List[str]] = None) -> dict:
    import lavis.tasks as tasks
    from lavis.common.logger import setup_logger

    from lavis_cprd.teachers import build_teacher

    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    setup_logger()
    cfg = load_config(args)
    setup_seeds(cfg)  # a randomly initialised (test) teacher is then the same on every run
    device = resolve_device(args.device or "auto")
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    name = args.dataset or next(iter(datasets))
    if name not in datasets:
        raise ValueError(f"--dataset {name!r} is not in the config; available: {sorted(datasets)}")
    if args.split not in datasets[name]:
        raise ValueError(f"--split {args.split!r} is not a split of {name}; available: {sorted(datasets[name])}")
    dataset = datasets[name][args.split]
    if not hasattr(dataset, "img_ids"):
        raise ValueError(f"{name}/{args.split} is not a LAVIS training retrieval split (one item per caption)")

    model = task.build_model(cfg)
    if model.distill.teacher_kind != "cross":
        raise ValueError(f"model.distill.loss={model.distill.loss!r} has no cross-encoder teacher to cache")
    teacher = model.teacher.to(device)
    if args.encoder_arch:
        encoder_cfg = OmegaConf.merge({"arch": args.encoder_arch}, OmegaConf.from_dotlist(args.encoder_options))
        encoder = build_teacher(encoder_cfg, tokenizer_path=model.tokenizer_path, kind="dual").to(device)
        encode_images, encode_texts = encoder.encode_images, lambda caps: encoder.encode_texts(caps, device)
        encoder_desc = OmegaConf.to_container(encoder_cfg)
    else:
        if args.encoder_ckpt:
            load_state(model, args.encoder_ckpt, "--encoder-ckpt")
        model = model.to(device).eval()
        encode_images, encode_texts = model.encode_image, lambda caps: model.encode_captions(caps, device)
        encoder_desc = {"arch": cfg.model_cfg.arch, "checkpoint": args.encoder_ckpt}

    settings = {
        "dataset": name, "split": args.split, "encoder": encoder_desc,
        "teacher": OmegaConf.to_container(OmegaConf.create(model.distill.teacher), resolve=True),
    }
    stats = build_teacher_cache(
        dataset, teacher.logit, encode_images, encode_texts, args.output, args.top_m,
        shard_size=args.shard_size, device=device, settings=settings,
        teacher_identity=model.objective.teacher_identity(device),  # training compares its teacher's with it
        command=shlex.join(["lavis-cprd", "cache-teacher", *argv]),  # the repair a reader is told to run
    )
    logging.info("cache-teacher: %s", stats)
    print(f"teacher cache {args.output}: {stats}")
    return stats


if __name__ == "__main__":
    main()
