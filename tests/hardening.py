"""The hardening tally (issue 7's report): what the hostile-card, crash and restart tests tried and verified.

Tests add to it as they go; ``tests/conftest.py`` prints it at the end of the
run and writes it as JSON to ``$MICDRV_HARDENING_REPORT`` when that is set.
Every number is counted from what actually happened in the run -- a fuzz
case is counted once the daemon has been checked to have survived it, a
byte is "verified" only after it was compared with what the card was told
was written, and a byte is "lost" when such a comparison failed (the test
fails too; the tally says how much).
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
TALLY: dict[str, int] = {
    "fuzz cases tried": 0,
    "faults injected": 0,
    "faults survived": 0,
    "bytes verified after crashes": 0,
    "data lost (bytes)": 0,
}


def _add(key: str, n: int) -> None:
    with _lock:
        TALLY[key] += n


def fuzz_cases(n: int = 1) -> None:
    """``n`` property-based cases ran against a host parser and the host checked out fine afterwards."""
    _add("fuzz cases tried", n)


def fault(survived: bool) -> None:
    """One injected fault (a panic, a SIGKILL, a bad message ...), and whether everything survived it."""
    _add("faults injected", 1)
    if survived:
        _add("faults survived", 1)


def verified(nbytes: int) -> None:
    """``nbytes`` compared equal with what the card had been told was written before a crash."""
    _add("bytes verified after crashes", nbytes)


def lost(nbytes: int) -> None:
    """``nbytes`` the card had been told were written, found different after a crash (a failure)."""
    _add("data lost (bytes)", nbytes)


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(TALLY)
