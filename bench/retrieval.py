"""Retrieval cost: our student's ``compute_sim_matrix`` (one matrix product over dual-encoder
embeddings) vs LAVIS ``blip_retrieval``'s two-stage ``compute_sim_matrix`` (ITC, then ITM
re-rank of the top ``k_test`` for every query) on the same gallery and the same widths.

    python bench/retrieval.py                                  # CPU: 200 images / 1,000 captions
    python bench/retrieval.py --images 1000 --k-test 128       # the 1K / 5K gallery
    python bench/retrieval.py --json out.json
    python bench/retrieval.py --size base --device cuda --images 100   # BLIP-base widths, one GPU

Random weights and random pixels (timing does not depend on them); both models have the
towers of the embedded default's teacher (ViT and BERT 4 layers, 128 wide, 48 px), or with
``--size base`` BLIP-base's (ViT-B/16 at 384 px, BERT-base, 256-d embeddings). Peak memory is
the process's resident-set high-water mark during the call, above what it held before (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``); on a GPU, ``max_memory_allocated`` above
what was allocated before. Prints a Markdown table.
Recall of the trained models on the unique-caption embedded default is in the demo table of
``docs/unique_captions.md`` (student 59.1 r_mean vs the two-stage teacher 66.0).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omegaconf import OmegaConf  # noqa: E402

import lavis_cprd  # noqa: E402,F401
from bench.common import TOKENIZER, measure_on, random_captions, release, tower_sizes, write_json  # noqa: E402
from lavis_cprd.models.blip_retrieval import CprdBlipRetrieval  # noqa: E402
from lavis_cprd.models.dual_encoder import CprdDualEncoder  # noqa: E402

BASE_SIZES = {"vit_type": "base", "image_size": 384, "text_width": None, "text_depth": None, "text_heads": None,
              "embed_dim": 256, "max_txt_len": 35}  # text None: LAVIS's med_config (BERT-base)


def configs(size: str):
    """The student (ITC dual encoder) and LAVIS's two-stage ``blip_retrieval`` at ``size``."""
    student_cfg = OmegaConf.load(CprdDualEncoder.default_config_path("tiny")).model
    lavis_cfg = OmegaConf.load(CprdBlipRetrieval.default_config_path("tiny")).model
    sizes = tower_sizes() if size == "tiny" else dict(BASE_SIZES, tokenizer_path=TOKENIZER)
    student_cfg = OmegaConf.merge(student_cfg, sizes)
    student_cfg.distill.loss = "none"
    if size == "base":
        lavis_cfg = OmegaConf.merge(lavis_cfg, sizes)
    return student_cfg, lavis_cfg, sizes


class Gallery(torch.utils.data.Dataset):
    def __init__(self, n_images: int, captions_per_image: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n_images, 3, size, size, generator=g)
        self.image = [f"image_{i}" for i in range(n_images)]  # LAVIS reads len(dataset.image)
        n_text = n_images * captions_per_image
        self.text = random_captions(n_text, g)
        self.img2txt = {i: list(range(i * captions_per_image, (i + 1) * captions_per_image)) for i in range(n_images)}
        self.txt2img = {t: i for i, ts in self.img2txt.items() for t in ts}

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "index": i}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--k-test", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--size", choices=["tiny", "base"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    student_cfg, lavis_cfg, sizes = configs(args.size)
    student = CprdDualEncoder.from_config(student_cfg).eval().to(device)
    blip = CprdBlipRetrieval.from_config(lavis_cfg).eval().to(device)
    release(device)

    gallery = Gallery(args.images, args.captions_per_image, int(sizes["image_size"]))
    loader = torch.utils.data.DataLoader(gallery, batch_size=args.batch_size)
    task_cfg = OmegaConf.create({"k_test": min(args.k_test, len(gallery)), "text_batch_size": 256})
    with torch.no_grad():
        (s_i2t, _), t_student, m_student = measure_on(lambda: student.compute_sim_matrix(loader, task_cfg), device)
        (b_i2t, _), t_blip, m_blip = measure_on(lambda: blip.compute_sim_matrix(loader, task_cfg), device)
    rows = [
        ("lavis-cprd student (dual encoder)", t_student, m_student),
        (f"LAVIS blip_retrieval two-stage (k_test={task_cfg.k_test})", t_blip, m_blip),
    ]
    towers = "BLIP-base (ViT-B/16, BERT-base)" if args.size == "base" else f"{sizes['vit_depth']}x{sizes['vit_width']}"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"Retrieval over {len(gallery)} images / {len(gallery.text)} captions, towers ViT/BERT "
          f"{towers}, {sizes['image_size']} px, {where}")
    print("| method | wall s | peak MB above start | time x student |")
    print("|---|---|---|---|")
    for name, t, m in rows:
        print(f"| {name} | {t:.2f} | {m / 2**20:.0f} | {t / t_student:.1f} |")
    result = {
        "images": len(gallery), "captions": len(gallery.text), "k_test": task_cfg.k_test, "size": args.size,
        "device": where,
        "threads": torch.get_num_threads(), "sizes": {k: (v if isinstance(v, (int, str)) else str(v)) for k, v in sizes.items()},
        "student_s": t_student, "lavis_two_stage_s": t_blip, "speedup": t_blip / t_student,
        "student_peak_bytes": m_student, "lavis_peak_bytes": m_blip,
        "score_shapes": [list(s_i2t.shape), list(b_i2t.shape)],
    }
    print(f"speed-up of the student: {result['speedup']:.0f}x (goal: >= 100x at k_test=128)")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
