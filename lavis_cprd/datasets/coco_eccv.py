"""ECCV Caption and CxC positives for LAVIS's ``coco_retrieval`` test split.

COCO annotates 5 captions per image; ECCV Caption (Chun et al. 2022) and CxC (Parekh et al.
2021) re-annotated COCO's 5K test split and found many more true matches. The ``eccv-caption``
package ships both, keyed by COCO image and caption ids, with reference metric code.

LAVIS's split (``coco_karpathy_test.json``) names images by file (``val2014/COCO_val2014_
000000391895.jpg``: the digits are the COCO image id) but its captions carry no ids; they are
matched by text to COCO's own ``captions_val2014.json``, which users point to with the dataset
config key ``datasets.coco_retrieval.coco_captions``. The task then reports, next to LAVIS's
keys: ``eccv_{i2t,t2i}_{map_at_r,r_precision,true_r1}`` and ``cxc_{i2t,t2i}_true_r{1,5,10}``.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lavis_cprd.relevance import direction_metrics

log = logging.getLogger(__name__)

CONFIG_KEY = "coco_captions"
_IMAGE_ID = re.compile(r"(\d+)\.\w+$")


def image_id_of(path: str) -> int:
    """COCO image id from a COCO file name (``.../COCO_val2014_000000391895.jpg`` -> 391895)."""
    m = _IMAGE_ID.search(os.path.basename(path))
    if m is None:
        raise ValueError(f"cannot read a COCO image id from {path!r} (expected a name like COCO_val2014_000000391895.jpg)")
    return int(m.group(1))


def _normalize(caption: str) -> str:
    return " ".join(caption.lower().split()).rstrip(" .")


def caption_index(captions_json: str) -> Dict[int, List[Tuple[str, int]]]:
    """COCO's caption file as ``image id -> [(normalised caption, caption id), ...]``."""
    with open(captions_json) as f:
        coco = json.load(f)
    by_image: Dict[int, List[Tuple[str, int]]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(int(a["image_id"]), []).append((_normalize(a["caption"]), int(a["id"])))
    return by_image


def coco_ids(annotation: Sequence[Dict], captions_json: str,
             index: Optional[Dict[int, List[Tuple[str, int]]]] = None) -> Tuple[List[int], List[int]]:
    """COCO image ids of the split's images and COCO caption ids of its captions, in LAVIS's
    order (``dataset.image`` and ``dataset.text``: every entry's captions in turn).

    A caption is matched by text (case, spaces and a final full stop ignored) among its own
    image's COCO captions, each COCO caption used once; one that matches none is an error.
    ``index``: ``caption_index(captions_json)``, when several splits share one read."""
    by_image = caption_index(captions_json) if index is None else index
    image_ids, caption_ids = [], []
    for i, entry in enumerate(annotation):
        iid = image_id_of(entry["image"])
        image_ids.append(iid)
        free = list(by_image.get(iid, []))
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        for caption in captions:
            text = _normalize(caption)
            hit = next((k for k, (t, _) in enumerate(free) if t == text), None)
            if hit is None:
                raise ValueError(
                    f"entry {i} ({entry['image']}): caption {caption!r} is not among image {iid}'s captions in "
                    f"{captions_json} ({len(by_image.get(iid, []))} there); is `{CONFIG_KEY}` COCO's "
                    "captions_val2014.json?"
                )
            caption_ids.append(free.pop(hit)[1])
    return image_ids, caption_ids


def positives_matrix(
    gts: Dict[int, List[int]], query_ids: Sequence[int], item_ids: Sequence[int]
) -> Tuple[np.ndarray, np.ndarray]:
    """Boolean ``[Q, N]`` (item ``j`` is a listed positive of query ``q``) and, per query,
    the listed positives that are not in the split. Queries without an entry stay all-False
    (left out of the metrics). The missing ones still count in R, as in ``eccv_caption``'s
    code: ECCV Caption itself lists 2 captions outside COCO's 5K test split."""
    column = {iid: j for j, iid in enumerate(item_ids)}
    true = np.zeros((len(query_ids), len(item_ids)), dtype=bool)
    missing = np.zeros(len(query_ids), dtype=np.int64)
    for q, qid in enumerate(query_ids):
        for pos in set(gts.get(int(qid), ())):
            j = column.get(int(pos))
            if j is None:
                missing[q] += 1
            else:
                true[q, j] = True
    return true, missing


@functools.lru_cache(maxsize=1)
def package_reference():
    """``eccv_caption.Metrics`` with the positives the package ships (read once)."""
    from eccv_caption import Metrics

    return Metrics()


def eccv_metrics(
    score_i2t: np.ndarray,
    score_t2i: np.ndarray,
    image_ids: Sequence[int],
    caption_ids: Sequence[int],
    reference=None,
) -> Dict[str, float]:
    """ECCV Caption mAP@R, R-Precision, R@1 and CxC R@1/5/10 per direction, in percent, from
    LAVIS's ``[n_img, n_txt]`` / ``[n_txt, n_img]`` score matrices. ``reference``: an
    ``eccv_caption.Metrics`` (default: the package's own positives). Sources with no query in
    the split (e.g. on the val split) are left out."""
    reference = package_reference() if reference is None else reference
    out: Dict[str, float] = {}
    sources = {"eccv": (reference.eccv_gts, (1,)), "cxc": (reference.cxc_gts, (1, 5, 10))}
    for source, (gts, ks) in sources.items():
        for direction, scores, queries, items in (
            ("i2t", score_i2t, image_ids, caption_ids),
            ("t2i", score_t2i, caption_ids, image_ids),
        ):
            true, missing = positives_matrix(gts[direction], queries, items)
            if not true.any():
                continue
            if not set(gts[direction]) <= set(map(int, queries)):
                log.warning("%s %s: this split holds only some of the listed queries; the figures are not the "
                            "published 5K-test numbers", source, direction)
            m = direction_metrics(scores, true, ks, prefix=f"{source}_{direction}_", missing=missing)
            if source == "cxc":  # CxC is reported as recall only
                m = {k: v for k, v in m.items() if "_true_r" in k}
            out.update(m)
    return out


def resolve_captions_path(name: str, path: str, cache_root: str) -> str:
    """The ``datasets.NAME.coco_captions`` file: as given, or under LAVIS's cache root (as
    LAVIS resolves ``storage``); a clear error when it is in neither place."""
    for candidate in (path, os.path.join(cache_root, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(
        f"datasets.{name}.{CONFIG_KEY}: {path} does not exist (nor under {cache_root}); point it to COCO's "
        "annotations/captions_val2014.json, or remove the key"
    )


def tag_coco_ids(splits: Dict, captions_json: Optional[str]) -> None:
    """Map every eval split to COCO ids now (a caption that matches nothing fails before
    training starts) and keep them on the dataset as ``coco_ids``, which the task's
    evaluation reads: LAVIS's evaluation sees only the data loader."""
    if not captions_json:
        return
    index = caption_index(captions_json)  # read once for all splits
    for split, dataset in splits.items():
        if split != "train":
            dataset.coco_ids = coco_ids(dataset.annotation, captions_json, index)
