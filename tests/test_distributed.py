"""Whole recipes under `torchrun --nproc_per_node 2` (gloo, CPU): the rank policy of upcycle/distributed.py.

Equality with one process needs the same global batches: sequential samplers, a training split that
is a multiple of every global batch (accelerate's `even_batches` pads an uneven last step with rows
from the start), LoRA dropout 0 (each rank draws its own masks) and rows of one token length (the
Trainer's DDP averages each rank's per-token mean loss). The load-balancing loss is computed per
rank (as in every DDP MoE trainer): it is switched off here, or the routers would differ slightly.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upcycle.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
COMMON = ["--quiet", "data.max_length=64", "data.eval_fraction=0", "evaluate=false", "prepare.train.epochs=2",
          "prepare.save_every=0.25", "prepare.lora.dropout=0", "route.seed_count=8", "route.train.epochs=1",
          "post_train.train.epochs=0.5", "post_train.save_every=0.5", "post_train.moe.aux_loss_coef=0",
          "branch.train.epochs=1", "branch.lora.dropout=0",
          *(f"{s}.train.sampler=sequential" for s in ("prepare", "route", "post_train", "branch"))]
# (one process, each of two ranks): per-device batch sizes giving the same global batch
BATCHES = {"prepare": (8, 4), "route": (4, 2), "post_train": (4, 2), "branch": (4, 2)}
TOL = 1e-4  # relative, max over each tensor: only the order of DDP's gradient reduction differs (measured below)
# Upcycle_PT's experts start as identical copies of one fine-tuned MLP, so a token's top-k candidates
# tie up to float noise and the reduction order can route it to the other copy: measured 1.0e-3 on 2
# of 40 tensors (router weights; median 2.6e-7). Every other recipe stays under 1.4e-5.
RECIPE_TOL = {"upcycle_pt": 5e-3}


@pytest.fixture(scope="module")
def even_data(tmp_path_factory, llama_dir):
    """32 rows of one token length (checked): 4 / 8 steps per epoch at global batch 8 / 4."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    rows = [{"instruction": f"add {i} and {i + 1}", "output": f"{2 * i + 1}", "domain": ("math", "code")[i % 2]}
            for i in range(10, 42)]
    assert len({len(tok(r["instruction"])["input_ids"]) + len(tok(r["output"])["input_ids"]) for r in rows}) == 1
    path = tmp_path_factory.mktemp("dist-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(recipe, base, data, out, ranks):
    sizes = [f"{s}.train.batch_size={b[ranks - 1]}" for s, b in BATCHES.items()]
    return ["run", str(RECIPES / f"{recipe}.yaml"), f"base={base}", f"data.train=[{data}]", f"out={out}", *COMMON, *sizes]


def two_processes(argv, timeout=300):
    return subprocess.run([*TORCHRUN, "-m", "upcycle.cli", *argv], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_close(a: Path, b: Path, tol: float = TOL):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert ta[k].shape == tb[k].shape, k
        if not ta[k].numel():  # qwen2_moe's zero-width shared expert (no shared expert)
            continue
        scale = ta[k].float().abs().max().clamp_min(1e-12)
        assert ((ta[k].float() - tb[k].float()).abs().max() / scale) <= tol, k


def check_equal_runs(one: Path, two: Path, recipe: str):
    record = json.loads((two / "run.json").read_text())
    assert all(s["status"] == "done" for s in record["stages"].values())
    for trained in ["prepare"] * ("prepare" in record["stages"]) + [  # each branch expert is a prepare folder
            f"branch/experts/{e.name}" for e in sorted((one / "branch" / "experts").glob("*"))]:
        checkpoints = json.loads((one / trained / "manifest.json").read_text())["checkpoints"]
        assert checkpoints
        for c in checkpoints:
            assert_close(one / trained / c["path"], two / trained / c["path"])
    if "route" in record["stages"]:
        p1, p2 = (json.loads((d / "route" / "perplexity.json").read_text()) for d in (one, two))
        assert p1["owners"] == p2["owners"]
        assert torch.allclose(torch.tensor(p1["ppl"]), torch.tensor(p2["ppl"]), rtol=1e-5)
    if "post_train" in record["stages"]:
        assert_close(one / "post_train" / "model", two / "post_train" / "model", RECIPE_TOL.get(recipe, TOL))


@pytest.fixture(scope="module")
def upit_lora_runs(tmp_path_factory, llama_dir, even_data):
    root = tmp_path_factory.mktemp("dist-upit-lora")
    assert main(args("upit_lora", llama_dir, even_data, root / "one", 1)) == 0
    proc = two_processes(args("upit_lora", llama_dir, even_data, root / "two", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "one", root / "two"


def test_upit_lora_on_two_processes_equals_one(upit_lora_runs):
    one, two = upit_lora_runs
    check_equal_runs(one, two, "upit_lora")
    # rank 0 alone wrote the run record: one entry per stage, each stage's manifest hash matching the file
    record = json.loads((two / "run.json").read_text())
    assert list(record["stages"]) == ["prepare", "expand", "route", "post_train"]


# every recipe but upit_lora (above) and self_moe_selfgen (tests/test_self_specialize.py: rank 0 generates)
OTHER_RECIPES = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.stem not in ("upit_lora", "self_moe_selfgen"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", OTHER_RECIPES)
def test_other_recipes_on_two_processes_equal_one(recipe, tmp_path, llama_dir, even_data):
    assert main(args(recipe, llama_dir, even_data, tmp_path / "one", 1)) == 0
    proc = two_processes(args(recipe, llama_dir, even_data, tmp_path / "two", 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_equal_runs(tmp_path / "one", tmp_path / "two", recipe)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_sigkill_of_one_rank_mid_prepare_then_rerun_gives_the_same_model(upit_lora_runs, tmp_path, llama_dir, even_data):
    """Rank 1 is killed once prepare has listed 3 of its 8 checkpoints: torchrun ends rank 0 and exits
    non-zero; the rerun resumes from the listed checkpoints and ends with the uninterrupted run's model."""
    out = tmp_path / "killed"
    argv = args("upit_lora", llama_dir, even_data, out, 2)
    proc = subprocess.Popen([*TORCHRUN, "-m", "upcycle.cli", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    manifest = out / "prepare" / "manifest.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if manifest.exists() and len(json.loads(manifest.read_text())["checkpoints"]) >= 3:
            break
        time.sleep(0.01)
    workers = _children(proc.pid)  # the agent's workers, by rank (started in order)
    assert len(workers) == 2 and proc.poll() is None
    os.kill(workers[1], signal.SIGKILL)
    assert proc.wait(timeout=60) != 0  # the agent ends rank 0 too: nothing hangs
    listed = len(json.loads(manifest.read_text())["checkpoints"])
    assert 3 <= listed < 8 and not json.loads(manifest.read_text())["complete"]
    rerun = two_processes(argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_equal_runs(upit_lora_runs[1], out, "upit_lora")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["expand", "route", "post_train"])
def test_sigkill_of_one_rank_mid_stage_then_rerun_gives_the_same_model(stage, upit_lora_runs, tmp_path, llama_dir,
                                                                        even_data):
    """Rank 1 is killed while `stage` is running (run.json says so and the stage folder exists); the
    rerun redoes or resumes that stage and ends with the uninterrupted two-process run's model."""
    out = tmp_path / "killed"
    argv = args("upit_lora", llama_dir, even_data, out, 2)
    proc = subprocess.Popen([*TORCHRUN, "-m", "upcycle.cli", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    record = out / "run.json"

    def status():
        try:
            return json.loads(record.read_text())["stages"].get(stage, {}).get("status")
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
            return None

    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (status() == "running" and (out / stage).exists()):
        time.sleep(0.005)
    workers = _children(proc.pid)
    assert len(workers) == 2 and proc.poll() is None, f"the run ended before {stage} was seen running"
    os.kill(workers[1], signal.SIGKILL)
    assert proc.wait(timeout=60) != 0
    assert status() == "running"  # killed mid-stage: the stage was never recorded done
    rerun = two_processes(argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    check_equal_runs(upit_lora_runs[1], out, "upit_lora")


FAILING = '''
from upcycle import distributed as dist
from upcycle.errors import UpcycleError

def work(i):
    if i == 3:
        raise UpcycleError("data x.jsonl: line 4: bad row (the error on one rank)")
    return i * i

dist.init()
print("squares", dist.map_sharded(lambda i: i * i, range(5)), flush=True)
dist.map_sharded(work, range(5))   # item 3 is rank 1's
'''


def test_an_error_on_one_rank_stops_all_ranks_and_is_shown_once(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text("import sys\nfrom upcycle.errors import UpcycleError\ntry:\n"
                      + "".join(f"    {line}\n" for line in FAILING.strip().splitlines())
                      + "except UpcycleError as e:\n    [print('upcycle: error:', p, file=sys.stderr) for p in e.problems]\n"
                        "    sys.exit(2)\n")
    started = time.time()
    proc = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.time() - started < 60
    assert proc.stdout.count("[0, 1, 4, 9, 16]") == 2, proc.stdout  # both ranks gathered every item, in order
    assert proc.stderr.count("bad row (the error on one rank)") == 1, proc.stderr[-2000:]


def test_a_bad_input_found_late_in_a_recipe_is_shown_once(upit_lora_runs, tmp_path, llama_dir, even_data):
    """route.seed_count larger than the data (found by rank 0 when it plans the run, from the data
    files' row count, before any stage): rank 0 reports it once, rank 1 stops without repeating it,
    the exit status is 2."""
    import shutil

    out = upit_lora_runs[1]  # stage configs name their folders: the run is redone in place, then restored
    shutil.copytree(out, tmp_path / "kept")
    try:
        proc = two_processes([*args("upit_lora", llama_dir, even_data, out, 2), "route.seed_count=1000", "--redo", "route"],
                             timeout=120)
    finally:
        shutil.rmtree(out)
        shutil.copytree(tmp_path / "kept", out)
    assert proc.returncode != 0
    assert proc.stderr.count("seed_count: 1000 is more than the 32 training samples") == 1, proc.stderr[-2000:]
