"""Every file a user hands the tool is checked, and a bad one is one line: non-finite weights caught
as they stream (at a tensor no fingerprint samples), the same expert given twice, a YAML alias bomb
under a time limit, `extends` of the wrong type, broken adapter and model configs, binary data, a
read-only out folder, data files that `validate` must open. Each case exits 2 with one line naming
the file (and key or tensor) and leaves no output behind."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.test_mix import adapter, fine_tune
from upcycle.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
UNSAMPLED = "model.layers.1.mlp.down_proj.weight"  # not among the 4 tensors mix's drift fingerprint reads


def one_error(capsys, argv: list) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("upcycle: error: "), err
    return err[0]


def poke(folder: Path, name: str, value: float, everywhere: bool = False, file: str = "model.safetensors") -> Path:
    """Rewrite one tensor of a safetensors file with a non-finite value (one element, or all)."""
    tensors = load_file(folder / file)
    t = tensors[name].clone()
    if everywhere:
        t.fill_(value)
    else:
        t.view(-1)[t.numel() // 2] = value
    tensors[name] = t
    save_file(tensors, folder / file, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def experts(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    return {"root": root, "a": fine_tune(llama_dir, root / "ft_a", 1), "b": fine_tune(llama_dir, root / "ft_b", 2),
            "ad": adapter(llama_dir, root / "ad", 0), "ad2": adapter(llama_dir, root / "ad2", 1)}


def test_the_unsampled_tensor_is_outside_the_drift_fingerprint(llama_dir, experts):
    from upcycle.io.model_folder import ModelFolder
    from upcycle.experts import open_expert
    from upcycle.stages.mix import _check_ffn

    check = _check_ffn(ModelFolder(llama_dir), open_expert(experts["a"]), 0, True, 1.0)
    assert check["drift"] and UNSAMPLED not in check["drift"]


@pytest.mark.parametrize("value, everywhere", [(float("nan"), False), (float("inf"), False), (float("nan"), True)],
                         ids=["one-nan", "one-inf", "all-nan"])
def test_mix_refuses_a_non_finite_expert_naming_file_and_tensor(llama_dir, experts, tmp_path, capsys, value, everywhere):
    bad = poke(Path(shutil.copytree(experts["b"], tmp_path / "bad")), UNSAMPLED, value, everywhere)
    out = tmp_path / "out"
    line = one_error(capsys, ["mix", "--base", llama_dir, "--expert", experts["a"], "--expert", bad, "--out", out,
                              "--router-init", "random", "--format", "mixtral", "--quiet"])
    assert str(bad / "model.safetensors") in line and UNSAMPLED in line and "NaN/inf" in line
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_build_merge_and_expand_refuse_non_finite_weights(llama_dir, tmp_path, capsys):
    base = poke(Path(shutil.copytree(llama_dir, tmp_path / "base")), "model.layers.0.mlp.up_proj.weight", float("inf"))
    line = one_error(capsys, ["build", "--base", base, "--out", tmp_path / "b", "--num-experts", "2", "--top-k", "1",
                              "--quiet"])
    assert "model.layers.0.mlp.up_proj.weight" in line and "NaN/inf" in line and not (tmp_path / "b").exists()
    merge = tmp_path / "merge.yaml"
    merge.write_text(f"method: linear\nmodels: [{{path: {llama_dir}}}, {{path: {base}}}]\nout: {tmp_path / 'm'}\n")
    line = one_error(capsys, ["merge", merge, "--quiet"])
    assert str(base) in line and "up_proj" in line and not (tmp_path / "m").exists()
    # expand reads stage-1 checkpoints: a LoRA checkpoint with a NaN factor is refused by name
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": "ab" * (i % 3 + 1)}) for i in range(16)))
    prep = tmp_path / "prep"
    assert main(["prepare", "--base", str(llama_dir), "--data", str(data), "--out", str(prep), "--quiet", "evaluate=false",
                 "train.epochs=1", "save_every=0.5", "train.batch_size=4", "data.eval_fraction=0"]) == 0
    capsys.readouterr()
    last = prep / json.loads((prep / "manifest.json").read_text())["checkpoints"][-1]["path"]
    name = next(n for n in load_file(last / "adapter_model.safetensors") if "lora_B" in n)
    poke(last, name, float("nan"), file="adapter_model.safetensors")
    line = one_error(capsys, ["expand", "--prepare", prep, "--out", tmp_path / "e", "--num-experts", "3", "--quiet",
                              "checkpoints=all"])
    assert name in line and "NaN/inf" in line and not (tmp_path / "e").exists()


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_the_same_expert_twice_is_refused_unless_allowed(llama_dir, experts, tmp_path, capsys, kind):
    first = experts["a" if kind == "ffn" else "ad"]
    copy = shutil.copytree(first, tmp_path / "copy")  # the same weights under another name
    for second in (first, copy):
        line = one_error(capsys, ["mix", "--base", llama_dir, "--expert", first, "--expert", second, "--out",
                                  tmp_path / "out", "--router-init", "random", "--quiet"])
        assert "experts[1]" in line and "the same expert as experts[0]" in line and "--allow-duplicate-experts" in line
    assert not (tmp_path / "out").exists()
    other = experts["b" if kind == "ffn" else "ad2"]  # different experts pass
    assert main(["mix", "--base", str(llama_dir), "--expert", str(first), "--expert", str(other), "--out",
                 str(tmp_path / "ok"), "--router-init", "random", "--quiet"]) == 0
    with pytest.warns(UserWarning, match="the same expert"):
        assert main(["mix", "--base", str(llama_dir), "--expert", str(first), "--expert", str(copy), "--out",
                     str(tmp_path / "dup"), "--router-init", "random", "--quiet", "--allow-duplicate-experts"]) == 0


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_yaml_alias_bomb_is_refused_in_well_under_a_second(tmp_path, capsys, command):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB + "recipe: x\nout: runs/x\n")  # 10^9 leaves once expanded
    started = time.perf_counter()
    line = one_error(capsys, [command, path])
    assert time.perf_counter() - started < 1.0
    assert str(path) in line and "alias" in line


def test_recursive_and_oversized_yaml_are_refused(tmp_path, capsys):
    loop = tmp_path / "loop.yaml"
    loop.write_text("stages: &s [prepare, *s]\n")
    assert "refers to the node that contains it" in one_error(capsys, ["validate", loop])
    big = tmp_path / "big.yaml"
    big.write_text("description: " + "x" * (2 << 20) + "\n")
    assert "bytes, over the" in one_error(capsys, ["validate", big])


def test_extends_takes_a_list_in_order_and_refuses_other_types(tmp_path, capsys):
    from upcycle.config_io import read_yaml

    (tmp_path / "a.yaml").write_text("seed: 1\nout: from-a\ndata: {max_length: 64}\n")
    (tmp_path / "b.yaml").write_text("seed: 2\ndata: {eval_fraction: 0.2}\n")
    (tmp_path / "c.yaml").write_text("extends: [a.yaml, b.yaml]\nout: from-c\n")
    assert read_yaml(tmp_path / "c.yaml") == {"seed": 2, "out": "from-c", "data": {"max_length": 64, "eval_fraction": 0.2}}
    for value in ("3", "{x: a.yaml}", "[a.yaml, 3]", "[]"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"extends: {value}\nout: x\n")
        line = one_error(capsys, ["validate", bad])
        assert str(bad) in line and "extends" in line


@pytest.mark.parametrize("config", ['{"r": 0, "lora_alpha": 8}', '{"r": "abc", "lora_alpha": 8}', '{"lora_alpha": 8}',
                                    '{"r": 4, "lora_alpha": -1}', "not json {", "\x00\x01binary"],
                         ids=["r0", "r-abc", "no-r", "negative-alpha", "not-json", "binary"])
def test_a_broken_adapter_config_is_one_line_naming_it(llama_dir, experts, tmp_path, capsys, config):
    bad = Path(shutil.copytree(experts["ad"], tmp_path / "bad"))
    (bad / "adapter_config.json").write_bytes(config.encode("latin-1"))
    line = one_error(capsys, ["mix", "--base", llama_dir, "--expert", bad, "--expert", experts["ad2"], "--out",
                              tmp_path / "out", "--router-init", "random", "--quiet"])
    assert str(bad / "adapter_config.json") in line
    assert not (tmp_path / "out").exists()


def test_an_expert_config_that_is_not_json_is_one_line(llama_dir, experts, tmp_path, capsys):
    bad = Path(shutil.copytree(experts["b"], tmp_path / "bad"))
    (bad / "config.json").write_text("{model_type: llama")
    line = one_error(capsys, ["mix", "--base", llama_dir, "--expert", experts["a"], "--expert", bad, "--out",
                              tmp_path / "out", "--router-init", "random", "--quiet"])
    assert str(bad / "config.json") in line and "not a valid JSON" in line


@pytest.mark.parametrize("data", ["missing", "empty", "binary"])
def test_a_failed_mix_leaves_no_out_folder(llama_dir, experts, tmp_path, capsys, data):
    path = tmp_path / "seed.jsonl"
    if data == "empty":
        path.write_text("")
    elif data == "binary":
        path.write_bytes(bytes(range(256)) * 64)
    line = one_error(capsys, ["mix", "--base", llama_dir, "--expert", experts["a"], "--expert", experts["b"], "--out",
                              tmp_path / "out", "--router-init", "ppl", "--data", path, "--quiet"])
    assert str(path) in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_mix_onto_a_read_only_file_system_is_one_line(llama_dir, experts, tmp_path, capsys):
    if os.geteuid() != 0:
        readonly = tmp_path / "ro"
        readonly.mkdir()
        readonly.chmod(0o555)
        reason = "permission denied"
    else:
        readonly = tmp_path / "ro"
        readonly.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]).returncode:
            pytest.skip("this container does not allow mounting a tmpfs")
        reason = "read-only file system"
    try:
        line = one_error(capsys, ["mix", "--base", llama_dir, "--expert", experts["a"], "--expert", experts["b"],
                                  "--out", readonly / "out", "--router-init", "random", "--quiet"])
        assert reason in line and str(readonly / "out") in line
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(readonly)])
        readonly.chmod(0o755)


def test_validate_opens_the_data_files_and_checks_sizes_against_them(tmp_path, capsys):
    recipe = RECIPES / "upit_lora.yaml"
    missing = tmp_path / "nope.jsonl"
    line = one_error(capsys, ["validate", recipe, f"data.train=[{missing}]"])
    assert str(missing) in line and "not found" in line
    line = one_error(capsys, ["validate", recipe, "route.seed_count=1000000000"])
    assert "route.seed_count" in line and "800 training samples" in line
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n" + json.dumps({"question": "no schema"}) + "\n")
    line = one_error(capsys, ["validate", recipe, f"data.train=[{rows}]", "route.seed_count=1"])
    assert f"{rows}:2" in line and "no 'instruction'" in line
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"instruction": f"q{i}", "output": "a"}) + "\n" for i in range(10)))
    line = one_error(capsys, ["validate", recipe, f"data.train=[{few}]", "route.min_seed_per_expert=0"])
    assert "route.seed_fraction" in line and "10 training samples" in line  # 5 % of 10 rows, no floor: none
    assert main(["validate", str(recipe), f"data.train=[{few}]", "route.seed_count=4"]) == 0


SLOW_BUILD = """
import sys, time
from upcycle.io import safetensors_io
write = safetensors_io.ShardedWriter.write
def slow(self, name, part):
    time.sleep(0.2)
    return write(self, name, part)
safetensors_io.ShardedWriter.write = slow
from upcycle.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_killed_write_leaves_no_temporary_once_rerun(llama_dir, tmp_path, signal_name):
    import signal

    out = tmp_path / "out"
    argv = ["build", "--base", str(llama_dir), "--out", str(out), "--num-experts", "2", "--top-k", "1", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, *argv], stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline:
        time.sleep(0.02)
    assert list(tmp_path.glob(".out.tmp-*")), "the build never started writing"
    proc.send_signal(getattr(signal, signal_name))
    proc.wait(timeout=60)
    if signal_name == "SIGTERM":  # unwinds: the temporary is removed on the way out
        assert proc.returncode == 143 and b"terminated" in proc.stderr.read()
        assert not list(tmp_path.glob(".out.*"))
    else:  # nothing runs after SIGKILL: the next writer of the same folder removes what it left
        assert list(tmp_path.glob(".out.tmp-*"))
        assert main(argv) == 0
        assert not list(tmp_path.glob(".out.*")) and (out / "config.json").is_file()


def test_a_stage_rerun_removes_the_temporaries_a_killed_run_left_in_its_folder(tmp_path):
    from upcycle.manifest import Manifest

    folder = tmp_path / "exp"
    initial = {"base": "/b", "kind": "lora", "num_experts": 0, "experts": []}
    Manifest.open(folder, "expand", "h1", initial=initial)
    dead = 2 ** 22 + 4321  # above the default pid_max: no such process
    stale = [folder / f".manifest.json.tmp-{dead}-abcd1234", folder / f".routers.safetensors.tmp-{dead}-00ff00ff"]
    for p in stale:
        p.write_text("half")
    (folder / "experts").mkdir()
    stale.append(folder / "experts" / f".child-03.tmp-{dead}-12345678")
    stale[-1].mkdir()
    live = folder / f".manifest.json.tmp-{os.getpid()}-abcd1234"
    live.write_text("being written")
    Manifest.open(folder, "expand", "h1", initial=initial)
    assert not any(p.exists() for p in stale) and live.exists()


def test_a_failed_stage_removes_only_the_folder_it_created_and_holding_no_finished_work(llama_dir, tmp_path, capsys,
                                                                                        monkeypatch):
    """An error after the stage opened its folder: a folder this command created, with nothing finished
    in it, goes; one that existed before, or that lists a checkpoint, stays."""
    from transformers import Trainer

    from upcycle.errors import UpcycleError

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": "ab"}) for i in range(16)))
    argv = ["prepare", "--base", str(llama_dir), "--data", str(data), "--quiet", "evaluate=false", "train.epochs=1",
            "save_every=0.5", "train.batch_size=4", "data.eval_fraction=0"]

    def fails(self, *a, **k):
        raise UpcycleError("a late problem")
    monkeypatch.setattr(Trainer, "train", fails)
    assert main([*argv, "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists() and "a late problem" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    assert main([*argv, "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir()  # it was there before this command: never removed
    monkeypatch.undo()
    real_train = Trainer.train

    def train_then_fail(self, *a, **k):  # the checkpoints are listed as the Trainer saves them
        real_train(self, *a, **k)
        raise UpcycleError("failed after training")
    monkeypatch.setattr(Trainer, "train", train_then_fail)
    assert main([*argv, "--out", str(tmp_path / "trained")]) == 2
    assert json.loads((tmp_path / "trained" / "manifest.json").read_text())["checkpoints"]  # kept: it resumes
