"""Distributed helpers that also work (as identities) in a single process, and the device choice."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized
from lavis.models.base_model import all_gather_with_grad, concat_all_gather


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated; gradients flow back to each rank's own slice."""
    return all_gather_with_grad(x) if is_dist_avail_and_initialized() else x


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    return concat_all_gather(x)


def gather_strings(items: Sequence[str]) -> List[str]:
    if not is_dist_avail_and_initialized():
        return list(items)
    out: List[List[str]] = [None] * get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, list(items))
    return [s for part in out for s in part]


def gather_objects(part: dict) -> dict:
    """Every rank's ``part`` dict merged (for small CPU results: evaluation features)."""
    if not is_dist_avail_and_initialized():
        return dict(part)
    out: List[dict] = [None] * get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, part)
    merged: dict = {}
    for p in out:
        merged.update(p)
    return merged


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a decision taken once: a job folder, a resume path)."""
    if not is_dist_avail_and_initialized():
        return obj
    box = [obj if get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_dist_avail_and_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def resolve_device(name: str = "auto") -> torch.device:
    """``run.device`` (or a ``--device`` flag): ``cuda``, ``cpu`` or ``auto`` (CUDA when present)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def rank_offset(local_size: int) -> int:
    """Index of this rank's first sample in the gathered batch (equal local sizes)."""
    return get_rank() * local_size


__all__ = [
    "gather_with_grad", "gather_no_grad", "gather_strings", "gather_objects", "broadcast_object", "all_reduce_sum", "rank_offset",
    "get_rank", "get_world_size", "resolve_device",
]


def gather_rows(x: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
    """All ranks' ``x`` concatenated in rank order, however many rows each holds (same trailing
    shape and dtype, on the process group's device), and each rank's row count. Every rank must
    call it. Two collectives: the counts, then the rows padded to the largest count (skipped
    when no rank has a row)."""
    if not is_dist_avail_and_initialized():
        return x, [len(x)]
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(get_world_size())]
    dist.all_gather(counts, torch.tensor([len(x)], dtype=torch.long, device=x.device))
    sizes = [int(c) for c in counts]
    longest = max(sizes)
    if longest == 0:
        return x, sizes
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sizes


__all__ += ["gather_rows"]
