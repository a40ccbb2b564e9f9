"""Stage 4 `post-train`: the assembled MoE (routers exactly as trained), load balancing, NaN, kill-resume, torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kill_after_checkpoints
from upcycle.config import PostTrainConfig
from upcycle.config_io import load_config
from upcycle.errors import UpcycleError
from upcycle.manifest import sha256_files
from upcycle.stages import post_train


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt-data") / "train.jsonl"
    rows = [{"instruction": f"{'abc'[i % 3] * 3} {i}", "output": f"{'xyz'[i % 3] * 6}", "domain": "xyz"[i % 3]} for i in range(48)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def pt_cfg(dense, out, data, *extra):
    items = [f"out={out}", "source=upcycle", f"dense={dense}", f"data.train={data}", "data.max_length=48",
             "data.eval_fraction=0.1", "evaluate=false", "train.batch_size=4", "train.lr=3e-3", "train.epochs=2",
             "save_every=0.5", "train.warmup_ratio=0", "moe.num_experts=4", "moe.top_k=1"]
    return load_config(PostTrainConfig, None, items + list(extra))


def test_load_balancing_raises_expert_load_entropy(llama_dir, data_file, tmp_path):
    """Routers start skewed (large init); with the Switch loss on, training spreads the load."""
    common = ["moe.router_init_std=1.0", "train.epochs=3", "train.lr=1e-2", "trainable=routers"]
    off = post_train.run(pt_cfg(llama_dir, tmp_path / "off", data_file, "moe.aux_loss_coef=0", *common), progress=False)
    on = post_train.run(pt_cfg(llama_dir, tmp_path / "on", data_file, "moe.aux_loss_coef=1.0", *common), progress=False)
    h_off, h_on = off["expert_load_entropy"]["mean"], on["expert_load_entropy"]["mean"]
    assert h_on > h_off + 0.05, (h_off, h_on)


class LogitsAt:
    """A TrainerCallback that records the in-memory model's logits on `ids` when training begins and ends."""

    def __init__(self, ids):
        self.ids, self.logits = ids, {}

    def __getattr__(self, name):  # every other callback event: do nothing
        return lambda *a, **k: None

    def _record(self, when, model):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits[when] = model(self.ids).logits.clone()
        model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kw):
        self._record("begin", model)

    def on_train_end(self, args, state, control, model=None, **kw):
        self._record("end", model)


def test_export_matches_the_trained_model(llama_dir, data_file, tmp_path):
    """The exported folder, loaded by the stock Mixtral class, gives the logits of the model as training left
    it in memory (LoRA experts folded into full ones), which differ from the model before training."""
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    ids = torch.randint(6, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = LogitsAt(ids)
    s = post_train.run(pt_cfg(llama_dir, tmp_path / "p", data_file, "moe.expert_type=lora", "export.format=mixtral"),
                       progress=False, callbacks=[seen])
    assert s["export"]["format"] == "mixtral"
    # The Trainer turned the cache off for training; the shipped config generates with it again.
    assert json.loads((tmp_path / "p" / "model" / "config.json").read_text())["use_cache"] is True
    stock = AutoModelForCausalLM.from_pretrained(s["model"])
    assert type(stock) is MixtralForCausalLM
    with torch.no_grad():
        exported = stock.eval()(ids).logits
    assert (seen.logits["end"] - seen.logits["begin"]).abs().max() > 1e-2  # training changed the model
    assert (exported - seen.logits["end"]).abs().max() < 1e-4


def test_a_rerun_that_only_evaluates_scores_the_trained_model(llama_dir, data_file, tmp_path, monkeypatch):
    """A run stopped during its final evaluation resumes by scoring the post-trained model it exported,
    not the untrained assembly the stage builds first (it once did: 53/45/59/45 for a 64/76/55/57
    model on SmolLM2)."""
    from upcycle.eval import checkpoints, suite_eval

    ids = torch.randint(6, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    scored = []

    def record_logits(model, tokenizer, items, **kw):  # stands in for the suite: what model is scored?
        model.eval()
        with torch.no_grad():
            scored.append(model(ids).logits.float())
        return {"scores": {"code": 0.5}, "average": 0.5, "outputs": []}

    monkeypatch.setattr(suite_eval, "evaluate_items", record_logits)
    monkeypatch.setattr(checkpoints, "suite_test_items", lambda *a: [])
    cfg = pt_cfg(llama_dir, tmp_path / "p", data_file, "moe.expert_type=lora", "evaluate=true")
    post_train.run(cfg, progress=False)
    manifest = tmp_path / "p" / "manifest.json"
    record = json.loads(manifest.read_text())
    del record["scores"], record["average"], record["scored_with"]  # as if the first run died while evaluating
    manifest.write_text(json.dumps(record))
    post_train.run(cfg, progress=False)
    untrained, _ = post_train.build_model(cfg)
    with torch.no_grad():
        untrained_logits = untrained.eval()(ids).logits
    assert len(scored) == 2
    assert (scored[0] - untrained_logits).abs().max() > 1e-2  # training changed the model
    assert (scored[1] - scored[0]).abs().max() < 1e-4


class PoisonAfter:
    """A TrainerCallback that turns one router weight into NaN at the end of a given step."""

    def __init__(self, step):
        self.step = step

    def __getattr__(self, name):  # every other callback event: do nothing
        return lambda *a, **k: None

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            with torch.no_grad():
                model.model.layers[0].mlp.router.weight[0, 0] = float("nan")


@pytest.mark.parametrize("save_at_poison", [True, False])
def test_nan_stops_with_the_step_named_and_keeps_the_last_good_checkpoint(llama_dir, data_file, tmp_path, save_at_poison):
    """Weights turn NaN at the end of step 6 (checkpoints at steps 3, 6, ...) or step 5 (checkpoints at 2, 4, 6, ...).
    Either the checkpoint of the poisoned step is refused, or the next step's NaN loss stops training; both
    name the step and leave only finite, complete checkpoints listed, from which a rerun resumes."""
    out = tmp_path / "nan"
    every, poison = ("save_every=0.2727", 6) if save_at_poison else ("save_every=0.1818", 5)  # x 11 steps per epoch
    cfg = pt_cfg(llama_dir, out, data_file, every, "train.epochs=2")
    pattern = r"weights are not finite after step 6" if save_at_poison else r"loss is nan at step 6"
    with pytest.raises(UpcycleError, match=pattern):
        post_train.run(cfg, progress=False, callbacks=[PoisonAfter(poison)])
    manifest = json.loads((out / "manifest.json").read_text())
    steps = [c["step"] for c in manifest["checkpoints"]]
    assert not manifest["complete"] and steps == ([3] if save_at_poison else [2, 4])
    for c in manifest["checkpoints"]:
        files = sorted((out / c["path"]).glob("*.safetensors"))
        assert sha256_files(files) == c["sha256"]
        assert all(torch.isfinite(t).all() for f in files for t in load_file(f).values())
    summary = post_train.run(cfg, progress=False)  # rerun (no poison): resumes and finishes
    assert json.loads((out / "manifest.json").read_text())["complete"] and summary["export"]["format"]


def cli(dense, out, data, *extra):
    return [sys.executable, "-m", "upcycle.cli", "post-train", "--quiet", "--out", str(out), "--dense", str(dense),
            "--data", str(data), "source=upcycle", "data.max_length=48", "data.eval_fraction=0", "evaluate=false",
            "train.batch_size=1", "train.lr=3e-3", "train.epochs=2", "save_every=0.5", "train.warmup_ratio=0",
            "moe.num_experts=4", "moe.top_k=2", *extra]


@pytest.mark.parametrize("experts", ["mlp", "lora"])
def test_sigkill_then_rerun_gives_the_uninterrupted_model(experts, llama_dir, data_file, tmp_path):
    """Bit-identical final export after a SIGKILL between checkpoints 2 and 3 of 4 (same seed, CPU).
    With LoRA experts the checkpoints hold only the trained tensors (LoRA and routers); the rerun
    puts them back on the frozen weights it rebuilds."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    argv = [f"moe.expert_type={experts}"]
    subprocess.run(cli(llama_dir, tmp_path / "clean", data_file, *argv), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    state = kill_after_checkpoints(cli(llama_dir, killed, data_file, *argv), killed / "manifest.json", 2, env)
    assert not state["complete"] and 2 <= len(state["checkpoints"]) < 4  # not marked done
    assert not (killed / "model").exists()
    saved = load_file(killed / state["checkpoints"][0]["path"] / "model.safetensors")
    if experts == "lora":
        assert saved and all(".router." in k or ".lora_" in k for k in saved), sorted(saved)[:5]
        assert any(".lora_" in k for k in saved)
    else:
        assert "model.embed_tokens.weight" in saved  # everything trains
    subprocess.run(cli(llama_dir, killed, data_file, *argv), check=True, env=env, capture_output=True)
    a = load_file(tmp_path / "clean" / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_post_training_under_two_process_torchrun(llama_dir, data_file, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = cli(llama_dir, tmp_path / "ddp", data_file, "train.epochs=1", "train.batch_size=2")
    proc = subprocess.run([*torchrun, *args[1:]], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "ddp" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["checkpoints"]) == 2
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "model")


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(UpcycleError, match="source upit needs expand="):
        post_train.run(load_config(PostTrainConfig, None, [f"out={tmp_path / 'o'}"]), progress=False)
    with pytest.raises(UpcycleError, match="prepare:.* not a finished prepare run"):
        (tmp_path / "not-a-prepare-run").mkdir()
        post_train.run(load_config(PostTrainConfig, None, [f"out={tmp_path / 'o'}", "source=upcycle",
                                                            f"dense=prepare:{tmp_path / 'not-a-prepare-run'}"]), progress=False)
