"""The VOP device page entries and vring sizes, against the tables of spec 5.1 and 5.6."""

import struct

import pytest
from hypothesis import given, strategies as st

from micdrv.bootparam import DEVICE_DESC_OFFSET, MIC_DP_SIZE
from micdrv.memory import BufferMemory, MemoryAccessError
from micdrv.vop import layout as L

PAGE = 0x8000  # where the test's device page sits in its memory window


def page() -> BufferMemory:
    return BufferMemory(bytearray(MIC_DP_SIZE), PAGE, "device page")


def test_vring_sizes_are_the_spec_5_6_arithmetic():
    assert L.vring_info_offset(128) == 5128 and L.vring_info_offset(128, L.VRING_INFO_LEGACY) == 5126
    assert L.vring_bytes(128) == 8192
    assert L.used_ring_bytes(128) == 4096
    assert L.vring_magic(1, 1) == 0xC0FFEE02


def test_entry_sizes_are_the_spec_5_1_arithmetic():
    # mpssd's net device: 2 queues, 4 feature bytes, a 24-byte config (spec 6.1)
    assert L.desc_size(2, 4, 24) == 8 + 48 + 8 + 24
    assert L.total_size(2, 4, 24) == 88 + 16
    assert L.aligned_desc_size(1, 4, 3) == 48  # 8 + 24 + 8 + 3 = 43 -> 48


def test_the_fields_sit_where_the_spec_tables_put_them():
    m = page()
    shape = L.EntryShape(2, 4, 12)
    e = L.DeviceEntry(m, PAGE, DEVICE_DESC_OFFSET, shape)
    e.write_header(3)
    e.init_ctrl()
    e.set_vq(1, 0x80_0001_2000, 128)
    e.set_used_address(1, 0x5000000)
    e.set_host_features(b"\x01\x02\x03\x04")
    e.set_guest_acks(b"\x01\x00\x00\x00")
    e.set_config(b"config-bytes")
    e.set_ctrl_u8(L.CTRL_C2H_VDEV_DB, 2)
    raw = bytes(m.view(PAGE, MIC_DP_SIZE))[DEVICE_DESC_OFFSET:]
    assert struct.unpack_from("<bBBBB", raw, 0) == (3, 2, 4, 12, 0)
    assert struct.unpack_from("<QQH", raw, 8 + 24) == (0x80_0001_2000, 0x5000000, 128)
    assert raw[56:60] == b"\x01\x02\x03\x04" and raw[60:64] == b"\x01\x00\x00\x00" and raw[64:76] == b"config-bytes"
    ctrl = L.aligned_desc_size(2, 4, 12)
    assert ctrl == 80
    assert raw[ctrl + 8:ctrl + 16] == bytes([0, 0, 0, 0, 0, 2, 0xFF, 0])
    assert e.ctrl_db(L.CTRL_H2C_VDEV_DB) == -1 and e.ctrl_db(L.CTRL_C2H_VDEV_DB) == 2


def test_scan_walks_entries_by_their_sizes_and_stops_at_type_0():
    m = page()
    offsets = []
    for t, shape in ((3, L.EntryShape(2, 4, 12)), (1, L.EntryShape(2, 4, 24)), (2, L.EntryShape(1, 4, 60))):
        off = L.find_slot(m, PAGE, shape)
        e = L.DeviceEntry(m, PAGE, off, shape)
        e.write_header(0)
        e.init_ctrl()
        e.type = t
        offsets.append(off)
    found = list(L.scan(m, PAGE))
    assert [(e.offset, e.type) for e in found] == list(zip(offsets, (3, 1, 2)))
    assert offsets[1] == offsets[0] + L.total_size(2, 4, 12)


def test_a_removed_slot_is_reused_only_by_an_entry_of_its_size():
    m = page()
    a = L.EntryShape(2, 4, 24)
    e = L.DeviceEntry(m, PAGE, L.find_slot(m, PAGE, a), a)
    e.write_header(1)
    after = L.find_slot(m, PAGE, a)
    e.type = L.TYPE_REMOVED
    assert L.find_slot(m, PAGE, a) == e.offset
    assert L.find_slot(m, PAGE, L.EntryShape(1, 4, 60)) == after


@pytest.mark.parametrize("hdr, match", [
    (bytes([1, 0, 4, 24]), "num_vq 0"),
    (bytes([1, 5, 4, 24]), "num_vq 5"),
    (bytes([1, 4, 255, 255]), "exceeds 256"),
])
def test_a_malformed_entry_ends_the_scan_with_a_clear_error(hdr, match):
    m = page()
    m.write(PAGE + DEVICE_DESC_OFFSET, hdr)
    with pytest.raises(L.VopLayoutError, match=match):
        list(L.scan(m, PAGE))


def test_an_entry_running_past_the_page_is_refused():
    m = page()
    off = MIC_DP_SIZE - 64
    m.write(PAGE + DEVICE_DESC_OFFSET, bytes([1, 4, 4, 200]))  # a big first entry steps far ...
    with pytest.raises(L.VopLayoutError, match="runs past"):
        L.DeviceEntry(m, PAGE, off, L.EntryShape(4, 4, 100))


@given(st.binary(min_size=MIC_DP_SIZE - DEVICE_DESC_OFFSET, max_size=MIC_DP_SIZE - DEVICE_DESC_OFFSET))
def test_any_page_content_scans_or_fails_cleanly_inside_the_page(junk):
    m = page()
    m.write(PAGE + DEVICE_DESC_OFFSET, junk)
    try:
        for e in L.scan(m, PAGE):
            assert PAGE <= e.addr and e.ctrl + L.CTRL_SIZE <= PAGE + MIC_DP_SIZE
            e.config(), e.host_features(), e.guest_acks(), e.status, e.ctrl_u8(L.CTRL_VDEV_RESET)
    except L.VopLayoutError:
        pass
    except MemoryAccessError as e:  # never: the shapes are checked before any field is read
        raise AssertionError(f"read outside the page: {e}")
