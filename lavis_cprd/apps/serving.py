"""Serving: ``lavis-cprd index`` encodes a gallery with a trained student into a FAISS index;
``lavis-cprd search "a query"`` returns the top-k images (optionally re-ranked by the teacher).

    lavis-cprd index --cfg-path configs/cprd_tiny_shapes.yaml --ckpt output/.../checkpoint_best.pth \\
        --images path/to/folder --output output/index [--index flat|ivf|hnsw]
    lavis-cprd search --index output/index "a red circle at the left" [--k 5] [--rerank] [--html out.html]

An index folder holds ``index.faiss``, ``paths.json`` (one image path per row) and
``meta.json`` (config, checkpoint, embedding size, index kind), so ``search`` needs only the
folder. Embeddings are the student's unit vectors; the index scores by inner product, so a
flat index ranks exactly as ``compute_sim_matrix`` does.
"""
from __future__ import annotations

import argparse
import html
import json
import logging
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

INDEX_KINDS = ("flat", "ivf", "hnsw")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


# ------------------------------------------------------------------------- faiss
def build_faiss_index(embeddings: np.ndarray, kind: str = "flat", nlist: int = 0, hnsw_m: int = 32):
    """An inner-product index over unit ``embeddings [N, D]``: exact (``flat``), inverted
    lists (``ivf``, ``nlist`` cells, default ~sqrt N) or a graph (``hnsw``) for large galleries."""
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
        index.nprobe = max(1, nlist // 8)
    else:
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.add(embeddings)
    return index


def save_index(folder: str, index, paths: Sequence[str], meta: dict) -> None:
    import faiss

    from lavis_cprd.checkpoints import atomic_write

    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "index.faiss"), lambda tmp: faiss.write_index(index, tmp))
    with open(os.path.join(folder, "paths.json"), "w") as f:
        json.dump(list(paths), f)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


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
    return index, paths, meta


# ------------------------------------------------------------------------ models
def load_student(cfg_path: str, ckpt: Optional[str], options: Sequence[str] = ()):
    """The config's student with ``ckpt`` loaded, in eval mode, and its eval image processor."""
    import lavis.tasks as tasks
    from lavis.common.registry import registry

    from lavis_cprd.training.launch import load_config

    cfg = load_config(argparse.Namespace(cfg_path=cfg_path, options=list(options)))
    if not ckpt:  # --random-init: the same random weights in index and every search
        torch.manual_seed(0)
    model = tasks.setup_task(cfg).build_model(cfg)
    if ckpt:
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"--ckpt {ckpt!r} does not exist")
        model.load_checkpoint(ckpt)
    model.eval()
    vis = None
    for dcfg in cfg.datasets_cfg.values():
        vis = dcfg.get("vis_processor", {}).get("eval")
        if vis is not None:
            break
    if vis is None:
        vis = cfg.model_cfg.get("preprocess", {}).get("vis_processor", {}).get("eval")
    if vis is None:
        raise ValueError(f"{cfg_path}: no eval vis_processor in its datasets or model preprocess")
    processor = registry.get_processor_class(vis.name).from_config(vis)
    return model, processor


def list_images(folder: str) -> List[str]:
    paths = sorted(
        os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if f.lower().endswith(IMAGE_SUFFIXES)
    )
    if not paths:
        raise FileNotFoundError(f"--images {folder!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
    return paths


@torch.no_grad()
def encode_images(model, processor, paths: Sequence[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
    from tqdm import tqdm

    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=len(paths), desc="encoding images", unit="img", disable=not progress)
    for i in range(0, len(paths), batch_size):
        batch = torch.stack([processor(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]]).to(device)
        out.append(model.encode_image(batch).float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    return np.concatenate(out)


@torch.no_grad()
def search(model, index, paths: Sequence[str], queries: Sequence[str], k: int) -> List[List[Tuple[str, float]]]:
    device = next(model.parameters()).device
    text = model.encode_captions(list(queries), device).float().cpu().numpy()
    scores, rows = index.search(np.ascontiguousarray(text), min(k, len(paths)))
    return [[(paths[r], float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]


@torch.no_grad()
def rerank(model, processor, query: str, hits: List[Tuple[str, float]]) -> List[Tuple[str, float]]:
    """Re-score the student's top-k with the model's cross-encoder teacher (match probability)."""
    images = torch.stack([processor(Image.open(p).convert("RGB")) for p, _ in hits])
    pairs = torch.stack([torch.arange(len(hits)), torch.zeros(len(hits), dtype=torch.long)], 1)
    scores = model.teacher.score(images, [query], pairs)
    return sorted(((p, float(s)) for (p, _), s in zip(hits, scores)), key=lambda x: -x[1])


def write_html(out: str, query: str, hits: List[Tuple[str, float]]) -> None:
    cells = "".join(
        f'<figure><img src="file://{html.escape(os.path.abspath(p))}" width="192">'
        f"<figcaption>{i + 1}. {html.escape(os.path.basename(p))}<br>score {s:.4f}</figcaption></figure>"
        for i, (p, s) in enumerate(hits)
    )
    with open(out, "w") as f:
        f.write(
            "<!doctype html><meta charset='utf-8'><title>lavis-cprd search</title>"
            "<style>body{font-family:sans-serif}figure{display:inline-block;margin:8px;text-align:center}</style>"
            f"<h2>{html.escape(query)}</h2>{cells}\n"
        )


# --------------------------------------------------------------------------- CLI
def index_main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="lavis-cprd index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg-path", required=True, help="the student's experiment YAML.")
    parser.add_argument("--ckpt", default=None, help="trained student checkpoint (checkpoint_best.pth).")
    parser.add_argument("--random-init", action="store_true", help="index with randomly initialised weights "
                        "(seeded: search uses the same ones), for plumbing only")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides key=value.")
    parser.add_argument("--images", required=True, help="folder of images (searched recursively).")
    parser.add_argument("--output", required=True, help="index folder to write.")
    parser.add_argument("--index", default="flat", choices=INDEX_KINDS, help="flat (exact, default) | ivf | hnsw.")
    parser.add_argument("--nlist", type=int, default=0, help="ivf cells (default ~sqrt(N)).")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.ckpt is None and not args.random_init:
        parser.error("give --ckpt PATH (a trained student), or --random-init to index with random weights (plumbing only)")
    logging.basicConfig(level=logging.INFO)
    model, processor = load_student(args.cfg_path, args.ckpt, args.options)
    paths = list_images(args.images)
    embeddings = encode_images(model, processor, paths, args.batch_size)
    index = build_faiss_index(embeddings, args.index, args.nlist)
    meta = {"cfg_path": os.path.abspath(args.cfg_path), "ckpt": args.ckpt and os.path.abspath(args.ckpt),
            "options": args.options, "dim": int(embeddings.shape[1]), "index": args.index, "count": len(paths)}
    save_index(args.output, index, paths, meta)
    print(f"indexed {len(paths)} images ({args.index}, dim {embeddings.shape[1]}) into {args.output}")
    return meta


def search_main(argv: Optional[List[str]] = None) -> List[Tuple[str, float]]:
    parser = argparse.ArgumentParser(prog="lavis-cprd search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", help="the text to search for.")
    parser.add_argument("--index", required=True, help="index folder from `lavis-cprd index`.")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rerank", action="store_true", help="re-score the top-k with the teacher cross-encoder.")
    parser.add_argument("--html", default=None, help="write an HTML page of the results with thumbnails.")
    args = parser.parse_args(argv)
    index, paths, meta = load_index(args.index)
    model, processor = load_student(meta["cfg_path"], meta["ckpt"], meta.get("options", []))
    (hits,) = search(model, index, paths, [args.query], args.k)
    if args.rerank:
        hits = rerank(model, processor, args.query, hits)
    for rank, (path, score) in enumerate(hits, 1):
        print(f"{rank:3d}  {score:8.4f}  {path}")
    if args.html:
        write_html(args.html, args.query, hits)
        print(f"wrote {args.html}")
    return hits
