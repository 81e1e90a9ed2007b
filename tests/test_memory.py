"""The memory-access interface: bounds-checked windows, little-endian words."""

import mmap

import pytest

from micdrv.memory import BufferMemory, Memory, MemoryAccessError, MemoryBase


def test_words_are_little_endian_at_any_alignment():
    mem = BufferMemory(bytearray(32), base=0x1000)
    mem.write_u32(0x1000, 0x11223344)
    mem.write_u64(0x1009, 0x0102030405060708)  # unaligned
    assert mem.read(0x1000, 4) == bytes([0x44, 0x33, 0x22, 0x11])
    assert mem.read_u64(0x1009) == 0x0102030405060708
    assert mem.read(0x1009, 1) == b"\x08"
    assert isinstance(mem, Memory)


@pytest.mark.parametrize("op", [
    lambda m: m.read(0x0FFF, 1),
    lambda m: m.read(0x1000, 17),
    lambda m: m.read_u32(0x100D),
    lambda m: m.write_u64(0x100C, 0),
    lambda m: m.write(0x1010, b"x"),
    lambda m: m.view(0x1008, 9),
    lambda m: m.window(0x1008, 9),
    lambda m: m.read(0x1000, -1),
])
def test_nothing_outside_the_window_is_reachable(op):
    with pytest.raises(MemoryAccessError):
        op(BufferMemory(bytearray(16), base=0x1000, name="ring"))


def test_the_error_names_address_length_and_window():
    mem = BufferMemory(bytearray(0x100), base=0x80_0000_0000, name="SMPT window")
    with pytest.raises(MemoryAccessError) as e:
        mem.write(0x80_0000_00F0, bytes(0x20))
    assert str(e.value) == ("write of [0x80000000f0, +0x20) is outside the SMPT window memory window "
                            "[0x8000000000, 0x8000000100)")
    assert (e.value.addr, e.value.length) == (0x80_0000_00F0, 0x20)


def test_a_sub_window_keeps_absolute_addresses_and_its_own_bounds():
    mem = BufferMemory(bytearray(64), base=0x100)
    win = mem.window(0x110, 16, "qp")
    win.write_u32(0x110, 7)
    assert mem.read_u32(0x110) == 7
    with pytest.raises(MemoryAccessError, match="qp"):
        win.read_u32(0x120)
    v = win.view(0x114, 4)
    v[:] = b"abcd"
    assert mem.read(0x114, 4) == b"abcd"


def test_a_generic_window_over_non_mapped_memory_has_no_view():
    class Trapped(MemoryBase):  # like a BAR reached only by messages
        def __init__(self):
            super().__init__(0, 16, "bar")
            self.buf = bytearray(16)

        def _read(self, addr, n):
            return bytes(self.buf[addr:addr + n])

        def _write(self, addr, data):
            self.buf[addr:addr + len(data)] = data

    t = Trapped()
    w = t.window(8, 8)
    w.write_u64(8, 0xDEADBEEF)
    assert t.read_u64(8) == 0xDEADBEEF and w.view(8, 8) is None
    with pytest.raises(MemoryAccessError):
        w.write_u32(4, 1)


def test_buffer_memory_over_an_mmap_can_be_released():
    mm = mmap.mmap(-1, 4096)
    mem = BufferMemory(mm)
    mem.write_u64(8, 42)
    assert mem.read_u64(8) == 42
    mem.release()
    mm.close()


def test_read_only_buffers_are_refused():
    with pytest.raises(ValueError):
        BufferMemory(b"constant")
