"""``lavis-cprd prepare-data IMAGES CAPTIONS --output DIR``: a folder of images and a captions
table (CSV or JSONL: image file, caption; several captions per image) to LAVIS retrieval
annotations (train, val, test) and a ready experiment config: LAVIS's stock ``flickr30k``
builder reading the local files, a tiny or base student, CPRD.

Everything is checked before anything is written; the output folder appears whole or not at
all. See ``docs/own_data.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from lavis_cprd.apps.gallery_index import list_images
from lavis_cprd.datasets import own_data
from lavis_cprd.paths import EXPERIMENTS

STUDENTS = {  # --student: the packaged experiment its model and run settings come from, and its image size
    "tiny": ("cprd_tiny_shapes.yaml", 48),
    "base": ("cprd_flickr30k_blip_base.yaml", 384),
}
TEACHER_FILE = os.path.join("teacher", "teacher_fp16.pth")  # where train-teacher puts it (--output DIR/teacher)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lavis-cprd prepare-data", description=__doc__.split("\n\n")[0])
    p.add_argument("images", help="folder of the image files the captions table names (relative paths)")
    p.add_argument("captions", help="captions table: .csv (with a header) or .jsonl")
    p.add_argument("--output", required=True, help="folder to write (annotations/, experiment.yaml, summary.json)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--split-column", default=None, help="a column of train/val/test (else --val-size/--test-size)")
    p.add_argument("--val-size", type=int, default=None, help="images for val (default: 10%%, at least 1)")
    p.add_argument("--test-size", type=int, default=None, help="images for test (default: 10%%, at least 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split draw")
    p.add_argument("--extra-matches", default=None, help="table of further true matches: caption, image it is "
                   "also true of (same columns); they feed the relevance-aware metrics of val and test")
    p.add_argument("--student", choices=sorted(STUDENTS), default="tiny")
    p.add_argument("--num-hard-negatives", type=int, default=4, help="K (model.distill.num_hard_negatives)")
    p.add_argument("--batch-size", type=int, default=32, help="run.batch_size_train")
    p.add_argument("--skip-bad", action="store_true", help="leave bad rows out (listed) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> Dict:
    """Check the input, then write the folder; returns the summary."""
    images_root = os.path.abspath(args.images)
    if not os.path.isdir(images_root):
        raise FileNotFoundError(f"IMAGES {args.images!r} is not a folder")
    if not os.path.isfile(args.captions):
        raise FileNotFoundError(f"CAPTIONS {args.captions!r} is not a file")
    if os.path.exists(args.output) and os.listdir(args.output) and not args.overwrite:
        raise FileExistsError(f"--output {args.output!r} exists and is not empty: choose another, or --overwrite")
    rows, problems = own_data.caption_rows(args.captions, images_root, args.image_column, args.caption_column,
                                           args.split_column)
    loose = own_data.uncaptioned(rows, [os.path.relpath(f, images_root) for f in list_images(images_root)])
    problems += [f"{os.path.join(args.images, f)}: an image no row of {args.captions} captions" for f in loose]
    if problems and not args.skip_bad:
        raise own_data.DataProblems(problems, "fix them, or pass --skip-bad to leave those rows and images out")
    n_images = len({r.image for r in rows})
    default = max(1, n_images // 10)
    split_of, split_problems = own_data.assign_splits(
        rows, default if args.val_size is None else args.val_size, default if args.test_size is None else args.test_size,
        args.seed)
    split_problems += own_data.size_problems(split_of, args.num_hard_negatives, args.batch_size) if split_of else []
    extra, left_out = {}, 0
    if args.extra_matches and not split_problems:
        extra, extra_problems, left_out = own_data.extra_matches(args.extra_matches, rows, split_of,
                                                                 args.image_column, args.caption_column)
        split_problems += extra_problems
    if split_problems:  # never skipped: they are about the whole data, not a row
        raise own_data.DataProblems(split_problems)
    ann = own_data.annotations(rows, split_of, extra)
    summary = {
        "captions_table": os.path.abspath(args.captions), "images": images_root,
        "rows_kept": len(rows), "problems_left_out": problems,
        "splits": {s: {"images": sum(1 for v in split_of.values() if v == s),
                       "captions": len(ann[s]) if s == "train" else sum(len(e["caption"]) for e in ann[s])}
                   for s in own_data.SPLITS},
        "extra_matches": {"kept": sum(len(v) for v in extra.values()), "left_out_train_or_across_splits": left_out},
        "split_rule": f"column {args.split_column}" if args.split_column else f"random by image, seed {args.seed}",
    }
    _write(args, ann, summary, images_root)
    return summary


def experiment_config(args: argparse.Namespace, output: str, images_root: str, ann: Dict[str, list]):
    """The packaged experiment of ``--student`` with this data: the stock ``flickr30k`` builder
    on the local files, the teacher that ``train-teacher`` writes into ``output/teacher``."""
    experiment, size = STUDENTS[args.student]
    cfg = OmegaConf.load(os.path.join(EXPERIMENTS, experiment))
    processor = {"name": "blip_image_eval", "image_size": size}  # no flips/crops: captions may say left or right
    files = {s: os.path.join(output, "annotations", f"{s}.json") for s in own_data.SPLITS}
    cfg.datasets = {"flickr30k": {
        "data_type": "images",
        "build_info": {"annotations": {s: {"url": p, "storage": p} for s, p in files.items()},
                       "images": {"storage": images_root}},
        "vis_processor": {"train": dict(processor), "eval": dict(processor)},
        "text_processor": {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}},
    }}
    cfg.model.distill.num_hard_negatives = args.num_hard_negatives
    cfg.model.distill.teacher.checkpoint = os.path.join(output, TEACHER_FILE)
    cfg.run.batch_size_train = args.batch_size
    # LAVIS's retrieval evaluation takes the top k_test images of the smaller evaluation split.
    cfg.run.k_test = min(int(cfg.run.k_test), len(ann["val"]), len(ann["test"]))
    # The packaged experiments warm the learning rate up over one epoch of their data: one of this data.
    cfg.run.warmup_steps = max(1, -(-len(ann["train"]) // args.batch_size))
    cfg.run.output_dir = os.path.join(output, "runs", "cprd")
    return cfg


def _write(args: argparse.Namespace, ann: Dict[str, list], summary: Dict, images_root: str) -> None:
    """Into a sibling folder first, renamed into place at the end: a failure leaves nothing."""
    output = os.path.abspath(args.output)
    staging = f"{output}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "annotations"))
    try:
        files = dict(ann)
        for split in ("val", "test"):  # the annotated pairs alone too: evaluation without the extra matches
            if any("extra_positives" in e for e in ann[split]):
                files[f"{split}_annotated"] = [{k: v for k, v in e.items() if k != "extra_positives"} for e in ann[split]]
        for name, entries in files.items():
            with open(os.path.join(staging, "annotations", f"{name}.json"), "w", encoding="utf-8") as f:
                json.dump(entries, f, ensure_ascii=False, indent=1)
        OmegaConf.save(experiment_config(args, output, images_root, ann), os.path.join(staging, "experiment.yaml"))
        with open(os.path.join(staging, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=1)
        old = None
        if os.path.exists(output):
            old = f"{output}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(output, old)
        os.replace(staging, output)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    summary = prepare(args)
    out = os.path.abspath(args.output)
    left = len(summary["problems_left_out"])
    print(f"kept {summary['rows_kept']} caption rows" + (f"; left out {left} problem(s) (listed in summary.json)" if left else ""))
    for split, n in summary["splits"].items():
        print(f"  {split:5s} {n['images']:6d} images {n['captions']:7d} captions")
    if args.extra_matches:
        e = summary["extra_matches"]
        print(f"  extra true matches: {e['kept']} kept, {e['left_out_train_or_across_splits']} left out (train, or across splits)")
    print(f"wrote {out}/annotations/{{train,val,test}}.json and {out}/experiment.yaml\n"
          f"next: lavis-cprd train-teacher --data-cfg {out}/experiment.yaml")
    return summary


if __name__ == "__main__":
    main()
