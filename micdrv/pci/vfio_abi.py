"""The VFIO user ABI: ioctl numbers, constants and structure layouts.

Facts from ../shared/spec/vfio-vfio-user-vhost-user.md section 1 (read from
include/uapi/linux/vfio.h). vfio-user (section 2) reuses the same structures
and flags for region info, IRQ info and SET_IRQS, so both implementations of
:class:`~micdrv.pci.PciDevice` encode and decode through this module.

All structures are little-endian with the C padding already in the offsets
(spec 1.4), so ``struct`` formats start with ``"<"``.
"""

from __future__ import annotations

import struct

from ..ioctl import _IO, _IOC, _IOR, _IOW  # noqa: F401  ioctl encoding (spec 1.1), shared with the tap code
from .device import DeviceInfo, IrqInfo, RegionInfo, SparseArea
from .errors import ProtocolError

# Every VFIO ioctl is a plain _IO(VFIO_TYPE, VFIO_BASE + n): argsz carries the
# size instead of the ioctl number (spec 1.1).
VFIO_TYPE = ord(";")
VFIO_BASE = 100
VFIO_API_VERSION = 0

VFIO_GET_API_VERSION = _IO(VFIO_TYPE, VFIO_BASE + 0)
VFIO_CHECK_EXTENSION = _IO(VFIO_TYPE, VFIO_BASE + 1)
VFIO_SET_IOMMU = _IO(VFIO_TYPE, VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS = _IO(VFIO_TYPE, VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER = _IO(VFIO_TYPE, VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD = _IO(VFIO_TYPE, VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO = _IO(VFIO_TYPE, VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO = _IO(VFIO_TYPE, VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS = _IO(VFIO_TYPE, VFIO_BASE + 10)
VFIO_DEVICE_RESET = _IO(VFIO_TYPE, VFIO_BASE + 11)
VFIO_IOMMU_GET_INFO = _IO(VFIO_TYPE, VFIO_BASE + 12)  # on the container fd
VFIO_IOMMU_MAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 13)
VFIO_IOMMU_UNMAP_DMA = _IO(VFIO_TYPE, VFIO_BASE + 14)

# --- constants (spec 1.3) ----------------------------------------------------
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3
VFIO_NOIOMMU_IOMMU = 8

VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3

VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_TYPE = 2
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_IRQ_SET_DATA_TYPE_MASK = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_TYPE_MASK = VFIO_IRQ_SET_ACTION_MASK | VFIO_IRQ_SET_ACTION_UNMASK | VFIO_IRQ_SET_ACTION_TRIGGER

VFIO_IOMMU_INFO_PGSIZES = 1 << 0
VFIO_IOMMU_INFO_CAPS = 1 << 1
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_DMA_UNMAP_FLAG_ALL = 1 << 1

# vfio-pci region and IRQ indices (spec 1.3)
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_BAR5_REGION_INDEX = 5
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5

# --- structures (spec 1.4) ---------------------------------------------------
group_status = struct.Struct("<II")
device_info = struct.Struct("<IIIIII")  # 24 upstream; the kernel needs >= 16
region_info = struct.Struct("<IIIIQQ")  # argsz flags index cap_offset size offset
cap_header = struct.Struct("<HHI")  # id version next
sparse_mmap_head = struct.Struct("<HHIII")  # header + nr_areas reserved
sparse_mmap_area = struct.Struct("<QQ")  # offset size
cap_type = struct.Struct("<HHIII")  # header + type subtype
irq_info = struct.Struct("<IIII")  # argsz flags index count
irq_set = struct.Struct("<IIIII")  # argsz flags index start count (+ data)
iommu_type1_info = struct.Struct("<IIQII")  # argsz flags iova_pgsizes cap_offset pad
iova_range_head = struct.Struct("<HHIII")  # header + nr_iovas reserved
iova_range = struct.Struct("<QQ")  # start end (inclusive)
dma_map = struct.Struct("<IIQQQ")  # argsz flags vaddr iova size
dma_unmap = struct.Struct("<IIQQ")  # argsz flags iova size

# Sanity limits on what a peer or kernel may claim in a capability chain.
_MAX_CAPS = 64
_MAX_AREAS = 4096


def iter_caps(buf: bytes | bytearray, first: int, limit: int | None = None):
    """Walk a VFIO capability chain (spec 1.5): yield ``(id, version, offset)``.

    Offsets are relative to the start of ``buf`` (the INFO structure). A chain
    that points outside the buffer, backwards, or loops is a protocol error,
    so a hostile vfio-user server cannot make the client read garbage.
    """
    limit = len(buf) if limit is None else min(limit, len(buf))
    off, seen = first, 0
    while off:
        if off + cap_header.size > limit or off % 4:
            raise ProtocolError("parse capability chain", f"capability at offset {off} outside {limit}-byte info")
        cid, ver, nxt = cap_header.unpack_from(buf, off)
        yield cid, ver, off
        seen += 1
        if nxt and nxt <= off or seen > _MAX_CAPS:
            raise ProtocolError("parse capability chain", f"capability chain loops at offset {off}")
        off = nxt


def decode_region_info(buf: bytes | bytearray, expected_index: int | None = None) -> RegionInfo:
    """Decode a ``vfio_region_info`` and its capabilities."""
    if len(buf) < region_info.size:
        raise ProtocolError("decode region info", f"{len(buf)} bytes, need {region_info.size}")
    argsz, flags, index, cap_off, size, offset = region_info.unpack_from(buf)
    if expected_index is not None and index != expected_index:
        raise ProtocolError("decode region info", f"asked for region {expected_index}, got {index}")
    sparse: tuple[SparseArea, ...] | None = None
    rtype: tuple[int, int] | None = None
    if flags & VFIO_REGION_INFO_FLAG_CAPS and cap_off:
        for cid, _ver, off in iter_caps(buf, cap_off, argsz):
            if cid == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                if off + sparse_mmap_head.size > len(buf):
                    raise ProtocolError("decode sparse mmap capability", "truncated")
                n = sparse_mmap_head.unpack_from(buf, off)[3]
                end = off + sparse_mmap_head.size + n * sparse_mmap_area.size
                if n > _MAX_AREAS or end > len(buf):
                    raise ProtocolError("decode sparse mmap capability", f"{n} areas do not fit")
                areas = []
                for i in range(n):
                    a_off, a_size = sparse_mmap_area.unpack_from(buf, off + sparse_mmap_head.size + i * 16)
                    if a_off + a_size > size:
                        raise ProtocolError("decode sparse mmap capability",
                                            f"area {i} [{a_off:#x}+{a_size:#x}] beyond region size {size:#x}")
                    areas.append(SparseArea(a_off, a_size))
                sparse = tuple(areas)
            elif cid == VFIO_REGION_INFO_CAP_TYPE:
                if off + cap_type.size > len(buf):
                    raise ProtocolError("decode region type capability", "truncated")
                _i, _v, _n, t, st = cap_type.unpack_from(buf, off)
                rtype = (t, st)
    return RegionInfo(index=index, flags=flags, size=size, offset=offset, sparse=sparse, type=rtype)


def encode_region_info(info: RegionInfo) -> bytes:
    """Encode a :class:`RegionInfo` with its capability chain (used by the vfio-user server)."""
    caps = b""
    first = 0
    flags = info.flags & ~VFIO_REGION_INFO_FLAG_CAPS
    pieces = []
    if info.sparse is not None:
        pieces.append((VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1,
                       struct.pack("<II", len(info.sparse), 0) + b"".join(sparse_mmap_area.pack(a.offset, a.size) for a in info.sparse)))
    if info.type is not None:
        pieces.append((VFIO_REGION_INFO_CAP_TYPE, 1, struct.pack("<II", *info.type)))
    if pieces:
        flags |= VFIO_REGION_INFO_FLAG_CAPS
        first = region_info.size
        off = first
        for i, (cid, ver, body) in enumerate(pieces):
            nxt = off + cap_header.size + len(body) if i + 1 < len(pieces) else 0
            caps += cap_header.pack(cid, ver, nxt) + body
            off += cap_header.size + len(body)
    total = region_info.size + len(caps)
    return region_info.pack(total, flags, info.index, first, info.size, info.offset) + caps


def decode_irq_info(buf: bytes | bytearray, expected_index: int | None = None) -> IrqInfo:
    if len(buf) < irq_info.size:
        raise ProtocolError("decode irq info", f"{len(buf)} bytes, need {irq_info.size}")
    _argsz, flags, index, count = irq_info.unpack_from(buf)
    if expected_index is not None and index != expected_index:
        raise ProtocolError("decode irq info", f"asked for IRQ index {expected_index}, got {index}")
    return IrqInfo(index=index, flags=flags, count=count)


def decode_device_info(buf: bytes | bytearray) -> DeviceInfo:
    if len(buf) < 16:
        raise ProtocolError("decode device info", f"{len(buf)} bytes, need 16")
    _argsz, flags, num_regions, num_irqs = struct.unpack_from("<IIII", buf)
    return DeviceInfo(flags=flags, num_regions=num_regions, num_irqs=num_irqs)


def decode_iova_ranges(buf: bytes | bytearray) -> tuple[int, tuple[tuple[int, int], ...] | None]:
    """Decode ``vfio_iommu_type1_info``: page-size bitmap and the valid IOVA ranges (inclusive ends)."""
    argsz, flags, pgsizes, cap_off, _pad = iommu_type1_info.unpack_from(buf)
    ranges = None
    if flags & VFIO_IOMMU_INFO_CAPS and cap_off:
        for cid, _ver, off in iter_caps(buf, cap_off, argsz):
            if cid == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                n = iova_range_head.unpack_from(buf, off)[3]
                base = off + iova_range_head.size
                if n > _MAX_AREAS or base + 16 * n > len(buf):
                    raise ProtocolError("decode IOVA range capability", f"{n} ranges do not fit")
                ranges = tuple(iova_range.unpack_from(buf, base + 16 * i) for i in range(n))
    return pgsizes, ranges
