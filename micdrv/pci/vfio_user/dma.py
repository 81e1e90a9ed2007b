"""DMA for a device model: the client's memory, as it mapped it with DMA_MAP.

The client makes its memory reachable at IOVAs with DMA_MAP (spec 2.5),
normally passing the memfd behind it so the server maps the very same pages
(spec 2.6): then :meth:`DmaSpace.view` hands the model a zero-copy
memoryview and :meth:`DmaSpace.read`/:meth:`DmaSpace.write` are plain copies.
A mapping that came without an fd is reached by DMA_READ/DMA_WRITE messages
to the client instead (spec 2.1 "in-band fallback"), in pieces of at most the
client's ``max_data_xfer_size`` (spec 2.4); data starts at payload offset 16
as in the spec and libvfio-user, not QEMU's 12 (spec 2.8-1).

Rules (spec 2.5): a map over an existing range fails with EEXIST; an unmap
must match one map exactly, or carry flag ALL (2) with address = size = 0;
the fd's size (fstat) must cover ``offset + size``. An access that is not
entirely inside one mapping, or that the mapping's READ/WRITE flags forbid,
raises :class:`DmaFault` -- the model's card-side fault; it never reaches
memory outside a mapping. On client disconnect everything is unmapped
(spec 2.6).

A memoryview from :meth:`DmaSpace.view` must not outlive the operation that
took it: after an unmap the pages stay mapped while a view lives (no crash),
but they may then belong to something else in the client.
"""

from __future__ import annotations

import bisect
import errno as _errno
import mmap
import os
import stat
import threading
from dataclasses import dataclass

from ..errors import VfioUserError
from .protocol import (DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE,
                       DMA_READ, DMA_WRITE, CommandError, Connection, dma_rw)


class DmaFault(VfioUserError):
    """A device DMA outside the client's mappings (or against their permissions)."""

    def __init__(self, iova: int, length: int, write: bool, detail: str):
        self.iova, self.length, self.write = iova, length, write
        super().__init__(f"device DMA {'write' if write else 'read'} of [{iova:#x}, +{length:#x})", detail,
                         errno=_errno.EFAULT)


@dataclass
class DmaRegion:
    """One DMA_MAP: ``size`` bytes at ``iova``; ``mm`` is the shared mapping (None: messages only).

    ``view`` is a memoryview of all of ``mm``, made once: :meth:`DmaSpace.fast_view` slices it. It is
    released at unmap, before ``mm`` is closed; a slice still alive then keeps the pages mapped.
    """

    iova: int
    size: int
    flags: int
    mm: mmap.mmap | None
    view: memoryview | None = None

    def __post_init__(self) -> None:
        if self.mm is not None and self.view is None:
            self.view = memoryview(self.mm)

    @property
    def end(self) -> int:
        return self.iova + self.size

    @property
    def readable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & DMA_MAP_FLAG_WRITE)


class DmaSpace:
    """The client's DMA mappings as the server sees them, and the model's access to them."""

    def __init__(self, *, max_maps: int = DEFAULT_MAX_DMA_MAPS, pgsize: int = mmap.PAGESIZE):
        self._lock = threading.Lock()
        self._starts: list[int] = []  # sorted IOVAs, parallel to _maps
        self._maps: list[DmaRegion] = []
        self.max_maps = max_maps
        self.pgsize = pgsize
        self._conn: Connection | None = None
        self._xfer = DEFAULT_MAX_DATA_XFER_SIZE
        self.faults = 0
        self.message_bytes = 0  # bytes moved by DMA_READ/WRITE messages rather than shared memory
        #: The mapping the last view() found: a device keeps touching the same
        #: one (micdrv's arena is a single DMA_MAP), so fast_view() answers from
        #: it without the lock and the search. Set to None by every unmap, so a
        #: model may cache what it derived from it while it stays the same object.
        self.last_region: DmaRegion | None = None

    def attach(self, conn: Connection | None, max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE) -> None:
        """Use ``conn`` for DMA_READ/WRITE (None while no client is connected)."""
        self._conn = conn
        self._xfer = max_data_xfer_size

    @property
    def mappings(self) -> list[DmaRegion]:
        with self._lock:
            return list(self._maps)

    # --- DMA_MAP / DMA_UNMAP (spec 2.5) ---------------------------------------------
    def map(self, iova: int, size: int, offset: int, flags: int, fd: int | None) -> None:
        """Add a mapping; with ``fd``, map its ``[offset, +size)`` shared. The caller keeps ``fd``."""
        if flags & ~(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE):
            raise CommandError(_errno.EINVAL, f"DMA_MAP flags {flags:#x}")
        if size <= 0 or iova + size > 1 << 64 or iova % self.pgsize or size % self.pgsize:
            raise CommandError(_errno.EINVAL, f"DMA_MAP [{iova:#x}, +{size:#x}) is empty, unaligned or wraps")
        mm = None
        if fd is not None:
            if offset % mmap.ALLOCATIONGRANULARITY:
                raise CommandError(_errno.EINVAL, f"DMA_MAP file offset {offset:#x} is not page-aligned")
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)) or offset + size > st.st_size:
                raise CommandError(_errno.EINVAL, f"DMA_MAP [{offset:#x}, +{size:#x}) beyond the {st.st_size:#x}-byte fd")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if flags & DMA_MAP_FLAG_WRITE else 0)
            try:
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
            except OSError as e:
                raise CommandError(e.errno or _errno.EINVAL, f"mmap of the DMA fd: {e}") from None
        elif offset:
            raise CommandError(_errno.EINVAL, "DMA_MAP without an fd must have offset 0")
        region = DmaRegion(iova, size, flags, mm)
        with self._lock:
            i = bisect.bisect_left(self._starts, iova)
            if i > 0 and self._maps[i - 1].end > iova or i < len(self._maps) and self._maps[i].iova < iova + size:
                err = CommandError(_errno.EEXIST, f"DMA_MAP [{iova:#x}, +{size:#x}) overlaps a mapping")
            elif len(self._maps) >= self.max_maps:
                err = CommandError(_errno.ENOSPC, f"already {self.max_maps} DMA mappings")
            else:
                self._starts.insert(i, iova)
                self._maps.insert(i, region)
                return
        _release(region)
        raise err

    def unmap(self, iova: int, size: int) -> None:
        """Remove the mapping that is exactly [iova, +size)."""
        with self._lock:
            i = bisect.bisect_left(self._starts, iova)
            if i == len(self._maps) or self._maps[i].iova != iova or self._maps[i].size != size:
                raise CommandError(_errno.EINVAL, f"DMA_UNMAP [{iova:#x}, +{size:#x}) matches no mapping")
            del self._starts[i]
            region = self._maps.pop(i)
            self.last_region = None
        _release(region)

    def unmap_all(self) -> None:
        with self._lock:
            maps, self._maps, self._starts = self._maps, [], []
            self.last_region = None
        for region in maps:
            _release(region)

    # --- the model's access ---------------------------------------------------------------
    def _find(self, iova: int, length: int, write: bool) -> DmaRegion:
        with self._lock:
            i = bisect.bisect_right(self._starts, iova) - 1
            region = self._maps[i] if i >= 0 else None
        if region is None or iova < region.iova or iova + length > region.end or length < 0:
            self.faults += 1
            raise DmaFault(iova, length, write, "not entirely inside one DMA mapping")
        if write and not region.writable or not write and not region.readable:
            self.faults += 1
            raise DmaFault(iova, length, write, f"mapping at {region.iova:#x} is not "
                                                f"{'writable' if write else 'readable'}")
        return region

    def view(self, iova: int, length: int, *, write: bool = False) -> memoryview:
        """Zero-copy view of [iova, +length) (read-only unless the mapping is writable).

        Only for mappings that came with an fd; raises :class:`DmaFault` otherwise.
        """
        region = self._find(iova, length, write)
        if region.mm is None:
            raise DmaFault(iova, length, write, "mapping has no shared memory (no fd in DMA_MAP): use read/write")
        off = iova - region.iova
        try:
            view = region.view[off:off + length]
        except ValueError:  # unmapped by the client meanwhile
            raise DmaFault(iova, length, write, "mapping was removed") from None
        self.last_region = region
        return view

    def fast_view(self, iova: int, length: int, write: bool = False) -> memoryview | None:
        """:meth:`view` when [iova, +length) lies in the mapping the last view found, else None.

        None is no verdict: the caller then asks :meth:`view`, which checks
        and counts faults. Allowed access only, as :meth:`view`.
        """
        region = self.last_region
        if region is None:
            return None
        off = iova - region.iova
        if off < 0 or off + length > region.size or length <= 0 or \
                not region.flags & (DMA_MAP_FLAG_WRITE if write else DMA_MAP_FLAG_READ):
            return None
        try:
            return region.view[off:off + length]
        except (ValueError, TypeError):  # unmapped meanwhile (released, or never shared): the slow path says so
            return None

    def read(self, iova: int, length: int) -> bytes:
        """Device reads host memory."""
        region = self._find(iova, length, False)
        if region.mm is not None:
            off = iova - region.iova
            try:
                return region.mm[off:off + length]
            except ValueError:  # unmapped by the client meanwhile
                raise DmaFault(iova, length, False, "mapping was removed") from None
        return self._message_read(iova, length)

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Device writes host memory."""
        region = self._find(iova, len(data), True)
        if region.mm is not None:
            off = iova - region.iova
            try:
                region.mm[off:off + len(data)] = data
            except ValueError:
                raise DmaFault(iova, len(data), True, "mapping was removed") from None
            return
        self._message_write(iova, memoryview(data).cast("B"))

    def _peer(self, iova: int, length: int, write: bool) -> Connection:
        conn = self._conn
        if conn is None:
            raise DmaFault(iova, length, write, "no client connected")
        return conn

    def _message_read(self, iova: int, length: int) -> bytes:
        out = []
        pos = 0
        while pos < length:
            n = min(length - pos, self._xfer)
            try:
                reply = self._peer(iova, length, False).call(DMA_READ, dma_rw.pack(iova + pos, n))
            except VfioUserError as e:
                if e.errno == _errno.EFAULT:
                    self.faults += 1
                    raise DmaFault(iova, length, False, f"the client refused: {e}") from None
                raise
            p = reply.payload
            if len(p) != dma_rw.size + n or dma_rw.unpack_from(p) != (iova + pos, n):
                raise DmaFault(iova, length, False, f"malformed DMA_READ reply of {len(p)} bytes")
            out.append(bytes(memoryview(p)[dma_rw.size:]))
            pos += n
        self.message_bytes += length
        return b"".join(out)

    def _message_write(self, iova: int, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, self._xfer)
            try:
                # The reply is checked for errors only: QEMU answers with the header alone (spec 2.5).
                self._peer(iova, len(data), True).call(DMA_WRITE, dma_rw.pack(iova + pos, n) + data[pos:pos + n])
            except VfioUserError as e:
                if e.errno == _errno.EFAULT:
                    self.faults += 1
                    raise DmaFault(iova, len(data), True, f"the client refused: {e}") from None
                raise
            pos += n
        self.message_bytes += len(data)


def _release(region: DmaRegion) -> None:
    if region.view is not None:
        region.view.release()  # slices of it stay valid: they hold the mapping themselves
    if region.mm is not None:
        try:
            region.mm.close()
        except BufferError:
            pass  # a model view still holds the pages; they go when it is released
