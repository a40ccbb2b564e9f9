"""Typed stage manifests: a stage's record is validated when it is written and when another stage reads
it, so a hand-edited, truncated or foreign manifest.json is refused naming the file and the key, and a
stage that writes a key its model does not know fails before anything reaches the disk."""

import json

import pytest

from upcycle.errors import UpcycleError
from upcycle.manifest import MANIFEST, ExpandManifest, Manifest, read_manifest
from upcycle.stages import expand
from upcycle.config import ExpandConfig
from tests.test_expand import base_dir, fake_prepare, random_tv  # noqa: F401  (base_dir is a fixture)


def edit(folder, change):
    data = json.loads((folder / MANIFEST).read_text())
    change(data)
    (folder / MANIFEST).write_text(json.dumps(data))


def test_a_finished_prepare_manifest_reads_as_typed_fields(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(3)])
    m = read_manifest(prep, "prepare")
    assert m.mode == "full" and m.base == str(base_dir)
    assert [c.epoch for c in m.checkpoints] == [0.25, 0.5, 0.75]  # fake_prepare writes epoch (i + 1) / 4
    assert [c.path for c in m.checkpoints] == [f"checkpoints/checkpoint-{i}" for i in range(3)]


@pytest.mark.parametrize("change, key, says", [
    (lambda d: d["checkpoints"][1].update(epoch="half"), "checkpoints.1.epoch", "valid number"),
    (lambda d: d.update(mode="qlora"), "mode", "'lora' or 'full'"),
    (lambda d: d.update(modes="lora"), "modes", "unknown key"),
    (lambda d: d.pop("base"), "base", "required"),
    (lambda d: d["checkpoints"][0].pop("sha256"), "checkpoints.0.sha256", "required"),
])
def test_a_hand_edited_prepare_manifest_is_refused_by_the_stage_that_reads_it(tmp_path, base_dir, change, key, says):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(4)])
    edit(prep, change)
    with pytest.raises(UpcycleError) as err:
        expand.run(ExpandConfig(prepare=prep, out=tmp_path / "out", num_experts=4, checkpoints="all"), progress=False)
    text = str(err.value)
    assert f"{prep / MANIFEST}: {key}: " in text and says in text, text
    assert "--force" in text
    assert not (tmp_path / "out").exists()  # nothing was started on the bad record


def test_the_wrong_stage_or_an_unfinished_one_is_refused(tmp_path, base_dir):
    prep = fake_prepare(tmp_path, base_dir, [random_tv(s) for s in range(4)])
    with pytest.raises(UpcycleError, match="belongs to a prepare stage, not expand or mix"):
        read_manifest(prep, ("expand", "mix"))
    edit(prep, lambda d: d.update(complete=False))
    with pytest.raises(UpcycleError, match="the prepare stage has not finished"):
        read_manifest(prep, "prepare")
    assert read_manifest(prep, "prepare", complete=False).complete is False
    (prep / MANIFEST).write_text('{"stage": "prepare", ')
    with pytest.raises(UpcycleError, match="not a JSON object"):
        read_manifest(prep, "prepare")
    with pytest.raises(UpcycleError, match="no manifest.json; run `upcycle post-train` first"):
        read_manifest(tmp_path / "nowhere", "post_train")


def test_a_stage_writing_a_key_its_model_lacks_fails_and_leaves_the_file_as_it_was(tmp_path):
    m = Manifest.open(tmp_path / "exp", "expand", "h1", initial={"base": "/b", "kind": "lora", "num_experts": 0,
                                                                 "experts": []})
    before = (tmp_path / "exp" / MANIFEST).read_text()
    m.data["expert_count"] = 3  # a writer's typo
    with pytest.raises(UpcycleError, match=r"exp/manifest.json: expert_count: unknown key"):
        m.save()
    assert (tmp_path / "exp" / MANIFEST).read_text() == before
    del m.data["expert_count"]
    m.data["experts"].append({"index": 0, "origin": "merged", "path": "experts/e0", "sha256": "x"})
    with pytest.raises(UpcycleError, match=r"experts.0.origin: Input should be 'checkpoint' or 'child'"):
        m.save()
    m.data["experts"][0]["origin"] = "child"
    m.data["complete"] = True
    m.save()
    typed = read_manifest(tmp_path / "exp", "expand")
    assert isinstance(typed, ExpandManifest) and typed.experts[0].origin == "child"


def test_reopening_a_folder_whose_manifest_was_edited_is_refused(tmp_path):
    Manifest.open(tmp_path / "exp", "expand", "h1", initial={"base": "/b", "kind": "lora", "num_experts": 0,
                                                             "experts": []})
    edit(tmp_path / "exp", lambda d: d.update(num_experts="eight"))
    with pytest.raises(UpcycleError, match=r"num_experts: Input should be a valid integer"):
        Manifest.open(tmp_path / "exp", "expand", "h1")


@pytest.mark.parametrize("content", ["{\"stage\": \"expand\", ", "[1, 2]", "\xff\xfe"])
def test_a_manifest_that_is_not_a_json_object_is_refused_naming_it_and_force_starts_over(tmp_path, content):
    folder = tmp_path / "exp"
    Manifest.open(folder, "expand", "h1", initial={"base": "/b", "kind": "lora", "num_experts": 0, "experts": []})
    (folder / "experts.bin").write_bytes(b"x")
    (folder / "upcycle_config.yaml").write_text("seed: 0\n")  # as every stage writes beside its manifest
    (folder / MANIFEST).write_bytes(content.encode("latin-1"))
    for reopen in (lambda: Manifest.open(folder, "expand", "h1"), lambda: read_manifest(folder, "expand")):
        with pytest.raises(UpcycleError, match=rf"{folder / MANIFEST}: not a JSON object.*--force"):
            reopen()
    assert (folder / "experts.bin").exists()  # nothing removed by a refusal
    fresh = Manifest.open(folder, "expand", "h1", force=True, initial={"base": "/b", "kind": "lora",
                                                                       "num_experts": 0, "experts": []})
    assert fresh.data["config_hash"] == "h1" and not (folder / "experts.bin").exists()
