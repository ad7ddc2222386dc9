"""`lavis-cprd list` and `--help`: what is registered, read from the registries themselves."""
import pytest

from lavis_cprd.apps import cli
from lavis_cprd.distill.registry import get_loss, list_losses
from lavis_cprd.teachers import available_teachers


def test_list_prints_every_registered_entry_with_its_description(capsys):
    cli.list_main([])
    out = capsys.readouterr().out
    sections = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            current = sections.setdefault(line.rstrip(":"), {})
        else:
            name, _, description = line.strip().partition(" ")
            current[name] = description.strip()
    losses = sections["losses (model.distill.loss)"]
    assert list(losses) == list_losses() == ["none", "cprd", "margin_mse", "loopitr", "kl", "listmle_full", "conaclip"]
    assert all(losses[n] == get_loss(n).description for n in losses)
    assert sorted(sections["teachers (model.distill.teacher.arch)"]) == available_teachers()
    assert sections["teachers (model.distill.teacher.arch)"]["shapes_oracle"].startswith("[cross]")
    assert {"cprd_dual_encoder", "cprd_clip_dual_encoder", "cprd_blip_retrieval"} == set(sections["students and models (model.arch)"])
    assert set(sections["datasets"]) == {"cprd_shapes"} and set(sections["tasks (run.task)"]) == {"cprd_retrieval"}


def test_help_lists_the_commands_with_descriptions_without_importing_lavis():
    """``lavis-cprd --help`` (``lavis_cprd_cli``) imports neither LAVIS nor the package: it
    answers at once, where importing LAVIS takes seconds."""
    import subprocess
    import sys

    code = ("import sys, lavis_cprd_cli\n"
            "try:\n    lavis_cprd_cli.main(['--help'])\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print('imported:', sorted(m for m in ('lavis', 'lavis_cprd', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "exit 0" in out and "imported: []" in out, out
    for name, (_, description) in cli.COMMANDS.items():
        assert f"  {name}" in out and description in out


def test_unknown_command_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0 and "commands:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["trian"])
    assert done.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_demo_help_is_demos_own(capsys):
    """Before: ``lavis-cprd demo --help`` printed ``usage: lavis-cprd compare``."""
    with pytest.raises(SystemExit) as done:
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out.startswith("usage: lavis-cprd demo") and "default: output/demo" in out


def test_a_bad_config_prints_its_problems_alone_with_status_2(capsys, monkeypatch):
    """Before: a full traceback came first, its good message last."""
    import os

    from conftest import REPO
    from lavis_cprd.errors import ConfigError

    cfg = os.path.join(REPO, "configs", "cprd_tiny_shapes.yaml")
    monkeypatch.delenv("LAVIS_CPRD_DEBUG", raising=False)
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--cfg-path", cfg, "--options", "run.max_epochs=3"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert err.startswith("lavis-cprd train: ") and "unknown key run.max_epochs (did you mean 'max_epoch'" in err
    monkeypatch.setenv("LAVIS_CPRD_DEBUG", "1")
    with pytest.raises(ConfigError, match="run.max_epochs"):  # the debug switch lets it through
        cli.main(["train", "--cfg-path", cfg, "--options", "run.max_epochs=3"])


def test_rerank_with_a_dual_encoder_teacher_is_a_clear_error():
    """Before: ``search --rerank`` on a ConaCLIP student died in ``model.teacher.score``."""
    from conftest import tiny_model_cfg
    from lavis_cprd.apps.serving import rerank_problem
    from lavis_cprd.models.dual_encoder import CprdDualEncoder

    conaclip = CprdDualEncoder.from_config(tiny_model_cfg(loss="conaclip", teacher={"checkpoint": ""}))
    assert "model.distill.loss='conaclip'" in rerank_problem(conaclip) and "search without --rerank" in rerank_problem(conaclip)
    assert rerank_problem(CprdDualEncoder.from_config(tiny_model_cfg(loss="cprd"))) is None
