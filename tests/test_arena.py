"""DmaArena: memfd-backed, mmapped once, carved into aligned allocations."""

import mmap
import os

import pytest

from micdrv.pci import DmaArena, DmaMapError


@pytest.fixture
def arena():
    with DmaArena(1 << 20) as a:
        yield a


def test_allocations_honour_cacheline_and_page_alignment(arena):
    a = arena.alloc(10)
    b = arena.alloc(100, align=4096)
    c = arena.alloc(1)
    assert a.offset % 64 == 0 and a.size == 64
    assert b.offset % 4096 == 0 and b.size == 128
    assert c.offset % 64 == 0
    spans = sorted((x.offset, x.end) for x in (a, b, c))
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), "allocations overlap"


def test_freed_space_coalesces_back_to_one_block(arena):
    allocs = [arena.alloc(4096, align=4096) for _ in range(16)]
    for x in allocs[::2] + allocs[1::2]:
        arena.free(x)
    assert arena.free_bytes == arena.size
    big = arena.alloc(arena.size)  # only possible if every hole merged
    assert big.offset == 0


def test_double_free_is_refused(arena):
    x = arena.alloc(64)
    arena.free(x)
    with pytest.raises(ValueError, match="double free"):
        arena.free(x)


def test_exhaustion_raises_memoryerror(arena):
    arena.alloc(arena.size)
    with pytest.raises(MemoryError):
        arena.alloc(64)


def test_memfd_is_the_same_memory_another_mapping_sees(arena):
    x = arena.alloc(4096, align=4096)
    arena.buf(x)[:5] = b"hello"
    other = mmap.mmap(arena.fd, arena.size, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        assert other[x.offset:x.offset + 5] == b"hello"
    finally:
        other.close()
    assert os.fstat(arena.fd).st_size == arena.size


def test_slices_outside_the_arena_are_refused(arena):
    with pytest.raises(DmaMapError):
        arena.slice(arena.size - 8, 16)
    with pytest.raises(DmaMapError):
        arena.slice(-1, 4)


def test_iova_translation_needs_a_mapping_and_stays_inside(arena):
    from micdrv.pci import PciError
    with pytest.raises(PciError, match="not DMA-mapped"):
        arena.iova(0)
