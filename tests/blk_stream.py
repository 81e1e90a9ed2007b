"""The card writing a stream of distinct, checkable block requests, and the host checking its image after.

:class:`Writer` drives the card's own virtio-blk driver through its shell
(``blk write`` / ``blk flush`` over the simulator's control socket): each
write a different word, every sector of it ``"<word>:<sector>:"``
(:func:`~micdrv.sim.cardos.shell_commands.pattern_bytes`), so a misplaced
sector never passes for another, with a FLUSH after every few writes.
:func:`check_image` compares the host's image file with what the card was
told was written, adding to the hardening tally (``tests/hardening.py``).
Used by the crash tests (a panicking card, a killed daemon) and the load test.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

from micdrv.sim.cardos.shell_commands import pattern_bytes
from tests import hardening
from tests.daemon_harness import control_call

SECTOR = 512
AREA = 32768                  # sectors per stream (16 MiB): two streams never share a sector
FLUSH_EVERY = 4               # writes between two FLUSHes
SIZES = (1, 7, 64, 255, 1024, 2048)   # sectors per write, 512 B .. 1 MiB: one request each


class Writer:
    """The card writing a stream of distinct requests through its shell, a FLUSH every few writes.

    Each command goes over a connection of its own to the simulator's control socket and is
    recorded once the card's shell said it completed: ``done`` (sector, count, word) in order,
    ``flushed`` how many of them a completed FLUSH followed. ``sent`` is set each time a write
    command has just gone out; ``inflight`` is the write the card was running when it stopped;
    ``full`` says the stream ended because its area was all written.

    With ``hold=N`` the stream pauses after its N-th completed FLUSH (``held`` set) until :meth:`go`: a
    test that means to strike in the middle of a write waits for that point instead of racing the stream
    to the end of its area (a test thread starved for a few hundred ms on a busy machine once saw the
    area full before it looked).
    """

    def __init__(self, sim_control: str, round_: int, rng: random.Random, *, area: int = AREA, disk: str = "vda",
                 sizes: tuple[int, ...] = SIZES, hold: int | None = None):
        self.sim_control, self.round, self.rng = sim_control, round_, rng
        self.area, self.disk, self.sizes = area, disk, sizes
        self.base = round_ * area
        self.next = self.base
        self.done: list[tuple[int, int, str]] = []
        self.flushed = 0
        self.flushes = 0
        self.inflight: tuple[int, int, str] | None = None
        self.sent = threading.Event()
        self.stop = threading.Event()
        self.error: str | None = None
        self.full = False
        self.hold = hold
        self.held = threading.Event()
        self._release = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"writer {round_}", daemon=True)

    def start(self) -> "Writer":
        self.thread.start()
        return self

    def go(self) -> None:
        """Let a held stream carry on."""
        self._release.set()

    def written_bytes(self, upto: int | None = None) -> int:
        return sum(c for _s, c, _w in self.done[:upto]) * SECTOR

    def _call(self, line: str) -> dict:
        return control_call(self.sim_control, "kernel", action="shell", message=line)

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            count = self.rng.choice(self.sizes)
            if self.next + count > self.base + self.area:
                self.full = True          # the stream's area is written: it ends (not an error)
                return
            w = (self.next, count, f"r{self.round}w{i}")
            self.inflight = w
            try:
                self.sent.set()
                r = self._call(f"blk write {self.disk} {w[0]} {w[2]} {w[1]}")
            except Exception as e:          # the reply never came in time: the card is gone
                self.error = f"{type(e).__name__}: {e}"
                return
            self.next += count
            if not (r.get("ok") and r.get("succeeded")):
                self.error = r.get("error") or r.get("output")
                return
            self.done.append(w)
            self.inflight = None
            i += 1
            if i % FLUSH_EVERY == 0:
                upto = len(self.done)
                try:
                    r = self._call(f"blk flush {self.disk}")
                except Exception as e:
                    self.error = f"{type(e).__name__}: {e}"
                    return
                if not (r.get("ok") and r.get("succeeded")):
                    self.error = r.get("error") or r.get("output")
                    return
                self.flushed, self.flushes = upto, self.flushes + 1
                if self.flushes == self.hold:
                    self.held.set()
                    while not (self._release.wait(0.05) or self.stop.is_set()):
                        pass


def check_image(img: Path, w: Writer, tally: bool = True) -> int:
    """Compare the stream's area of ``img`` with what the card was told; the bytes that matched.

    With ``tally`` (after a crash) the bytes go to the hardening report as verified or lost.
    """
    with open(img, "rb") as f:
        f.seek(w.base * SECTOR)
        area = f.read(w.area * SECTOR)
    good = bad = 0
    expect: dict[int, bytes] = {}
    for k, (sector, count, word) in enumerate(w.done):
        want = pattern_bytes(word, sector, count)
        got = area[(sector - w.base) * SECTOR:(sector - w.base + count) * SECTOR]
        if got == want:
            good += len(want)
        else:
            lost = sum(got[j:j + SECTOR] != want[j:j + SECTOR] for j in range(0, len(want), SECTOR)) * SECTOR
            bad += lost
            if tally:
                hardening.lost(lost)
        for s in range(count):
            expect[sector + s] = want[s * SECTOR:(s + 1) * SECTOR]
    if tally:
        hardening.verified(good)
    assert bad == 0, f"{bad} bytes the card was told were written are not in the image " \
                     f"({len(w.done)} writes, {w.flushed} flushed)"
    zero = bytes(SECTOR)
    inflight = set()
    if w.inflight is not None:
        sector, count, word = w.inflight
        want = pattern_bytes(word, sector, count)
        for s in range(count):
            inflight.add(sector + s)
            expect[sector + s] = want[s * SECTOR:(s + 1) * SECTOR]
    for s in range(w.base, w.base + w.area):
        got = area[(s - w.base) * SECTOR:(s - w.base + 1) * SECTOR]
        if s in inflight:
            assert got in (expect[s], zero), f"sector {s} of the write in flight is torn or foreign"
        elif s in expect:
            assert got == expect[s], s
        else:
            assert got == zero, f"sector {s}: written though no write the card issued covers it"
    return good
