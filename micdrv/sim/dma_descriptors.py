"""DMA descriptors and rings: decoding, checking, executing one descriptor (spec 4.1-4.3).

A descriptor is two little-endian qwords (spec 4.3):

======== ============================================= ===========================================
type     qw0                                           qw1
======== ============================================= ===========================================
MEMCPY 1 bits 45:0 source, bits 59:46 length / 64      bits 63:60 = 1, destination in bits 58:0
STATUS 2 the 64-bit value to store                     bits 63:60 = 2, bit 59 interrupt,
                                                       destination in bits 58:0
======== ============================================= ===========================================

Addresses are card physical (spec 4.1): GDDR offsets or SMPT-window
addresses; they go through :class:`~.bus.CardBus`. The destination is all
of qw1 below the interrupt bit [choice; spec 4.3 gives no width], so a
destination with stray high bits is an address fault, not an alias.

A descriptor the engine cannot execute stops the channel with a DCHERR bit
set. The DCHERR encoding is not in the spec [UNK]; the simulator's
(CHOICES in :mod:`micdrv.sim`):

======== =====================================================================
bit      error
======== =====================================================================
0 (0x01) unknown descriptor type (0 included: the driver never writes it)
1 (0x02) misaligned: MEMCPY source or destination not a multiple of 64,
         STATUS destination not a multiple of 8
2 (0x04) bad length: 0, or over the channel's maximum (host-owned 512 KiB,
         card-owned 1 MiB - 64, spec 4.1)
3 (0x08) address fault: outside card memory, the register window, or an SMPT
         translation outside the host's DMA maps (a card-side fault)
4 (0x10) host to host: both addresses in the SMPT window (spec 4.1: the
         engine cannot copy host memory to host memory)
5 (0x20) ring fault: ring size 0, ring not 64-byte aligned, or descriptors
         unreadable
6 (0x40) DHPR fault: DHPR written with its current value ("hardware would
         think the ring was filled", spec 4.4) or with an index >= ring size
======== =====================================================================
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from micdrv.x100 import regs

from .bus import CardBus, CardFault

ERR_TYPE = 1 << 0
ERR_ALIGN = 1 << 1
ERR_LENGTH = 1 << 2
ERR_ADDRESS = 1 << 3
ERR_HOST_TO_HOST = 1 << 4
ERR_RING = 1 << 5
ERR_DHPR = 1 << 6
ERROR_NAMES = {ERR_TYPE: "type", ERR_ALIGN: "align", ERR_LENGTH: "length", ERR_ADDRESS: "address",
               ERR_HOST_TO_HOST: "host_to_host", ERR_RING: "ring", ERR_DHPR: "dhpr"}

DESCRIPTOR = struct.Struct("<QQ")
STATUS_ALIGN = 8
DST_MASK = (1 << 59) - 1  # qw1 bits 58:0
# The same constants as module globals, for execute() (every descriptor):
_TYPE_SHIFT, _MEMCPY, _STATUS = regs.DESC_TYPE_SHIFT, regs.DESC_MEMCPY, regs.DESC_STATUS
_ADDR_MASK, _LEN_SHIFT, _LEN_MASK = regs.DESC_ADDR_MASK, regs.DESC_LEN_SHIFT, regs.DESC_LEN_MASK
_ALIGN, _ALIGN_MASK = regs.DMA_ALIGN, regs.DMA_ALIGN - 1
_SYSTEM, _SYSTEM_END = regs.SYSTEM_WINDOW, regs.SYSTEM_WINDOW_END


class DescriptorError(Exception):
    """A descriptor (or ring) the engine cannot execute; ``bits`` go to DCHERR."""

    def __init__(self, bits: int, detail: str):
        self.bits = bits
        self.detail = detail
        super().__init__(f"{'/'.join(n for b, n in ERROR_NAMES.items() if bits & b)}: {detail}")


@dataclass(frozen=True)
class Ring:
    """Where DRAR says the descriptor ring is (spec 4.2)."""

    addr: int  # card physical
    size: int  # descriptors
    sysmem: bool

    def check(self) -> None:
        if self.size == 0:
            raise DescriptorError(ERR_RING, "ring size 0 in DRAR_HI bits 20:4")
        if self.addr % regs.DMA_ALIGN:
            raise DescriptorError(ERR_RING, f"ring address {self.addr:#x} is not 64-byte aligned")


def ring_of(drar_lo: int, drar_hi: int) -> Ring:
    """Decode DRAR_LO/HI (spec 4.2): size in bits 20:4; bit 26 set = system memory with the
    SMPT index in bits 25:21 and address bits 33:32 in bits 1:0; else address bits 35:32 in bits 3:0."""
    size = drar_hi >> regs.DRAR_HI_SIZE_SHIFT & regs.DRAR_HI_SIZE_MASK
    if drar_hi & regs.DRAR_HI_SYSMEM:
        index = drar_hi >> regs.DRAR_HI_SMPT_SHIFT & regs.DRAR_HI_SMPT_MASK
        addr = regs.SYSTEM_WINDOW | index << regs.SMPT_PAGE_SHIFT | \
            (drar_hi & regs.DRAR_HI_SYS_ADDR_MASK) << 32 | drar_lo
        return Ring(addr, size, True)
    return Ring((drar_hi & regs.DRAR_HI_CARD_ADDR_MASK) << 32 | drar_lo, size, False)


def fetch(bus: CardBus, ring: Ring, index: int, count: int) -> list[tuple[int, int]]:
    """``count`` descriptors from ``index`` on (not wrapping) as (qw0, qw1) pairs."""
    try:
        view = bus.view(ring.addr + index * regs.DMA_DESC_SIZE, count * regs.DMA_DESC_SIZE)
    except CardFault as e:
        raise DescriptorError(ERR_RING, f"descriptors {index}..{index + count - 1} unreadable: {e.detail}") from None
    try:
        return list(DESCRIPTOR.iter_unpack(view))
    finally:
        view.release()


def execute(bus: CardBus, qw0: int, qw1: int, max_xfer: int, release_gil: bool = True) -> tuple[int, bool]:
    """Run one descriptor: (bytes copied, interrupt requested). Raises DescriptorError.

    ``release_gil``: as :meth:`.bus.CardBus.copy`.
    """
    kind = qw1 >> _TYPE_SHIFT
    dst = qw1 & DST_MASK
    if kind == _MEMCPY:
        src = qw0 & _ADDR_MASK
        length = (qw0 >> _LEN_SHIFT & _LEN_MASK) * _ALIGN  # in 64-byte units (spec 4.3)
        if (src | dst) & _ALIGN_MASK:
            raise DescriptorError(ERR_ALIGN, f"MEMCPY {src:#x} -> {dst:#x}: addresses must be multiples of 64")
        if length == 0 or length > max_xfer:
            raise DescriptorError(ERR_LENGTH, f"MEMCPY of {length:#x} bytes (1..{max_xfer:#x} allowed)")
        if _SYSTEM <= src < _SYSTEM_END and _SYSTEM <= dst < _SYSTEM_END:
            raise DescriptorError(ERR_HOST_TO_HOST, f"MEMCPY {src:#x} -> {dst:#x}: host memory to host memory")
        try:
            bus.copy(dst, src, length, release_gil)
        except CardFault as e:
            raise DescriptorError(ERR_ADDRESS, f"MEMCPY {src:#x} -> {dst:#x} +{length:#x}: {e.detail}") from None
        return length, False
    if kind == _STATUS:
        if dst % STATUS_ALIGN:
            raise DescriptorError(ERR_ALIGN, f"STATUS to {dst:#x}: not 8-byte aligned")
        try:
            bus.write(dst, qw0.to_bytes(8, "little"))
        except CardFault as e:
            raise DescriptorError(ERR_ADDRESS, f"STATUS to {dst:#x}: {e.detail}") from None
        return 0, bool(qw1 & regs.DESC_STATUS_INTR)
    raise DescriptorError(ERR_TYPE, f"descriptor type {kind} (qw0 {qw0:#x}, qw1 {qw1:#x})")
