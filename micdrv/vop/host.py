"""VopHost: the host side of VOP for one card -- device page entries, doorbells, the backends' loop (spec 5).

What ``vop_vringh.c`` and mpssd did together, for one card:

* :meth:`VopHost.add` = ``MIC_VIRTIO_ADD_DEVICE`` (spec 5.3): the shape
  checked (num_vq <= 4, rings <= 128 entries, descriptor <= 256 bytes), a
  slot found in the host's own record of the page (:class:`~.layout.PageSlots`:
  never by reading the page, which the card can rewrite), the entry written with type 0,
  ``mic_device_ctrl`` initialised, one zeroed vring per queue in the
  DmaArena with ``_mic_vring_info.magic`` = 0xC0FFEE00 + type + index at the
  configured place (:class:`~.layout.VringInfoPlacement`), ``vqconfig.address``
  = its SMPT card address, a card->host doorbell (``next_db``) with its
  interrupt, ``c2h_vdev_db``; a full barrier; the real ``type`` written
  last; ``h2c_config_db`` rung if the card has set it;
* :meth:`VopHost.remove` (spec 5.5 "Remove"): ``config_change`` = 1, ring
  ``h2c_config_db``, wait up to 15 x 1 s for ``guest_ack``, clear both, stop
  the backend, free the vrings, ``type`` = -1. Skipped waiting when the
  card never set ``h2c_config_db`` (or ``force``: a card that will not
  answer);
* :meth:`VopHost.config_change` (spec 5.5): the backend's new config space
  copied in, ``config_change`` = 2, ring, wait up to 100 x 100 ms for
  ``guest_ack``, clear both. A backend's ``config_changed()`` runs it on a
  thread of its own;
* :meth:`VopHost.stop` removes every device (``_mic_stop``: VOP first).

Threads. Everything that touches a device's rings or its backend runs on
the host's :class:`~backends.eventloop.EventLoop` (one per card, stop eventfd
first). In MSI-X mode the loop claims each doorbell's vector
(:meth:`~micdrv.x100.interrupts.Interrupts.claim`) and dispatches it
itself -- the card's ack and workarounds (spec 2.3), then the devices --
with no hop through the card's interrupt thread; with MSI or INTx (one
shared vector) the interrupt thread dispatches, and its callback only
writes an eventfd the loop watches. The waits
of remove and config change happen on the caller's thread -- never the
loop's, which must keep answering the card's ``vdev_reset`` handshake while
the card removes its driver.

Queue interrupts to the card (``h2c_vdev_db``) are rung from the loop
without waiting (:class:`_Doorbells`): the read of spec 2.3's
read-modify-write is a round trip to the card, whose reply the loop takes
in when the card's socket becomes readable and answers with the write
[choice].

Doorbells [choice]: the kernel took an MSI-X vector per device, and the
X100 has 9 (4 go to the DMA channels, 1 to SCIF), so a fifth device failed
with -ENOSPC. Here ``next_db`` still picks each device's doorbell round robin
over the four, but each doorbell is requested once and its interrupt wakes
every device that uses it; a device with nothing to do returns at once.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field

from backends.backend import Backend
from backends.eventloop import EVENT_READ, EventLoop
from micdrv.virtio.access import full_barrier
from micdrv.virtio.device import RING_FEATURES, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from micdrv.virtio.ring import check_num, VringError

from ..bootparam import DEVICE_DESC_OFFSET, MIC_DP_SIZE
from ..pci import DmaArena, PciError
from ..x100 import X100Error, regs
from .copy import CopyPolicy
from .device import VopDevice, VopError, VringBlock
from .layout import (CTRL_CONFIG_CHANGE, CTRL_C2H_VDEV_DB, CTRL_GUEST_ACK, INFO_MAGIC, MIC_MAX_VRING_ENTRIES,
                     MIC_VIRTIO_PARAM_CONFIG_CHANGED, MIC_VIRTIO_PARAM_DEV_REMOVE, PAGE_SIZE, TYPE_REMOVED,
                     DeviceEntry, EntryShape, VopLayoutError, VringInfoPlacement, VRING_INFO_ROUNDED, check_shape,
                     PageSlots, vring_bytes, vring_info_offset, vring_magic)
from .queue import OVERFLOW_BYTES, StagingArea

log = logging.getLogger(__name__)

FEATURE_LEN = 4                 # bytes per feature bitmap: the card reads 32 bits (spec 5.1, virtio-legacy.md A)
REMOVE_TRIES, REMOVE_WAIT = 15, 1.0          # spec 5.5: remove waits up to 15 x 1 s for guest_ack
CONFIG_TRIES, CONFIG_WAIT = 100, 0.1         # spec 5.5: config change waits up to 100 x 100 ms
ACK_POLL = 0.01                 # how often a waiting caller looks at guest_ack
STAGING_BYTES = 2 << 20         # staging area per queue (see .staging) unless its backend asks for more
TRANSPORT_FEATURES = (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)


@dataclass(frozen=True)
class VopOptions:
    """The choices a VOP host makes; the card must be configured alike where noted."""

    vring_info: VringInfoPlacement = VRING_INFO_ROUNDED   # spec 5.6: host and card must agree
    ring_features: int = RING_FEATURES                    # transport bits offered besides the device's own
    copy: CopyPolicy = field(default_factory=CopyPolicy)
    staging_bytes: int = STAGING_BYTES
    staging_overflow: int = OVERFLOW_BYTES                # per queue, arena allocations beyond staging (.queue)

    def describe(self) -> dict:
        return {"vring_info": self.vring_info.value, "ring_features": self.ring_features,
                "copy": self.copy.describe(), "staging_bytes": self.staging_bytes,
                "staging_overflow": self.staging_overflow}


class _Doorbell:
    """One card->host doorbell: its interrupt, the eventfd it wakes the loop with, the devices on it."""

    def __init__(self, db: int):
        self.db = db
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.cookie: int | None = None
        self.vector_fd: int | None = None   # the interrupt's own eventfd, when the loop dispatches it
        self.devices: list[VopDevice] = []
        self.interrupts = 0


class _Doorbells:
    """Host -> card doorbells, rung from the loop without waiting for the card.

    ``send_intr`` of a doorbell below 8 is a read-modify-write of APICICR
    (spec 2.3): a register read, over vfio-user a round trip to the card,
    which the loop must not wait for. So the read goes out as a message
    whose reply comes back on the card's socket, which the loop watches
    while a ring is under way (:meth:`~micdrv.x100.card.X100.send_intr_async`);
    the write follows from the reply, on whichever thread reads it (the
    loop, or another caller of the card waiting for a reply of its own).

    A doorbell asked for again while its ring is under way is not rung
    twice: the ring's write goes after the ask (the doorbell's bit is
    cleared under the lock just before the write), and the card's handler
    looks at every used ring it serves each time it runs, so that one
    interrupt covers every completion published before the ask. The asks
    are made after the used entries are published, so the card never takes
    an interrupt before what it is for. A ring the card does not answer
    within the reply timeout is timed out and forgotten (logged), so the
    next ask rings again.

    Off the loop thread, or when register reads do not wait (mapped BAR4),
    a doorbell is rung at once, waiting for the read.
    """

    STALE = 1.0   # a ring older than this is looked after (its read timed out?) when asked again

    def __init__(self, card, loop: EventLoop, name: str):
        self.card = card
        self.loop = loop
        self.name = name
        self._lock = threading.Lock()
        self.pending = 0                          # doorbell bits whose ring is under way
        self._since = [0.0] * regs.NUM_CARD_DOORBELLS
        fd = getattr(card, "async_fd", None)
        self._fd: int | None = fd() if fd is not None else None
        self._watching = False
        self.rung = self.coalesced = 0

    def start(self) -> None:
        pass

    def ring(self, db: int) -> None:
        if self._fd is None or not self.loop.in_loop():
            self._ring_now(db)
            return
        bit = 1 << db
        with self._lock:
            busy = self.pending & bit
            if busy and time.monotonic() - self._since[db] < self.STALE:
                self.coalesced += 1
                return
        if busy:
            self._poll()                            # overdue: its timeout, if it is due, clears the bit
        with self._lock:
            if self.pending & bit:
                self.coalesced += 1
                return
            self.pending |= bit
            self._since[db] = time.monotonic()
        self.rung += 1
        try:
            waiting = self.card.send_intr_async(db, lambda error, db=db: self._sending(db, error))
        except Exception as e:   # the card went away under us: its reset tells the devices
            with self._lock:
                self.pending &= ~bit
            log.warning("%s: ringing card doorbell %d: %s", self.name, db, e)
            return
        if waiting and not self._watching:
            self._watching = True
            self.loop.watch(self._fd, EVENT_READ, self._readable)

    def pump(self) -> None:
        """Take in the answers of rings under way, if any (on the loop, between two chains of a drain): a
        ring's write waits for its read's answer, which the loop otherwise takes in only once the drain
        returns -- so the card would see a long drain's interrupts at its end, all at once."""
        if self.pending and self._watching:
            self._poll()

    def _ring_now(self, db: int) -> None:
        self.rung += 1
        try:
            self.card.send_intr(db)
        except Exception as e:   # the card went away under us: its reset tells the devices
            log.warning("%s: ringing card doorbell %d: %s", self.name, db, e)

    def _sending(self, db: int, error: BaseException | None) -> None:
        """The ring's read is answered: the write goes next (any thread). Asks from now on ring again."""
        with self._lock:
            self.pending &= ~(1 << db)
        if error is not None:
            log.warning("%s: ringing card doorbell %d: %s", self.name, db, error)

    def _poll(self) -> int:
        try:
            return self.card.poll_async()
        except Exception as e:   # the connection is dead: every ring under way was answered with the error
            log.debug("%s: taking in the card's replies: %s", self.name, e)
            return -1

    def _readable(self, _ev: int) -> None:
        """The card's socket is readable while rings are under way: take the replies in (on the loop)."""
        if not self._poll():
            time.sleep(0)   # another thread is reading the socket and routes our reply: let it run
        if self._watching and not self.card.async_pending():
            self._watching = False
            self.loop.unwatch(self._fd)

    def stop(self) -> None:
        """After the loop stopped: nothing is watched any more."""
        self._watching = False


class VopHost:
    """VOP for one card: ``card`` (X100: doorbells, SMPT, BAR0), ``arena``, the device page, ``dma``."""

    def __init__(self, card, arena: DmaArena, device_page, dma, options: VopOptions | None = None,
                 name: str = "mic"):
        self.card = card
        self.arena = arena
        self.page = device_page
        self.dma = dma
        self.options = options or VopOptions()
        self.name = name
        self.bar0 = card.aperture.memory()
        self.arena_mem = arena.memory()
        self.arena_card = card.smpt.to_card(arena.iova_base, arena.size)  # arena offset 0, for staging
        self.loop = EventLoop(f"vop {name}")
        self.doorbells = _Doorbells(card, self.loop, name)
        self.devices: list[VopDevice] = []
        self.started = False
        self._lock = threading.Lock()        # the device list and the started flag
        self._dbs: dict[int, _Doorbell] = {}
        self.slots = PageSlots()             # where our entries are: ours to know, not the page's to say
        self._closed = False
        self._loop_started = False

    # --- life ------------------------------------------------------------------------------------
    def open(self) -> "VopHost":
        """Start the event loop thread (once, for the life of the card)."""
        if not self._loop_started:
            self.loop.start()
            self.doorbells.start()
            self._loop_started = True
        return self

    def start(self) -> None:
        """``vop_register_device`` (spec 3.2 step 6): an empty device list for the card about to boot."""
        self.open()
        with self._lock:
            if self.started:
                return
            page = self.page.memory
            page.write(self.page.iova + DEVICE_DESC_OFFSET, bytes(MIC_DP_SIZE - DEVICE_DESC_OFFSET))
            self.slots.clear()
            self.started = True

    def stop(self, force: bool = False) -> None:
        """``vop_unregister_device``: remove every device (newest first); ``force`` waits for nothing."""
        with self._lock:
            self.started = False
            devices = list(self.devices)
        for dev in reversed(devices):
            try:
                self.remove(dev, force=force)
            except Exception:
                log.exception("%s: removing %s", self.name, dev.name)
        if any(d.cookie is not None for d in self._dbs.values()):
            self.loop.call(self._free_doorbells)

    def close(self) -> None:
        if self._closed:
            return
        self.stop(force=True)
        self._closed = True
        self.loop.stop()
        self.doorbells.stop()
        for d in self._dbs.values():
            os.close(d.efd)
        self._dbs = {}

    # --- add (spec 5.3) ---------------------------------------------------------------------------------
    def add(self, backend: Backend, name: str | None = None) -> VopDevice:
        """Put ``backend``'s device on the device page; the card finds it on its next scan."""
        with self._lock:
            if not self.started:
                raise VopError(f"{self.name}: VOP is not started (the card is not booting or online)", "ENODEV")
        dev = self.loop.call(self._add, backend, name or backend.name)
        backend.set_config_listener(lambda: self._config_changed(dev))
        return dev

    def _add(self, backend: Backend, name: str) -> VopDevice:
        opts = self.options
        vtype = backend.device_id
        if not 0 < vtype < 128:
            raise VopError(f"{name}: device type {vtype} does not fit the s8 type field (spec 5.1)", "EINVAL")
        sizes = []
        for i, q in enumerate(backend.queue_sizes()):
            n = min(int(q), MIC_MAX_VRING_ENTRIES)
            try:
                check_num(n)
            except VringError as e:
                raise VopError(f"{name}: queue {i}: {e}", "EINVAL") from None
            sizes.append(n)
        offered = (backend.device_features() | (opts.ring_features & TRANSPORT_FEATURES)) & 0xFFFFFFFF
        if backend.device_features() >> 32:
            log.warning("%s: feature bits above 31 (%#x) cannot be offered over VOP (spec 5.1)", name,
                        backend.device_features() & ~0xFFFFFFFF)
        config = backend.config_space()
        shape = EntryShape(len(sizes), FEATURE_LEN, len(config))
        try:
            check_shape(shape.num_vq, shape.feature_len, shape.config_len)               # step 1
            offset, reused = self.slots.find(shape)                                      # step 2
        except VopLayoutError as e:
            raise VopError(f"{name}: {e}", "ENOSPC" if "past" in str(e) else "EINVAL") from None
        entry = DeviceEntry(self.page.memory, self.page.iova, offset, shape)
        # Until the real type goes in last, a reused slot stays "removed" (-1) and a new one "end" (0):
        # a card scanning meanwhile never sees the list cut short or a half-made entry [choice: upstream
        # writes 0 in both cases].
        placeholder = TYPE_REMOVED if reused else 0
        entry.write_header(placeholder)
        entry.set_host_features(offered.to_bytes(FEATURE_LEN, "little"))
        entry.set_guest_acks(bytes(FEATURE_LEN))
        entry.set_config(config)
        entry.init_ctrl()                                                                # step 3
        vrings: list[VringBlock] = []
        staging: list[StagingArea] = []
        try:
            for i, num in enumerate(sizes):                                              # step 4
                size = vring_bytes(num)
                a = self.arena.alloc(size, PAGE_SIZE)
                iova = self.arena.iova(a)
                self.arena.view[a.offset:a.offset + size] = bytes(size)
                info = iova + vring_info_offset(num, opts.vring_info)
                self.arena_mem.write(info + INFO_MAGIC, struct.pack("<I", vring_magic(vtype, i)))
                card_addr = self.card.smpt.to_card(iova, size)
                vrings.append(VringBlock(a, iova, card_addr, num, info))
                entry.set_vq(i, card_addr, num)
                staging.append(StagingArea(self.arena, backend.staging_bytes(i) or opts.staging_bytes, self.arena_card,
                                           opts.staging_overflow))
        except BaseException:
            for v in vrings:
                self.arena.free(v.alloc)
            for s in staging:
                s.close()
            entry.type = placeholder
            raise
        db = self.card.next_db()                                                         # step 5
        dev = VopDevice(self, backend, name, entry, vrings, staging, db, offered)
        self._attach_doorbell(dev)
        entry.set_ctrl_u8(CTRL_C2H_VDEV_DB, db)
        full_barrier()                                                                   # step 6
        entry.type = vtype
        self.slots.occupy(offset, shape)
        with self._lock:
            self.devices.append(dev)
        log.info("%s: added %s (type %d, %d queues, features %#x) at offset %d, doorbell %d", self.name, name,
                 vtype, len(sizes), offered, offset, db)
        self._ring_config_db("add")                                                      # step 7
        return dev

    # --- the config doorbell ------------------------------------------------------------------------------
    def _ring_config_db(self, why: str) -> int:
        """Ring ``bootparam.h2c_config_db`` if the card set it; returns it (-1: the card does not listen)."""
        full_barrier()   # our entry stores before reading what the card wrote (the card does the mirror image)
        db = self.page.bootparam.h2c_config_db
        if db == -1:
            return -1
        if not 0 <= db < regs.NUM_CARD_DOORBELLS:
            log.warning("%s: bootparam.h2c_config_db is %d, no card doorbell; not rung (%s)", self.name, db, why)
            return -1
        self.card.send_intr(db)
        return db

    # --- remove (spec 5.5 "Remove") -----------------------------------------------------------------------
    def remove(self, dev: VopDevice, force: bool = False) -> None:
        """Take ``dev`` off the device page, after the card let go of it (``guest_ack``) unless ``force``."""
        if self.loop.in_loop():
            force = True   # never wait on the loop thread: the card's reset handshake needs it
        with dev.handshake:
            if dev.removed:
                return
            db = self.loop.call(self._begin_remove, dev)
            how = "acknowledged" if db != -1 and not force else "without waiting"
            if db != -1 and not force:
                how = self._wait_ack(dev, REMOVE_TRIES * REMOVE_WAIT)
                if how == "timed out":
                    log.warning("%s: the card did not acknowledge the removal of %s within %g s", self.name,
                                dev.name, REMOVE_TRIES * REMOVE_WAIT)
            self.loop.call(self._finish_remove, dev)
        log.info("%s: removed %s (%s)", self.name, dev.name, how)

    def _begin_remove(self, dev: VopDevice) -> int:
        dev.entry.set_ctrl_u8(CTRL_CONFIG_CHANGE, MIC_VIRTIO_PARAM_DEV_REMOVE)
        try:
            return self._ring_config_db(f"remove {dev.name}")
        except (PciError, X100Error) as e:
            # The card cannot be reached (gone from the bus): it will acknowledge nothing, but the host's
            # side of the device (backend, rings, staging, doorbell) must still go.
            log.warning("%s: removing %s: cannot ring the card's config doorbell: %s", self.name, dev.name, e)
            return -1

    def _finish_remove(self, dev: VopDevice) -> None:
        e = dev.entry
        e.set_ctrl_u8(CTRL_CONFIG_CHANGE, 0)
        e.set_ctrl_u8(CTRL_GUEST_ACK, 0)
        dev.detach()
        dev.backend.set_config_listener(None)
        self._detach_doorbell(dev)
        for v in dev.vrings:
            self.arena.free(v.alloc)
        for s in dev.staging:
            s.close()
        dev.release_views()
        full_barrier()
        e.type = TYPE_REMOVED
        self.slots.release(e.offset)
        with self._lock:
            if dev in self.devices:
                self.devices.remove(dev)

    def _wait_ack(self, dev: VopDevice, timeout: float) -> str:
        """Wait for ``guest_ack``: "acknowledged", "timed out", or "the card stopped listening" -- its VOP
        driver withdrew ``h2c_config_db`` (it shuts down) and will answer nothing more."""
        deadline = time.monotonic() + timeout
        while not dev.entry.ctrl_u8(CTRL_GUEST_ACK):
            if self.page.bootparam.h2c_config_db == -1:
                return "the card stopped listening"
            if time.monotonic() > deadline:
                return "timed out"
            time.sleep(ACK_POLL)
        return "acknowledged"

    # --- config change (spec 5.5) -------------------------------------------------------------------------
    def config_change(self, dev: VopDevice) -> None:
        """Copy the backend's config space in and tell the card; raises :class:`VopError` if it does not ack."""
        if self.loop.in_loop():
            raise VopError(f"{dev.name}: a config change waits for the card; not on the loop thread", "EDEADLK")
        with dev.handshake:
            if dev.removed:
                raise VopError(f"{dev.name}: removed", "ENODEV")
            db = self.loop.call(self._begin_config_change, dev)
            if db == -1:
                self.loop.call(self._end_config_change, dev)
                raise VopError(f"{dev.name}: the card has no config doorbell (h2c_config_db is -1)", "EIO")
            how = self._wait_ack(dev, CONFIG_TRIES * CONFIG_WAIT)
            self.loop.call(self._end_config_change, dev)
        if how != "acknowledged":
            raise VopError(f"{dev.name}: the card did not acknowledge the config change "
                           f"({how}; {CONFIG_TRIES * CONFIG_WAIT:g} s at most)", "ETIMEDOUT")
        log.info("%s: config change of %s acknowledged", self.name, dev.name)

    def _begin_config_change(self, dev: VopDevice) -> int:
        e = dev.entry
        e.set_config(dev.backend.config_space())
        dev.counters["config_changes"] += 1
        e.set_ctrl_u8(CTRL_CONFIG_CHANGE, MIC_VIRTIO_PARAM_CONFIG_CHANGED)
        return self._ring_config_db(f"config change of {dev.name}")

    def _end_config_change(self, dev: VopDevice) -> None:
        dev.entry.set_ctrl_u8(CTRL_CONFIG_CHANGE, 0)
        dev.entry.set_ctrl_u8(CTRL_GUEST_ACK, 0)

    def _config_changed(self, dev: VopDevice) -> None:
        """A backend's config listener: the handshake on a thread of its own (it waits for the card)."""
        def run() -> None:
            try:
                self.config_change(dev)
            except VopError as e:
                log.warning("%s: %s", self.name, e)
        threading.Thread(target=run, name=f"{self.name} config change", daemon=True).start()

    # --- doorbells --------------------------------------------------------------------------------------
    def _attach_doorbell(self, dev: VopDevice) -> None:
        d = self._dbs.get(dev.db)
        if d is None:
            d = self._dbs[dev.db] = _Doorbell(dev.db)
        if d.cookie is None:
            efd, in_loop = d.efd, self.loop.in_loop

            def interrupt(d=d, efd=efd) -> None:
                if in_loop():                 # the loop dispatched the vector itself (claimed, below)
                    self._serve_doorbell(d)
                else:                         # the card's interrupt thread: just wake the loop
                    os.eventfd_write(efd, 1)
            d.cookie = self.card.request_doorbell(dev.db, interrupt, f"vop {self.name} db{dev.db}")
            self.loop.watch(efd, EVENT_READ, lambda _ev, d=d: self._rang(d))
            claim = getattr(self.card, "claim_irq", None)
            fd = claim(d.cookie) if claim is not None and self.loop.in_loop() else None
            if fd is not None:
                d.vector_fd = fd
                self.loop.watch(fd, EVENT_READ, lambda _ev, fd=fd: self._vector(fd))
        d.devices.append(dev)

    def _detach_doorbell(self, dev: VopDevice) -> None:
        d = self._dbs.get(dev.db)
        if d is not None and dev in d.devices:
            d.devices.remove(dev)

    def _rang(self, d: _Doorbell) -> None:
        try:
            os.eventfd_read(d.efd)
        except BlockingIOError:
            return
        self._serve_doorbell(d)

    def _serve_doorbell(self, d: _Doorbell) -> None:
        d.interrupts += 1
        for dev in list(d.devices):
            dev.service()

    def _vector(self, fd: int) -> None:
        """The doorbell's MSI-X vector fired: the card's dispatch (ack, workarounds, spec 2.3) on this loop;
        its callback serves the devices right here."""
        try:
            self.card.dispatch_irq(fd)
        except Exception as e:   # the card went away under us: its reset tells the devices
            log.warning("%s: dispatching card interrupt fd %d: %s", self.name, fd, e)

    def _free_doorbells(self) -> None:
        for d in self._dbs.values():
            if d.cookie is not None and not d.devices:
                self.loop.unwatch(d.efd)
                if d.vector_fd is not None:
                    self.loop.unwatch(d.vector_fd)
                    d.vector_fd = None
                try:
                    self.card.free_irq(d.cookie)
                except Exception as e:
                    log.debug("%s: freeing doorbell %d: %s", self.name, d.db, e)
                d.cookie = None

    def kick(self, dev: VopDevice) -> None:
        """Service ``dev`` as if its doorbell rang (tests; a lost interrupt)."""
        self.loop.call(dev.service)

    # --- what micctl shows --------------------------------------------------------------------------------
    def find(self, name: str) -> VopDevice | None:
        with self._lock:
            return next((d for d in self.devices if d.name == name), None)

    def status(self) -> dict:
        with self._lock:
            devices = list(self.devices)
        return {"started": self.started, "options": self.options.describe(),
                "doorbells": {str(d.db): {"interrupts": d.interrupts, "devices": [x.name for x in d.devices]}
                              for d in self._dbs.values()},
                "card_doorbells": {"rung": self.doorbells.rung, "coalesced": self.doorbells.coalesced},
                "devices": [self.loop.call(d.status) for d in devices]}
