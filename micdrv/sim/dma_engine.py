"""The DMA engine: 8 channels, their registers, DCR, and a thread per channel (spec 4.1, 4.2, 4.4).

Channel ``ch`` has its registers at BAR4 0x1A000 + 0x40 * ch (spec 4.2):

========= ==========================================================================
DCAR      read/write; bit 25 IM1 masks the interrupt of a host-owned channel,
          bit 24 IM0 that of a card-owned one. A masked STATUS interrupt sets no
          cause bit at all [choice]
DHPR      head: the software writes "descriptors up to here are valid". A write
          with the current value, or >= the ring size, is a DHPR fault (DCHERR,
          channel stopped) [choice; spec 4.4 calls it a hardware error]
DTPR      tail, advanced by the channel after each descriptor; read-only
DRAR_LO/HI the ring (:func:`.dma_descriptors.ring_of`). Writing either half
          restarts the ring: DHPR = DTPR = 0 [choice; the driver reads DTPR
          after writing DRAR and uses it as its head, spec 4.4]
DSTAT     bits 16:0 = DTPR (the completion count the driver uses as tail);
          bits 31:28 = 0x2 "quiesced" while the channel is disabled or in error,
          0 while enabled [choice from spec 4.4: setup fails on the quiesce bit]
DCHERR    error bits (:mod:`.dma_descriptors`); write-1-to-clear, and also
          cleared when the channel is disabled in DCR -- upstream's setup
          never writes DCHERR yet expects it 0 after disable + re-enable
          [choice]
DCHERRMSK read/write; error bits not masked here also raise interrupt source 30
          (SBOX error, spec 1.3) [choice]
others    0x0C, 0x10, 0x1C, 0x24, 0x28 (spec 10: unreferenced) read 0
========= ==========================================================================

DCR (BAR4 0x1A280): follow the code, not the comment (spec 4.2): bit 2n =
owner (1 host, 0 card), bit 2n+1 = enable. After reset DCR = 0x55: channels
0-3 host-owned (the host "relies on the reset/bootstrap default"), 4-7
card-owned, all disabled [choice].

Execution: each channel has a thread that sleeps until DHPR, DCR or a
fault-hook release wakes it, then runs descriptors from DTPR up to DHPR,
fetching them in batches from the ring (host rings through the SMPT) and
advancing DTPR after each, with large copies made without the GIL so
channels copy in parallel. A batch of at most :data:`INLINE_DESCRIPTORS`
descriptors moving at most :data:`INLINE_BYTES` instead runs right in the
DHPR write when the channel thread is idle, copying with the GIL held. This
is for speed, measured on a 2-core machine: handing work to a thread costs a
wake-up and GIL hand-offs (tens of microseconds on a VM), more than a 64-byte
copy -- the latency the driver's small VOP copies see -- and a stream of 1 MiB
copies ran at 0.3-0.45 of memcpy through the threads, 0.5-0.8 inline. The
price is that a register access queued behind DHPR writes waits for their
inline batches: at most about 250-400 us per doorbell for the bytes (4 MiB
at memcpy speed) plus a few microseconds of Python per descriptor. The byte
limit covers a VOP net queue's whole batch of 64 KiB frames (64 chains, 4
MB, or a receive queue's gathered 1-1.6 MB): with a 1 MiB limit those went
to the thread, and its wake-up, GIL hand-offs with the server thread (where
the card OS's NAPI poll runs too) and per-descriptor commits cost the
simulator 35-38 us of CPU per 64000-byte echo against 27-30 inline
(alternated runs; sequential blk unchanged within the noise). It stays
under the engine driver's spread size (8 MiB parts, ``micdrv.x100.dma``),
so a copy spread over channels still copies on their threads in parallel.
The count
limit sits well above the host driver's common batch, 32 requests plus its
STATUS descriptor(s): at 32 those 33-34 descriptor batches of every net echo
and blk randread burst all went to the thread, and letting them run inline
cut the simulator's CPU per 4 KiB random read from 37-40 to 30 us and
raised the IOPS from 11.5 k to 14.4 k (A/B on this machine).
Larger batches go to the thread, so a long copy never holds up the vfio-user
server thread. Copies move directly between the GDDR memfd and the host's
DMA memfd (:meth:`~.bus.CardBus.copy`). A STATUS descriptor with bit 59
raises source 8 + ch after DTPR has moved past it, so the interrupt handler
sees it done.

A bad descriptor (or ring) sets DCHERR, stops the channel with DTPR at the
bad descriptor, and never stops the simulator. The channel runs again after
the host reinitialises it: disable in DCR, clear DCHERR, rewrite DRAR,
enable.

Fault hook: :meth:`DmaChannel.stall` stops a channel consuming descriptors
(after the one in progress) until released.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from micdrv.x100 import regs

from .bus import CardBus
from .dma_descriptors import ERR_DHPR, ERROR_NAMES, DescriptorError, Ring, execute, fetch, ring_of
from .interrupts import InterruptBlock
from .registers import RegisterFile

log = logging.getLogger(__name__)

DCR_RESET = sum(regs.dcr_owner_bit(ch) for ch in regs.DMA_HOST_CHANNELS)  # 0x55
DSTAT_QUIESCED = regs.DSTAT_QUIESCED
FETCH_BATCH = 256  # descriptors read from the ring at a time
# A batch of at most INLINE_DESCRIPTORS descriptors moving at most INLINE_BYTES
# runs in the DHPR write itself (see the module docstring for the measurements).
INLINE_DESCRIPTORS = 128
INLINE_BYTES = 4 << 20
_TYPE_SHIFT, _MEMCPY = regs.DESC_TYPE_SHIFT, regs.DESC_MEMCPY  # spec 4.3: qw1 bits 63:60
_LEN_SHIFT, _LEN_MASK = regs.DESC_LEN_SHIFT, regs.DESC_LEN_MASK  # qw0 bits 59:46, length / 64


class DmaChannel:
    """One channel: registers, state and its thread."""

    def __init__(self, engine: "DmaEngine", ch: int):
        self.engine = engine
        self.ch = ch
        self.lock = engine.lock
        self.dcar = self.dhpr = self.dtpr = self.drar_lo = self.drar_hi = self.dcherr = self.dcherrmsk = 0
        self.ring: Ring = ring_of(0, 0)  # decoded DRAR, kept in step with DRAR_LO/HI
        self._enable_bit = regs.dcr_enable_bit(ch)
        self.epoch = 0  # bumped whenever in-flight work must not commit (reset, new ring)
        self.stalled = False
        self._closing = False
        self._busy = False  # the channel thread is between a snapshot and its last commit
        self.inline_batches = 0
        self.descriptors = 0
        self.bytes = 0
        self.errors = 0
        self.last_error = ""
        # Waking the thread: a C-level queue (an Event is Python code on both
        # sides) and a flag so a burst of DHPR writes queues one kick, not many.
        self._kicks: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._kicked = False
        self._thread = threading.Thread(target=self._run, name=f"dma ch{ch}", daemon=True)
        self._thread.start()

    # --- registers ----------------------------------------------------------------------
    def map_registers(self, rf: RegisterFile) -> None:
        r = lambda reg: regs.dma_reg(self.ch, reg)  # noqa: E731
        rf.map(r(regs.DCAR), lambda: self.dcar, self._write_dcar)
        rf.map(r(regs.DHPR), lambda: self.dhpr, self._write_dhpr)
        rf.map(r(regs.DTPR), lambda: self.dtpr, None)
        rf.map(r(regs.DRAR_LO), lambda: self.drar_lo, self._write_drar_lo)
        rf.map(r(regs.DRAR_HI), lambda: self.drar_hi, self._write_drar_hi)
        rf.map(r(regs.DSTAT), self._read_dstat, None)
        rf.map(r(regs.DCHERR), lambda: self.dcherr, self._write_dcherr)
        rf.map(r(regs.DCHERRMSK), lambda: self.dcherrmsk, self._write_dcherrmsk)

    def _write_dcar(self, value: int) -> None:
        self.dcar = value

    def _write_dhpr(self, value: int) -> None:
        size = self.ring.size
        if value == self.dhpr:
            self.fail(self.epoch, ERR_DHPR, f"DHPR written with its current value {value}: the hardware would "
                                            "take the ring as filled (spec 4.4)")
        elif value >= size:
            self.fail(self.epoch, ERR_DHPR, f"DHPR {value} is outside the {size}-descriptor ring")
        else:
            self.dhpr = value
            if not self._run_inline():
                self._kick()

    def _write_drar_lo(self, value: int) -> None:
        self.drar_lo = value
        self._restart_ring()

    def _write_drar_hi(self, value: int) -> None:
        self.drar_hi = value
        self._restart_ring()

    def _restart_ring(self) -> None:
        self.epoch += 1
        self.dhpr = self.dtpr = 0
        self.ring = ring_of(self.drar_lo, self.drar_hi)

    def _read_dstat(self) -> int:
        quiesced = not self.enabled or self.dcherr
        return (self.dtpr & regs.DSTAT_COUNT_MASK) | (DSTAT_QUIESCED if quiesced else 0)

    def _write_dcherr(self, value: int) -> None:
        self.dcherr &= ~value  # write-1-to-clear

    def _write_dcherrmsk(self, value: int) -> None:
        self.dcherrmsk = value

    # --- state ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.engine.enabled(self.ch)

    def _runnable(self) -> bool:
        return bool(self.engine.dcr & self._enable_bit) and not self.dcherr and not self.stalled and \
            not self._closing and self.dtpr != self.dhpr

    def enable_changed(self, enabled: bool) -> None:
        """DCR changed this channel's enable bit (card lock held)."""
        if enabled:
            self._kick()
        else:
            self.dcherr = 0

    def reset(self) -> None:
        """Card reset: registers to 0, in-flight work discarded (card lock held)."""
        self.epoch += 1
        self.dcar = self.dhpr = self.dtpr = self.drar_lo = self.drar_hi = self.dcherr = self.dcherrmsk = 0
        self.ring = ring_of(0, 0)
        self.stalled = False

    def stall(self, stalled: bool) -> None:
        """Fault hook: stop (True) or resume (False) consuming descriptors."""
        with self.lock:
            self.stalled = stalled
        if not stalled:
            self._kick()

    def fail(self, epoch: int, bits: int, detail: str) -> None:
        """Stop the channel with DCHERR |= bits (unless the work belongs to an old epoch)."""
        with self.lock:
            if epoch != self.epoch:
                return
            self.dcherr |= bits
            self.errors += 1
            self.last_error = f"ch{self.ch} DTPR {self.dtpr}: {detail}"
            log.warning("DMA channel error: %s", self.last_error)
            if bits & ~self.dcherrmsk:
                self.engine.interrupts.raise_source(regs.INTR_ERR_START)

    # --- the channel thread ----------------------------------------------------------------
    def _kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            self._kicks.put(None)

    def _run(self) -> None:
        while True:
            self._kicks.get()
            self._kicked = False  # a kick from here on queues another round
            if self._closing:
                return
            try:
                self._drain()
            except Exception:  # a bug here must not kill the channel thread
                log.exception("DMA channel %d: unexpected failure", self.ch)

    def _drain(self) -> None:
        engine = self.engine
        try:
            while True:
                with self.lock:
                    if not self._runnable():
                        return
                    self._busy = True
                    epoch, tail, head, ring = self.epoch, self.dtpr, self.dhpr, self.ring
                    host_owned = engine.host_owned(self.ch)
                try:
                    ring.check()
                    count = min((head - tail) % ring.size, FETCH_BATCH, ring.size - tail)
                    batch = fetch(engine.bus, ring, tail, count)
                except DescriptorError as e:
                    self.fail(epoch, e.bits, str(e))
                    return
                if not self._run_batch(epoch, tail, ring, host_owned, batch):
                    return
        finally:
            with self.lock:
                self._busy = False

    def _run_inline(self) -> bool:
        """Run a small batch here, in the DHPR writer's thread (card lock held); False: leave it to the thread.

        The card lock is held from the fetch to the last descriptor, so no
        register read can see DTPR in between: it moves once, at the end --
        and wherever the channel thread would have left it before anything
        can look, namely before a STATUS interrupt and at a bad descriptor.
        """
        ring = self.ring
        size = ring.size
        if self._busy or not size or not self._runnable():
            return False
        tail = self.dtpr
        count = (self.dhpr - tail) % size
        if count > INLINE_DESCRIPTORS:
            return False
        bus = self.engine.bus
        epoch = self.epoch
        try:
            ring.check()
            if tail + count <= size:
                batch = fetch(bus, ring, tail, count)
            else:
                batch = fetch(bus, ring, tail, size - tail) + fetch(bus, ring, 0, tail + count - size)
        except DescriptorError as e:
            self.fail(epoch, e.bits, str(e))
            return True
        nbytes = 0
        for qw0, qw1 in batch:
            if qw1 >> _TYPE_SHIFT == _MEMCPY:
                nbytes += (qw0 >> _LEN_SHIFT & _LEN_MASK) << 6  # 64-byte units (spec 4.3)
        if nbytes > INLINE_BYTES:
            return False
        self.inline_batches += 1
        engine = self.engine
        enable_bit = self._enable_bit
        host_owned = engine.host_owned(self.ch)
        max_xfer = regs.DMA_HOST_MAX_XFER if host_owned else regs.DMA_CARD_MAX_XFER
        index = tail
        done = moved = 0
        for qw0, qw1 in batch:
            try:
                # Holding the GIL: releasing it for the large copies here was measured slower (VOP blk write
                # 0.55-1.0 GB/s against 0.9-1.3, the same CPU per GB) -- the server thread then waits for
                # the GIL to come back, behind a busy card OS thread, and every DMA completion with it.
                n, interrupt = execute(bus, qw0, qw1, max_xfer, False)
            except DescriptorError as e:
                self.dtpr = index
                self.descriptors += done
                self.bytes += moved
                self.fail(epoch, e.bits, f"descriptor {index}: {e}")
                return True
            index += 1
            if index == size:
                index = 0
            done += 1
            moved += n
            if interrupt:
                self.dtpr = index
                self._interrupt(host_owned)
            if epoch != self.epoch:
                return True  # the descriptor reset the channel (a STATUS store into its registers)
            if not engine.dcr & enable_bit or self.dcherr or self.stalled:
                break  # ... or stopped it: the rest waits, as in the channel thread
        self.dtpr = index
        self.descriptors += done
        self.bytes += moved
        return True

    def _run_batch(self, epoch: int, tail: int, ring: Ring, host_owned: bool, batch: list[tuple[int, int]]) -> bool:
        """Execute descriptors tail, tail+1, ... (mod ring size); False once the channel must stop."""
        max_xfer = regs.DMA_HOST_MAX_XFER if host_owned else regs.DMA_CARD_MAX_XFER
        bus = self.engine.bus
        engine = self.engine
        size = ring.size
        index = tail
        for qw0, qw1 in batch:
            try:
                nbytes, interrupt = execute(bus, qw0, qw1, max_xfer, True)
            except DescriptorError as e:
                self.fail(epoch, e.bits, f"descriptor {index}: {e}")
                return False
            index += 1
            if index == size:
                index = 0
            with self.lock:  # commit: DTPR moves past the descriptor, then its interrupt (C27)
                if epoch != self.epoch:
                    return False
                self.dtpr = index
                self.descriptors += 1
                self.bytes += nbytes
                if interrupt:
                    self._interrupt(host_owned)
                if not engine.dcr & self._enable_bit or self.dcherr or self.stalled or self._closing or \
                        index == self.dhpr:
                    return False
        return True

    def _interrupt(self, host_owned: bool) -> None:
        """The channel interrupt, source 8 + ch (spec 1.3), unless DCAR masks it (card lock held)."""
        if self.dcar & (regs.DCAR_IM1 if host_owned else regs.DCAR_IM0):
            self.engine.masked_interrupts += 1
            return
        self.engine.interrupts.raise_source(regs.INTR_DMA_START + self.ch)
        if not host_owned and self.engine.card_interrupt is not None:
            self.engine.card_interrupt(self.ch)

    def close(self) -> None:
        self._closing = True
        self._kick()
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)

    def counters(self) -> dict:
        with self.lock:
            return {"enabled": self.enabled, "owner": "host" if self.engine.host_owned(self.ch) else "card",
                    "stalled": self.stalled, "dhpr": self.dhpr, "dtpr": self.dtpr, "dcherr": self.dcherr,
                    "errors": self.errors, "last_error": self.last_error, "descriptors": self.descriptors,
                    "bytes": self.bytes, "inline_batches": self.inline_batches, "error_names": [n for b, n in ERROR_NAMES.items() if self.dcherr & b]}


class DmaEngine:
    """DCR and the 8 channels."""

    def __init__(self, lock: threading.RLock, bus: CardBus, interrupts: InterruptBlock):
        self.lock = lock
        self.bus = bus
        self.interrupts = interrupts
        self.dcr = DCR_RESET
        self.masked_interrupts = 0
        #: Card software's handler for card-owned channel interrupts, ``card_interrupt(ch)`` (card lock held:
        #: it must only note the event, e.g. set an Event).
        self.card_interrupt: Callable[[int], None] | None = None
        self.channels = [DmaChannel(self, ch) for ch in range(regs.DMA_NUM_CHANNELS)]

    def map_registers(self, rf: RegisterFile) -> None:
        rf.map(regs.DCR, lambda: self.dcr, self._write_dcr)
        for c in self.channels:
            c.map_registers(rf)

    def enabled(self, ch: int) -> bool:
        return bool(self.dcr & regs.dcr_enable_bit(ch))

    def host_owned(self, ch: int) -> bool:
        return bool(self.dcr & regs.dcr_owner_bit(ch))

    def _write_dcr(self, value: int) -> None:
        old, self.dcr = self.dcr, value
        for c in self.channels:
            bit = regs.dcr_enable_bit(c.ch)
            if (old ^ value) & bit:
                c.enable_changed(bool(value & bit))

    def reset(self) -> None:
        with self.lock:
            self.dcr = DCR_RESET
            for c in self.channels:
                c.reset()

    def close(self) -> None:
        for c in self.channels:
            c.close()

    def counters(self) -> dict:
        with self.lock:
            return {"dcr": self.dcr, "masked_interrupts": self.masked_interrupts,
                    "channels": [c.counters() for c in self.channels]}
