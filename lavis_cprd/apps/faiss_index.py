"""The FAISS index of a gallery and its folder: ``index.faiss``, ``paths.json`` (the absolute
path of each row) and ``meta.json`` (config, checkpoint, content hashes of both, embedding
size, index kind, images left out). ``lavis-cprd index`` (``apps.gallery_index``) writes one;
``lavis-cprd search`` (``apps.serving``) needs only the folder.

Embeddings are the student's unit vectors; the index scores by inner product, so a flat index
ranks exactly as ``compute_sim_matrix`` does.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from lavis_cprd.checkpoints import atomic_json, atomic_write

INDEX_KINDS = ("flat", "ivf", "hnsw")
PROBED_VECTORS = 64  # IVF probes enough cells to hold about this many vectors, or 1/8 of them


def default_nprobe(nlist: int, count: int) -> int:
    """IVF cells to search: about ``PROBED_VECTORS`` vectors' worth, and at least 1/8 of the
    cells (all of them for a small gallery, where probing one cell would miss most hits)."""
    per_cell = max(1.0, count / max(1, nlist))
    return int(min(nlist, max(1, math.ceil(nlist / 8), math.ceil(PROBED_VECTORS / per_cell))))


def build_faiss_index(embeddings: np.ndarray, kind: str = "flat", nlist: int = 0, hnsw_m: int = 32,
                      nprobe: int = 0):
    """An inner-product index over unit ``embeddings [N, D]``: exact (``flat``), inverted
    lists (``ivf``, ``nlist`` cells, default ~sqrt N, searching ``nprobe`` of them, default
    :func:`default_nprobe`) or a graph (``hnsw``) for large galleries."""
    import faiss

    if kind not in INDEX_KINDS:
        raise ValueError(f"--index {kind!r} is not one of {list(INDEX_KINDS)}")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    d = embeddings.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, int(np.sqrt(len(embeddings))))
        if nlist > len(embeddings):
            raise ValueError(f"--nlist {nlist} needs at least as many images; the gallery has {len(embeddings)}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        index.nprobe = min(nlist, nprobe) if nprobe else default_nprobe(nlist, len(embeddings))
    else:
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.add(embeddings)
    return index


def save_index(folder: str, index, paths: Sequence[str], meta: dict) -> None:
    import faiss

    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "index.faiss"), lambda tmp: faiss.write_index(index, tmp))
    atomic_json(list(paths), os.path.join(folder, "paths.json"))
    atomic_json(meta, os.path.join(folder, "meta.json"))


def load_index(folder: str):
    """``(index, paths, meta)`` of an index folder written by ``lavis-cprd index``."""
    import faiss

    for name in ("index.faiss", "paths.json", "meta.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"--index {folder!r}: no {name} there; build it with `lavis-cprd index`")
    index = faiss.read_index(os.path.join(folder, "index.faiss"))
    with open(os.path.join(folder, "paths.json")) as f:
        paths = json.load(f)
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    if index.ntotal != len(paths):
        raise ValueError(f"--index {folder!r}: index has {index.ntotal} vectors but paths.json {len(paths)}")
    if meta.get("nprobe") and hasattr(index, "nprobe"):
        index.nprobe = int(meta["nprobe"])
    return index, paths, meta
