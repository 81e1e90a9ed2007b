"""The card kernel's log ring in GDDR, laid out for the host's ``log_buf`` reader (spec 3.5, 6.5).

What the host reads (cosm_debugfs.c ``log_buf_show``, :mod:`micdrv.cosm.klog`):
a 32-bit int at the physical address of the ``log_buf_len`` symbol, holding
the buffer's size, and that many bytes at the physical address of
``__log_buf``. Both addresses come from the image (:mod:`.image`) and match
the ``System.map`` generated with it.

The buffer is a character ring like the pre-3.5 Linux ``log_buf``: each line
``[seconds.micros] text\\n`` is written at the write position, wrapping at
the end. One rule makes it readable from outside without any index: the
byte after the newest one is always NUL (the buffer starts zeroed, and every
write ends by storing a NUL after itself), so text after the last NUL is
older than text before it (:func:`micdrv.cosm.klog.log_text`). Lines are cut
to 1024 bytes (printk's LOG_LINE_MAX) and NULs in them become spaces.

Every line also goes to the simulator's own log (stderr), prefixed with the
card's name.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from ..bus import CardFault

if TYPE_CHECKING:
    from ..card import CardSide

log = logging.getLogger("micdrv.sim.card.kernel")

LOG_LINE_MAX = 1024


class KernelLog:
    """``printk`` into card memory."""

    def __init__(self, side: "CardSide", buf_phys: int, buf_len: int, len_phys: int):
        self.side = side
        self.buf_phys, self.buf_len, self.len_phys = buf_phys, buf_len, len_phys
        self._lock = threading.Lock()
        self._pos = 0
        self._t0 = time.monotonic()
        self.lines = 0
        self.bytes = 0
        self.lost = 0  # lines that could not be stored (card memory gone after a reset)
        side.write(buf_phys, bytes(buf_len))
        side.write32(len_phys, buf_len)

    def printk(self, text: str) -> None:
        stamp = time.monotonic() - self._t0
        line = f"[{stamp:12.6f}] {text}".replace("\0", " ").encode("utf-8", "replace")[:LOG_LINE_MAX - 1] + b"\n"
        log.info("card: %s", text)
        with self._lock:
            try:
                self._store(line)
            except CardFault:
                self.lost += 1
                return
            self.lines += 1
            self.bytes += len(line)

    def _store(self, line: bytes) -> None:
        n, size, pos = len(line), self.buf_len, self._pos
        if n >= size:
            line, n = line[-(size - 1):], size - 1
        end = (pos + n) % size
        self.side.write(self.buf_phys + end, b"\0")  # the marker moves first, the text then fills up to it
        first = min(n, size - pos)
        self.side.write(self.buf_phys + pos, line[:first])
        if first < n:
            self.side.write(self.buf_phys, line[first:])
        self._pos = end

    def status(self) -> dict:
        with self._lock:
            return {"lines": self.lines, "bytes": self.bytes, "lost": self.lost, "position": self._pos,
                    "buf_phys": self.buf_phys, "buf_len": self.buf_len, "len_phys": self.len_phys}
