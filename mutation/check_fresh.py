"""Run test files under given mutants, each in a fresh child that imports ventoux only once its mutant is set.

    .venv/bin/python mutation/check_fresh.py tests/mutation/test_qlinear_mutants.py ventoux.qlinear.x__by_rows__mutmut_5

mutmut forks every mutant from a process that has already imported ventoux, so a mutant of code that runs at
import time (a decorator such as qlinear._by_rows) is never active, and mutmut lists it as "no tests". This
script imports from mutants/src (of MUTDIR, default the current folder) after MUTANT_UNDER_TEST is set, and
prints killed or SURVIVED per mutant (each child's pytest output: /tmp/check_fresh_<mutant>.log). A mutant whose
tests run past CHECK_FRESH_TIMEOUT (180 s) is stopped with the processes it started, and counted killed, as mutmut
counts its timeouts. It is also a quick way to check new tests against survivors without a mutmut run: pass node
ids to narrow the tests.
"""

from __future__ import annotations

import os
import signal
import sys
import time

src = os.path.abspath(os.path.join(os.environ.get("MUTDIR", "."), "mutants", "src"))
sys.path.insert(0, src)
os.environ["PYTHONPATH"] = src + os.pathsep + os.environ.get("PYTHONPATH", "")
import pytest  # noqa: E402  (torch and pytest before the fork; ventoux after it)
import torch  # noqa: E402,F401

tests = [a for a in sys.argv[1:] if not a.startswith("ventoux.")]
mutants = [a for a in sys.argv[1:] if a.startswith("ventoux.")]
LIMIT = float(os.environ.get("CHECK_FRESH_TIMEOUT", "180"))  # seconds; a mutant that hangs the tests is caught
for name in mutants:
    pid = os.fork()
    if pid == 0:
        os.setsid()  # its own process group: a timeout stops the servers its tests started too
        os.environ["MUTANT_UNDER_TEST"] = name
        fd = os.open(f"/tmp/check_fresh_{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        import ventoux

        assert ventoux.__file__.startswith(src), ventoux.__file__
        os._exit(int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *tests])))
    deadline = time.monotonic() + LIMIT
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    if status[0] == 0:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print("killed  ", name, f"(timed out after {LIMIT:.0f} s)", flush=True)
        continue
    print("killed  " if status[1] else "SURVIVED", name, flush=True)
