"""DMA descriptors, DRAR values, ring arithmetic and copy splitting (spec 4.2, 4.3).

Pure functions: nothing here touches a register or memory, so all of it is
unit-tested on its own.

A descriptor is 16 bytes, two little-endian u64s, qw0 then qw1 (spec 4.3)::

    MEMCPY  qw0 = src[45:0] | (len / 64) << 46      qw1 = 1 << 60 | dst
    STATUS  qw0 = the 64-bit value to store         qw1 = 2 << 60 | intr << 59 | dst

Addresses are card physical addresses: GDDR offsets for card memory, system
window addresses (0x80_xxxx_xxxx, from :meth:`micdrv.x100.smpt.Smpt.to_card`)
for host memory (spec 4.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import regs

ALIGN = regs.DMA_ALIGN
MAX_XFER = regs.DMA_HOST_MAX_XFER  # host channels: 512 KiB per MEMCPY descriptor (spec 4.1)
_TYPE_MASK = 0xF << regs.DESC_TYPE_SHIFT
_DST_MASK = (1 << 59) - 1  # qw1 bits below the interrupt bit [INF width, spec 4.3]


# --- descriptors ----------------------------------------------------------------------
def memcpy_desc(dst: int, src: int, length: int) -> tuple[int, int]:
    """``mic_dma_memcpy_desc``: one MEMCPY of ``length`` bytes (a multiple of 64, at most 1 MiB - 64)."""
    if length <= 0 or length % ALIGN or length >> 6 > regs.DESC_LEN_MASK:
        raise ValueError(f"MEMCPY length {length:#x} is not a positive multiple of 64 below 1 MiB")
    if src % ALIGN or dst % ALIGN:
        raise ValueError(f"MEMCPY addresses {src:#x} -> {dst:#x} are not 64-byte aligned")
    if src > regs.DESC_ADDR_MASK or dst > _DST_MASK:
        raise ValueError(f"MEMCPY addresses {src:#x} -> {dst:#x} do not fit the descriptor")
    return src | (length >> 6) << regs.DESC_LEN_SHIFT, regs.DESC_MEMCPY << regs.DESC_TYPE_SHIFT | dst


def status_desc(dst: int, value: int, interrupt: bool = False) -> tuple[int, int]:
    """``mic_dma_prep_status_desc``: store ``value`` (u64) at ``dst``, raising the channel interrupt if asked."""
    if dst % 8 or dst > _DST_MASK:
        raise ValueError(f"STATUS destination {dst:#x} is not 8-byte aligned or does not fit")
    qw1 = regs.DESC_STATUS << regs.DESC_TYPE_SHIFT | dst
    if interrupt:
        qw1 |= regs.DESC_STATUS_INTR
    return value & 0xFFFFFFFFFFFFFFFF, qw1


@dataclass(frozen=True)
class Descriptor:
    """A decoded descriptor, for error messages and tests."""

    type: int
    src: int = 0
    dst: int = 0
    length: int = 0
    value: int = 0
    interrupt: bool = False

    def __str__(self) -> str:
        if self.type == regs.DESC_MEMCPY:
            return f"MEMCPY {self.length:#x} bytes {self.src:#x} -> {self.dst:#x}"
        if self.type == regs.DESC_STATUS:
            return f"STATUS {self.value:#x} -> {self.dst:#x}{' with interrupt' if self.interrupt else ''}"
        return f"type {self.type} descriptor"


def decode(qw0: int, qw1: int) -> Descriptor:
    t = qw1 >> regs.DESC_TYPE_SHIFT
    if t == regs.DESC_MEMCPY:
        return Descriptor(t, src=qw0 & regs.DESC_ADDR_MASK, dst=qw1 & _DST_MASK,
                          length=((qw0 >> regs.DESC_LEN_SHIFT) & regs.DESC_LEN_MASK) << 6)
    if t == regs.DESC_STATUS:
        return Descriptor(t, dst=qw1 & _DST_MASK, value=qw0, interrupt=bool(qw1 & regs.DESC_STATUS_INTR))
    return Descriptor(t)


# --- DRAR (spec 4.2) ----------------------------------------------------------------------
def drar_host(ring_addr: int, ring_size: int) -> tuple[int, int]:
    """(DRAR_LO, DRAR_HI) for a host-owned channel whose ring lives at system-window address ``ring_addr``.

    DRAR_HI: bits 20:4 ring size in descriptors, bit 26 "ring in system
    memory", bits 25:21 SMPT entry index = (addr >> 34) & 0x1F, bits 1:0
    address bits 33:32 (``mic_dma_prog_ring``).
    """
    check_ring_size(ring_size)
    if not regs.SYSTEM_WINDOW <= ring_addr < regs.SYSTEM_WINDOW_END:
        raise ValueError(f"host ring address {ring_addr:#x} is not in the SMPT window")
    hi = (ring_size & regs.DRAR_HI_SIZE_MASK) << regs.DRAR_HI_SIZE_SHIFT
    hi |= regs.DRAR_HI_SYSMEM
    hi |= ((ring_addr >> regs.SMPT_PAGE_SHIFT) & regs.DRAR_HI_SMPT_MASK) << regs.DRAR_HI_SMPT_SHIFT
    hi |= (ring_addr >> 32) & regs.DRAR_HI_SYS_ADDR_MASK
    return ring_addr & 0xFFFFFFFF, hi


def drar_host_decode(lo: int, hi: int) -> tuple[int, int]:
    """Inverse of :func:`drar_host`: (ring card address, ring size)."""
    index = (hi >> regs.DRAR_HI_SMPT_SHIFT) & regs.DRAR_HI_SMPT_MASK
    addr = regs.SYSTEM_WINDOW + (index << regs.SMPT_PAGE_SHIFT) + ((hi & regs.DRAR_HI_SYS_ADDR_MASK) << 32) + lo
    return addr, (hi >> regs.DRAR_HI_SIZE_SHIFT) & regs.DRAR_HI_SIZE_MASK


def check_ring_size(n: int) -> None:
    """A ring size DRAR_HI can carry: 17 bits, and a multiple of 4 like the kernel's 0x1FFFC [INF]."""
    if not 8 <= n <= regs.DMA_RING_SIZE or n % 4:
        raise ValueError(f"DMA ring size {n} must be a multiple of 4 in 8..{regs.DMA_RING_SIZE}")


# --- ring arithmetic ----------------------------------------------------------------------
def ring_used(head: int, tail: int, size: int) -> int:
    """Descriptors written but not yet retired, from ``tail`` up to ``head`` (mod ``size``)."""
    return (head - tail) % size


def ring_space(head: int, tail: int, size: int) -> int:
    """Free slots: one always stays empty so head == tail means empty (``mic_dma_ring_count``)."""
    return size - 1 - (head - tail) % size


def ring_add(index: int, n: int, size: int) -> int:
    return (index + n) % size


# --- splitting and spreading copies --------------------------------------------------------
def split(length: int, max_xfer: int = MAX_XFER) -> list[tuple[int, int]]:
    """(offset, size) pieces of at most ``max_xfer`` bytes covering ``length`` (both multiples of 64)."""
    if length <= 0 or length % ALIGN or max_xfer <= 0 or max_xfer % ALIGN:
        raise ValueError(f"cannot split {length:#x} bytes into pieces of {max_xfer:#x}")
    return [(off, min(max_xfer, length - off)) for off in range(0, length, max_xfer)]


def spread(length: int, ways: int, min_part: int = ALIGN) -> list[tuple[int, int]]:
    """Cut ``length`` into at most ``ways`` contiguous parts of near-equal size, each a multiple of 64.

    Parts are at least ``min_part`` bytes (rounded up to 64), so a small copy
    stays on one channel where a second channel would only add a doorbell.
    """
    if length <= 0 or length % ALIGN or ways <= 0:
        raise ValueError(f"cannot spread {length:#x} bytes over {ways} channels")
    min_part = max(ALIGN, -(-min_part // ALIGN) * ALIGN)
    units = length // ALIGN
    n = max(1, min(ways, length // min_part, units))
    base, extra = divmod(units, n)
    parts, off = [], 0
    for k in range(n):
        size = (base + (1 if k < extra else 0)) * ALIGN
        parts.append((off, size))
        off += size
    return parts
