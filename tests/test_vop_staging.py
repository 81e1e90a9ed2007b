"""The staging allocator of a VOP queue: FIFO pieces, out-of-order frees, the newest given back at once."""

import pytest
from hypothesis import given, settings, strategies as st

from micdrv.vop.staging import StagingRing


def test_pieces_are_64_byte_aligned_and_fill_the_area():
    r = StagingRing(1024)
    offs = [r.alloc(100) for _ in range(8)]
    assert offs == [0, 128, 256, 384, 512, 640, 768, 896]
    assert r.alloc(1) is None and r.allocated == 1024


def test_space_comes_back_in_order_and_the_ring_wraps():
    r = StagingRing(1024)
    a, b, c = r.alloc(512), r.alloc(256), r.alloc(128)
    assert r.alloc(256) is None          # 128 left at the end, the start is busy
    r.free(a)
    assert r.alloc(256) == 0             # wrapped to the front; the 128 at the end is skipped
    r.free(b)
    r.free(c)
    assert r.alloc(512) == 256


def test_an_out_of_order_free_waits_for_the_older_pieces():
    r = StagingRing(512)
    a, b = r.alloc(256), r.alloc(256)
    r.free(b)                            # the newest: reclaimed at once
    assert r.alloc(256) == 256
    r2 = StagingRing(768)
    a, b = r2.alloc(256), r2.alloc(256)
    assert r2.alloc(256) == 512          # the ring is full
    r2.free(b)                           # in the middle: not reusable until a goes
    assert r2.alloc(256) is None
    r2.free(a)
    assert r2.alloc(512) == 0


def test_freeing_something_not_allocated_is_refused():
    r = StagingRing(512)
    r.alloc(64)
    with pytest.raises(ValueError):
        r.free(128)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 700), st.integers(0, 1000)), max_size=80))
def test_live_pieces_never_overlap_and_everything_comes_back(ops):
    size = 2048
    r = StagingRing(size)
    live: dict[int, int] = {}
    for is_alloc, n, pick in ops:
        if is_alloc or not live:
            off = r.alloc(n)
            if off is None:
                continue
            length = -(-n // 64) * 64
            assert off % 64 == 0 and off + length <= size
            for o, m in live.items():
                assert off + length <= o or o + m <= off, (off, length, o, m)
            live[off] = length
        else:
            off = sorted(live)[pick % len(live)]
            r.free(off)
            del live[off]
    for off in list(live):
        r.free(off)
    assert r.allocated == 0 and r.alloc(size) == 0


def test_overflow_allocations_keep_to_their_bound_and_leave_the_arena_a_quarter_free():
    from micdrv.pci import DmaArena
    from micdrv.vop.queue import StagingArea
    MiB = 1 << 20
    with DmaArena(16 * MiB) as arena:
        st = StagingArea(arena, 2 * MiB, 0, overflow=6 * MiB)
        got = []
        while (a := st.alloc_own(MiB + 128, extra=True)) is not None:
            got.append(a)
        assert len(got) == 5 and st.own_bytes <= 6 * MiB             # the queue's bound
        st2 = StagingArea(arena, 2 * MiB, 0, overflow=16 * MiB)
        more = []
        while (a := st2.alloc_own(MiB + 128, extra=True)) is not None:
            more.append(a)
        assert arena.free_bytes >= 4 * MiB and len(more) == 2          # the arena's last quarter stays free
        assert st2.alloc_own(MiB, extra=False) is not None             # a first chain may still take it
        for a in got:
            st.free_own(a)
        assert st.own_bytes == 0
