"""The copy engine: chain payload between card memory and the host's staging memory (spec 5.7).

Every buffer address in a VOP descriptor is a card physical address (spec
5.7); the host reaches card memory two ways, and picks per copy:

* **DMA** (host channels 0-3, :class:`~micdrv.x100.dma.DmaEngine`):
  source, destination and length multiples of 64 bytes (spec 4.1);
* **BAR0**: loads and stores through the card-memory mapping
  (:meth:`~micdrv.x100.mmio.Aperture.memory`). On silicon BAR0 is
  write-combined: stores are cheap, loads are uncached PCIe reads.

Card -> host (the card's readable buffers, before a backend sees them):
always DMA, as upstream does whenever a channel exists. A buffer at card
address ``a`` of ``n`` bytes is widened to the 64-byte grid: ``h = a % 64``,
``ALIGN(n + h, 64)`` bytes from ``a - h`` into a 64-aligned staging slot, and
the backend's view starts ``h`` bytes into the slot. The whole buffer is one
copy into one slot, so upstream's bug -- the user pointer advanced by the
whole first 64 KiB chunk including ``h``, leaving every later chunk ``h``
bytes off (spec 5.7) -- cannot happen here. The widened range never leaves
card memory: ``a`` and ``a + n`` are inside it (the ring checked), and card
memory is a whole number of 64-byte lines.

Host -> card (what a backend wrote into a chain's writable buffers, at
completion): DMA when the card address is 64-byte aligned **and**
``ALIGN(len, 64)`` fits in what is left of that descriptor (upstream's rule,
spec 5.7: the DMA may write up to 63 bytes past ``len``, into the same
device-writable buffer); otherwise through BAR0, exactly ``len`` bytes.

Every BAR0 access goes through the card memory's own bounds-checked
accessors (:meth:`~micdrv.memory.Memory.view`, ``read``, ``write``), and
every DMA address through :class:`~micdrv.x100.dma.DmaEngine`'s check
(card memory or the arena's SMPT window): the ring validated each
address, and a copy outside card memory would still raise
:class:`~micdrv.memory.MemoryAccessError` (or ``DmaError``) rather than
touch anything -- the checks are in the accessors, not a convention.

Batching: :meth:`CopyEngine.read_in` and :meth:`CopyEngine.write_out` take
every copy of a whole pop or completion batch and issue one
:meth:`~micdrv.x100.dma.DmaEngine.memcpy_batch` for all of them (one
doorbell and one completion per channel used), then wait for it --
or, with :meth:`CopyEngine.read_in_start` / :meth:`CopyEngine.write_out_start`,
leave the batch running, look at it with :meth:`CopyEngine.done` and
:meth:`CopyEngine.check`, and :meth:`CopyEngine.finish` it later (the
queue's asynchronous pops and deferred completions, :mod:`.queue`); :meth:`CopyEngine.write_out_now` does the
BAR0 part of a completion at once and returns the DMA part, which :meth:`CopyEngine.write_out_dma` starts
(a lazy queue gathers the DMA parts of a drain into one batch). Copies that continue one another on both
sides (the pages of a 64 KiB receive buffer) go as one: the same bytes to
the same places in fewer descriptors.

:class:`CopyPolicy` can turn either DMA direction off (BAR0 only) or send
short host -> card pieces through BAR0; the defaults are upstream's rules.
``h2c_direct`` [choice, off by default] skips staging for host -> card: the
queue hands the backend views of the BAR0 mapping for the chain's writable
buffers, so a backend's ``preadv`` lands in card memory in one copy, by the
host CPU through BAR0 (what upstream does for unaligned pieces), with no DMA
and no completion to wait for; a fence orders those stores before the used
entries. It needs BAR0 mapped (else staging as usual). On silicon that is a
CPU store stream into a PCIe BAR (uncached as vfio-pci maps it: slower than
the engine and paid in host CPU); here BAR0 is the simulator's memory and
it is the fast path.
:attr:`CopyEngine.counters` are upstream's debugfs counters (in/out bytes,
DMA bytes, unaligned-length and unaligned-destination bytes) split by path.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

from micdrv.virtio.access import full_barrier

from ..memory import Memory
from ..x100.errors import DmaError
from .staging import align64

DMA_TIMEOUT = 10.0   # the longest a batch may take before the device is declared broken
# A batch the engine would give one channel anyway (under twice its spread_min, the rule memcpy_batch
# follows) goes to the device's own channel (round robin over the devices), as upstream VOP used one
# channel per device; larger batches are spread by the engine. [choice]
_devices = itertools.count()


class VopCopyError(Exception):
    """A copy that could not be done (the DMA engine refused or failed it)."""


@dataclass(frozen=True)
class CopyPolicy:
    """Which path each direction takes (spec 5.7); the defaults are upstream's."""

    c2h_dma: bool = True      # card -> host by DMA (else BAR0 reads: slow on silicon)
    h2c_dma: bool = True      # host -> card by DMA where aligned and roundable (else always BAR0)
    h2c_dma_min: int = 0      # host -> card pieces shorter than this go through BAR0 (0: no threshold, upstream);
    #                           a piece is what one descriptor takes, or a run of whole aligned descriptors
    #                           continuing one another (see VopQueue.complete_many)
    h2c_direct: bool = False  # writable buffers handed to the backend as BAR0 views: it writes the card itself

    def describe(self) -> dict:
        return {"c2h_dma": self.c2h_dma, "h2c_dma": self.h2c_dma, "h2c_dma_min": self.h2c_dma_min,
                "h2c_direct": self.h2c_direct}


COUNTERS = ("c2h_bytes", "c2h_dma_bytes", "c2h_bar0_bytes", "h2c_bytes", "h2c_dma_bytes", "h2c_bar0_bytes",
            "h2c_direct_bytes", "h2c_unaligned_dst_bytes", "h2c_unaligned_len_bytes", "dma_batches", "dma_copies")

# One card -> host copy: (card address, length, staging card address of its bytes, staging view of its bytes);
# the DMA widens it to the 64-byte grid around both addresses (they agree modulo 64).
ReadCopy = tuple[int, int, int, memoryview]
# One host -> card piece: (card address, length, room left in the descriptor, staging card address,
# staging view of exactly length bytes).
WritePiece = tuple[int, int, int, int, memoryview]


class CopyEngine:
    """The two copy paths of one device; ``card`` is BAR0 as Memory, ``dma`` the host channels (or None)."""

    def __init__(self, card: Memory, dma, policy: CopyPolicy = CopyPolicy(), name: str = "vop"):
        self.card = card
        self.dma = dma
        self.policy = policy
        self.name = name
        self.counters = dict.fromkeys(COUNTERS, 0)
        chans = sorted(dma.channels) if dma is not None else []
        self.channel = [chans[next(_devices) % len(chans)]] if chans else None
        # h2c_direct: the card memory the queues take the backends' writable views from, through its
        # bounds-checked view() (None: staged as usual -- the policy is off, or BAR0 cannot be mapped)
        self.direct = card if policy.h2c_direct and card.view(card.base, 1) is not None else None

    def wrote_direct(self, n: int) -> None:
        """A completion's ``n`` bytes the backend wrote straight into card memory (h2c_direct): counted, and
        ordered before the used entries that publish them (a locked instruction drains write-combining
        buffers, as SFENCE would)."""
        full_barrier()
        c = self.counters
        c["h2c_direct_bytes"] += n
        c["h2c_bytes"] += n

    # --- card -> host ----------------------------------------------------------------------------
    def read_in(self, copies: Sequence[ReadCopy]) -> None:
        """Bring ``copies`` into staging: one DMA batch, or BAR0 reads; waits."""
        c = self.read_in_start(copies)
        if c is not None:
            self.finish(c)

    def read_in_start(self, copies: Sequence[ReadCopy]):
        """As :meth:`read_in`, but returns the DMA batch's completion (None: the copies are done) instead of
        waiting; :meth:`finish` it before anyone looks at the staging."""
        if not copies:
            return None
        c = self.counters
        if self.dma is not None and self.policy.c2h_dma:
            batch = []
            total = moved = 0
            end_dst = end_src = -1
            for addr, n, stage_card, _view in copies:
                h = addr & 63
                m = align64(n + h)
                src = addr - h
                stage_card -= h
                if src == end_src and stage_card == end_dst:
                    d, s_, k = batch[-1]                 # contiguous on both sides: one copy
                    batch[-1] = (d, s_, k + m)
                else:
                    batch.append((stage_card, src, m))
                end_dst, end_src = stage_card + m, src + m
                total += n
                moved += m
            completion = self._dma_start(batch, moved)
            c["c2h_dma_bytes"] += moved
            c["c2h_bytes"] += total
            return completion
        else:
            card = self.card
            total = 0
            for addr, n, _stage_card, view in copies:
                src = card.view(addr, n)   # bounds-checked: MemoryAccessError outside card memory
                view[:] = src if src is not None else card.read(addr, n)
                total += n
            c["c2h_bar0_bytes"] += total
        c["c2h_bytes"] += total
        return None

    # --- host -> card ----------------------------------------------------------------------------
    def write_out(self, pieces: Sequence[WritePiece]) -> None:
        """Copy ``pieces`` to the card: the DMA-able ones in one batch, the rest through BAR0; waits."""
        c = self.write_out_start(pieces)
        if c is not None:
            self.finish(c)

    def write_out_start(self, pieces: Sequence[WritePiece]):
        """As :meth:`write_out`, but returns the DMA batch's completion (None: nothing left to wait for)
        instead of waiting; :meth:`finish` it before the card may look at the data."""
        if not pieces:
            return None
        return self.write_out_dma(self.write_out_now(pieces))

    def write_out_dma(self, dma: Sequence[WritePiece]):
        """Start one DMA batch for pieces :meth:`write_out_now` returned (of one call or several); its completion,
        or None if there are none."""
        if not dma:
            return None
        batch = []
        dma_bytes = dma_n = 0
        end_dst = end_src = -1
        for addr, n, _room, stage_card, _view in dma:
            m = (n + 63) & ~63                               # align64
            if addr == end_dst and stage_card == end_src:
                d, s_, k = batch[-1]                         # contiguous on both sides: one copy
                batch[-1] = (d, s_, k + m)
            else:
                batch.append((addr, stage_card, m))
            end_dst, end_src = addr + m, stage_card + m
            dma_bytes += m
            dma_n += n
        self.counters["h2c_dma_bytes"] += dma_n
        return self._dma_start(batch, dma_bytes)

    def write_out_now(self, pieces: Sequence[WritePiece]) -> list[WritePiece]:
        """The BAR0 part of :meth:`write_out_start`: the pieces that go through BAR0 are copied now (and
        every piece counted); returns those that go by DMA (all of them counted), for
        :meth:`write_out_start` -- one DMA batch may gather those of several calls."""
        pol = self.policy
        use_dma = self.dma is not None and pol.h2c_dma
        dma_min = pol.h2c_dma_min
        dma = []
        card = self.card
        mv = None                          # card memory as one view, taken for this call once a piece needs it
        looked = False
        lo = hi = 0
        total = bar0_n = udst = ulen = 0   # counted here, added to the counters once
        try:
            for piece in pieces:
                addr, n, room, stage_card, view = piece
                total += n
                m = (n + 63) & ~63                               # align64
                if use_dma and not (addr | stage_card) & 63 and m <= room and n >= dma_min:
                    dma.append(piece)
                    continue
                if addr & 63:
                    udst += n
                elif m > room:
                    ulen += n
                bar0_n += n
                if not looked:
                    looked = True
                    mv = card.view(card.base, card.size)
                    if mv is not None:
                        lo, hi = card.base, card.base + card.size
                if mv is not None and lo <= addr and addr + n <= hi:
                    mv[addr - lo:addr - lo + n] = view   # inside card memory (the same check as card.view's)
                else:
                    card.write(addr, view)   # bounds-checked: MemoryAccessError outside card memory
        finally:
            if mv is not None:
                mv.release()                 # nothing keeps the mapping exported past the call
        c = self.counters
        c["h2c_bytes"] += total
        if bar0_n:
            c["h2c_bar0_bytes"] += bar0_n
            c["h2c_unaligned_dst_bytes"] += udst
            c["h2c_unaligned_len_bytes"] += ulen
        return dma

    def split_plan(self, plan: Sequence[tuple[int, int, int, int]]) -> tuple[tuple, tuple, tuple[int, int, int, int]]:
        """A completion's copy-out plan -- (card address, length, room left in the descriptor, offset of its
        bytes in the chain's staging piece) per piece -- split by the path each piece takes, by the rule of
        :meth:`write_out_now` for a staging piece that starts on the 64-byte grid: (the BAR0 parts, the DMA
        parts, each as in the plan, the counts (bytes, BAR0 bytes,
        unaligned-destination bytes, unaligned-length bytes)). The same for every completion of one layout
        and the same byte counts, so a queue keeps it (:meth:`write_out_split` copies by it)."""
        pol = self.policy
        use_dma = self.dma is not None and pol.h2c_dma
        dma_min = pol.h2c_dma_min
        card = self.card
        bar0, dma = [], []
        total = bar0_n = udst = ulen = 0
        for a, n, room, rel in plan:
            total += n
            m = (n + 63) & ~63                               # align64
            if use_dma and not (a | rel) & 63 and m <= room and n >= dma_min:
                dma.append((a, n, room, rel))
                continue
            if a & 63:
                udst += n
            elif m > room:
                ulen += n
            bar0_n += n
            # where it lands in card memory's view, checked here once for every completion of the plan (the
            # same check card.view makes); -1: outside, card.write raises
            inside = card.base <= a and a + n <= card.base + card.size and card.view(a, n) is not None
            bar0.append((a, n, room, rel, a - card.base if inside else -1))
        return tuple(bar0), tuple(dma), (total, bar0_n, udst, ulen)

    def write_out_split(self, items: Sequence[tuple[int, tuple]], view: memoryview, card0: int) -> list[WritePiece]:
        """:meth:`write_out_now` for completions whose plans :meth:`split_plan` split: ``items`` are (offset of
        the chain's staging piece in ``view``, its split plan), the staging at card address ``card0 + offset``.
        The BAR0 parts are copied now (bounds-checked as ``card.view`` does; outside card memory
        ``card.write`` raises); returns the DMA parts as pieces for :meth:`write_out_dma`."""
        card = self.card
        mv = None                          # card memory as one view, taken for this call once a part needs it
        total = bar0_n = udst = ulen = 0
        out: list[WritePiece] = []
        odd: list[WritePiece] = []         # parts of a piece off the 64-byte grid (never, as staging is allocated)
        try:
            for base, (bar0, dma, counts) in items:
                if (card0 + base) & 63:
                    for a, n, room, rel, *_ in (*bar0, *dma):
                        odd.append((a, n, room, card0 + base + rel, view[base + rel:base + rel + n]))
                    continue
                for a, n, _room, rel, at in bar0:
                    pos = base + rel
                    if at >= 0:
                        if mv is None:
                            mv = card.view(card.base, card.size)
                        mv[at:at + n] = view[pos:pos + n]      # inside card memory (split_plan checked)
                    else:
                        card.write(a, view[pos:pos + n])   # bounds-checked: MemoryAccessError outside card memory
                for a, n, room, rel in dma:
                    pos = base + rel
                    out.append((a, n, room, card0 + pos, view[pos:pos + n]))
                t, b, u1, u2 = counts
                total += t
                bar0_n += b
                udst += u1
                ulen += u2
        finally:
            if mv is not None:
                mv.release()
        c = self.counters
        c["h2c_bytes"] += total
        if bar0_n:
            c["h2c_bar0_bytes"] += bar0_n
            c["h2c_unaligned_dst_bytes"] += udst
            c["h2c_unaligned_len_bytes"] += ulen
        if odd:
            out += self.write_out_now(odd)
        return out

    def done(self, completion) -> bool:
        """Whether a batch :meth:`read_in_start` or :meth:`write_out_start` returned has finished (looks, never
        waits)."""
        if not completion.settled:
            for ch in completion.channels:
                ch.poll()
        return completion.settled

    def check(self, completion) -> None:
        """Read the error register of each channel a batch runs on: one the engine stopped fails the batch
        (what a waiting :meth:`finish` does every ``check_interval``; a register read, so only now and then)."""
        for ch in completion.channels:
            ch.check()

    def finish(self, completion) -> None:
        """Wait for a batch :meth:`read_in_start` or :meth:`write_out_start` returned; :class:`VopCopyError` if it
        failed."""
        try:
            completion.result(DMA_TIMEOUT)
        except DmaError as e:
            raise VopCopyError(f"{self.name}: DMA of {completion.nbytes} bytes failed: {e}") from None

    def _dma_start(self, batch: list[tuple[int, int, int]], nbytes: int):
        try:
            one = nbytes < 2 * self.dma.spread_min
            completion = self.dma.memcpy_batch(batch, channels=self.channel if one else None)
        except DmaError as e:
            raise VopCopyError(f"{self.name}: DMA of {len(batch)} copies failed: {e}") from None
        self.counters["dma_batches"] += 1
        self.counters["dma_copies"] += len(batch)
        return completion

