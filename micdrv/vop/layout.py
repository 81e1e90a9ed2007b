"""The VOP device page: virtio device entries after ``struct mic_bootparam`` (spec 5.1, 5.6).

The device page (4 KiB of host memory, spec 3.3) holds, from offset 24, a
packed list of entries, one per virtio device::

    mic_device_desc (8) | mic_vqconfig x num_vq (24 each) | host features (feature_len) |
    guest-ack features (feature_len) | config space (config_len) | pad to 8 | mic_device_ctrl (16)

``type`` 0 ends the list and -1 marks a removed slot whose space may be
reused by a device of the same or smaller size (spec 5.3 step 2).

Both sides use this module: the host writes entries and reads what the card
writes into them (status, guest acks, used_address, the vdev_reset /
used_address_updated / guest_ack handshakes, h2c_vdev_db); the simulated
card does the mirror image. :class:`DeviceEntry` reaches an entry only
through a bounds-checked :class:`~micdrv.memory.Memory` window of the page,
and :func:`scan` validates every size the other side could have written, so
a hostile peer can make a scan fail with :class:`VopLayoutError` but never
make it read outside the page.

Each vring the host allocates (spec 5.3 step 4, 5.6) is
``PAGE_ALIGN(vring_size(num, 4096) + sizeof(_mic_vring_info))`` bytes: the
split ring, then ``struct _mic_vring_info { u16 avail_idx; u32 magic; }``
whose magic is ``0xC0FFEE00 + type + index``. Where the info sits is an ABI
choice host and card must share (spec 5.6): right after ``vring_size``
(v5.4-v5.9 mainline, offset 5126 for 128 entries, :data:`VRING_INFO_LEGACY`)
or at ``round_up(vring_size, 4)`` (upstream cc1a2679, v5.10-rc1 and the
stable backports 4.9.241, 4.19.154, 5.4.73, 5.8.y, 5.9.2: offset 5128,
:data:`VRING_INFO_ROUNDED`, micdrv's default).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterator

from ..bootparam import DEVICE_DESC_OFFSET, MIC_DP_SIZE, MIC_MAGIC
from ..memory import Memory, MemoryAccessError
from ..virtio.ring import round_up, vring_size

# --- limits (spec 5.1, 5.3) ---------------------------------------------------------------------
MIC_MAX_VRINGS = 4               # num_vq <= 4
MIC_MAX_VRING_ENTRIES = 128      # vqconfig.num <= 128
MIC_VRING_ENTRIES = 128          # what mpssd uses for every ring (spec 6.1)
MIC_MAX_DESC_BLK_SIZE = 256      # aligned descriptor size limit of ADD_DEVICE
MIC_VIRTIO_RING_ALIGN = 4096     # vring alignment (spec 5.6)
PAGE_SIZE = 4096
VOP_INT_DMA_BUF_SIZE = 64 << 10  # per-vring bounce buffer (spec 5.3 step 4, 5.7)

# --- struct mic_device_desc (spec 5.1) -----------------------------------------------------------
DESC_TYPE = 0         # s8: virtio device ID; 0 = end of list; -1 = removed
DESC_NUM_VQ = 1       # u8
DESC_FEATURE_LEN = 2  # u8: bytes of each feature bitmap
DESC_CONFIG_LEN = 3   # u8
DESC_STATUS = 4       # u8: virtio status byte, written by the card
DESC_HDR_SIZE = 8     # the vqconfigs start at offset 8 (config[0])
TYPE_END = 0
TYPE_REMOVED = -1

# --- struct mic_vqconfig (spec 5.1) --------------------------------------------------------------
VQ_ADDRESS = 0        # le64: card-visible (SMPT) address of the host's vring
VQ_USED_ADDRESS = 8   # le64: card physical address of the card's used ring
VQ_NUM = 16           # le16: entries
VQCONFIG_SIZE = 24

# --- struct mic_device_ctrl (spec 5.1) -----------------------------------------------------------
CTRL_VDEV = 0                   # le64: the card's opaque pointer
CTRL_CONFIG_CHANGE = 8          # u8, host: 1 remove, 2 config changed
CTRL_VDEV_RESET = 9             # u8, card
CTRL_GUEST_ACK = 10             # u8, card
CTRL_HOST_ACK = 11              # u8, host
CTRL_USED_ADDRESS_UPDATED = 12  # u8, card sets 1, host clears
CTRL_C2H_VDEV_DB = 13           # s8, host: the doorbell the card rings for this device
CTRL_H2C_VDEV_DB = 14           # s8, card: the doorbell the host rings
CTRL_SIZE = 16

MIC_VIRTIO_PARAM_DEV_REMOVE = 1
MIC_VIRTIO_PARAM_CONFIG_CHANGED = 2
DB_NONE = -1

# --- struct _mic_vring_info (spec 5.6) -----------------------------------------------------------
INFO_AVAIL_IDX = 0   # u16: the host's consumed index
INFO_MAGIC = 4       # le32: 0xC0FFEE00 + type + index (2 bytes of padding before it)
VRING_INFO_SIZE = 8


class VringInfoPlacement(enum.Enum):
    """Where ``_mic_vring_info`` sits after the vring (spec 5.6): one choice for host and card."""

    ROUNDED = "rounded"   # round_up(vring_size, 4): v5.10 and the stable backports
    LEGACY = "legacy"     # vring_size: v5.4-v5.9 mainline


VRING_INFO_ROUNDED = VringInfoPlacement.ROUNDED
VRING_INFO_LEGACY = VringInfoPlacement.LEGACY


class VopLayoutError(Exception):
    """A device page entry that cannot be what it claims (a bug or a hostile peer)."""


def desc_size(num_vq: int, feature_len: int, config_len: int) -> int:
    """``mic_desc_size``: header + vqconfigs + both feature bitmaps + config (spec 5.1)."""
    return DESC_HDR_SIZE + VQCONFIG_SIZE * num_vq + 2 * feature_len + config_len


def aligned_desc_size(num_vq: int, feature_len: int, config_len: int) -> int:
    return round_up(desc_size(num_vq, feature_len, config_len), 8)


def total_size(num_vq: int, feature_len: int, config_len: int) -> int:
    """An entry's bytes in the page: the aligned descriptor, then ``mic_device_ctrl``."""
    return aligned_desc_size(num_vq, feature_len, config_len) + CTRL_SIZE


def vring_info_offset(num: int, placement: VringInfoPlacement = VRING_INFO_ROUNDED) -> int:
    size = vring_size(num, MIC_VIRTIO_RING_ALIGN)
    return round_up(size, 4) if placement is VRING_INFO_ROUNDED else size


def vring_bytes(num: int) -> int:
    """``vr_size``: PAGE_ALIGN(vring_size + 8), with the round_up of the rounded placement (spec 5.3, 5.6)."""
    return round_up(round_up(vring_size(num, MIC_VIRTIO_RING_ALIGN), 4) + VRING_INFO_SIZE, PAGE_SIZE)


def used_ring_bytes(num: int) -> int:
    """The card's used ring: PAGE_ALIGN(6 + 8 * num) bytes of card memory (spec 5.4 find_vq)."""
    return round_up(6 + 8 * num, PAGE_SIZE)


def vring_magic(virtio_type: int, index: int) -> int:
    return (MIC_MAGIC + virtio_type + index) & 0xFFFFFFFF


def _s8(b: int) -> int:
    return b - 256 if b >= 128 else b


def check_shape(num_vq: int, feature_len: int, config_len: int, offset: int | None = None) -> None:
    """The ADD_DEVICE limits (spec 5.3 step 1) and, with ``offset``, that the entry fits the page."""
    if not 1 <= num_vq <= MIC_MAX_VRINGS:
        raise VopLayoutError(f"num_vq {num_vq} is not 1..{MIC_MAX_VRINGS}")
    if not 0 <= feature_len <= 0xFF or not 0 <= config_len <= 0xFF:
        raise VopLayoutError(f"feature_len {feature_len} / config_len {config_len} do not fit a u8")
    aligned = aligned_desc_size(num_vq, feature_len, config_len)
    if aligned > MIC_MAX_DESC_BLK_SIZE:
        raise VopLayoutError(f"descriptor of {aligned} bytes exceeds {MIC_MAX_DESC_BLK_SIZE}")
    if offset is not None and offset + aligned + CTRL_SIZE > MIC_DP_SIZE:
        raise VopLayoutError(f"an entry of {aligned + CTRL_SIZE} bytes at offset {offset} runs past the "
                             f"{MIC_DP_SIZE}-byte device page")


@dataclass(frozen=True)
class EntryShape:
    num_vq: int
    feature_len: int
    config_len: int

    @property
    def total(self) -> int:
        return total_size(self.num_vq, self.feature_len, self.config_len)


class DeviceEntry:
    """One entry of the device page at ``page_base + offset``, reached through ``mem`` (the page's window).

    The shape (num_vq, feature_len, config_len) is read once and checked when
    the entry is opened; the fields the other side may change later (status,
    features acked, ctrl bytes, used addresses) are read fresh on each access.
    """

    def __init__(self, mem: Memory, page_base: int, offset: int, shape: EntryShape | None = None):
        self.mem = mem
        self.page_base = page_base
        self.offset = offset
        self.addr = page_base + offset
        if shape is None:
            hdr = mem.read(self.addr, DESC_HDR_SIZE)
            shape = EntryShape(hdr[DESC_NUM_VQ], hdr[DESC_FEATURE_LEN], hdr[DESC_CONFIG_LEN])
        check_shape(shape.num_vq, shape.feature_len, shape.config_len, offset)
        self.shape = shape
        n, fl, cl = shape.num_vq, shape.feature_len, shape.config_len
        self._vq = self.addr + DESC_HDR_SIZE
        self._host_features = self._vq + VQCONFIG_SIZE * n
        self._guest_acks = self._host_features + fl
        self._config = self._guest_acks + fl
        self.ctrl = self.addr + aligned_desc_size(n, fl, cl)

    # --- the descriptor ---------------------------------------------------------------------------
    @property
    def type(self) -> int:
        return _s8(self.mem.read(self.addr + DESC_TYPE, 1)[0])

    @type.setter
    def type(self, value: int) -> None:
        self.mem.write(self.addr + DESC_TYPE, bytes([value & 0xFF]))

    @property
    def status(self) -> int:
        return self.mem.read(self.addr + DESC_STATUS, 1)[0]

    @status.setter
    def status(self, value: int) -> None:
        self.mem.write(self.addr + DESC_STATUS, bytes([value & 0xFF]))

    def write_header(self, virtio_type: int) -> None:
        """Type (written separately: last, spec 5.3 step 6), num_vq, feature_len, config_len, status 0."""
        s = self.shape
        self.mem.write(self.addr, bytes([virtio_type & 0xFF, s.num_vq, s.feature_len, s.config_len, 0, 0, 0, 0]))

    def _vq_field(self, i: int, off: int) -> int:
        if not 0 <= i < self.shape.num_vq:
            raise IndexError(f"vring {i} of a device with {self.shape.num_vq}")
        return self._vq + VQCONFIG_SIZE * i + off

    def vq_address(self, i: int) -> int:
        return self.mem.read_u64(self._vq_field(i, VQ_ADDRESS))

    def set_vq(self, i: int, address: int, num: int) -> None:
        self.mem.write_u64(self._vq_field(i, VQ_ADDRESS), address)
        self.mem.write_u64(self._vq_field(i, VQ_USED_ADDRESS), 0)
        self.mem.write(self._vq_field(i, VQ_NUM), num.to_bytes(2, "little") + bytes(6))

    def vq_num(self, i: int) -> int:
        return int.from_bytes(self.mem.read(self._vq_field(i, VQ_NUM), 2), "little")

    def used_address(self, i: int) -> int:
        return self.mem.read_u64(self._vq_field(i, VQ_USED_ADDRESS))

    def set_used_address(self, i: int, addr: int) -> None:
        self.mem.write_u64(self._vq_field(i, VQ_USED_ADDRESS), addr)

    def host_features(self) -> bytes:
        return self.mem.read(self._host_features, self.shape.feature_len)

    def set_host_features(self, data: bytes) -> None:
        self._put(self._host_features, data, self.shape.feature_len, "host features")

    def guest_acks(self) -> bytes:
        return self.mem.read(self._guest_acks, self.shape.feature_len)

    def set_guest_acks(self, data: bytes) -> None:
        self._put(self._guest_acks, data, self.shape.feature_len, "guest acks")

    def config(self) -> bytes:
        return self.mem.read(self._config, self.shape.config_len)

    def set_config(self, data: bytes) -> None:
        self._put(self._config, data, self.shape.config_len, "config space")

    def _put(self, addr: int, data: bytes, size: int, what: str) -> None:
        if len(data) > size:
            raise VopLayoutError(f"{what} of {len(data)} bytes in a field of {size}")
        self.mem.write(addr, bytes(data) + bytes(size - len(data)))

    # --- mic_device_ctrl ----------------------------------------------------------------------------
    def ctrl_u8(self, off: int) -> int:
        return self.mem.read(self.ctrl + off, 1)[0]

    def set_ctrl_u8(self, off: int, value: int) -> None:
        self.mem.write(self.ctrl + off, bytes([value & 0xFF]))

    def ctrl_db(self, off: int) -> int:
        """A doorbell byte of the ctrl block, signed: -1 = none."""
        return _s8(self.ctrl_u8(off))

    @property
    def vdev(self) -> int:
        return self.mem.read_u64(self.ctrl + CTRL_VDEV)

    @vdev.setter
    def vdev(self, value: int) -> None:
        self.mem.write_u64(self.ctrl + CTRL_VDEV, value)

    def init_ctrl(self) -> None:
        """Spec 5.3 step 3: every handshake byte 0, both doorbells -1."""
        self.mem.write(self.ctrl, bytes(CTRL_C2H_VDEV_DB) + bytes([0xFF, 0xFF, 0]))

    def __repr__(self) -> str:
        return f"<DeviceEntry @{self.offset} type={self.type} {self.shape}>"


def scan(mem: Memory, page_base: int) -> Iterator[DeviceEntry]:
    """The entries of the device page, removed ones included (``type`` -1), ending at type 0.

    Every entry's shape is checked against the limits and the page before
    it is returned, so a malformed page ends the scan with
    :class:`VopLayoutError`; a page full to the end ends it quietly.
    """
    offset = DEVICE_DESC_OFFSET
    while offset + DESC_HDR_SIZE <= MIC_DP_SIZE:
        try:
            hdr = mem.read(page_base + offset, DESC_HDR_SIZE)
        except MemoryAccessError as e:
            raise VopLayoutError(f"device page entry at offset {offset}: {e}") from None
        if _s8(hdr[DESC_TYPE]) == TYPE_END:
            return
        shape = EntryShape(hdr[DESC_NUM_VQ], hdr[DESC_FEATURE_LEN], hdr[DESC_CONFIG_LEN])
        try:
            entry = DeviceEntry(mem, page_base, offset, shape)
        except VopLayoutError as e:
            raise VopLayoutError(f"device page entry at offset {offset}: {e}") from None
        yield entry
        offset += shape.total


class PageSlots:
    """The host's own record of its device page entries: where each is, how big, whether it is in use.

    Spec 5.3 step 2 finds a slot by scanning the page (:func:`find_slot`),
    but every byte of the page can be written by the card, so a scan lets a
    card steer where the host puts its next device -- over a live entry it
    marked removed (type -1), or nowhere at all once it corrupted an entry's
    sizes. The host therefore allocates from this record alone, with the
    same rules (a removed slot of exactly the new entry's size, else the end
    of the list), and the page is only ever written, never consulted.
    """

    def __init__(self):
        self._slots: list[list] = []   # [offset, total, live], in page order

    def clear(self) -> None:
        self._slots = []

    def find(self, shape: EntryShape) -> tuple[int, bool]:
        """Where an entry of ``shape`` goes and whether that is a removed slot reused; VopLayoutError if full."""
        end = DEVICE_DESC_OFFSET
        for offset, total, live in self._slots:
            if not live and total == shape.total:
                return offset, True
            end = offset + total
        check_shape(shape.num_vq, shape.feature_len, shape.config_len, end)
        return end, False

    def occupy(self, offset: int, shape: EntryShape) -> None:
        for s in self._slots:
            if s[0] == offset:
                s[2] = True
                return
        self._slots.append([offset, shape.total, True])

    def release(self, offset: int) -> None:
        for s in self._slots:
            if s[0] == offset:
                s[2] = False

    def __repr__(self) -> str:
        return f"<PageSlots {self._slots}>"


def find_slot(mem: Memory, page_base: int, shape: EntryShape) -> int:
    """Spec 5.3 step 2 as upstream does it: a removed slot (type -1) found by scanning the page, else the end.

    A reader of a page that trusts it (tests, a dump) may use this; the host
    does not (:class:`PageSlots` says why).

    The card steps from entry to entry by each one's size, so a removed slot
    is reused only by an entry of exactly its size (upstream takes the first
    removed slot whatever its size, which misplaces every later entry when
    the sizes differ: the one deliberate difference). Raises
    :class:`VopLayoutError` when the page is full.
    """
    offset = DEVICE_DESC_OFFSET
    for e in scan(mem, page_base):
        if e.type == TYPE_REMOVED and e.shape.total == shape.total:
            return e.offset
        offset = e.offset + e.shape.total
    check_shape(shape.num_vq, shape.feature_len, shape.config_len, offset)
    return offset
