"""Without a working sandbox, every command that would score model-written code refuses before it
trains or loads anything, and runs only when the user opts in (flag or environment variable)."""

from pathlib import Path

import pytest

from upcycle.cli import main
from upcycle.eval import sandbox

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
NO_SANDBOX = "no bwrap found; install bubblewrap"


@pytest.fixture
def no_sandbox(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation", lambda: NO_SANDBOX)
    monkeypatch.delenv(sandbox.ALLOW_UNSAFE_ENV, raising=False)


def test_run_refuses_before_any_stage_and_writes_nothing(no_sandbox, tmp_path, llama_dir, capsys):
    out = tmp_path / "run"
    rc = main(["run", str(RECIPES / "upit_lora.yaml"), f"base={llama_dir}", f"out={out}", "--quiet"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "needs OS isolation" in err and sandbox.ALLOW_UNSAFE_ENV in err and "no bwrap found" in err
    assert not out.exists()


def test_validate_reports_the_missing_sandbox(no_sandbox, llama_dir, capsys):
    assert main(["validate", str(RECIPES / "upit_lora.yaml"), f"base={llama_dir}"]) != 0
    assert "needs OS isolation" in capsys.readouterr().err
    assert main(["validate", str(RECIPES / "upit_lora.yaml"), f"base={llama_dir}", "evaluate=false"]) == 0


def test_eval_refuses_before_loading_the_model(no_sandbox, tmp_path, capsys):
    missing = tmp_path / "no-such-model"  # would fail with 'no config.json' if it were loaded first
    assert main(["eval", str(missing), "--quiet"]) != 0
    assert "needs OS isolation" in capsys.readouterr().err


def test_the_flag_opts_in(no_sandbox, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
        rc = main(["eval", str(missing), "--quiet", "--allow-unsafe-code-eval"])
    assert rc != 0 and "folder not found" in capsys.readouterr().err  # got past the refusal to the model
    # (the fixture's monkeypatch restores the environment the CLI set for its process)


def test_a_refused_program_is_never_started(no_sandbox, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(Exception, match="needs OS isolation"):
        sandbox.run_program(f"open({str(marker)!r}, 'w').write('x')", ["pass"])
    assert not marker.exists()
