"""The true matches of a LAVIS retrieval evaluation split, beyond its annotated pairs, and
their graded relevance where the data knows it: what the relevance-aware metrics
(``lavis_cprd.relevance``) count. Here, in the datasets layer, because it reads what each
dataset records (``cprd_shapes``' scene specs through ``shapes_truth``); ``relevance`` itself
is metrics only and imports no dataset."""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from lavis_cprd.datasets.shapes_truth import relevance_matrix
from lavis_cprd.relevance import annotated_matrix


def dataset_relevance(dataset) -> Optional[Dict[str, np.ndarray]]:
    """True matches (and graded relevance where known) of a LAVIS retrieval eval dataset:

    - ``cprd_shapes`` (entries with a ``scene``): from the scene specs (``shapes_truth``);
    - any dataset: an optional entry field ``extra_positives``, the captions of the split
      (strings) that are also true of that image, besides its own. A caption is true by its
      text: every copy of a true text in the split counts (two images may share a caption).

    Returns ``{"annotated", "true", "grades"?}`` ``[n_img, n_txt]`` matrices, or None when
    the dataset records nothing beyond its annotated pairs. Kept on the dataset: a run
    evaluates the same split every epoch."""
    kept = getattr(dataset, "_cprd_relevance", None)
    if kept is not None and kept[0] is dataset.annotation:
        return kept[1]
    truth = _relevance(dataset)
    dataset._cprd_relevance = (dataset.annotation, truth)
    return truth


def _relevance(dataset) -> Optional[Dict[str, np.ndarray]]:
    ann = dataset.annotation
    n_img, n_txt = len(dataset.image), len(dataset.text)
    annotated = annotated_matrix(dataset.img2txt, n_img, n_txt)
    if ann and "scene" in ann[0]:
        grades = relevance_matrix([a["scene"] for a in ann], list(dataset.text))
        return {"annotated": annotated, "true": (grades >= 1.0) | annotated, "grades": grades}
    if any("extra_positives" in a for a in ann):
        index = {}
        for j, t in enumerate(dataset.text):
            index.setdefault(t, []).append(j)
        true = annotated.copy()
        for i, a in enumerate(ann):
            for caption in a.get("extra_positives", []):
                text = dataset.text_processor(caption)
                if text not in index:
                    raise ValueError(f"annotation {i} ({a.get('image')}): extra_positives caption {caption!r} "
                                     "is not a caption of this split")
                true[i, index[text]] = True
            for j in dataset.img2txt[i]:  # a caption is true by its text: every copy of its own captions too
                true[i, index[dataset.text[j]]] = True
        return {"annotated": annotated, "true": true}
    return None
