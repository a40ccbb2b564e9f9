"""Stage 3 `route`: perplexity buckets, batched scoring, router pre-training, empty buckets, bad input."""

import json

import pytest
import torch

from upcycle.config import PrepareConfig, RouteConfig

from upcycle.config_io import load_config
from upcycle.errors import UpcycleError
from upcycle.moe.assemble import build_pool_model, pool_from_expand
from upcycle.routing.buckets import assign_buckets, fill_empty_buckets
from upcycle.routing.scoring import response_nll, score_experts, score_one_expert
from upcycle.stages import prepare, route
from upcycle.train.trainer import pad_batch


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def specialists(llama_dir, tmp_path_factory):
    """Two FFN experts made by fine-tuning the tiny llama: one on answers of 'a's, one on answers of 'b's,
    and an expand-style pool manifest holding them. Expert k is best on the samples of its letter."""
    root = tmp_path_factory.mktemp("specialists")
    experts = []
    for letter in "ab":
        data = write_rows(root / f"{letter}.jsonl", [{"instruction": f"say {i}", "output": letter * 8} for i in range(24)])
        cfg = load_config(PrepareConfig, None, [f"base={llama_dir}", f"out={root / letter}", f"data.train={data}",
                                                "mode=full", "train.epochs=1", "save_every=1", "train.lr=3e-3",
                                                "train.batch_size=4", "evaluate=false", "data.eval_fraction=0",
                                                "train.warmup_ratio=0"])
        prepare.run(cfg, progress=False)
        ck = json.loads((root / letter / "manifest.json").read_text())["checkpoints"][-1]
        experts.append({"index": len(experts), "origin": "checkpoint", "path": str(root / letter / ck["path"]), "sha256": ck["sha256"]})
    pool = root / "pool"
    pool.mkdir()
    (pool / "manifest.json").write_text(json.dumps({"stage": "expand", "config_hash": "made-by-test", "complete": True,
                                                    "base": str(llama_dir), "kind": "ffn", "num_experts": len(experts),
                                                    "experts": experts}))
    mixed = write_rows(root / "mixed.jsonl", [{"instruction": ("x" if i % 2 else "y") * 6, "output": ("a" if i % 2 else "b") * 8,
                                               "domain": "a" if i % 2 else "b"} for i in range(20)])
    return pool, mixed


def route_cfg(pool, data, out, **kw):
    items = [f"expand={pool}", f"out={out}", f"data.train={data}", "seed_count=20", "moe.top_k=1", "train.epochs=4",
             "train.lr=0.05", "train.batch_size=4", "train.warmup_ratio=0", "data.max_length=64"]
    return load_config(RouteConfig, None, items + [f"{k}={v}" for k, v in kw.items()])


def test_samples_go_to_the_expert_that_is_best_on_them(specialists, tmp_path):
    pool, mixed = specialists
    summary = route.run(route_cfg(pool, mixed, tmp_path / "r"), progress=False)
    scores = json.loads((tmp_path / "r" / "perplexity.json").read_text())
    owners = scores["owners"]
    expected = [0 if d == "a" else 1 for d in scores["domains"]]
    assert owners == expected  # every 'a' sample to the 'a' expert, every 'b' sample to the 'b' expert
    assert summary["buckets"]["0"]["domains"] == {"a": 10} and summary["buckets"]["1"]["domains"] == {"b": 10}
    # router pre-training raises the share of each bucket's tokens routed to its owner, in every layer
    before, after = summary["share_before"]["top_k"], summary["share_after"]["top_k"]
    assert all(b > a for a, b in zip(before, after)), (before, after)
    assert min(after) > 0.75  # the chat template's own tokens are the same in both buckets
    for f in ("buckets.png", "owner_share.png", "routers.safetensors"):
        assert (tmp_path / "r" / f).stat().st_size > 0


def test_post_training_loads_exactly_the_trained_routers(specialists, tmp_path):
    from safetensors.torch import load_file

    from upcycle.config import PostTrainConfig
    from upcycle.moe.model import moe_blocks
    from upcycle.stages import post_train

    pool, mixed = specialists
    route.run(route_cfg(pool, mixed, tmp_path / "r", **{"train.epochs": 1}), progress=False)
    trained = load_file(tmp_path / "r" / "routers.safetensors")
    cfg = load_config(PostTrainConfig, None, [f"out={tmp_path / 'p'}", f"expand={pool}", f"route={tmp_path / 'r'}",
                                              "moe.num_experts=2", "moe.top_k=1"])
    model, _ = post_train.build_model(cfg)
    blocks = dict(moe_blocks(model))
    assert set(trained) == {f"model.layers.{l}.mlp.router.weight" for l in blocks}
    for l, block in blocks.items():
        assert torch.equal(block.router.weight, trained[f"model.layers.{l}.mlp.router.weight"])


def test_batched_scoring_equals_scoring_each_expert_alone(specialists):
    from transformers import AutoTokenizer

    from upcycle.data.encode import encode
    from upcycle.data.instructions import load_conversations

    pool, mixed = specialists
    m = pool_from_expand(pool)
    from upcycle.config import MoESpec
    model = build_pool_model(m, MoESpec(num_experts=2, top_k=1), "average", seed=0)
    tok = AutoTokenizer.from_pretrained(m.base)
    convs, _ = load_conversations([mixed])
    samples = [encode(c, tok, 64)[0] for c in convs]
    batched = score_experts(model, samples, 2, batch_size=3, pad_id=tok.pad_token_id)
    for e in range(2):
        alone = score_one_expert(model, samples, e, batch_size=5, pad_id=tok.pad_token_id)
        assert torch.allclose(batched[:, e], alone, rtol=1e-5)
    # and "alone" is the dense model with that expert's MLP: compare with the checkpoint itself
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(m.experts[0].path)
    with torch.no_grad():  # the non-expert weights are the average of both checkpoints, so set them alike
        averaged = dict(model.named_parameters())
        for name, p in dense.named_parameters():
            if ".mlp." not in name:
                p.copy_(averaged[name])
    ids, labels, mask = pad_batch(samples, tok.pad_token_id)
    with torch.no_grad():
        ref = response_nll(dense(input_ids=ids, attention_mask=mask).logits, labels).exp()
    assert torch.allclose(batched[:, 0], ref, rtol=1e-5)


def test_random_buckets_ablation(specialists, tmp_path):
    pool, mixed = specialists
    route.run(route_cfg(pool, mixed, tmp_path / "r", buckets="random", **{"train.epochs": 1}), progress=False)
    owners = json.loads((tmp_path / "r" / "perplexity.json").read_text())["owners"]
    assert sorted(set(owners)) == [0, 1] and owners != [0 if i % 2 else 1 for i in range(20)]


def test_empty_bucket_warning_and_fallback():
    ppl = torch.tensor([[1.0, 5.0, 9.0], [1.0, 2.0, 9.0], [3.0, 1.0, 9.0], [1.0, 4.0, 3.0]])
    owners = assign_buckets(ppl, "perplexity", 0)
    assert owners.tolist() == [0, 0, 1, 0]
    with pytest.warns(UserWarning, match="expert 2 owned no seed sample"):
        filled, notes = fill_empty_buckets(owners, ppl, "steal")
    # quota ceil(4/3/2) = 1: expert 2 takes the sample where 9/1, 9/1, 9/1, 3/1 is lowest: sample 3
    assert filled.tolist() == [0, 0, 1, 2]
    with pytest.warns(UserWarning, match="negatives only"):
        left, _ = fill_empty_buckets(owners, ppl, "leave")
    assert left.tolist() == owners.tolist()


def test_ties_go_to_the_lowest_index():
    assert assign_buckets(torch.tensor([[2.0, 2.0, 3.0]]), "perplexity", 0).tolist() == [0]


def test_relative_buckets_stop_a_globally_better_expert_taking_everything():
    """Expert 0 is better on every sample, so the paper's rule hands it all four. Relative to each
    expert's median (torch's lower median: 2 for expert 0, 4 for expert 1), by hand:
    row 0: log 2/2 = 0 vs log 4/4 = 0 (tie -> 0); row 1: 0 vs log 3/4 < 0 -> 1;
    row 2: log 3/2 = 0.41 vs log 8/4 = 0.69 -> 0; row 3: log 4/2 = 0.69 vs log 6/4 = 0.41 -> 1."""
    ppl = torch.tensor([[2.0, 4.0], [2.0, 3.0], [3.0, 8.0], [4.0, 6.0]])
    assert assign_buckets(ppl, "perplexity", 0).tolist() == [0, 0, 0, 0]
    assert assign_buckets(ppl, "relative", 0).tolist() == [0, 1, 0, 1]
    # scaling one expert's perplexities by a constant changes nothing (it is relative to that expert)
    assert assign_buckets(ppl * torch.tensor([1.0, 10.0]), "relative", 0).tolist() == [0, 1, 0, 1]


def test_seed_fraction_that_gives_no_samples(specialists, tmp_path):
    pool, mixed = specialists
    cfg = route_cfg(pool, mixed, tmp_path / "r", seed_fraction=0.01, min_seed_per_expert=0)
    cfg = cfg.model_copy(update={"seed_count": None})
    with pytest.raises(UpcycleError, match=r"seed_fraction: 0.01 of 20 training samples gives no seed samples"):
        route.run(cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_the_seed_set_has_a_floor_per_expert(specialists, tmp_path):
    """1% of 20 rows is no sample; the floor of 3 per expert (2 experts) draws 6, every one scored."""
    pool, mixed = specialists
    cfg = route_cfg(pool, mixed, tmp_path / "r", seed_fraction=0.01, min_seed_per_expert=3).model_copy(
        update={"seed_count": None})
    summary = route.run(cfg, progress=False)
    assert summary["seed_samples"] == 6
    assert len(json.loads((tmp_path / "r" / "perplexity.json").read_text())["samples"]) == 6


def test_sigkill_during_router_training_then_rerun_gives_the_same_routers(specialists, tmp_path):
    """Killed after the 1st of 4 router-training checkpoints, rerun: bit-identical routers."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import kill_after_checkpoints

    pool, mixed = specialists
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def cmd(out):
        return [sys.executable, "-m", "upcycle.cli", "route", "--quiet", "--expand", str(pool), "--out", str(out),
                "--data", str(mixed), "seed_count=20", "moe.top_k=1", "train.epochs=4", "train.lr=0.05",
                "train.batch_size=1", "train.warmup_ratio=0", "data.max_length=64"]

    subprocess.run(cmd(tmp_path / "clean"), check=True, env=env, capture_output=True)
    state = kill_after_checkpoints(cmd(tmp_path / "killed"), tmp_path / "killed" / "manifest.json", 1, env)
    assert not state["complete"] and 1 <= len(state["checkpoints"]) < 4
    assert not (tmp_path / "killed" / "routers.safetensors").exists()
    subprocess.run(cmd(tmp_path / "killed"), check=True, env=env, capture_output=True)
    a = load_file(tmp_path / "clean" / "routers.safetensors")
    b = load_file(tmp_path / "killed" / "routers.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
