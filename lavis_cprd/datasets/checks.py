"""Bad-data checks at dataset build time: missing or unreadable images, empty captions (those
that print or tokenize as nothing too), captions of only unknown tokens, one image id naming several images (or one image listed
twice in an evaluation split). By default a clear error; with ``datasets.NAME.skip_bad:
true``, a warning with counts and the items left out."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from collections import Counter, defaultdict
from typing import Callable, Dict, List, Optional, Tuple

from PIL import Image

SHOW = 3  # examples per problem kind in messages


Reason = Tuple[str, str]  # (kind, detail)


def image_problem(path: str) -> Optional[Reason]:
    """Why the image file at ``path`` cannot be used (missing, unreadable), or None."""
    if not os.path.isfile(path):
        return ("missing image", path)
    try:
        with Image.open(path) as img:
            img.verify()  # header and structure, without decoding every pixel
    except Exception as e:  # PIL raises many types for broken files
        return ("unreadable image", f"{path} ({type(e).__name__}: {e})")
    return None


EMPTY, UNKNOWN = "empty caption", "caption of only unknown tokens"
# Characters that print as nothing: controls, format characters (zero-width spaces, joiners,
# the BOM, direction marks), separators. A caption of only these is an empty caption.
_INVISIBLE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp")


def visible(text: str) -> str:
    """``text`` without the characters that print as nothing."""
    return "".join(ch for ch in text if unicodedata.category(ch) not in _INVISIBLE)


def caption_checker(tokenizer) -> Optional[Callable[[str], Optional[str]]]:
    """``caption -> problem or None`` for the student's tokenizer: :data:`EMPTY` when it
    tokenizes to nothing (the model would see ``[CLS] [SEP]``), :data:`UNKNOWN` when every word
    maps to the unknown token (``[CLS] [UNK] ... [SEP]``). Words are looked up once each."""
    if tokenizer is None or getattr(tokenizer, "unk_token", None) is None:
        return None
    pieces: Dict[str, str] = {}  # word -> "none" | "unknown" | "known"

    def problem(caption: str) -> Optional[str]:
        kinds = set()
        for w in caption.split():
            if w not in pieces:
                tokens = tokenizer.tokenize(w)
                pieces[w] = "none" if not tokens else "unknown" if tokens == [tokenizer.unk_token] else "known"
            kinds.add(pieces[w])
        if "known" in kinds:
            return None
        return UNKNOWN if "unknown" in kinds else EMPTY

    return problem


def find_problems(dataset, caption_problem=None) -> Tuple[Dict[int, List[Reason]], Dict[Tuple[int, int], Reason]]:
    """``(item problems {annotation index: [reasons]}, caption problems {(index, caption
    index): reason})`` of a LAVIS retrieval split (training: one caption per item; evaluation:
    a caption list per image)."""
    items: Dict[int, List[Reason]] = defaultdict(list)
    captions: Dict[Tuple[int, int], Reason] = {}
    image_reason: Dict[str, Optional[Reason]] = {}
    training = hasattr(dataset, "img_ids")
    paths_of_id: Dict[object, set] = defaultdict(set)
    first_entry: Dict[str, int] = {}
    for n, ann in enumerate(dataset.annotation):
        path = ann.get("image", "")
        if path not in image_reason:
            image_reason[path] = image_problem(os.path.join(dataset.vis_root, path))
        if image_reason[path]:
            items[n].append(image_reason[path])
        if training:
            paths_of_id[ann["image_id"]].add(path)
        elif path in first_entry:
            items[n].append(("image listed twice", f"{path} (also entry {first_entry[path]})"))
        else:
            first_entry[path] = n
        raw = ann.get("caption", "")
        for k, caption in enumerate([raw] if isinstance(raw, str) else list(raw)):
            processed = dataset.text_processor(caption) if isinstance(caption, str) else ""
            kind = EMPTY if not visible(processed) else caption_problem(processed) if caption_problem else None
            if kind is not None:
                captions[(n, k)] = (kind, repr(caption))
    for n, ann in enumerate(dataset.annotation) if training else ():
        paths = paths_of_id[ann["image_id"]]
        if len(paths) > 1:
            items[n].append(("duplicated image id", f"{ann['image_id']!r} names {sorted(paths)[:SHOW]}"))
    if training:  # a training item is its caption: a bad caption is a bad item
        for (n, _), reason in captions.items():
            items[n].append(reason)
        captions = {}
    return dict(items), captions


def _summary(items: Dict[int, List[Reason]], captions: Dict[Tuple[int, int], Reason]) -> str:
    kinds = Counter(kind for rs in items.values() for kind, _ in rs)
    kinds.update(kind for kind, _ in captions.values())
    examples = [f"entry {n}: " + "; ".join(f"{k} {d}" for k, d in rs) for n, rs in list(items.items())[:SHOW]]
    examples += [f"entry {n} caption {c}: {k} {d}" for (n, c), (k, d) in list(captions.items())[:SHOW]]
    counts = ", ".join(f"{c} {k}" for k, c in sorted(kinds.items()))
    return f"{counts}; e.g. " + " | ".join(examples)


def check_split(name: str, split: str, dataset, skip_bad: bool, caption_problem=None, work_dir: str = ""):
    """The split, checked: unchanged when clean; a ``ValueError`` (``FileNotFoundError`` when
    only images are missing) naming the problems; or with ``skip_bad`` the split rebuilt by
    its own LAVIS class from the annotations that are left."""
    if getattr(dataset, "annotation", None) is None or getattr(dataset, "vis_root", None) is None:
        return dataset
    items, captions = find_problems(dataset, caption_problem)
    if not items and not captions:
        return dataset
    where = f"datasets.{name} split {split!r}"
    if not skip_bad:
        hint = f"Fix the annotations, or set datasets.{name}.skip_bad: true to leave such items out."
        only_missing = all(k == "missing image" for rs in items.values() for k, _ in rs) and not captions
        if only_missing:
            missing = sorted({os.path.relpath(d, dataset.vis_root) for rs in items.values() for _, d in rs})
            images = {ann.get("image") for ann in dataset.annotation}
            raise FileNotFoundError(
                f"{where}: {len(missing)} of {len(images)} image files do not exist under {dataset.vis_root!r}, "
                f"e.g. {missing[:SHOW]} (set datasets.{name}.build_info.images.storage). {hint}"
            )
        raise ValueError(f"{where}: {len(items) + len(captions)} bad entries: {_summary(items, captions)}. {hint}")

    kept = []
    for n, ann in enumerate(dataset.annotation):
        if n in items:
            continue
        if isinstance(ann.get("caption"), list):
            good = [c for k, c in enumerate(ann["caption"]) if (n, k) not in captions]
            if not good:
                continue
            ann = dict(ann, caption=good)
        kept.append({k: v for k, v in ann.items() if k != "instance_id"})
    logging.warning(
        "%s: skipping %d of %d entries and %d captions (skip_bad: true): %s",
        where, len(items), len(dataset.annotation), len(captions), _summary(items, captions),
    )
    if not kept:
        raise ValueError(f"{where}: every entry is bad ({_summary(items, captions)})")
    path = write_filtered(kept, work_dir, f"{name}_{split}")
    return type(dataset)(dataset.vis_processor, dataset.text_processor, dataset.vis_root, [path])


def write_filtered(kept: list, work_dir: str, prefix: str) -> str:
    """The entries left after skipping bad ones, as an annotation file named by its content."""
    os.makedirs(work_dir, exist_ok=True)
    blob = json.dumps(kept, sort_keys=True)
    path = os.path.join(work_dir, f"{prefix}_{hashlib.sha1(blob.encode()).hexdigest()[:12]}.json")
    with open(path, "w") as f:
        f.write(blob)
    return path


def _entry_problem(entry, training: bool) -> Optional[str]:
    """What is wrong with one annotation entry's structure (LAVIS's retrieval format: training
    ``{image, caption: str, image_id}``, evaluation ``{image, caption: [str, ...]}``), or None."""
    if not isinstance(entry, dict):
        return f"an entry must be an object {{'image': ..., 'caption': ...}}, got {type(entry).__name__}"
    for key in ("image", "caption") + (("image_id",) if training else ()):
        if key not in entry:
            return f"no {key!r} field (it has {sorted(entry)})"
    if not isinstance(entry["image"], str):
        return f"'image' must be a path string, got {type(entry['image']).__name__}"
    caption = entry["caption"]
    if training and not isinstance(caption, str):
        return f"'caption' must be one string in a training split, got {type(caption).__name__}"
    if not training:
        if isinstance(caption, str):
            return "'caption' is a string; an evaluation entry holds a list of captions (LAVIS would read each character as one)"
        if not isinstance(caption, list) or not all(isinstance(c, str) for c in caption):
            return f"'caption' must be a list of strings, got {type(caption).__name__}"
    return None


def check_annotation_file(path: str, split: str, where: str, skip_bad: bool, work_dir: str) -> Optional[str]:
    """Before LAVIS reads an annotation file: valid JSON (else the file, line and column), a
    list of entries, each of the split's structure (else the entry and the field). Bad entries
    are an error, or with ``skip_bad`` left out with a warning and a count: the path of the
    filtered copy is returned (None when nothing was left out)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if isinstance(data, dict):
        raise ValueError(f"{where}: {path} holds a JSON object (keys {sorted(data)[:SHOW]}); LAVIS expects a list of "
                         "entries, e.g. [{\"image\": ..., \"caption\": ...}, ...]")
    if not isinstance(data, list):
        raise ValueError(f"{where}: {path} holds a JSON {type(data).__name__}; LAVIS expects a list of entries")
    training = split == "train"
    bad = [(n, p) for n, p in ((n, _entry_problem(e, training)) for n, e in enumerate(data)) if p]
    if not bad:
        return None
    shown = "; ".join(f"entry {n}: {p}" for n, p in bad[:SHOW])
    if not skip_bad:
        raise ValueError(f"{where}: {path}: {len(bad)} of {len(data)} entries are malformed: {shown} "
                         f"(fix them, or set {where.split('.build_info')[0]}.skip_bad: true to leave them out)")
    logging.warning("%s: skipping %d of %d malformed entries (skip_bad: true): %s", where, len(bad), len(data), shown)
    dropped = {n for n, _ in bad}
    kept = [e for n, e in enumerate(data) if n not in dropped]
    if not kept:
        raise ValueError(f"{where}: {path}: every entry is malformed ({shown})")
    return write_filtered(kept, work_dir, split)
