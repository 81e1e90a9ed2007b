"""The legacy split ring: descriptor table, avail ring, used ring (virtio-legacy.md section 1).

A split virtqueue of ``num`` entries (a power of two) is three parts, each
written by one side only:

* the **descriptor table**, ``num`` x ``struct vring_desc`` (16 bytes: addr,
  len, flags, next), written by the driver;
* the **avail ring** (flags, idx, ring[num] of chain heads, used_event),
  written by the driver;
* the **used ring** (flags, idx, ring[num] of ``struct vring_used_elem``
  {id, len}, avail_event), written by the device.

The legacy layout puts the three in one block, the used ring at the next
``align`` boundary after the avail ring (:func:`vring_size`,
:class:`VringLayout`), but nothing in the protocol needs them together: on
MIC the used ring moves to card memory (x100-host-abi.md 5.4/5.5), so the
ring code in :mod:`.vringh` and :mod:`.driver` takes a memory and an
address for each part.

Both ``idx`` fields are free-running 16-bit counters; the slot of index
``x`` is ``x & (num - 1)`` (section 1.2). Everything is little endian: the
card is x86-64 and legacy rings are in the guest's byte order (spec
"Conventions").

:class:`VringError` is the one exception for a ring that breaks the
protocol; its message says what was wrong and where.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

# --- flags (section 1.1) ----------------------------------------------------------------------

VRING_DESC_F_NEXT = 1        # the chain continues at .next
VRING_DESC_F_WRITE = 2       # device-writable buffer (else device-readable)
VRING_DESC_F_INDIRECT = 4    # the buffer is a table of descriptors (VIRTIO_RING_F_INDIRECT_DESC)
VRING_USED_F_NO_NOTIFY = 1   # device -> driver: "don't kick me" (without EVENT_IDX)
VRING_AVAIL_F_NO_INTERRUPT = 1  # driver -> device: "don't interrupt me" (without EVENT_IDX)

# Minimum alignments of the three parts (section 1.1: desc 16, avail 2, used 4).
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4
MAX_QUEUE_SIZE = 32768       # section 1.1: "Queue size is a power of two, max 32768"

# --- struct vring_desc / struct vring_used_elem (section 1.1) ---------------------------------


class vring_desc(ctypes.LittleEndianStructure):
    """``struct vring_desc``, 16 bytes."""

    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),   # @0  buffer address in the driver's address space
        ("len", ctypes.c_uint32),    # @8  buffer length in bytes
        ("flags", ctypes.c_uint16),  # @12 NEXT | WRITE | INDIRECT
        ("next", ctypes.c_uint16),   # @14 next descriptor, valid if NEXT
    ]


class vring_used_elem(ctypes.LittleEndianStructure):
    """``struct vring_used_elem``, 8 bytes: ``id`` is u32 "for padding reasons"."""

    _pack_ = 1
    _fields_ = [
        ("id", ctypes.c_uint32),     # @0 head of the chain being returned
        ("len", ctypes.c_uint32),    # @4 bytes the device wrote into the chain's writable buffers
    ]


# The hot paths pack and unpack with struct; tests check these agree with the ctypes layouts.
DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
DESC_SIZE = DESC.size            # 16
USED_ELEM_SIZE = USED_ELEM.size  # 8

# --- offsets inside the avail and used parts (section 1.1) ------------------------------------

AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4


def desc_table_size(num: int) -> int:
    """Bytes of the descriptor table: 16 x num."""
    return DESC_SIZE * num


def avail_size(num: int) -> int:
    """Bytes of the avail part: flags, idx, ring[num] and used_event (2 x (3 + num))."""
    return 2 * (3 + num)


def used_size(num: int) -> int:
    """Bytes of the used part: flags, idx, ring[num] and avail_event (6 + 8 x num).

    This is also what the MIC card allocates (page-aligned) when it moves the
    used ring into its own memory (x100-host-abi.md 5.4).
    """
    return 6 + USED_ELEM_SIZE * num


def used_event_offset(num: int) -> int:
    """Offset of ``used_event`` inside the avail part (4 + 2 x num)."""
    return AVAIL_RING + 2 * num


def avail_event_offset(num: int) -> int:
    """Offset of ``avail_event`` inside the used part (4 + 8 x num)."""
    return USED_RING + USED_ELEM_SIZE * num


def round_up(x: int, align: int) -> int:
    return (x + align - 1) & ~(align - 1)


def vring_size(num: int, align: int) -> int:
    """Linux ``vring_size``: the legacy block of one ring, the used tail not padded (section 1.2).

    ``vring_size(128, 4096) == 5126``; ``vring_size(256, 4096) == 10246``.
    """
    check_num(num)
    if align <= 0 or align & (align - 1):
        raise ValueError(f"ring alignment {align} is not a power of two")
    return round_up(desc_table_size(num) + avail_size(num), align) + used_size(num)


def check_num(num: int) -> None:
    """Refuse a queue size that is not a power of two in 1..32768 (section 6.3 check 1)."""
    if not isinstance(num, int) or num < 1 or num > MAX_QUEUE_SIZE or num & (num - 1):
        raise VringError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")


@dataclass(frozen=True)
class VringLayout:
    """Where the three parts of a legacy ring start, relative to the start of its block (section 1.2)."""

    num: int
    align: int

    @property
    def desc(self) -> int:
        return 0

    @property
    def avail(self) -> int:
        return desc_table_size(self.num)

    @property
    def used(self) -> int:
        return round_up(self.avail + avail_size(self.num), self.align)

    @property
    def size(self) -> int:
        return vring_size(self.num, self.align)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Linux ``vring_need_event``: did the index move past ``event`` going from ``old`` to ``new``?

    True iff ``event`` lies in the half-open window [old, new) modulo 2**16
    (section 1.4): ``(u16)(new - event - 1) < (u16)(new - old)``.
    """
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class VringError(Exception):
    """A ring that breaks the virtio protocol (the peer wrote something invalid, or a part lies outside memory).

    The message names the ring and what was wrong, e.g. ``rx: descriptor 7:
    next 300 out of range 0..127``. Whoever catches it marks the device
    broken until the driver resets it (section 6.3 "fatal").
    """
