"""A run folder can be moved (issue 10): stage hashes do not depend on where it lies, and manifests
store the paths inside it relative to their own folder, so `upcycle run ... out=NEW` at the new place
skips what is done and finishes what is not."""

import json
import shutil
from pathlib import Path

import pytest

from upcycle.cli import main
from upcycle.manifest import resolve_path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ["data.max_length=64", "data.eval_fraction=0.1", "evaluate=false",
        "prepare.train.epochs=2", "prepare.train.batch_size=8", "prepare.save_every=0.25", "route.seed_count=8",
        "route.train.epochs=1", "route.train.batch_size=4", "post_train.train.batch_size=4", "post_train.train.epochs=0.5",
        "post_train.save_every=0.5", "branch.train.epochs=1", "branch.train.batch_size=8"]
UPIT = ["prepare", "expand", "route", "post_train"]
MIXED = ["branch", "mix", "post_train"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("portable-data") / "train.jsonl"
    rows = [{"instruction": f"add {i} and {i + 1}", "output": f"{2 * i + 1}", "domain": ("math", "code")[i % 2]} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def run(recipe, llama_dir, tiny_data, out, *extra, quiet=True):
    return main(["run", str(RECIPES / f"{recipe}.yaml"), *(["--quiet"] if quiet else []), f"base={llama_dir}",
                 f"data.train=[{tiny_data}]", f"out={out}", *TINY, *extra])


# A mixed recipe's run ends by describing its stages in the exported model's card (pipeline._describe_mixed),
# on every run: those two files are written again, with the same bytes.
REDESCRIBED = ("post_train/model/README.md", "post_train/model/upcycle_provenance.json")


def stage_files(out: Path, stages) -> dict[str, tuple]:
    """Every file under the stages' folders: its bytes' hash and modification time (a stage that runs
    again rewrites at least its manifest)."""
    import hashlib

    files = {}
    for s in stages:
        for p in sorted((out / s).rglob("*")):
            if p.is_file():
                name = str(p.relative_to(out))
                files[name] = (hashlib.sha256(p.read_bytes()).hexdigest(), None if name in REDESCRIBED else p.stat().st_mtime_ns)
    return files


def model_tensors(folder: Path) -> dict:
    from upcycle.export.load import load_moe

    return {k: v.clone() for k, v in load_moe(folder).state_dict().items()}


def no_absolute_paths_into(out: Path, stages) -> None:
    """No manifest names the run folder itself: what lies inside it is stored relative."""
    for s in stages:
        for manifest in (out / s).rglob("manifest.json"):
            assert str(out) not in manifest.read_text(), manifest


def move(out: Path, tmp_path: Path) -> Path:
    new = tmp_path / "elsewhere" / "moved-run"
    new.parent.mkdir()
    shutil.move(str(out), str(new))
    assert not out.exists()
    return new


def check_moved_run_is_skipped(recipe, stages, llama_dir, tiny_data, tmp_path, capsys):
    import torch

    out = tmp_path / "first" / "run"
    assert run(recipe, llama_dir, tiny_data, out) == 0, capsys.readouterr().err
    capsys.readouterr()
    no_absolute_paths_into(out, stages)
    record = (out / "run.json").read_bytes()
    before = model_tensors(out / "post_train" / "model")
    new = move(out, tmp_path)
    files = stage_files(new, stages)

    code = run(recipe, llama_dir, tiny_data, new, quiet=False)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for stage in stages:
        assert f"{stage}: done, skipped" in captured.out, captured.out
    assert "running" not in captured.out, captured.out
    assert (new / "run.json").read_bytes() == record  # no stage recorded as run again
    assert stage_files(new, stages) == files  # nothing rewritten
    results = json.loads((new / "results.json").read_text())
    assert results["stages"] == stages
    after = model_tensors(new / "post_train" / "model")
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_moved_upit_run_is_done_at_its_new_place(llama_dir, tiny_data, tmp_path, capsys):
    check_moved_run_is_skipped("upit_lora", UPIT, llama_dir, tiny_data, tmp_path, capsys)


def test_a_moved_branch_and_mix_run_is_done_at_its_new_place(llama_dir, tiny_data, tmp_path, capsys):
    check_moved_run_is_skipped("self_moe", MIXED, llama_dir, tiny_data, tmp_path, capsys)


def test_a_run_stopped_after_expand_and_moved_finishes_at_its_new_place(llama_dir, tiny_data, tmp_path, capsys):
    out = tmp_path / "first" / "run"
    assert run("upit_lora", llama_dir, tiny_data, out, "stages=[prepare,expand]") == 0, capsys.readouterr().err
    capsys.readouterr()
    new = move(out, tmp_path)
    files = stage_files(new, ["prepare", "expand"])

    code = run("upit_lora", llama_dir, tiny_data, new, quiet=False)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "prepare: done, skipped" in captured.out and "expand: done, skipped" in captured.out, captured.out
    assert "route: running" in captured.out and "post_train: running" in captured.out, captured.out
    assert stage_files(new, ["prepare", "expand"]) == files  # the done stages were not touched
    record = json.loads((new / "run.json").read_text())
    assert list(record["stages"]) == UPIT and all(s["status"] == "done" for s in record["stages"].values())
    # route and post_train read the moved expand pool: its experts resolve inside the new folder
    from upcycle.moe.assemble import pool_from_expand
    pool = pool_from_expand(new / "expand")
    assert all(Path(e.path).is_dir() and Path(e.path).is_relative_to(new) for e in pool.experts)
    assert (new / "post_train" / "model").is_dir()
    no_absolute_paths_into(new, UPIT)


class Killed(Exception):
    pass


def test_a_branch_stopped_between_domains_and_moved_trains_only_the_rest(llama_dir, tiny_data, tmp_path, capsys,
                                                                        monkeypatch):
    """The branch stage dies before its second domain's expert; moved, the rerun keeps the first
    expert (its inner prepare run is recognised at the new place) and trains the second."""
    from upcycle.stages import prepare

    real, calls = prepare.run, []

    def dies_on_math(cfg, *args, **kwargs):
        calls.append(Path(cfg.out).name)
        if Path(cfg.out).name == "math":
            raise Killed()
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(prepare, "run", dies_on_math)
    out = tmp_path / "first" / "run"
    with pytest.raises(Killed):
        run("self_moe", llama_dir, tiny_data, out)
    assert calls == ["code", "math"]
    new = move(out, tmp_path)
    code_expert = stage_files(new, ["branch/experts/code"])
    assert code_expert

    calls.clear()
    monkeypatch.setattr(prepare, "run", lambda cfg, *a, **k: calls.append(Path(cfg.out).name) or real(cfg, *a, **k))
    code = run("self_moe", llama_dir, tiny_data, new)
    assert code == 0, capsys.readouterr().err
    assert calls == ["code", "math"]  # code's run reopened its finished folder, math's trained
    assert stage_files(new, ["branch/experts/code"]) == code_expert
    branch = json.loads((new / "branch" / "manifest.json").read_text())
    for d in branch["domains"]:
        assert not Path(d["expert"]).is_absolute() and not Path(d["data"]).is_absolute()
        assert resolve_path(d["expert"], new / "branch").is_dir() and resolve_path(d["data"], new / "branch").is_file()
    assert (new / "post_train" / "model").is_dir()
