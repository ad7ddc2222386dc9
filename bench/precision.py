"""Is bf16 fast on this machine? What ``precision: auto`` picks here, and the times behind it.

    python bench/precision.py                      # this CPU
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/precision.py   # as a CPU without bf16 units
    python bench/precision.py --device cuda

Prints the CPU's capability and bf16 units, ``auto``'s choice with its reason, then two timings
in fp32 and bf16 (medians, one thread on a CPU), each with its bf16/fp32 ratio measured in
this run: one 256x512 @ 512x512 matmul (the issue-29 probe), and the embedded default's
teacher (the packaged one) scoring the 32 x 32 pairs of one kl step. ``auto`` is right when
it picks bf16 only where the ratio is below 1.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of the teacher (20 of the matmul); emulated "
                   "bf16 takes about a minute a call")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)

    import lavis_cprd  # noqa: F401
    from omegaconf import OmegaConf

    from bench.common import TOKENIZER, make_batch
    from lavis_cprd.apps.runs import PACKAGED_TEACHER
    from lavis_cprd.precision import native_bf16, resolve
    from lavis_cprd.teachers import build_teacher

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, device {device}")
    _, why = native_bf16(device)
    print(f"precision: auto -> {resolve('auto', device, 'auto')} ({why})", flush=True)

    a, b = torch.randn(256, 512, device=device), torch.randn(512, 512, device=device)
    cfg = OmegaConf.load("configs/cprd_tiny_shapes.yaml").model.distill.teacher
    cfg.checkpoint = PACKAGED_TEACHER  # its tower sizes (the config alone would build BLIP-base)
    teacher = build_teacher(cfg, tokenizer_path=TOKENIZER).to(device)
    batch = make_batch(32, 48, device)
    pairs = torch.cartesian_prod(torch.arange(32), torch.arange(32)).to(device)
    rows = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = a.to(dtype), b.to(dtype)
        teacher.precision = precision
        rows[precision] = (median_ms(lambda: x @ y, 20, device),
                           median_ms(lambda: teacher.logit(batch["image"], batch["text_input"], pairs), args.repeats, device))
    print(f"{'':28s}{'fp32 ms':>10s}{'bf16 ms':>10s}{'bf16/fp32':>11s}")
    for i, what in enumerate(("matmul 256x512 @ 512x512", "teacher, 32 x 32 pairs")):
        fp32, bf16 = rows["fp32"][i], rows["bf16"][i]
        print(f"{what:28s}{fp32:10.2f}{bf16:10.2f}{bf16 / fp32:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
