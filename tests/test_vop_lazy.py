"""A lazy VOP queue (the net backend's): completions gathered into one copy-out batch, published by the poller.

In process, over plain memories: the card's memory and ring as
:class:`~micdrv.memory.BufferMemory`, a driver ring posting receive
buffers, and a DMA engine whose completions the test settles by hand. What
is checked: nothing is published before its copy is done (data before the
used entry), a drain's batches go as one DMA submission, the poller
publishes what the drain left copying, and a queue kept busy for longer than
the DMA timeout never mistakes the age of the whole stream for the age of
one copy.
"""

from __future__ import annotations

import types

from micdrv.memory import BufferMemory
from micdrv.pci.arena import DmaArena
from micdrv.virtio import Vringh
from micdrv.virtio.device import VIRTIO_RING_F_EVENT_IDX
from micdrv.virtio.driver import DriverRing
from micdrv.virtio.ring import VringLayout
from micdrv.vop.copy import DMA_TIMEOUT, CopyEngine
from micdrv.vop import queue as vop_queue
from micdrv.vop.queue import StagingArea, VopQueue

NUM = 16
BUF = 4096
ARENA_CARD = 0x80_0000_0000      # where the card reaches the arena (the staging's card addresses)


class _Channel:
    def poll(self) -> None:
        pass

    def check(self) -> None:
        pass


class _Completion:
    def __init__(self, engine: "_Dma", batch):
        self.engine, self.batch, self.settled = engine, batch, False
        self.channels = (engine.ch,)
        self.nbytes = sum(n for _d, _s, n in batch)

    def settle(self) -> None:
        """The copy happens now (card memory gets the staging's bytes), then the status says done."""
        for dst, src, n in self.batch:
            off = src - ARENA_CARD
            self.engine.card.write(dst, bytes(self.engine.arena.view[off:off + n]))
        self.settled = True

    def result(self, timeout=None):
        assert self.settled, "waited for a copy the test has not settled"
        return self.nbytes

    def wait(self, timeout=None) -> None:
        if not self.settled:
            self.settle()


class _Dma:
    spread_min = 8 << 20

    def __init__(self, card, arena):
        self.card, self.arena = card, arena
        self.ch = _Channel()
        self.channels = {0: self.ch}
        self.submitted: list[_Completion] = []

    def memcpy_batch(self, batch, channels=None):
        c = _Completion(self, list(batch))
        self.submitted.append(c)
        return c


class _Rig:
    def __init__(self):
        feat = 1 << VIRTIO_RING_F_EVENT_IDX
        self.card = BufferMemory(bytearray(1 << 20), base=0, name="card")
        host = BufferMemory(bytearray(1 << 16), base=0x4000_0000, name="rings")
        lay = VringLayout(NUM, 64)
        desc, avail, used = (host, host.base + lay.desc), (host, host.base + lay.avail), (self.card, 0x1000)
        self.drv = DriverRing(NUM, desc, avail, used, feat)
        self.arena = DmaArena(4 << 20)
        self.dma = _Dma(self.card, self.arena)
        self.scheduled = 0
        self.q = VopQueue(0, Vringh(NUM, desc, avail, used, self.card, feat, "rx"), CopyEngine(self.card, self.dma),
                          StagingArea(self.arena, 1 << 20, ARENA_CARD), memoryview(bytearray(2)).cast("H"),
                          lambda: None, "rx", self._schedule, lazy=True)
        self.bufs = [0x10000 + i * BUF for i in range(NUM)]
        for i, a in enumerate(self.bufs):
            self.drv.add((), [(a, BUF)], token=i)

    def _schedule(self, q) -> None:
        self.scheduled += 1

    def fill(self, chains, byte: int) -> list:
        for c in chains:
            c.writable[0][:BUF] = bytes([byte]) * BUF
        return [(c, BUF) for c in chains]


def test_a_drain_goes_as_one_copy_and_nothing_is_published_before_it_is_done():
    r = _Rig()
    q = r.q
    for k in range(2):                              # two drain batches ...
        q.complete_deferred(r.fill(q.pop_many(4), 0xA0 + k))
    q.flush()                                       # ... the drain ends
    assert len(r.dma.submitted) == 1                # one DMA submission for both batches
    assert r.scheduled                              # the poller will look at it
    assert r.drv.get_used_many(NUM) == []           # still copying: not published
    assert q.outgoing(1.0) is True
    r.dma.submitted[0].settle()
    assert q.outgoing(1.0) is False                 # the poller publishes it
    got = r.drv.get_used_many(NUM)
    assert [t for t, _n in got] == list(range(8)) and all(n == BUF for _t, n in got)
    assert r.card.read(r.bufs[0], 8) == b"\xa0" * 8 and r.card.read(r.bufs[7], 8) == b"\xa1" * 8


def test_a_queue_kept_busy_longer_than_the_dma_timeout_does_not_time_out(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(vop_queue, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    r = _Rig()
    q = r.q
    now = 0.0
    for step in range(40):
        clock[0] = now
        # a drain every half DMA timeout, each leaving its copy running while the one before settles
        q.complete_deferred(r.fill(q.pop_many(2), step & 0xFF))
        q.flush()
        now += DMA_TIMEOUT / 2
        for c in r.dma.submitted[:-1]:
            if not c.settled:
                c.settle()
        assert q.outgoing(now) is True              # the newest is still copying: no timeout
        for t, _n in r.drv.get_used_many(NUM):
            r.drv.add((), [(r.bufs[t], BUF)], token=t)
    r.dma.submitted[-1].settle()
    assert q.outgoing(now) is False


def test_a_reset_forgets_what_was_gathered_or_copying():
    r = _Rig()
    q = r.q
    q.complete_deferred(r.fill(q.pop_many(3), 1))  # gathered, not started
    q.release_all()
    assert q.status()["staging"]["allocated"] == 0 and q.vring.in_flight == 3
