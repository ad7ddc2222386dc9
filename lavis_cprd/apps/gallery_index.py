"""``lavis-cprd index``: encode a gallery (an image folder) with a trained student into a FAISS
index folder (``apps.faiss_index``), which ``lavis-cprd search`` (``apps.serving``) searches.

    lavis-cprd index --cfg-path configs/cprd_tiny_shapes.yaml --ckpt output/.../checkpoint_best.pth \\
        --images path/to/folder --output output/index [--index flat|ivf|hnsw] [--bad-images skip]

An index folder holds ``index.faiss``, ``paths.json`` (the absolute path of each row) and
``meta.json`` (config, checkpoint, content hashes of both, embedding size, index kind, images
left out), so ``search`` needs only the folder. Embeddings are the student's unit vectors; the
index scores by inner product, so a flat index ranks exactly as ``compute_sim_matrix`` does.

Indexing writes its embeddings in chunks under ``OUTPUT/partial/`` as it goes: an interrupted
(or failed) run, started again with the same arguments, resumes after the last whole chunk.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from lavis_cprd.apps.faiss_index import INDEX_KINDS, PROBED_VECTORS, build_faiss_index, save_index
from lavis_cprd.apps.student_loading import load_student
from lavis_cprd.checkpoints import atomic_json, atomic_write
from lavis_cprd.training.lavis_patches import strict_image_loading

log = logging.getLogger("lavis_cprd.apps.gallery_index")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
BAD_IMAGES = ("error", "skip")


class BadImageError(OSError):
    """An image file of the gallery that cannot be decoded (not an image, truncated, damaged)."""


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
