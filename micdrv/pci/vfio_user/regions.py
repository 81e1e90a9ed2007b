"""Regions of a device model: what REGION_READ/WRITE and GET_REGION_INFO act on.

A VFIO region (spec 1.3: BAR0-5 = 0-5, ROM = 6, config = 7, VGA = 8) is a
byte range the client reads and writes at offsets (REGION_READ/WRITE, spec
2.5) and, when it is backed by memory, may mmap through an fd sent with the
GET_REGION_INFO reply (spec 2.6). Three kinds:

* :class:`TrappedRegion` -- registers: every access calls the model
  (``read(offset, size) -> bytes | int``, ``write(offset, data)``), like MMIO
  that traps;
* :class:`MemoryRegion` -- memory in a memfd, mmap-able by the client, whole
  or only in *sparse areas* (spec 1.5). REGION_READ/WRITE act on the same
  memory the client sees through its mmap; offsets outside the sparse areas
  may instead trap to callbacks (e.g. an MSI-X table in the middle of a BAR).
  The model sees the memory as :attr:`MemoryRegion.mem`; nothing notifies it
  of client writes through the mmap (spec 2.6: the server polls);
* :class:`ConfigRegion` -- region 7 over a
  :class:`~.config_space.ConfigSpace`.

Each region has its own fd, so the region ``offset`` in GET_REGION_INFO is 0.
Callbacks raise :class:`~.protocol.CommandError` to fail an access with an
errno; anything else is logged and answered with EIO.
"""

from __future__ import annotations

import mmap
import os
from typing import Callable

from ..device import REGION_MMAP, REGION_READ, REGION_WRITE, RegionInfo, SparseArea
from .config_space import ConfigSpace

ReadFn = Callable[[int, int], "bytes | bytearray | int"]
WriteFn = Callable[[int, bytes], None]


class Region:
    """Base of every region: a size, flags and the two accesses."""

    size: int = 0
    flags: int = 0
    fd: int | None = None  # the fd sent with GET_REGION_INFO when mmap-able
    sparse: tuple[SparseArea, ...] | None = None

    def read(self, offset: int, count: int) -> bytes:
        raise NotImplementedError

    def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def info(self, index: int) -> RegionInfo:
        return RegionInfo(index=index, flags=self.flags, size=self.size, offset=0, sparse=self.sparse)

    def close(self) -> None:
        pass


def _as_bytes(value, count: int) -> bytes:
    if isinstance(value, int):
        return value.to_bytes(count, "little")
    value = bytes(value)
    if len(value) != count:
        raise ValueError(f"region read callback returned {len(value)} bytes for a {count}-byte read")
    return value


class TrappedRegion(Region):
    """Registers: ``read(offset, size)`` returns bytes or an int; ``write(offset, data)``.

    Accesses arrive at any size up to ``max_data_xfer_size``; a model that
    only accepts 1/2/4/8-byte aligned accesses checks that itself.
    """

    def __init__(self, size: int, read: ReadFn | None = None, write: WriteFn | None = None):
        self.size = size
        self._read = read
        self._write = write
        self.flags = (REGION_READ if read else 0) | (REGION_WRITE if write else 0)

    def read(self, offset: int, count: int) -> bytes:
        return _as_bytes(self._read(offset, count), count)

    def write(self, offset: int, data: bytes) -> None:
        self._write(offset, data)


class ConfigRegion(TrappedRegion):
    """Region 7: config space through its write masks."""

    def __init__(self, config: ConfigSpace):
        super().__init__(config.size, config.read, config.write)


class MemoryRegion(Region):
    """Memory in a memfd, mmap-able by the client (whole, or the ``sparse`` areas only).

    ``read``/``write`` callbacks, if given, handle REGION_READ/WRITE outside
    the sparse areas; without them those bytes are plain memory too.
    """

    def __init__(self, size: int, *, sparse: list[tuple[int, int]] | None = None, name: str = "vfio-user-region",
                 read: ReadFn | None = None, write: WriteFn | None = None, writable: bool = True):
        page = mmap.PAGESIZE
        if size <= 0 or size % page:
            raise ValueError(f"memory region size {size:#x} must be a positive multiple of {page:#x}")
        if sparse is not None:
            areas = sorted(sparse)
            for i, (off, length) in enumerate(areas):
                if off % page or length % page or length <= 0 or off + length > size or \
                        i and areas[i - 1][0] + areas[i - 1][1] > off:
                    raise ValueError(f"sparse area [{off:#x}, +{length:#x}) is unaligned, overlapping or too big")
            self.sparse = tuple(SparseArea(o, s) for o, s in areas)
        self.size = size
        self.flags = REGION_READ | REGION_MMAP | (REGION_WRITE if writable else 0)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        #: The model's view of the region's memory (the same pages the client mmaps).
        self.mem = memoryview(self._mm)
        self._trap_read = read
        self._trap_write = write

    def _pieces(self, offset: int, count: int):
        """Split [offset, +count) into (start, length, in_mmap_area) pieces."""
        if self.sparse is None or (self._trap_read is None and self._trap_write is None):
            yield offset, count, True
            return
        pos, end = offset, offset + count
        while pos < end:
            inside = None
            nxt = end
            for a in self.sparse:
                if a.offset <= pos < a.offset + a.size:
                    inside, nxt = True, min(end, a.offset + a.size)
                    break
                if pos < a.offset:
                    nxt = min(nxt, a.offset)
            yield pos, nxt - pos, bool(inside)
            pos = nxt

    def read(self, offset: int, count: int) -> bytes:
        out = []
        for start, length, mem in self._pieces(offset, count):
            if mem or self._trap_read is None:
                out.append(bytes(self.mem[start:start + length]))
            else:
                out.append(_as_bytes(self._trap_read(start, length), length))
        return out[0] if len(out) == 1 else b"".join(out)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        for start, length, mem in self._pieces(offset, len(data)):
            piece = view[start - offset:start - offset + length]
            if mem or self._trap_write is None:
                self.mem[start:start + length] = piece
            else:
                self._trap_write(start, bytes(piece))

    def close(self) -> None:
        self.mem.release()
        try:
            self._mm.close()
        except BufferError:
            pass  # the model still holds a slice; the pages go with it
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
