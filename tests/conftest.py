"""Session-wide hooks: the hardening tally (tests/hardening.py) at the end of the run, and an end
to the process when a test left a thread running."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

from tests import hardening


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tally = hardening.snapshot()
    if not any(tally.values()):
        return
    terminalreporter.section("hardening report")
    for key, value in tally.items():
        terminalreporter.write_line(f"{key:32s} {value}")
    path = os.environ.get("MICDRV_HARDENING_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(tally, f, indent=1)


_exitstatus = 0


def pytest_sessionfinish(session, exitstatus):
    global _exitstatus
    _exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """A failed test can leave a thread of its own looping (traffic until an event it never set);
    a non-daemon one would keep the interpreter from exiting, and CI from ever finishing (it once
    did). Give such threads a few seconds, then name them and exit with the session's status
    (a passed run stays passed)."""
    deadline = time.monotonic() + 10
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if left:
        sys.stdout.flush()
        sys.stderr.write(f"tests left threads running: {', '.join(left)}; exiting anyway\n")
        sys.stderr.flush()
        os._exit(_exitstatus)
