"""Staging memory for one VOP queue: where chain payload sits in the DmaArena while a backend uses it (spec 5.7).

The card's buffers are card memory; a backend only ever sees host memory.
So each queue owns one arena allocation, its *staging area*, and every chain
it hands out gets a contiguous piece of it: the card's readable buffers are
DMAed into that piece before the backend runs (the views the backend reads
are the DMA destinations), the backend fills the writable part, and the
written bytes are copied back to the card when the chain completes
(:mod:`.queue`). Upstream VOP copied through one 64 KiB bounce buffer per
vring (VOP_INT_DMA_BUF_SIZE) chunk by chunk; a larger area per queue lets a
whole drain batch move in one DMA batch instead.

:class:`StagingRing` allocates in FIFO order from a circular area, which is
how chains come and go (popped in ring order, completed mostly in order).
Out-of-order frees are fine: space is reclaimed once everything before it
is freed. Freeing the *newest* allocations (a drain giving back the tail of
a batch) reclaims them at once. Allocation is a few integer operations, no
arena lock.
"""

from __future__ import annotations

from collections import deque

GRANULE = 64   # DMA alignment (spec 4.1): every piece starts on a 64-byte boundary


def align64(n: int) -> int:
    return (n + GRANULE - 1) & ~(GRANULE - 1)


class StagingRing:
    """FIFO allocator over ``[0, size)`` offsets of one staging area (the caller adds the area's base)."""

    __slots__ = ("size", "_live", "_head", "_tail", "allocated", "high_water")

    def __init__(self, size: int):
        if size <= 0 or size % GRANULE:
            raise ValueError(f"staging size {size} must be a positive multiple of {GRANULE}")
        self.size = size
        self._live: deque[list] = deque()   # [start, length, freed], oldest first
        self._head = 0                      # where the next allocation goes
        self._tail = 0                      # start of the oldest live allocation
        self.allocated = 0                  # bytes currently allocated (including wrap waste)
        self.high_water = 0

    def alloc(self, n: int) -> int | None:
        """The offset of ``n`` bytes (rounded to 64), or None when they do not fit now."""
        n = (n + GRANULE - 1) & ~(GRANULE - 1) if n > 0 else GRANULE
        size = self.size
        if n > size:
            return None
        live = self._live
        head, tail = self._head, self._tail
        if not live:
            self._tail = 0
            start = 0
        elif head > tail:
            # not wrapped: [tail, head) is in use; room after head, else wrap to 0 below tail
            if size - head >= n:
                start = head
            elif tail >= n:
                start = 0
                live[-1][1] += size - head   # the skipped end belongs to the newest piece
                self.allocated += size - head
            else:
                return None
        else:
            # wrapped (head <= tail): in use are [tail, size) and [0, head); the gap is [head, tail)
            if tail - head >= n:
                start = head
            else:
                return None
        live.append([start, n, False])
        self._head = start + n
        a = self.allocated = self.allocated + n
        if a > self.high_water:
            self.high_water = a
        return start

    def free(self, start: int) -> None:
        """Give back the allocation at ``start``."""
        live = self._live
        if not live:
            raise ValueError(f"staging: free of offset {start}, which is not allocated")
        first = live[0]
        if first[0] == start and not first[2] and len(live) > 1:
            # the oldest (chains complete in order): reclaimed at once, with the freed ones after it
            live.popleft()
            freed = first[1]
            while live and live[0][2]:
                freed += live.popleft()[1]
            self.allocated -= freed
            if live:
                self._tail = live[0][0]
            else:
                self._head = self._tail = 0
            return
        if live[-1][0] == start and not live[-1][2]:
            # the newest: reclaim at once (an abandoned batch tail)
            s, n, _ = live.pop()
            self.allocated -= n
            self._head = s
            self._pop_freed_newest()
        else:
            for piece in live:
                if piece[0] == start and not piece[2]:
                    piece[2] = True
                    break
            else:
                raise ValueError(f"staging: free of offset {start}, which is not allocated")
        while live and live[0][2]:
            s, n, _ = live.popleft()
            self.allocated -= n
        if live:
            self._tail = live[0][0]
        else:
            self._head = self._tail = 0

    def _pop_freed_newest(self) -> None:
        live = self._live
        while live and live[-1][2]:
            s, n, _ = live.pop()
            self.allocated -= n
            self._head = s

    @property
    def in_use(self) -> int:
        return len(self._live)

    def __repr__(self) -> str:
        return f"<StagingRing {self.allocated}/{self.size} bytes in {len(self._live)} pieces>"
