"""The learning-rate schedule: exact factors, warmup that never trains at rate 0 (a one-step stage
moves its weights), and a horizon longer than the stage."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from upcycle.config import TrainSpec
from upcycle.train.schedule import lr_factor, make_scheduler, schedule_horizon, warmup_steps


def test_factors_by_hand():
    # cosine, warmup 2 of a 10-step horizon: 1/3, 2/3, then 0.5 * (1 + cos(pi * (s - 2) / 8))
    assert [lr_factor(s, "cosine", 2, 10) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5)
    assert lr_factor(9, "cosine", 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_factor(5, "linear", 0, 10) == pytest.approx(0.5)
    assert lr_factor(0, "constant_with_warmup", 3, 10) == pytest.approx(0.25) and lr_factor(7, "constant", 3, 10) == 1.0
    assert warmup_steps(0.03, 1) == 0 and warmup_steps(0.5, 3) == 1 and warmup_steps(0.1, 100) == 10


def test_no_step_of_any_stage_length_is_at_rate_zero():
    for total in range(1, 40):
        for ratio in (0.0, 0.03, 0.5, 0.99):
            w = warmup_steps(ratio, total)
            for kind in ("cosine", "linear", "constant", "constant_with_warmup"):
                assert all(lr_factor(s, kind, w, total) > 0 for s in range(total)), (total, ratio, kind)


def test_a_horizon_of_twice_the_stage_stops_half_way_down_the_cosine():
    assert schedule_horizon(100, 2.0, 4.0) == 200 and schedule_horizon(100, 2.0, None) == 100
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, "cosine", 0.0, 100, 2.0, 4.0)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 200)))
    with pytest.raises(ValueError, match="schedule_epochs: 1.0 is shorter than"):
        TrainSpec(epochs=2, schedule_epochs=1)


def test_a_one_step_stage_trains_at_a_non_zero_rate(llama_dir, tmp_path):
    """4 rows, batch 4, one epoch: one optimizer step, with a warmup ratio that transformers' scheduler
    rounds up to one warmup step at rate 0. The LoRA B factors (peft starts them at 0) must move."""
    from upcycle.config import PrepareConfig
    from upcycle.config_io import load_config
    from upcycle.stages import prepare

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"q{i}", "output": "abc"}) for i in range(4)))
    cfg = load_config(PrepareConfig, None, [f"base={llama_dir}", f"out={tmp_path / 'p'}", f"data.train={data}",
                                            "train.epochs=1", "save_every=1", "train.batch_size=4", "evaluate=false",
                                            "data.eval_fraction=0", "train.warmup_ratio=0.5", "train.lr=0.01"])
    prepare.run(cfg, progress=False)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["save_steps"] == [1]
    weights = load_file(tmp_path / "p" / manifest["checkpoints"][0]["path"] / "adapter_model.safetensors")
    b = [t for name, t in weights.items() if "lora_B" in name]
    assert b and all(t.abs().max() > 0 for t in b)
