"""Reaching one part of a ring (descriptor table, avail, used) in some memory, and the barriers between parts.

Each part of a split ring may live in a different memory (on MIC: desc and
avail in host memory, used in card memory after the card's handshake,
x100-host-abi.md 5.4/5.5). :func:`ring_part` checks once that the part lies
inside its :class:`~micdrv.memory.Memory` window and is aligned (section
1.1: desc 16, avail 2, used 4), then gives 16-bit loads and stores and
struct packing at offsets *inside the part*. When the memory is mapped the
part is a memoryview slice (nothing outside it is reachable, and an aligned
16-bit index is one load or store, so the peer never sees half an index);
otherwise every access goes through the memory's own bounds-checked
``read``/``write``.

Barriers (virtio-legacy.md 1.5). CPython executes one bytecode at a time
and on x86 loads are not reordered with loads nor stores with stores, so
the read and write barriers of steps 1 and 2 are program order. Steps 3
and 4 are store-then-load and need a full fence when the peer runs
concurrently in another thread or process: :func:`full_barrier` takes and
drops an uncontended lock, which in CPython is a locked read-modify-write
instruction (glibc ``sem_trywait``/``sem_post``), a full fence on x86 [INF:
CPython and glibc implementation detail; both sides of a MIC link are x86].
"""

from __future__ import annotations

import struct
import threading

from ..memory import Memory, MemoryAccessError
from .ring import VringError

_U16 = struct.Struct("<H")
_fence = threading.Lock()


def full_barrier() -> None:
    """A full memory fence (see the module docstring for why a lock is one)."""
    _fence.acquire()
    _fence.release()


class _ViewPart:
    """A ring part reached through a memoryview of mapped memory."""

    __slots__ = ("name", "addr", "size", "mv", "_h", "words")

    def __init__(self, mv: memoryview, addr: int, size: int, name: str):
        self.name, self.addr, self.size, self.mv = name, addr, size, mv
        self._h = mv.cast("H")  # parts are even-sized and 2-aligned: idx/flags/ring entries are single stores
        self.words = self._h    # the part as 16-bit words (word i at offset 2 i), for a hot loop to index itself

    def u16(self, off: int) -> int:
        return self._h[off >> 1]

    def set_u16(self, off: int, value: int) -> None:
        self._h[off >> 1] = value

    def unpack(self, st: struct.Struct, off: int) -> tuple:
        return st.unpack_from(self.mv, off)

    def pack(self, st: struct.Struct, off: int, *values) -> None:
        st.pack_into(self.mv, off, *values)

    def read(self, off: int, n: int) -> bytes:
        return bytes(self.mv[off:off + n])

    def write(self, off: int, data) -> None:
        self.mv[off:off + len(data)] = data

    def zero(self) -> None:
        self.mv[:] = bytes(self.size)


class _MemPart:
    """A ring part reached only through a Memory's read/write (e.g. a BAR that is not mmapped)."""

    __slots__ = ("name", "addr", "size", "mem")

    def __init__(self, mem: Memory, addr: int, size: int, name: str):
        self.name, self.addr, self.size, self.mem = name, addr, size, mem

    def u16(self, off: int) -> int:
        return _U16.unpack(self.mem.read(self.addr + off, 2))[0]

    def set_u16(self, off: int, value: int) -> None:
        self.mem.write(self.addr + off, _U16.pack(value))

    def unpack(self, st: struct.Struct, off: int) -> tuple:
        return st.unpack(self.mem.read(self.addr + off, st.size))

    def pack(self, st: struct.Struct, off: int, *values) -> None:
        self.mem.write(self.addr + off, st.pack(*values))

    def read(self, off: int, n: int) -> bytes:
        return self.mem.read(self.addr + off, n)

    def write(self, off: int, data) -> None:
        self.mem.write(self.addr + off, data)

    def zero(self) -> None:
        self.mem.write(self.addr, bytes(self.size))


RingPart = _ViewPart | _MemPart


def ring_part(mem: Memory, addr: int, size: int, align: int, name: str) -> RingPart:
    """The part ``[addr, +size)`` of ``mem``, checked for alignment and bounds (section 6.3 check 1)."""
    if addr % align:
        raise VringError(f"{name} at {addr:#x} is not {align}-byte aligned")
    try:
        mem.window(addr, size)
        mv = mem.view(addr, size)
    except MemoryAccessError as e:
        raise VringError(f"{name} at {addr:#x} (+{size:#x}) does not lie in memory: {e}") from None
    if mv is not None:
        return _ViewPart(mv, addr, size, name)
    return _MemPart(mem, addr, size, name)
