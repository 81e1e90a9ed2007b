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

Asynchronous pop (:meth:`VopQueue.pop_start`, what a drain with ``resume``
uses -- the net backend's transmit queue): the chains are taken and staged
and their DMA from the card started as above, but instead of waiting the
queue keeps the batch *incoming* and returns None; the event loop serves
the tap and the other queues meanwhile. The device's poller
(:meth:`~.device.VopDevice._poll_incoming`, a timer on the loop) looks at
the DMA's status word, reads the channels' error registers now and then,
and calls the backend's ``resume`` once the data is in; its next pop
returns the batch. One batch per queue is incoming at a time, so what a
drain gives back (:meth:`VopQueue.abandon`) is still the last taken.

Deferred completion (:meth:`VopQueue.complete_deferred`, what the drain
loop uses): the batch's DMA to the card is started and the queue moves on --
the backend processes the next batch (preadv into staging, say) while the
engine copies this one -- and the batch is published, in order, once its DMA
is done: at the next pop or completion that finds it done, when more than
:data:`DEFERRED_BATCHES` are under way (the oldest is waited for), when the
first chain of a batch finds staging held by them, and always before the
drain returns (:meth:`VopQueue.flush`). Data is on the card before its used
entry either way; one interrupt decision covers what one call publishes.

Lazy queues (``lazy``, for a backend whose ``lazy_completion`` says nothing depends on when the card sees
its completions -- the net backend): a drain's completions are gathered into one copy-out batch (up to
:data:`LAZY_BATCH_BYTES` or :data:`LAZY_BATCH_CHAINS`, one DMA submission instead of one per drain batch),
and what is still copying when the drain ends is not waited for: the device's poller
(:meth:`VopQueue.outgoing`, the same timer as the copies in) publishes it once its DMA is done, so the
loop serves the tap and the other queue instead of spinning on the engine. A chain that finds the staging
area held by them waits for them as before, and a reset does (:meth:`VopQueue.release_all`).

Staging is allocated per chunk of chains taken (up to :data:`POP_CHUNK`): one piece of the staging area
for the chunk, freed once its last chain is released, instead of an allocation and a free per chain; a
chunk that does not fit is staged chain by chain as below. Chains a drain gives back
(:meth:`VopQueue.abandon`: the backend stopped, its source dry or its sink full) stay taken and staged,
and the next pop hands them out first: the card sees a chain still being worked on (taken from avail,
not yet used), as upstream's chain between two COPY_DESC calls without update_used (spec 5.7). A lazy
queue's completions through BAR0 are copied when the batch completes, and their staging freed then; only
their used entries wait for the batch's turn (:meth:`~.copy.CopyEngine.write_out_now`).

A chain bigger than the staging area gets an arena allocation of its own
(up to :data:`MAX_CHAIN_BYTES`); a bigger one breaks the device. So does a
chain that finds the staging area full while its batch already has chains,
as long as the queue's own allocations stay under ``overflow`` bytes and
the arena keeps a quarter of itself free [choice]: a batch of 1 MiB block requests would otherwise be
one chain (two do not fit in 2 MiB), and every request would pay its own DMA
round trips and card interrupt; with the overflow a batch carries several,
their payload in one DMA batch over all channels.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Iterable, Sequence

from backends.virtqueue import Chain, Virtqueue
from micdrv.virtio import DescChain, VringError, Vringh

from ..pci import Allocation, DmaArena
from .copy import DMA_TIMEOUT, CopyEngine, VopCopyError
from .staging import StagingRing, align64

log = logging.getLogger(__name__)

MAX_CHAIN_BYTES = 16 << 20  # staging for one chain; Linux virtio-blk's largest (126 x 64 KiB) is ~8 MiB
OVERFLOW_BYTES = 8 << 20    # a queue's own arena allocations beyond its staging area, at most [choice]
DEFERRED_BATCHES = 2        # completions whose DMA may still run while the next batch is processed [choice]
POP_CHUNK = 16              # chains taken from the ring at a time while staging them (see pop_many)
LAZY_BATCH_BYTES = 1 << 20  # a lazy queue gathers completions into one DMA batch up to this many bytes [choice]
LAZY_BATCH_CHAINS = 64      # ... or this many chains
CHECK_EVERY = 0.005         # a batch copying in longer than this has its channels' error registers read [choice]


class _Staged(Chain):
    """A chain as this transport hands it out: the backend's :class:`~backends.virtqueue.Chain`, plus its
    DescChain, where its staging piece is, and where each writable buffer sits (one object per chain)."""

    __slots__ = ("desc", "offset", "own", "wslots", "lay", "grp")

    def __init__(self, desc: DescChain, readable: list[memoryview], writable: list[memoryview], offset: int,
                 own: Allocation | None, wslots: list[tuple[int, int, int]], lay: "_Layout | None" = None,
                 grp: list[int] | None = None):
        self.head = desc.head
        self.readable = readable
        self.writable = writable
        self.readable_len = desc.readable_len
        self.writable_len = desc.writable_len
        self.tail = 0
        self.ctx = None
        self.desc = desc
        self.offset = offset          # arena offset of the piece (-1: nothing staged)
        self.own = own                # an allocation of its own (oversize chain), else None
        self.wslots = wslots          # (card address, length, offset of its bytes in the piece), per descriptor
        self.lay = lay                # the staging layout wslots came from (its copy-out plans are kept there)
        self.grp = grp                # the staging piece it shares with the rest of its chunk: [chains in it, offset]


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

    __slots__ = ("total", "reads", "wviews", "wslots", "plans", "rslices", "wslices", "splits", "split_by")

    def __init__(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]]):
        pos = 0
        self.reads: list[tuple[int, int, int, int]] = []     # (card address, length, offset of its bytes, end)
        for a, n in _extents(readable):
            h = a & 63
            self.reads.append((a, n, pos + h, pos + h + n))
            pos += align64(h + n)
        self.wviews: list[tuple[int, int]] = []              # (offset of the extent's bytes, end)
        self.wslots: list[tuple[int, int, int]] = []         # per descriptor: (card address, length, offset)
        ext_a = ext_start = ext_n = -1
        for a, n in writable:
            if a == ext_a + ext_n and ext_n > 0:
                self.wslots.append((a, n, ext_start + ext_n))
                ext_n += n
                self.wviews[-1] = (ext_start, ext_start + ext_n)
                continue
            if ext_n > 0:
                pos = align64(ext_start + ext_n)
            ext_a, ext_n = a, n
            ext_start = pos + (a & 63)
            self.wviews.append((ext_start, ext_start + n))
            self.wslots.append((a, n, ext_start))
        if ext_n > 0:
            pos = align64(ext_start + ext_n)
        self.total = pos
        # the views a chain hands out, as slices of its piece (taken with one map() call each)
        self.rslices = tuple(slice(start, end) for _a, _n, start, end in self.reads)
        self.wslices = tuple(slice(start, end) for start, end in self.wviews)
        self.plans: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}   # see _copy_out_plan
        self.splits: dict = {}     # the same plans split by path (VopQueue._copy_out_now), for split_by's policy
        self.split_by = None


MAX_PLANS = 64   # copy-out plans kept per layout (distinct written/tail pairs) [choice]


def _copy_out_plan(wslots: Sequence[tuple[int, int, int]], written: int, tail: int) -> list[tuple[int, int, int, int]]:
    """The host -> card pieces of a chain whose writable descriptors are ``wslots`` that got ``written`` bytes at
    the front of its stream and ``tail`` at the end: (card address, length, room left in the descriptor, offset
    of its bytes in the staging piece) each. The same for every chain of one layout and the same counts, so a
    layout keeps them (:attr:`_Layout.plans`).

    A descriptor written whole, 64-byte aligned and a multiple of 64 long, is joined by the next one when that
    continues it and its rounded length fits it: the copy-out rule (spec 5.7) gives the joined piece the answer
    it gives each of them (DMA), and the pages of a big receive buffer leave as one piece, not 17.
    """
    plan = []
    left = written
    run_a = run_k = run_room = run_rel = -1
    joinable = False
    for a, n, rel in wslots:
        if left <= 0:
            break
        k = n if n < left else left
        if joinable and a == run_a + run_room and align64(k) <= n:
            run_k += k
            run_room += n
        else:
            if run_k > 0:
                plan.append((run_a, run_k, run_room, run_rel))
            run_a, run_k, run_room, run_rel = a, k, n, rel
        joinable = k == n and not (a | n) & 63 and run_k == run_room
        left -= k
    if run_k > 0:
        plan.append((run_a, run_k, run_room, run_rel))
    left = tail
    for a, n, rel in reversed(wslots):
        if left <= 0:
            break
        k = n if n < left else left
        skip = n - k
        plan.append((a + skip, k, k, rel + skip))
        left -= k
    return plan


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

    def __init__(self, arena: DmaArena, size: int, arena_card: int, overflow: int = OVERFLOW_BYTES):
        self.arena = arena
        self.alloc_ = arena.alloc(size, 64)
        self.base = self.alloc_.offset
        self.ring = StagingRing(self.alloc_.size)
        self.arena_card = arena_card   # card address of arena offset 0 (the one Iova -> CardPhys conversion)
        self.view = arena.view
        self.overflow = overflow       # bytes of arena allocations of its own a batch may add
        self.own_bytes = 0             # ... in use now

    def alloc_own(self, n: int, extra: bool) -> Allocation | None:
        """An arena allocation for one chain; ``extra`` (the batch has chains already): only within the
        overflow bound and if the arena has room, else None. Otherwise raises when the arena is full."""
        if extra:
            # within the queue's bound, and never into the arena's last quarter: what other devices and
            # SCIF allocate at run time (a hot-added disk's staging, say) must still fit
            if self.own_bytes + n > self.overflow or self.arena.free_bytes - n < self.arena.size // 4:
                return None
            try:
                a = self.arena.alloc(n, 64)
            except MemoryError:
                return None
        else:
            a = self.arena.alloc(n, 64)
        self.own_bytes += a.size
        return a

    def free_own(self, a: Allocation) -> None:
        self.own_bytes -= a.size
        self.arena.free(a)

    def close(self) -> None:
        if self.alloc_ is not None:
            self.arena.free(self.alloc_)
            self.alloc_ = None


class VopQueue(Virtqueue):
    """One queue of a VOP device as its backend sees it."""

    def __init__(self, index: int, vring: Vringh, engine: CopyEngine, staging: StagingArea,
                 info_avail_idx: memoryview, notify: Callable[[], None], name: str = "",
                 schedule: Callable[["VopQueue"], None] = lambda q: None, lazy: bool = False):
        self.index = index
        self.size = vring.num
        self.name = name or vring.name
        self.vring = vring
        self.engine = engine
        self.staging = staging
        self._info = info_avail_idx   # _mic_vring_info.avail_idx as a one-element 'H' view (spec 5.6)
        self._notify = notify
        self._staged: dict[int, _Staged] = {}
        self._kept: list[_Staged] = []   # chains a drain gave back (abandon), still taken and staged, oldest first
        # a pop_start batch whose readable data is still being copied in: (DMA completion, chains, start time),
        # and the backend's resume (called by the device's poller, see VopDevice) once it is in
        self._incoming: tuple[object, list[Chain], float] | None = None
        self._resume: Callable[[], None] | None = None
        self._schedule = schedule
        # completions under way, oldest first: (DMA completion or None, used entries, chains)
        self._deferred: deque[tuple[object, list[tuple[int, int]], list[Chain]]] = deque()
        # lazy: a drain's last completions are published by the device's poller once their DMA is done,
        # instead of the loop waiting for it (see complete_many); when the poller started watching them
        self.lazy = lazy
        self._out_t0: float | None = None
        # lazy: completions gathered for one copy-out batch, not started yet (pieces; (used, chains) per call)
        self._gather: list = []
        self._gathered: list[tuple[list[tuple[int, int]], list[tuple[Chain, int]]]] = []
        self._gather_bytes = self._gather_chains = 0
        self.counters = dict.fromkeys(("chains", "batches", "max_batch", "interrupts", "interrupts_suppressed",
                                       "staging_full", "oversize", "overflow", "deferred", "deferred_waits",
                                       "pop_waits"), 0)

    def watch_progress(self, pump: Callable[[], None]) -> None:
        """Between two chains of a drain (:attr:`~backends.virtqueue.Virtqueue.progress`): publish the
        completions whose DMA is done, then ``pump()`` (the doorbells' answers, see
        :meth:`~.host._Doorbells.pump`) -- so the card takes each batch's interrupt while the drain goes on."""
        self._pump = pump
        self.progress = self._progress

    def _progress(self) -> None:
        q = self._deferred
        if q:
            completion = q[0][0]
            if completion is None or self.engine.done(completion):
                self._publish(len(q))     # what is done, in order, without waiting
        self._pump()

    # --- taking chains -----------------------------------------------------------------------------
    def pop_many(self, limit: int) -> list[Chain]:
        if self._kept:
            return self._take_kept(limit)             # what a drain gave back: staged already
        if self._incoming is not None:
            return self._take_incoming()              # a pop_start batch: waited for here
        out, copies = self._take(limit)
        if copies:
            try:
                self.engine.read_in(copies)
            except BaseException:
                for c in reversed(out):
                    self._release(c)
                raise
        return out

    def pop_start(self, limit: int, resume: Callable[[], None]) -> list[Chain] | None:
        if self._kept:
            return self._take_kept(limit)
        if self._incoming is not None:
            completion = self._incoming[0]
            if not self.engine.done(completion):
                self._resume = resume
                return None
            return self._take_incoming()
        out, copies = self._take(limit)
        if not copies:
            return out
        try:
            completion = self.engine.read_in_start(copies)
        except BaseException:
            for c in reversed(out):
                self._release(c)
            raise
        if completion is None:
            return out
        self._incoming = (completion, out, time.monotonic())
        self._resume = resume
        self.counters["pop_waits"] += 1
        self._schedule(self)
        return None

    def _take_kept(self, limit: int) -> list[Chain]:
        """The first ``limit`` chains :meth:`abandon` kept, in the order taken."""
        kept = self._kept
        if len(kept) <= limit:
            self._kept = []
            return kept
        self._kept = kept[limit:]
        return kept[:limit]

    def _take_incoming(self) -> list[Chain]:
        """The chains of the batch :meth:`pop_start` left copying, once their data is in (waits if need be)."""
        completion, out, _t0 = self._incoming
        self._incoming = None
        self._resume = None
        try:
            self.engine.finish(completion)   # raises if the DMA failed: the device breaks
        except BaseException:
            for c in reversed(out):
                self._release(c)
            raise
        return out

    def incoming(self, now: float) -> bool | None:
        """For the transport's poller: None if no batch is copying in for a resume, True once it is in (or
        failed: its pop then raises), False while it is still copying -- after :data:`DMA_TIMEOUT` a
        :class:`~.copy.VopCopyError`, and the channels' error registers are read every ``CHECK_EVERY``."""
        inc = self._incoming
        if inc is None or self._resume is None:
            return None
        completion, _out, t0 = inc
        engine = self.engine
        if engine.done(completion):
            return True
        age = now - t0
        if age >= CHECK_EVERY:
            engine.check(completion)
            if completion.settled:
                return True
            if age >= DMA_TIMEOUT:
                raise VopCopyError(f"{self.name}: DMA of {completion.nbytes} bytes from the card not done after "
                                   f"{DMA_TIMEOUT:g} s")
        return False

    def resume(self) -> None:
        """Call the backend back: the batch it waits for is in."""
        fn, self._resume = self._resume, None
        if fn is not None:
            fn()

    def _take(self, limit: int) -> tuple[list[Chain], list]:
        """Take up to ``limit`` chains and stage them; the card -> host copies their readable data needs."""
        if self._deferred:
            self._publish(len(self._deferred))        # what has finished meanwhile, without waiting
        st = self.staging
        view, card0 = st.view, st.arena_card
        ring_alloc = st.ring.alloc
        direct = self.engine.direct        # h2c_direct: card memory (bounds-checked views), else None
        out: list[Chain] = []
        copies = []
        staged = self._staged
        try:
            # Chains are taken from the ring a few at a time, so a staging area that fills up gives back
            # at most the rest of one chunk, not all of ``limit`` walked for nothing.
            while len(out) < limit:
                descs = self.vring.pop_many(min(limit - len(out), POP_CHUNK))
                if not descs:
                    break
                if direct is None:
                    # The chunk's layouts, then (the common case) one staging piece for the whole chunk, freed
                    # once its last chain is (a piece per chain costs an allocation and a free each).
                    lays = []
                    need = 0
                    for d in descs:
                        shape = d.shape
                        if shape is None:
                            lay = _Layout(d.readable, d.writable)
                        else:
                            lay = shape.memo
                            if lay is None:
                                lay = shape.memo = _Layout(d.readable, d.writable)
                        lays.append(lay)
                        need += lay.total
                    off = ring_alloc(need) if need else None
                    if off is not None:
                        grp = [0, off]
                        base = st.base + off
                        for d, lay in zip(descs, lays):
                            total = lay.total
                            piece = view[base:base + total]
                            if lay.reads:
                                readable = list(map(piece.__getitem__, lay.rslices))
                                at = card0 + base
                                for (a, n, start, _end), v in zip(lay.reads, readable):
                                    copies.append((a, n, at + start, v))
                            else:
                                readable = []
                            s = _Staged(d, readable, list(map(piece.__getitem__, lay.wslices)), base, None,
                                        lay.wslots, lay, grp)
                            grp[0] += 1
                            staged[d.head] = s
                            out.append(s)
                            base += total
                        continue
                taken = 0
                for d in descs:
                    # readable slots widened to the 64-byte grid, then writable slots of ALIGN(len, 64) (none
                    # with h2c_direct: the backend gets views of card memory for those); the layout is the
                    # same for every chain of one shape (the policy is fixed for the queue's life)
                    wr = d.writable if direct is None else ()
                    shape = d.shape
                    if shape is None:
                        lay = _Layout(d.readable, wr)
                    else:
                        lay = shape.memo
                        if lay is None:
                            lay = shape.memo = _Layout(d.readable, wr)
                    total = lay.total
                    if not total:          # h2c_direct and nothing readable (or only empty buffers): no staging
                        s = _Staged(d, [], [direct.view(a, n) if direct is not None else view[0:0]
                                            for a, n in d.writable], -1, None, [(a, n, -1) for a, n in d.writable])
                        staged[d.head] = s
                        out.append(s)
                        taken += 1
                        continue
                    own = None
                    off = ring_alloc(total)
                    if off is None and not out and (self._deferred or self._gathered):
                        # staging held by completions still copying: wait for them -- a lazy queue's oldest
                        # first (it holds the oldest staging) until the chain fits: its batches are small and
                        # the tap is waiting; otherwise all of them, so that the batch taken next is whole
                        self._start_gathered()
                        while self._deferred:
                            self._publish(len(self._deferred) - 1 if self.lazy else 0)
                            off = ring_alloc(total)
                            if off is not None:
                                break
                    if off is None:
                        if total > MAX_CHAIN_BYTES:
                            raise VringError(f"{self.name}: chain from head {d.head} carries {total} bytes, more "
                                             f"than the {MAX_CHAIN_BYTES} a chain may stage")
                        extra = bool(out) and total <= st.ring.size
                        own = st.alloc_own(total, extra)
                        if own is None:
                            break                            # no room now: the rest waits for the next batch
                        base = own.offset
                        self.counters["overflow" if extra else "oversize"] += 1
                    else:
                        base = st.base + off
                    readable = []
                    for a, n, start, end in lay.reads:
                        v = view[base + start:base + end]
                        copies.append((a, n, card0 + base + start, v))
                        readable.append(v)
                    if direct is None:
                        writable = [view[base + start:base + end] for start, end in lay.wviews]
                        wslots = lay.wslots
                    else:
                        writable = [direct.view(a, n) for a, n in d.writable]
                        wslots = [(a, n, -1) for a, n in d.writable]
                    s = _Staged(d, readable, writable, base, own, wslots, lay if direct is None else None)
                    staged[d.head] = s
                    out.append(s)
                    taken += 1
                if taken < len(descs):
                    self.counters["staging_full"] += 1
                    self.vring.abandon(descs[taken:])
                    break
        except BaseException:
            for c in reversed(out):
                self._release(c)
            raise
        n = len(out)
        if n:
            c = self.counters
            c["batches"] += 1
            c["chains"] += n
            if n > c["max_batch"]:
                c["max_batch"] = n
        return out, copies

    # --- returning chains --------------------------------------------------------------------------
    def complete_many(self, done: Iterable[tuple[Chain, int]]) -> None:
        done = list(done)
        if self.lazy:
            # Start the copies, publish whatever is done (in order), and leave the rest to the device's poller
            # (outgoing): the loop serves the tap and the other queues meanwhile instead of waiting for the
            # engine. Data is still on the card before its used entry.
            if done:
                self._gather_done(done)
            self.flush()
            return
        if self._deferred:
            self.flush()
        if not done:
            return
        pieces, used = self._pieces(done)
        self.engine.write_out(pieces)   # waits for the DMA: data before the used entries
        self._deferred.append((None, used, done))
        self._publish(0)

    def complete_deferred(self, done: Iterable[tuple[Chain, int]]) -> None:
        done = list(done)
        if not done:
            return
        if self.lazy:
            # A drain's batches gathered into one copy-out batch (one DMA submission, one completion), started
            # once it is big enough or the drain ends (flush): each submission is a doorbell the card handles.
            self._gather_done(done)
            if self._gather_bytes < LAZY_BATCH_BYTES and self._gather_chains < LAZY_BATCH_CHAINS:
                return
            self._start_gathered()
            self._publish(DEFERRED_BATCHES)
            return
        pieces, used = self._pieces(done)
        completion = self.engine.write_out_start(pieces)
        if completion is not None:
            self.counters["deferred"] += 1
        self._deferred.append((completion, used, done))
        self._publish(DEFERRED_BATCHES)

    def _gather_done(self, done: list[tuple[Chain, int]]) -> None:
        # What goes through BAR0 is copied now (a store stream, nothing to batch); only the DMA pieces wait
        # for the gathered submission.
        pieces, used = self._copy_out_now(done)
        if pieces:
            self._gather += pieces
            for p in pieces:
                self._gather_bytes += p[1]
        else:
            # Nothing left to copy (all through BAR0, or nothing written: a transmit chain): the staging is free
            # now, while the used entries wait for their turn to be published.
            self._release_done(done)
        self._gathered.append((used, done))
        self._gather_chains += len(done)

    def _start_gathered(self) -> None:
        """Start the copy-out of what :meth:`complete_deferred` gathered (lazy queues): one batch."""
        gathered = self._gathered
        if not gathered:
            return
        pieces = self._gather
        self._gather, self._gathered = [], []
        self._gather_bytes = self._gather_chains = 0
        completion = self.engine.write_out_dma(pieces)     # the BAR0 pieces went at once (_gather_done)
        if completion is not None:
            self.counters["deferred"] += 1
        if len(gathered) == 1:
            used, done = gathered[0]
        else:
            used = [u for us, _d in gathered for u in us]
            done = [x for _us, d in gathered for x in d]
        self._deferred.append((completion, used, done))

    def flush(self) -> None:
        if self._gathered:
            self._start_gathered()
        if self._deferred:
            if not self.lazy:
                self._publish(0)
                return
            self._publish(len(self._deferred))   # what is done, without waiting
            if self._deferred:
                if self._out_t0 is None:
                    self._out_t0 = time.monotonic()
                self._schedule(self)

    def outgoing(self, now: float) -> bool:
        """For the transport's poller (lazy queues): publish the completions whose DMA is done; True while some
        are still copying -- after :data:`DMA_TIMEOUT` a :class:`~.copy.VopCopyError`, and the channels' error
        registers are read every ``CHECK_EVERY``."""
        q = self._deferred
        if not q:
            self._out_t0 = None
            return False
        self._publish(len(q))
        if not q:
            self._out_t0 = None
            return False
        t0 = self._out_t0
        if t0 is None:
            t0 = self._out_t0 = now
        age = now - t0
        if age >= CHECK_EVERY:
            completion = q[0][0]
            self.engine.check(completion)
            if completion.settled:
                self._publish(len(q))       # failed (finish raises: the device breaks) or just done
                self._out_t0 = now if q else None
                return bool(q)
            if age >= DMA_TIMEOUT:
                raise VopCopyError(f"{self.name}: DMA of {completion.nbytes} bytes to the card not done after "
                                   f"{DMA_TIMEOUT:g} s")
        return True

    def _publish(self, keep: int) -> None:
        """Publish the deferred completions, oldest first: those whose DMA is done, and -- waiting for
        them -- as many more as it takes to leave at most ``keep`` under way; then one interrupt decision."""
        q = self._deferred
        engine = self.engine
        n = 0
        while q:
            completion, used, done = q[0]
            if completion is not None:
                if not engine.done(completion):
                    if len(q) <= keep:
                        break
                    self.counters["deferred_waits"] += 1
                engine.finish(completion)   # raises if the DMA failed: the device breaks
            q.popleft()
            self.vring.push_many(used)
            self._release_done(done)
            n += 1
        if not n:
            return
        self._out_t0 = None     # the oldest under way changed: its age (outgoing) counts from the next look
        self._info[0] = self.vring.last_avail
        if self.vring.needs_notify():
            self.counters["interrupts"] += 1
            self._notify()
        else:
            self.counters["interrupts_suppressed"] += 1

    def _copy_out_now(self, done: list[tuple[Chain, int]]) -> tuple[list, list[tuple[int, int]]]:
        """:meth:`_pieces` and :meth:`CopyEngine.write_out_now <.copy.CopyEngine.write_out_now>` in one pass:
        completed chains checked against their writable buffers, their BAR0 pieces copied, their DMA pieces
        and used entries returned. Each layout keeps its plans split by path (``CopyEngine.split_plan``), so
        a BAR0 piece costs its copy and a bounds check."""
        engine = self.engine
        st = self.staging
        items = []
        used: list[tuple[int, int]] = []
        for s, written, tail in self._to_copy(done, used):
            lay = s.lay
            if lay is None:
                split = engine.split_plan(_copy_out_plan(s.wslots, written, tail))
            else:
                if lay.split_by is not engine:
                    lay.splits, lay.split_by = {}, engine
                key = (written, tail) if tail else written   # an int and a pair never compare equal
                split = lay.splits.get(key)
                if split is None:
                    if len(lay.splits) >= MAX_PLANS:
                        lay.splits.clear()
                    split = lay.splits[key] = engine.split_plan(_copy_out_plan(s.wslots, written, tail))
            items.append((s.offset, split))
        return (engine.write_out_split(items, st.view, st.arena_card) if items else []), used

    def _to_copy(self, done: list[tuple[Chain, int]], used: list[tuple[int, int]]) -> list[tuple[_Staged, int, int]]:
        """Completed chains checked against their writable buffers, their used entries appended to ``used``;
        returns (chain, written, tail) of those whose bytes are still to be copied to the card (not a chain
        that wrote nothing, nor an h2c_direct one, which wrote card memory itself)."""
        out = []
        direct = 0
        for s, written in done:
            tail = s.tail
            if not written and not tail:
                used.append((s.head, 0))                 # nothing written (a transmit chain): nothing to copy
                continue
            if written < 0 or tail < 0 or written + tail > s.desc.writable_len:
                raise ValueError(f"{self.name}: head {s.head} completed with {written} + {tail} bytes written, "
                                 f"its writable buffers hold {s.desc.writable_len}")
            used.append((s.head, written + tail))
            if s.wslots[0][2] < 0:                       # h2c_direct: the backend wrote card memory itself
                direct += written + tail
                continue
            out.append((s, written, tail))
        if direct:
            self.engine.wrote_direct(direct)
        return out

    def _pieces(self, done: list[tuple[Chain, int]]) -> tuple[list, list[tuple[int, int]]]:
        """The host -> card pieces of completed chains (checked against their writable buffers), and their
        used entries."""
        st = self.staging
        view, card0 = st.view, st.arena_card
        pieces = []
        add = pieces.append
        used: list[tuple[int, int]] = []
        for s, written, tail in self._to_copy(done, used):
            base = s.offset
            lay = s.lay
            if lay is None:
                plan = _copy_out_plan(s.wslots, written, tail)
            else:
                key = (written, tail) if tail else written   # an int and a pair never compare equal
                plan = lay.plans.get(key)
                if plan is None:
                    if len(lay.plans) >= MAX_PLANS:
                        lay.plans.clear()
                    plan = lay.plans[key] = _copy_out_plan(s.wslots, written, tail)
            for a, k, room, rel in plan:
                pos = base + rel
                add((a, k, room, card0 + pos, view[pos:pos + k]))
        return pieces, used

    def abandon(self, chains: Sequence[Chain]) -> None:
        """Give back the last chains popped: they stay taken and staged, and the next pop hands them out
        first, as they were (their readable data in, their writable views empty of meaning) -- to the card
        that is a chain still being worked on (taken from avail, not yet used), as a chain is between two
        COPY_DESC calls without update_used (spec 5.7). Giving them back to the ring would cost a walk and a
        staging (and a DMA in) again for each, next time: a receive queue's drain ends each time the tap runs
        dry, with the rest of a batch taken for frames that had not arrived."""
        if chains:
            self._kept = [*chains, *self._kept]   # the last popped, and so before whatever was kept before

    def _release_done(self, done: list[tuple[Chain, int]]) -> None:
        """:meth:`_release` of each chain in ``done`` (those released already are skipped)."""
        pop = self._staged.pop
        free = self.staging.ring.free
        for s, _w in done:
            if pop(s.head, None) is None:
                continue
            g = s.grp
            if g is None:
                self._staged[s.head] = s
                self._release(s)
            else:
                g[0] -= 1
                if not g[0]:
                    free(g[1])            # the last of its chunk

    def _release(self, s: _Staged) -> None:
        if self._staged.pop(s.head, None) is None:
            return
        g = s.grp
        if g is not None:
            g[0] -= 1
            if not g[0]:
                self.staging.ring.free(g[1])   # the last of its chunk
            return
        if s.offset < 0:
            return                       # nothing staged (h2c_direct, no readable buffers)
        if s.own is not None:
            self.staging.free_own(s.own)
        else:
            self.staging.ring.free(s.offset - self.staging.base)

    def release_all(self) -> None:
        """Forget every chain in flight (the device was reset or broken): their staging is free again --
        once no DMA still reads it (a deferred completion's is waited for, its outcome ignored)."""
        if self._incoming is not None:
            completion = self._incoming[0]
            self._incoming = self._resume = None
            try:
                completion.wait(DMA_TIMEOUT)
            except Exception:
                log.warning("%s: a batch's DMA from the card did not finish; its staging is reused anyway",
                            self.name)
        self._out_t0 = None
        self._kept = []                            # staged: released with the rest below
        self._gather, self._gathered = [], []      # never started: nothing reads their staging
        self._gather_bytes = self._gather_chains = 0
        while self._deferred:
            completion, _used, _done = self._deferred.popleft()
            if completion is not None:
                try:
                    completion.wait(DMA_TIMEOUT)
                except Exception:
                    log.warning("%s: a completion's DMA did not finish; its staging is reused anyway", self.name)
        for s in list(self._staged.values()):
            self._release(s)

    # --- kicks ----------------------------------------------------------------------------------
    def disable_notify(self) -> None:
        self.vring.disable_notify()

    def enable_notify(self) -> bool:
        return self.vring.enable_notify() and not self._kept

    def status(self) -> dict:
        v = self.vring
        return {"index": self.index, "size": self.size, "last_avail": v.last_avail, "used_idx": v.used_idx,
                "in_flight": v.in_flight, "kept": len(self._kept), "event_idx": v.event_idx, "indirect": v.indirect,
                "staging": {"size": self.staging.ring.size, "allocated": self.staging.ring.allocated,
                            "high_water": self.staging.ring.high_water, "own_bytes": self.staging.own_bytes},
                **self.counters}
