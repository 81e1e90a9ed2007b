"""Session-wide hooks: the hardening tally (tests/hardening.py) at the end of the run."""

from __future__ import annotations

import json
import os

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
