"""The card's interrupt block: 32 sources, cause/enable/auto-clear, MXAR routing, MSI-X/MSI/INTx (spec 1.3, 2.1, 2.3).

Sources are bit numbers (spec 1.3): 0-3 card->host doorbells, 8-15 DMA
channels 0-7, 30 SBOX error. A source is *raised* by the card (a doorbell
request in SDBIC, a DMA STATUS descriptor with its interrupt bit, a channel
error) and sets its bit in SICR0. A cause bit that is set *and* enabled in
SICE0 sends a message, depending on the mode the host chose:

* MSI-X: every vector ``v`` whose MXAR[v] has the bit. A vector masked in
  the MSI-X table, or all of them while the function mask is set, gets its
  PBA bit instead and is sent when unmasked. When a message is sent, cause
  bits that are set in SIAC0 and routed to that vector are cleared
  (auto-clear, "MSI-X only" per spec 2.3).
* MSI: vector 0, for bits set in MXAR[0] -- the upstream host sets MXAR[0]
  bits in MSI mode (spec 1.3); no auto-clear.
* INTx: the line, for any enabled bit, unless the command register's
  INTx-disable bit is set; no auto-clear. Each new cause is one edge on the
  vfio INTx eventfd (automasked by vfio, spec 1.7).

The mode is MSI-X when the MSI-X enable bit is set in config space *or*
the client gave MSI-X vectors eventfds with SET_IRQS, else MSI likewise,
else INTx. A VFIO user never sets the enable bits itself -- kernel vfio-pci
does it when SET_IRQS enables the index (spec 1.7) -- so here, too,
SET_IRQS is what enables MSI-X.

Registers: SICR0 reads the causes and is write-1-to-clear; SICE0 write
sets enable bits and re-evaluates those causes (so an enable, or the
``intr_workarounds`` re-arm, sends a message for a cause already pending);
SICC0 write clears enable bits, reads as SICE0; SIAC0 and MXAR0-15 are
plain read/write; MSIXPBACR: any write clears the whole PBA, reads 0.
The MSI-X table (16 x 16 bytes) and PBA live in BAR4 (:mod:`.identity`);
table entries come out of power-on *unmasked*, because a VFIO user programs
vectors with SET_IRQS and never writes the table (kernel vfio-pci does that
for it). All of these choices are listed in CHOICES (:mod:`micdrv.sim`).

Fault hook: :meth:`InterruptBlock.drop_next` loses the next message(s) of a
source -- nothing is sent and, because nothing was sent, the cause bit stays
set (no auto-clear), so a host that polls SICR0 can still find it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from micdrv.pci.device import INTX, MSI, MSIX, PCI_COMMAND_INTX_DISABLE
from micdrv.pci.vfio_user import ConfigSpace, Interrupts
from micdrv.pci.vfio_user.config_space import PCI_MSIX_FLAGS
from micdrv.x100 import regs

from .identity import MSIX_PBA, MSIX_TABLE, MSIX_VECTORS
from .registers import RegisterFile

log = logging.getLogger(__name__)

MSIX_ENTRY_DWORDS = 4  # address lo, address hi, data, vector control (PCI spec 6.8.2)
MSIX_CTRL_DWORD = 3
MSIX_CTRL_MASKBIT = 1


class InterruptBlock:
    """SICR0/SICE0/SICC0/SIAC0, MXAR0-15, MSIXPBACR, the MSI-X table and PBA, and message delivery."""

    def __init__(self, lock: threading.RLock, config: ConfigSpace, irqs: Callable[[], Interrupts | None]):
        self.lock = lock
        self.config = config
        self._irqs = irqs
        self.sicr = 0
        self.sice = 0
        self.siac = 0
        self.mxar = [0] * regs.MXAR_COUNT
        self.table = [0] * (MSIX_VECTORS * MSIX_ENTRY_DWORDS)
        self.pba = 0
        self._drops = [0] * regs.NUM_INTR_SOURCES
        # counters
        self.raised = [0] * regs.NUM_INTR_SOURCES
        self.sent_msix = [0] * MSIX_VECTORS
        self.sent_msi = 0
        self.sent_intx = 0
        self.dropped = 0
        self.pba_clears = 0
        config.watch(config.msix.offset + PCI_MSIX_FLAGS, 2, self._msix_control_written)

    # --- registers (spec 2.1) -----------------------------------------------------------
    def map_registers(self, rf: RegisterFile) -> None:
        rf.map(regs.SICR0, lambda: self.sicr, self._write_sicr)
        rf.map(regs.SICE0, lambda: self.sice, self._write_sice)
        rf.map(regs.SICC0, lambda: self.sice, self._write_sicc)
        rf.map(regs.SIAC0, lambda: self.siac, self._write_siac)
        for i in range(regs.MXAR_COUNT):
            rf.map_plain(regs.mxar(i), self.mxar, i)
        rf.map(regs.MSIXPBACR, None, self._write_pbacr)
        for i in range(len(self.table)):
            rf.map(MSIX_TABLE + 4 * i, (lambda i=i: self.table[i]), (lambda v, i=i: self._write_table(i, v)))
        rf.map(MSIX_PBA, lambda: self.pba, None)
        rf.map(MSIX_PBA + 4, None, None)

    def _write_sicr(self, value: int) -> None:
        self.sicr &= ~value  # write-1-to-clear: the host writes back what it read (spec 2.3)

    def _write_sice(self, value: int) -> None:
        self.sice |= value
        self._deliver(value & self.sicr)

    def _write_sicc(self, value: int) -> None:
        self.sice &= ~value

    def _write_siac(self, value: int) -> None:
        self.siac = value

    def _write_pbacr(self, value: int) -> None:
        self.pba_clears += 1
        self.pba = 0

    def _write_table(self, i: int, value: int) -> None:
        old = self.table[i]
        self.table[i] = value
        vector, dword = divmod(i, MSIX_ENTRY_DWORDS)
        if dword == MSIX_CTRL_DWORD and old & MSIX_CTRL_MASKBIT and not value & MSIX_CTRL_MASKBIT:
            self._send_pending(1 << vector)

    def _msix_control_written(self, _offset: int, _data: bytes) -> None:
        with self.lock:
            if not self.config.msix_function_masked:
                self._send_pending(self.pba)

    # --- the card's side ------------------------------------------------------------------
    def raise_source(self, source: int) -> None:
        """The card raises interrupt source ``source`` (a bit number, spec 1.3)."""
        if not 0 <= source < regs.NUM_INTR_SOURCES:
            raise ValueError(f"interrupt source {source} out of range")
        with self.lock:
            self.raised[source] += 1
            self.sicr |= 1 << source
            self._deliver(1 << source)

    def drop_next(self, source: int, count: int = 1) -> None:
        """Fault hook: lose the next ``count`` messages of ``source``."""
        if not 0 <= source < regs.NUM_INTR_SOURCES or count < 0:
            raise ValueError(f"interrupt source {source} / count {count} out of range")
        with self.lock:
            self._drops[source] += count

    def reset(self, *, function: bool = False) -> None:
        """Card reset: causes, enables, auto-clear and MXAR lost (spec 2.4 warns of it); the table
        and PBA belong to the PCI function and are reset only by a function reset."""
        with self.lock:
            self.sicr = self.sice = self.siac = 0
            self.mxar[:] = [0] * regs.MXAR_COUNT
            self._drops[:] = [0] * regs.NUM_INTR_SOURCES
            if function:
                self.table[:] = [0] * len(self.table)
                self.pba = 0

    # --- delivery -----------------------------------------------------------------------------
    @property
    def mode(self) -> int:
        """MSIX, MSI or INTX (vfio IRQ index): what the host enabled."""
        irqs = self._irqs()
        if self.config.msix_enabled or irqs is not None and any(irqs.assigned(MSIX)):
            return MSIX
        if self.config.msi_enabled or irqs is not None and any(irqs.assigned(MSI)):
            return MSI
        return INTX

    def _deliver(self, bits: int) -> None:
        """Send messages for the set-and-enabled causes among ``bits`` (card lock held)."""
        bits &= self.sicr & self.sice
        if not bits:
            return
        for source in range(regs.NUM_INTR_SOURCES):
            if bits >> source & 1 and self._drops[source]:
                self._drops[source] -= 1
                self.dropped += 1
                bits &= ~(1 << source)
                log.info("fault hook: dropped the interrupt of source %d", source)
        if not bits:
            return
        mode = self.mode
        if mode == MSIX:
            vectors = 0
            for v in range(MSIX_VECTORS):
                if self.mxar[v] & bits:
                    vectors |= 1 << v
            masked = self._masked_vectors()
            self.pba |= vectors & masked
            self._send_msix(vectors & ~masked)
        elif mode == MSI:
            if self.mxar[0] & bits:
                self._trigger(MSI, 0)
                self.sent_msi += 1
        elif not self.config.command & PCI_COMMAND_INTX_DISABLE:
            self._trigger(INTX, 0)
            self.sent_intx += 1

    def _masked_vectors(self) -> int:
        if self.config.msix_function_masked:
            return (1 << MSIX_VECTORS) - 1
        return sum(1 << v for v in range(MSIX_VECTORS)
                   if self.table[v * MSIX_ENTRY_DWORDS + MSIX_CTRL_DWORD] & MSIX_CTRL_MASKBIT)

    def _send_msix(self, vectors: int) -> None:
        for v in range(MSIX_VECTORS):
            if vectors >> v & 1:
                self._trigger(MSIX, v)
                self.sent_msix[v] += 1
                self.sicr &= ~(self.mxar[v] & self.siac)  # auto-clear when the message is sent

    def _send_pending(self, vectors: int) -> None:
        vectors &= self.pba & ~self._masked_vectors()
        if vectors:
            self.pba &= ~vectors
            self._send_msix(vectors)

    def _trigger(self, index: int, vector: int) -> None:
        irqs = self._irqs()
        if irqs is not None and not irqs.trigger(index, vector):
            log.debug("interrupt %d/%d had no eventfd", index, vector)

    def counters(self) -> dict:
        with self.lock:
            return {"raised": list(self.raised), "msix": list(self.sent_msix), "msi": self.sent_msi,
                    "intx": self.sent_intx, "dropped": self.dropped, "pba": self.pba, "pba_clears": self.pba_clears,
                    "mode": {MSIX: "msix", MSI: "msi", INTX: "intx"}[self.mode], "sicr": self.sicr,
                    "sice": self.sice, "siac": self.siac}
