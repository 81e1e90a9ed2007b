"""Card-to-host interrupts: modes, MXAR routing, enable/ack/workarounds, dispatch (spec 1.3, 2.3).

The card raises 32 interrupt *sources* (bits of SICR0): doorbells 0..3 at
offsets 0..3, DMA channels 0..7 at offsets 8..15, the SBOX error at 30. The
MXAR registers route sources to MSI-X vectors: bit k of MXAR[entry] sends
source k to vector ``entry``.

Setup (``mic_setup_interrupts``) tries, in order:

* **MSI-X** with exactly :data:`~micdrv.x100.regs.MIN_MSIX` = 9 vectors on
  eventfds. Every :meth:`Interrupts.request` takes the first vector whose
  source bitmap is empty (one requester per vector), records bit ``offset``
  and sets it in MXAR[entry]. SIAC0 auto-clears SICR0 as the message is sent.
* **MSI**, one vector: requesters go on per-offset callback lists and MXAR[0]
  gets their bit. One shared handler reads SICR0, writes the value back
  (write-1-to-clear) and calls **only doorbell offsets 0..3** -- DMA
  callbacks are never called in this mode, as upstream (spec 1.3).
* **INTx**: as MSI, with no MXAR programming; VFIO masks the line on each
  interrupt, so the handler unmasks it after dispatching.

Either way the cookie is ``entry | offset << 16`` (for MSI/INTx, ``entry`` is
the callback's id). After every interrupt the consumers in the kernel call
``intr_workarounds`` (A0: write 1 to MSIXPBACR; B0 and later: re-arm SICE0 and
SIAC0); :meth:`Interrupts.dispatch` does that once per wake-up, before the
callbacks, so callbacks never ack anything themselves. The re-arm writes the
values the host last wrote instead of reading the registers again
(:meth:`Interrupts.rearm`).

Whoever waits selects on :attr:`Interrupts.fds` and calls
:meth:`Interrupts.dispatch` with the fd that became readable.
:class:`InterruptThread` is that loop on its own thread (a stop eventfd
registered first, as every micdrv loop). In MSI-X mode a consumer with an
event loop of its own may :meth:`~Interrupts.claim` its vector: the
interrupt thread stops watching that eventfd and the consumer's loop
dispatches it, so the callback runs on the consumer's thread without a hop
through the interrupt thread [choice]. Nothing else changes: the same
eventfd, the same ack and workarounds per interrupt (spec 2.3), the same
callback.
"""

from __future__ import annotations

import enum
import logging
import os
import selectors
import threading
from typing import Callable

from ..pci import INTX, MSI, MSIX, PciDevice, new_eventfd, read_eventfd
from ..pci.errors import PciError
from . import regs
from .errors import InterruptError
from .mmio import Registers

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class IntrType(enum.IntEnum):
    """``enum mic_intr_type`` (spec 1.3)."""

    DB = 0
    DMA = 1
    ERR = 2


# struct mic_intr_info {u16 intr_start_idx[3]; u16 intr_len[3];} = {0, 8, 30; 4, 8, 1} (spec 1.3)
INTR_START = {IntrType.DB: regs.INTR_DB_START, IntrType.DMA: regs.INTR_DMA_START, IntrType.ERR: regs.INTR_ERR_START}
INTR_LEN = {IntrType.DB: regs.INTR_DB_COUNT, IntrType.DMA: regs.INTR_DMA_COUNT, IntrType.ERR: regs.INTR_ERR_COUNT}


class IrqMode(str, enum.Enum):
    MSIX = "msix"
    MSI = "msi"
    INTX = "intx"


_VFIO_INDEX = {IrqMode.MSIX: MSIX, IrqMode.MSI: MSI, IrqMode.INTX: INTX}
A0_STEPPING = 0x00  # PCI revision IDs (spec 1.1)
B0_STEPPING = 0x10


def source_offset(kind: IntrType, src: int) -> int:
    """``mic_map_src_to_offset``: the SICR0/MXAR bit of source ``src`` of ``kind``."""
    if not 0 <= src < INTR_LEN[kind]:
        raise InterruptError(f"interrupt request {kind.name} {src}", f"source out of range 0..{INTR_LEN[kind] - 1}")
    return INTR_START[kind] + src


def make_cookie(entry: int, offset: int) -> int:
    return entry | offset << 16


def cookie_parts(cookie: int) -> tuple[int, int]:
    """(entry, offset) of a cookie."""
    return cookie & 0xFFFF, cookie >> 16


class Interrupts:
    """The interrupt side of one card: eventfds, MXAR routing, callbacks.

    ``stepping`` is the PCI revision ID (selects the workaround); ``modes`` is
    the order to try (the kernel's is MSI-X, MSI, INTx).
    """

    def __init__(self, dev: PciDevice, registers: Registers, stepping: int,
                 modes: tuple[IrqMode | str, ...] = (IrqMode.MSIX, IrqMode.MSI, IrqMode.INTX)):
        self.dev = dev
        self.regs = registers
        self.stepping = stepping
        self._lock = threading.Lock()
        self.mode: IrqMode | None = None
        self._fds: list[int] = []
        self._entry_of_fd: dict[int, int] = {}
        self.msi_map: list[int] = []  # mic_msi_map: source bitmap per vector
        self._vector_cb: dict[int, Callback] = {}  # MSI-X: entry -> its one requester
        self._offset_cbs: dict[int, dict[int, Callback]] = {}  # MSI/INTx: offset -> {cb_id: callback}
        self._next_cb_id = 0
        self.counts: list[int] = []  # interrupts seen per vector (debugfs msi_irq_info)
        self._sice: int | None = None  # what enable() last wrote to SICE0 / SIAC0 (see rearm)
        self._siac = 0
        self._claimed: set[int] = set()  # vector eventfds a consumer's loop dispatches (see claim)
        self._watchers: list[Callable[[int, bool], None]] = []  # told of claims: the interrupt threads
        self._setup([IrqMode(m) for m in modes])

    # --- setup ----------------------------------------------------------------------
    def _setup(self, modes: list[IrqMode]) -> None:
        errors = []
        for mode in modes:
            want = regs.MIN_MSIX if mode is IrqMode.MSIX else 1
            index = _VFIO_INDEX[mode]
            try:
                if index >= self.dev.info.num_irqs or self.dev.irq_info(index).count < want:
                    errors.append(f"{mode.value}: fewer than {want} vectors")
                    continue
                fds = [new_eventfd() for _ in range(want)]
                try:
                    self.dev.enable_irqs(index, fds)
                except PciError as e:
                    for fd in fds:
                        os.close(fd)
                    errors.append(f"{mode.value}: {e}")
                    continue
            except PciError as e:
                errors.append(f"{mode.value}: {e}")
                continue
            self.mode = mode
            self._fds = fds
            self._entry_of_fd = {fd: i for i, fd in enumerate(fds)}
            self.msi_map = [0] * want
            self.counts = [0] * want
            log.debug("%s: %s interrupts with %d vectors", self.dev.name, mode.value, want)
            self.enable()
            return
        raise InterruptError(f"interrupt setup of {self.dev.name}", "; ".join(errors) or "no mode to try")

    @property
    def num_vectors(self) -> int:
        return len(self._fds)

    @property
    def fds(self) -> tuple[int, ...]:
        """The eventfds to wait on, vector 0 first."""
        return tuple(self._fds)

    # --- MXAR routing (spec 2.3) -------------------------------------------------------
    def _program_mxar(self, entry: int, offset: int, on: bool, flush: bool = True) -> None:
        """``program_msi_to_src_map``: read MXAR[entry], set or clear bit ``offset``, write it back.

        ``flush`` reads the register again so the posted write has landed
        when this returns: the consumer tells the card about its doorbell
        next, through host memory, which does not wait for posted writes.
        """
        if on:
            self.regs.set_bits(regs.mxar(entry), 1 << offset)
        else:
            self.regs.clear_bits(regs.mxar(entry), 1 << offset)
        if flush:
            self.regs.read(regs.mxar(entry))

    def read_mxar(self, entry: int) -> int:
        return self.regs.read(regs.mxar(entry))

    def request(self, kind: IntrType, src: int, callback: Callback, name: str = "") -> int:
        """``mic_request_threaded_irq``: call ``callback()`` when source ``src`` of ``kind`` fires.

        Returns the cookie for :meth:`free`. In MSI-X mode this takes a
        vector of its own (:class:`InterruptError` when all 9 are taken); in
        MSI/INTx mode DMA callbacks are accepted but never called (spec 1.3).
        """
        offset = source_offset(kind, src)
        with self._lock:
            if self.mode is IrqMode.MSIX:
                for entry, bitmap in enumerate(self.msi_map):
                    if not bitmap:
                        break
                else:
                    raise InterruptError(f"interrupt request {name or kind.name} {src}",
                                         f"all {self.num_vectors} MSI-X vectors are taken")
                self.msi_map[entry] |= 1 << offset
                self._vector_cb[entry] = callback
                self._program_mxar(entry, offset, True)
                return make_cookie(entry, offset)
            cb_id = self._next_cb_id
            self._next_cb_id = (cb_id + 1) & 0xFFFF
            self._offset_cbs.setdefault(offset, {})[cb_id] = callback
            if self.mode is IrqMode.MSI:
                self.msi_map[0] |= 1 << offset
                self._program_mxar(0, offset, True)
            return make_cookie(cb_id, offset)

    def free(self, cookie: int) -> None:
        """``mic_free_irq``: stop routing and forget the callback; a claimed vector goes back (:meth:`claim`)."""
        entry, offset = cookie_parts(cookie)
        with self._lock:
            if self.mode is IrqMode.MSIX:
                if entry >= self.num_vectors or not self.msi_map[entry] & 1 << offset:
                    raise InterruptError(f"free of interrupt cookie {cookie:#x}", "not requested")
                self.msi_map[entry] &= ~(1 << offset)
                self._vector_cb.pop(entry, None)
                fd = self._fds[entry]
                watchers = list(self._watchers) if fd in self._claimed else []
                self._claimed.discard(fd)
                self._program_mxar(entry, offset, False)
            else:
                watchers = []
                cbs = self._offset_cbs.get(offset, {})
                if cbs.pop(entry, None) is None:
                    raise InterruptError(f"free of interrupt cookie {cookie:#x}", "not requested")
                if not cbs and self.mode is IrqMode.MSI:
                    self.msi_map[0] &= ~(1 << offset)
                    self._program_mxar(0, offset, False)
        for w in watchers:
            w(fd, False)

    # --- claimed vectors (MSI-X) ----------------------------------------------------------------
    def claim(self, cookie: int) -> int | None:
        """Take the vector of ``cookie`` away from the interrupt threads; returns its eventfd, or None.

        From then on the caller waits on that eventfd itself and calls
        :meth:`dispatch` with it when it is readable -- the callback then
        runs on the caller's thread, with no hop through the interrupt
        thread. Only in MSI-X mode, where the vector is the cookie's alone
        (spec 1.3: one requester per vector); with MSI or INTx the one
        vector is shared by every requester and stays with the interrupt
        thread (None). A dispatch the interrupt thread had already begun
        when the claim came may still run the callback there once, so the
        callback must work on either thread. :meth:`free` gives the vector
        back.
        """
        entry, offset = cookie_parts(cookie)
        with self._lock:
            if self.mode is not IrqMode.MSIX:
                return None
            if entry >= self.num_vectors or not self.msi_map[entry] & 1 << offset:
                raise InterruptError(f"claim of interrupt cookie {cookie:#x}", "not requested")
            fd = self._fds[entry]
            if fd in self._claimed:
                return fd
            self._claimed.add(fd)
            watchers = list(self._watchers)
        for w in watchers:
            w(fd, True)
        return fd

    def claimed(self, fd: int) -> bool:
        return fd in self._claimed

    def add_watcher(self, watcher: Callable[[int, bool], None]) -> None:
        """``watcher(fd, claimed)`` is called when a vector is claimed or given back (interrupt threads)."""
        with self._lock:
            self._watchers.append(watcher)

    def remove_watcher(self, watcher: Callable[[int, bool], None]) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def restore(self) -> None:
        """``mic_intr_restore``: re-set every recorded MXAR bit (before every boot; MXAR may be lost on reset)."""
        if self.mode is IrqMode.INTX:
            return
        with self._lock:
            for entry, bitmap in enumerate(self.msi_map):
                for offset in range(regs.NUM_INTR_SOURCES):
                    if bitmap & 1 << offset:
                        self._program_mxar(entry, offset, True, flush=False)
            self.regs.read(regs.mxar(0))  # one read flushes every posted write before it

    # --- enable / ack / workarounds (spec 2.3) ---------------------------------------------
    def enable(self) -> None:
        """``enable_interrupts``: SICE0 |= 0xFF0F; in MSI-X mode also SIAC0 |= 0xFF0F (read-modify-write)."""
        self._sice = self.regs.set_bits(regs.SICE0, regs.INTR_ENABLE_MASK)
        if self.mode is IrqMode.MSIX:
            self._siac = self.regs.set_bits(regs.SIAC0, regs.INTR_ENABLE_MASK)

    def disable(self) -> None:
        """``disable_interrupts``: write SICE0's value to SICC0; in MSI-X mode clear 0xFF0F in SIAC0."""
        self.regs.write(regs.SICC0, self.regs.read(regs.SICE0))
        self._sice = 0
        if self.mode is IrqMode.MSIX:
            self._siac = self.regs.clear_bits(regs.SIAC0, regs.INTR_ENABLE_MASK)

    def rearm(self) -> None:
        """The B0+ workaround's re-enable, without the reads.

        Only the host writes SICE0 and SIAC0 (the card never does upstream
        [INF]), so the values :meth:`enable` last read and wrote are what the
        registers hold, and writing them again with 0xFF0F ORed in is what
        ``enable_interrupts`` writes -- minus two register reads per
        interrupt, which cost a round trip each over vfio-user. A card reset
        clears both registers; :meth:`enable` (in ``restore_state``) reads
        them afresh. The two writes go in that order, as one message over
        vfio-user (:meth:`~.mmio.Registers.write_many`).
        """
        if self._sice is None:
            self.enable()
            return
        if self.mode is IrqMode.MSIX:  # both writes in one message where the transport can (Registers.write_many)
            self.regs.write_many(((regs.SICE0, self._sice | regs.INTR_ENABLE_MASK),
                                  (regs.SIAC0, self._siac | regs.INTR_ENABLE_MASK)))
        else:
            self.regs.write(regs.SICE0, self._sice | regs.INTR_ENABLE_MASK)

    def ack(self) -> int:
        """``ack_interrupt`` (MSI/INTx): read SICR0, write the value back, return it."""
        v = self.regs.read(regs.SICR0)
        if v:
            self.regs.write(regs.SICR0, v)
        return v

    def workarounds(self) -> None:
        """``intr_workarounds``: A0 writes 1 to MSIXPBACR; B0 and later re-enable interrupts."""
        if self.stepping == A0_STEPPING:
            self.regs.write(regs.MSIXPBACR, 1)
        if self.stepping >= B0_STEPPING:
            self.rearm()

    # --- dispatch ------------------------------------------------------------------------
    def dispatch(self, fd: int) -> int:
        """Handle a readable interrupt eventfd; returns how many callbacks ran.

        Consumes the eventfd, applies the mode's ack and the workarounds, then
        calls the callbacks of the sources that fired. A callback that raises
        is logged and does not stop the others.
        """
        entry = self._entry_of_fd.get(fd)
        if entry is None:
            raise InterruptError(f"interrupt dispatch of fd {fd}", "not one of this card's eventfds")
        if not read_eventfd(fd):
            return 0  # another reader took it, or a spurious wake-up
        self.counts[entry] += 1
        if self.mode is IrqMode.MSIX:
            self.workarounds()
            with self._lock:
                callbacks = [self._vector_cb[entry]] if entry in self._vector_cb else []
        else:
            cause = self.ack()
            self.workarounds()
            with self._lock:
                callbacks = [cb for off in range(regs.INTR_DB_START, regs.INTR_DB_START + regs.INTR_DB_COUNT)
                             if cause & 1 << off for cb in self._offset_cbs.get(off, {}).values()]
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("%s: interrupt callback %r failed", self.dev.name, cb)
        if self.mode is IrqMode.INTX:
            self.dev.unmask_irq(INTX)
        return len(callbacks)

    def close(self) -> None:
        """Disable the vectors at the device and close the eventfds; idempotent."""
        if self.mode is not None and not self.dev.closed:
            try:
                self.dev.disable_irqs(_VFIO_INDEX[self.mode])
            except PciError as e:
                log.debug("%s: disabling interrupts on close: %s", self.dev.name, e)
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._entry_of_fd = {}


class InterruptThread:
    """Runs :meth:`Interrupts.dispatch` on its own thread until :meth:`stop`.

    The event-loop shape every micdrv loop uses: a selector with a stop
    eventfd registered first, handlers keyed by fd.
    """

    def __init__(self, interrupts: Interrupts, name: str = "x100-irq"):
        self.interrupts = interrupts
        self._stop = new_eventfd()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._stop, selectors.EVENT_READ)
        self._sel_lock = threading.Lock()
        self._sel_closed = False
        interrupts.add_watcher(self._claim_changed)
        with self._sel_lock:
            for fd in interrupts.fds:
                if not interrupts.claimed(fd):
                    self._sel.register(fd, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _claim_changed(self, fd: int, claimed: bool) -> None:
        """A vector claimed (stop watching it) or given back (watch it again); from the claimer's thread.

        epoll_ctl(2) may change the set while this thread waits in it; a
        wake-up already under way for a claimed fd is skipped in :meth:`_run`.
        """
        with self._sel_lock:
            if self._sel_closed:
                return
            registered = fd in self._sel.get_map()
            if claimed and registered:
                self._sel.unregister(fd)
            elif not claimed and not registered and fd in self.interrupts.fds:
                self._sel.register(fd, selectors.EVENT_READ)

    def _run(self) -> None:
        claimed = self.interrupts.claimed
        try:
            while True:
                for key, _ in self._sel.select():
                    if key.fd == self._stop:
                        return
                    if claimed(key.fd):
                        continue  # its claimer's loop dispatches it
                    try:
                        self.interrupts.dispatch(key.fd)
                    except Exception:
                        log.exception("interrupt dispatch of fd %d failed", key.fd)
        finally:
            self.interrupts.remove_watcher(self._claim_changed)
            with self._sel_lock:
                self._sel_closed = True
                self._sel.close()

    def stop(self, timeout: float = 5.0) -> None:
        if self._stop >= 0:
            os.eventfd_write(self._stop, 1)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"interrupt thread did not stop within {timeout} s")
            os.close(self._stop)
            self._stop = -1

    def __enter__(self) -> "InterruptThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
