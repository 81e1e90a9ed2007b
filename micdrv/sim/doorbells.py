"""Doorbells in both directions: SDBIC (card->host), APICICR and RDMASR (host->card) (spec 2.1, 2.3).

Card -> host, doorbells 0-3: card software writes 0x80000000 (DBREQ) to
SDBIC[db]; that raises interrupt source ``db`` (SICR0 bit db), which the
interrupt block routes through MXAR (:mod:`.interrupts`). SDBIC reads 0: the
request bit is consumed when the interrupt is raised [choice]. A write
without DBREQ does nothing.

Host -> card, doorbells 0-15 (``send_intr``, spec 2.3):

* db 0-7: the host reads the low dword of APICICR[db], ORs in bit 13
  ("send") and writes it back. Every low-dword write with bit 13 set sends
  one IPI; the register keeps the written value with bit 13 cleared (the
  send bit is self-clearing, as an APIC ICR's delivery status is), so the
  next read-modify-write sends again. The high dword (destination) is plain
  read/write.
* db 8-15: any write to RDMASR[db - 8] rings doorbell db (the host writes
  0); the value written is kept and reads back.

What an IPI means depends on the card: before the card OS runs, APICICR
sends go to the bootstrap, which only acts on the boot kick (vector 229 on
APICICR7 to its APIC ID, spec 3.2 step 10; :mod:`.bootstrap`). Once the
card OS runs they, and RDMASR writes, are card doorbells delivered to the
handler card software registered for that doorbell
(:meth:`CardDoorbells.request`), by default in a dispatcher thread (a
threaded interrupt) so the host's register write returns at once. A handler
requested ``inline`` runs right after the host's write instead, in the
thread that took it, once the card lock is released
(:meth:`CardDoorbells.posted`; the write is posted, nobody waits for it,
spec 2.3) -- the card CPU taking the interrupt, with no thread woken in
between; a ring of it from anywhere else (a DMA STATUS store into the
registers) still goes to the dispatcher. Handlers run one at a time
wherever they run, in the order each source rang; a ring queued before a
card reset is dropped (its epoch is gone); a handler that raises is counted
and logged. A doorbell with no handler is counted as unhandled.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from micdrv.x100 import regs

from .interrupts import InterruptBlock
from .registers import RegisterFile

log = logging.getLogger(__name__)

Handler = Callable[[int], None]
# (APICICR index, low dword, high dword) -> True if it was a card doorbell
IpiSink = Callable[[int, int, int], bool]


class CardDoorbells:
    """Host->card doorbells 0-15 as card software sees them: handlers, where they run, counters."""

    def __init__(self):
        self._handlers: dict[int, Handler] = {}
        self._inline: set[int] = set()     # doorbells whose handler runs after the host's write, in its thread
        self._users = [0] * regs.NUM_CARD_DOORBELLS
        self._lock = threading.Lock()
        self._running = threading.Lock()   # held while a handler runs: one at a time, wherever
        self._here = threading.local()     # .pending: rings to deliver after the write in progress (posted)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._epoch = 0
        self.rung = [0] * regs.NUM_CARD_DOORBELLS
        self.unhandled = 0
        self.handler_errors = 0
        self._thread = threading.Thread(target=self._run, name="card doorbells", daemon=True)
        self._thread.start()

    def request(self, db: int, handler: Handler, inline: bool = False) -> None:
        """Card software: call ``handler(db)`` whenever the host rings ``db`` (never under the card lock): in
        the dispatcher thread, or with ``inline`` right after the host's write, in the thread that took it."""
        if not 0 <= db < regs.NUM_CARD_DOORBELLS:
            raise ValueError(f"card doorbell {db} out of range 0..15")
        with self._lock:
            self._handlers[db] = handler
            self._users[db] += 1
            if inline:
                self._inline.add(db)
            else:
                self._inline.discard(db)

    def free(self, db: int) -> None:
        with self._lock:
            self._handlers.pop(db, None)
            self._inline.discard(db)

    def least_used(self) -> int:
        """The doorbell used least so far, lowest number first ("least-used of 16", spec 2.3)."""
        with self._lock:
            return min(range(regs.NUM_CARD_DOORBELLS), key=lambda db: (self._users[db], db))

    def ring(self, db: int) -> None:
        """``db`` was rung (called under the card lock: only note it)."""
        with self._lock:
            self.rung[db] += 1
            epoch = self._epoch
            inline = db in self._inline
        pending = getattr(self._here, "pending", None) if inline else None
        if pending is not None:
            pending.append((epoch, db))
        else:
            self._queue.put((epoch, db))

    def posted(self, write: Callable, *args) -> None:
        """``write(*args)`` (a host register write, taking the card lock itself), then the handlers of the
        doorbells it rang, here."""
        self._here.pending = pending = []
        try:
            write(*args)
        finally:
            self._here.pending = None
            for epoch, db in pending:
                self._deliver(epoch, db)

    def reset(self) -> None:
        """Card reset: card software is gone with its handlers; queued rings are dropped."""
        with self._lock:
            self._handlers.clear()
            self._inline.clear()
            self._users = [0] * regs.NUM_CARD_DOORBELLS
            self._epoch += 1

    def close(self) -> None:
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._deliver(*item)

    def _deliver(self, epoch: int, db: int) -> None:
        with self._running:
            with self._lock:
                handler = self._handlers.get(db) if epoch == self._epoch else None
                if handler is None:
                    self.unhandled += 1
            if handler is None:
                return
            try:
                handler(db)
            except Exception:
                self.handler_errors += 1
                log.exception("card doorbell %d handler failed", db)

    def counters(self) -> dict:
        with self._lock:
            return {"rung": list(self.rung), "unhandled": self.unhandled, "handler_errors": self.handler_errors,
                    "handlers": sorted(self._handlers)}


class DoorbellRegisters:
    """SDBIC0-3, APICICR0-7 and RDMASR0-7."""

    def __init__(self, interrupts: InterruptBlock, ipi: IpiSink, card: CardDoorbells):
        self.interrupts = interrupts
        self._ipi = ipi
        self.card = card
        self.apicicr_lo = [0] * regs.APICICR_COUNT
        self.apicicr_hi = [0] * regs.APICICR_COUNT
        self.rdmasr = [0] * regs.RDMASR_COUNT
        self.host_rung = [0] * regs.SDBIC_COUNT  # card->host doorbell requests

    def map_registers(self, rf: RegisterFile) -> None:
        for db in range(regs.SDBIC_COUNT):
            rf.map(regs.sdbic(db), None, lambda v, db=db: self._write_sdbic(db, v))
        for n in range(regs.APICICR_COUNT):
            rf.map(regs.apicicr(n), lambda n=n: self.apicicr_lo[n], lambda v, n=n: self._write_icr_lo(n, v))
            rf.map_plain(regs.apicicr(n) + 4, self.apicicr_hi, n)
        for n in range(regs.RDMASR_COUNT):
            rf.map(regs.rdmasr(n), lambda n=n: self.rdmasr[n], lambda v, n=n: self._write_rdmasr(n, v))

    def reset(self) -> None:
        self.apicicr_lo[:] = [0] * regs.APICICR_COUNT
        self.apicicr_hi[:] = [0] * regs.APICICR_COUNT
        self.rdmasr[:] = [0] * regs.RDMASR_COUNT

    def _write_sdbic(self, db: int, value: int) -> None:
        if value & regs.SDBIC_DBREQ:
            self.host_rung[db] += 1
            self.interrupts.raise_source(regs.INTR_DB_START + db)

    def _write_icr_lo(self, n: int, value: int) -> None:
        self.apicicr_lo[n] = value & ~regs.APICICR_SEND
        if value & regs.APICICR_SEND and self._ipi(n, value, self.apicicr_hi[n]):
            self.card.ring(n)

    def _write_rdmasr(self, n: int, value: int) -> None:
        self.rdmasr[n] = value
        self.card.ring(regs.NUM_SBOX_IRQ + n)

    def counters(self) -> dict:
        return {"host_rung": list(self.host_rung), **self.card.counters()}
