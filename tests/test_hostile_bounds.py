"""Nothing outside its window is ever touched: the bounds are enforced by the memory accessors (issue 7).

Every address or length a card supplies reaches host memory (the DmaArena,
by IOVA) or card memory (BAR0) only through a :class:`~micdrv.memory.Memory`
window. These properties drive the accessors with any address and length
-- inside, straddling an edge, far outside, negative, wrapping 2**64 -- over
memory with guard bytes on both sides, and check that an access either lies
wholly inside and does exactly that, or raises
:class:`~micdrv.memory.MemoryAccessError` having touched nothing (not even a
prefix). The same for the layers that take card-supplied values straight
to memory: the VOP copy engine's BAR0 path, a SCIF ring whose peer
publishes any offset, and the COSM and SCIF message parsers.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from micdrv.cosm.msg import COSM_MSG_SIZE, CosmMsg, CosmProtocolError
from micdrv.memory import BufferMemory, MemoryAccessError
from micdrv.pci import DmaArena
from micdrv.scif import Ring, RingError, U32Ptr
from micdrv.scif.wire import SCIFMSG_SIZE, ScifMsg, ScifProtocolError
from micdrv.vop.copy import CopyEngine, CopyPolicy
from micdrv.x100.mmio import ApertureRegionMemory
from tests import hardening
from tests.test_memory_windows import FakeDev, FakeMappedDevice

GUARD = 256
BASE = 0x80_0000_1000       # an IOVA- or SMPT-like base, so "below the window" exists
SIZE = 4096
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))


def edges(base: int, size: int):
    """Addresses that matter: around both edges, inside, anywhere, negative, near 2**64."""
    return st.one_of(st.integers(base - 16, base + 16), st.integers(base + size - 16, base + size + 16),
                     st.integers(base, base + size), st.integers(0, (1 << 64) - 1), st.integers(-64, -1),
                     st.integers((1 << 64) - 64, (1 << 64) + 64))


lengths = st.one_of(st.integers(0, 32), st.integers(-8, SIZE + 64), st.integers(0, 1 << 64))


def guarded(base: int = BASE):
    """A window of SIZE bytes at ``base`` inside a buffer with GUARD bytes of a known pattern either side."""
    buf = bytearray(b"\xA5" * (GUARD + SIZE + GUARD))
    return buf, BufferMemory(memoryview(buf)[GUARD:GUARD + SIZE], base=base, name="window")


OPS = ("read", "write", "read_u32", "read_u64", "write_u32", "write_u64", "view", "window", "fill")


def do(mem, op: str, addr: int, n: int):
    if op == "read":
        return mem.read(addr, n)
    if op == "write":
        return mem.write(addr, b"\x5A" * max(0, min(n, 1 << 16)))
    if op == "read_u32":
        return mem.read_u32(addr)
    if op == "read_u64":
        return mem.read_u64(addr)
    if op == "write_u32":
        return mem.write_u32(addr, 0x5A5A5A5A)
    if op == "write_u64":
        return mem.write_u64(addr, 0x5A5A5A5A5A5A5A5A)
    if op == "view":
        return mem.view(addr, n)
    if op == "window":
        w = mem.window(addr, n)
        w.write(addr, b"\x5A" * min(n, 1 << 16))
        return w
    return mem.fill(addr, max(0, min(n, 1 << 16)), 0x5A)


def extent(op: str, n: int) -> int:
    return {"read_u32": 4, "write_u32": 4, "read_u64": 8, "write_u64": 8}.get(op, max(0, min(n, 1 << 16))
                                                                        if op in ("write", "fill") else n)


@PROPS
@given(op=st.sampled_from(OPS), addr=edges(BASE, SIZE), n=lengths, sub=st.booleans())
def test_an_access_lies_wholly_inside_its_window_or_raises_having_touched_nothing(op, addr, n, sub):
    buf, mem = guarded()
    if sub:                                   # a sub-window: its own bounds, then the parent's
        mem = mem.window(BASE + 64, SIZE - 128)
    lo, hi = mem.base, mem.base + mem.size
    k = extent(op, n)
    inside = k >= 0 and lo <= addr and addr + k <= hi
    before = bytes(buf)
    if inside:
        do(mem, op, addr, n)
        changed = [i for i in range(len(buf)) if buf[i] != before[i]]
        assert all(GUARD + addr - BASE <= i < GUARD + addr - BASE + k for i in changed)
    else:
        with pytest.raises(MemoryAccessError):
            do(mem, op, addr, n)
        assert bytes(buf) == before
    hardening.fuzz_cases()


@PROPS
@given(op=st.sampled_from(OPS), addr=edges(0x1_0000_0000, 1 << 16), n=lengths)
def test_the_dma_arena_refuses_what_is_outside_it_and_writes_nothing(op, addr, n):
    with DmaArena(1 << 16) as arena:
        arena.map(FakeMappedDevice(), 0x1_0000_0000)
        mem = arena.memory()
        arena.view[:] = b"\xA5" * (1 << 16)
        k = extent(op, n)
        if k >= 0 and mem.base <= addr and addr + k <= mem.base + mem.size:
            do(mem, op, addr, n)
        else:
            with pytest.raises(MemoryAccessError):
                do(mem, op, addr, n)
            assert bytes(arena.view) == b"\xA5" * (1 << 16)
        del mem
    hardening.fuzz_cases()


@PROPS
@given(op=st.sampled_from(OPS), addr=edges(0, SIZE), n=lengths)
def test_bar0_without_a_mapping_sends_nothing_to_the_card_for_a_refused_access(op, addr, n):
    dev = FakeDev(SIZE)
    mem = ApertureRegionMemory(dev, SIZE)
    k = extent(op, n)
    if not (k >= 0 and 0 <= addr and addr + k <= SIZE):
        with pytest.raises(MemoryAccessError):
            do(mem, op, addr, n)
        assert dev.calls == []
    hardening.fuzz_cases()


@PROPS
@given(pieces=st.lists(st.tuples(edges(0, SIZE), st.integers(1, 512)), min_size=1, max_size=4),
       direction=st.sampled_from(["in", "out"]))
def test_the_copy_engines_bar0_path_stays_in_card_memory(pieces, direction):
    """The VOP copy engine without DMA (``CopyPolicy`` BAR0 only): a buffer address the ring let through by
    mistake would still raise here, not land beside card memory."""
    buf, card = guarded(0)                    # BAR0: card physical address X is offset X (spec 1.2)
    engine = CopyEngine(card, None, CopyPolicy(c2h_dma=False, h2c_dma=False))
    before = bytes(buf)
    bad = any(not (0 <= a and a + n <= SIZE) for a, n in pieces)
    if direction == "out":
        call = lambda: engine.write_out([(a, n, n, 0, memoryview(b"\x5A" * n)) for a, n in pieces])   # noqa: E731
    else:
        call = lambda: engine.read_in([(a, n, 0, memoryview(bytearray(n))) for a, n in pieces])  # noqa: E731
    if bad:
        with pytest.raises(MemoryAccessError):
            call()
        assert bytes(buf[:GUARD]) == before[:GUARD] and bytes(buf[GUARD + SIZE:]) == before[GUARD + SIZE:]
    else:
        call()
        assert bytes(buf[:GUARD]) == before[:GUARD] and bytes(buf[GUARD + SIZE:]) == before[GUARD + SIZE:]
    hardening.fuzz_cases()


@PROPS
@given(offsets=st.lists(st.one_of(st.integers(0, 255), st.integers(0, 0xFFFFFFFF)), min_size=1, max_size=8),
       content=st.binary(min_size=256, max_size=256))
def test_a_scif_ring_reads_only_its_own_bytes_whatever_offset_the_peer_publishes(offsets, content):
    """The host's inbound ring (spec 8.3): the card publishes write offsets; the host's reader takes
    messages from inside the ring or raises RingError -- never a byte beside it, never a write to it."""
    buf, mem = guarded()
    mem.write(BASE, content)
    ptrs = BufferMemory(bytearray(8), base=0)
    ring = Ring(mem, BASE, 256, read_ptr=U32Ptr(ptrs, 0), write_ptr=U32Ptr(ptrs, 4), name="inbound")
    before = bytes(buf)
    for off in offsets:
        ptrs.write_u32(4, off)
        try:
            while (data := ring.read(SCIFMSG_SIZE)) is not None:
                assert len(data) == SCIFMSG_SIZE and data in (content + content)
                ring.update_read_ptr()
        except RingError:
            break
    assert bytes(buf) == before
    hardening.fuzz_cases()


@PROPS
@given(data=st.binary(min_size=COSM_MSG_SIZE, max_size=COSM_MSG_SIZE),
       scif=st.binary(min_size=SCIFMSG_SIZE, max_size=SCIFMSG_SIZE))
def test_any_bytes_parse_as_a_message_or_as_the_one_protocol_error(data, scif):
    try:
        CosmMsg.decode(data)
    except CosmProtocolError:
        pass
    try:
        ScifMsg.decode(scif)
    except ScifProtocolError:
        pass
    hardening.fuzz_cases()
