"""The simulated X100: the device model the vfio-user server serves, and the card side it runs (spec 1, 2, 4, 9).

:class:`X100Card` is a :class:`~micdrv.pci.vfio_user.DeviceModel` wiring
the card's parts together:

* config space (:mod:`.identity`), BAR0 = GDDR (a sparse memfd the client
  mmaps), BAR4 = the register file (:mod:`.registers`) trapped;
* the interrupt block (:mod:`.interrupts`), doorbells (:mod:`.doorbells`),
  SMPT (:mod:`.smpt`), DMA engine (:mod:`.dma_engine`), reset/bootstrap
  (:mod:`.bootstrap`), scratch pads SPAD0-15 and the post code (plain
  read/write registers, spec 2.1/2.2), RGCR;
* the card's physical address space (:mod:`.bus`) and the card OS
  (:mod:`.cardos`), which sees the hardware only through a
  :class:`CardSide`.

A card reset (RGCR bit 0, spec 2.5; also a vfio DEVICE_RESET, which adds
the MSI-X table and config space) clears: all SPADs, SICR0/SICE0/SIAC0,
MXAR0-15, SMPT00-31 (spec 2.4 "may be lost"), APICICR/RDMASR, every DMA
channel register and DCR (back to 0x55), and stops the card OS; then the
bootstrap becomes ready after the delay (:mod:`.bootstrap`). RGCR reads 0.

Card software API -- :class:`CardSide`, handed to the card OS:

=============================================  ==================================================
``read(addr, n)``, ``write(addr, data)``       card physical memory (GDDR, SMPT window, and
``read32/64``, ``write32/64``, ``view``,       dword/qword access to the register window at
``copy(dst, src, n)``                          0x08_007C_0000); :class:`~.bus.CardFault` on faults
``mmio_read(off)``, ``mmio_write(off, v)``     the register file at its BAR4 offsets
``spad(i)``, ``set_spad(i, v)``                scratch pads (spec 2.2)
``send_host_doorbell(db)``                     SDBIC[db] = 0x80000000: host doorbell 0..3 (spec 2.3)
``request_doorbell(db, fn[, inline])``,        ``fn(db)`` runs when the host rings card doorbell db
``free_doorbell``                              (in a dispatcher thread, or inline after the write)
``least_used_doorbell()``                      "least-used of 16" (spec 2.3)
``set_dma_interrupt(fn)``                      ``fn(ch)`` on a card-owned channel's STATUS interrupt
``post(code)``                                 two-character post code (spec 2.1)
``publish(record)``                            JSON-able record for the control socket ``os`` command
``stopped``                                    threading.Event set by a card reset
``memory_size``, ``download_addr``, ``apic_id``
=============================================  ==================================================
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Callable

from micdrv.pci.device import BAR0, BAR4
from micdrv.pci.vfio_user import DeviceModel, DmaSpace, Interrupts, MemoryRegion, TrappedRegion
from micdrv.x100 import regs

from . import identity
from .bootstrap import DEFAULT_APIC_ID, DEFAULT_DOWNLOAD_ADDR, DEFAULT_READY_DELAY, Bootstrap, \
    check_download_addr, post_code_text, post_code_value
from .bus import CardBus, CardFault
from .cardos import CardOS, SimCardOS
from .dma_engine import DmaEngine
from .doorbells import CardDoorbells, DoorbellRegisters
from .interrupts import InterruptBlock
from .registers import RegisterFile
from .smpt import Smpt

log = logging.getLogger(__name__)

DEFAULT_MEMORY = 8 << 30  # 8 GiB of GDDR (spec 1.2: "e.g. 8 GiB / 16 GiB")


class CardOSStopped(CardFault):
    """Card software touched the hardware after a reset stopped it."""

    def __init__(self):
        super().__init__(0, 0, False, "the card was reset: this card OS is stopped")


class X100Card(DeviceModel):
    """One simulated X100 card."""

    def __init__(self, *, device_id: int = identity.DEFAULT_DEVICE_ID,
                 revision: int = identity.revision_of(identity.DEFAULT_STEPPING), memory_size: int = DEFAULT_MEMORY,
                 apic_id: int = DEFAULT_APIC_ID, download_addr: int = DEFAULT_DOWNLOAD_ADDR,
                 ready_delay: float = DEFAULT_READY_DELAY, os_factory: Callable[[], CardOS] = SimCardOS):
        check_download_addr(download_addr, memory_size)
        super().__init__(identity.build_config(device_id, revision, memory_size))
        self.lock = threading.RLock()
        self.memory_size = memory_size
        self.gddr = MemoryRegion(memory_size, name="x100-gddr")
        self.registers = RegisterFile(self.lock)
        self.interrupts = InterruptBlock(self.lock, self.config, self._server_irqs)
        self.smpt = Smpt()
        self.bus = CardBus(self.gddr.mem, self.registers, self.smpt, self._server_dma)
        self.card_doorbells = CardDoorbells()
        self.bootstrap = Bootstrap(self.lock, [0] * regs.SPAD_COUNT, self._post, self._start_os, apic_id=apic_id,
                                   download_addr=download_addr, ready_delay=ready_delay)
        self.spads = self.bootstrap.spads
        self.doorbells = DoorbellRegisters(self.interrupts, self.bootstrap.ipi, self.card_doorbells)
        self.dma_engine = DmaEngine(self.lock, self.bus, self.interrupts)
        self.post_code = [0]
        self.os_factory = os_factory
        self.os_record: dict | None = None
        self.card_os: CardOS | None = None  # the OS the last accepted kick started (until a reset)
        self._side: CardSide | None = None
        self.os_starts = 0

        rf = self.registers
        for i in range(regs.SPAD_COUNT):
            rf.map_plain(regs.spad(i), self.spads, i)
        rf.map_plain(regs.POSTCODE, self.post_code, 0)
        rf.map(regs.RGCR, None, self._write_rgcr)
        self.interrupts.map_registers(rf)
        self.smpt.map_registers(rf)
        self.doorbells.map_registers(rf)
        self.dma_engine.map_registers(rf)

        self.regions[BAR0] = self.gddr
        # A host write may ring card doorbells: their handlers run after it, in this thread (doorbells.py).
        self.regions[BAR4] = TrappedRegion(regs.MMIO_SIZE, rf.region_read,
                                           lambda offset, data: self.card_doorbells.posted(rf.region_write, offset,
                                                                                           data))
        self.card_reset()  # power-on: the bootstrap comes up ready after the delay

    # --- the server's parts, once attached ---------------------------------------------------
    def _server_irqs(self) -> Interrupts | None:
        return self.server.irqs if self.server is not None else None

    def _server_dma(self) -> DmaSpace | None:
        return self.server.dma if self.server is not None else None

    # --- reset -----------------------------------------------------------------------------------
    def _write_rgcr(self, value: int) -> None:
        if value & regs.RGCR_RESET:
            log.info("RGCR: card reset")
            self.card_reset()

    def card_reset(self, *, function: bool = False) -> None:
        """Reset the card (card lock taken): registers lost, card OS stopped, bootstrap restarted."""
        with self.lock:
            side, self._side = self._side, None
            if side is not None:
                side.stop()
            self.os_record = None
            self.card_os = None
            self.spads[:] = [0] * regs.SPAD_COUNT
            self.interrupts.reset(function=function)
            self.smpt.reset()
            self.doorbells.reset()
            self.card_doorbells.reset()
            self.dma_engine.reset()
            self.dma_engine.card_interrupt = None
            self.bootstrap.reset()

    def reset(self) -> None:
        """vfio DEVICE_RESET (the server has already reset config space): a card reset, MSI-X table too."""
        log.info("function reset")
        self.card_reset(function=True)

    # --- post code and card OS ----------------------------------------------------------------
    def _post(self, code: str) -> None:
        self.post_code[0] = post_code_value(code)

    @property
    def post_code_text(self) -> str:
        return post_code_text(self.post_code[0])

    def _start_os(self) -> None:
        """The bootstrap accepted the kick (card lock held): run a fresh card OS in its own thread."""
        side = CardSide(self)
        self._side = side
        self.os_starts += 1
        card_os = self.os_factory()
        self.card_os = card_os
        threading.Thread(target=self._run_os, args=(card_os, side), name="card OS", daemon=True).start()

    def _run_os(self, card_os: CardOS, side: "CardSide") -> None:
        try:
            card_os.run(side)
        except CardOSStopped:
            log.info("card OS stopped by a reset")
        except Exception:
            log.exception("card OS crashed")
            side.post("EE")

    def os_control(self, action: str, **args) -> dict:
        """A test switch for the running card OS (the control socket's ``kernel`` command)."""
        with self.lock:
            card_os = self.card_os
        control = getattr(card_os, "control", None)
        if control is None:
            raise ValueError("no card OS is running" if card_os is None else "this card OS has no test switches")
        return control(action, **args)

    def os_status(self) -> dict | None:
        """The running card OS's record as of now (its ``snapshot()``), else what it last published."""
        with self.lock:
            card_os, record = self.card_os, self.os_record
        snapshot = getattr(card_os, "snapshot", None)
        fresh = snapshot() if snapshot is not None else None
        if fresh is not None:
            return fresh
        return copy.deepcopy(record)

    def _publish(self, side: "CardSide", record: dict) -> None:
        with self.lock:
            if self._side is side:
                self.os_record = copy.deepcopy(record)

    # --- vfio-user hooks ---------------------------------------------------------------------------
    def connected(self) -> None:
        log.info("host connected")

    def disconnected(self) -> None:
        log.info("host disconnected; card state kept")

    def close(self) -> None:
        with self.lock:
            if self._side is not None:
                self._side.stop()
        self.bootstrap.close()
        self.dma_engine.close()
        self.card_doorbells.close()
        super().close()

    # --- diagnostics ---------------------------------------------------------------------------------
    def status(self) -> dict:
        with self.lock:
            return {"state": self.bootstrap.state, "post_code": self.post_code_text,
                    "spad2": self.spads[regs.SPAD_DOWNLOAD_INFO], "device_id": self.config.get(2, 2),
                    "revision": self.config.get(8, 1), "memory_size": self.memory_size,
                    "apic_id": self.bootstrap.apic_id, "download_addr": self.bootstrap.download_addr,
                    "ready_delay": self.bootstrap.ready_delay, "os_starts": self.os_starts,
                    "threads": threading.active_count()}

    def counters(self) -> dict:
        return {"bus": self.bus.counters(), "interrupts": self.interrupts.counters(),
                "doorbells": self.doorbells.counters(), "bootstrap": self.bootstrap.counters(),
                "dma": self.dma_engine.counters(),
                "registers": {"unmapped_reads": self.registers.unmapped_reads,
                              "unmapped_writes": self.registers.unmapped_writes}}


class CardSide:
    """The card hardware as card software sees it; stale (raises CardOSStopped) after a card reset."""

    def __init__(self, card: X100Card):
        self._card = card
        self._bus = card.bus
        self.stopped = threading.Event()
        self._halted = False  # stopped, as a plain flag: every card access checks it (Event.is_set is a call)
        self.memory_size = card.memory_size
        self.download_addr = card.bootstrap.download_addr
        self.apic_id = card.bootstrap.apic_id

    def stop(self) -> None:
        """The card was reset: this card OS may touch the hardware no more (card lock held).

        The event first: a card OS thread whose access raised CardOSStopped must find ``stopped`` set
        when it asks why (the SCIF worker logs a traceback otherwise; it once did, between the two).
        """
        self.stopped.set()
        self._halted = True

    def _check(self) -> None:
        if self._halted:
            raise CardOSStopped()

    # memory
    def read(self, addr: int, length: int) -> bytes:
        self._check()
        return self._bus.read(addr, length)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self._check()
        self._bus.write(addr, data)

    def read32(self, addr: int) -> int:
        self._check()
        return self._bus.read32(addr)

    def write32(self, addr: int, value: int) -> None:
        self._check()
        self._bus.write32(addr, value)

    def read64(self, addr: int) -> int:
        self._check()
        return self._bus.read64(addr)

    def write64(self, addr: int, value: int) -> None:
        self._check()
        self._bus.write64(addr, value)

    def view(self, addr: int, length: int, *, write: bool = False) -> memoryview:
        self._check()
        return self._bus.view(addr, length, write=write)

    def copy(self, dst: int, src: int, length: int) -> None:
        self._check()
        self._bus.copy(dst, src, length)

    # registers
    def mmio_read(self, offset: int) -> int:
        return self.read32(regs.CARD_MMIO_BASE + offset)

    def mmio_write(self, offset: int, value: int) -> None:
        self.write32(regs.CARD_MMIO_BASE + offset, value)

    def spad(self, i: int) -> int:
        return self.mmio_read(regs.spad(i))

    def set_spad(self, i: int, value: int) -> None:
        self.mmio_write(regs.spad(i), value)

    def post(self, code: str) -> None:
        self.mmio_write(regs.POSTCODE, post_code_value(code))

    # doorbells and interrupts
    def send_host_doorbell(self, db: int) -> None:
        """Ring host doorbell ``db`` (0..3): SDBIC[db] = DBREQ (spec 2.3)."""
        if not 0 <= db < regs.SDBIC_COUNT:
            raise ValueError(f"host doorbell {db} out of range 0..3")
        self.mmio_write(regs.sdbic(db), regs.SDBIC_DBREQ)

    def request_doorbell(self, db: int, handler: Callable[[int], None], inline: bool = False) -> None:
        """``handler(db)`` when the host rings ``db``: in a dispatcher thread, or ``inline`` right after the
        host's write (:class:`~.doorbells.CardDoorbells`)."""
        self._check()
        self._card.card_doorbells.request(db, handler, inline)

    def free_doorbell(self, db: int) -> None:
        self._card.card_doorbells.free(db)

    def least_used_doorbell(self) -> int:
        return self._card.card_doorbells.least_used()

    def set_dma_interrupt(self, handler: Callable[[int], None] | None) -> None:
        """``handler(ch)`` for STATUS interrupts of card-owned channels (called with the card lock held)."""
        self._check()
        self._card.dma_engine.card_interrupt = handler

    def publish(self, record: dict) -> None:
        self._card._publish(self, record)
