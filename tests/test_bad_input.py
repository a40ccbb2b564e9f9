"""Bad input: one clear line per problem, exit status 2, and no output folder left behind."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from upcycle.cli import main


def run_cli(capsys, *args):
    code = main(["build", "--quiet", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_refused(capsys, out, args, *phrases):
    code, err = run_cli(capsys, *args)
    assert code == 2
    assert len(err) >= 1 and all(line.startswith("upcycle: error: ") for line in err)
    text = "\n".join(err)
    for p in phrases:
        assert p in text, text
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    return text


def test_missing_base(capsys, tmp_path):
    out = tmp_path / "out"
    assert_refused(capsys, out, ["--base", tmp_path / "nope", "--out", out], "nope", "folder not found")


def test_pickle_only_base_is_refused_unless_allowed(capsys, llama_dir, tmp_path, token_ids):
    base = tmp_path / "pickled"
    shutil.copytree(llama_dir, base)
    state = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save(state, base / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_refused(capsys, out, ["--base", base, "--out", out], "pytorch_model.bin", "--allow-pickle")
    code, _ = run_cli(capsys, "--base", base, "--out", out, "--allow-pickle", "--num-experts", "2", "--top-k", "1")
    assert code == 0 and (out / "model.safetensors").is_file()


def test_int8_pickle_base_is_refused_naming_file_and_tensor(capsys, llama_dir, tmp_path):
    base = tmp_path / "pickled-int8"
    shutil.copytree(llama_dir, base)
    state = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = (state[name] * 100).to(torch.int8)
    torch.save(state, base / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_refused(capsys, out, ["--base", base, "--out", out, "--allow-pickle", "--num-experts", "2", "--top-k", "1"],
                   "pytorch_model.bin", name, "I8")


def test_unsupported_architecture(capsys, tmp_path):
    base = tmp_path / "gpt2"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (base / "model.safetensors").write_bytes(b"")
    out = tmp_path / "out"
    assert_refused(capsys, out, ["--base", base, "--out", out], "'gpt2' is not supported", "llama")


def test_top_k_larger_than_num_experts(capsys, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert_refused(capsys, out, ["--base", llama_dir, "--out", out, "--num-experts", "2", "--top-k", "3"],
                   "moe.top_k: 3 is larger than moe.num_experts=2")


def test_granularity_not_dividing_intermediate_size(capsys, llama_dir, tmp_path):
    out = tmp_path / "out"  # the tiny model has intermediate_size 64
    assert_refused(capsys, out, ["--base", llama_dir, "--out", out, "--num-experts", "6", "--top-k", "3",
                                 "--granularity", "3", "--init", "virtual_group"],
                   "moe.granularity: 3 does not divide", "intermediate_size=64")


def test_num_experts_not_multiple_of_granularity(capsys, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert_refused(capsys, out, ["--base", llama_dir, "--out", out, "--num-experts", "6", "--top-k", "4",
                                 "--granularity", "4", "--init", "virtual_group"],
                   "moe.num_experts: 6 is not a multiple of moe.granularity=4")


def test_format_that_cannot_express_the_routing(capsys, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert_refused(capsys, out, ["--base", llama_dir, "--out", out, "--router", "softmax_topk", "--format", "mixtral"],
                   "mixtral cannot express routing softmax_topk")


def test_qwen3_moe_refuses_a_llama_base(capsys, llama_dir, tmp_path):
    out = tmp_path / "out"
    assert_refused(capsys, out, ["--base", llama_dir, "--out", out, "--format", "qwen3_moe"],
                   "qwen3_moe takes dense models of type qwen3, not llama")


def test_non_empty_output_needs_force(capsys, llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli(capsys, "--base", llama_dir, "--out", out, "--num-experts", "2", "--top-k", "1")
    assert code == 2 and "not empty" in err[0] and "--force" in err[0]
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only what upcycle made: a folder of the user's needs --force-foreign as well.
    code, err = run_cli(capsys, "--base", llama_dir, "--out", out, "--num-experts", "2", "--top-k", "1", "--force")
    assert code == 2 and len(err) == 1 and "not a folder upcycle made" in err[0] and "--force-foreign" in err[0]
    assert (out / "keep.txt").read_text() == "precious"
    code, _ = run_cli(capsys, "--base", llama_dir, "--out", out, "--num-experts", "2", "--top-k", "1", "--force",
                      "--force-foreign")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()
    # An upcycle output is replaced by --force alone.
    code, _ = run_cli(capsys, "--base", llama_dir, "--out", out, "--num-experts", "4", "--top-k", "1", "--force")
    assert code == 0 and json.loads((out / "config.json").read_text())["num_local_experts"] == 4


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_truncated_or_corrupted_safetensors(capsys, llama_dir, tmp_path, damage):
    base = tmp_path / "broken"
    shutil.copytree(llama_dir, base)
    path = base / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
        phrase = "truncated"
    else:
        path.write_bytes(data[:8] + b"{not json" + data[17:])
        phrase = "corrupted"
    out = tmp_path / "out"
    assert_refused(capsys, out, ["--base", base, "--out", out], "model.safetensors", phrase)


def test_failure_while_writing_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    """An error in the middle of streaming removes the temporary folder; the final name never appears."""
    from upcycle.config import BuildConfig
    from upcycle.stages import build

    calls = {"n": 0}
    original = build.StreamingProvider.__call__

    def failing(self, part):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("disk full")
        return original(self, part)

    monkeypatch.setattr(build.StreamingProvider, "__call__", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        build.run(BuildConfig(base=llama_dir, out=out), progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_exit_status_in_a_real_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "upcycle.cli", "build", "--base", str(tmp_path / "none"), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("upcycle: error:")
    assert "Traceback" not in proc.stderr
