"""``auto`` precision: bfloat16 only where the hardware runs it natively, float32 elsewhere.

bfloat16 is fast only on hardware with bf16 units. Elsewhere it is emulated. On an AVX2 CPU
(issue 29), one 256x512 @ 512x512 matmul took 170 ms in bf16 and 5.2 ms in fp32. So ``auto``
picks bf16 only on a CUDA GPU with native bf16, or on a CPU whose oneDNN can use bf16
instructions (x86 ``avx512_bf16`` or ``amx_bf16``; arm's bf16 extension). It picks float32
otherwise. ``auto`` is the default of the teacher's ``model.distill.teacher.precision`` in the
experiment configs, and of the student's ``run.amp_dtype`` there. An explicit ``fp32``,
``bf16`` or ``fp16`` always wins. Each choice is logged once, with its reason.
"""
from __future__ import annotations

import logging
import os
import platform
from typing import Optional, Set, Tuple, Union

import torch

AUTO = "auto"
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which oneDNN has no bf16 instructions: a CPU
# capped there computes bf16 as slowly as one without bf16 units.
ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"})
_logged: Set[str] = set()


def onednn_isa_cap() -> str:
    """``ONEDNN_MAX_CPU_ISA`` (or its older name), ``""`` when unset."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip()


def cpu_bf16_units() -> str:
    """The CPU's bf16 units as oneDNN would use them (e.g. ``"avx512_bf16"``), ``""`` if none."""
    if onednn_isa_cap().upper() in ISAS_WITHOUT_BF16:
        return ""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    found = [unit for unit in ("avx512_bf16", "amx_bf16") if caps.get(unit)]
    if not found and platform.machine().lower() in ("aarch64", "arm64"):
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # cpuinfo's arm bf16 extension
            found.append("arm bf16")
    return ", ".join(found)


def native_bf16(device: Union[str, torch.device]) -> Tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, and why (for the log)."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch < 2.3 has no including_emulation
            native = torch.cuda.is_bf16_supported()
        return native, f"{name} {'has' if native else 'has no'} native bf16"
    if device.type == "cpu":
        units = cpu_bf16_units()
        if units:
            return True, f"this CPU has bf16 units ({units})"
        capped = onednn_isa_cap()
        where = f"ONEDNN_MAX_CPU_ISA={capped}" if capped else f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
        return False, f"this CPU has no bf16 units ({where}): bf16 would be emulated, far slower than fp32"
    return False, f"bf16 speed on {device.type} is unknown"


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logging.info(message)


def resolve(precision: str, device: Union[str, torch.device], key: str) -> str:
    """``precision`` as given, or for ``auto`` the one for ``device``: ``bf16`` where it is
    native, ``fp32`` otherwise. ``key`` names the config key in the log."""
    if precision != AUTO:
        return precision
    native, why = native_bf16(device)
    chosen = "bf16" if native else "fp32"
    _log_once(f"{key}: auto -> {chosen} on {torch.device(device)} ({why})")
    return chosen


def resolve_amp(dtype: str, device: Union[str, torch.device], key: str = "run.amp_dtype") -> Optional[str]:
    """The student's mixed precision under ``run.amp: true``: ``bf16``, ``fp16`` or ``None``
    (float32). ``auto`` is bf16 where it is native, else CUDA's fp16 (with LAVIS's gradient
    scaler), else float32: a CPU has no fast half precision."""
    if dtype != AUTO:
        return dtype
    device = torch.device(device)
    native, why = native_bf16(device)
    chosen = "bf16" if native else ("fp16" if device.type == "cuda" else None)
    _log_once(f"{key}: auto -> {chosen or 'fp32 (no autocast)'} on {device} ({why})")
    return chosen
