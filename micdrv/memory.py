"""Memory access as an interface: read and write bytes and little-endian words at an address.

STYLE.md (rust-vmm vm-memory): how memory is *reached* is separate from how
it is *supplied*. Protocol code (SCIF queue pairs, COSM, the device page)
only ever calls :class:`Memory`; the daemon implements it over the DmaArena
(host memory, IOVA addresses) and over BAR0 (card memory, card physical
addresses), the simulated card over its GDDR and its SMPT window, tests over
a ``bytearray``.

Every implementation covers one *window* ``[base, base + size)`` of one
address space and refuses any access that does not lie wholly inside it with
:class:`MemoryAccessError`, which names the address, the length and the
window. That check is the one defence against a hostile peer: an address or
offset read from shared memory is only ever used through a window, so the
worst a peer can make us do is raise.

All multi-byte values are little endian (x86-64 on both sides of the link,
spec "Conventions").
"""

from __future__ import annotations

import struct
import sys
from typing import Protocol, runtime_checkable

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_NATIVE_LE = sys.byteorder == "little"


class MemoryAccessError(Exception):
    """An access that does not lie wholly inside a memory window."""

    def __init__(self, addr: int, length: int, base: int, size: int, name: str = "", what: str = "access"):
        self.addr, self.length, self.base, self.size = addr, length, base, size
        where = f"{name} " if name else ""
        super().__init__(f"{what} of [{addr:#x}, +{length:#x}) is outside the {where}memory window "
                         f"[{base:#x}, {base + size:#x})")


@runtime_checkable
class Memory(Protocol):
    """Bytes and little-endian words at addresses of one window of one address space."""

    base: int
    size: int

    def read(self, addr: int, n: int) -> bytes:
        """``n`` bytes at ``addr``."""

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``addr``."""

    def read_u32(self, addr: int) -> int: ...

    def read_u64(self, addr: int) -> int: ...

    def write_u32(self, addr: int, value: int) -> None: ...

    def write_u64(self, addr: int, value: int) -> None: ...

    def view(self, addr: int, n: int) -> memoryview | None:
        """A writable memoryview of ``[addr, +n)`` when the memory is mapped, else None."""

    def window(self, addr: int, n: int, name: str = "") -> "Memory":
        """The sub-window ``[addr, +n)``, same addresses, bounds checked against it from then on."""


class MemoryBase:
    """Bounds checking, word access and sub-windows in terms of :meth:`_read`/:meth:`_write`.

    Subclasses implement ``_read(addr, n)`` and ``_write(addr, data)`` for
    addresses already checked. Addresses stay absolute in every sub-window.
    """

    def __init__(self, base: int, size: int, name: str = ""):
        if base < 0 or size < 0:
            raise ValueError(f"memory window [{base:#x}, +{size:#x}) is invalid")
        self.base = base
        self.size = size
        self.name = name

    def check(self, addr: int, n: int, what: str = "access") -> None:
        """Raise :class:`MemoryAccessError` unless ``[addr, +n)`` lies inside the window."""
        if n < 0 or addr < self.base or addr + n > self.base + self.size:
            raise MemoryAccessError(addr, n, self.base, self.size, self.name, what)

    def contains(self, addr: int, n: int = 1) -> bool:
        return n >= 0 and self.base <= addr and addr + n <= self.base + self.size

    def read(self, addr: int, n: int) -> bytes:
        self.check(addr, n, "read")
        return self._read(addr, n)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.check(addr, len(data), "write")
        self._write(addr, data)

    def read_u32(self, addr: int) -> int:
        self.check(addr, 4, "read")
        return _U32.unpack(self._read(addr, 4))[0]

    def read_u64(self, addr: int) -> int:
        self.check(addr, 8, "read")
        return _U64.unpack(self._read(addr, 8))[0]

    def write_u32(self, addr: int, value: int) -> None:
        self.check(addr, 4, "write")
        self._write(addr, _U32.pack(value))

    def write_u64(self, addr: int, value: int) -> None:
        self.check(addr, 8, "write")
        self._write(addr, _U64.pack(value))

    def read_into(self, addr: int, dst) -> None:
        """``len(dst)`` bytes at ``addr`` into the writable buffer ``dst`` (subclasses may copy once)."""
        dst = memoryview(dst).cast("B")
        self.check(addr, len(dst), "read")
        dst[:] = self._read(addr, len(dst))

    def fill(self, addr: int, n: int, byte: int = 0) -> None:
        self.write(addr, bytes([byte]) * n)

    def view(self, addr: int, n: int) -> memoryview | None:
        self.check(addr, n, "view")
        return None

    def window(self, addr: int, n: int, name: str = "") -> "Memory":
        self.check(addr, n, "window")
        return SubWindow(self, addr, n, name or self.name)

    def _read(self, addr: int, n: int) -> bytes:
        raise NotImplementedError

    def _write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name or ''}[{self.base:#x}, {self.base + self.size:#x})>"


class SubWindow(MemoryBase):
    """A narrower window onto another :class:`Memory` (its checks apply too)."""

    def __init__(self, parent: Memory, base: int, size: int, name: str = ""):
        super().__init__(base, size, name)
        self.parent = parent

    def _read(self, addr: int, n: int) -> bytes:
        return self.parent.read(addr, n)

    def _write(self, addr: int, data) -> None:
        self.parent.write(addr, data)

    # Words go through the parent's own word accessors: a register-like
    # implementation may need a single 32-bit access, not four bytes.
    def read_u32(self, addr: int) -> int:
        self.check(addr, 4, "read")
        return self.parent.read_u32(addr)

    def read_u64(self, addr: int) -> int:
        self.check(addr, 8, "read")
        return self.parent.read_u64(addr)

    def write_u32(self, addr: int, value: int) -> None:
        self.check(addr, 4, "write")
        self.parent.write_u32(addr, value)

    def write_u64(self, addr: int, value: int) -> None:
        self.check(addr, 8, "write")
        self.parent.write_u64(addr, value)

    def view(self, addr: int, n: int) -> memoryview | None:
        self.check(addr, n, "view")
        return self.parent.view(addr, n)


class BufferMemory(MemoryBase):
    """Memory over a bytearray, mmap or memoryview whose first byte is at address ``base``.

    Aligned 32- and 64-bit accesses are single loads and stores through a
    cast memoryview, so a peer in another process sharing the pages (the
    DmaArena's memfd) never sees a torn ring pointer.
    """

    def __init__(self, buf, base: int = 0, name: str = ""):
        mv = memoryview(buf)
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if mv.readonly:
            raise ValueError("BufferMemory needs a writable buffer")
        super().__init__(base, len(mv), name)
        self._mv = mv
        self._w32 = mv[:len(mv) & ~3].cast("I") if _NATIVE_LE else None
        self._w64 = mv[:len(mv) & ~7].cast("Q") if _NATIVE_LE else None

    def _read(self, addr: int, n: int) -> bytes:
        off = addr - self.base
        return bytes(self._mv[off:off + n])

    def _write(self, addr: int, data) -> None:
        off = addr - self.base
        self._mv[off:off + len(data)] = data

    def read_u32(self, addr: int) -> int:
        self.check(addr, 4, "read")
        off = addr - self.base
        if self._w32 is not None and not off & 3:
            return self._w32[off >> 2]
        return _U32.unpack_from(self._mv, off)[0]

    def read_u64(self, addr: int) -> int:
        self.check(addr, 8, "read")
        off = addr - self.base
        if self._w64 is not None and not off & 7:
            return self._w64[off >> 3]
        return _U64.unpack_from(self._mv, off)[0]

    def write_u32(self, addr: int, value: int) -> None:
        self.check(addr, 4, "write")
        off = addr - self.base
        if self._w32 is not None and not off & 3:
            self._w32[off >> 2] = value
        else:
            _U32.pack_into(self._mv, off, value)

    def write_u64(self, addr: int, value: int) -> None:
        self.check(addr, 8, "write")
        off = addr - self.base
        if self._w64 is not None and not off & 7:
            self._w64[off >> 3] = value
        else:
            _U64.pack_into(self._mv, off, value)

    def view(self, addr: int, n: int) -> memoryview:
        self.check(addr, n, "view")
        off = addr - self.base
        return self._mv[off:off + n]

    def window(self, addr: int, n: int, name: str = "") -> "BufferMemory":
        self.check(addr, n, "window")
        off = addr - self.base
        return BufferMemory(self._mv[off:off + n], base=addr, name=name or self.name)

    def release(self) -> None:
        """Drop the memoryviews so the underlying mmap can be closed."""
        for v in (self._w32, self._w64, self._mv):
            if v is not None:
                v.release()
