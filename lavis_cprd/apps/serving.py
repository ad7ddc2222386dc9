"""``lavis-cprd search``: the top-k images of one or more text queries in an index folder
written by ``lavis-cprd index`` (``apps.gallery_index``), optionally re-ranked by the teacher.

    lavis-cprd search --index output/index "a red circle at the left" ["another query" ...] [--queries FILE|-]
        [--k 5] [--rerank] [--html out.html]

The folder (``apps.faiss_index``) says which config and checkpoint encoded the gallery, so
``search`` needs only the folder. It refuses to encode queries with a model whose checkpoint
or config differ from those that encoded the gallery, unless ``--allow-mismatch``.
Embeddings are the student's unit vectors; the index scores by inner product, so a flat index
ranks exactly as ``compute_sim_matrix`` does.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lavis_cprd.apps.faiss_index import load_index
from lavis_cprd.apps.gallery_index import positive_int, read_image
from lavis_cprd.apps.student_loading import load_student

log = logging.getLogger("lavis_cprd.apps.serving")

Hits = List[Tuple[str, float]]


class ModelMismatchError(RuntimeError):
    """``search`` would encode queries with another model than the one that encoded the index."""


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
