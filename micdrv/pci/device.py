"""The PciDevice interface: the only way micdrv reaches a card.

Two implementations exist and nothing above this layer can tell them apart
(ARCHITECTURE.md, "The one rule"):

* :class:`micdrv.pci.vfio.VfioPciDevice` -- a real device bound to vfio-pci,
  reached through /dev/vfio ioctls;
* :class:`micdrv.pci.vfio_user.client.VfioUserDevice` -- a device model in
  another process (the simulated X100), reached over a vfio-user socket.

The interface follows VFIO's own model (spec section 1): a device has numbered
*regions* (BAR0-5, ROM, config space, ...) read and written at byte offsets or
mmapped, numbered *IRQ indices* (INTx, MSI, MSI-X, ...) whose vectors are
delivered on eventfds, a reset, and DMA mappings of host memory at IOVAs.

This module holds the abstract base with everything that does not depend on
the transport: argument checking (sizes, alignment, bounds, indices), config
space helpers, capability lookup, and mmap bookkeeping.
"""

from __future__ import annotations

import abc
import mmap as _mmap
import os
import struct
from dataclasses import dataclass
from typing import Protocol, Sequence

from ..addr import BarOffset, Iova
from .errors import AccessError, DmaMapError, IrqError, PciError, RegionError

# Region and IRQ indices of vfio-pci (spec 1.3); repeated in vfio_abi for the
# ABI view, named here for users of the interface.
BAR0, BAR1, BAR2, BAR3, BAR4, BAR5, ROM, CONFIG, VGA = range(9)
INTX, MSI, MSIX, ERR, REQ = range(5)

# Region flag bits (spec 1.3), the same in vfio and vfio-user.
REGION_READ = 1 << 0
REGION_WRITE = 1 << 1
REGION_MMAP = 1 << 2

# IRQ info flag bits (spec 1.3).
IRQ_EVENTFD = 1 << 0
IRQ_MASKABLE = 1 << 1
IRQ_AUTOMASKED = 1 << 2
IRQ_NORESIZE = 1 << 3

# PCI configuration space (PCI Local Bus spec; offsets of the type 0 header).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4  # bus mastering: needed before a device can DMA or raise MSI (spec 1.6)
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_MSIX = 0x11

_SIZES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_PACK = {n: struct.Struct("<" + f).pack for n, f in _SIZES.items()}


@dataclass(frozen=True)
class SparseArea:
    """An mmap-able window inside a region (VFIO_REGION_INFO_CAP_SPARSE_MMAP)."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionInfo:
    """What VFIO_DEVICE_GET_REGION_INFO says about one region.

    ``offset`` is the transport's offset of the region (in the device fd for
    kernel VFIO, in the passed fd for vfio-user); users of the interface never
    need it. ``sparse`` is None when the whole region may be mmapped (if
    ``mmappable``), else the list of areas that may.
    """

    index: int
    flags: int
    size: int
    offset: int = 0
    sparse: tuple[SparseArea, ...] | None = None
    type: tuple[int, int] | None = None

    @property
    def readable(self) -> bool:
        return bool(self.flags & REGION_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & REGION_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & REGION_MMAP)

    def mmap_areas(self) -> tuple[SparseArea, ...]:
        """The areas that may be mmapped: the sparse list, the whole region, or none."""
        if not self.mmappable or self.size == 0:
            return ()
        if self.sparse is not None:
            return self.sparse
        return (SparseArea(0, self.size),)


@dataclass(frozen=True)
class IrqInfo:
    """What VFIO_DEVICE_GET_IRQ_INFO says about one IRQ index."""

    index: int
    flags: int
    count: int

    @property
    def eventfd(self) -> bool:
        return bool(self.flags & IRQ_EVENTFD)

    @property
    def automasked(self) -> bool:
        return bool(self.flags & IRQ_AUTOMASKED)


@dataclass(frozen=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int


class DmaBacking(Protocol):
    """Host memory that can be DMA-mapped for a device (a :class:`~micdrv.pci.arena.DmaArena`).

    Kernel VFIO pins ``address`` (a host virtual address of the daemon's
    mapping); vfio-user passes ``fd`` (a memfd) so the other process maps the
    same pages. Both describe the same bytes.
    """

    @property
    def fd(self) -> int: ...

    @property
    def address(self) -> int: ...

    @property
    def size(self) -> int: ...


@dataclass(frozen=True)
class DmaMapping:
    iova: Iova
    size: int
    offset: int  # offset of the mapping inside the backing
    readable: bool
    writable: bool


class PciDevice(abc.ABC):
    """A PCI device reached through VFIO or vfio-user.

    Every fd-owning implementation has :meth:`fileno` and is a context manager.
    Methods raise :class:`~micdrv.pci.errors.PciError` subclasses that name the
    failing step.
    """

    #: A human name for messages: the PCI address or the socket path.
    name: str = "?"

    def __init__(self) -> None:
        self._regions: dict[int, RegionInfo] = {}
        self._irqs: dict[int, IrqInfo] = {}
        self._maps: list[_mmap.mmap] = []
        self._dma: dict[int, DmaMapping] = {}
        self._irq_enabled: set[int] = set()
        self._closed = False

    # --- what each transport implements -------------------------------------
    @abc.abstractmethod
    def _get_device_info(self) -> DeviceInfo: ...

    @abc.abstractmethod
    def _get_region_info(self, index: int) -> RegionInfo: ...

    @abc.abstractmethod
    def _get_irq_info(self, index: int) -> IrqInfo: ...

    @abc.abstractmethod
    def _region_read(self, index: int, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def _region_write(self, index: int, offset: int, data: bytes, posted: bool) -> None: ...

    @abc.abstractmethod
    def _mmap(self, info: RegionInfo, area: SparseArea) -> _mmap.mmap: ...

    @abc.abstractmethod
    def _set_irqs(self, index: int, flags: int, start: int, count: int,
                  eventfds: Sequence[int] | None = None, bools: Sequence[bool] | None = None) -> None: ...

    @abc.abstractmethod
    def _reset(self) -> None: ...

    @abc.abstractmethod
    def _dma_map(self, backing: DmaBacking, m: DmaMapping) -> None: ...

    @abc.abstractmethod
    def _dma_unmap(self, m: DmaMapping) -> None: ...

    @abc.abstractmethod
    def fileno(self) -> int: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    @property
    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        """Valid IOVA ranges as (start, inclusive end); the whole space unless the IOMMU says less."""
        return ((0, (1 << 64) - 1),)

    @property
    def iova_pgsize(self) -> int:
        """Smallest IOMMU page size: DMA maps must be aligned to it."""
        return 4096

    # --- device and regions --------------------------------------------------
    @property
    def info(self) -> DeviceInfo:
        info = getattr(self, "_info", None)
        if info is None:
            self._check_open()
            info = self._info = self._get_device_info()
        return info

    def region_info(self, index: int) -> RegionInfo:
        """Region ``index`` (size, flags, mmap-able areas); cached after the first ask."""
        info = self._regions.get(index)
        if info is None:
            self._check_open()
            if not 0 <= index < self.info.num_regions:
                raise RegionError(f"region info of {self.name}",
                                  f"region index {index} out of range (device has {self.info.num_regions})")
            info = self._regions[index] = self._get_region_info(index)
        return info

    def _check_access(self, region: int, offset: int, length: int, *, write: bool, size: int | None = None) -> RegionInfo:
        info = self._regions.get(region) or self.region_info(region)
        if ((size is None or size in _SIZES and not offset % size) and 0 <= offset and 0 <= length
                and offset + length <= info.size and info.flags & (REGION_WRITE if write else REGION_READ)):
            return info  # every access pays only for this line; the messages below are built on failure
        what = f"{'write' if write else 'read'} of region {region} at {offset:#x}"
        if size is not None:
            if size not in _SIZES:
                raise AccessError(what, f"access size {size} is not 1, 2, 4 or 8")
            if offset % size:
                raise AccessError(what, f"misaligned {size}-byte access")
        if offset < 0 or length < 0 or offset + length > info.size:
            raise AccessError(what, f"{length} bytes beyond region size {info.size:#x}")
        raise AccessError(what, f"region {region} is not {'writable' if write else 'readable'}")

    def read(self, region: int, offset: BarOffset | int, size: int) -> int:
        """A sized (1, 2, 4 or 8 byte), naturally aligned read; returns the value."""
        self._check_access(region, offset, size, write=False, size=size)
        data = self._region_read(region, offset, size)
        if len(data) != size:
            raise AccessError(f"read of region {region} at {offset:#x}", f"got {len(data)} of {size} bytes")
        return int.from_bytes(data, "little")

    def read_async(self, region: int, offset: BarOffset | int, size: int, callback) -> bool:
        """:meth:`read` whose result goes to ``callback(value, None)`` -- or ``callback(None, error)``.

        Returns False when ``callback`` has run already (here: a plain read,
        as for mapped registers), True when the answer is still to come: a
        transport whose reads are messages (vfio-user) then calls it from
        :meth:`process_events`, which the caller runs whenever
        :meth:`fileno` is readable, until :attr:`async_pending` is 0.
        """
        try:
            value = self.read(region, offset, size)
        except PciError as e:
            callback(None, e)
        else:
            callback(value, None)
        return False

    @property
    def async_pending(self) -> int:
        """How many :meth:`read_async` answers are still to come."""
        return 0

    def process_events(self) -> int:
        """Handle what the device sent on its own (:meth:`read_async` answers); 0 for a device that sends none."""
        return 0

    def write(self, region: int, offset: BarOffset | int, size: int, value: int, *, posted: bool = True) -> None:
        """A sized, naturally aligned write.

        ``posted`` lets a transport skip waiting for completion, as PCIe
        memory writes are posted (vfio-user: NO_REPLY, spec 2.7). Config-space
        writes are never posted.
        """
        self._check_access(region, offset, size, write=True, size=size)
        if not 0 <= value < 1 << (8 * size):
            raise AccessError(f"write of region {region} at {offset:#x}", f"value {value:#x} does not fit {size} bytes")
        self._region_write(region, offset, _PACK[size](value), posted and region != CONFIG)

    def write_multi(self, writes: Sequence[tuple[int, int, bytes]], *, posted: bool = True) -> None:
        """Several small writes ``(region, offset, data)``, in order; a transport may send them as one message
        (vfio-user REGION_WRITE_MULTI). Here: one :meth:`write_bytes` each."""
        for region, offset, data in writes:
            self.write_bytes(region, offset, data, posted=posted)

    def read_bytes(self, region: int, offset: BarOffset | int, length: int) -> bytes:
        """A bulk read (the transport splits it as it must)."""
        self._check_access(region, offset, length, write=False)
        return self._region_read(region, offset, length)

    def write_bytes(self, region: int, offset: BarOffset | int, data: bytes | bytearray | memoryview, *, posted: bool = False) -> None:
        data = bytes(data)
        self._check_access(region, offset, len(data), write=True)
        self._region_write(region, offset, data, posted and region != CONFIG)

    def mmap(self, region: int, area: int | None = None) -> memoryview:
        """Map a region (or sparse area number ``area``) and return it as a memoryview.

        Without ``area``, the whole region is mapped when the region allows it;
        a region with sparse areas needs ``area``. The mapping lives until
        :meth:`close`.
        """
        info = self.region_info(region)
        areas = info.mmap_areas()
        step = f"mmap of region {region} of {self.name}"
        if not areas:
            raise RegionError(step, "region is not mmap-able")
        if area is None:
            if info.sparse is not None and not (len(areas) == 1 and areas[0] == SparseArea(0, info.size)):
                raise RegionError(step, f"region has {len(areas)} sparse areas; pass area=0..{len(areas) - 1}")
            chosen = areas[0]
        else:
            if not 0 <= area < len(areas):
                raise RegionError(step, f"area {area} out of range ({len(areas)} areas)")
            chosen = areas[area]
        m = self._mmap(info, chosen)
        self._maps.append(m)
        return memoryview(m)

    # --- config space --------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        return self.read(CONFIG, offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.write(CONFIG, offset, size, value, posted=False)

    def enable_bus_master(self) -> None:
        """Set memory-space and bus-master enable in the command register (spec 1.6)."""
        cmd = self.config_read(PCI_COMMAND, 2)
        want = cmd | PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY
        if want != cmd:
            self.config_write(PCI_COMMAND, 2, want)

    def find_capability(self, cap_id: int) -> int | None:
        """Offset of the first standard capability with ``cap_id``, or None."""
        if not self.config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST:
            return None
        ptr = self.config_read(PCI_CAPABILITY_LIST, 1) & ~3
        seen = 0
        while ptr and seen < 48:  # 48 caps fit in 192 bytes: a longer chain loops
            if self.config_read(ptr, 1) == cap_id:
                return ptr
            ptr = self.config_read(ptr + 1, 1) & ~3
            seen += 1
        return None

    # --- interrupts -----------------------------------------------------------
    def irq_info(self, index: int) -> IrqInfo:
        info = self._irqs.get(index)
        if info is None:
            self._check_open()
            if not 0 <= index < self.info.num_irqs:
                raise IrqError(f"IRQ info of {self.name}", f"IRQ index {index} out of range (device has {self.info.num_irqs})")
            info = self._irqs[index] = self._get_irq_info(index)
        return info

    def _check_irqs(self, index: int, start: int, count: int, step: str) -> IrqInfo:
        info = self.irq_info(index)
        if start < 0 or count < 0 or start + count > info.count:
            raise IrqError(step, f"vectors {start}..{start + count - 1} beyond the {info.count} of IRQ index {index}")
        return info

    def enable_irqs(self, index: int, eventfds: Sequence[int], start: int = 0) -> None:
        """Deliver vectors ``start..start+len(eventfds)-1`` of ``index`` to eventfds (-1 leaves one unassigned)."""
        from .vfio_abi import VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD
        step = f"enable IRQ index {index} on {self.name}"
        info = self._check_irqs(index, start, len(eventfds), step)
        if not info.eventfd:
            raise IrqError(step, "IRQ index does not support eventfds")
        self._set_irqs(index, VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER, start, len(eventfds),
                       eventfds=list(eventfds))
        self._irq_enabled.add(index)

    def disable_irqs(self, index: int) -> None:
        """Disable every vector of an IRQ index (DATA_NONE|TRIGGER, count 0; spec 1.7).

        Idempotent: the kernel answers EINVAL for an index that is not
        enabled, so an index this object never enabled is left alone.
        """
        from .vfio_abi import VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE
        self.irq_info(index)
        if index not in self._irq_enabled:
            return
        self._set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, 0, 0)
        self._irq_enabled.discard(index)

    def trigger_irqs(self, index: int, start: int = 0, count: int = 1) -> None:
        """Fire vectors from software (loopback: spec 1.7 'simulates an interrupt')."""
        from .vfio_abi import VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE
        self._check_irqs(index, start, count, f"trigger IRQ index {index} on {self.name}")
        self._set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER, start, count)

    def unmask_irq(self, index: int = INTX, start: int = 0, count: int = 1) -> None:
        """Unmask after an AUTOMASKED (INTx) interrupt was handled (spec 1.7)."""
        from .vfio_abi import VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_NONE
        self._check_irqs(index, start, count, f"unmask IRQ index {index} on {self.name}")
        self._set_irqs(index, VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK, start, count)

    # --- reset ----------------------------------------------------------------
    @property
    def can_reset(self) -> bool:
        from .vfio_abi import VFIO_DEVICE_FLAGS_RESET
        return bool(self.info.flags & VFIO_DEVICE_FLAGS_RESET)

    def reset(self) -> None:
        """Function-level reset of the device (VFIO_DEVICE_RESET)."""
        self._check_open()
        if not self.can_reset:
            raise PciError(f"reset of {self.name}", "device does not support reset", errno=95)
        self._reset()

    # --- DMA ------------------------------------------------------------------
    def dma_map(self, backing: DmaBacking, iova: Iova | int, size: int | None = None, offset: int = 0, *,
                readable: bool = True, writable: bool = True) -> DmaMapping:
        """Make ``backing[offset:offset+size]`` reachable by the device at ``iova``.

        Only arena memory is ever mapped (ARCHITECTURE.md "Addresses"): a
        backing that is not a :class:`~micdrv.pci.arena.DmaArena` is refused,
        so no other host memory can reach the device's IOVA space.
        """
        from .arena import DmaArena  # arena.py imports this module
        self._check_open()
        size = backing.size - offset if size is None else size
        step = f"DMA map of {size:#x} bytes at IOVA {iova:#x} on {self.name}"
        if not isinstance(backing, DmaArena):
            raise DmaMapError(step, f"{type(backing).__name__} is not a DmaArena: only the arena is ever mapped "
                                    f"for a device")
        pg = self.iova_pgsize
        if size <= 0 or offset < 0 or offset + size > backing.size:
            raise DmaMapError(step, f"[{offset:#x}, +{size:#x}) is outside the {backing.size:#x}-byte backing")
        if iova % pg or size % pg or offset % pg:
            raise DmaMapError(step, f"IOVA, size and offset must be multiples of the IOMMU page size {pg:#x}")
        last = iova + size - 1
        if not any(lo <= iova and last <= hi for lo, hi in self.iova_ranges):
            ranges = ", ".join(f"[{lo:#x}-{hi:#x}]" for lo, hi in self.iova_ranges)
            raise DmaMapError(step, f"outside the valid IOVA ranges {ranges}")
        for m in self._dma.values():
            if iova <= m.iova + m.size - 1 and m.iova <= last:
                raise DmaMapError(step, f"overlaps the mapping at IOVA {m.iova:#x}+{m.size:#x}", errno=17)
        m = DmaMapping(Iova(iova), size, offset, readable, writable)
        self._dma_map(backing, m)
        self._dma[iova] = m
        return m

    def dma_unmap(self, iova: Iova | int, size: int | None = None) -> None:
        """Remove the mapping that starts at ``iova`` (sizes must match the map, as in vfio-user)."""
        self._check_open()
        m = self._dma.get(iova)
        if m is None or size is not None and size != m.size:
            raise DmaMapError(f"DMA unmap at IOVA {iova:#x} on {self.name}", "no mapping with that IOVA and size", errno=2)
        self._dma_unmap(m)
        del self._dma[iova]

    @property
    def dma_mappings(self) -> tuple[DmaMapping, ...]:
        return tuple(self._dma.values())

    # --- lifetime ---------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise PciError(f"use of {self.name}", "device is closed", errno=9)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release mmaps, IRQ eventfds, DMA maps and the device; idempotent."""
        if self._closed:
            return
        self._closed = True
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                # A memoryview of it is still alive somewhere; the mapping goes
                # away with the last reference instead.
                pass
        self._maps.clear()
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def new_eventfd(nonblocking: bool = True) -> int:
    """An eventfd for an interrupt vector (read it to consume the count)."""
    flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
    return os.eventfd(0, flags)


def read_eventfd(fd: int) -> int:
    """Consume an eventfd; 0 if nothing was pending (non-blocking fd)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0

