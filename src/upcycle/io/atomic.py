"""Outputs appear whole or not at all, one writer at a time, and never on top of an input.

`atomic_dir(out, ...)` is the one way a command writes a result folder:

1. refuse an `out` that is, contains or lies inside one of the command's inputs (`--force` would
   otherwise delete the base model);
2. take a lock on `out` (a `.NAME.lock` file beside it, held with `flock`): a second writer gets a
   one-line error naming the holder's pid, and a killed holder's lock goes with its process;
3. clear temporary folders that dead writers left beside `out`;
4. check the planned size against the free space;
5. write into a hidden temporary sibling and rename it to `out` when complete. A folder that
   appeared at `out` while we were writing belongs to someone else: it is left alone and our result
   is kept under a visible name next to it. OS errors (no space, read-only, no permission) become
   one line naming the path.
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


def check_output_dir(out: Path, force: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse a non-empty output folder unless force; refuse a path that is a file or an input."""
    check_not_an_input(out, inputs)
    if out.exists() and not out.is_dir():
        raise UpcycleError(f"out {out}: exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UpcycleError(f"out {out}: folder is not empty; choose another path or pass --force to replace it")


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


def clear_stale_temporaries(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` / `.NAME.old-PID-*` folders beside `out` whose writer is dead."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _write_error(out: Path, e: OSError) -> UpcycleError:
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
            raise _write_error(out, e) from None
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
    check_output_dir(out, force, inputs)
    with output_lock(out):
        clear_stale_temporaries(out)
        if planned_bytes is not None:
            check_free_space(out, planned_bytes)
        at_start = _identity(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise _write_error(out, e) from None
        try:
            yield tmp
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if e.errno in WRITE_ERRNOS:
                raise _write_error(out, e) from None
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
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in WRITE_ERRNOS:
            raise _write_error(path, e) from None
        raise
