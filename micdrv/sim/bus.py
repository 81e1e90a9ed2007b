"""The card's physical address space: what card software and the DMA engine read and write (spec 9).

=================================  =============================================
card physical range                what
=================================  =============================================
0 .. memory size - 1               GDDR: the BAR0 memfd; card address X is BAR0
                                   offset X (spec 1.2)
0x08_007C_0000, 128 KiB            the register file, same offsets as BAR4
                                   (spec 2.3 "card-side view"); dword access only
0x80_0000_0000 .. 0xFF_FFFF_FFFF   host memory through the 32 SMPT entries
                                   (spec 2.4) onto the client's DMA maps
anything else                      nothing: a card-side fault
=================================  =============================================

Every access is checked. An access that leaves card memory, touches the
register window as memory, hits an address with nothing behind it, or whose
SMPT translation lands outside the client's DMA maps (or against their
read/write permissions) is a *card-side fault*: counted, logged, remembered
in :attr:`CardBus.recent_faults`, and raised as :class:`CardFault` for the
caller (card OS, DMA channel) to handle. Nothing outside a mapping is ever
touched and the simulator never dies of it.

Host memory is reached zero-copy through the memfds the client passed with
DMA_MAP (:meth:`micdrv.pci.vfio_user.DmaSpace.view`); a DMA map without an
fd is a fault here too (the micdrv client always shares its arena's fd).
Large copies (:meth:`CardBus.copy`) run in ``memmove`` with the GIL released
so DMA channels copy in parallel.

Card software API (used by the card OS and the DMA engine)::

    bus.read(addr, n) -> bytes          bus.write(addr, data)
    bus.read32/64(addr) -> int          bus.write32/64(addr, value)
    bus.view(addr, n, write=False)      zero-copy memoryview of one piece; release() it
    bus.copy(dst, src, n)               memory to memory, any of GDDR / host
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from typing import Callable

from micdrv.pci.vfio_user import DmaFault, DmaSpace
from micdrv.pci.vfio_user.wire import DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE
from micdrv.x100 import regs

from .registers import RegisterFile
from .smpt import Smpt

log = logging.getLogger(__name__)

SYSTEM_WINDOW = regs.SYSTEM_WINDOW
SYSTEM_WINDOW_SIZE = regs.SYSTEM_WINDOW_END - regs.SYSTEM_WINDOW
SMPT_PAGE_SHIFT = regs.SMPT_PAGE_SHIFT
SMPT_PAGE_SIZE = regs.SMPT_PAGE_SIZE
SMPT_PAGE_MASK = SMPT_PAGE_SIZE - 1
smpt_host_page = regs.smpt_host_page
MMIO_WINDOW = regs.CARD_MMIO_BASE
MMIO_WINDOW_END = MMIO_WINDOW + regs.MMIO_SIZE
GIL_FREE_COPY = 32 << 10  # from this size copies go through memmove with the GIL released
_MAP_READ, _MAP_WRITE = DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE
RECENT_FAULTS = 64  # how many fault descriptions to keep for the control socket


class CardFault(Exception):
    """A card access with nothing (allowed) behind it."""

    def __init__(self, addr: int, length: int, write: bool, detail: str):
        self.addr, self.length, self.write, self.detail = addr, length, write, detail
        super().__init__(f"card {'write' if write else 'read'} of [{addr:#x}, +{length:#x}): {detail}")


def copy_view(dst: memoryview, src: memoryview, release_gil: bool = True) -> None:
    """dst[:] = src; large copies without holding the GIL unless ``release_gil`` is False.

    Releasing the GIL lets the simulator's other threads run on the other
    core during the copy, for ctypes' 1-2 microseconds, and lets DMA channels
    copy in parallel. It has a price: the copying thread must win the GIL
    back, and behind a thread busy in Python that takes up to a switch
    interval (5 ms) -- a 64 KiB copy loop beside a spinning thread fell from
    ~200 k to ~2 k copies a second. So only writable buffers go this way,
    as before; read-only sources (card software's ``bytes``) copy holding the
    GIL [measured: releasing it for them too gave no gain in VOP blk write and
    net echo, and releasing it in the server thread's inline batches lost].

    Safety: the memory stays mapped while the copy runs because both buffers
    are *exported* for its duration (``from_buffer``, on top of the views the
    caller holds), and an exported mmap refuses ``close()`` (BufferError;
    :class:`DmaSpace` and :class:`~micdrv.pci.vfio_user.MemoryRegion` then
    leave the pages to the last view: ``tests/test_sim_dma.py``, the unmap
    race). Views that are not plain contiguous bytes take the plain copy.
    """
    n = len(dst)
    if not release_gil or n < GIL_FREE_COPY or dst.readonly or src.readonly or len(src) != n or \
            dst.format != "B" or src.format != "B" or not dst.c_contiguous or not src.c_contiguous:
        dst[:] = src  # (which also refuses views of different sizes)
        return
    d = (ctypes.c_char * n).from_buffer(dst)
    s = (ctypes.c_char * n).from_buffer(src)
    try:
        ctypes.memmove(d, s, n)  # a CDLL foreign function: the GIL is released while it runs
    finally:
        del d, s


class _HostWindow:
    """Card addresses ``[lo, hi)``: SMPT entry ``index`` (= ``entry``) onto a DMA mapping whose view
    holds card address X at offset X - ``base``; ``flags`` are the mapping's READ/WRITE bits."""

    __slots__ = ("lo", "hi", "base", "view", "flags", "index", "entry")

    @classmethod
    def of(cls, dma: DmaSpace, index: int, entry: int, page: int) -> "_HostWindow | None":
        """The window of the mapping ``dma`` used last, seen through SMPT ``index`` at card address ``page``."""
        region = dma.last_region
        if region is None or region.view is None:
            return None
        w = cls()
        host = smpt_host_page(entry)  # host address of card address ``page``
        w.base = page + region.iova - host  # card address of the mapping's first byte
        w.lo = max(page, w.base)
        w.hi = min(page + SMPT_PAGE_SIZE, w.base + region.size)
        w.view, w.flags, w.index, w.entry = region.view, region.flags, index, entry
        return w if w.lo < w.hi else None


class CardBus:
    """Card physical memory: GDDR, the register window and the SMPT window onto host DMA maps."""

    def __init__(self, gddr: memoryview, registers: RegisterFile, smpt: Smpt, dma: Callable[[], DmaSpace | None]):
        self.gddr = gddr
        self.memory_size = len(gddr)
        self.registers = registers
        self.smpt = smpt
        self._dma = dma
        self._dma_space: DmaSpace | None = None  # what _dma() returned once it was a DmaSpace (a server keeps its own)
        self._window: _HostWindow | None = None  # the host memory resolved last (:meth:`_host_fast`)
        self._lock = threading.Lock()
        self.faults = 0
        self.recent_faults: collections.deque[str] = collections.deque(maxlen=RECENT_FAULTS)

    # --- faults --------------------------------------------------------------------------
    def fault(self, addr: int, length: int, write: bool, detail: str) -> CardFault:
        """Count and log a card-side fault; return the exception for the caller to raise."""
        exc = CardFault(addr, length, write, detail)
        with self._lock:
            self.faults += 1
            self.recent_faults.append(str(exc))
        log.warning("card-side fault: %s", exc)
        return exc

    # --- resolution ------------------------------------------------------------------------
    def _fast(self, addr: int, length: int, write: bool) -> memoryview | None:
        """[addr, +length) as one view when it is GDDR, or host memory in one SMPT page of the
        DMA mapping used last; None for anything else -- no verdict and no fault counted: the
        callers then take :meth:`_pieces`, which checks everything and counts the faults."""
        if 0 <= addr and 0 < length and addr + length <= self.memory_size:
            return self.gddr[addr:addr + length]
        if 0 < length:
            return self._host_fast(addr, length, write)
        return None

    def _host_fast(self, addr: int, length: int, write: bool) -> memoryview | None:
        """:meth:`_fast` for host memory (``length`` > 0): one SMPT page, the DMA mapping used last.

        The card address range where that page and that mapping overlap is
        remembered (:class:`_HostWindow`), so a stream of descriptors into the
        same buffers skips the translation. It serves while the SMPT entry
        holds the same value and the mapping is mapped: its unmap releases the
        mapping's view, and slicing a released view fails. It holds nothing
        else of the mapping, so it keeps no unmapped pages alive.
        """
        w = self._window
        if w is not None and w.lo <= addr and addr + length <= w.hi and w.flags & (_MAP_WRITE if write else _MAP_READ) \
                and self.smpt.entries[w.index] == w.entry:
            off = addr - w.base
            try:
                return w.view[off:off + length]
            except ValueError:  # unmapped since: resolve afresh
                self._window = None
        rel = addr - SYSTEM_WINDOW
        if 0 <= rel < SYSTEM_WINDOW_SIZE:
            off = rel & SMPT_PAGE_MASK
            if off + length <= SMPT_PAGE_SIZE:
                dma = self._dma_space
                if dma is None:
                    dma = self._dma_space = self._dma()
                if dma is not None:
                    index = rel >> SMPT_PAGE_SHIFT
                    entry = self.smpt.entries[index]
                    view = dma.fast_view(smpt_host_page(entry) + off, length, write)
                    if view is not None:
                        self._window = _HostWindow.of(dma, index, entry, addr - off)
                    return view
        return None

    def _pieces(self, addr: int, length: int, write: bool) -> list[memoryview]:
        """The memory behind [addr, +length) as views, split where the backing changes."""
        if 0 <= addr and 0 < length and addr + length <= self.memory_size:  # the common case first
            return [self.gddr[addr:addr + length]]
        if addr < 0 or length < 0:
            raise self.fault(addr, length, write, "negative address or length")
        out: list[memoryview] = []
        pos, left = addr, length
        try:
            while left > 0:
                if pos < self.memory_size:
                    if pos + left > self.memory_size:
                        raise self.fault(addr, length, write, f"runs past the end of card memory "
                                                              f"({self.memory_size:#x} bytes)")
                    out.append(self.gddr[pos:pos + left])
                    break
                if MMIO_WINDOW <= pos < MMIO_WINDOW_END:
                    raise self.fault(addr, length, write, "the register window is not memory (dword access only)")
                if not self.smpt.covers(pos):
                    raise self.fault(addr, length, write, f"nothing at card address {pos:#x}")
                index, host, page_left = self.smpt.translate(pos)
                n = min(left, page_left)
                out.append(self._host_view(addr, length, write, index, host, n))
                pos += n
                left -= n
        except BaseException:
            for v in out:
                v.release()
            raise
        return out

    def _host_view(self, addr: int, length: int, write: bool, index: int, host: int, n: int) -> memoryview:
        dma = self._dma()
        try:
            if dma is None:
                raise DmaFault(host, n, write, "no host DMA space")
            return dma.view(host, n, write=write)
        except DmaFault as e:
            raise self.fault(addr, length, write, f"SMPT{index:02d} -> host {host:#x}+{n:#x}: {e.detail}") from None

    @staticmethod
    def _in_window(addr: int, length: int) -> bool:
        return MMIO_WINDOW <= addr < MMIO_WINDOW_END

    def _mmio_offset(self, addr: int, length: int, write: bool) -> int:
        off = addr - MMIO_WINDOW
        if length not in (4, 8) or off % length or addr + length > MMIO_WINDOW_END:
            raise self.fault(addr, length, write, "register access must be an aligned dword or qword")
        return off

    # --- memory access ------------------------------------------------------------------------
    def view(self, addr: int, length: int, *, write: bool = False) -> memoryview:
        """A zero-copy view of [addr, +length) when one backing holds it all; release() it after use."""
        v = self._fast(addr, length, write)
        if v is not None:
            return v
        pieces = self._pieces(addr, length, write)
        if len(pieces) == 1:
            return pieces[0]
        for v in pieces:
            v.release()
        if not pieces:
            return memoryview(b"")
        raise self.fault(addr, length, write, "spans two SMPT pages: no single view")

    def read(self, addr: int, length: int) -> bytes:
        if 0 <= addr and 0 < length and addr + length <= self.memory_size:  # GDDR: the common case first
            return self.gddr[addr:addr + length].tobytes()
        if self._in_window(addr, length):
            off = self._mmio_offset(addr, length, False)
            value = self.registers.read32(off) if length == 4 else self.registers.read64(off)
            return value.to_bytes(length, "little")
        pieces = self._pieces(addr, length, False)
        try:
            return b"".join(bytes(v) for v in pieces)
        finally:
            for v in pieces:
                v.release()

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if data.__class__ is bytes or data.__class__ is bytearray:  # into plain memory: no checks left to do
            v = self._fast(addr, len(data), True)
            if v is not None:
                v[:] = data
                v.release()
                return
        data = memoryview(data).cast("B")
        if self._in_window(addr, len(data)):
            off = self._mmio_offset(addr, len(data), True)
            value = int.from_bytes(data, "little")
            if len(data) == 4:
                self.registers.write32(off, value)
            else:
                self.registers.write64(off, value)
            return
        pieces = self._pieces(addr, len(data), True)
        pos = 0
        try:
            for v in pieces:
                copy_view(v, data[pos:pos + len(v)])
                pos += len(v)
        finally:
            for v in pieces:
                v.release()

    def read32(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 4), "little")

    def write32(self, addr: int, value: int) -> None:
        self.write(addr, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def read64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def write64(self, addr: int, value: int) -> None:
        self.write(addr, (value & (1 << 64) - 1).to_bytes(8, "little"))

    def copy(self, dst: int, src: int, length: int, release_gil: bool = True) -> None:
        """Copy card memory to card memory (GDDR and/or host through the SMPT), zero-copy (:func:`copy_view`)."""
        if 0 < length:  # the fast cases (:meth:`_fast`) inline: this is every DMA descriptor
            size = self.memory_size
            s = self.gddr[src:src + length] if 0 <= src and src + length <= size else \
                self._host_fast(src, length, False)
            if s is not None:
                d = self.gddr[dst:dst + length] if 0 <= dst and dst + length <= size else \
                    self._host_fast(dst, length, True)
                if d is not None:
                    if length < GIL_FREE_COPY or not release_gil:
                        d[:] = s
                        return  # (the two views go with this frame, now)
                    try:
                        copy_view(d, s)
                    finally:
                        d.release()
                        s.release()
                    return
                s.release()
        s_pieces = self._pieces(src, length, False)
        try:
            d_pieces = self._pieces(dst, length, True)
        except BaseException:
            for v in s_pieces:
                v.release()
            raise
        try:
            if len(s_pieces) == 1 and len(d_pieces) == 1:
                copy_view(d_pieces[0], s_pieces[0], release_gil)
                return
            si = di = so = do = 0
            while si < len(s_pieces):
                s, d = s_pieces[si], d_pieces[di]
                n = min(len(s) - so, len(d) - do)
                copy_view(d[do:do + n], s[so:so + n], release_gil)
                so += n
                do += n
                if so == len(s):
                    si, so = si + 1, 0
                if do == len(d):
                    di, do = di + 1, 0
        finally:
            for v in s_pieces + d_pieces:
                v.release()

    def counters(self) -> dict:
        with self._lock:
            return {"faults": self.faults, "recent": list(self.recent_faults)}
