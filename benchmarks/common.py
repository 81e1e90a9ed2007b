"""What the benchmarks share: the clock, CPU time, alternating best-of rounds, tap writes, waits."""

from __future__ import annotations

import os
import resource
import select
import time

from micdrv.sim.cli import parse_size
from tests.sim_harness import wait_for as _wait_for

__all__ = ["now", "cpu", "best", "writev_frames", "wait_for", "parse_size"]

now = time.perf_counter


def cpu() -> float:
    """CPU seconds this process has used (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best(rounds: int, *fns) -> list[float]:
    """Alternate the measurements ``rounds`` times, so a noisy machine hits them alike; the best of each."""
    out = [0.0] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            out[i] = max(out[i], fn())
    return out


def writev_frames(fd: int, iov, count: int) -> None:
    """``count`` writev calls of ``iov`` to a non-blocking fd (a tap), waiting for room when it is full."""
    for _ in range(count):
        while True:
            try:
                os.writev(fd, iov)
                break
            except BlockingIOError:
                select.select([], [fd], [], 1.0)


def wait_for(predicate, what: str, timeout: float = 60.0):
    return _wait_for(predicate, what, timeout, 0.02)
