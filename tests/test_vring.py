"""Split rings: the driver side against the device side in shared memory, and every way a driver can break one.

The device side (:class:`Vringh`) must return exactly the chains the driver
side (:class:`DriverRing`) posted, in any shape, and refuse every malformed
ring with one :class:`VringError` whose message says what was wrong --
without reaching memory outside its windows (virtio-legacy.md 6.3).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micdrv.memory import BufferMemory, MemoryBase
from micdrv.virtio import DriverRing, RingFull, VringError, VringLayout, Vringh
from micdrv.virtio.device import RING_FEATURES, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from micdrv.virtio.ring import (AVAIL_IDX, AVAIL_RING, DESC, USED_ELEM, USED_FLAGS, USED_IDX, USED_RING,
                                VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
                                VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY, avail_event_offset, used_event_offset)

INDIRECT = 1 << VIRTIO_RING_F_INDIRECT_DESC
EVENT_IDX = 1 << VIRTIO_RING_F_EVENT_IDX
RING_AT = 0x0
TABLES_AT = 0x4000        # indirect tables (driver side)
BUFS_AT = 0x10000         # payload
MEM_SIZE = 0x80000


class Pair:
    """A driver ring and a device ring over one legacy block in one memory."""

    def __init__(self, num=8, features=0, mem=None, indirect_entries=None):
        self.mem = mem if mem is not None else BufferMemory(bytearray(MEM_SIZE))
        self.num = num
        self.lay = VringLayout(num, 4096)
        entries = indirect_entries or num
        self.drv = DriverRing.legacy(num, self.mem, RING_AT, 4096, features,
                                     indirect=(self.mem, TABLES_AT, entries) if features & INDIRECT else None)
        self.dev = Vringh.legacy(num, self.mem, RING_AT, 4096, buffers=self.mem, features=features, name="rx")
        self._next = BUFS_AT

    def buf(self, n: int, fill: bytes | None = None) -> tuple[int, int]:
        addr = self._next
        self._next += (n + 63) & ~63
        assert self._next <= MEM_SIZE
        if fill is not None:
            self.mem.write(addr, fill)
        return addr, n

    # raw ring writes, for malformed rings
    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(RING_AT + self.lay.desc + 16 * i, DESC.pack(addr, length, flags, nxt))

    def post_head(self, head: int, idx: int | None = None) -> None:
        """Put ``head`` in the next avail slot and publish avail.idx (as a driver would)."""
        cur = self.mem.read_u32(RING_AT + self.lay.avail) >> 16  # avail.idx
        self._u16(self.lay.avail + AVAIL_RING + 2 * (cur % self.num), head)
        self._u16(self.lay.avail + AVAIL_IDX, (cur + 1) & 0xFFFF if idx is None else idx)

    def _u16(self, off: int, v: int) -> None:
        self.mem.write(RING_AT + off, v.to_bytes(2, "little"))

    def u16(self, off: int) -> int:
        return int.from_bytes(self.mem.read(RING_AT + off, 2), "little")


# --- round trips ---------------------------------------------------------------------------------

def test_a_chain_round_trips_with_its_data():
    p = Pair()
    out = p.buf(100, b"request-" * 12 + b"endx")
    inb = p.buf(300)
    head = p.drv.add([out], [inb], token="tok")
    assert p.drv.kick_prepare()
    c = p.dev.pop()
    assert c.head == head and c.readable_len == 100 and c.writable_len == 300
    assert [tuple(b) for b in c.buffers] == [(out[0], 100, False), (inb[0], 300, True)]
    assert p.mem.read(c.readable[0][0], 8) == b"request-"
    p.mem.write(c.writable[0][0], b"reply")
    p.dev.push(c.head, 5)
    assert p.dev.needs_notify()
    assert p.drv.get_used() == ("tok", 5)
    assert p.mem.read(inb[0], 5) == b"reply"
    assert p.dev.pop() is None and p.drv.get_used() is None
    assert p.drv.num_free == p.num and p.dev.in_flight == 0


def test_the_three_parts_may_live_in_different_memories_and_used_can_move():
    host = BufferMemory(bytearray(0x10000), base=0x1000_0000, name="host")
    card = BufferMemory(bytearray(0x10000), base=0x0, name="card")
    num = 16
    lay = VringLayout(num, 4096)
    desc, avail = (host, 0x1000_0000 + lay.desc), (host, 0x1000_0000 + lay.avail)
    legacy_used = (host, 0x1000_0000 + lay.used)
    drv = DriverRing(num, desc, avail, legacy_used)
    dev = Vringh(num, desc, avail, legacy_used, buffers=card, name="net rx")
    # The card moves the used ring into its own memory (spec 5.4) and the host follows (5.5).
    drv2 = DriverRing(num, desc, avail, (card, 0x8000))
    dev.set_used((card, 0x8000))
    head = drv2.add([(0x100, 10)], [(0x200, 20)])
    c = dev.pop()
    assert c.head == head and c.buffers[1].addr == 0x200
    dev.push(c.head, 20)
    assert card.read_u32(0x8000) >> 16 == 1  # used.idx in card memory
    assert drv2.get_used() == (head, 20)
    assert host.read(0x1000_0000 + lay.used, 4) == bytes(4)  # the old place untouched
    del drv


def test_a_ring_outside_its_memory_or_misaligned_is_refused():
    mem = BufferMemory(bytearray(0x3000), base=0x1000)
    with pytest.raises(VringError, match="descriptor table at 0x0 .* does not lie in memory"):
        Vringh(8, (mem, 0x0), (mem, 0x1100), (mem, 0x1200), mem)
    with pytest.raises(VringError, match="used ring at 0x1202 is not 4-byte aligned"):
        Vringh(8, (mem, 0x1000), (mem, 0x1100), (mem, 0x1202), mem)
    with pytest.raises(VringError, match="used ring at 0x3fc0 .* does not lie"):
        Vringh(8, (mem, 0x1000), (mem, 0x1100), (mem, 0x3FC0), mem)
    with pytest.raises(VringError, match="queue size 12"):
        Vringh(12, (mem, 0x1000), (mem, 0x1100), (mem, 0x1200), mem)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_chains_round_trip_driver_device_driver(data):
    features = data.draw(st.sampled_from([0, INDIRECT, EVENT_IDX, INDIRECT | EVENT_IDX]), "features")
    num = data.draw(st.sampled_from([2, 4, 8, 32]), "num")
    p = Pair(num, features)
    rnd = random.Random(data.draw(st.integers(0, 2**32 - 1), "seed"))
    chain_shape = st.tuples(st.lists(st.integers(1, 300), max_size=5), st.lists(st.integers(1, 300), max_size=5)) \
        .filter(lambda s: s[0] or s[1])
    for _round in range(data.draw(st.integers(1, 4), "rounds")):
        p._next = BUFS_AT
        posted = {}
        for _ in range(data.draw(st.integers(1, num), "chains")):
            outs, ins = data.draw(chain_shape, "shape")
            out = [p.buf(n, rnd.randbytes(n)) for n in outs]
            inb = [p.buf(n) for n in ins]
            try:
                head = p.drv.add(out, inb, token=len(posted))
            except RingFull:
                break
            posted[len(posted)] = (head, out, inb)
        p.drv.kick_prepare()
        chains = p.dev.pop_many(num + 1)
        assert len(chains) == len(posted)
        for c, (head, out, inb) in zip(chains, posted.values()):
            assert c.head == head
            assert c.readable == out and c.writable == inb
            assert [tuple(b) for b in c.buffers] == [(a, n, False) for a, n in out] + [(a, n, True) for a, n in inb]
            assert (c.readable_len, c.writable_len) == (sum(n for _a, n in out), sum(n for _a, n in inb))
        # The device answers in a random order with a random number of bytes, in random batches.
        rnd.shuffle(chains)
        replies = {}
        while chains:
            k = rnd.randint(1, len(chains))
            batch, chains = chains[:k], chains[k:]
            done = []
            for c in batch:
                n = rnd.randint(0, c.writable_len)
                stream = rnd.randbytes(n)
                pos = 0
                for addr, length in c.writable:
                    take = min(length, n - pos)
                    p.mem.write(addr, stream[pos:pos + take])
                    pos += take
                replies[c.head] = stream
                done.append((c.head, n))
            p.dev.push_many(done)
            p.dev.needs_notify()
        got = p.drv.get_all_used()
        assert sorted(t for t, _ in got) == sorted(posted)
        for token, n in got:
            head, _out, inb = posted[token]
            assert n == len(replies[head])
            back = b"".join(p.mem.read(a, ln) for a, ln in inb)[:n]
            assert back == replies[head]
        assert p.drv.num_free == num and p.dev.in_flight == 0


@pytest.mark.parametrize("features", [0, INDIRECT | EVENT_IDX])
def test_a_prepared_chain_posts_what_add_would_again_and_again(features):
    p = Pair(features=features)
    out, in_ = [p.buf(10)], [p.buf(4080), p.buf(4096), p.buf(100)]
    prepared = p.drv.prepare(out, in_)
    assert (prepared.table is not None) == bool(features & INDIRECT)
    for round_ in range(3 * p.num):           # past the ring size: heads and tables are reused
        head = p.drv.add_prepared(prepared, token=("rx", round_))
        c = p.dev.pop()
        assert c.head == head and (c.readable, c.writable) == (out, in_) and c.writable_len == 8276
        p.dev.push(c.head, 7)
        assert p.drv.get_used() == (("rx", round_), 7)
    assert p.drv.num_free == p.num and p.drv.in_flight == 0


@pytest.mark.parametrize("features", [0, INDIRECT | EVENT_IDX])
def test_batches_post_and_return_what_single_calls_would(features):
    p = Pair(features=features)
    a, b = p.buf(10), p.buf(1500)
    prepared = p.drv.prepare((), [p.buf(4080), p.buf(4096)])
    for round_ in range(3 * p.num):
        heads = p.drv.add_prepared_many([(prepared, ("rx", round_, i)) for i in range(3)])
        heads.append(p.drv.add_pair(a[0], a[1], b[0], b[1], ("tx", round_)))
        assert p.drv.num_free == (4 if features & INDIRECT else 0)
        chains = p.dev.pop_many(p.num)
        assert [c.head for c in chains] == heads                       # in order, one avail.idx store
        assert all(c.writable == prepared.in_ for c in chains[:-1]) and chains[-1].readable == [a, b]
        p.dev.push_many([(c.head, 5 if c.writable else 0) for c in chains])
        got = p.drv.get_used_many(3)                                    # at most the limit, the rest later
        assert got == [(("rx", round_, i), 5) for i in range(3)]
        assert p.drv.get_all_used()[-1] == (("tx", round_), 0)
    assert p.drv.num_free == p.num and p.drv.in_flight == 0


def test_a_batch_that_runs_out_of_descriptors_publishes_what_it_placed():
    p = Pair(num=4, features=INDIRECT)
    prepared = p.drv.prepare((), [p.buf(100), p.buf(100)])
    with pytest.raises(RingFull):
        p.drv.add_prepared_many([(prepared, i) for i in range(6)])
    assert sorted(c.head for c in p.dev.pop_many(8)) == [0, 1, 2, 3] and p.drv.in_flight == 4


def test_indices_wrap_at_65536():
    p = Pair(num=4)
    # Fast-forward both sides to just below the wrap, as if 65530 chains had gone round.
    start = 0xFFFA
    p.drv.avail_idx = p.drv.last_used = p.drv._kicked = start
    p.dev.last_avail = p.dev.used_idx = p.dev._signalled = start
    p._u16(p.lay.avail + AVAIL_IDX, start)
    p._u16(p.lay.used + USED_IDX, start)
    for i in range(12):
        h = p.drv.add([p.buf(8, bytes([i]) * 8)], [p.buf(8)], token=i)
        c = p.dev.pop()
        assert c.head == h and p.mem.read(c.readable[0][0], 1) == bytes([i])
        p.dev.push(c.head, 8)
        assert p.drv.get_used() == (i, 8)
    assert p.drv.avail_idx == p.dev.last_avail == (start + 12) & 0xFFFF == 6


# --- notification suppression (section 1.4) ------------------------------------------------------

def test_no_notify_and_no_interrupt_flags():
    p = Pair()
    p.dev.disable_notify()
    assert p.u16(p.lay.used + USED_FLAGS) == VRING_USED_F_NO_NOTIFY
    p.drv.add([p.buf(4)])
    assert not p.drv.kick_prepare()          # the device said "don't kick"
    assert p.dev.enable_notify() is False     # ... and a chain arrived meanwhile: keep draining
    c = p.dev.pop()
    assert p.dev.enable_notify() is True      # now empty: safe to sleep
    p.drv.disable_cb()
    assert p.u16(p.lay.avail) == VRING_AVAIL_F_NO_INTERRUPT
    p.dev.push(c.head, 0)
    assert not p.dev.needs_notify()           # the driver said "don't interrupt"
    assert p.drv.enable_cb() is False         # a completion is pending
    assert p.drv.get_used() is not None
    assert p.drv.enable_cb() is True
    p.drv.add([p.buf(4)])
    assert p.drv.kick_prepare()
    p.dev.push(p.dev.pop().head, 0)
    assert p.dev.needs_notify()
    assert not p.dev.needs_notify()           # nothing new since the last decision


def test_event_idx_kicks_and_interrupts_once_per_window():
    p = Pair(num=8, features=EVENT_IDX)
    p.drv.add([p.buf(4)])
    assert p.drv.kick_prepare()               # avail_event 0 lies in [0, 1)
    p.dev.disable_notify()                    # a no-op with EVENT_IDX
    p.drv.add([p.buf(4)])
    assert not p.drv.kick_prepare()           # avail_event 0 is not in [1, 2): no second kick
    chains = p.dev.pop_many(8)
    assert len(chains) == 2
    assert p.dev.enable_notify() is True
    assert p.u16(p.lay.used + avail_event_offset(8)) == 2   # "kick me when avail passes 2"
    p.drv.add([p.buf(4)])
    assert p.drv.kick_prepare()
    # Interrupts: the driver asks to be woken after used index 0 (used_event = last_used = 0).
    p.drv.enable_cb()
    p.dev.push(chains[0].head, 0)
    assert p.dev.needs_notify()
    p.dev.push(chains[1].head, 0)
    assert not p.dev.needs_notify()           # used_event 0 is not in [1, 2)
    assert len(p.drv.get_all_used()) == 2
    assert p.u16(p.lay.avail + used_event_offset(8)) == 2  # get_used moved used_event on


def test_event_idx_notifies_after_more_than_65535_completions():
    p = Pair(num=8, features=EVENT_IDX)
    p.drv.add([p.buf(4)])
    c = p.dev.pop()
    p.dev.push(c.head, 0)
    p.dev._unsignalled = 0x10000               # as if the window had been lapped
    p.drv.disable_cb()                         # used_event stays behind
    assert p.dev.needs_notify()


def test_abandon_gives_the_last_chains_back():
    p = Pair()
    heads = [p.drv.add([p.buf(4)], token=i) for i in range(3)]
    chains = p.dev.pop_many(3)
    with pytest.raises(ValueError, match="only the last chains"):
        p.dev.abandon(chains[:1])
    p.dev.abandon(chains[1:])
    assert p.dev.in_flight == 1
    again = p.dev.pop_many(3)
    assert [c.head for c in again] == heads[1:]


def test_the_device_refuses_its_own_mistakes_with_value_error():
    p = Pair()
    p.drv.add([p.buf(4)], [p.buf(8)])
    c = p.dev.pop()
    with pytest.raises(ValueError, match="writable buffers hold 8"):
        p.dev.push(c.head, 9)
    with pytest.raises(ValueError, match="not in flight"):
        p.dev.push(5, 0)
    with pytest.raises(ValueError, match="not in flight"):
        p.dev.push_many([(c.head, 0), (c.head, 0)])
    assert p.dev.broken is None
    p.dev.push(c.head, 8)


# --- malformed rings: one error type, a clear message, no access outside the windows ------------

class Recording(MemoryBase):
    """Memory that is never mapped (forces the checked read/write path) and records every access."""

    def __init__(self, size: int):
        super().__init__(0, size, "recorded")
        self.buf = bytearray(size)
        self.accesses: list[tuple[int, int]] = []

    def _read(self, addr, n):
        self.accesses.append((addr, n))
        return bytes(self.buf[addr:addr + n])

    def _write(self, addr, data):
        self.accesses.append((addr, len(data)))
        self.buf[addr:addr + len(data)] = data


def broken_pair(features=0, num=8):
    """A pair whose device reads ring memory only through recorded, checked accesses; buffers in a window."""
    ring_mem = Recording(MEM_SIZE)
    p = Pair(num, features, mem=ring_mem)
    window = ring_mem.window(BUFS_AT, 0x1000, "buffers")
    p.dev = Vringh.legacy(num, ring_mem, RING_AT, 4096, buffers=window, features=features, name="rx")
    ring_mem.accesses.clear()
    return p


def expect_broken(p: Pair, message: str) -> None:
    with pytest.raises(VringError, match=message):
        p.dev.pop()
    # Only the ring parts and tables inside the buffer window were touched.
    lay = p.lay
    allowed = [(RING_AT, lay.size), (BUFS_AT, 0x1000)]
    for addr, n in p.mem.accesses:
        assert any(lo <= addr and addr + n <= lo + size for lo, size in allowed), (hex(addr), n)
    # Broken until reset: the next call fails at once, and says so.
    with pytest.raises(VringError, match="broken until the driver resets"):
        p.dev.pop()
    p.dev.reset()
    assert p.dev.broken is None


B0 = BUFS_AT  # a valid buffer address


@pytest.mark.parametrize("build,message", [
    (lambda p: (p.desc(0, B0, 16), p.post_head(0, idx=9)),
     r"^rx: avail.idx 9 is 9 ahead of the 0 already taken, more than the 8 ring entries$"),
    (lambda p: p.post_head(8), r"^rx: avail.ring\[0\]: head 8 out of range 0..7$"),
    (lambda p: (p.desc(7, B0, 16, VRING_DESC_F_NEXT, 300), p.post_head(7)),
     r"^rx: descriptor 7: next 300 out of range 0..7$"),
    (lambda p: (p.desc(0, B0, 16, VRING_DESC_F_NEXT, 1), p.desc(1, B0, 16, VRING_DESC_F_NEXT, 0), p.post_head(0)),
     r"^rx: chain from head 0 has more than 8 descriptors: a loop$"),
    (lambda p: (p.desc(3, B0, 16, VRING_DESC_F_NEXT, 3), p.post_head(3)), "a loop"),
    (lambda p: (p.desc(0, B0, 0), p.post_head(0)), r"^rx: descriptor 0: zero-length buffer$"),
    (lambda p: (p.desc(0, B0 + 0xF00, 0x200), p.post_head(0)),
     r"^rx: descriptor 0: buffer \[0x10f00, \+0x200\) lies outside the driver memory \[0x10000, 0x11000\)$"),
    (lambda p: (p.desc(0, 0xFFFF_FFFF_FFFF_FFF0, 0x20), p.post_head(0)), "wraps around the 64-bit address space"),
    (lambda p: (p.desc(0, 0x100, 16), p.post_head(0)), "lies outside the driver memory"),
    (lambda p: (p.desc(0, B0, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1), p.desc(1, B0, 16), p.post_head(0)),
     r"^rx: descriptor 1: readable buffer after a writable one$"),
    (lambda p: (p.desc(0, B0, 32, VRING_DESC_F_INDIRECT), p.post_head(0)),
     "INDIRECT but VIRTIO_RING_F_INDIRECT_DESC was not negotiated"),
])
def test_a_malformed_ring_breaks_with_a_clear_message(build, message):
    p = broken_pair()
    build(p)
    expect_broken(p, message)


def table(p: Pair, at: int, entries: list[tuple[int, int, int, int]]) -> None:
    for i, e in enumerate(entries):
        p.mem.write(at + 16 * i, DESC.pack(*e))


T = BUFS_AT + 0x800  # an indirect table inside the buffer window


@pytest.mark.parametrize("build,message", [
    (lambda p: (p.desc(0, T, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1), p.post_head(0)),
     r"^rx: descriptor 0: INDIRECT together with NEXT$"),
    (lambda p: (p.desc(0, T, 0, VRING_DESC_F_INDIRECT), p.post_head(0)), "indirect table of 0 bytes"),
    (lambda p: (p.desc(0, T, 24, VRING_DESC_F_INDIRECT), p.post_head(0)),
     "indirect table of 24 bytes is not a non-zero multiple of 16"),
    (lambda p: (p.desc(0, T, 16 * 9, VRING_DESC_F_INDIRECT), p.post_head(0)),
     r"indirect table of 9 descriptors is longer than the ring \(8\)"),
    (lambda p: (p.desc(0, BUFS_AT + 0xFF0, 32, VRING_DESC_F_INDIRECT), p.post_head(0)),
     r"descriptor 0: indirect table \[0x10ff0, \+0x20\) lies outside"),
    (lambda p: (table(p, T, [(B0, 8, VRING_DESC_F_NEXT, 1), (T, 32, VRING_DESC_F_INDIRECT, 0)]),
                p.desc(0, T, 32, VRING_DESC_F_INDIRECT), p.post_head(0)),
     r"indirect descriptor \(head 0\) 1 \(table of head 0\): INDIRECT inside an indirect table"),
    (lambda p: (table(p, T, [(B0, 8, VRING_DESC_F_NEXT, 1), (B0, 8, VRING_DESC_F_NEXT, 0)]),
                p.desc(0, T, 32, VRING_DESC_F_INDIRECT), p.post_head(0)),
     "chain from head 0 has more than 2 descriptors: a loop"),
    (lambda p: (table(p, T, [(B0, 8, VRING_DESC_F_NEXT, 5)]), p.desc(0, T, 16, VRING_DESC_F_INDIRECT),
                p.post_head(0)),
     r"indirect descriptor \(head 0\) 0: next 5 out of range 0..0"),
    (lambda p: (table(p, T, [(B0, 0, 0, 0)]), p.desc(0, T, 16, VRING_DESC_F_INDIRECT), p.post_head(0)),
     r"indirect descriptor \(head 0\) 0: zero-length buffer"),
    (lambda p: (table(p, T, [(0x10, 8, 0, 0)]), p.desc(0, T, 16, VRING_DESC_F_INDIRECT), p.post_head(0)),
     r"indirect descriptor \(head 0\) 0: buffer \[0x10, \+0x8\) lies outside"),
    (lambda p: (p.desc(0, B0, 8, VRING_DESC_F_NEXT, 1), p.desc(1, T, 16, VRING_DESC_F_INDIRECT), p.post_head(0)),
     r"descriptor 1: INDIRECT is only allowed on the head of a chain \(head 0\)"),
])
def test_indirect_misuse_breaks_with_a_clear_message(build, message):
    p = broken_pair(INDIRECT)
    build(p)
    expect_broken(p, message)


@pytest.mark.parametrize("head,message", [
    ((T, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT), r"^rx: descriptor 0: INDIRECT together with NEXT$"),
    ((T, 24, VRING_DESC_F_INDIRECT), "indirect table of 24 bytes is not a non-zero multiple of 16"),
    ((T, 0, VRING_DESC_F_INDIRECT), "indirect table of 0 bytes"),
    ((T, 16 * 9, VRING_DESC_F_INDIRECT), r"indirect table of 9 descriptors is longer than the ring \(8\)"),
    ((MEM_SIZE - 16, 32, VRING_DESC_F_INDIRECT), r"indirect table \[0x7fff0, \+0x20\) lies outside"),
])
def test_a_cached_table_does_not_excuse_a_bad_head_descriptor(head, message):
    # mapped memory: the device takes its fast path for tables it has walked before (Vringh.pop_many)
    p = Pair(features=INDIRECT)
    table(p, T, [(B0, 8, VRING_DESC_F_NEXT, 1), (B0 + 64, 8, VRING_DESC_F_WRITE, 0)])
    table(p, MEM_SIZE - 16, [(B0, 8, VRING_DESC_F_NEXT, 1)])
    for _ in range(2):
        p.desc(0, T, 32, VRING_DESC_F_INDIRECT)
        p.post_head(0)
        c = p.dev.pop()
        p.dev.push(c.head, 0)
    assert p.dev.shape_hits == 1
    p.desc(0, *head)
    p.post_head(0)
    with pytest.raises(VringError, match=message):
        p.dev.pop()
    assert p.dev.broken is not None


def test_an_indirect_table_is_read_once_and_its_write_flag_ignored():
    p = broken_pair(INDIRECT)
    table(p, T, [(B0, 8, VRING_DESC_F_NEXT, 1), (B0 + 64, 8, VRING_DESC_F_WRITE, 0)])
    p.desc(0, T, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE)
    p.post_head(0)
    p.mem.accesses.clear()
    c = p.dev.pop()
    assert [tuple(b) for b in c.buffers] == [(B0, 8, False), (B0 + 64, 8, True)]
    assert sum(1 for a, n in p.mem.accesses if a == T) == 1 and (T, 32) in p.mem.accesses


def test_a_table_seen_before_is_not_walked_again_and_a_changed_one_is():
    p = broken_pair(INDIRECT)
    good = [(B0, 8, VRING_DESC_F_NEXT, 1), (B0 + 64, 8, VRING_DESC_F_WRITE, 0)]
    table(p, T, good)
    p.desc(0, T, 32, VRING_DESC_F_INDIRECT)
    p.post_head(0)
    first = p.dev.pop()
    p.dev.push(0, 0)
    p.post_head(0)                        # the same buffers again, as virtio-net reposts its receive buffers
    again = p.dev.pop()
    assert again.shape is first.shape is not None and p.dev.shape_hits == 1
    assert (again.readable, again.writable, again.writable_len) == ([(B0, 8)], [(B0 + 64, 8)], 8)
    p.dev.push(0, 0)
    table(p, T, [(B0, 8, VRING_DESC_F_NEXT, 1), (B0 + 128, 16, VRING_DESC_F_WRITE, 0)])
    p.post_head(0)                        # other bytes: walked (and checked) afresh
    other = p.dev.pop()
    assert other.writable == [(B0 + 128, 16)] and other.shape is not first.shape and p.dev.shape_hits == 1
    p.dev.push(0, 0)
    table(p, T, [(B0, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1), (B0 + 64, 8, 0, 0)])
    p.post_head(0)                        # a bad table where a good one was: still refused
    expect_broken(p, r"indirect descriptor \(head 0\) 1: readable buffer after a writable one")


def test_a_head_still_in_flight_cannot_be_taken_again():
    p = broken_pair()
    p.desc(0, B0, 8)
    p.post_head(0)
    p.dev.pop()
    p.post_head(0)
    expect_broken(p, r"avail.ring\[1\]: head 0 is already in flight")


def test_the_driver_side_refuses_bad_used_entries():
    p = Pair()
    head = p.drv.add([p.buf(4)], [p.buf(8)])
    used = p.lay.used
    p.mem.write(RING_AT + used + USED_RING, USED_ELEM.pack(9, 0))
    p._u16(used + USED_IDX, 1)
    with pytest.raises(VringError, match=r"used.ring\[0\]: id 9 out of range 0..7"):
        p.drv.get_used()
    p.mem.write(RING_AT + used + USED_RING, USED_ELEM.pack(head + 1, 0))
    with pytest.raises(VringError, match=f"id {head + 1} is not a head in flight"):
        p.drv.get_used()
    p.mem.write(RING_AT + used + USED_RING, USED_ELEM.pack(head, 9))
    with pytest.raises(VringError, match="returned with len 9, but its writable buffers hold 8"):
        p.drv.get_used()
    p._u16(used + USED_IDX, 2)
    with pytest.raises(VringError, match="used.idx 2 is 2 ahead of 0, but only 1 chains are in flight"):
        p.drv.get_used()


def test_a_full_ring_says_so_and_indirect_saves_descriptors():
    p = Pair(num=4)
    p.drv.add([p.buf(4)] * 3)
    with pytest.raises(RingFull):
        p.drv.add([p.buf(4)] * 2)
    q = Pair(num=4, features=INDIRECT | EVENT_IDX)
    for _ in range(4):
        q.drv.add([q.buf(4)] * 3, [q.buf(4)])   # one descriptor each
    assert q.drv.num_free == 0
    chains = q.dev.pop_many(8)
    assert len(chains) == 4 and all(len(c.buffers) == 4 for c in chains)
    assert RING_FEATURES == INDIRECT | EVENT_IDX


# Descriptors mostly near-valid (inside the window, short, small next) so chains get walked deep,
# with edges and anything at all mixed in.
_addr = st.one_of(st.integers(BUFS_AT, BUFS_AT + 0xF00), st.integers(BUFS_AT, BUFS_AT + 0xF00),
                  st.sampled_from([0, BUFS_AT - 1, BUFS_AT + 0x1000, T, 2**64 - 1]), st.integers(0, 2**64 - 1))
_flags = st.one_of(st.sampled_from([0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE]),
                   st.integers(0, 7))
_desc = st.tuples(_addr, st.one_of(st.integers(1, 0x100), st.integers(0, 2**32 - 1)), _flags,
                  st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(descs=st.lists(_desc, min_size=8, max_size=8), table=st.lists(_desc, min_size=4, max_size=4),
       heads=st.lists(st.integers(0, 9), min_size=8, max_size=8),
       idx=st.one_of(st.integers(1, 8), st.integers(0, 0xFFFF)),
       features=st.sampled_from([0, INDIRECT]))
def test_whatever_a_hostile_driver_writes_yields_valid_chains_or_the_one_error(descs, table, heads, idx, features):
    p = broken_pair(features)
    for i, d in enumerate(descs):
        p.desc(i, *d)
    for i, d in enumerate(table):          # a possible indirect table inside the buffer window
        p.mem.write(T + 16 * i, DESC.pack(*d))
    for slot, h in enumerate(heads):
        p._u16(p.lay.avail + AVAIL_RING + 2 * slot, h)
    p._u16(p.lay.avail + AVAIL_IDX, idx)
    p.mem.accesses.clear()
    chains = []
    try:
        while (c := p.dev.pop()) is not None:
            chains.append(c)
    except VringError as e:
        assert str(e).startswith("rx: ") and p.dev.broken
    assert len(chains) <= 8
    for c in chains:
        assert c.head < 8 and 1 <= len(c.readable) + len(c.writable) <= 8
        for a, n in c.readable + c.writable:
            assert n > 0 and BUFS_AT <= a and a + n <= BUFS_AT + 0x1000
        assert c.readable_len == sum(n for _a, n in c.readable)
    allowed = [(RING_AT, p.lay.size), (BUFS_AT, 0x1000)]
    for addr, n in p.mem.accesses:
        assert any(lo <= addr and addr + n <= lo + size for lo, size in allowed), (hex(addr), n)


def test_avail_idx_is_published_with_one_store_another_cpu_never_sees_it_torn():
    """The device reads avail.idx from another CPU (the daemon, while the card OS adds): every value it can
    see is one the driver published. ``struct.pack_into`` zero-fills and writes byte by byte, which a
    reader in another process caught as avail.idx 0 (the host then broke the ring, see DriverRing)."""
    import mmap
    import os
    mm = mmap.mmap(-1, MEM_SIZE)           # MAP_SHARED: the child below sees every store
    p = Pair(num=8, mem=BufferMemory(memoryview(mm)))
    at = RING_AT + p.lay.avail + AVAIL_IDX
    start = 0x00FE                         # the idx crosses 0x0100, 0x0200, ...: byte-wise stores would tear
    p.drv.avail_idx = p.drv.last_used = p.drv._kicked = start
    p.dev.last_avail = p.dev.used_idx = p.dev._signalled = start
    p._u16(p.lay.avail + AVAIL_IDX, start)
    p._u16(p.lay.used + USED_IDX, start)
    stop_at = MEM_SIZE - 1
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                           # the "device CPU": spin reading avail.idx
        try:
            os.close(r)
            h = memoryview(mm).cast("H")
            i, last, bad, reads = at >> 1, start, 0, 0
            while not mm[stop_at]:
                v = h[i]
                reads += 1
                if v != last:
                    # forward steps of more than one are values missed while this process was not running;
                    # a step back is a value the driver never published (a torn store shows 0 or the new
                    # low byte under a zero high byte: always behind)
                    if (last - v) & 0xFFFF < 0x8000:
                        bad += 1
                    last = v
            os.write(w, f"{bad} {reads}".encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        out, inb = p.buf(8), p.buf(8)
        for _ in range(60000):
            p.drv.add([out], [inb])
            p.dev.push(p.dev.pop().head, 8)
            p.drv.get_used()
    finally:
        mm[stop_at] = 1
        bad, reads = map(int, os.read(r, 64).split())
        os.close(r)
        os.waitpid(pid, 0)
    assert reads > 0 and bad == 0, f"{bad} torn avail.idx values seen in {reads} reads"
