"""The Memory windows over the DmaArena (by IOVA) and over BAR0 (by card physical address)."""

import pytest

from micdrv.memory import Memory, MemoryAccessError
from micdrv.pci import BAR0, DmaArena, PciError
from micdrv.x100.mmio import ApertureRegionMemory

IOVA = 0x1_0000_0000


class FakeDev:
    """Just the PciDevice calls ApertureRegionMemory makes, over a bytearray, recording their sizes."""

    def __init__(self, size):
        self.mem = bytearray(size)
        self.calls = []

    def read_bytes(self, region, off, n):
        assert region == BAR0
        self.calls.append(("read_bytes", off, n))
        return bytes(self.mem[off:off + n])

    def write_bytes(self, region, off, data, posted=False):
        self.calls.append(("write_bytes", off, len(data)))
        self.mem[off:off + len(data)] = data

    def read(self, region, off, size):
        self.calls.append(("read", off, size))
        return int.from_bytes(self.mem[off:off + size], "little")

    def write(self, region, off, size, value, posted=True):
        self.calls.append(("write", off, size))
        self.mem[off:off + size] = value.to_bytes(size, "little")


class FakeMappedDevice:
    def dma_map(self, backing, iova, size, offset):
        pass

    closed = False

    def dma_unmap(self, iova, size):
        pass


def test_the_arena_memory_is_addressed_by_iova_and_shares_the_arena_pages():
    with DmaArena(1 << 20) as arena:
        with pytest.raises(PciError):
            arena.memory()  # not mapped: no IOVA yet
        arena.map(FakeMappedDevice(), IOVA)
        mem = arena.memory()
        assert isinstance(mem, Memory) and (mem.base, mem.size) == (IOVA, 1 << 20)
        a = arena.alloc(4096)
        mem.write_u64(arena.iova(a), 0x1122334455667788)
        assert bytes(arena.buf(a)[:8]) == (0x1122334455667788).to_bytes(8, "little")
        with pytest.raises(MemoryAccessError):
            mem.read(IOVA - 8, 16)
        with pytest.raises(MemoryAccessError):
            mem.read(IOVA + (1 << 20) - 4, 8)
        assert arena.memory() is mem  # one accessor per mapping


def test_bar0_without_a_mapping_uses_one_sized_access_per_aligned_word():
    dev = FakeDev(0x10000)
    mem = ApertureRegionMemory(dev, 0x10000)
    mem.write_u32(0x100, 0xDEADBEEF)
    mem.write_u64(0x108, 0x0102030405060708)
    assert mem.read_u32(0x100) == 0xDEADBEEF and mem.read_u64(0x108) == 0x0102030405060708
    assert dev.calls == [("write", 0x100, 4), ("write", 0x108, 8), ("read", 0x100, 4), ("read", 0x108, 8)]
    mem.write_u32(0x201, 7)  # unaligned: bytes
    assert mem.read_u32(0x201) == 7 and dev.calls[-1] == ("read_bytes", 0x201, 4)
    mem.write(0x300, b"card bytes")
    assert mem.read(0x300, 10) == b"card bytes"
    for bad in (lambda: mem.read(0xFFFC, 8), lambda: mem.write_u32(0x10000, 0), lambda: mem.window(0x8000, 0x9000)):
        with pytest.raises(MemoryAccessError):
            bad()
