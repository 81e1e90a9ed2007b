"""The card's register file: BAR4 as the host sees it and 0x08_007C_0000 as the card sees it (spec 1.2, 2.1, 9).

One 128 KiB block of 32-bit registers (spec "Conventions": 32-bit, little
endian) reached from two sides: the host through BAR4 (trapped REGION_READ
and REGION_WRITE) and card software through the card bus's MMIO window. Both
sides hit the same registers with the same semantics; hardware does not know
who wrote.

This module only dispatches. Each part of the card (interrupts, doorbells,
SMPT, DMA engine, reset, scratch pads, post code) maps its own registers
with :meth:`RegisterFile.map`; an offset nobody mapped reads 0 and ignores
writes, and the access is counted (CHOICES in :mod:`micdrv.sim`).

Access sizes: 4-byte aligned accesses are the registers' own size. An
8-byte aligned access is split into two dword accesses -- for a write the
dword at +4 first, then +0, because in the one 64-bit register pair whose
halves interact (APICICR, spec 2.3/3.2) the low dword is the trigger. Any
other size or alignment fails with EINVAL.

Every access runs under the card lock (:attr:`RegisterFile.lock`), shared
by everything that changes card state, so one register access is atomic
against DMA channel threads, the bootstrap timer and card software.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Callable

from micdrv.pci.vfio_user import CommandError
from micdrv.x100 import regs

log = logging.getLogger(__name__)

ReadFn = Callable[[], int]
WriteFn = Callable[[int], None]


class RegisterFile:
    """Offset -> (read, write) for the 32-bit registers of BAR4 (spec 2.1)."""

    size = regs.MMIO_SIZE

    def __init__(self, lock: threading.RLock):
        self.lock = lock
        self._regs: dict[int, tuple[ReadFn | None, WriteFn | None]] = {}
        self.unmapped_reads = 0
        self.unmapped_writes = 0

    def map(self, offset: int, read: ReadFn | None, write: WriteFn | None) -> None:
        """Give ``offset`` a read (None: reads 0) and a write (None: read-only, writes ignored)."""
        if offset % 4 or not 0 <= offset < self.size:
            raise ValueError(f"register offset {offset:#x} is not a dword inside the register file")
        if offset in self._regs:
            raise ValueError(f"register {offset:#x} mapped twice")
        self._regs[offset] = (read, write)

    def map_plain(self, offset: int, cells: list[int], index: int) -> None:
        """A plain read/write register whose value lives in ``cells[index]``."""
        def read() -> int:
            return cells[index]

        def write(value: int) -> None:
            cells[index] = value
        self.map(offset, read, write)

    def is_mapped(self, offset: int) -> bool:
        return offset in self._regs

    # --- dword access (both sides) ----------------------------------------------------
    def read32(self, offset: int) -> int:
        with self.lock:
            read, _ = self._regs.get(offset, (None, None))
            if read is None:
                if offset not in self._regs:
                    self.unmapped_reads += 1
                return 0
            return read() & 0xFFFFFFFF

    def write32(self, offset: int, value: int) -> None:
        with self.lock:
            entry = self._regs.get(offset)
            if entry is None:
                self.unmapped_writes += 1
                return
            if entry[1] is not None:
                entry[1](value & 0xFFFFFFFF)

    def read64(self, offset: int) -> int:
        with self.lock:
            return self.read32(offset) | self.read32(offset + 4) << 32

    def write64(self, offset: int, value: int) -> None:
        with self.lock:
            self.write32(offset + 4, value >> 32 & 0xFFFFFFFF)  # high first: the low dword triggers
            self.write32(offset, value & 0xFFFFFFFF)

    # --- the host's BAR4 (TrappedRegion callbacks) ----------------------------------------
    def _check(self, offset: int, size: int, what: str) -> None:
        if size not in (4, 8) or offset % size or offset + size > self.size:
            raise CommandError(errno.EINVAL, f"BAR4 {what} of {size} bytes at {offset:#x}: registers are "
                                             "32-bit (spec 2.1); 8-byte accesses must be 8-byte aligned")

    def region_read(self, offset: int, size: int) -> int:
        if size == 4 and not offset & 3 and 0 <= offset < self.size:  # the common case: one dword
            return self.read32(offset)
        self._check(offset, size, "read")
        return self.read32(offset) if size == 4 else self.read64(offset)

    def region_write(self, offset: int, data: bytes) -> None:
        if len(data) == 4 and not offset & 3 and 0 <= offset < self.size:  # the common case: one dword
            self.write32(offset, int.from_bytes(data, "little"))
            return
        self._check(offset, len(data), "write")
        value = int.from_bytes(data, "little")
        if len(data) == 4:
            self.write32(offset, value)
        else:
            self.write64(offset, value)
