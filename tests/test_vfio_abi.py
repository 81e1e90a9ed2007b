"""The VFIO ABI encoding: ioctl numbers, struct layouts, capability chains (spec 1.1-1.5)."""

import struct

import pytest

from micdrv.pci import vfio_abi as abi
from micdrv.pci.device import RegionInfo, SparseArea
from micdrv.pci.errors import ProtocolError


def test_ioctl_numbers_match_the_kernel_table():
    # spec 1.2: request = 0x3B00 | (100 + n), computed from _IO, never pasted.
    assert abi.VFIO_GET_API_VERSION == 0x3B64
    assert abi.VFIO_CHECK_EXTENSION == 0x3B65
    assert abi.VFIO_SET_IOMMU == 0x3B66
    assert abi.VFIO_GROUP_GET_STATUS == 0x3B67
    assert abi.VFIO_GROUP_SET_CONTAINER == 0x3B68
    assert abi.VFIO_GROUP_GET_DEVICE_FD == 0x3B6A
    assert abi.VFIO_DEVICE_GET_INFO == 0x3B6B
    assert abi.VFIO_DEVICE_GET_REGION_INFO == 0x3B6C
    assert abi.VFIO_DEVICE_GET_IRQ_INFO == 0x3B6D
    assert abi.VFIO_DEVICE_SET_IRQS == 0x3B6E
    assert abi.VFIO_DEVICE_RESET == 0x3B6F
    assert abi.VFIO_IOMMU_GET_INFO == 0x3B70
    assert abi.VFIO_IOMMU_MAP_DMA == 0x3B71
    assert abi.VFIO_IOMMU_UNMAP_DMA == 0x3B72


def test_ioc_helpers_encode_direction_and_size():
    # asm-generic/ioctl.h: dir in bits 30-31, size in 16-29, type 8-15, nr 0-7.
    assert abi._IOR(ord("T"), 0xD2, 4) == 0x800454D2  # TUNGETFEATURES
    assert abi._IOW(ord("T"), 202, 4) == 0x400454CA  # TUNSETIFF


def test_struct_sizes_match_the_c_layouts():
    sizes = {abi.group_status: 8, abi.device_info: 24, abi.region_info: 32, abi.cap_header: 8,
             abi.sparse_mmap_head: 16, abi.sparse_mmap_area: 16, abi.irq_info: 16, abi.irq_set: 20,
             abi.iommu_type1_info: 24, abi.dma_map: 32, abi.dma_unmap: 24}
    for s, n in sizes.items():
        assert s.size == n, s.format


def test_region_info_with_sparse_and_type_caps_round_trips():
    info = RegionInfo(index=4, flags=0b111, size=0x20000, offset=0x4000_0000,
                      sparse=(SparseArea(0, 0x1000), SparseArea(0x3000, 0x1d000)), type=(0x80008086, 1))
    buf = abi.encode_region_info(info)
    assert struct.unpack_from("<I", buf)[0] == len(buf)  # argsz is the full size
    out = abi.decode_region_info(buf, expected_index=4)
    assert out.sparse == info.sparse and out.type == info.type
    assert out.size == info.size and out.offset == info.offset
    assert out.mmap_areas() == info.sparse


def test_region_without_caps_maps_whole():
    out = abi.decode_region_info(abi.encode_region_info(RegionInfo(0, 0b111, 1 << 20)))
    assert out.sparse is None and out.mmap_areas() == (SparseArea(0, 1 << 20),)


def test_capability_chain_that_loops_is_rejected():
    buf = bytearray(abi.encode_region_info(RegionInfo(0, 0b111, 0x10000, sparse=(SparseArea(0, 0x1000),))))
    struct.pack_into("<I", buf, 32 + 4, 32)  # next points back at itself
    with pytest.raises(ProtocolError, match="loops"):
        abi.decode_region_info(buf)


def test_sparse_area_beyond_region_is_rejected():
    buf = abi.encode_region_info(RegionInfo(0, 0b111, 0x1000, sparse=(SparseArea(0, 0x2000),)))
    with pytest.raises(ProtocolError, match="beyond region size"):
        abi.decode_region_info(buf)


def test_capability_pointing_outside_the_buffer_is_rejected():
    buf = bytearray(abi.region_info.pack(32, abi.VFIO_REGION_INFO_FLAG_CAPS, 0, 0x400, 0x1000, 0))
    with pytest.raises(ProtocolError, match="outside"):
        abi.decode_region_info(buf)


def test_iova_range_capability_is_decoded():
    ranges = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 48) - 1)]
    cap = abi.iova_range_head.pack(abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0, len(ranges), 0)
    cap += b"".join(abi.iova_range.pack(*r) for r in ranges)
    head = abi.iommu_type1_info.pack(24 + len(cap), abi.VFIO_IOMMU_INFO_PGSIZES | abi.VFIO_IOMMU_INFO_CAPS,
                                     0x40201000, 24, 0)
    pgsizes, got = abi.decode_iova_ranges(head + cap)
    assert pgsizes == 0x40201000 and got == tuple(ranges)
