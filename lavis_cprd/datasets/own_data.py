"""Your own data as LAVIS retrieval annotations: a table of (image file, caption) rows, checked
row by row, split by image, with optional extra true matches (``extra_positives``).

Everything here reads and checks; nothing is written (``apps/prepare_data.py`` writes).
Every problem names the file and line it comes from.
"""
from __future__ import annotations

import csv
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from lavis_cprd.datasets.checks import image_problem, visible
from lavis_cprd.errors import ConfigError

SPLITS = ("train", "val", "test")
SHOWN = 20  # problems listed in the message (all of them in summary.json with --skip-bad)


class DataProblems(ConfigError):
    """The input's problems, every one of them, each naming its file and line (the CLI prints
    them without a traceback, as a config's)."""

    def __init__(self, problems: Sequence[str], hint: str = ""):
        shown = list(problems[:SHOWN]) + ([f"... and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else [])
        super().__init__(shown + ([hint] if hint else []), source="the input")
        self.problems = list(problems)


@dataclass(frozen=True)
class Row:
    """One (image, caption) row of a captions table; ``where`` is ``FILE:LINE``."""

    where: str
    image: str
    caption: str
    split: Optional[str] = None


def read_table(path: str, columns: Sequence[str]) -> List[Tuple[str, Dict[str, str]]]:
    """``(FILE:LINE, {column: value})`` of a CSV (with a header) or JSONL file; every column
    in ``columns`` must be there."""
    rows: List[Tuple[str, Dict[str, str]]] = []
    if path.endswith((".jsonl", ".ndjson")):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataProblems([f"{path}:{n}: not a JSON object ({e.msg})"]) from e
                if not isinstance(record, dict):
                    raise DataProblems([f"{path}:{n}: not a JSON object"])
                rows.append((f"{path}:{n}", record))
        found = sorted({k for _, r in rows for k in r})
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            found = list(reader.fieldnames or [])
            for record in reader:
                rows.append((f"{path}:{reader.line_num}", record))
    missing = [c for c in columns if c not in found]
    if missing:
        raise DataProblems([f"{path}: no column {c!r}; its columns are {found}" for c in missing])
    return rows


def caption_rows(path: str, images_root: str, image_column: str = "image", caption_column: str = "caption",
                 split_column: Optional[str] = None) -> Tuple[List[Row], List[str]]:
    """The table's rows that are usable, and the problems of the others: a missing or
    unreadable image, an empty caption (nothing printable), a caption repeated for one image."""
    columns = [image_column, caption_column] + ([split_column] if split_column else [])
    kept, problems, first = [], [], {}
    checked: Dict[str, Optional[str]] = {}
    for where, record in read_table(path, columns):
        image, caption = str(record.get(image_column) or "").strip(), str(record.get(caption_column) or "")
        split = str(record.get(split_column) or "").strip() if split_column else None
        if not image:
            problems.append(f"{where}: no image file named")
            continue
        if image not in checked:
            reason = image_problem(os.path.join(images_root, image))
            checked[image] = None if reason is None else f"{reason[0]} {reason[1]}"
        if checked[image]:
            problems.append(f"{where}: {checked[image]}")
            continue
        if not visible(caption).strip():
            problems.append(f"{where}: empty caption for {image}")
            continue
        key = (image, " ".join(caption.split()).lower())
        if key in first:
            problems.append(f"{where}: the caption of {first[key]} again, for {image}")
            continue
        if split_column and split not in SPLITS:
            problems.append(f"{where}: {split_column}={split!r} is not one of {list(SPLITS)}")
            continue
        first[key] = where
        kept.append(Row(where, image, caption.strip(), split))
    return kept, problems


def uncaptioned(rows: Iterable[Row], image_files: Iterable[str]) -> List[str]:
    """Image files of the folder that no row captions."""
    captioned = {os.path.normpath(r.image) for r in rows}
    return sorted(f for f in image_files if os.path.normpath(f) not in captioned)


def assign_splits(rows: Sequence[Row], val_size: int, test_size: int, seed: int) -> Tuple[Dict[str, str], List[str]]:
    """Image -> split. From the rows' split column where given (one split per image, or a
    problem naming the lines), else ``val_size`` and ``test_size`` images drawn with ``seed``
    and the rest for training. All captions of an image go to one split."""
    images = list(dict.fromkeys(r.image for r in rows))
    if rows and rows[0].split is not None:
        split_of, problems = {}, []
        for r in rows:
            if split_of.setdefault(r.image, r.split) != r.split:
                problems.append(f"{r.where}: {r.image} is in split {r.split!r} here, {split_of[r.image]!r} above")
        return split_of, problems
    if val_size + test_size >= len(images):
        return {}, [f"--val-size {val_size} + --test-size {test_size} leave no training image of {len(images)}"]
    order = images[:]
    random.Random(seed).shuffle(order)
    split_of = {i: "val" for i in order[:val_size]}
    split_of.update({i: "test" for i in order[val_size : val_size + test_size]})
    return {i: split_of.get(i, "train") for i in images}, []


def size_problems(split_of: Dict[str, str], num_hard_negatives: int, batch_size: int) -> List[str]:
    """A split too small to train or evaluate on: val and test need images, and training needs
    more than K distinct images (each query's K hard negatives are other images) and a batch."""
    counts = {s: sum(1 for v in split_of.values() if v == s) for s in SPLITS}
    problems = [f"the {s} split has no image" for s in ("val", "test") if counts[s] == 0]
    if counts["train"] <= num_hard_negatives:
        problems.append(f"the train split has {counts['train']} images: K={num_hard_negatives} hard negatives "
                        f"need more than {num_hard_negatives} (lower --num-hard-negatives, or give more images)")
    elif counts["train"] < batch_size:
        problems.append(f"the train split has {counts['train']} images, fewer than a batch ({batch_size}): "
                        "lower --batch-size")
    return problems


def extra_matches(path: str, rows: Sequence[Row], split_of: Dict[str, str], image_column: str = "image",
                  caption_column: str = "caption") -> Tuple[Dict[str, List[str]], List[str], int]:
    """``image -> [captions]`` of an extra-matches table (a caption, and a further image it is
    true of), for the evaluation splits: both must be in the same val or test split. Returns
    the matches, the problems (a caption or image the data does not have) and how many rows
    were left out because they pair a training row or two splits."""
    split_of_caption: Dict[str, set] = defaultdict(set)
    for r in rows:
        split_of_caption[r.caption].add(split_of[r.image])
    matches: Dict[str, List[str]] = defaultdict(list)
    problems, left_out = [], 0
    for where, record in read_table(path, [image_column, caption_column]):
        image, caption = str(record[image_column]).strip(), str(record[caption_column]).strip()
        if image not in split_of:
            problems.append(f"{where}: image {image!r} is not an image of the captions table")
        elif caption not in split_of_caption:
            problems.append(f"{where}: caption {caption!r} is not a caption of the captions table")
        elif split_of[image] == "train" or split_of[image] not in split_of_caption[caption]:
            left_out += 1
        elif caption not in matches[image]:
            matches[image].append(caption)
    return dict(matches), problems, left_out


def annotations(rows: Sequence[Row], split_of: Dict[str, str], extra: Optional[Dict[str, List[str]]] = None) -> Dict[str, list]:
    """LAVIS's retrieval annotations: train, one entry per caption with its ``image_id``; val
    and test, one entry per image with its captions (and ``extra_positives``: further captions
    of the split true of it)."""
    out: Dict[str, list] = {s: [] for s in SPLITS}
    by_image: Dict[str, List[str]] = defaultdict(list)
    for r in rows:
        by_image[r.image].append(r.caption)
    ids = {image: n for n, image in enumerate(by_image)}
    for image, captions in by_image.items():
        split = split_of[image]
        if split == "train":
            out["train"] += [{"image": image, "caption": c, "image_id": ids[image]} for c in captions]
        else:
            entry = {"image": image, "caption": captions}
            own = set(captions)
            more = [c for c in (extra or {}).get(image, []) if c not in own]
            if more:
                entry["extra_positives"] = more
            out[split].append(entry)
    return out
