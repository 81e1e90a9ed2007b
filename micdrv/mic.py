"""MicDevice: one X100 card as COSM drives it -- the one implementation of ``cosm_hw_ops`` (spec 1.4, 3.2).

The kernel splits a card over mic_main.c (probe), mic_boot.c (start/stop)
and mic_x100.c (the hardware ops); :class:`MicDevice` is that ``struct
mic_device`` with :class:`~micdrv.cosm.hwops.CosmHwOps` on top:

* :meth:`MicDevice.open` = ``mic_probe`` (spec 1.4): :meth:`X100.probe
  <micdrv.x100.card.X100.probe>` (identity, BARs, interrupts, SMPT), the
  DmaArena mapped for the card, the device page with SPAD14/15 and
  ``mic_bootparam_init``, the host DMA engine (channels 0-3, not started),
  the host's SCIF node 0 -- one per daemon, as there is one card per
  daemon -- and a thread that dispatches the card's interrupts. No reset.
* :meth:`MicDevice.start` = ``_mic_start`` (spec 3.2 steps 2-10), after the
  boot inputs were all checked (:func:`micdrv.boot.prepare`), so a
  :class:`~micdrv.cosm.hwops.BootError` from a bad file or address leaves
  the card untouched;
* :meth:`MicDevice.stop` = ``_mic_stop``: the reverse, then the device page
  re-initialised; ``force`` for a card that will never answer again;
* :meth:`MicDevice.reset`, :meth:`MicDevice.ready`,
  :meth:`MicDevice.post_code`, :meth:`MicDevice.read_card` -- the rest of the
  table (spec 2.5, 2.1, 3.5);
* :meth:`MicDevice.close` releases everything it made (not the PciDevice,
  which the caller opened).

VOP (spec 3.2 step 6, 5): :attr:`MicDevice.vop` is the card's
:class:`~micdrv.vop.host.VopHost` (its event loop runs from open to close);
:meth:`MicDevice.start_vop` gives it an empty device list before the card
boots and :meth:`MicDevice.stop_vop` removes every device, first thing in
``_mic_stop``. Devices are added by whoever owns them
(:class:`micdrv.vop.devices.CardDevices`) once the card is booting.
"""

from __future__ import annotations

import logging
import threading

from .boot import DevicePage, LoadPlan, prepare
from .cosm.hwops import BootError, BootSpec
from .pci import Allocation, DmaArena, PciDevice, PciError
from .scif import SCIF_NODE_ALIVE_TIMEOUT, HostDoorbells, ScifHwLink, ScifMemory, ScifNode, Side
from .scif.nodeqp import QP_POLL_INTERVAL
from .x100 import DmaEngine, IrqMode, X100, X100Error
from .x100.card import SILICON_RESET_DELAY
from .vop.host import VopHost, VopOptions

log = logging.getLogger(__name__)

# Host memory the card may reach: device page, DMA rings (4 x 64 KiB plus
# status lines), the SCIF node QP (64 KiB ring) and endpoint QPs (4 KiB each),
# and, from issue 5, vrings and bounce buffers. 32 MiB leaves room for those.
DEFAULT_ARENA_SIZE = 32 << 20
SCIF_HOST_NODE = 0  # spec 8.1: the host is the management node


class MicDevice:
    """One probed X100 card: the :class:`~micdrv.cosm.hwops.CosmHwOps` COSM drives. Create with :meth:`open`."""

    def __init__(self, dev: PciDevice, arena: DmaArena, card: X100, *, mic_id: int,
                 scif_poll_interval: float = QP_POLL_INTERVAL, scif_timeout: float = SCIF_NODE_ALIVE_TIMEOUT):
        self.dev = dev
        self.arena = arena
        self.card = card
        self.mic_id = mic_id
        self.name = f"mic{mic_id}"
        self.node_id = mic_id + 1            # spec 8.1: card k is SCIF node k + 1
        self.scif_poll_interval = scif_poll_interval
        self.scif_timeout = scif_timeout
        self._lock = threading.RLock()
        self._started = False
        self._dma_started = False
        self.last_boot: LoadPlan | None = None
        self.device_page: DevicePage | None = None
        self.dma: DmaEngine | None = None
        self.scif_link: ScifHwLink | None = None
        self._irq_thread = None
        self.vop: VopHost | None = None
        self._scif_allocs: dict[int, Allocation] = {}
        self._scif = ScifNode(SCIF_HOST_NODE, alive_timeout=scif_timeout, name="scif0")
        self._scif_memory = ScifMemory(arena.memory(), card.aperture.memory(), self._scif_alloc, self._scif_free,
                                       to_peer=lambda iova, size: card.smpt.to_card(iova, size),
                                       name=f"host->{self.name}")

    @classmethod
    def open(cls, dev: PciDevice, *, mic_id: int, arena_size: int = DEFAULT_ARENA_SIZE,
             reset_delay: float = SILICON_RESET_DELAY, iova_base: int = 0,
             irq_modes: tuple[IrqMode | str, ...] = (IrqMode.MSIX, IrqMode.MSI, IrqMode.INTX),
             scif_poll_interval: float = QP_POLL_INTERVAL,
             scif_timeout: float = SCIF_NODE_ALIVE_TIMEOUT, vop: VopOptions | None = None,
             reset: bool = False) -> "MicDevice":
        """``mic_probe`` (spec 1.4) on ``dev``; the card is not reset unless ``reset`` says so.

        ``reset`` resets the card first of all (:meth:`X100.probe <micdrv.x100.card.X100.probe>`
        ``reset_first``): for a card a daemon that died had started, whose OS may still be running.
        The caller then waits for ready (:meth:`CosmDevice.await_ready
        <micdrv.cosm.host.CosmDevice.await_ready>`).

        ``reset_delay`` is the pause after RGCR (1 s on silicon, spec 2.5);
        ``scif_poll_interval`` how often the device page is polled for the
        card's queue pair (1 s, spec 8.4); ``scif_timeout`` how long an
        orderly SCIF teardown waits for the card (30 s, spec 8.4 step 6);
        ``vop`` the VOP choices (:class:`~micdrv.vop.host.VopOptions`).
        """
        if not 0 <= mic_id < 255:
            raise ValueError(f"mic id {mic_id} must be 0..254 (the card's SCIF node id mic id + 1 is a u8)")
        arena = DmaArena(arena_size, name=f"micdrv-mic{mic_id}")
        card = self = None
        try:
            card = X100.probe(dev, arena, iova_base=iova_base, irq_modes=irq_modes, reset_delay=reset_delay,
                              reset_first=reset)
            self = cls(dev, arena, card, mic_id=mic_id, scif_poll_interval=scif_poll_interval,
                       scif_timeout=scif_timeout)
            self.device_page = DevicePage(arena, card.smpt.to_card)
            card.write_dp_address(self.device_page.card_addr)   # spec 1.4 step 7
            self.device_page.init(self.node_id)                  # spec 1.4 step 8
            self.dma = DmaEngine(card)
            self.vop = VopHost(card, arena, self.device_page, self.dma, vop, name=self.name).open()
            self._irq_thread = card.interrupt_thread()
            log.info("%s: %s %s stepping %s, %d MiB, interrupts %s", self.name, dev.name, card.family,
                     card.stepping, card.aperture.size >> 20, card.interrupts.mode.value)
            return self
        except BaseException:
            if self is not None:
                self.close()
            else:
                if card is not None:
                    card.close()
                arena.close()
            raise

    # --- identity ---------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.card.family

    @property
    def stepping(self) -> str:
        return self.card.stepping

    @property
    def scif(self) -> ScifNode:
        """The host's SCIF node 0; COSM listens on port 201 through it (spec 7.2)."""
        return self._scif

    @property
    def memory_size(self) -> int:
        return self.card.aperture.size

    @property
    def started(self) -> bool:
        return self._started

    # --- reset and ready (spec 2.5) ---------------------------------------------------------------
    def reset(self) -> None:
        """``_mic_reset``: SPAD2 = 0, RGCR |= 1, the reset pause. A started card is stopped first (forced)."""
        with self._lock:
            if self._started:
                log.warning("%s: reset of a started card; stopping it first", self.name)
                self._stop(force=True)
            self.card.reset()

    def ready(self) -> bool:
        return self.card.ready()

    def post_code(self) -> str:
        return self.card.post_code()

    def read_card(self, addr: int, length: int) -> bytes:
        """Card memory through BAR0; :class:`~micdrv.x100.errors.X100Error` outside it."""
        return self.card.aperture.read(addr, length)

    # --- start (spec 3.2 steps 2-10) ---------------------------------------------------------------
    def start(self, boot: BootSpec) -> None:
        """``_mic_start``; :class:`BootError` with the card left stopped when a step fails."""
        with self._lock:
            if self._started:
                raise BootError("start", f"{self.name} is already started; stop it first")
            plan = prepare(boot, self.card.download_info(), self.memory_size)  # every check, nothing written
            step = "device page"
            try:
                self.device_page.init(self.node_id)                      # step 2
                step = "DMA"
                self.dma.start()                                         # steps 3-4: host channels 0-3
                self._dma_started = True
                step = "SCIF"
                self._start_scif()                                       # step 5
                step = "VOP"
                self.start_vop()                                         # step 6
                step = "load_mic_fw"
                plan.load(self.card)                                     # step 7
                step = "restore SMPT and interrupts"
                self.card.restore_state()                                # step 8
                step = "device page address"
                self.card.write_dp_address(self.device_page.card_addr)   # step 9
                step = "boot kick"
                self.card.send_firmware_intr(plan.apic_id)               # step 10
            except BootError:
                self._stop(force=True)
                raise
            except (X100Error, PciError, OSError, ValueError) as e:
                self._stop(force=True)
                raise BootError(step, str(e)) from e
            self._started = True
            self.last_boot = plan
            log.info("%s: booting a %d-byte image at %#x, command line %r", self.name, plan.image_size,
                     plan.boot_addr, plan.cmdline[:-1].decode("utf-8", "replace"))

    def _start_scif(self) -> None:
        """The host's SCIF probe for this card (spec 8.4 steps 1-2): the worker polls for the card's QP."""
        link = ScifHwLink(self._scif, self.node_id, self._scif_memory, self.device_page.bootparam,
                          HostDoorbells(self.card, f"scif {self.name}"), Side.HOST,
                          poll_interval=self.scif_poll_interval, name=f"scif0->{self.name}")
        link.start()
        self.scif_link = link

    def _scif_alloc(self, size: int) -> int:
        a = self.arena.alloc(size)
        iova = self.arena.iova(a)
        self._scif_allocs[iova] = a
        return iova

    def _scif_free(self, iova: int, size: int) -> None:
        self.arena.free(self._scif_allocs.pop(iova))

    # --- VOP (spec 3.2 step 6; issue 5) -------------------------------------------------------------
    def start_vop(self) -> None:
        """Register the VOP device (spec 3.2 step 6): an empty device list; devices are added once booting."""
        self.vop.start()

    def stop_vop(self, force: bool = False) -> None:
        """Unregister the VOP device (first thing ``_mic_stop`` does): every device removed (spec 5.5)."""
        if self.vop is not None:
            self.vop.stop(force=force)

    # --- stop ----------------------------------------------------------------------------------------
    def stop(self, force: bool = False) -> None:
        """``_mic_stop``: VOP, SCIF, DMA torn down, device page re-initialised. Idempotent.

        With ``force`` nothing waits for the card (SCIF is dropped without
        the EXIT hand-shake); otherwise the SCIF teardown waits up to
        ``scif_timeout`` for a card that is still up.
        """
        with self._lock:
            self._stop(force)

    def _stop(self, force: bool) -> None:
        try:
            self.stop_vop(force)
        except Exception:
            log.exception("%s: VOP teardown", self.name)
        link, self.scif_link = self.scif_link, None
        if link is not None:
            if not link.close(force=force, timeout=self.scif_timeout):
                log.warning("%s: the card did not acknowledge the SCIF exit", self.name)
        if self._dma_started:
            self._dma_started = False
            try:
                self.dma.stop()
            except (X100Error, PciError) as e:
                log.warning("%s: DMA stop: %s", self.name, e)
        if self.device_page is not None:
            self.device_page.init(self.node_id)
        self._started = False

    # --- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop (forced), stop the interrupt thread, free the DMA engine, device page, arena. Not the PciDevice."""
        with self._lock:
            if self.card is None:
                return
            # Every step runs even when an earlier one fails -- a card gone from the bus fails every register
            # access -- so the host's side (threads, rings, arena, mappings) is always released.
            if self._started or self.scif_link is not None:
                self._teardown("stop", lambda: self._stop(force=True))
            self._teardown("SCIF shutdown", lambda: self._scif.shutdown(timeout=0))
            if self.vop is not None:
                self._teardown("VOP close", self.vop.close)
                self.vop = None
            if self._irq_thread is not None:
                self._teardown("interrupt thread", self._irq_thread.stop)
                self._irq_thread = None
            if self.dma is not None:
                self._teardown("DMA close", self.dma.close)
                self.dma = None
            if self.device_page is not None:
                self._teardown("device page", self.device_page.close)
                self.device_page = None
            self._teardown("card close", self.card.close)
            self.card = None
            self.arena.close()

    def _teardown(self, what: str, step) -> None:
        try:
            step()
        except (X100Error, PciError) as e:
            log.warning("%s: %s: %s", self.name, what, e)

    def __enter__(self) -> "MicDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def status(self) -> dict:
        """What the daemon shows about the hardware (``micctl info``)."""
        c = self.card
        return {"name": self.name, "pci": self.dev.name, "family": c.family, "stepping": c.stepping,
                "memory_size": self.memory_size, "post_code": c.post_code(), "ready": c.ready(),
                "started": self._started, "interrupts": c.interrupts.mode.value,
                "scif": self.scif_link.status() if self.scif_link is not None else None,
                "vop": {"started": self.vop.started, "devices": len(self.vop.devices)} if self.vop else None}


__all__ = ["MicDevice", "DEFAULT_ARENA_SIZE"]
