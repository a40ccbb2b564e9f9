"""Run model-written Python in a separate, limited process: never inside the caller's process.

Layers of containment, each covering what the others miss:
  - a fresh process per program (`python -I -S`), in a new session so the whole group can be killed;
  - resource limits: CPU seconds, address space, file size, open files, processes;
  - when running as root, the child drops to user `nobody` (and runs the system Python, which
    `nobody` can read), so it cannot write outside its temporary folder and RLIMIT_NPROC applies;
  - an audit hook in the harness, installed before the program runs, refuses fork/exec/spawn,
    sockets, ctypes, and any file write, rename or delete outside the temporary folder;
  - a wall-clock timeout after which the process group is killed.
The harness reports through a nonce-tagged line, so a program cannot fake a result by printing.
This guards against accidents and naive malice (loops, fork bombs, huge allocations, stray
writes); it is not a security boundary against a determined attacker: use a container for that.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534

HARNESS = textwrap.dedent(r'''
    import sys, os, json, resource
    cpu, memory_mb = int(sys.argv[1]), int(sys.argv[2])
    for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory_mb << 20),
                         (resource.RLIMIT_FSIZE, 1 << 20), (resource.RLIMIT_NOFILE, 64),
                         (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, 16)):
        resource.setrlimit(limit, (value, value))
    nonce = sys.stdin.readline().strip()
    root = os.path.realpath(os.getcwd())
    program = open("program.py").read()
    tests = json.load(open("tests.json"))
    _print = print

    def inside(path):
        try:
            real = os.path.realpath(os.fsdecode(path))
        except Exception:
            return False
        return real == root or real.startswith(root + os.sep)

    BLOCKED = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
               "os.kill", "os.killpg", "socket.", "ctypes.", "os.setuid", "os.setgid", "os.chdir", "pty.spawn")
    def hook(event, args):
        if event.startswith(BLOCKED):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and args[0] is not None and not isinstance(args[0], int):
            mode = args[1] or "r"
            flags = args[2] if len(args) > 2 else 0
            writing = any(c in str(mode) for c in "wax+") or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]} is not allowed")
        if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
                     "os.chmod", "os.chown", "shutil.rmtree", "shutil.move", "shutil.copyfile"):
            if not all(inside(a) for a in args if isinstance(a, (str, bytes, os.PathLike))):
                raise PermissionError(f"sandbox: {event} outside the sandbox folder is not allowed")
    sys.addaudithook(hook)

    result = {"compiled": False, "passed": 0, "total": len(tests), "error": None}
    ns = {"__name__": "__sandbox__"}
    try:
        exec(compile(program, "program.py", "exec"), ns)
        result["compiled"] = True
        for t in tests:
            try:
                exec(compile(t, "test", "exec"), ns)
                result["passed"] += 1
            except BaseException as e:
                result["error"] = result["error"] or f"{type(e).__name__}: {e}"[:200]
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"[:200]
    _print(nonce + json.dumps(result), flush=True)
''')


@dataclass
class SandboxResult:
    passed: int
    total: int
    compiled: bool
    status: str  # "ok", "timeout", "crashed", "killed"
    error: str | None = None

    @property
    def all_passed(self) -> bool:
        return self.status == "ok" and self.total > 0 and self.passed == self.total


def _python_for_child(drop_privileges: bool) -> str:
    """A Python the child can execute: as `nobody`, the system Python (root's venv is unreadable)."""
    if drop_privileges:
        for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
            if os.access(candidate, os.X_OK):
                return candidate
    return sys.executable


def run_program(program: str, tests: list[str], timeout: float = 5.0, memory_mb: int = 256) -> SandboxResult:
    """Run `program`, then each test statement, in a sandboxed child; count the tests that pass."""
    drop = os.geteuid() == 0
    workdir = Path(tempfile.mkdtemp(prefix="upcycle-sandbox-"))
    try:
        (workdir / "program.py").write_text(program)
        (workdir / "tests.json").write_text(json.dumps(tests))
        (workdir / "harness.py").write_text(HARNESS)
        if drop:
            os.chmod(workdir, 0o777)
        nonce = secrets.token_hex(16)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        # Limits are set by the harness itself before the program runs; user/group switching is done
        # by Popen in C (a Python preexec_fn is unsafe in a multi-threaded parent such as torch).
        privileges = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if drop else {}
        proc = subprocess.Popen([_python_for_child(drop), "-I", "-S", "harness.py", str(int(timeout) + 1), str(memory_mb)],
                                cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True, **privileges)
        try:
            out, _ = proc.communicate((nonce + "\n").encode(), timeout=timeout)
            status = "ok"
        except subprocess.TimeoutExpired:
            status = "timeout"
            out = b""
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the program and anything it started
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for line in out.decode(errors="replace").splitlines():
            if line.startswith(nonce):
                r = json.loads(line[len(nonce):])
                return SandboxResult(r["passed"], r["total"], r["compiled"], "ok", r["error"])
        if status == "ok":
            status = "killed" if proc.returncode and proc.returncode < 0 else "crashed"
        return SandboxResult(0, len(tests), False, status, f"no result (exit {proc.returncode})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
