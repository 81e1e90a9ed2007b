"""PCI configuration space of a device model served over vfio-user.

Config space is VFIO region 7 (spec 1.3, 1.6): the client reads and writes
it with REGION_READ/WRITE like any region. This module is the bytes behind
it, with a write mask per byte so that read-only bits stay read-only, which
is all a type 0 header needs:

* BAR sizing falls out of the masks: the address bits below the BAR's size
  and the type bits are read-only, so after the host writes all ones the BAR
  reads back ``~(size - 1) | type bits``;
* the command register's memory-space (bit 1), bus-master (bit 2, spec 1.6)
  and INTx-disable (bit 10) bits are writable, the status register is
  read-only (no RW1C error bits are modelled);
* capabilities are appended to the list at 0x34 by :meth:`ConfigSpace.add_msix`,
  :meth:`ConfigSpace.add_msi` or the generic :meth:`ConfigSpace.add_capability`.

Register layouts are the PCI Local Bus / PCIe base specification's (type 0
header, MSI and MSI-X capabilities); the project's spec files do not repeat
them. :meth:`ConfigSpace.reset` returns everything to power-on values (a
function-level reset).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Callable

from ..device import (PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_CAPABILITY_LIST, PCI_COMMAND,
                      PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY,
                      PCI_REVISION_ID, PCI_STATUS, PCI_STATUS_CAP_LIST, PCI_VENDOR_ID)

# Type 0 header offsets (PCI Local Bus spec 6.1) not named in device.py.
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_CAP_START = 0x40  # first byte after the type 0 header

# Memory BAR type bits (PCI Local Bus spec 6.2.5.1).
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8

# MSI-X capability (PCI Local Bus spec 6.8.2): control @2, table @4, PBA @8.
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF  # table size - 1
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_ENTRY_SIZE = 16  # each table entry: addr lo, addr hi, data, vector control
PCI_MSIX_ENTRY_CTRL_MASKBIT = 0x1

# MSI capability (PCI Local Bus spec 6.8.1).
PCI_MSI_FLAGS = 2
PCI_MSI_FLAGS_ENABLE = 0x1
PCI_MSI_FLAGS_QMASK = 0x0E  # multiple message capable (log2)
PCI_MSI_FLAGS_QSIZE = 0x70  # multiple message enable (log2)
PCI_MSI_FLAGS_64BIT = 0x80
PCI_MSI_FLAGS_MASKBIT = 0x100

_BAR_SIZES = {1: "B", 2: "H", 4: "I"}


@dataclass(frozen=True)
class Bar:
    """A memory BAR as declared by the model."""

    index: int
    size: int
    mem64: bool
    prefetchable: bool


@dataclass(frozen=True)
class MsixCap:
    """Where the MSI-X capability and its table/PBA live."""

    offset: int
    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int


@dataclass(frozen=True)
class MsiCap:
    offset: int
    vectors: int
    addr64: bool
    per_vector_mask: bool

    @property
    def data_offset(self) -> int:
        return self.offset + (12 if self.addr64 else 8)

    @property
    def mask_offset(self) -> int | None:
        if not self.per_vector_mask:
            return None
        return self.offset + (16 if self.addr64 else 12)


Watcher = Callable[[int, bytes], None]


class ConfigSpace:
    """A device's config space: bytes, per-byte write masks, BARs and a capability list."""

    def __init__(self, vendor_id: int, device_id: int, *, class_code: int = 0xFF0000, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 1, size: int = 256):
        if size not in (256, 4096):
            raise ValueError("config space is 256 (PCI) or 4096 (PCIe) bytes")
        self.size = size
        self._data = bytearray(size)
        self._wmask = bytearray(size)
        self._initial = bytearray(size)
        self._lock = threading.RLock()
        self._watchers: list[tuple[int, int, Watcher]] = []
        self._last_cap: int | None = None
        self._next_cap = PCI_CAP_START
        self.bars: dict[int, Bar] = {}
        self.msix: MsixCap | None = None
        self.msi: MsiCap | None = None
        self._init(PCI_VENDOR_ID, struct.pack("<HH", vendor_id, device_id))
        self._init(PCI_REVISION_ID, struct.pack("<I", revision | class_code << 8)[:4])
        self._init(PCI_COMMAND, struct.pack("<H", 0),
                   struct.pack("<H", PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE))
        self._init(PCI_CACHE_LINE_SIZE, b"\0\0", b"\xff\xff")  # cache line size, latency timer: plain RW
        self._init(PCI_SUBSYSTEM_VENDOR_ID, struct.pack("<HH", subsystem_vendor_id, subsystem_id))
        self._init(PCI_INTERRUPT_LINE, bytes([0, interrupt_pin]), b"\xff\x00")

    # --- building (power-on image) ------------------------------------------------
    def _init(self, offset: int, data: bytes, wmask: bytes | None = None) -> None:
        """Set power-on bytes (and optionally their write mask)."""
        end = offset + len(data)
        if offset < 0 or end > self.size:
            raise ValueError(f"config bytes [{offset:#x}, {end:#x}) outside {self.size}-byte config space")
        self._data[offset:end] = data
        self._initial[offset:end] = data
        if wmask is not None:
            self._wmask[offset:end] = wmask

    def add_bar(self, index: int, size: int, *, mem64: bool = False, prefetchable: bool = False) -> Bar:
        """Declare memory BAR ``index`` of ``size`` bytes (a power of two >= 16); a 64-bit BAR uses two slots."""
        if not 0 <= index <= (4 if mem64 else 5):
            raise ValueError(f"BAR index {index} out of range")
        if size < 16 or size & (size - 1) or (not mem64 and size > 1 << 31):
            raise ValueError(f"BAR size {size:#x} must be a power of two >= 16 (and < 4 GiB for 32-bit)")
        if index in self.bars or mem64 and index + 1 in self.bars or any(b.mem64 and b.index + 1 == index
                                                                           for b in self.bars.values()):
            raise ValueError(f"BAR {index} already declared")
        kind = (PCI_BASE_ADDRESS_MEM_TYPE_64 if mem64 else 0) | (PCI_BASE_ADDRESS_MEM_PREFETCH if prefetchable else 0)
        mask = ~(size - 1) & 0xFFFFFFFFFFFFFFF0  # address bits below the size stay zero: that is BAR sizing
        off = PCI_BASE_ADDRESS_0 + 4 * index
        self._init(off, struct.pack("<I", kind), struct.pack("<I", mask & 0xFFFFFFFF))
        if mem64:
            self._init(off + 4, b"\0\0\0\0", struct.pack("<I", mask >> 32))
        bar = self.bars[index] = Bar(index, size, mem64, prefetchable)
        return bar

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (``body`` = the bytes after ID and next pointer); return its offset."""
        off = self._next_cap
        length = 2 + len(body)
        if off + length > 0x100:
            raise ValueError("standard capabilities must fit below config offset 0x100")
        self._init(off, bytes([cap_id, 0]) + body, b"\0\0" + (wmask or bytes(len(body))))
        if self._last_cap is None:
            self._init(PCI_CAPABILITY_LIST, bytes([off]))
            status = struct.unpack_from("<H", self._data, PCI_STATUS)[0] | PCI_STATUS_CAP_LIST
            self._init(PCI_STATUS, struct.pack("<H", status))
        else:
            self._init(self._last_cap + 1, bytes([off]))
        self._last_cap = off
        self._next_cap = off + (length + 3) // 4 * 4
        return off

    def add_msix(self, vectors: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int) -> int:
        """An MSI-X capability with ``vectors`` entries; the table and PBA live in the named BARs.

        Only the capability is config space: the table and PBA are the
        model's BAR memory, and so is per-vector masking (vector control bit
        0), which the model checks before calling ``irqs.trigger``.
        """
        if not 1 <= vectors <= 2048 or table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X: 1..2048 vectors, table and PBA 8-byte aligned")
        ctrl = vectors - 1
        body = struct.pack("<HII", ctrl, table_offset | table_bar, pba_offset | pba_bar)
        wmask = struct.pack("<HII", PCI_MSIX_FLAGS_MASKALL | PCI_MSIX_FLAGS_ENABLE, 0, 0)
        off = self.add_capability(PCI_CAP_ID_MSIX, body, wmask)
        self.msix = MsixCap(off, vectors, table_bar, table_offset, pba_bar, pba_offset)
        return off

    def add_msi(self, vectors: int = 1, *, addr64: bool = True, per_vector_mask: bool = False) -> int:
        """An MSI capability for ``vectors`` (1, 2, 4, ... 32) messages."""
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI vectors must be a power of two <= 32")
        ctrl = (vectors.bit_length() - 1) << 1 | (PCI_MSI_FLAGS_64BIT if addr64 else 0) | \
            (PCI_MSI_FLAGS_MASKBIT if per_vector_mask else 0)
        ctrl_w = PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE
        addr = struct.pack("<I", 0) + (b"\0" * 4 if addr64 else b"")
        addr_w = struct.pack("<I", 0xFFFFFFFC) + (b"\xff" * 4 if addr64 else b"")
        body = struct.pack("<H", ctrl) + addr + b"\0\0"
        wmask = struct.pack("<H", ctrl_w) + addr_w + b"\xff\xff"
        if per_vector_mask:
            body += b"\0\0" + b"\0" * 8  # reserved, mask bits, pending bits
            wmask += b"\0\0" + struct.pack("<I", (1 << vectors) - 1) + b"\0" * 4
        off = self.add_capability(PCI_CAP_ID_MSI, body, wmask)
        self.msi = MsiCap(off, vectors, addr64, per_vector_mask)
        return off

    def watch(self, offset: int, size: int, callback: Watcher) -> None:
        """Call ``callback(offset, data)`` after every write that touches [offset, +size)."""
        self._watchers.append((offset, offset + size, callback))

    # --- access (REGION_READ/WRITE of region 7) ----------------------------------------
    def read(self, offset: int, count: int) -> bytes:
        with self._lock:
            return bytes(self._data[offset:offset + count])

    def write(self, offset: int, data: bytes) -> None:
        """A host write: only bits set in the write mask change."""
        end = offset + len(data)
        with self._lock:
            for i, b in enumerate(data, offset):
                m = self._wmask[i]
                if m:
                    self._data[i] = (self._data[i] & ~m) | (b & m)
        for lo, hi, cb in self._watchers:
            if offset < hi and lo < end:
                cb(offset, bytes(data))

    def reset(self) -> None:
        """Back to power-on values (function-level reset)."""
        with self._lock:
            self._data[:] = self._initial

    # --- typed access for the model (bypasses the write masks) ------------------------
    def get(self, offset: int, size: int) -> int:
        with self._lock:
            return int.from_bytes(self._data[offset:offset + size], "little")

    def set(self, offset: int, size: int, value: int) -> None:
        """Device-side update (e.g. a status bit): the masks restrict only the host."""
        with self._lock:
            self._data[offset:offset + size] = value.to_bytes(size, "little")

    @property
    def command(self) -> int:
        return self.get(PCI_COMMAND, 2)

    @property
    def bus_master(self) -> bool:
        """Bus mastering enabled: a real device may only DMA and send MSIs with it (spec 1.6)."""
        return bool(self.command & PCI_COMMAND_MASTER)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & PCI_COMMAND_MEMORY)

    def bar_address(self, index: int) -> int:
        """The address the host programmed into BAR ``index`` (type bits cleared)."""
        bar = self.bars[index]
        off = PCI_BASE_ADDRESS_0 + 4 * index
        return self.get(off, 8 if bar.mem64 else 4) & ~0xF

    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and bool(self.get(self.msix.offset + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return self.msix is not None and bool(self.get(self.msix.offset + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_MASKALL)

    @property
    def msi_enabled(self) -> bool:
        return self.msi is not None and bool(self.get(self.msi.offset + PCI_MSI_FLAGS, 2) & PCI_MSI_FLAGS_ENABLE)

    def msi_masked(self, vector: int) -> bool:
        """Per-vector MSI mask bit (False when the capability has no mask bits)."""
        if self.msi is None or self.msi.mask_offset is None:
            return False
        return bool(self.get(self.msi.mask_offset, 4) >> vector & 1)

