"""The System Memory Page Table: how card addresses from 0x80_0000_0000 reach host memory (spec 2.4).

32 registers SMPT00-31 (BAR4 0x13100 + 4*i). Card physical address
``0x80_0000_0000 + i * 16 GiB + off`` (off < 16 GiB) is host bus address
``host_page(SMPT[i]) + off``, where an entry holds ``((A >> 34) << 2) |
no_snoop`` for host page address A (bit 1 reserved). In this simulator a
"host bus address" is an IOVA of the vfio-user client's DMA maps. The
no-snoop bit is stored and ignored (there are no caches to bypass).

Entries are plain read/write registers and read 0 after a card reset: the
spec warns that "some steppings lose register state across resets" and the
host rewrites all 32 before every boot (spec 2.4, 3.2 step 8), so the
simulator loses them, which catches a host that forgets (CHOICES in
:mod:`micdrv.sim`).
"""

from __future__ import annotations

from micdrv.x100 import regs

from .registers import RegisterFile

PAGE_OFFSET_MASK = regs.SMPT_PAGE_SIZE - 1


class Smpt:
    """The 32 SMPT entries and the translation through them."""

    def __init__(self):
        self.entries = [0] * regs.SMPT_ENTRIES

    def map_registers(self, rf: RegisterFile) -> None:
        for i in range(regs.SMPT_ENTRIES):
            rf.map_plain(regs.smpt(i), self.entries, i)

    def reset(self) -> None:
        self.entries[:] = [0] * regs.SMPT_ENTRIES

    @staticmethod
    def covers(card_addr: int) -> bool:
        return regs.SYSTEM_WINDOW <= card_addr < regs.SYSTEM_WINDOW_END

    def translate(self, card_addr: int) -> tuple[int, int, int]:
        """(entry index, host bus address, bytes left in that 16 GiB page) for a window address."""
        rel = card_addr - regs.SYSTEM_WINDOW
        index = rel >> regs.SMPT_PAGE_SHIFT
        off = rel & PAGE_OFFSET_MASK
        return index, regs.smpt_host_page(self.entries[index]) + off, regs.SMPT_PAGE_SIZE - off
