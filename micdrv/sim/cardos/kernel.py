"""The simulated card kernel: bring-up, a device list, a log, a clock, and how it goes down (spec 3, 7, 8.4, 9).

:class:`Kernel` is one boot of the card OS. :meth:`Kernel.main` runs in the
thread the bootstrap started and brings the card up in the order of the
card kernel (card/mic_device.c, spec 9 "bring-up order"):

1. the kernel log in GDDR (:mod:`.klog`) and the command line the host left
   after the image (:mod:`.params`);
2. the device page from SPAD14/15 through the SMPT, its magic 0xC0FFEE00
   (spec 3.3) -- wrong or unreachable: an error in the log, post code 4E,
   and no MIC devices (the kernel runs on, unreachable from the host);
3. DMA channels 4-7 (:mod:`.dma`);
4. VOP -- issue 5 (:meth:`Kernel.probe_vop`);
5. SCIF with the node id from the bootparam (:mod:`.scif`);
6. once the host node is up, the COSM client (:mod:`.cosm_client`).

Drivers sit in :attr:`Kernel.devices` in probe order; each has ``name``,
``probe()``, ``shutdown()`` (an orderly power-off, reverse order),
``abandon()`` (the card was reset under it: stop, touch nothing) and
``status()``. Issue 5's VOP driver, virtio drivers and shell are further
entries: the virtio drivers are registered with :mod:`.virtio_bus` once the
device page was looked at (:func:`.drivers.install`), and each bound
driver adds itself under its device name
(``eth0``, ``vda``, ``hvc0``) with :meth:`Kernel.add_device` and leaves with
:meth:`Kernel.remove_device` (hot remove).

How the kernel goes down -- what later shell commands and the control
socket's test switches call:

* :meth:`Kernel.poweroff`, :meth:`Kernel.halt`, :meth:`Kernel.reboot`:
  orderly, in the kernel thread: reboot notifiers (the COSM client sends
  SHUTDOWN_STATUS poweroff 3 / halted 2 / restart 4, spec 7.1), then every
  driver's shutdown (COSM closes its connection, SCIF sends SCIF_EXIT), then
  the card sits dead with post code F3 / F2 / F4 until the host resets it;
* :meth:`Kernel.panic`: "Kernel panic - not syncing" in the log, post code
  EE, and the card stops dead: no heartbeats, no interrupts handled,
  connections left open -- upstream sends the host nothing on a panic, so
  its watchdog finds out (spec 7.2);
* :meth:`Kernel.hang`: the same silence without the log line or post code.

A card reset (``side.stopped``) ends everything at once, without touching
memory or registers: the next card OS may already be running there.

Post codes (two ASCII characters, spec 2.1) are the simulator's own
[choice], listed in :data:`POST_CODES`.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable

from micdrv.bootparam import MIC_MAGIC, Bootparam
from micdrv.cosm import MicStatus
from micdrv.cosm.klog import log_text
from micdrv.memory import MemoryAccessError
from micdrv.x100 import regs

from ..bus import CardFault
from . import params as params_mod
from . import drivers as drivers_mod
from .cosm_client import CosmClient
from .dma import CardDma, CardDmaError
from .image import CardImage
from .klog import KernelLog
from .memory import HEAP_MAX, CardHeap, CardMemory, free_ranges
from .scif import CardScif
from .vop import CardVop

if TYPE_CHECKING:
    from ..card import CardSide

log = logging.getLogger(__name__)

POST_OS_STARTED = "30"        # the bootstrap jumped into the image
POST_BAD_IMAGE = "3E"         # the image is not a card OS image this card runs
POST_DEVICE_PAGE_OK = "40"    # device page found with the right magic
POST_DEVICE_PAGE_BAD = "4E"   # device page unreachable or wrong magic
POST_DMA = "50"               # DMA channels 4-7 taken
POST_SCIF = "60"              # SCIF node QP published
POST_HOST_UP = "70"           # the host node is alive (SCIF_INIT both ways)
POST_ONLINE = "80"            # the COSM client is connected
POST_PANIC = "EE"             # kernel panic
POST_DOWN = {MicStatus.HALTED: "F2", MicStatus.POWER_OFF: "F3", MicStatus.RESTART: "F4"}
POST_CODES = {POST_OS_STARTED: "card OS started", POST_BAD_IMAGE: "image not recognised",
              POST_DEVICE_PAGE_OK: "device page found", POST_DEVICE_PAGE_BAD: "device page bad",
              POST_DMA: "DMA channels 4-7 up", POST_SCIF: "SCIF node up", POST_HOST_UP: "host node alive",
              POST_ONLINE: "COSM client connected", POST_PANIC: "kernel panic", "F2": "halted", "F3": "powered off",
              "F4": "restarting"}

CMDLINE_MAX = 2048            # the host's command-line buffer, NUL included (spec 3.1 step 6)
WAIT_SLICE = 0.1              # how often waiting kernel threads look at side.stopped (a card reset)
DOWN_MESSAGES = {MicStatus.POWER_OFF: "reboot: Power down", MicStatus.HALTED: "reboot: System halted",
                 MicStatus.RESTART: "reboot: Restarting system"}


class BootFailure(Exception):
    """What the host loaded cannot run here (memory layout); the card never comes up."""


class Kernel:
    """One boot of the simulated card OS on ``side``."""

    def __init__(self, side: "CardSide", image: CardImage, record: dict):
        self.side = side
        self.image = image
        self.record = record             # what the OS entry found (image size, hash, ramdisk fields)
        self.state = "booting"
        self.frozen: str | None = None   # "panic" or "hang"
        self.panic_message: str | None = None
        self.devices: list = []
        self.errors: list[str] = []
        self.lost_interrupts = 0
        self.clock_offset = 0.0
        self.synced_to: tuple[int, int] | None = None
        self.bootparam: Bootparam | None = None
        self.scif: CardScif | None = None
        self.cosm: CosmClient | None = None
        self.vop: CardVop | None = None
        self.drivers: drivers_mod.CardDrivers | None = None
        self._down_request: MicStatus | None = None
        self._notifiers: list[Callable[[MicStatus], None]] = []
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self.started = time.time()
        self.cmdline = self._read_cmdline()
        self.params = params_mod.parse(image.builtin_cmdline, self.cmdline)
        self.heap = CardHeap(*self._plan_memory())
        self.log = KernelLog(side, image.log_buf_phys, image.log_buf_len, image.log_buf_len_phys)

    # --- what the host left us --------------------------------------------------------
    def _read_cmdline(self) -> str:
        at = self.side.download_addr + self.record["image_size"]
        raw = self.side.read(at, min(CMDLINE_MAX, self.side.memory_size - at))
        end = raw.find(b"\0")
        if end < 0:
            self.errors.append(f"no NUL within {CMDLINE_MAX} bytes of the command line at {at:#x}")
            end = len(raw)
        self._cmdline_end = at + end + 1
        return raw[:end].decode("utf-8", "replace")

    def _plan_memory(self) -> tuple[int, int]:
        """Check the kernel's data fit around what the host loaded; the heap is the largest gap left."""
        img, mem = self.image, self.side.memory_size
        load = self.side.download_addr
        kernel_end = max(load + img.init_size, self._cmdline_end)
        used = [(load, kernel_end)]
        log_ranges = [(img.log_buf_phys, img.log_buf_phys + img.log_buf_len),
                      (img.log_buf_len_phys, img.log_buf_len_phys + 4)]
        for start, end in log_ranges:
            if end > mem:
                raise BootFailure(f"the kernel's log buffer at [{start:#x}, {end:#x}) is beyond card memory "
                                  f"({mem:#x} bytes)")
            if start < self._cmdline_end and end > load:
                raise BootFailure(f"the kernel's log buffer at [{start:#x}, {end:#x}) overlaps the image and "
                                  f"command line loaded at [{load:#x}, {self._cmdline_end:#x})")
        used += log_ranges
        rd, rd_size = self.record.get("ramdisk_image", 0), self.record.get("ramdisk_size", 0)
        if rd_size:
            if rd + rd_size > mem:
                self.errors.append(f"ramdisk [{rd:#x}, +{rd_size:#x}) is beyond card memory; ignored")
            else:
                for start, end in log_ranges:
                    if start < rd + rd_size and end > rd:
                        raise BootFailure(f"the ramdisk at [{rd:#x}, +{rd_size:#x}) overlaps the kernel's log buffer")
                used.append((rd, rd + rd_size))
        gaps = free_ranges(mem, used)
        if not gaps:
            raise BootFailure("no card memory left for the kernel heap")
        start, end = max(gaps, key=lambda g: g[1] - g[0])
        return start, min(end, start + HEAP_MAX)

    # --- printk, clock -------------------------------------------------------------------
    def printk(self, text: str) -> None:
        self.log.printk(text)

    def dmesg(self) -> str:
        """The kernel log as the host reads it from GDDR (oldest line first; spec 3.5)."""
        return log_text(self.side.read(self.log.buf_phys, self.log.buf_len))

    def time(self) -> float:
        """The card's wall clock: the host's, once SYNC_TIME set it."""
        return time.time() + self.clock_offset

    def set_time(self, tv_sec: int, tv_nsec: int) -> None:
        """``do_settimeofday64`` from COSM_MSG_SYNC_TIME (spec 7.1)."""
        with self._lock:
            self.clock_offset = tv_sec + tv_nsec / 1e9 - time.time()
            self.synced_to = (tv_sec, tv_nsec)
        when = datetime.datetime.fromtimestamp(tv_sec, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        self.printk(f"cosm_client: clock set to {when}.{tv_nsec // 1000:06d} UTC by the host")
        self.publish()

    # --- state ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Running normally: not reset, not panicked or hung, not going down."""
        return (self.frozen is None and not self.side.stopped.is_set()
                and self.state in ("booting", "running", "online"))

    def post(self, code: str) -> None:
        try:
            self.side.post(code)
        except CardFault:
            pass  # reset under us

    def irq_handler(self, callback: Callable[[], None]) -> Callable[[int], None]:
        """A card doorbell handler that does nothing on a dead (panicked, hung) kernel."""
        def handler(db: int) -> None:
            if self.frozen is not None:
                self.lost_interrupts += 1
                return
            callback()
        return handler

    def online(self) -> None:
        with self._lock:
            if self.state in ("booting", "running"):
                self.state = "online"
        self.post(POST_ONLINE)
        self.publish()

    def register_reboot_notifier(self, fn: Callable[[MicStatus], None]) -> None:
        with self._lock:
            self._notifiers.append(fn)

    def add_device(self, dev) -> None:
        """A driver bound to a device (any thread: hotplug runs on the transport's)."""
        with self._lock:
            self.devices.append(dev)

    def remove_device(self, dev) -> None:
        with self._lock:
            if dev in self.devices:
                self.devices.remove(dev)

    # --- going down: the API for the shell (issue 5) and the control socket ----------------
    def poweroff(self) -> None:
        """``orderly_poweroff``: asynchronous; the kernel thread does it (status poweroff, 3)."""
        self._request_down(MicStatus.POWER_OFF)

    def halt(self) -> None:
        self._request_down(MicStatus.HALTED)

    def reboot(self) -> None:
        """Report restart (4, not the kernel's SYSTEM_RESTART 5: spec 7.1 [INF]) and go down."""
        self._request_down(MicStatus.RESTART)

    def _request_down(self, status: MicStatus) -> None:
        with self._lock:
            if self._down_request is None and self.alive:
                self._down_request = status
        self._wake.set()

    def panic(self, message: str) -> None:
        """Kernel panic: log it, post EE, stop dead (nothing is sent to the host, as upstream)."""
        with self._lock:
            if self.frozen is not None or self.side.stopped.is_set():
                return
            self.frozen, self.state, self.panic_message = "panic", "panic", message
        self.printk(f"Kernel panic - not syncing: {message}")
        self.printk(f"---[ end Kernel panic - not syncing: {message} ]---")
        self.post(POST_PANIC)
        self.publish()
        self._wake.set()

    def hang(self) -> None:
        """Stop answering: no heartbeats, no interrupts, connections left open; no log line."""
        with self._lock:
            if self.frozen is not None or self.side.stopped.is_set():
                return
            self.frozen, self.state = "hang", "hung"
        self.publish()
        self._wake.set()

    def control(self, action: str, message: str = "", **args) -> dict:
        """The control socket's ``kernel`` command (test switches); ``vop`` goes to the VOP driver's."""
        if action == "vop":
            if self.vop is None:
                raise ValueError("the card OS has no VOP driver (no device page)")
            return self.vop.control(**args)
        if action == "hostile":
            from .hostile import HostileCard
            return HostileCard(self).control(**args)
        actions = {"panic": lambda: self.panic(message or "simulated panic (control socket)"),
                   "hang": self.hang, "poweroff": self.poweroff, "halt": self.halt, "reboot": self.reboot,
                   "shell": lambda: self._shell(message)}
        fn = actions.get(action)
        if fn is None:
            raise ValueError(f"unknown kernel action {action!r}; one of {', '.join(actions)}, vop, hostile")
        extra = fn() or {}
        return {"state": self.state, **extra}

    def _shell(self, line: str) -> dict:
        """The ``shell`` test switch: one command line of the card's shell, its output returned."""
        if self.drivers is None or not self.alive:
            raise ValueError(f"the card's shell is not running (kernel {self.state})")
        ok, output = self.drivers.run(line)
        return {"succeeded": ok, "output": output}

    # --- main ------------------------------------------------------------------------------
    def main(self) -> None:
        """The kernel thread: bring-up, then wait for a reset or a request to go down."""
        try:
            self._bring_up()
        except CardFault as e:
            if not self.side.stopped.is_set():
                self.panic(f"bring-up: {e}")
        except Exception as e:
            log.exception("card OS bring-up failed")
            self.panic(f"bring-up: {type(e).__name__}: {e}")
        while not self.side.stopped.is_set():
            self._wake.wait(WAIT_SLICE)
            self._wake.clear()
            status = self._down_request
            if status is not None and self.alive:
                try:
                    self._go_down(status)
                except CardFault:
                    pass  # reset while going down
                except Exception as e:
                    log.exception("card OS shutdown failed")
                    self.panic(f"shutdown: {type(e).__name__}: {e}")
        self._abandon()

    def _bring_up(self) -> None:
        side, img = self.side, self.image
        self.printk(f"{img.release} (image format {img.version}) on an X100 with {side.memory_size >> 20} MiB")
        self.printk(f"Command line: {self.cmdline}")
        for w in self.params.warnings:
            self.printk(f"Kernel command line: {w}")
        for e in self.errors:
            self.printk(f"boot: {e}")
        self.printk(f"printk: log_buf_len: {img.log_buf_len} bytes at {img.log_buf_phys:#x}")
        self.printk(f"Memory: heap [{self.heap.start:#x}, {self.heap.end:#x})")
        if self.record.get("ramdisk_size"):
            self.printk(f"RAMDISK: [mem {self.record['ramdisk_image']:#x}-"
                        f"{self.record['ramdisk_image'] + self.record['ramdisk_size'] - 1:#x}]")
        self.publish()
        found = self._probe_device_page()
        self.drivers = drivers_mod.install(self)   # the virtio drivers' module_init (node id known now)
        if not found:
            return
        dma = CardDma(side, self.heap)
        try:
            dma.probe()
            self.devices.append(dma)
            self.printk("mic_x100_dma: DMA channels 4-7 up")
            self.post(POST_DMA)
        except CardDmaError as e:
            self.errors.append(str(e))
            self.printk(f"mic_x100_dma: {e}")
        self.probe_vop(self.bootparam)
        self.scif = CardScif(self, self.bootparam)
        self.scif.probe()
        self.devices.append(self.scif)
        self.post(POST_SCIF)
        with self._lock:
            if self.state == "booting":
                self.state = "running"
        self.publish()
        while not self.scif.wait_host(WAIT_SLICE):
            if not self.alive or self._down_request is not None:
                return
        self.printk("scif: the host node 0 is up")
        self.post(POST_HOST_UP)
        self.cosm = CosmClient(self, self.scif)
        self.devices.append(self.cosm)
        self.cosm.probe()
        self.publish()

    def _probe_device_page(self) -> bool:
        side = self.side
        addr = side.spad(regs.SPAD_DPLO) | side.spad(regs.SPAD_DPHI) << 32
        self.record["device_page"] = addr
        try:
            bp = Bootparam(CardMemory(side, regs.SYSTEM_WINDOW, regs.SYSTEM_WINDOW_END - regs.SYSTEM_WINDOW,
                                      "SMPT window"), addr)
            magic = bp.magic
        except (CardFault, MemoryAccessError) as e:
            if side.stopped.is_set():
                raise
            detail = getattr(e, "detail", str(e))
            return self._bad_device_page(f"device page unreachable at {addr:#x}: {detail}", None)
        self.record["magic"] = magic
        if magic != MIC_MAGIC:
            return self._bad_device_page(f"device page magic {magic:#x} at {addr:#x}, expected {MIC_MAGIC:#x}",
                                         magic)
        self.record["magic_ok"] = True
        self.bootparam = bp
        self.printk(f"mic: device page at {addr:#x}, node id {bp.node_id}")
        self.post(POST_DEVICE_PAGE_OK)
        return True

    def _bad_device_page(self, why: str, magic: int | None) -> bool:
        self.record["magic_ok"] = False
        self.errors.append(why)
        self.printk(f"mic: {why}; no MIC devices")
        self.post(POST_DEVICE_PAGE_BAD)
        with self._lock:
            self.state = "running"
        self.publish()
        return False

    def probe_vop(self, bootparam: Bootparam) -> None:
        """The card VOP driver (spec 5.2, 5.4), between DMA and SCIF: finds the host's virtio devices."""
        vop = CardVop(self, bootparam)
        self.vop = vop
        self.devices.append(vop)
        try:
            vop.probe()
        except (CardFault, MemoryAccessError) as e:
            if self.side.stopped.is_set():
                raise
            self.errors.append(f"vop: {e}")
            self.printk(f"vop: probe failed: {e}")

    def _go_down(self, status: MicStatus) -> None:
        """``kernel_power_off`` / ``kernel_halt`` / ``kernel_restart``: notifiers, driver shutdown, dead."""
        with self._lock:
            self.state = "shutting_down"
        self.printk(f"{status.sysfs} requested: shutting down")
        self.publish()
        for fn in list(self._notifiers):
            fn(status)
        with self._lock:
            devices = list(self.devices)
        for dev in reversed(devices):
            dev.shutdown()
        self.printk(DOWN_MESSAGES[status])
        with self._lock:
            self.state = status.sysfs
        self.post(POST_DOWN[status])
        self.publish()

    def _abandon(self) -> None:
        with self._lock:
            devices = list(self.devices)
        for dev in reversed(devices):
            try:
                dev.abandon()
            except Exception as e:
                log.debug("card OS: %s after a reset: %s", dev.name, e)
        for dev in devices:
            join = getattr(dev, "join", None)
            if join is not None:
                join(5.0)
        self.state = "stopped"

    # --- the record the control socket's "os" command shows --------------------------------
    def snapshot(self) -> dict:
        bp = None
        if self.bootparam is not None and self.alive:
            try:
                b = self.bootparam
                bp = {"h2c_config_db": b.h2c_config_db, "node_id": b.node_id, "h2c_scif_db": b.h2c_scif_db,
                      "c2h_scif_db": b.c2h_scif_db, "scif_host_dma_addr": b.scif_host_dma_addr,
                      "scif_card_dma_addr": b.scif_card_dma_addr}
            except (CardFault, MemoryAccessError):
                pass
        with self._lock:
            rec = dict(self.record)
            if bp is not None:
                rec["bootparam"] = bp
            elif "bootparam" in self.record:
                rec["bootparam"] = self.record["bootparam"]
            rec.update({
                "os": "micdrv-sim-cardos", "release": self.image.release, "state": self.state,
                "frozen": self.frozen, "panic": self.panic_message, "cmdline": self.cmdline,
                "params": self.params.as_dict(),
                "image": {"version": self.image.version, "pref_address": self.image.pref_address,
                          "init_size": self.image.init_size, "log_buf_phys": self.image.log_buf_phys,
                          "log_buf_len": self.image.log_buf_len, "log_buf_len_phys": self.image.log_buf_len_phys},
                "heap": {"start": self.heap.start, "end": self.heap.end, "used": self.heap.used},
                "clock": {"offset": self.clock_offset, "synced_to": list(self.synced_to) if self.synced_to else None,
                          "time": self.time()},
                "log": self.log.status(), "lost_interrupts": self.lost_interrupts,
                "devices": {d.name: d.status() for d in self.devices}, "errors": list(self.errors),
            })
            if bp is not None:
                self.record["bootparam"] = bp
        return rec

    def publish(self) -> None:
        try:
            self.side.publish(self.snapshot())
        except Exception:
            log.exception("card OS: publishing the record")
