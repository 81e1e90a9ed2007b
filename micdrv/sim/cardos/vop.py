"""The card's VOP driver: finds the host's virtio devices on the device page and binds drivers (spec 5.2, 5.4).

:class:`CardVop` is the card kernel's ``vop_main.c`` bus driver:

* :meth:`CardVop.probe` (from :meth:`Kernel.probe_vop`, between DMA and
  SCIF): scan the device page from offset 24 (type 0 ends the list, -1 is
  a removed slot), take a config doorbell (the least used of the 16) and
  write it to ``bootparam.h2c_config_db``, then scan once more -- upstream
  scanned only before publishing the doorbell, so a device the host added in
  between went unseen until the next ring [choice: close that window];
* each new entry becomes a :class:`~.vop_device.CardVopDevice`: its own
  doorbell into ``ctrl.h2c_vdev_db``, ``c2h_vdev_db`` read, status
  ACKNOWLEDGE, and the driver registered for its type
  (:func:`~.virtio_bus.match`) probed with DRIVER set; ``ctrl.vdev`` written;
* the host rings ``h2c_config_db`` on every add, remove and config change:
  a hot-plug thread scans again -- ``config_change`` 2 calls the driver's
  ``config_changed()`` and acks (``guest_ack`` = 1); 1 removes the device
  (driver ``remove()``, a reset if it was live, ``h2c_vdev_db`` = -1,
  ``guest_ack`` = 1, ``type`` = -1); new entries are probed;
* :meth:`CardVop.shutdown` (orderly power-off): ``h2c_config_db`` = -1, so
  the host skips its removal waits, then every driver removed and every
  device reset; :meth:`CardVop.abandon` (card reset): stop, touch nothing.

The host's page is checked like any input (:func:`micdrv.vop.layout.scan`
refuses malformed entries; :class:`~.vop_device.CardVopDevice` checks rings
and doorbells); a bad entry is logged and refused, the others work.

Test switches (:meth:`CardVop.control`, the simulator's ``vop`` command):
the card turned hostile, to check the host survives it -- descriptors out of
card memory (``bad_desc``), a used ring outside card memory
(``used_address``), a doorbell out of range (``h2c_db``), a doorbell storm
(``storm``) -- and ``driver`` to reach a driver's own switches.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from micdrv.bootparam import Bootparam
from micdrv.memory import MemoryAccessError
from micdrv.virtio.device import (DEVICE_NAMES, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                                  VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_ID_NET)
from micdrv.virtio.ring import DESC, VRING_DESC_F_NEXT
from micdrv.vop import layout as L
from micdrv.x100 import regs

from ..bus import CardFault
from . import virtio_bus
from .memory import CardMemory
from .vop_device import CardVopDevice, CardVopError

if TYPE_CHECKING:
    from .kernel import Kernel

log = logging.getLogger(__name__)

WAIT_SLICE = 0.1
# Devices whose interrupt runs right after the host's doorbell write, in the thread that took it: virtio-net,
# whose interrupt polls (NAPI, as Linux's softirq right after the hard interrupt), so a batch of frames costs
# no thread hand-off. The others' interrupts (block completions, console input) run in the doorbell thread,
# so the host's next commands (the DMA of the next requests) are taken meanwhile [choice: measured, blk
# sequential writes 10-15 % slower inline].
INLINE_INTERRUPTS = frozenset({VIRTIO_ID_NET})


class RingMemory(CardMemory):
    """Card memory whose :meth:`view` maps a range held by one backing: how the transport reaches its rings,
    and drivers their buffers.

    A ring index is touched a few times per packet; through the card bus
    each touch is a translated, checked copy, through a view it is one
    load or store -- as a card kernel's ``ioremap`` of the vring is. The
    ring views are taken while this card OS runs [choice: a card reset does
    not revoke them, but it stops the OS's threads, whose next buffer access
    raises CardOSStopped]. Buffers (:attr:`CardVop.gddr`) are reached the
    same way but through short-lived views (one per access, or one per
    receive batch for virtio-net's buffers), each taken through
    :meth:`CardSide.view`, which refuses once this OS stopped as every bus
    access does: a frame is read and written in place instead of being
    copied out of and into card memory.
    """

    def view(self, addr: int, n: int) -> memoryview | None:
        self.check(addr, n, "view")
        try:
            return self.side.view(addr, n, write=True)
        except CardFault:
            return None


class CardVop:
    """The VOP bus driver of the card OS."""

    name = "vop"

    def __init__(self, kernel: "Kernel", bootparam: Bootparam):
        self.kernel = kernel
        self.side = kernel.side
        self.heap = kernel.heap
        self.bootparam = bootparam
        self.dp = bootparam.addr
        self.smpt = CardMemory(self.side, regs.SYSTEM_WINDOW, regs.SYSTEM_WINDOW_END - regs.SYSTEM_WINDOW,
                               "SMPT window")
        self.gddr = RingMemory(self.side, 0, self.side.memory_size, "GDDR")     # drivers' buffers
        # The rings themselves (desc/avail through the SMPT, the used rings in GDDR) as mapped views.
        self.ring_smpt = RingMemory(self.side, regs.SYSTEM_WINDOW, regs.SYSTEM_WINDOW_END - regs.SYSTEM_WINDOW,
                                    "SMPT window (rings)")
        self.ring_gddr = RingMemory(self.side, 0, self.side.memory_size, "GDDR (rings)")
        self.page = self.smpt.window(self.dp, L.MIC_DP_SIZE, "device page")
        self.placement = L.VringInfoPlacement(kernel.params.vring_info)
        self.devices: dict[int, CardVopDevice] = {}    # by entry offset
        self.removed: list[dict] = []                   # what removed devices looked like, for the record
        self.refused: dict[int, str] = {}               # offset -> why (logged once)
        self.config_db: int | None = None
        self.scans = 0
        self.config_interrupts = 0
        self._next_index = 0
        # Two locks, never held together the other way round: ``_scan`` serialises scans, adds and removes
        # (held across driver probes, which take the kernel's lock); ``_lock`` guards the device table and
        # the doorbell users for a moment (status() takes it while the kernel's lock is held).
        self._scan = threading.RLock()
        self._lock = threading.Lock()
        self._db_users: dict[int, list] = {}            # card doorbell -> our handlers on it
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None

    def printk(self, text: str) -> None:
        self.kernel.printk(text)

    # --- probe ---------------------------------------------------------------------------------
    def probe(self) -> None:
        self.scan()
        db = self.side.least_used_doorbell()
        self._request_db(db, self._config_interrupt)
        self.config_db = db
        self.bootparam.h2c_config_db = db
        self.printk(f"vop: config doorbell {db}, {len(self.devices)} device(s) found")
        self._worker = threading.Thread(target=self._hotplug, name="card vop hotplug", daemon=True)
        self._worker.start()
        self._wake.set()      # the second scan, in the hot-plug thread (see the module docstring)

    def _config_interrupt(self) -> None:
        self.config_interrupts += 1
        self._wake.set()

    def _hotplug(self) -> None:
        while not self._stopping.is_set() and not self.side.stopped.is_set():
            if not self._wake.wait(WAIT_SLICE):
                continue
            self._wake.clear()
            if not self.kernel.alive:
                continue
            try:
                self.scan()
            except CardFault as e:
                if self.side.stopped.is_set():
                    return
                # the host's memory went away under the scan (a host that disconnected or unmapped its
                # DMA meanwhile): one line, and the next config doorbell scans again
                log.warning("card vop: scan: %s", e)
            except Exception:
                log.exception("card vop: scan")

    # --- doorbells -----------------------------------------------------------------------------
    def _request_db(self, db: int, fn, inline: bool = False) -> None:
        """``fn()`` on every ring of ``db``; ``inline`` (the doorbell's first user decides): right after the host's
        write instead of in the doorbell thread (:class:`~micdrv.sim.doorbells.CardDoorbells`)."""
        with self._lock:
            users = self._db_users.setdefault(db, [])
            if not users:
                self.side.request_doorbell(db, self.kernel.irq_handler(lambda db=db: self._dispatch(db)), inline)
            users.append(fn)

    def _release_db(self, db: int, fn) -> None:
        with self._lock:
            users = self._db_users.get(db, [])
            if fn in users:
                users.remove(fn)
            if not users and db in self._db_users:
                del self._db_users[db]
                self.side.free_doorbell(db)

    def _dispatch(self, db: int) -> None:
        for fn in list(self._db_users.get(db, ())):
            try:
                fn()
            except CardFault:
                if not self.side.stopped.is_set():
                    log.exception("card vop: doorbell %d handler", db)
            except Exception:
                log.exception("card vop: doorbell %d handler", db)

    # --- scanning (spec 5.2) ----------------------------------------------------------------------
    def scan(self) -> None:
        """``vop_scan_devices``: config changes and removals of known devices, then new ones."""
        with self._scan:
            self.scans += 1
            found = []
            try:
                for e in L.scan(self.page, self.dp):
                    found.append(e)
            except L.VopLayoutError as ex:
                self._refuse(-1, f"device page: {ex}")
            seen = set()
            for e in found:
                seen.add(e.offset)
                with self._lock:
                    dev = self.devices.get(e.offset)
                if dev is not None and dev.entry.shape != e.shape:
                    self._drop(dev, "its entry changed shape under it")
                    dev = None
                if dev is not None:
                    self._known(dev, e)
                else:
                    self._new(e)
            with self._lock:
                known = list(self.devices.items())
            for off, dev in known:
                if off not in seen:
                    self._drop(dev, "its entry is gone from the device page")

    def _known(self, dev: CardVopDevice, e: L.DeviceEntry) -> None:
        if e.type == L.TYPE_REMOVED:
            self._drop(dev, "the host marked it removed without the hand-shake")
            return
        cc = e.ctrl_u8(L.CTRL_CONFIG_CHANGE)
        if cc == L.MIC_VIRTIO_PARAM_DEV_REMOVE:
            self.remove(dev, hot=True)
        elif cc == L.MIC_VIRTIO_PARAM_CONFIG_CHANGED and not e.ctrl_u8(L.CTRL_GUEST_ACK):
            if dev.driver is not None:
                try:
                    dev.driver.config_changed()
                except Exception as ex:
                    log.exception("card vop: %s config_changed", dev.name)
                    self.printk(f"vop: {dev.name}: config_changed failed: {ex}")
            e.set_ctrl_u8(L.CTRL_GUEST_ACK, 1)
            self.printk(f"vop: {dev.name}: config changed")

    def _new(self, e: L.DeviceEntry) -> None:
        t = e.type
        if t == L.TYPE_REMOVED or t <= 0:
            return
        if e.ctrl_u8(L.CTRL_CONFIG_CHANGE) == L.MIC_VIRTIO_PARAM_DEV_REMOVE:
            e.set_ctrl_u8(L.CTRL_GUEST_ACK, 1)   # removed before we ever used it: nothing to let go of
            return
        if e.offset in self.refused:
            return
        index = self._next_index
        try:
            dev = CardVopDevice(self, e, index)
        except CardVopError as ex:
            self._refuse(e.offset, f"device type {t} at offset {e.offset}: {ex}")
            return
        self._next_index += 1
        with self._lock:
            self.devices[e.offset] = dev
        dev.h2c_db = self.side.least_used_doorbell()
        self._request_db(dev.h2c_db, dev.interrupt, inline=t in INLINE_INTERRUPTS)
        e.set_ctrl_u8(L.CTRL_H2C_VDEV_DB, dev.h2c_db)
        e.vdev = 0xFFFF_8800_0000_0000 | (index + 1) << 12     # our "kernel pointer": opaque to the host
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        kind = DEVICE_NAMES.get(t, f"type {t}")
        factory = virtio_bus.match(t)
        if factory is None:
            dev.state = "no driver"
            self.printk(f"vop: {dev.name}: {kind} device at offset {e.offset}, no driver")
            return
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        driver = factory()
        dev.driver = driver
        try:
            driver.probe(dev)
        except (CardVopError, Exception) as ex:
            if self.side.stopped.is_set():
                raise
            dev.state = "failed"
            dev.error = f"{type(ex).__name__}: {ex}"
            errno = getattr(ex, "errno", "")
            self.printk(f"vop: {dev.name}: {kind} driver {getattr(driver, 'name', '?')} probe failed"
                        f"{' (-' + errno + ')' if errno else ''}: {ex}")
            try:
                dev.entry.status = dev.entry.status | VIRTIO_CONFIG_S_FAILED
                dev.ring_host()
            except CardFault:
                pass
            return
        if not dev.get_status() & VIRTIO_CONFIG_S_DRIVER_OK:
            dev.set_status(dev.get_status() | VIRTIO_CONFIG_S_DRIVER_OK)   # the core after a successful probe
        dev.state = "probed"
        self.printk(f"vop: {dev.name}: {kind} device at offset {e.offset}, driver {getattr(driver, 'name', '?')}, "
                    f"doorbells h2c {dev.h2c_db} c2h {dev.c2h_db}")

    def _refuse(self, offset: int, why: str) -> None:
        if self.refused.get(offset) != why:
            self.refused[offset] = why
            self.printk(f"vop: {why}; refused")

    # --- removal -------------------------------------------------------------------------------------
    def remove(self, dev: CardVopDevice, hot: bool) -> None:
        """The host's remove (spec 5.4 "Remove"); without ``hot`` (shutdown) the entry is left alone."""
        with self._scan:
            was_live = dev.entry.status & VIRTIO_CONFIG_S_DRIVER_OK
            self._unbind(dev)
            if was_live and dev.vqs:
                dev.reset()
            elif was_live:
                dev.entry.status = 0
            e = dev.entry
            e.set_ctrl_u8(L.CTRL_H2C_VDEV_DB, 0xFF)
            if not hot and e.ctrl_u8(L.CTRL_CONFIG_CHANGE) == L.MIC_VIRTIO_PARAM_DEV_REMOVE:
                hot = True          # the host asked for it meanwhile: answer as a hot remove
            if hot:
                e.set_ctrl_u8(L.CTRL_GUEST_ACK, 1)
                e.type = L.TYPE_REMOVED
            self._forget(dev, "removed by the host" if hot else "shut down")

    def _drop(self, dev: CardVopDevice, why: str) -> None:
        """The entry vanished without a hand-shake: stop using it, write nothing to it."""
        dev.gone = True
        self._unbind(dev)
        dev.reset()
        self._forget(dev, why)

    def _unbind(self, dev: CardVopDevice) -> None:
        if dev.h2c_db is not None:
            self._release_db(dev.h2c_db, dev.interrupt)
        if dev.driver is not None and dev.state == "probed":
            try:
                dev.driver.remove()
            except CardFault:
                if self.side.stopped.is_set():
                    raise
            except Exception as ex:
                log.exception("card vop: %s remove", dev.name)
                self.printk(f"vop: {dev.name}: driver remove failed: {ex}")

    def _forget(self, dev: CardVopDevice, why: str) -> None:
        dev.state = "removed"
        rec = dev.status()
        rec["why"] = why
        with self._lock:
            self.devices.pop(dev.entry.offset, None)
            self.removed.append(rec)
            del self.removed[:-16]
        self.printk(f"vop: {dev.name}: {why}")

    # --- the kernel's device interface -----------------------------------------------------------------
    def shutdown(self) -> None:
        self._stopping.set()
        with self._scan:
            try:
                self.bootparam.h2c_config_db = L.DB_NONE
            except (CardFault, MemoryAccessError):
                return
            if self.config_db is not None:
                self._release_db(self.config_db, self._config_interrupt)
            with self._lock:
                devices = sorted(self.devices.values(), key=lambda d: -d.entry.offset)
            for dev in devices:
                self.remove(dev, hot=False)

    def abandon(self) -> None:
        self._stopping.set()

    def join(self, timeout: float) -> None:
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def status(self) -> dict:
        with self._lock:
            devices = sorted(self.devices.values(), key=lambda d: d.entry.offset)
            removed = list(self.removed)
        return {"config_db": self.config_db, "placement": self.placement.value, "scans": self.scans,
                "config_interrupts": self.config_interrupts, "devices": [d.status() for d in devices],
                "removed": removed, "refused": {str(k): v for k, v in self.refused.items()}}

    # --- test switches: a hostile card --------------------------------------------------------------------
    def find_device(self, which) -> CardVopDevice:
        with self._lock:
            devices = sorted(self.devices.values(), key=lambda d: d.entry.offset)
        if isinstance(which, int) and not isinstance(which, bool):
            for d in devices:
                if d.index == which:
                    return d
        elif isinstance(which, str):
            for d in devices:
                if DEVICE_NAMES.get(d.device_id) == which or d.name == which:
                    return d
        raise ValueError(f"no VOP device {which!r} on the card")

    def control(self, switch: str = "", device=None, **args) -> dict:
        """A test switch (see the module docstring); returns what it did."""
        if switch == "rescan":
            self._wake.set()
            return {}
        dev = self.find_device(device)
        if switch == "storm":
            n = int(args.get("count", 1000))
            for _ in range(n):
                dev.ring_host()
            return {"rung": n}
        if switch == "driver":
            fn = getattr(dev.driver, "control", None)
            if fn is None:
                raise ValueError(f"{dev.name}'s driver has no test switches")
            return fn(**args)
        if switch == "used_address":
            q = int(args.get("queue", 0))
            dev.entry.set_used_address(q, int(args["address"]))
            dev.entry.set_ctrl_u8(L.CTRL_USED_ADDRESS_UPDATED, 1)
            dev.ring_host()
            return {}
        if switch == "reset":
            dev.reset()
            return {}
        if switch == "h2c_db":
            dev.entry.set_ctrl_u8(L.CTRL_H2C_VDEV_DB, int(args["db"]))
            return {}
        if switch == "bad_desc":
            return self._bad_desc(dev, int(args.get("queue", 0)), str(args.get("kind", "addr")))
        raise ValueError(f"unknown vop switch {switch!r}: storm, driver, used_address, h2c_db, bad_desc, reset, "
                         f"rescan")

    def _bad_desc(self, dev: CardVopDevice, q: int, kind: str) -> dict:
        """Post something vringh must refuse on queue ``q``, straight into the ring, and kick."""
        vq = dev.vqs[q]
        ring = vq.ring
        num = ring.num
        addr = dev.entry.vq_address(q)
        desc, avail = addr, addr + 16 * num
        mem = self.smpt
        size = self.side.memory_size
        d = num - 1                                 # a descriptor slot we take over (the card is hostile)
        if kind == "addr":
            mem.write(desc + 16 * d, DESC.pack(size + 0x10000, 64, 0, 0))         # beyond card memory
        elif kind == "len":
            mem.write(desc + 16 * d, DESC.pack(size - 64, 4096, 0, 0))            # runs past the end
        elif kind == "next":
            mem.write(desc + 16 * d, DESC.pack(size // 2, 64, VRING_DESC_F_NEXT, num + 3))
        elif kind == "wrap":
            mem.write(desc + 16 * d, DESC.pack((1 << 64) - 64, 128, 0, 0))        # wraps around 2**64
        elif kind == "host":
            mem.write(desc + 16 * d, DESC.pack(regs.SYSTEM_WINDOW, 64, 0, 0))     # host memory, not card memory
        elif kind == "huge":
            mem.write(desc + 16 * d, DESC.pack(1 << 20, min(size - (1 << 20), 64 << 20), 0, 0))  # inside, too big
        elif kind not in ("head", "avail"):
            raise ValueError(f"bad_desc kind {kind!r}: addr, len, next, wrap, host, huge, head, avail")
        idx = int.from_bytes(mem.read(avail + 2, 2), "little")
        if kind == "avail":
            mem.write(avail + 2, ((idx + 1000) & 0xFFFF).to_bytes(2, "little"))
        else:
            head = num + 7 if kind == "head" else d
            mem.write(avail + 4 + 2 * (idx % num), head.to_bytes(2, "little"))
            mem.write(avail + 2, ((idx + 1) & 0xFFFF).to_bytes(2, "little"))
        dev.ring_host()
        return {"kind": kind, "queue": q}
