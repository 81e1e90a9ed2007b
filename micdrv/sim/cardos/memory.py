"""Card memory as the card OS uses it: Memory windows over the card bus, and the kernel heap (spec 9).

:class:`CardMemory` is a :class:`~micdrv.memory.Memory` over
:class:`~micdrv.sim.card.CardSide` -- GDDR by card physical address, or
host memory through the SMPT window -- so the protocol code shared with the
host (SCIF queue pairs, ``struct mic_bootparam``) runs unchanged on the
card. Every access goes through the card bus: checked, counted as a card
fault when nothing is there, and refused with
:class:`~micdrv.sim.card.CardOSStopped` once a reset stopped this card OS
(so a stale OS can never write over its successor).

:class:`CardHeap` hands out card memory for the kernel's own structures
(SCIF queues, DMA descriptor rings). :func:`free_ranges` finds where it may
live: card memory minus what the boot put there -- low memory, the kernel
(image, command line, ``init_size``), the log buffer, the ramdisk.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from micdrv.memory import MemoryBase

from ..bus import copy_view

if TYPE_CHECKING:
    from ..card import CardSide

LOW_MEMORY = 1 << 20   # the first MiB: real-mode and firmware areas on x86, never handed out [choice]
HEAP_MAX = 64 << 20    # the heap is the largest free range, at most this big [choice]
GRANULE = 64           # cache line: SCIF rings and DMA descriptors want 64-byte alignment


class CardMemory(MemoryBase):
    """``[base, base + size)`` of card physical addresses, reached through the card bus."""

    def __init__(self, side: "CardSide", base: int, size: int, name: str):
        super().__init__(base, size, name)
        self.side = side

    def _read(self, addr: int, n: int) -> bytes:
        return self.side.read(addr, n)

    def _write(self, addr: int, data) -> None:
        self.side.write(addr, data)

    def read_into(self, addr: int, dst) -> None:
        """``len(dst)`` bytes at ``addr`` into ``dst`` (writable, bytes-like): one copy, the GIL released
        for large ones (:func:`~micdrv.sim.bus.copy_view`) -- where :meth:`read` makes a ``bytes`` first."""
        dst = memoryview(dst).cast("B")
        n = len(dst)
        self.check(addr, n, "read")
        if not n:
            return
        if addr + n > self.side.memory_size:     # not (all) GDDR: the checked, piecewise path
            dst[:] = self.side.read(addr, n)
            return
        src = self.side.view(addr, n)
        try:
            copy_view(dst, src)
        finally:
            src.release()

    def read_u32(self, addr: int) -> int:
        self.check(addr, 4, "read")
        return self.side.read32(addr)

    def read_u64(self, addr: int) -> int:
        self.check(addr, 8, "read")
        return self.side.read64(addr)

    def write_u32(self, addr: int, value: int) -> None:
        self.check(addr, 4, "write")
        self.side.write32(addr, value)

    def write_u64(self, addr: int, value: int) -> None:
        self.check(addr, 8, "write")
        self.side.write64(addr, value)


def free_ranges(memory_size: int, used: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of ``[LOW_MEMORY, memory_size)`` outside every ``(start, end)`` in ``used``."""
    out, pos = [], LOW_MEMORY
    clipped = ((max(s, 0), min(e, memory_size)) for s, e in used)
    for start, end in sorted((s, e) for s, e in clipped if e > s):
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < memory_size:
        out.append((pos, memory_size))
    return out


class CardHeap:
    """First-fit allocator over one range of card memory; addresses are card physical."""

    def __init__(self, start: int, end: int):
        start = -(-start // 4096) * 4096
        if end - start < 4096:
            raise MemoryError(f"no card memory for the kernel heap ([{start:#x}, {end:#x}))")
        self.start, self.end = start, end
        self._free = [(start, end - start)]
        self._lock = threading.Lock()
        self.used = 0

    def alloc(self, size: int, align: int = GRANULE) -> int:
        size = -(-size // GRANULE) * GRANULE
        with self._lock:
            for i, (off, length) in enumerate(self._free):
                at = -(-off // align) * align
                if at + size <= off + length:
                    pieces = [(off, at - off)] if at > off else []
                    if at + size < off + length:
                        pieces.append((at + size, off + length - at - size))
                    self._free[i:i + 1] = pieces
                    self.used += size
                    return at
        raise MemoryError(f"card heap: no {size:#x} bytes free")

    def free(self, addr: int, size: int) -> None:
        size = -(-size // GRANULE) * GRANULE
        with self._lock:
            free = sorted(self._free + [(addr, size)])
            merged = [free[0]]
            for off, n in free[1:]:
                last_off, last_n = merged[-1]
                if last_off + last_n > off:
                    raise ValueError(f"card heap: free of [{addr:#x}, +{size:#x}) overlaps free space")
                if last_off + last_n == off:
                    merged[-1] = (last_off, last_n + n)
                else:
                    merged.append((off, n))
            self._free = merged
            self.used -= size
