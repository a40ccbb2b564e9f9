"""Stage 1 `prepare`: checkpoints at fractional epochs, a faithful manifest, kill-and-resume, torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kill_after_checkpoints
from upcycle.config import PrepareConfig
from upcycle.config_io import load_config
from upcycle.errors import UpcycleError
from upcycle.manifest import sha256_files
from upcycle.stages import prepare
from upcycle.train.dense import load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"instruction": f"add {i} and {i + 1}", "output": f"{2 * i + 1}"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def cfg_for(base, out, data, **overrides):
    items = [f"base={base}", f"out={out}", f"data.train={data}", "data.eval_fraction=0.1", "data.max_length=64",
             "train.batch_size=4", "train.epochs=2", "save_every=0.5", "train.lr=5e-3", "evaluate=false",
             "train.logging_steps=1", "train.warmup_ratio=0"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(PrepareConfig, None, items)


def test_checkpoints_follow_save_every(llama_dir, data_file, tmp_path):
    out = tmp_path / "p"
    prepare.run(cfg_for(llama_dir, out, data_file, save_every=0.25), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    ckpts = manifest["checkpoints"]
    assert manifest["complete"] and len(ckpts) == 8 == manifest["planned"]
    per_epoch = manifest["steps_per_epoch"]  # 36 train samples / batch 4 = 9 steps
    assert per_epoch == 9
    assert [c["step"] for c in ckpts] == [round(k * 0.25 * 9) for k in range(1, 9)]
    for c in ckpts:
        assert c["epoch"] == pytest.approx(c["step"] / per_epoch, abs=1e-3)
        files = sorted((out / c["path"]).glob("*.safetensors"))
        assert [f.name for f in files] == ["adapter_model.safetensors"]
        assert sha256_files(files) == c["sha256"]
        assert c["train_loss"] > 0 and c["eval_loss"] > 0
    # optimizer states are kept for the last checkpoint only (they are only needed to resume)
    assert (out / ckpts[-1]["path"] / "optimizer.pt").exists()
    assert not (out / ckpts[0]["path"] / "optimizer.pt").exists()
    assert ckpts[-1]["eval_loss"] < ckpts[0]["eval_loss"]


def eval_loss_of(model, cfg, tokenizer):
    from upcycle.data.build import build_datasets
    from upcycle.data.dataset import Collator
    data = build_datasets(cfg.data, tokenizer, cfg.seed)
    batch = Collator(tokenizer.pad_token_id)([data.eval[i] for i in range(len(data.eval))])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100).item()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reloading_checkpoint_reproduces_its_eval_loss(llama_dir, data_file, tmp_path, mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "p"
    cfg = cfg_for(llama_dir, out, data_file, mode=mode)  # 4 eval samples = one eval batch: the loss is exact
    prepare.run(cfg, progress=False)
    entry = json.loads((out / "manifest.json").read_text())["checkpoints"][1]
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    if mode == "lora":
        from peft import set_peft_model_state_dict
        model = load_model(llama_dir, cfg)
        set_peft_model_state_dict(model, load_file(out / entry["path"] / "adapter_model.safetensors"))
    else:
        model = AutoModelForCausalLM.from_pretrained(out / entry["path"])
    assert eval_loss_of(model, cfg, tokenizer) == pytest.approx(entry["eval_loss"], rel=1e-5)


def cli_args(base, out, data, *extra):
    return [sys.executable, "-m", "upcycle.cli", "prepare", "--quiet", "--base", str(base), "--out", str(out),
            "--data", str(data), "--epochs", "2", "--save-every", "0.5", "data.max_length=64", "train.batch_size=1",
            "train.lr=5e-3", "evaluate=false", "data.eval_fraction=0", "train.warmup_ratio=0", *extra]


def test_sigkill_then_rerun_gives_the_uninterrupted_result(llama_dir, data_file, tmp_path):
    """Kill prepare (SIGKILL) right after its 2nd of 4 checkpoints is listed; rerun; compare with a clean run.

    Expected: bit-identical final adapter (same seed, CPU): the Trainer restores model, optimizer, scheduler,
    RNG and data position from the listed checkpoint."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(cli_args(llama_dir, clean, data_file), check=True, env=env, capture_output=True)

    listed = kill_after_checkpoints(cli_args(llama_dir, killed, data_file), killed / "manifest.json", 2, env)
    assert not listed["complete"] and 2 <= len(listed["checkpoints"]) < 4
    for c in listed["checkpoints"]:  # everything listed is complete on disk
        assert sha256_files(sorted((killed / c["path"]).glob("*.safetensors"))) == c["sha256"]

    subprocess.run(cli_args(llama_dir, killed, data_file), check=True, env=env, capture_output=True)
    a = json.loads((clean / "manifest.json").read_text())["checkpoints"]
    b = json.loads((killed / "manifest.json").read_text())["checkpoints"]
    assert [c["step"] for c in a] == [c["step"] for c in b]
    assert [c["sha256"] for c in a] == [c["sha256"] for c in b]  # bit-identical weights at every checkpoint


def test_rerun_of_a_finished_stage_does_nothing_and_other_config_is_refused(llama_dir, data_file, tmp_path):
    out = tmp_path / "p"
    cfg = cfg_for(llama_dir, out, data_file)
    prepare.run(cfg, progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    prepare.run(cfg, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(UpcycleError, match="made by a different prepare config"):
        prepare.run(cfg_for(llama_dir, out, data_file, **{"train.lr": 1e-3}), progress=False)


def test_two_processes_match_one_at_the_same_global_batch(llama_dir, data_file, tmp_path):
    """torchrun with 2 CPU processes x batch 2 against 1 process x batch 4, same data order (sequential).

    Tolerance: every logged loss within 1e-5 relative (only the reduction order differs; measured: equal to
    5 decimals). LoRA dropout is off: each rank draws its own dropout masks, which no launcher can align."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    common = ["data.eval_fraction=0", "train.sampler=sequential", "train.epochs=1", "save_every=1", "train.logging_steps=1",
              "data.max_length=64", "evaluate=false", "train.lr=5e-3", "train.warmup_ratio=0", "lora.dropout=0", "--quiet"]
    base_args = ["-m", "upcycle.cli", "prepare", "--base", str(llama_dir), "--data", str(data_file)]
    subprocess.run([sys.executable, *base_args, "--out", str(tmp_path / "one"), "train.batch_size=4", *common],
                   check=True, env=env, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, *base_args, "--out", str(tmp_path / "two"), "train.batch_size=2", *common],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(out):
        ckpt = json.loads((out / "manifest.json").read_text())["checkpoints"][-1]["path"]
        state = json.loads((out / ckpt / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 10  # 40 samples / global batch 4
    for a, b in zip(one, two):
        assert b == pytest.approx(a, rel=1e-5)


def test_model_folder_without_tokenizer(llama_dir, data_file, tmp_path):
    base = tmp_path / "notok"
    shutil.copytree(llama_dir, base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink()
    with pytest.raises(UpcycleError, match="no tokenizer"):
        prepare.run(cfg_for(base, tmp_path / "out", data_file), progress=False)
    assert not (tmp_path / "out").exists()


def test_too_few_steps_for_save_every(llama_dir, data_file, tmp_path):
    cfg = cfg_for(llama_dir, tmp_path / "p", data_file, save_every=0.25, **{"train.batch_size": 32})  # 2 steps/epoch
    with pytest.raises(UpcycleError, match="less than one optimizer step"):
        prepare.run(cfg, progress=False)
