"""Outputs can't eat inputs: refusal of overlapping paths, one writer per output, stale temporaries,
free space, OS write errors, and a folder that appears mid-run. Each case: a one-line error, inputs
intact, nothing half-written left."""

import errno
import json
import shutil
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from upcycle.errors import UpcycleError
from upcycle.io.atomic import (atomic_dir, atomic_write_text, check_output_size, clear_stale_temporaries)


def leftovers(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def make_input(tmp_path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "weights.bin").write_bytes(b"w" * 100)
    return base


@pytest.mark.parametrize("where", ["equal", "inside", "parent"])
def test_output_overlapping_an_input_is_refused_and_input_kept(tmp_path, where):
    base = make_input(tmp_path)
    out = {"equal": base, "inside": base / "moe", "parent": tmp_path}[where]
    with pytest.raises(UpcycleError) as e:
        with atomic_dir(out, force=True, inputs=[base]) as tmp:
            (tmp / "x").write_text("never")
    assert str(e.value).count("\n") == 0 and "input" in str(e.value) and str(base) in str(e.value)
    assert (base / "weights.bin").read_bytes() == b"w" * 100
    assert sorted(p.name for p in base.iterdir()) == ["weights.bin"]


def test_relative_and_symlinked_paths_are_resolved(tmp_path, monkeypatch):
    base = make_input(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(base)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UpcycleError, match="lies inside the input"):
        with atomic_dir(Path("link/out"), force=True, inputs=["base"]):
            pass


def _hold_lock(out: Path, ready: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import time, pathlib
        from upcycle.io.atomic import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            pathlib.Path({str(ready)!r}).write_text("1")
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(600):
        if ready.exists():
            return proc
        import time
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("lock holder did not start")


def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_path(tmp_path):
    out = tmp_path / "out"
    holder = _hold_lock(out, tmp_path / "ready")
    try:
        with pytest.raises(UpcycleError) as e:
            with atomic_dir(out) as tmp:
                (tmp / "x").write_text("second")
        assert f"pid {holder.pid}" in str(e.value) and "\n" not in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    # The killed holder left its temporary folder; the next writer removes it and succeeds.
    assert [p for p in leftovers(out) if ".tmp-" in p.name]
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("third")
    assert (out / "x").read_text() == "third"
    assert leftovers(out) == []


def test_stale_temporaries_of_live_processes_are_kept(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.tmp-{os.getpid()}-abcd1234"
    live.mkdir()
    dead_pid = 2 ** 22 + 12345  # above pid_max's default range: no such process
    dead = tmp_path / f".out.tmp-{dead_pid}-abcd1234"
    dead.mkdir()
    assert clear_stale_temporaries(out) == [dead]
    assert live.is_dir() and not dead.exists()


def test_folder_appearing_mid_run_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UpcycleError) as e:
        with atomic_dir(out) as tmp:
            (tmp / "ours").write_text("ours")
            out.mkdir()
            (out / "theirs").write_text("theirs")
    assert "appeared" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    kept = tmp_path / f"out.upcycle-{os.getpid()}"
    assert (kept / "ours").read_text() == "ours"
    assert leftovers(out) == []


def test_replacing_with_force_swaps_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "upcycle_config.yaml").write_text("old: 1\n")  # an earlier upcycle output
    with pytest.raises(RuntimeError):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new").write_text("half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in out.iterdir()) == ["upcycle_config.yaml"] and leftovers(out) == []
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new"] and leftovers(out) == []


def test_force_never_replaces_a_folder_upcycle_did_not_make_unless_told(tmp_path, monkeypatch):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"jpeg")
    (out / "manifest.json").write_text('{"version": 3}')  # another tool's manifest is not ours
    with pytest.raises(UpcycleError, match="not a folder upcycle made.*--force-foreign") as e:
        with atomic_dir(out, force=True) as tmp:
            (tmp / "x").write_text("never")
    assert "\n" not in str(e.value)
    assert (out / "holiday.jpg").read_bytes() == b"jpeg" and leftovers(out) == []
    monkeypatch.setenv("UPCYCLE_FORCE_FOREIGN", "1")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "x").write_text("replaced")
    assert sorted(p.name for p in out.iterdir()) == ["x"]


def test_plan_larger_than_free_space_is_refused_before_writing(tmp_path):
    out = tmp_path / "out"
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(UpcycleError, match="GB free"):
        with atomic_dir(out, planned_bytes=free * 2):
            raise AssertionError("must not start writing")
    assert not out.exists() and leftovers(out) == []


def test_plan_that_dwarfs_its_input_needs_force(tmp_path):
    with pytest.raises(UpcycleError, match="--force"):
        check_output_size(tmp_path / "o", planned_bytes=5_000_000_000, input_bytes=93_000, force=False)
    check_output_size(tmp_path / "o", planned_bytes=5_000_000_000, input_bytes=93_000, force=True)
    check_output_size(tmp_path / "o", planned_bytes=8 * 93_000, input_bytes=93_000, force=False)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_write_errors_are_one_line_naming_the_path(tmp_path, code):
    out = tmp_path / "out"
    with pytest.raises(UpcycleError) as e:
        with atomic_dir(out) as tmp:
            raise OSError(code, os.strerror(code), str(tmp / "model-00001.safetensors"))
    msg = str(e.value)
    assert "\n" not in msg and "model-00001.safetensors" in msg and str(out) in msg
    assert not out.exists() and leftovers(out) == []


def test_real_full_disk_is_one_line(tmp_path):
    """A real ENOSPC from a 1 MB tmpfs (needs root to mount; RLIMIT_FSIZE gives EFBIG, not ENOSPC)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the ENOSPC path is covered by the errno test above")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this container does not allow mounting a tmpfs")
    try:
        out = mnt / "out"
        with pytest.raises(UpcycleError, match="no space left"):
            with atomic_dir(out) as tmp:
                with open(tmp / "big", "wb") as f:
                    for _ in range(4):
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                        os.fsync(f.fileno())
        assert not out.exists() and leftovers(out) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_unwritable_parent_is_one_line(tmp_path):
    """A folder the process cannot write: permission bits as an ordinary user; as root (which ignores
    them) a read-only tmpfs."""
    locked = tmp_path / "locked"
    locked.mkdir()
    mounted = False
    if os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(locked)], capture_output=True)
        if r.returncode:
            pytest.skip("root ignores permission bits and this container does not allow mounting a tmpfs")
        mounted, reason = True, "read-only file system"
    else:
        locked.chmod(0o555)
        reason = "permission denied"
    try:
        out = locked / "out"
        with pytest.raises(UpcycleError) as e:
            with atomic_dir(out):
                raise AssertionError("must not get a folder to write in")
        assert reason in str(e.value) and str(out) in str(e.value) and "\n" not in str(e.value)
    finally:
        if mounted:
            subprocess.run(["umount", str(locked)])
        locked.chmod(0o755)


def test_atomic_write_text_error_names_the_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UpcycleError, match="run.json.*no space left"):
        atomic_write_text(target, "{}")
    assert not target.exists()


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refused_run_changes_nothing_in_the_folder_it_refused(llama_dir, tmp_path, capsys):
    from upcycle.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "dense_sft.yaml"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"instruction": "add {i} and 1", "output": "{i + 1}"}}\n' for i in range(16)))
    out = tmp_path / "run"
    tiny = [f"base={llama_dir}", f"data.train=[{data}]", f"out={out}", "evaluate=false", "data.max_length=32",
            "prepare.train.epochs=1", "prepare.save_every=1", "prepare.train.batch_size=8"]
    assert main(["run", str(recipe), "--quiet", *tiny]) == 0, capsys.readouterr().err
    before = _snapshot(out)
    assert json.loads((out / "run.json").read_text())["stages"]["prepare"]["status"] == "done"
    capsys.readouterr()
    assert main(["run", str(recipe), "--quiet", *tiny, "prepare.train.lr=5e-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different prepare config" in err[0] and "--redo prepare" in err[0]
    assert _snapshot(out) == before  # run.json not marked "running", recipe_resolved.yaml not rewritten


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_run_into_the_base_is_refused(llama_dir, tmp_path, capsys, where):
    from upcycle.cli import main

    base = tmp_path / "base"
    shutil.copytree(llama_dir, base)
    before = _snapshot(base)
    out = base if where == "equal" else base / "run"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "dense_sft.yaml"
    assert main(["run", str(recipe), "--quiet", f"base={base}", f"out={out}", "evaluate=false"]) == 2
    assert "input" in capsys.readouterr().err
    assert _snapshot(base) == before


@pytest.mark.parametrize("where", ["equal", "inside", "parent"])
def test_build_never_writes_over_its_base(llama_dir, tmp_path, capsys, where):
    """`upcycle build --base P/base --out P --force` used to delete the base model."""
    from upcycle.cli import main

    base = tmp_path / "models" / "base"
    shutil.copytree(llama_dir, base)
    before = _snapshot(base)
    out = {"equal": base, "inside": base / "moe", "parent": base.parent}[where]
    code = main(["build", "--quiet", "--base", str(base), "--out", str(out), "--num-experts", "2", "--top-k", "1", "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "input" in err[0], err
    assert _snapshot(base) == before and sorted(p.name for p in base.parent.iterdir()) == ["base"]


def test_build_far_larger_than_its_base_asks_for_force(llama_dir, tmp_path, capsys):
    from upcycle.cli import main

    out = tmp_path / "huge"
    code = main(["build", "--quiet", "--base", str(llama_dir), "--out", str(out), "--num-experts", "100000", "--top-k", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--force" in err[0] and "GB" in err[0], err
    assert not out.exists() and leftovers(out) == []


def test_concurrent_build_to_the_same_out_is_refused(llama_dir, tmp_path, capsys):
    from upcycle.cli import main

    out = tmp_path / "moe"
    holder = _hold_lock(out, tmp_path / "ready")
    try:
        code = main(["build", "--quiet", "--base", str(llama_dir), "--out", str(out), "--num-experts", "2", "--top-k", "1"])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"pid {holder.pid}" in err[0], err
    assert not out.exists()
