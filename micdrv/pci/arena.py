"""DmaArena: the only host memory a device may ever reach.

ARCHITECTURE.md "Addresses": all host memory the card may touch (device page,
vrings, DMA descriptor rings, SCIF queues, bounce buffers) lives in one arena.
The arena is a memfd, mmapped once into the daemon. It is mapped into the
device's IOVA space through either PciDevice implementation: kernel VFIO pins
the daemon's virtual addresses, vfio-user hands the memfd to the device
process, so both sides share the same pages.

The arena is carved into aligned allocations (64-byte cache lines for
descriptors and rings, 4 KiB pages for buffers the card maps). The daemon owns
the IOVA layout: the arena sits at one IOVA base, and :meth:`DmaArena.iova`
and :meth:`DmaArena.offset_of` are the one place that converts between arena
offsets and IOVAs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from dataclasses import dataclass

from ..addr import Iova
from ..memory import BufferMemory
from .device import PciDevice
from .errors import DmaMapError, PciError

PAGE = 4096
CACHELINE = 64


@dataclass(frozen=True)
class Allocation:
    """A piece of the arena: ``offset`` and ``size`` in bytes from its start."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


class DmaArena:
    """memfd-backed memory, mmapped once, carved into aligned allocations."""

    def __init__(self, size: int, name: str = "micdrv-arena"):
        if size <= 0 or size % PAGE:
            raise ValueError(f"arena size {size:#x} must be a positive multiple of {PAGE:#x}")
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, size)
            self._mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self._size = size
        self.view = memoryview(self._mm)
        # The host virtual address kernel VFIO pins (MAP_DMA vaddr). Taken once;
        # the mapping never moves while the arena lives.
        self._anchor = ctypes.c_char.from_buffer(self._mm)
        self._address = ctypes.addressof(self._anchor)
        self._free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, size)
        self._lock = threading.Lock()
        self._mapped: list[tuple[PciDevice, Iova]] = []
        self._iova_base: Iova | None = None
        self._memory: BufferMemory | None = None

    # --- DmaBacking -----------------------------------------------------------
    @property
    def fd(self) -> int:
        return self._fd

    @property
    def address(self) -> int:
        return self._address

    @property
    def size(self) -> int:
        return self._size

    # --- allocation -----------------------------------------------------------
    def alloc(self, size: int, align: int = CACHELINE) -> Allocation:
        """First-fit allocation of ``size`` bytes aligned to ``align`` (a power of two >= 64)."""
        if size <= 0:
            raise ValueError("allocation size must be positive")
        if align < CACHELINE or align & (align - 1):
            raise ValueError(f"alignment {align} must be a power of two >= {CACHELINE}")
        size = -(-size // CACHELINE) * CACHELINE
        with self._lock:
            for i, (off, length) in enumerate(self._free):
                start = -(-off // align) * align
                if start + size <= off + length:
                    pieces = []
                    if start > off:
                        pieces.append((off, start - off))
                    if start + size < off + length:
                        pieces.append((start + size, off + length - start - size))
                    self._free[i:i + 1] = pieces
                    return Allocation(start, size)
        raise MemoryError(f"DmaArena: no {size:#x} bytes free with {align}-byte alignment")

    def free(self, a: Allocation) -> None:
        """Return an allocation; neighbours coalesce."""
        with self._lock:
            free = self._free
            lo, hi = 0, len(free)
            while lo < hi:
                mid = (lo + hi) // 2
                if free[mid][0] < a.offset:
                    lo = mid + 1
                else:
                    hi = mid
            prev_end = free[lo - 1][0] + free[lo - 1][1] if lo else 0
            if lo and prev_end > a.offset or lo < len(free) and free[lo][0] < a.end:
                raise ValueError(f"free of {a} overlaps free space (double free?)")
            off, size = a.offset, a.size
            if lo < len(free) and free[lo][0] == a.end:
                size += free[lo][1]
                del free[lo]
            if lo and prev_end == off:
                off, size = free[lo - 1][0], free[lo - 1][1] + size
                free[lo - 1] = (off, size)
            else:
                free.insert(lo, (off, size))

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(s for _o, s in self._free)

    # --- access ---------------------------------------------------------------
    def buf(self, a: Allocation) -> memoryview:
        """The host view of an allocation."""
        return self.view[a.offset:a.end]

    def slice(self, offset: int, length: int) -> memoryview:
        """Bounds-checked view of arena bytes: nothing outside the arena is ever reachable."""
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DmaMapError("arena access", f"[{offset:#x}, +{length:#x}) outside the {self._size:#x}-byte arena")
        return self.view[offset:offset + length]

    # --- IOVA layout ----------------------------------------------------------
    def map(self, device: PciDevice, iova_base: Iova | int = 0) -> None:
        """DMA-map the whole arena for ``device`` at ``iova_base``.

        The same base is used for every device the arena is mapped into, so an
        arena offset has one IOVA.
        """
        if self._iova_base is not None and self._iova_base != iova_base:
            raise DmaMapError(f"DMA map of the arena at {iova_base:#x}",
                              f"arena already lives at IOVA {self._iova_base:#x}")
        device.dma_map(self, iova_base, self._size, 0)
        self._iova_base = Iova(iova_base)
        self._mapped.append((device, Iova(iova_base)))

    def unmap(self, device: PciDevice) -> None:
        for i, (d, base) in enumerate(self._mapped):
            if d is device:
                if not d.closed:
                    d.dma_unmap(base, self._size)
                del self._mapped[i]
                break
        if not self._mapped:
            self._iova_base = None

    @property
    def iova_base(self) -> Iova:
        if self._iova_base is None:
            raise PciError("arena IOVA lookup", "the arena is not DMA-mapped")
        return self._iova_base

    def iova(self, where: Allocation | int) -> Iova:
        """The IOVA of an allocation or arena offset (arena offset -> IOVA, the one place)."""
        off = where.offset if isinstance(where, Allocation) else where
        if not 0 <= off <= self._size:
            raise DmaMapError("arena IOVA lookup", f"offset {off:#x} outside the arena")
        return Iova(self.iova_base + off)

    def offset_of(self, iova: Iova | int, length: int = 1) -> int:
        """The arena offset of ``iova`` (IOVA -> arena offset, the one place), bounds-checked."""
        off = iova - self.iova_base
        if off < 0 or length < 0 or off + length > self._size:
            raise DmaMapError("arena IOVA translation",
                              f"IOVA range [{iova:#x}, +{length:#x}) is outside the arena")
        return off

    def memory(self) -> BufferMemory:
        """The whole arena as :class:`~micdrv.memory.Memory` addressed by IOVA (the arena must be mapped).

        Zero-copy over the arena's mapping; aligned words are single loads and
        stores, so the device sharing the pages never sees a torn ring pointer.
        Host protocol code (SCIF queue pairs, the device page) reaches host
        memory only through this window, so an IOVA a card handed back that
        lies outside the arena raises instead of touching anything.
        """
        base = self.iova_base
        if self._memory is None or self._memory.base != base:
            self._release_memory()
            self._memory = BufferMemory(self.view, base=base, name="DmaArena")
        return self._memory

    def _release_memory(self) -> None:
        if self._memory is not None:
            self._memory.release()
            self._memory = None

    def close(self) -> None:
        self._release_memory()
        for d, _base in list(self._mapped):
            try:
                self.unmap(d)
            except PciError:
                pass
        self.view.release()
        del self._anchor
        try:
            self._mm.close()
        except BufferError:
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
