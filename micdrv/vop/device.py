"""One virtio device on the device page, host side: its entry, vrings, handshakes and backend (spec 5.3-5.5).

A :class:`VopDevice` is what ``MIC_VIRTIO_ADD_DEVICE`` created in the kernel
(a ``vop_vdev``): a device page entry, one vring per queue in the DmaArena
with its ``_mic_vring_info``, a card->host doorbell, and here also the
backend it serves. :class:`~.host.VopHost` creates and removes them; this
module is what happens in between, on the VOP event loop's thread, each
time the device's doorbell rings (spec 5.5):

1. ``used_address_updated``: each queue's used ring moves to the card
   physical address the card wrote in ``vqconfig.used_address`` -- checked
   first (inside card memory, 4-byte aligned, room for ``num`` entries) --
   then the flag is cleared;
2. ``vdev_reset``: the backend is reset, ``status`` = 0, ``vdev_reset`` = 0,
   every ring index and ``info.avail_idx`` back to 0, then ``host_ack`` = 1
   (the card polls for it);
3. the status byte: on DRIVER_OK (or on a kick once the used rings moved:
   legacy drivers may kick before DRIVER_OK) the queues are built with the
   features the card acked and the backend is activated;
4. every queue of an active device is kicked (the doorbell does not say
   which queue; the kernel woke every poller too).

Batches a queue copies in from the card without waiting
(:meth:`~.queue.VopQueue.pop_start`) are looked after by a one-shot timer
on the loop (:meth:`VopDevice._poll_incoming`): a look at the DMA status
words per expiry, the channels' error registers read while a batch is
slow, the backend resumed once its batch is in. The same timer publishes
a lazy queue's completions whose copies to the card were still running when
its drain returned (:meth:`~.queue.VopQueue.outgoing`).

Everything the card writes is checked before use: the rings by
:class:`~micdrv.virtio.Vringh`, used addresses here, the doorbell the card
asks to be rung (``h2c_vdev_db``, 0..15 or -1). A violation *breaks* the
device: logged once, its backend reset (parked), nothing more processed
until the card resets the device with the ``vdev_reset`` handshake. The
daemon and the other devices carry on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from backends.backend import Backend
from backends.eventloop import EVENT_READ, DeviceFds, Handler, TimerFd
from micdrv.virtio import VringError, VringLayout, Vringh
from micdrv.virtio.access import ring_part
from micdrv.virtio.device import (DEVICE_NAMES, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
                                  VIRTIO_CONFIG_S_FAILED)
from micdrv.virtio.ring import AVAIL_IDX, USED_ALIGN, used_size

from ..memory import MemoryAccessError
from ..pci import Allocation
from ..x100 import regs
from .copy import CopyEngine, VopCopyError
from .layout import (CTRL_H2C_VDEV_DB, CTRL_HOST_ACK, CTRL_USED_ADDRESS_UPDATED, CTRL_VDEV_RESET,
                     MIC_VIRTIO_RING_ALIGN, DeviceEntry)
from .queue import StagingArea, VopQueue

log = logging.getLogger(__name__)

# Polling a batch that copies in from the card (VopDevice._poll_incoming) [choice]: the first look after
# a delay that adapts between POLL_MIN and POLL_FIRST_MAX (starting at POLL_FIRST), then every POLL_MIN
# doubling to POLL_MAX. Each look is one wake-up of the loop; DmaEngine's own waits sleep in the same range.
POLL_FIRST = 0.00005
POLL_FIRST_MAX = 0.001
POLL_MIN = 0.00001
POLL_MAX = 0.0002

# What breaks a device: the card broke the protocol (rings, addresses), a copy failed, or its backend failed.
DEVICE_ERRORS = (VringError, VopCopyError, MemoryAccessError, ValueError)


class VopError(Exception):
    """A VOP operation that cannot be done (the device is gone, the card does not answer); errno-like code."""

    def __init__(self, message: str, errno: str = "EIO"):
        super().__init__(message)
        self.errno = errno


@dataclass
class VringBlock:
    """One vring the host allocated (spec 5.3 step 4): ``vr_size`` bytes of the arena."""

    alloc: Allocation
    iova: int          # desc table, then avail (then the legacy used area), then _mic_vring_info
    card: int          # vqconfig.address: where the card reaches it through the SMPT
    num: int
    info: int          # IOVA of _mic_vring_info


class VopDevice:
    """A device added to the device page; methods without a leading underscore are for :class:`VopHost`."""

    def __init__(self, host, backend: Backend, name: str, entry: DeviceEntry, vrings: list[VringBlock],
                 staging: list[StagingArea], db: int, offered: int):
        self.host = host
        self.backend = backend
        self.name = name
        self.entry = entry
        self.vrings = vrings
        self.staging = staging
        self.db = db                      # c2h_vdev_db: the card->host doorbell the card rings for us
        self.offered = offered            # the 32-bit host feature word in the entry
        self.type = backend.device_id
        self.engine = CopyEngine(host.bar0, host.dma, host.options.copy, name)
        self.acked = 0
        self.used: list[int | None] = [None] * len(vrings)   # card addresses of the relocated used rings
        self.queues: list[VopQueue] = []
        self.active = False
        self.broken: str | None = None
        self.removed = False
        self.handshake = threading.Lock()  # one config change or removal at a time (spec 5.5)
        self._fds = DeviceFds(host.loop, self.guarded)
        # The poller for batches copying in from the card (VopQueue.pop_start): a timer on the loop, so the
        # loop serves the tap and the other queues while the engine copies; see _poll_incoming.
        self._timer = TimerFd()
        self._pause = POLL_MIN
        self._first = POLL_FIRST          # when the first look at a new batch is due (adapted, see _poll_incoming)
        self._looks = 0                   # looks at the batches under way so far
        self._failed_logged = False
        self._info_views = [host.arena.view[host.arena.offset_of(v.info, 2):
                                            host.arena.offset_of(v.info, 2) + 2].cast("H") for v in vrings]
        self.counters = dict.fromkeys(("wakeups", "activations", "resets", "used_relocations", "config_changes",
                                       "interrupts", "interrupts_skipped", "breaks", "incoming_polls"), 0)

    # --- the doorbell (loop thread) ----------------------------------------------------------------
    def service(self) -> None:
        """The card rang our doorbell: handshakes, status, kicks (spec 5.5)."""
        if self.removed:
            return
        self.counters["wakeups"] += 1
        e = self.entry
        try:
            if e.ctrl_u8(CTRL_USED_ADDRESS_UPDATED):
                self._relocate_used()
            if e.ctrl_u8(CTRL_VDEV_RESET):
                self._reset()
            if self.broken is not None:
                return
            status = e.status
            if not self.active:
                if status & VIRTIO_CONFIG_S_FAILED:
                    if not self._failed_logged:
                        self._failed_logged = True
                        log.warning("%s: the card's driver gave up on the device (status %#04x)", self.name, status)
                    return
                if status & VIRTIO_CONFIG_S_DRIVER_OK or (status & VIRTIO_CONFIG_S_DRIVER and self._kicked_early()):
                    self._activate()
                else:
                    return
            for q in self.queues:
                self.backend.queue_notify(q.index)
        except DEVICE_ERRORS as ex:
            self._break(str(ex))
        except Exception as ex:
            log.exception("%s: backend failed", self.name)
            self._break(f"backend error: {type(ex).__name__}: {ex}")

    def guarded(self, handler: Handler) -> Handler:
        """A backend fd handler that runs only while the device is active, a failure breaking the device."""
        def run(events: int) -> None:
            if not self.active or self.broken is not None or self.removed:
                return
            try:
                handler(events)
            except DEVICE_ERRORS as ex:
                self._break(str(ex))
            except Exception as ex:
                log.exception("%s: backend failed", self.name)
                self._break(f"backend error: {type(ex).__name__}: {ex}")
        return run

    # --- batches copying in (loop thread) ------------------------------------------------------------
    def _schedule(self, q: VopQueue) -> None:
        """A queue started a batch's DMA from the card: the first look at it after the adapted delay."""
        if not self._timer.armed:
            self._pause = POLL_MIN
            self._looks = 0
            self._timer.arm(self._first)

    def _poll_incoming(self, _events: int) -> None:
        """The timer: resume every queue whose batch is in; look again later (backing off) for the rest."""
        timer = self._timer
        timer.clear()
        self.counters["incoming_polls"] += 1
        now = time.monotonic()
        ready, waiting, copying_in = [], False, False
        for q in self.queues:
            state = q.incoming(now)
            if state:
                ready.append(q)
            elif state is not None:
                waiting = True
            if state is not None:
                copying_in = True
            if q.lazy and q.outgoing(now):   # completions whose DMA to the card is still running
                waiting = True
        # The first look comes a little earlier each time it finds a batch in, and later each time it finds
        # none: it settles where about every other batch is in at the first look, one wake-up or two each.
        if self._looks == 0 and copying_in:
            self._first = (max(POLL_MIN, self._first * 0.9) if ready else min(POLL_FIRST_MAX, self._first * 1.2))
        self._looks += 1
        if waiting:
            timer.arm(self._pause)
            self._pause = min(self._pause * 2, POLL_MAX)
        for q in ready:
            q.resume()       # may start the queue's next batch (_schedule): the timer is armed for it then

    # --- spec 5.5 step 1: the card moved its used rings -------------------------------------------------
    def _relocate_used(self) -> None:
        e = self.entry
        try:
            for i, vr in enumerate(self.vrings):
                addr = e.used_address(i)
                try:
                    ring_part(self.host.bar0, addr, used_size(vr.num), USED_ALIGN, f"{self.name} vring {i} used ring")
                except VringError as ex:
                    raise VringError(f"vqconfig[{i}].used_address: {ex} (card memory is "
                                     f"{self.host.bar0.size:#x} bytes)") from None
                self.used[i] = addr
                if self.active:
                    self.queues[i].vring.set_used((self.host.bar0, addr))
            self.counters["used_relocations"] += 1
        finally:
            # Cleared whatever happened, so the card's find_vq does not sit out its 10 s poll.
            e.set_ctrl_u8(CTRL_USED_ADDRESS_UPDATED, 0)

    # --- spec 5.5 step 2: the card reset the device ---------------------------------------------------------
    def _reset(self) -> None:
        e = self.entry
        self._deactivate()
        e.status = 0
        e.set_ctrl_u8(CTRL_VDEV_RESET, 0)
        for v in self._info_views:
            v[0] = 0
        self.used = [None] * len(self.vrings)
        self.acked = 0
        was = self.broken
        self.broken = None
        self._failed_logged = False
        self.counters["resets"] += 1
        e.set_ctrl_u8(CTRL_HOST_ACK, 1)
        if was is not None:
            log.info("%s: the card reset the device; no longer broken", self.name)

    # --- spec 5.5 step 3: the driver is ready -----------------------------------------------------------
    def _kicked_early(self) -> bool:
        """A legacy driver posting buffers before DRIVER_OK, once its used rings are in place."""
        if any(u is None for u in self.used):
            return False
        mem = self.host.arena_mem
        return any(mem.read(v.iova + VringLayout(v.num, MIC_VIRTIO_RING_ALIGN).avail + AVAIL_IDX, 2) != b"\0\0"
                   for v in self.vrings)

    def _activate(self) -> None:
        e = self.entry
        acked = int.from_bytes(e.guest_acks()[:4].ljust(4, b"\0"), "little")
        if acked & ~self.offered:
            log.warning("%s: the card acked features %#x it was not offered; ignored", self.name,
                        acked & ~self.offered)
            acked &= self.offered
        mem, bar0 = self.host.arena_mem, self.host.bar0
        # A backend that says so has a drain's last completions published by the poller once their DMA is
        # done (VopQueue.complete_many) rather than waited for on the loop [choice: the net backend, whose
        # tap keeps feeding the loop; a blk request's completion is waited for as before].
        lazy = bool(getattr(self.backend, "lazy_completion", False))
        queues = []
        for i, vr in enumerate(self.vrings):
            lay = VringLayout(vr.num, MIC_VIRTIO_RING_ALIGN)
            used = (bar0, self.used[i]) if self.used[i] is not None else (mem, vr.iova + lay.used)
            ring = Vringh(vr.num, (mem, vr.iova + lay.desc), (mem, vr.iova + lay.avail), used, bar0, acked,
                          f"{self.name} vring {i}")
            queues.append(VopQueue(i, ring, self.engine, self.staging[i], self._info_views[i], self.notify_card,
                                   f"{self.name} vring {i}", self._schedule, lazy))
            if not lazy:
                # a lazy queue's completions are the poller's, and its drains are short (the tap runs dry)
                queues[-1].watch_progress(self.host.doorbells.pump)
        self.acked = acked
        self.queues = queues
        self.active = True
        self._timer.disarm()
        self._fds.watch(self._timer.fd, EVENT_READ, self._poll_incoming)
        self.counters["activations"] += 1
        log.info("%s: active (features %#x, used rings %s)", self.name, acked,
                 ", ".join(f"{u:#x}" if u is not None else "host" for u in self.used))
        self.backend.activate(acked, queues, self._fds)

    # --- interrupts to the card ---------------------------------------------------------------------
    def notify_card(self) -> None:
        """Ring ``h2c_vdev_db`` (spec 5.5 "Host->card notify"); -1 means the card listens to nothing yet."""
        db = self.entry.ctrl_db(CTRL_H2C_VDEV_DB)
        if db == -1:
            self.counters["interrupts_skipped"] += 1
            return
        if not 0 <= db < regs.NUM_CARD_DOORBELLS:
            raise VringError(f"ctrl.h2c_vdev_db {db} is no card doorbell (0..{regs.NUM_CARD_DOORBELLS - 1})")
        self.counters["interrupts"] += 1
        self.host.doorbells.ring(db)

    # --- broken, inactive ---------------------------------------------------------------------------------
    def _break(self, message: str) -> None:
        if self.broken is not None:
            return
        log.error("%s: device broken, its backend parked until the card resets the device: %s", self.name, message)
        self.counters["breaks"] += 1
        self._deactivate()
        self.broken = message   # last: whoever sees it set sees the backend parked

    def _deactivate(self) -> None:
        self._fds.unwatch_all()
        for q in self.queues:
            q.release_all()
        self.queues = []
        if self.active:
            self.active = False
            try:
                self.backend.reset()
            except Exception:
                log.exception("%s: backend reset failed", self.name)

    def release_views(self) -> None:
        for v in self._info_views:
            v.release()
        self._info_views = []

    def detach(self) -> None:
        """Removal (loop thread): stop serving; the host frees the vrings next."""
        self._deactivate()
        self.removed = True
        self._timer.close()

    # --- what micctl shows --------------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self.removed:
            return "removed"
        if self.broken is not None:
            return "broken"
        if self.active:
            return "active"
        return "added"

    def status(self) -> dict:
        try:
            card_status = self.entry.status
        except MemoryAccessError:
            card_status = None
        return {"name": self.name, "type": DEVICE_NAMES.get(self.type, str(self.type)), "state": self.state,
                "broken": self.broken, "offset": self.entry.offset, "doorbell": self.db, "status": card_status,
                "features": {"offered": self.offered, "acked": self.acked},
                "vrings": [{"num": v.num, "address": v.card, "used_address": u}
                           for v, u in zip(self.vrings, self.used)],
                "queues": [q.status() for q in self.queues], "copy": dict(self.engine.counters),
                "counters": dict(self.counters), "copy_in_first_look_us": round(self._first * 1e6, 1),
                "backend": self.backend.describe(),
                "backend_counters": self.backend.counters()}
