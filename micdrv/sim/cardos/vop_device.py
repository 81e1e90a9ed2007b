"""One VOP device as the card sees it: a :class:`~.virtio_bus.VirtioDevice` over a device page entry (spec 5.4).

What the card's ``vop_main.c`` does for each entry, as the transport half of
a virtio device (the driver half is a :class:`~.virtio_bus.VirtioDriver`):

* features: the host's bitmap, at most its first 32 bits; the accepted bits
  go into the guest-ack bitmap;
* config space: reads inside ``config_len`` only (``vop_get`` silently did
  nothing beyond it; here the missing bytes read as zeros);
* status: every non-zero write is stored and ``c2h_vdev_db`` rung; a write of
  0 is ignored (reset is the handshake below);
* find_vqs: per queue, map ``vqconfig.address`` through the SMPT window,
  **zero the vring** (vring_size bytes), check ``_mic_vring_info.magic`` ==
  0xC0FFEE00 + type + index at the configured place (-EIO otherwise), take a
  page of card memory for the used ring and write its address to
  ``vqconfig.used_address``; after all queues ``used_address_updated`` = 1,
  ring, and poll up to 100 x 100 ms for the host to clear it;
* a queue kick rings ``c2h_vdev_db``; the host's ``h2c_vdev_db`` interrupts
  every queue of the device;
* reset: ``host_ack`` = 0, ``vdev_reset`` = 1, ring, poll ``host_ack`` up to
  100 x 100 ms, status 0, the used rings given back.

What the host wrote is checked before it is used: ring sizes (power of two,
at most 128), vring addresses (inside the SMPT window and reachable), the
magic, ``c2h_vdev_db`` (0..3). A failure is a :class:`CardVopError` and the
device is refused, as the card kernel refused a probe; the card carries on.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable, Sequence

from micdrv.memory import MemoryAccessError
from micdrv.virtio.device import VIRTIO_RING_F_INDIRECT_DESC
from micdrv.virtio.driver import DriverRing
from micdrv.virtio.ring import VringError, VringLayout, check_num, vring_size
from micdrv.vop import layout as L
from micdrv.x100 import regs

from ..bus import CardFault
from .virtio_bus import QueueCallback, VirtioDevice, VirtioDriver, Virtqueue

if TYPE_CHECKING:
    from .vop import CardVop

HANDSHAKE_TRIES, HANDSHAKE_WAIT = 100, 0.1   # spec 5.4: used_address_updated and host_ack polls


class CardVopError(Exception):
    """The host's entry cannot be used (its errno name says how Linux would have failed the probe)."""

    def __init__(self, message: str, errno: str = "EINVAL"):
        super().__init__(message)
        self.errno = errno


class CardVopDevice(VirtioDevice):
    """The card's half of one device page entry."""

    def __init__(self, vop: "CardVop", entry: L.DeviceEntry, index: int):
        self.vop = vop
        self.entry = entry
        self.index = index
        self.device_id = entry.type
        self.memory = vop.gddr
        self.name = f"vop{index}"
        self.driver: VirtioDriver | None = None
        self.state = "new"           # new, probed, no driver, failed, removed, refused
        self.error: str | None = None
        self.accepted = 0
        self.vqs: list[Virtqueue] = []
        self._used: list[int] = []   # card addresses of our used rings (and indirect tables) to give back
        self._allocs: list[tuple[int, int]] = []
        self.gone = False            # the host took the entry away without the remove hand-shake
        self.h2c_db: int | None = None
        self.c2h_db = entry.ctrl_db(L.CTRL_C2H_VDEV_DB)
        if not 0 <= self.c2h_db < regs.SDBIC_COUNT:
            raise CardVopError(f"ctrl.c2h_vdev_db is {self.c2h_db}, not a host doorbell 0..{regs.SDBIC_COUNT - 1}")
        self.rings = 0               # c2h_vdev_db rings: kicks and status writes
        self.interrupts = 0
        self.resets = 0
        self._lock = threading.Lock()

    # --- virtio_config_ops ---------------------------------------------------------------------
    def host_features(self) -> int:
        raw = self.entry.host_features()[:4]
        return int.from_bytes(raw.ljust(4, b"\0"), "little")

    def finalize_features(self, accepted: int) -> None:
        offered = self.host_features()
        if accepted & ~offered:
            raise ValueError(f"{self.name}: accepting features {accepted & ~offered:#x} the host did not offer")
        self.accepted = accepted
        fl = self.entry.shape.feature_len
        self.entry.set_guest_acks(accepted.to_bytes(4, "little")[:fl])

    def read_config(self, offset: int, length: int) -> bytes:
        cfg = self.entry.config()
        if offset < 0 or length < 0:
            raise ValueError(f"{self.name}: config read at {offset} of {length} bytes")
        return cfg[offset:offset + length].ljust(length, b"\0")

    def get_status(self) -> int:
        return self.entry.status

    def set_status(self, status: int) -> None:
        if not status:
            return                     # vop_set_status ignores 0: reset is the vdev_reset hand-shake
        self.entry.status = status
        self.ring_host()

    def ring_host(self) -> None:
        self.rings += 1
        self.vop.side.send_host_doorbell(self.c2h_db)

    # --- queues ----------------------------------------------------------------------------------
    def find_vqs(self, callbacks: Sequence[QueueCallback | None]) -> list[Virtqueue]:
        e = self.entry
        if len(callbacks) > e.shape.num_vq:
            raise CardVopError(f"{self.name}: {len(callbacks)} queues asked for, the device has {e.shape.num_vq}")
        vop = self.vop
        placement = vop.placement
        vqs = []
        try:
            for i, cb in enumerate(callbacks):
                num = e.vq_num(i)
                try:
                    check_num(num)
                except VringError:
                    num = -1
                if not 1 <= num <= L.MIC_MAX_VRING_ENTRIES:
                    raise CardVopError(f"{self.name}: vqconfig[{i}].num {e.vq_num(i)} is not a power of two "
                                       f"1..{L.MIC_MAX_VRING_ENTRIES}")
                addr = e.vq_address(i)
                size = L.vring_bytes(num)
                if not vop.smpt.contains(addr, size):
                    raise CardVopError(f"{self.name}: vqconfig[{i}].address {addr:#x} (+{size:#x}) is not in the "
                                       f"SMPT window")
                try:
                    vop.smpt.write(addr, bytes(vring_size(num, L.MIC_VIRTIO_RING_ALIGN)))   # zero the vring
                    magic = vop.smpt.read_u32(addr + L.vring_info_offset(num, placement) + L.INFO_MAGIC)
                except CardFault as ex:
                    raise CardVopError(f"{self.name}: vring {i} at {addr:#x} is unreachable: {ex.detail}") from None
                want = L.vring_magic(self.device_id, i)
                if magic != want:
                    raise CardVopError(f"{self.name}: vring {i}: _mic_vring_info.magic {magic:#010x} at the "
                                       f"{placement.value} place, expected {want:#010x}", "EIO")
                used = self._alloc(L.used_ring_bytes(num), L.PAGE_SIZE)
                indirect = None
                if self.accepted >> VIRTIO_RING_F_INDIRECT_DESC & 1:
                    t = self._alloc(num * num * 16, 64)   # a table per head, as long as the ring [choice]
                    indirect = (vop.ring_gddr, t, num)
                lay = VringLayout(num, L.MIC_VIRTIO_RING_ALIGN)
                ring = DriverRing(num, (vop.ring_smpt, addr + lay.desc), (vop.ring_smpt, addr + lay.avail),
                                  (vop.ring_gddr, used), self.accepted, indirect, name=f"{self.name} vq{i}")
                e.set_used_address(i, used)
                vq = Virtqueue(i, ring, self.ring_host, f"{self.name} vq{i}")
                vq.callback = cb
                vqs.append(vq)
            e.set_ctrl_u8(L.CTRL_USED_ADDRESS_UPDATED, 1)
            self.ring_host()
            if not self._poll(lambda: not e.ctrl_u8(L.CTRL_USED_ADDRESS_UPDATED)):
                raise CardVopError(f"{self.name}: the host did not take the used rings within "
                                   f"{HANDSHAKE_TRIES * HANDSHAKE_WAIT:g} s", "ENODEV")
        except BaseException:
            self._free_all()
            raise
        self.vqs = vqs
        return vqs

    def interrupt(self) -> None:
        """The host rang ``h2c_vdev_db``: every queue looks at its used ring (vring_interrupt per queue)."""
        self.interrupts += 1
        for vq in list(self.vqs):
            vq.interrupt()

    def reset(self) -> None:
        """The vdev_reset hand-shake (spec 5.4 "Reset"), then the queues are gone."""
        with self._lock:
            e = self.entry
            self.vqs = []
            self.resets += 1
            if not self.gone:
                e.set_ctrl_u8(L.CTRL_HOST_ACK, 0)
                e.set_ctrl_u8(L.CTRL_VDEV_RESET, 1)
                self.ring_host()
                if not self._poll(lambda: e.ctrl_u8(L.CTRL_HOST_ACK)):
                    self.vop.printk(f"vop: {self.name}: the host did not acknowledge the reset")
                e.status = 0
            self._free_all()

    def _poll(self, done: Callable[[], int | bool]) -> bool:
        for _ in range(HANDSHAKE_TRIES):
            if done():
                return True
            if self.vop.side.stopped.wait(HANDSHAKE_WAIT):
                raise CardFault(0, 0, False, "the card was reset")
        return bool(done())

    # --- memory ----------------------------------------------------------------------------------
    def alloc(self, size: int, align: int = 64) -> int:
        return self.vop.heap.alloc(size, align)

    def free(self, addr: int, size: int) -> None:
        self.vop.heap.free(addr, size)

    def _alloc(self, size: int, align: int) -> int:
        a = self.vop.heap.alloc(size, align)
        self._allocs.append((a, size))
        return a

    def _free_all(self) -> None:
        for a, n in self._allocs:
            self.vop.heap.free(a, n)
        self._allocs = []

    # --- what the card OS record shows ----------------------------------------------------------------
    def status(self) -> dict:
        try:
            st = self.entry.status
        except (CardFault, MemoryAccessError):
            st = None
        return {"index": self.index, "offset": self.entry.offset, "type": self.device_id, "state": self.state,
                "error": self.error, "status": st, "features": self.accepted, "h2c_db": self.h2c_db,
                "c2h_db": self.c2h_db, "driver": getattr(self.driver, "name", None),
                "driver_status": self.driver.status() if self.driver is not None else None,
                "vqs": [{"num": q.num, "kicks": q.kicks, "interrupts": q.interrupts} for q in self.vqs],
                "rings": self.rings, "interrupts": self.interrupts, "resets": self.resets}
