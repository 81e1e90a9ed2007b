"""The two windows onto a card: the BAR4 register file and the BAR0 aperture (spec 1.2).

:class:`Registers` is BAR4: 32-bit little-endian registers accessed with
32-bit reads and writes only (spec "Conventions"). When the PciDevice can
mmap BAR4 (a real card under vfio-pci) an access is one load or store
through a memoryview cast to ``'I'``; when it cannot (the simulated card traps
BAR4, so every access is a vfio-user message) reads are
:meth:`~micdrv.pci.PciDevice.read` round trips and writes are posted
:meth:`~micdrv.pci.PciDevice.write` messages -- PCIe memory writes are posted,
so a doorbell costs one ``sendmsg`` and never waits. A posted write is
processed before any later read (the server works in arrival order), so a
read-back after a write sees it.

The kernel driver's ``wmb()`` before a doorbell orders descriptor stores in
host memory before the MMIO write. x86 stores are not reordered with other
stores (TSO), and a vfio-user write leaves after the stores to the shared
arena have been made, so no explicit barrier is needed here.

:class:`Aperture` is BAR0: card physical address X is BAR0 offset X (spec
1.2), mapped whole as a memoryview (write-combined on silicon).
:meth:`Aperture.memory` is the same window as a bounds-checked
:class:`~micdrv.memory.Memory` addressed by card physical address, for
protocol code (SCIF queue pairs, the card log): zero-copy over the mapping,
or region reads and writes when BAR0 cannot be mapped.
"""

from __future__ import annotations

import struct

from ..addr import BarOffset, CardPhys
from ..memory import BufferMemory, Memory, MemoryBase
from ..pci import BAR0, BAR4, PciDevice
from ..pci.errors import RegionError
from . import regs
from .errors import X100Error

_U32 = struct.Struct("<I").pack


class Registers:
    """The BAR4 register file of one card."""

    def __init__(self, dev: PciDevice):
        self.dev = dev
        info = dev.region_info(BAR4)
        if info.size < regs.MMIO_SIZE:
            raise X100Error(f"map BAR4 of {dev.name}", f"BAR4 is {info.size:#x} bytes, the card needs "
                            f"{regs.MMIO_SIZE:#x} (spec 1.2)")
        self.size = info.size
        self._words: memoryview | None = None
        areas = info.mmap_areas()
        # Only a mapping that covers the whole register file is used; a BAR4
        # whose registers are partly trapped (a sparse mmap around the MSI-X
        # table, say) is reached through messages, which is always correct.
        if areas and areas[0].offset == 0 and areas[0].size >= regs.MMIO_SIZE:
            try:
                self._words = dev.mmap(BAR4, 0).cast("I")
            except RegionError:
                self._words = None

    @property
    def mmapped(self) -> bool:
        """True when accesses are loads and stores, False when each is a device message."""
        return self._words is not None

    def read(self, offset: BarOffset | int) -> int:
        words = self._words
        if words is not None:
            return words[offset >> 2]
        return self.dev.read(BAR4, offset, 4)

    def read_async(self, offset: BarOffset | int, callback) -> bool:
        """:meth:`read`, the value to ``callback(value, error)``; True while the answer is still to come
        (:meth:`~micdrv.pci.PciDevice.read_async`), False when ``callback`` ran already (mapped registers)."""
        words = self._words
        if words is not None:
            callback(words[offset >> 2], None)
            return False
        return self.dev.read_async(BAR4, offset, 4, callback)

    def write(self, offset: BarOffset | int, value: int) -> None:
        """A posted 32-bit write (returns before the card has seen it)."""
        words = self._words
        if words is not None:
            words[offset >> 2] = value
        else:
            self.dev.write(BAR4, offset, 4, value, posted=True)

    def write_many(self, writes: tuple[tuple[int, int], ...]) -> None:
        """Posted 32-bit writes ``(offset, value)``, in order: stores through the mapping, else
        :meth:`~micdrv.pci.PciDevice.write_multi` -- over vfio-user one REGION_WRITE_MULTI message
        (vfio-user notes 2.5) instead of one message each; the card sees the same writes in the same order."""
        words = self._words
        if words is not None:
            for offset, value in writes:
                words[offset >> 2] = value
        else:
            self.dev.write_multi([(BAR4, offset, _U32(value)) for offset, value in writes], posted=True)

    def set_bits(self, offset: BarOffset | int, bits: int) -> int:
        """Read-modify-write: OR ``bits`` in; returns the value written."""
        v = self.read(offset) | bits
        self.write(offset, v)
        return v

    def clear_bits(self, offset: BarOffset | int, bits: int) -> int:
        """Read-modify-write: clear ``bits``; returns the value written."""
        v = self.read(offset) & ~bits & 0xFFFFFFFF
        self.write(offset, v)
        return v

    def release(self) -> None:
        if self._words is not None:
            self._words.release()
            self._words = None


class Aperture:
    """BAR0: the card's GDDR, offset X = card physical address X (spec 1.2)."""

    def __init__(self, dev: PciDevice):
        self.dev = dev
        info = dev.region_info(BAR0)
        self.size = info.size
        try:
            self.view: memoryview | None = dev.mmap(BAR0)
        except RegionError:
            self.view = None  # every access becomes a region read/write
        self._memory: Memory | None = None

    def _check(self, addr: int, length: int, what: str) -> None:
        if addr < 0 or length < 0 or addr + length > self.size:
            raise X100Error(f"aperture {what} of [{addr:#x}, +{length:#x})",
                            f"outside card memory (BAR0 is {self.size:#x} bytes)")

    def read(self, addr: CardPhys | int, length: int) -> bytes:
        self._check(addr, length, "read")
        if self.view is not None:
            return bytes(self.view[addr:addr + length])
        return self.dev.read_bytes(BAR0, addr, length)

    def write(self, addr: CardPhys | int, data: bytes | bytearray | memoryview) -> None:
        self._check(addr, len(data), "write")
        if self.view is not None:
            self.view[addr:addr + len(data)] = data
        else:
            self.dev.write_bytes(BAR0, addr, data)

    def memory(self) -> Memory:
        """BAR0 as :class:`~micdrv.memory.Memory` by card physical address (spec 1.2: offset X = address X)."""
        if self._memory is None:
            if self.view is not None:
                self._memory = BufferMemory(self.view, base=0, name="BAR0")
            else:
                self._memory = ApertureRegionMemory(self.dev, self.size)
        return self._memory

    def release(self) -> None:
        if isinstance(self._memory, BufferMemory):
            self._memory.release()
        self._memory = None
        if self.view is not None:
            self.view.release()
            self.view = None


class ApertureRegionMemory(MemoryBase):
    """BAR0 through region reads and writes, for a PciDevice that cannot mmap it.

    Aligned 32- and 64-bit words are one sized access each (a PCIe read or
    write of that width), as the card's own pointers need.
    """

    def __init__(self, dev: PciDevice, size: int):
        super().__init__(0, size, "BAR0")
        self.dev = dev

    def _read(self, addr: int, n: int) -> bytes:
        return self.dev.read_bytes(BAR0, addr, n) if n else b""

    def _write(self, addr: int, data) -> None:
        if len(data):
            self.dev.write_bytes(BAR0, addr, data)

    def read_u32(self, addr: int) -> int:
        self.check(addr, 4, "read")
        if addr & 3:
            return int.from_bytes(self._read(addr, 4), "little")
        return self.dev.read(BAR0, addr, 4)

    def read_u64(self, addr: int) -> int:
        self.check(addr, 8, "read")
        if addr & 7:
            return int.from_bytes(self._read(addr, 8), "little")
        return self.dev.read(BAR0, addr, 8)

    def write_u32(self, addr: int, value: int) -> None:
        self.check(addr, 4, "write")
        if addr & 3:
            self._write(addr, value.to_bytes(4, "little"))
        else:
            self.dev.write(BAR0, addr, 4, value, posted=False)

    def write_u64(self, addr: int, value: int) -> None:
        self.check(addr, 8, "write")
        if addr & 7:
            self._write(addr, value.to_bytes(8, "little"))
        else:
            self.dev.write(BAR0, addr, 8, value, posted=False)
