"""``precision: auto`` (teacher) and ``run.amp_dtype: auto`` (student): bf16 only where the
device runs it natively, with the hardware's capability faked both ways. And what runs where:
the supported Pythons, a missing package LAVIS imports (``environment``)."""
import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TOKENIZER, tiny_model_cfg
from lavis_cprd import precision
from lavis_cprd.teachers import build_teacher
from lavis_cprd.training.runner import CprdRunner
from lavis_cprd.training.task import CprdRetrievalTask, amp_mode


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(precision, "_logged", set())
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)


def fake_cpu(monkeypatch, **units):
    """This CPU's capabilities as torch reports them, with the given bf16 units."""
    caps = {"avx2": True, "avx512_bf16": False, "amx_bf16": False, **units}
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: dict(caps))
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")


def fake_gpu(monkeypatch, native: bool):
    def is_bf16_supported(including_emulation=True):
        return native or including_emulation  # pre-Ampere GPUs emulate bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "H100" if native else "V100")


@pytest.mark.parametrize("units, expected", [({}, "fp32"), ({"avx512_bf16": True}, "bf16"), ({"amx_bf16": True}, "bf16")])
def test_auto_on_a_cpu_picks_bf16_only_with_bf16_units(monkeypatch, caplog, units, expected):
    fake_cpu(monkeypatch, **units)
    with caplog.at_level(logging.INFO):
        assert precision.resolve("auto", "cpu", "model.distill.teacher.precision") == expected
        assert precision.resolve("auto", "cpu", "model.distill.teacher.precision") == expected  # logged once
    lines = [r.getMessage() for r in caplog.records if "auto ->" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"model.distill.teacher.precision: auto -> {expected} on cpu")
    assert ("has bf16 units" in lines[0]) == (expected == "bf16")
    assert ("no bf16 units" in lines[0]) == (expected == "fp32")


def test_a_onednn_isa_cap_without_bf16_hides_the_units(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    native, why = precision.native_bf16("cpu")
    assert not native and "ONEDNN_MAX_CPU_ISA=AVX2" in why
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert precision.native_bf16("cpu")[0]


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_wins(monkeypatch, explicit):
    fake_cpu(monkeypatch)
    assert precision.resolve(explicit, "cpu", "key") == explicit
    fake_gpu(monkeypatch, native=False)
    assert precision.resolve_amp(explicit, "cuda") == explicit


@pytest.mark.parametrize("native, teacher, student", [(True, "bf16", "bf16"), (False, "fp32", "fp16")])
def test_auto_on_a_gpu(monkeypatch, native, teacher, student):
    fake_gpu(monkeypatch, native)
    assert precision.resolve("auto", "cuda", "key") == teacher
    assert precision.resolve_amp("auto", "cuda") == student  # a V100 keeps LAVIS's fp16 + scaler


@pytest.mark.parametrize("units, mode", [({}, None), ({"avx512_bf16": True}, "bf16")])
def test_student_amp_auto_on_a_cpu_and_its_scaler(monkeypatch, units, mode):
    fake_cpu(monkeypatch, **units)
    run_cfg = OmegaConf.create({"amp": True, "amp_dtype": "auto", "device": "cpu"})
    assert amp_mode(run_cfg) == mode
    assert CprdRetrievalTask(run_cfg).autocast_dtype == (torch.bfloat16 if mode else None)
    runner = SimpleNamespace(config=SimpleNamespace(run_cfg=run_cfg))
    assert CprdRunner.scaler.fget(runner) is None  # neither float32 nor bf16 scales the loss
    assert amp_mode(OmegaConf.create({"amp": False, "amp_dtype": "auto", "device": "cpu"})) is None


@pytest.fixture(scope="module")
def auto_teacher():
    torch.manual_seed(0)
    cfg = tiny_model_cfg().distill.teacher
    cfg.precision = "auto"
    return build_teacher(cfg, tokenizer_path=TOKENIZER)


@pytest.mark.parametrize("units, dtype", [({}, torch.float32), ({"avx512_bf16": True}, torch.bfloat16)])
def test_an_auto_teacher_scores_in_the_precision_auto_picks(monkeypatch, auto_teacher, batch, units, dtype):
    fake_cpu(monkeypatch, **units)
    seen = []
    handle = auto_teacher.model.itm_head.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    pairs = torch.cartesian_prod(torch.arange(4), torch.arange(4))
    try:
        got = auto_teacher.logit(batch["image"], batch["text_input"], pairs)
        auto_teacher.precision = "bf16" if dtype == torch.bfloat16 else "fp32"
        explicit = auto_teacher.logit(batch["image"], batch["text_input"], pairs)
    finally:
        auto_teacher.precision = "auto"
        handle.remove()
    assert seen[0] == dtype and got.dtype == torch.float32
    torch.testing.assert_close(got, explicit, rtol=0, atol=0)  # auto is exactly the precision it picked


def test_unsupported_pythons_and_missing_packages_name_the_fix(monkeypatch):
    from lavis_cprd import environment

    assert environment.python_problem((3, 12)) == "" and environment.python_problem((3, 13, 0)) == ""
    assert "supports Python 3.11, 3.12, 3.13; this is 3.10" in environment.python_problem((3, 10))
    assert "PYTHON=python3.12 bash run_scripts/install.sh" in environment.python_problem((3, 14))

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name="cv2")

    monkeypatch.setattr(environment.importlib, "import_module", missing)
    with pytest.raises(ImportError, match=r"the package 'opencv-python-headless' is not installed\. Run bash run_scripts/install.sh"):
        environment.import_lavis()


def test_importing_lavis_prints_none_of_its_own_warnings_and_lets_others_through():
    """Before: every command printed eight FutureWarnings from LAVIS's imports (timm's deprecated
    paths, transformers 4.36's pytree registration)."""
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('default')\n"
            "import lavis_cprd\n"
            "warnings.warn('Importing from timm.models.hub is deprecated, ours', FutureWarning)")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stderr
    assert "Importing from timm.models.hub is deprecated, please import" not in err and "_register_pytree_node" not in err
    assert "ours" in err  # the filter is scoped to LAVIS's import: later warnings print
