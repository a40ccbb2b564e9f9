"""Outputs appear whole or not at all, one writer at a time, and never on top of an input.

`claim_output(out, inputs, force)` is the one rule every command that writes applies to its out
folder, before anything is removed or written:

1. `out` may not be, contain or lie inside any input (the base, experts, data files, a previous
   stage's folder, a symlink to any of them), with or without `--force`;
2. `out` may not be a file, nor a symbolic link (replacing it would act on what it points to);
3. a non-empty `out` is replaced only with `--force`, and only if upcycle made it (it holds one of
   the records every upcycle output has: `MADE_BY_UPCYCLE`); a folder upcycle did not make is
   replaced only if the user also says so explicitly (`--force-foreign`, or
   UPCYCLE_FORCE_FOREIGN=1 from Python).

`atomic_dir(out, ...)` is how a result folder is written:

1. the rule above;
2. take a lock on `out` (a `.NAME.lock` file beside it, held with `flock`): a second writer gets a
   one-line error naming the holder's pid, and a killed holder's lock goes with its process;
3. clear temporary folders that dead writers left beside `out`;
4. check the planned size against the free space;
5. write into a hidden temporary sibling and rename it to `out` when complete. A folder that
   appeared at `out` while we were writing belongs to someone else: it is left alone and our result
   is kept under a visible name next to it. OS errors (no space, read-only, no permission) become
   one line naming the path.

Every temporary name carries its writer's pid (`.NAME.tmp-PID-xxxx`), so whatever a killed run left
is recognized and removed by the next run that writes there (`clear_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

from upcycle.errors import UpcycleError

# errno values that mean "this path cannot be written", turned into a one-line error.
WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}
SPACE_MARGIN = 1.05  # plan + 5 %: shard headers, config and tokenizer files


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def check_not_an_input(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that equals, contains or lies inside any input folder or file."""
    out_r = _resolved(out)
    for given in inputs:
        if given is None:
            continue
        inp = _resolved(given)
        if out_r == inp or inp.is_relative_to(out_r) or out_r.is_relative_to(inp):
            how = "is" if out_r == inp else ("contains" if inp.is_relative_to(out_r) else "lies inside")
            raise UpcycleError(f"out {out}: {how} the input {given}; writing there could destroy it. "
                               "Choose an output path outside every input")


FORCE_FOREIGN_ENV = "UPCYCLE_FORCE_FOREIGN"
MADE_BY_UPCYCLE = ("manifest.json", "run.json", "upcycle_config.yaml", "upcycle_provenance.json", "upcycle_moe.json")
"""Records that every folder upcycle writes holds at least one of: a stage's manifest, a run's
record, the resolved config, an export's provenance or own-format header."""


def made_by_upcycle(folder: Path) -> bool:
    """Whether `folder` holds one of upcycle's records (a manifest must be one of ours, not any JSON)."""
    from upcycle.io.user_files import read_json_object

    for name in MADE_BY_UPCYCLE:
        path = folder / name
        if not path.is_file():
            continue
        if name in ("manifest.json", "run.json"):
            try:
                record = read_json_object(path)
            except UpcycleError:
                continue
            if "stage" not in record and "stages" not in record:
                continue
        return True
    return False


_CREATED: dict[str, tuple[int, int]] = {}
"""Output folders this process created, by identity: the only ones a failed command may remove."""


def make_output_dir(out: Path) -> None:
    """mkdir for an output folder (parents too), remembered when this process created it."""
    out = Path(out)
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None
    if not existed:
        _CREATED[os.path.abspath(out)] = _identity(out)


def created_here(out: Path) -> bool:
    """Whether `out` is a folder this process created (and nobody has replaced since)."""
    identity = _CREATED.get(os.path.abspath(out))
    return identity is not None and identity == _identity(Path(out))


def force_foreign_allowed() -> bool:
    return os.environ.get(FORCE_FOREIGN_ENV, "") not in ("", "0")


def claim_output(out: str | Path, inputs: Iterable[str | Path | None] = (), force: bool = False,
                 resumable: bool = False) -> None:
    """The rule above, checked before anything is removed. `resumable`: a folder holding an upcycle
    manifest is the stage's own to resume (its manifest then decides whether the config matches)."""
    out = Path(out)
    check_not_an_input(out, inputs)
    if out.is_symlink():
        raise UpcycleError(f"out {out}: a symbolic link (to {os.readlink(out)}); upcycle never writes or replaces "
                           "through a link: give the real folder path")
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"out {out}: exists and is not a folder; choose another path")
    try:
        empty = not out.is_dir() or not any(out.iterdir())
    except OSError as e:
        raise write_error(out, e) from None
    if empty or (resumable and (out / "manifest.json").is_file() and (not force or made_by_upcycle(out))):
        return  # a stage's folder: its manifest decides (resume, or --force to start over)
    if not force:
        raise UpcycleError(f"out {out}: folder is not empty; choose another path or pass --force to replace it")
    if not made_by_upcycle(out) and not force_foreign_allowed():
        raise UpcycleError(f"out {out}: not a folder upcycle made (no upcycle manifest or config in it), and --force "
                           "replaces only those; choose another path, or pass --force-foreign as well to replace it")


def check_free_space(out: Path, planned_bytes: int) -> None:
    """Refuse before writing when the planned output cannot fit."""
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if planned_bytes * SPACE_MARGIN > free:
        raise UpcycleError(f"out {out}: needs {planned_bytes / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} GB free; "
                           "free space or choose another path")


def check_output_size(out: Path, planned_bytes: int, input_bytes: int, force: bool, ratio: float = 64.0) -> None:
    """A plan far larger than its input is usually a typo (`--num-experts 100000`): ask for --force."""
    if not force and input_bytes > 0 and planned_bytes > ratio * input_bytes:
        raise UpcycleError(f"out {out}: the plan writes {planned_bytes / 1e9:.2f} GB from {input_bytes / 1e9:.3f} GB of input "
                           f"(over {ratio:.0f}x); check the settings, or pass --force if this is intended")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


TEMPORARY_KINDS = ("tmp", "old")


def temporary_name(name: str, kind: str = "tmp") -> str:
    """The hidden name a writer gives what it has not finished (`kind` tmp) or is replacing (old)."""
    return f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def clear_stale_temporaries(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID-*` files and folders beside `out` whose writer is dead."""
    if not out.parent.is_dir():
        return []
    return _clear_dead(out.parent.glob(f".{out.name}.*-*"), out.name)


def clear_stale_temporaries_in(folder: Path) -> list[Path]:
    """The same for every temporary anywhere inside `folder` (a stage folder: its manifest, routers,
    children, exports)."""
    return _clear_dead(sorted(folder.rglob(".*.*-*")), None) if folder.is_dir() else []


def _clear_dead(paths: Iterable[Path], name: str | None) -> list[Path]:
    removed = []
    for path in paths:
        for kind in TEMPORARY_KINDS:
            head, sep, tail = path.name.rpartition(f".{kind}-")
            if not sep or (name is not None and head != f".{name}"):
                continue
            pid = tail.split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
            break
    return removed


def write_error(out: Path, e: OSError) -> UpcycleError:
    where = e.filename or out
    return UpcycleError(f"out {out}: cannot write {where}: {WRITE_ERRNOS.get(e.errno, e.strerror)}; "
                        "choose a writable path with enough free space")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """One writer per output path. The lock dies with its process, so a killed run never blocks."""
    lock_path = out.parent / f".{out.name}.lock"
    while True:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(out, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UpcycleError(f"out {out}: another upcycle process (pid {holder}) is writing it; "
                               "wait for it to finish or choose another path") from None
        if _identity(lock_path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
            break
        os.close(fd)  # the previous holder removed this lock file as we took it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock_path)
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = (),
               planned_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out`, on any error it is removed.

    A previous `out` is only removed once the new one is complete (so a failed run with --force
    leaves the old result in place), and only if it is the same folder that was there at the start.
    """
    out = Path(out)
    claim_output(out, inputs, force)
    with output_lock(out):
        clear_stale_temporaries(out)
        if planned_bytes is not None:
            check_free_space(out, planned_bytes)
        at_start = _identity(out)
        tmp = out.parent / temporary_name(out.name)
        try:
            tmp.mkdir()
        except OSError as e:
            raise write_error(out, e) from None
        try:
            yield tmp
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in WRITE_ERRNOS:
                raise write_error(out, e) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        now = _identity(out)
        if now != at_start:
            # Someone else created or replaced `out` while we wrote: theirs stays, ours is kept beside it.
            kept = out.parent / f"{out.name}.upcycle-{os.getpid()}"
            tmp.rename(kept)
            raise UpcycleError(f"out {out}: a folder appeared there while this run was writing; it was left alone "
                               f"and this run's complete result is in {kept}")
        old = None
        if now is not None:
            old = out.parent / temporary_name(out.name, "old")
            out.rename(old)
        tmp.rename(out)
        if old is None:
            _CREATED[os.path.abspath(out)] = _identity(out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_file(path, lambda tmp: tmp.write_text(text))


def atomic_write_file(path: Path, write) -> None:
    """`write(tmp)` writes the file's content to a temporary name beside `path`, renamed when done."""
    path = Path(path)
    tmp = path.with_name(temporary_name(path.name))
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in WRITE_ERRNOS:
            raise write_error(path, e) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
