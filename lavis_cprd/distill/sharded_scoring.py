"""Teacher scores of pairs over the gathered batch, each computed on the rank that holds the image.

A rank's pairs reference images of every rank (text->image negatives come from the gathered
batch). Scoring them where they were asked for would make each rank's teacher encode up to
every image of the gathered batch: teacher work per rank growing with the world size, and the
whole pixel batch all-gathered every step. Instead every rank learns the global list of pairs
to score, scores those whose image it holds (its teacher sees only its own images), and one
all-reduce of a zero-filled vector over that list hands every rank its logits back.
"""
from __future__ import annotations

from typing import Callable

import torch

from lavis_cprd import distributed


def score_where_images_live(
    pairs: torch.Tensor, local_size: int, score_local: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Logits ``[P]`` (float32) of this rank's ``pairs`` ``[P, 2]`` of (global image index,
    global caption index) in the batch gathered over ranks of ``local_size`` samples each.

    ``score_local(local_pairs)`` scores pairs of (this rank's image row, global caption index);
    it is called on every rank (with no pairs, possibly) whenever any rank has a pair, so a
    lazily built teacher is built on all ranks in the same step. Every rank must call this,
    with no pairs too (all found in the cache, say): the others may need its images.
    """
    all_pairs, sizes = distributed.gather_rows(pairs)
    if len(all_pairs) == 0:  # no rank has a pair: all ranks know it, none waits on another
        return torch.zeros(0, dtype=torch.float32, device=pairs.device)
    # Each distinct pair once, in an order every rank computes alike (ranks share many pairs).
    union, position = torch.unique(all_pairs, dim=0, return_inverse=True)
    first_row = distributed.rank_offset(local_size)
    mine = (union[:, 0] >= first_row) & (union[:, 0] < first_row + local_size)
    local_pairs = union[mine] - torch.tensor([first_row, 0], device=union.device)
    logits = torch.zeros(len(union), dtype=torch.float32, device=pairs.device)
    logits[mine] = score_local(local_pairs).to(logits)
    # Each pair is scored on exactly one rank, zeros elsewhere: the sum is exact.
    logits = distributed.all_reduce_sum(logits)
    start = sum(sizes[: distributed.get_rank()])
    return logits[position[start : start + len(pairs)]]
