"""Dual-encoder retrieval scores over a LAVIS evaluation loader, single- or multi-process."""
from __future__ import annotations

import logging
import time
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from lavis_cprd import distributed
from lavis_cprd.towers import blip_image_embeds, blip_text_embeds


@torch.no_grad()
def dual_encoder_sim_matrix(model, data_loader, text_batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """ITC retrieval scores of a dual encoder: a student (``encode_captions`` and
    ``encode_image``), or any BLIP-shaped model (``visual_encoder`` + ``vision_proj``,
    ``text_encoder.forward_text`` + ``text_proj``, ``tokenizer``), e.g. a cross-encoder's own
    dual part. Image rows are placed by the dataset's ``index``, so any sampler order works.

    Under ``torch.distributed`` each rank encodes its own share of the captions and images
    (its ``DistributedSampler`` shard, or every W-th image), the features are gathered once,
    and every rank holds the full matrix (LAVIS reports metrics on rank 0).
    Returns ``(i2t [n_img, n_txt], t2i [n_txt, n_img])`` as numpy."""
    t0 = time.time()
    device = model.device
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if hasattr(model, "encode_captions"):
        encode_texts, encode_images = model.encode_captions, model.encode_image
    else:  # BLIP's dual part
        def encode_texts(captions, device):
            return F.normalize(blip_text_embeds(model, captions, device), dim=-1)

        def encode_images(image):
            return F.normalize(blip_image_embeds(model, image), dim=-1)
    texts = data_loader.dataset.text
    mine = range(rank * text_batch_size, len(texts), world * text_batch_size)  # round-robin text batches
    text_parts = {i: encode_texts(list(texts[i : i + text_batch_size]), device).float().cpu() for i in mine}
    text_parts = distributed.gather_objects(text_parts)
    text_feats = torch.cat([text_parts[i] for i in sorted(text_parts)]).to(device)

    image_rows, image_parts = [], []
    for samples in _own_share(data_loader, rank, world):
        # On CUDA LAVIS's PrefetchLoader moves ``index`` to the GPU too; the rows index a CPU tensor.
        image_rows.append(torch.as_tensor(samples["index"]).long().cpu())
        image_parts.append(encode_images(samples["image"].to(device)).float().cpu())
    rows = distributed.gather_objects({rank: (torch.cat(image_rows) if image_rows else torch.zeros(0, dtype=torch.long),
                                       torch.cat(image_parts) if image_parts else torch.zeros(0, text_feats.shape[1]))})
    image_feats = torch.zeros(len(data_loader.dataset), text_feats.shape[1])
    seen = torch.zeros(len(data_loader.dataset), dtype=torch.bool)
    for index, feats in rows.values():
        image_feats[index] = feats
        seen[index] = True
    image_feats = image_feats.to(device)
    if not bool(seen.all()):
        raise RuntimeError(f"compute_sim_matrix saw {int(seen.sum())} of {len(seen)} images: the loader must cover the split")
    sims = (image_feats @ text_feats.t().to(image_feats.dtype)).float().cpu()
    logging.info("Encoded %d images and %d texts in %.1fs", len(seen), len(texts), time.time() - t0)
    return sims.numpy(), sims.t().contiguous().numpy()


def _own_share(data_loader, rank: int, world: int):
    """This rank's part of an evaluation loader: its ``DistributedSampler`` shard as is, or
    every ``world``-th image of a plain loader (LAVIS's default ``use_dist_eval_sampler: False``)."""
    if world == 1 or isinstance(getattr(data_loader, "sampler", None), torch.utils.data.DistributedSampler):
        return data_loader
    subset = torch.utils.data.Subset(data_loader.dataset, list(range(rank, len(data_loader.dataset), world)))
    return torch.utils.data.DataLoader(
        subset, batch_size=data_loader.batch_size or 1, num_workers=data_loader.num_workers,
        collate_fn=data_loader.collate_fn, pin_memory=data_loader.pin_memory,
    )

