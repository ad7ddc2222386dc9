"""Serving: ``lavis-cprd index`` encodes a gallery with a trained student into a FAISS index;
``lavis-cprd search`` returns the top-k images of one or more text queries (optionally
re-ranked by the teacher).

    lavis-cprd index --cfg-path configs/cprd_tiny_shapes.yaml --ckpt output/.../checkpoint_best.pth \\
        --images path/to/folder --output output/index [--index flat|ivf|hnsw] [--bad-images skip]
    lavis-cprd search --index output/index "a red circle at the left" ["another query" ...] [--queries FILE|-]
        [--k 5] [--rerank] [--html out.html]

An index folder holds ``index.faiss``, ``paths.json`` (the absolute path of each row) and
``meta.json`` (config, checkpoint, content hashes of both, embedding size, index kind, images
left out), so ``search`` needs only the folder. It refuses to encode queries with a model whose
checkpoint or config differ from those that encoded the gallery, unless ``--allow-mismatch``.
Embeddings are the student's unit vectors; the index scores by inner product, so a flat index
ranks exactly as ``compute_sim_matrix`` does.

Indexing writes its embeddings in chunks under ``OUTPUT/partial/`` as it goes: an interrupted
(or failed) run, started again with the same arguments, resumes after the last whole chunk.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from lavis_cprd.hashing import file_sha256

log = logging.getLogger("lavis_cprd.apps.serving")

INDEX_KINDS = ("flat", "ivf", "hnsw")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
BAD_IMAGES = ("error", "skip")
PROBED_VECTORS = 64  # IVF probes enough cells to hold about this many vectors, or 1/8 of them
Hits = List[Tuple[str, float]]


class BadImageError(OSError):
    """An image file of the gallery that cannot be decoded (not an image, truncated, damaged)."""


class ModelMismatchError(RuntimeError):
    """``search`` would encode queries with another model than the one that encoded the index."""


# ------------------------------------------------------------------------- faiss
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

    from lavis_cprd.checkpoints import atomic_json, atomic_write

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


# ------------------------------------------------------------------------ models
def model_fingerprint(cfg, ckpt: Optional[str]) -> Dict[str, str]:
    """Content hashes of what makes the embeddings: the checkpoint file's bytes (or the seeded
    random init) and the resolved model and eval-processor config."""
    from omegaconf import OmegaConf

    ckpt_sha256 = file_sha256(ckpt) if ckpt else hashlib.sha256(b"random-init, seed 0").hexdigest()
    config = {"model": OmegaConf.to_container(cfg.model_cfg, resolve=True), "vis_processor": _eval_processor(cfg)}
    config["model"].pop("finetuned", None)  # where the checkpoint lies, not what it holds
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return {"ckpt_sha256": ckpt_sha256, "config_sha256": hashlib.sha256(blob).hexdigest()}


def _eval_processor(cfg) -> Optional[dict]:
    from omegaconf import OmegaConf

    for dcfg in cfg.datasets_cfg.values():
        vis = dcfg.get("vis_processor", {}).get("eval")
        if vis is not None:
            return OmegaConf.to_container(vis, resolve=True)
    vis = cfg.model_cfg.get("preprocess", {}).get("vis_processor", {}).get("eval")
    if vis is None:
        vis = cfg.config.get("preprocess", {}).get("vis_processor", {}).get("eval")
    return None if vis is None else OmegaConf.to_container(vis, resolve=True)


def load_student(cfg_path: str, ckpt: Optional[str], options: Sequence[str] = (), with_fingerprint: bool = False):
    """The config's student with ``ckpt`` loaded (its keys must fit: ``checkpoints.load_state``),
    in eval mode, and its eval image processor; with ``with_fingerprint``, also
    :func:`model_fingerprint`."""
    import lavis.tasks as tasks
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    from lavis_cprd.checkpoints import load_state
    from lavis_cprd.training.launch import load_config

    cfg = load_config(argparse.Namespace(cfg_path=cfg_path, options=list(options)))
    cfg.run_cfg.evaluate = True  # serving never distils: the teacher is built only for --rerank
    if ckpt and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt!r} does not exist")
    if not ckpt:  # --random-init: the same random weights in index and every search
        torch.manual_seed(0)
    model = tasks.setup_task(cfg).build_model(cfg)
    if ckpt:
        load_state(model, ckpt, "--ckpt")
    model.eval()
    vis = _eval_processor(cfg)
    if vis is None:
        raise ValueError(f"{cfg_path}: no eval vis_processor in its datasets or model preprocess")
    processor = registry.get_processor_class(vis["name"]).from_config(OmegaConf.create(vis))
    if with_fingerprint:
        return model, processor, model_fingerprint(cfg, ckpt)
    return model, processor


def list_images(folder: str) -> List[str]:
    """Absolute paths of the image files under ``folder`` (by suffix), sorted."""
    folder = os.path.abspath(folder)
    paths = sorted(
        os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if f.lower().endswith(IMAGE_SUFFIXES)
    )
    if not paths:
        raise FileNotFoundError(f"--images {folder!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it")
    return paths


def read_image(path: str) -> Image.Image:
    """The image at ``path``, fully decoded, as RGB. A file that is not an image, or is
    truncated or damaged, raises :class:`BadImageError` (LAVIS turns on PIL's loading of
    truncated images process-wide, which would fill the missing part with grey)."""
    from lavis_cprd.training.lavis_patches import strict_image_loading

    try:
        with strict_image_loading(), Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for broken files
        raise BadImageError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


@torch.no_grad()
def encode_images(model, processor, paths: Sequence[str], batch_size: int = 64, progress: bool = True,
                  skip_bad: bool = False) -> np.ndarray:
    """Unit embeddings ``[N, D]`` of the images at ``paths``; with ``skip_bad`` the rows of
    unreadable ones are left out (use :func:`encode_gallery` to know which)."""
    return encode_gallery(model, processor, paths, batch_size, progress, skip_bad)[0]


@torch.no_grad()
def encode_gallery(model, processor, paths: Sequence[str], batch_size: int = 64, progress: bool = True,
                   skip_bad: bool = False) -> Tuple[np.ndarray, List[str], List[Dict[str, str]]]:
    """``(embeddings, kept paths, skipped)``: unreadable images stop with :class:`BadImageError`,
    or with ``skip_bad`` are left out and listed (path and reason)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    out, kept, skipped = [], [], []
    bar = tqdm(total=len(paths), desc="encoding images", unit="img", disable=not progress)
    for i in range(0, len(paths), batch_size):
        pixels = []
        for path in paths[i: i + batch_size]:
            try:
                pixels.append(processor(read_image(path)))
                kept.append(path)
            except BadImageError as e:
                if not skip_bad:
                    raise
                skipped.append({"path": path, "reason": str(e)})
                log.warning("skipping %s", e)
        if pixels:
            out.append(model.encode_image(torch.stack(pixels).to(device)).float().cpu().numpy())
        bar.update(min(batch_size, len(paths) - i))
    bar.close()
    dim = int(getattr(model, "embed_dim", 0)) or (out[0].shape[1] if out else 0)
    return (np.concatenate(out) if out else np.zeros((0, dim), np.float32)), kept, skipped


class PartialIndex:
    """The embeddings of an ``index`` run so far, in chunks under ``OUTPUT/partial/``: each
    chunk is written atomically once encoded, so a run stopped by an error, a bad image or an
    interruption loses at most the chunk in progress. A run with the same model and image list
    resumes after the last whole chunk; any other starts over."""

    def __init__(self, output: str, key: Dict[str, str]):
        self.folder = os.path.join(output, "partial")
        self.key = key
        self.progress_path = os.path.join(self.folder, "progress.json")

    def done_chunks(self) -> int:
        if not os.path.isfile(self.progress_path):
            return 0
        with open(self.progress_path) as f:
            progress = json.load(f)
        if progress.get("key") != self.key:
            log.info("%s holds another run's chunks (other model, images or chunk size): starting over", self.folder)
            shutil.rmtree(self.folder)
            return 0
        return int(progress["chunks"])

    def save(self, chunk: int, embeddings: np.ndarray, kept: List[str], skipped: List[dict]) -> None:
        from lavis_cprd.checkpoints import atomic_json, atomic_write

        os.makedirs(self.folder, exist_ok=True)
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, embeddings)

        atomic_write(self._path(chunk, "npy"), write)
        atomic_json({"kept": kept, "skipped": skipped}, self._path(chunk, "json"))
        atomic_json({"key": self.key, "chunks": chunk + 1}, self.progress_path)

    def load(self, chunks: int) -> Tuple[List[np.ndarray], List[str], List[dict]]:
        embeddings, kept, skipped = [], [], []
        for chunk in range(chunks):
            embeddings.append(np.load(self._path(chunk, "npy")))
            with open(self._path(chunk, "json")) as f:
                part = json.load(f)
            kept += part["kept"]
            skipped += part["skipped"]
        return embeddings, kept, skipped

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, chunk: int, ext: str) -> str:
        return os.path.join(self.folder, f"chunk_{chunk:05d}.{ext}")


def index_gallery(model, processor, paths: List[str], output: str, fingerprint: Dict[str, str], batch_size: int = 64,
                  chunk_size: int = 1024, skip_bad: bool = False, progress: bool = True):
    """Encode ``paths`` chunk by chunk into :class:`PartialIndex` (resuming where a previous run
    with the same model and images stopped); returns ``(embeddings, kept paths, skipped)``."""
    listing = hashlib.sha256("\n".join(paths).encode()).hexdigest()
    partial = PartialIndex(output, {**fingerprint, "images": listing, "chunk_size": str(chunk_size)})
    chunks = math.ceil(len(paths) / chunk_size)
    done = partial.done_chunks()
    if done:
        print(f"resuming: {min(done * chunk_size, len(paths))} of {len(paths)} images already encoded in {partial.folder}")
    for chunk in range(done, chunks):
        part = paths[chunk * chunk_size: (chunk + 1) * chunk_size]
        try:
            embeddings, kept, skipped = encode_gallery(model, processor, part, batch_size, progress, skip_bad)
        except BadImageError as e:
            raise BadImageError(
                f"{e}. Pass --bad-images skip to leave such files out (they are counted and listed in meta.json); "
                f"the {chunk * chunk_size} images encoded before it are kept in {partial.folder}: the same command "
                "resumes there") from e
        partial.save(chunk, embeddings, kept, skipped)
    embeddings, kept, skipped = partial.load(chunks)
    return np.concatenate(embeddings), kept, skipped, partial


# ------------------------------------------------------------------------ search
@torch.no_grad()
def search(model, index, paths: Sequence[str], queries: Sequence[str], k: int) -> List[Hits]:
    """The top ``k`` (path, score) of each query; fewer where the index returns fewer."""
    if k < 1:
        raise ValueError(f"--k must be at least 1, got {k}")
    check_queries(queries)
    device = next(model.parameters()).device
    text = model.encode_captions(list(queries), device).float().cpu().numpy()
    scores, rows = index.search(np.ascontiguousarray(text), min(k, len(paths)))
    return [[(paths[r], float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]


@torch.no_grad()
def rerank_problem(model) -> Optional[str]:
    """Why ``--rerank`` cannot re-score with this student's teacher (None: it can): a ConaCLIP
    student's teacher is a dual encoder, which embeds but scores no pair."""
    distill = getattr(model, "distill", None)
    if distill is not None and distill.teacher_kind != "cross":
        return (f"--rerank re-scores with the student's cross-encoder teacher, but this student was trained with "
                f"model.distill.loss={distill.loss!r}, whose teacher ({distill.teacher.get('arch')}) is a dual "
                "encoder that scores no pair: search without --rerank")
    return None


def rerank(model, processor, query: str, hits: Hits) -> Hits:
    """Re-score the student's top-k with the model's cross-encoder teacher (match probability)."""
    if not hits:
        return hits
    images = torch.stack([processor(read_image(p)) for p, _ in hits])
    pairs = torch.stack([torch.arange(len(hits)), torch.zeros(len(hits), dtype=torch.long)], 1)
    scores = model.teacher.score(images, [query], pairs)
    return sorted(((p, float(s)) for (p, _), s in zip(hits, scores)), key=lambda x: -x[1])


def thumbnail_uri(path: str, size: int = 192) -> str:
    """The image as a ``data:`` URI of a PNG thumbnail (the page needs no other file)."""
    img = read_image(path)
    img.thumbnail((size, size))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_html(out: str, results: Dict[str, Hits], model: str, score: str) -> None:
    """A self-contained page: per query, its hits as embedded thumbnails with rank, file (a
    ``file://`` link) and score; the header says which model made the scores and what they are."""
    sections = []
    for query, hits in results.items():
        cells = "".join(
            f'<figure><img src="{thumbnail_uri(p)}" alt="{html.escape(os.path.basename(p))}" width="192">'
            f'<figcaption>{i + 1}. <a href="{html.escape(Path(p).absolute().as_uri())}">'
            f"{html.escape(os.path.basename(p))}</a><br>score {s:.4f}</figcaption></figure>"
            for i, (p, s) in enumerate(hits)
        )
        sections.append(f"<h2>{html.escape(query)}</h2>{cells or '<p>no hits</p>'}")
    with open(out, "w") as f:
        f.write(
            "<!doctype html><meta charset='utf-8'><title>lavis-cprd search</title>"
            "<style>body{font-family:sans-serif}figure{display:inline-block;margin:8px;text-align:center}"
            ".meta{color:#444}</style>"
            f"<p class='meta'>Model: {html.escape(model)}<br>Score: {html.escape(score)}</p>"
            + "".join(sections) + "\n"
        )


# --------------------------------------------------------------------------- CLI
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    parser.add_argument("--nprobe", type=positive_int, default=None,
                        help=f"ivf cells searched per query (default: ~{PROBED_VECTORS} images' worth, at least 1/8)")
    parser.add_argument("--bad-images", default="error", choices=BAD_IMAGES,
                        help="an unreadable or truncated image file: stop with an error (default), or skip it "
                        "(counted, and listed in meta.json)")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--chunk-size", type=positive_int, default=1024,
                        help="images per chunk written to OUTPUT/partial (a rerun resumes after the last one)")
    args = parser.parse_args(argv)
    if args.ckpt is None and not args.random_init:
        parser.error("give --ckpt PATH (a trained student), or --random-init to index with random weights (plumbing only)")
    logging.basicConfig(level=logging.INFO)
    model, processor, fingerprint = load_student(args.cfg_path, args.ckpt, args.options, with_fingerprint=True)
    paths = list_images(args.images)
    output = os.path.abspath(args.output)
    embeddings, kept, skipped, partial = index_gallery(
        model, processor, paths, output, fingerprint, args.batch_size, args.chunk_size, args.bad_images == "skip")
    if not kept:
        raise BadImageError(f"--images {args.images!r}: none of its {len(paths)} image files could be read")
    index = build_faiss_index(embeddings, args.index, args.nlist, nprobe=args.nprobe or 0)
    meta = {"cfg_path": os.path.abspath(args.cfg_path), "ckpt": args.ckpt and os.path.abspath(args.ckpt),
            "options": args.options, **fingerprint, "dim": int(embeddings.shape[1]), "index": args.index,
            "count": len(kept), "skipped": skipped}
    if args.index == "ivf":
        meta.update(nlist=int(index.nlist), nprobe=int(index.nprobe))
    save_index(output, index, kept, meta)
    partial.remove()
    print(f"indexed {len(kept)} images ({args.index}, dim {embeddings.shape[1]}) into {output}"
          + (f"; skipped {len(skipped)} unreadable file(s), listed in meta.json" if skipped else ""))
    return meta


def read_queries(positional: Sequence[str], source: Optional[str]) -> List[str]:
    """The queries of one ``search`` call: positional ones, then one per line of ``source``
    (a file, or ``-`` for standard input; blank lines are skipped)."""
    queries = list(positional)
    if source is not None:
        if source == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(source) as f:
                lines = f.read().splitlines()
        queries += [line.strip() for line in lines if line.strip()]
    if not queries:
        raise ValueError("no query given: pass the text to search for, or --queries FILE (one per line; - for stdin)")
    check_queries(queries)
    return queries


def check_queries(queries: Sequence[str]) -> None:
    empty = [i for i, q in enumerate(queries) if not str(q).strip()]
    if empty:
        raise ValueError(f"query {empty[0] + 1} of {len(queries)} is empty: give some text to search for")


def check_model(meta: dict, fingerprint: Dict[str, str], allow_mismatch: bool) -> None:
    """The model that encodes the queries must be the one that encoded the gallery."""
    changed = [what for what, key in (("checkpoint", "ckpt_sha256"), ("config", "config_sha256"))
               if meta.get(key) != fingerprint[key]]
    if not changed:
        return
    message = (f"the {' and '.join(changed)} changed since this index was built (checkpoint {meta.get('ckpt')}, "
               f"config {meta.get('cfg_path')}): its queries would be encoded by another model than its images")
    if not allow_mismatch:
        raise ModelMismatchError(f"{message}. Rebuild the index with `lavis-cprd index`, or pass --allow-mismatch")
    log.warning("%s (--allow-mismatch)", message)


def search_main(argv: Optional[List[str]] = None) -> List[Hits]:
    parser = argparse.ArgumentParser(prog="lavis-cprd search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", nargs="*", help="the text(s) to search for.")
    parser.add_argument("--queries", default=None, help="a file with one query per line, or - for standard input.")
    parser.add_argument("--index", required=True, help="index folder from `lavis-cprd index`.")
    parser.add_argument("--k", type=positive_int, default=5, help="hits per query (at least 1).")
    parser.add_argument("--nprobe", type=positive_int, default=None, help="ivf cells to search (default: the index's).")
    parser.add_argument("--rerank", action="store_true", help="re-score the top-k with the teacher cross-encoder.")
    parser.add_argument("--html", default=None, help="write a self-contained HTML page of the results.")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="search even if the checkpoint or config changed since the index was built")
    args = parser.parse_args(argv)
    try:
        queries = read_queries(args.query, args.queries)
    except ValueError as e:
        parser.error(str(e))
    index, paths, meta = load_index(args.index)
    if args.nprobe and hasattr(index, "nprobe"):
        index.nprobe = min(args.nprobe, index.nlist)
    model, processor, fingerprint = load_student(meta["cfg_path"], meta["ckpt"], meta.get("options", []),
                                                 with_fingerprint=True)
    check_model(meta, fingerprint, args.allow_mismatch)
    problem = rerank_problem(model) if args.rerank else None
    if problem:
        parser.error(problem)
    results = search(model, index, paths, queries, args.k)
    wanted = min(args.k, len(paths))
    for query, hits in zip(queries, results):
        if len(hits) < wanted:
            probe = f" (it searched {index.nprobe} of {index.nlist} cells: raise --nprobe)" if hasattr(index, "nprobe") else ""
            print(f"warning: {query!r}: the index returned {len(hits)} of k={wanted} hits{probe}", file=sys.stderr)
    if args.rerank:
        results = [rerank(model, processor, q, hits) for q, hits in zip(queries, results)]
    for query, hits in zip(queries, results):
        if len(queries) > 1:
            print(f"# {query}")
        for rank, (path, score) in enumerate(hits, 1):
            print(f"{rank:3d}  {score:8.4f}  {path}")
    if args.html:
        teacher = model.distill.teacher.get("arch", "the configured teacher")
        score = (f"the teacher cross-encoder's match probability ({teacher}), re-ranking the student's top {args.k}"
                 if args.rerank else "cosine similarity of the student's unit image and text embeddings (higher: closer)")
        made_by = f"{meta.get('cfg_path')} with checkpoint {meta.get('ckpt') or 'random init (seed 0)'}"
        write_html(args.html, dict(zip(queries, results)), made_by, score)
        print(f"wrote {args.html}")
    return results
