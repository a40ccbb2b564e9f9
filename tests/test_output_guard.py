"""Every command that writes refuses an out folder that is, holds or lies inside one of its inputs,
with --force, before anything is removed: the exit is 2 with one line, and every input's bytes are
unchanged. One finished prepare -> expand -> route run on the tiny base serves as the inputs of the
later stages."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from upcycle.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ["data.max_length=64", "data.eval_fraction=0.1", "evaluate=false", "prepare.train.epochs=2",
        "prepare.train.batch_size=8", "prepare.save_every=0.5", "expand.num_experts=3", "route.seed_count=8",
        "route.train.epochs=1", "route.train.batch_size=4"]


def digest(root: Path) -> dict[str, str]:
    """Every file under `root` (or `root` itself) by relative path: its sha256."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def world(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    base = root / "P" / "base"
    shutil.copytree(llama_dir, base)
    data = root / "D" / "d.jsonl"
    data.parent.mkdir()
    rows = [{"instruction": f"add {i} and {i + 1}", "output": f"{2 * i + 1}", "domain": ("math", "code")[i % 2]}
            for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run = root / "R" / "run"
    code = main(["run", str(RECIPES / "upit_lora.yaml"), "--quiet", f"base={base}", f"data.train=[{data}]", f"out={run}",
                 "stages=[prepare,expand,route]", *TINY])
    assert code == 0
    adapters = [run / "prepare" / c["path"] for c in json.loads((run / "prepare" / "manifest.json").read_text())["checkpoints"]]
    merge = root / "merge.yaml"
    merge.write_text(f"method: linear\nmodels: [{{path: {base}}}, {{path: {base}}}]\nout: {root / 'unused'}\n")
    return {"root": root, "base": base, "data": data, "run": run, "adapters": adapters, "merge": merge}


# command -> (argv before --out, its primary input, a second input whose folder is also tried)
def command(name: str, w: dict) -> tuple[list[str], Path, Path]:
    base, data, run = w["base"], w["data"], w["run"]
    return {
        "build": (["build", "--base", base, "--num-experts", "2", "--top-k", "1"], base, base),
        "prepare": (["prepare", "--base", base, "--data", data, "evaluate=false"], base, data),
        "branch": (["branch", "--base", base, "--data", data, "--mode", "lora"], base, data),
        "expand": (["expand", "--prepare", run / "prepare", "--num-experts", "3"], run / "prepare", base),
        "route": (["route", "--expand", run / "expand", "--data", data], run / "expand", data),
        "post-train": (["post-train", "--expand", run / "expand", "--route", run / "route", "--data", data,
                        "evaluate=false"], run / "expand", data),
        "mix": (["mix", "--base", base, "--expert", w["adapters"][0], "--expert", w["adapters"][1],
                 "--router-init", "random"], base, w["adapters"][1]),
        "merge": (["merge", w["merge"]], base, base),
        "run": (["run", RECIPES / "upit_lora.yaml", f"base={base}", f"data.train=[{data}]"], base, data),
    }[name]


COMMANDS = ["build", "prepare", "branch", "expand", "route", "post-train", "mix", "merge", "run"]


@pytest.mark.parametrize("where", ["the input", "its parent", "the second input's folder", "a symlink to the input"])
@pytest.mark.parametrize("name", COMMANDS)
def test_out_at_an_input_is_refused_with_force_and_no_input_changes(world, name, where, capsys):
    argv, primary, second = command(name, world)
    out = {"the input": primary, "its parent": primary.parent, "the second input's folder": second.parent,
           "a symlink to the input": world["root"] / f"link-{name}"}[where]
    if where == "a symlink to the input" and not out.is_symlink():
        out.symlink_to(primary)
    inputs = [world["root"] / d for d in ("P", "D", "R")]
    before = {str(p): digest(p) for p in inputs}
    force = [] if name == "run" else ["--force"]  # run has no --force (its --redo clears stages of its own folder)
    out_arg = [f"out={out}"] if name in ("run", "merge") else ["--out", str(out)]
    code = main([*map(str, argv), *out_arg, *force, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("upcycle: error: ") and "input" in err[0], err
    assert {str(p): digest(p) for p in inputs} == before


def test_redo_never_removes_a_stage_folder_upcycle_did_not_make(world, tmp_path, capsys):
    """--redo is --force for a recipe's stage folders: a folder of the user's under the same name stays."""
    out = tmp_path / "run"
    (out / "prepare").mkdir(parents=True)
    (out / "prepare" / "notes.txt").write_text("mine")
    code = main(["run", str(RECIPES / "dense_lora.yaml"), f"base={world['base']}", f"data.train=[{world['data']}]",
                 f"out={out}", "--redo", "prepare", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a folder upcycle made" in err[0], err
    assert (out / "prepare" / "notes.txt").read_text() == "mine"
