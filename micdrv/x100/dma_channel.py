"""One host-owned DMA channel: its ring, setup, submission, completion, errors (spec 4.2-4.4).

The ring lives in the DmaArena and the card reaches it through the SMPT
(DRAR_HI "system memory", spec 4.2). Software fills descriptors at ``head``
and writes DHPR = the new head; the engine executes up to there. Every
submission ends with a STATUS descriptor that stores the submission's
sequence number into the channel's 64-byte status word in the arena, so
completion is a load from host memory, never a register read: :meth:`poll`
compares that word with the sequence numbers of what is pending and retires
every submission up to it, which also frees its ring slots. A submission
asked to interrupt carries two STATUS descriptors, the second with the
interrupt bit -- the ``DMA_PREP_INTERRUPT`` hardware quirk (spec 4.4).

Rules from the kernel driver kept here:

* one ring slot always stays empty, so head == tail means empty
  (``mic_dma_ring_count``);
* DHPR is never written twice with the same value (the hardware would take
  it for a full ring, spec 4.4) -- every write advances it by at least one;
* setup order: disable, mask, DCHERRMSK = 0, DRAR, head = DTPR, unmask,
  enable, then -EBUSY if DCHERR != 0 or DSTAT says quiesced.

When the engine stops on a bad descriptor, DCHERR becomes non-zero and the
channel stops advancing. :meth:`check` (a register read, so it is done only
while something waits) turns that into a
:class:`~micdrv.x100.errors.DmaChannelError` naming the channel and the ring
index of the descriptor the hardware stopped at (DSTAT bits 16:0), fails
every submission not yet retired, and refuses new work until :meth:`reinit`
programs the channel again from the hardware's tail. The driver assumes
[INF] that a channel re-programmed with DRAR holds nothing beyond DTPR, as
the kernel's setup implies by taking ``head = DTPR``.
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, NamedTuple

from ..pci import DmaArena
from . import dma_desc, regs
from .errors import DmaChannelBusy, DmaChannelError, DmaError
from .mmio import Registers
from .smpt import Smpt

if TYPE_CHECKING:
    from .dma import DmaCompletion

STATUS_BYTES = 64  # the channel's status_dest buffer is one cache line (spec 4.4)


class _Pending(NamedTuple):
    seq: int  # the value the submission's STATUS descriptor stores
    end: int  # ring index just past its last descriptor
    completion: "DmaCompletion"


class DmaChannel:
    """Host DMA channel ``ch`` (0..3) of one card, with a ring of ``ring_size`` descriptors."""

    def __init__(self, registers: Registers, arena: DmaArena, smpt: Smpt, ch: int, ring_size: int,
                 dcr_lock: threading.Lock):
        if ch not in regs.DMA_HOST_CHANNELS:
            raise ValueError(f"DMA channel {ch} is not a host channel (spec 4.1: 0..3)")
        dma_desc.check_ring_size(ring_size)
        self.ch = ch
        self.ring_size = ring_size
        self._regs = registers
        self._arena = arena
        self._dcr_lock = dcr_lock
        self._lock = threading.Lock()
        self._ring_alloc = arena.alloc(ring_size * regs.DMA_DESC_SIZE, align=4096)
        self._status_alloc = arena.alloc(STATUS_BYTES, align=STATUS_BYTES)
        self._ring = arena.buf(self._ring_alloc).cast("Q")  # qw0, qw1 of descriptor i at 2i, 2i+1
        self._status = arena.buf(self._status_alloc).cast("Q")
        self.ring_card = smpt.to_card(arena.iova(self._ring_alloc), self._ring_alloc.size)
        self.status_card = smpt.to_card(arena.iova(self._status_alloc), 8)
        self._status_qw1 = dma_desc.status_desc(self.status_card, 0)[1]
        self._reg = {name: regs.dma_reg(ch, off) for name, off in
                     (("DCAR", regs.DCAR), ("DHPR", regs.DHPR), ("DTPR", regs.DTPR), ("DRAR_LO", regs.DRAR_LO),
                      ("DRAR_HI", regs.DRAR_HI), ("DSTAT", regs.DSTAT), ("DCHERR", regs.DCHERR),
                      ("DCHERRMSK", regs.DCHERRMSK))}
        self._dhpr = self._reg["DHPR"]
        self.head = 0  # next slot software fills
        self.tail = 0  # first slot not yet retired
        self._last_dhpr: int | None = None
        self.seq = 0  # sequence number of the last submission
        self._seen = 0  # last status value poll() acted on
        self._pending: collections.deque[_Pending] = collections.deque()
        self.error: DmaChannelError | None = None
        self.ready = False
        # counters for the daemon's metrics
        self.submitted = 0
        self.descriptors = 0
        self.bytes = 0
        self.interrupts = 0

    # --- setup (spec 4.4) -------------------------------------------------------------------
    def setup(self) -> None:
        """``mic_dma_chan_setup`` for a host channel; :class:`DmaChannelBusy` if the engine refuses it.

        Work still pending (after a card reset, say) can no longer complete
        and fails with the channel's error, or a :class:`DmaError`.
        """
        r, reg = self._regs, self._reg
        self._fail_pending(self.error or DmaError(f"DMA channel {self.ch}", "channel re-programmed with work pending"))
        with self._lock:
            self._disable()
            r.set_bits(reg["DCAR"], regs.DCAR_IM1)  # mask the host-owned channel's interrupt
            r.write(reg["DCHERRMSK"], 0)
            lo, hi = dma_desc.drar_host(self.ring_card, self.ring_size)
            r.write(reg["DRAR_LO"], lo)
            r.write(reg["DRAR_HI"], hi)
            tail = r.read(reg["DTPR"]) % self.ring_size
            self.head = self.tail = tail
            self._last_dhpr = tail  # what DHPR holds now, by the assumption in the module docstring
            self._status[0] = self.seq  # everything issued before is settled (retired or failed)
            self._seen = self.seq
            r.clear_bits(reg["DCAR"], regs.DCAR_IM1)
            with self._dcr_lock:
                r.set_bits(regs.DCR, regs.dcr_enable_bit(self.ch))
            err, stat = r.read(reg["DCHERR"]), r.read(reg["DSTAT"])
            if err or stat & regs.DSTAT_QUIESCED:
                self._disable()
                r.set_bits(reg["DCAR"], regs.DCAR_IM1)
                self.ready = False
                raise DmaChannelBusy(self.ch, f"DCHERR={err:#x} DSTAT={stat:#x} after enabling")
            self.error = None
            self.ready = True

    def _disable(self) -> None:
        with self._dcr_lock:
            self._regs.clear_bits(regs.DCR, regs.dcr_enable_bit(self.ch))

    def _fail_pending(self, exc: Exception) -> None:
        with self._lock:
            failed = list(self._pending)
            self._pending.clear()
        for p in failed:
            p.completion._fail(exc)

    def shutdown(self) -> None:
        """Disable the channel and mask its interrupt; pending work fails."""
        try:
            with self._lock:
                self.ready = False
                self._disable()
                self._regs.set_bits(self._reg["DCAR"], regs.DCAR_IM1)
        finally:   # a card that cannot be reached any more still fails its waiters
            self._fail_pending(DmaError(f"DMA channel {self.ch}", "channel shut down with work pending"))

    def reinit(self) -> None:
        """Recover from a channel error: fail what is pending, then program the channel again (:meth:`setup`)."""
        self.setup()

    # --- submission --------------------------------------------------------------------------
    def space(self) -> int:
        return dma_desc.ring_space(self.head, self.tail, self.ring_size)

    @property
    def max_batch(self) -> int:
        """Most descriptors one submission may hold (two ring slots stay for STATUS, one stays empty)."""
        return self.ring_size - 3

    def try_submit(self, descs: list[tuple[int, int]], completion: "DmaCompletion", interrupt: bool,
                   nbytes: int = 0) -> bool:
        """Queue ``descs`` plus the closing STATUS descriptor(s) and ring DHPR.

        Returns False, queueing nothing, when the ring lacks space (the
        caller polls and retries). Raises the channel's error if it has one.
        """
        need = len(descs) + (2 if interrupt else 1)
        with self._lock:
            if self.error is not None:
                raise self.error.again()
            if not self.ready:
                raise DmaError(f"DMA channel {self.ch}", "channel is not set up")
            size = self.ring_size
            head = self.head
            if size - 1 - (head - self.tail) % size < need:
                return False
            ring = self._ring
            for q0, q1 in descs:
                ring[2 * head] = q0
                ring[2 * head + 1] = q1
                head += 1
                if head == size:
                    head = 0
            seq = self.seq + 1
            # STATUS: store seq at the channel's status word (spec 4.3); with an interrupt, the
            # DMA_PREP_INTERRUPT pair: the same store twice, the second raising it (spec 4.4)
            ring[2 * head] = seq
            ring[2 * head + 1] = self._status_qw1
            head += 1
            if head == size:
                head = 0
            if interrupt:
                ring[2 * head] = seq
                ring[2 * head + 1] = self._status_qw1 | regs.DESC_STATUS_INTR
                head += 1
                if head == size:
                    head = 0
            if head != self._last_dhpr:  # always true (need >= 1, < size); kept as the rule's guard
                self._regs.write(self._dhpr, head)  # the doorbell first: the rest overlaps the card's work
                self._last_dhpr = head
            self.seq = seq
            self.head = head
            self._pending.append(_Pending(seq, head, completion))  # poll() takes the lock: it cannot miss it
            self.submitted += 1
            self.descriptors += need
            self.bytes += nbytes
        return True

    # --- completion ----------------------------------------------------------------------
    def poll(self) -> int:
        """Retire submissions whose STATUS has been stored; returns how many completed."""
        if self._status[0] == self._seen:
            return 0
        done = []
        with self._lock:
            value = self._status[0]
            pending = self._pending
            while pending and pending[0].seq <= value:
                p = pending.popleft()
                self.tail = p.end
                done.append(p.completion)
            self._seen = value
        for c in done:
            c._part_done()
        return len(done)

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def check(self) -> DmaChannelError | None:
        """Read DCHERR; on an error, retire what finished, fail the rest and return the error."""
        if self.error is not None:
            return self.error
        if not self._regs.read(self._reg["DCHERR"]):
            return None
        self.poll()
        with self._lock:
            if self.error is not None:
                return self.error
            err = self._regs.read(self._reg["DCHERR"])
            index = (self._regs.read(self._reg["DSTAT"]) & regs.DSTAT_COUNT_MASK) % self.ring_size
            text = str(dma_desc.decode(self._ring[2 * index], self._ring[2 * index + 1]))
            self.error = DmaChannelError(self.ch, index, err, text)
            self.ready = False
            failed = list(self._pending)
            self._pending.clear()
        for p in failed:
            p.completion._fail(self.error)
        return self.error

    def on_interrupt(self) -> None:
        """The channel's interrupt callback (SICR0 bit 8 + ch through MXAR, spec 4.4)."""
        self.interrupts += 1
        self.poll()
        if self._pending:
            self.check()

    def close(self) -> None:
        self._ring.release()
        self._status.release()
        self._arena.free(self._ring_alloc)
        self._arena.free(self._status_alloc)
