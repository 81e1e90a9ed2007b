"""The MIC virtqueue: a :class:`~backends.virtqueue.Virtqueue` over a VOP vring, staging payload (spec 5.5-5.7).

Where the parts of a VOP ring live (spec 5.4, 5.5): descriptors and avail in
host memory (the vring the host allocated in the DmaArena), the used ring in
card memory once the card moved it there (reached through BAR0). Every
descriptor's buffer is a card physical address; :class:`~micdrv.virtio.Vringh`
checks each against card memory (its ``buffers`` window is BAR0) before
anything is copied.

:meth:`VopQueue.pop_many` takes the chains, gives each a contiguous piece
of the queue's staging area (:mod:`.staging`), DMAs *all* their readable
buffers in with one batch (:meth:`~.copy.CopyEngine.read_in`) and hands the
backend views of staging -- the DMA destinations themselves, so nothing is
copied again. :meth:`VopQueue.complete_many` copies what the backends wrote
(the first ``written`` bytes of each chain's writable stream and the last
``tail``) to the card in one batch (:meth:`~.copy.CopyEngine.write_out`),
waits for it, then publishes the used entries with one ``used.idx`` store,
records the consumed index in ``_mic_vring_info.avail_idx`` (spec 5.6), and
rings the card once if it wants an interrupt.

A chain bigger than the staging area gets an arena allocation of its own
(up to :data:`MAX_CHAIN_BYTES`); a bigger one breaks the device.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from backends.virtqueue import Chain, Virtqueue
from micdrv.virtio import DescChain, VringError, Vringh

from ..pci import Allocation, DmaArena
from .copy import CopyEngine
from .staging import StagingRing, align64

MAX_CHAIN_BYTES = 16 << 20  # staging for one chain; Linux virtio-blk's largest (126 x 64 KiB) is ~8 MiB
POP_CHUNK = 16              # chains taken from the ring at a time while staging them (see pop_many)


class _Staged:
    """A chain's staging: its DescChain, where its piece is, and where each writable buffer sits."""

    __slots__ = ("desc", "offset", "own", "writable")

    def __init__(self, desc: DescChain, offset: int, own: Allocation | None, writable: list[tuple[int, int, int]]):
        self.desc = desc
        self.offset = offset          # arena offset of the piece
        self.own = own                # an allocation of its own (oversize chain), else None
        self.writable = writable      # (card address, length, offset of its bytes in the piece), per descriptor


class _Layout:
    """Where a chain's buffers go in its staging piece, relative to the piece (the same for every chain with
    the same buffers, so kept per :class:`~micdrv.virtio.vringh.ChainShape`).

    Buffers adjacent in card memory are one *extent*: one copy in, one view
    for the backend (a chain is a byte stream; where its descriptors end
    means nothing to it). Each extent sits ``addr % 64`` bytes into a
    64-aligned slot, so card and staging addresses agree modulo 64 and a
    copy widened to the 64-byte grid lands on its own slot. The writable
    descriptors are kept one by one: what goes back at completion follows
    each descriptor's own room (spec 5.7).
    """

    __slots__ = ("total", "reads", "wviews", "wslots")

    def __init__(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]]):
        pos = 0
        self.reads: list[tuple[int, int, int, int]] = []     # (card address, length, slot offset, addr % 64)
        for a, n in _extents(readable):
            h = a & 63
            self.reads.append((a, n, pos, h))
            pos += align64(h + n)
        self.wviews: list[tuple[int, int]] = []              # (offset of the extent's bytes, length)
        self.wslots: list[tuple[int, int, int]] = []         # per descriptor: (card address, length, offset)
        ext_a = ext_start = ext_n = -1
        for a, n in writable:
            if a == ext_a + ext_n and ext_n > 0:
                self.wslots.append((a, n, ext_start + ext_n))
                ext_n += n
                self.wviews[-1] = (ext_start, ext_n)
                continue
            if ext_n > 0:
                pos = align64(ext_start + ext_n)
            ext_a, ext_n = a, n
            ext_start = pos + (a & 63)
            self.wviews.append((ext_start, n))
            self.wslots.append((a, n, ext_start))
        if ext_n > 0:
            pos = align64(ext_start + ext_n)
        self.total = pos


def _extents(bufs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``bufs`` with each run of buffers adjacent in card memory joined into one."""
    out: list[list[int]] = []
    for a, n in bufs:
        if out and out[-1][0] + out[-1][1] == a:
            out[-1][1] += n
        else:
            out.append([a, n])
    return [(a, n) for a, n in out]


class StagingArea:
    """One queue's staging: an arena allocation and the FIFO allocator over it."""

    def __init__(self, arena: DmaArena, size: int, arena_card: int):
        self.arena = arena
        self.alloc_ = arena.alloc(size, 64)
        self.base = self.alloc_.offset
        self.ring = StagingRing(self.alloc_.size)
        self.arena_card = arena_card   # card address of arena offset 0 (the one Iova -> CardPhys conversion)
        self.view = arena.view

    def close(self) -> None:
        if self.alloc_ is not None:
            self.arena.free(self.alloc_)
            self.alloc_ = None


class VopQueue(Virtqueue):
    """One queue of a VOP device as its backend sees it."""

    def __init__(self, index: int, vring: Vringh, engine: CopyEngine, staging: StagingArea,
                 info_avail_idx: memoryview, notify: Callable[[], None], name: str = ""):
        self.index = index
        self.size = vring.num
        self.name = name or vring.name
        self.vring = vring
        self.engine = engine
        self.staging = staging
        self._info = info_avail_idx   # _mic_vring_info.avail_idx as a one-element 'H' view (spec 5.6)
        self._notify = notify
        self._staged: dict[int, _Staged] = {}
        self.counters = dict.fromkeys(("chains", "batches", "max_batch", "interrupts", "interrupts_suppressed",
                                       "staging_full", "oversize"), 0)

    # --- taking chains -----------------------------------------------------------------------------
    def pop_many(self, limit: int) -> list[Chain]:
        st = self.staging
        view, card0 = st.view, st.arena_card
        ring_alloc = st.ring.alloc
        out: list[Chain] = []
        copies = []
        try:
            # Chains are taken from the ring a few at a time, so a staging area that fills up gives back
            # at most the rest of one chunk, not all of ``limit`` walked for nothing.
            while len(out) < limit:
                descs = self.vring.pop_many(min(limit - len(out), POP_CHUNK))
                if not descs:
                    break
                taken = 0
                for d in descs:
                    shape = d.shape
                    if shape is None:
                        lay = _Layout(d.readable, d.writable)
                    else:
                        lay = shape.memo
                        if lay is None:
                            lay = shape.memo = _Layout(d.readable, d.writable)
                    total = lay.total
                    own = None
                    off = ring_alloc(total)
                    if off is None:
                        if out and total <= st.ring.size:
                            break                        # no room now: the rest waits for the next batch
                        if total > MAX_CHAIN_BYTES:
                            raise VringError(f"{self.name}: chain from head {d.head} carries {total} bytes, more "
                                             f"than the {MAX_CHAIN_BYTES} a chain may stage")
                        own = st.arena.alloc(total, 64)
                        base = own.offset
                        self.counters["oversize"] += 1
                    else:
                        base = st.base + off
                    readable = []
                    for a, n, rel, h in lay.reads:
                        pos = base + rel
                        copies.append((a, n, card0 + pos, view[pos:pos + align64(h + n)]))
                        readable.append(view[pos + h:pos + h + n])
                    writable = [view[base + rel:base + rel + n] for rel, n in lay.wviews]
                    s = _Staged(d, base, own, lay.wslots)
                    self._staged[d.head] = s
                    out.append(Chain(d.head, readable, writable, d.readable_len, d.writable_len, s))
                    taken += 1
                if taken < len(descs):
                    self.counters["staging_full"] += 1
                    self.vring.abandon(descs[taken:])
                    break
            if not out:
                return out
            self.engine.read_in(copies)
        except BaseException:
            for c in reversed(out):
                self._release(c.ctx)
            raise
        n = len(out)
        c = self.counters
        c["batches"] += 1
        c["chains"] += n
        if n > c["max_batch"]:
            c["max_batch"] = n
        return out

    # --- returning chains --------------------------------------------------------------------------
    def complete_many(self, done: Iterable[tuple[Chain, int]]) -> None:
        done = list(done)
        if not done:
            return
        st = self.staging
        view, card0 = st.view, st.arena_card
        pieces = []
        used = []
        for chain, written in done:
            s: _Staged = chain.ctx
            tail = chain.tail
            if written < 0 or tail < 0 or written + tail > s.desc.writable_len:
                raise ValueError(f"{self.name}: head {chain.head} completed with {written} + {tail} bytes written, "
                                 f"its writable buffers hold {s.desc.writable_len}")
            base = s.offset
            left = written
            # A descriptor written whole, 64-byte aligned and a multiple of 64 long, is joined by the next one
            # when that continues it and its rounded length fits it: the copy-out rule (spec 5.7) gives the
            # joined piece the answer it gives each of them (DMA), and the pages of a big receive buffer leave
            # as one piece, not 17.
            run_a = run_k = run_room = run_pos = -1
            joinable = False
            for a, n, rel in s.writable:
                if left <= 0:
                    break
                k = n if n < left else left
                if joinable and a == run_a + run_room and align64(k) <= n:
                    run_k += k
                    run_room += n
                else:
                    if run_k > 0:
                        pieces.append((run_a, run_k, run_room, card0 + run_pos, view[run_pos:run_pos + run_k]))
                    run_a, run_k, run_room, run_pos = a, k, n, base + rel
                joinable = k == n and not (a | n) & 63 and run_k == run_room
                left -= k
            if run_k > 0:
                pieces.append((run_a, run_k, run_room, card0 + run_pos, view[run_pos:run_pos + run_k]))
            left = tail
            for a, n, rel in reversed(s.writable):
                if left <= 0:
                    break
                pos = base + rel
                k = n if n < left else left
                skip = n - k
                pieces.append((a + skip, k, k, card0 + pos + skip, view[pos + skip:pos + n]))
                left -= k
            used.append((chain.head, written + tail))
        self.engine.write_out(pieces)   # waits for the DMA: data before the used entries
        self.vring.push_many(used)
        self._info[0] = self.vring.last_avail
        for chain, _w in done:
            self._release(chain.ctx)
        if self.vring.needs_notify():
            self.counters["interrupts"] += 1
            self._notify()
        else:
            self.counters["interrupts_suppressed"] += 1

    def abandon(self, chains: Sequence[Chain]) -> None:
        self.vring.abandon([c.ctx.desc for c in chains])
        for c in reversed(chains):
            self._release(c.ctx)

    def _release(self, s: _Staged) -> None:
        if self._staged.pop(s.desc.head, None) is None:
            return
        if s.own is not None:
            self.staging.arena.free(s.own)
        else:
            self.staging.ring.free(s.offset - self.staging.base)

    def release_all(self) -> None:
        """Forget every chain in flight (the device was reset or broken): their staging is free again."""
        for s in list(self._staged.values()):
            self._release(s)

    # --- kicks ----------------------------------------------------------------------------------
    def disable_notify(self) -> None:
        self.vring.disable_notify()

    def enable_notify(self) -> bool:
        return self.vring.enable_notify()

    def status(self) -> dict:
        v = self.vring
        return {"index": self.index, "size": self.size, "last_avail": v.last_avail, "used_idx": v.used_idx,
                "in_flight": v.in_flight, "event_idx": v.event_idx, "indirect": v.indirect,
                "staging": {"size": self.staging.ring.size, "allocated": self.staging.ring.allocated,
                            "high_water": self.staging.ring.high_water}, **self.counters}
