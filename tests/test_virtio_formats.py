"""Virtio layouts against the spec tables: ring arithmetic, structures field by field, feature bits, IDs."""

from __future__ import annotations

import ctypes

import pytest

from micdrv.virtio import VringError, VringLayout, vring_need_event, vring_size
from micdrv.virtio import blk as B
from micdrv.virtio import console as C
from micdrv.virtio import device as D
from micdrv.virtio import net as N
from micdrv.virtio import ring as R


def offsets(struct_type) -> dict[str, tuple[int, int]]:
    return {name: (getattr(struct_type, name).offset, getattr(struct_type, name).size)
            for name, *_ in struct_type._fields_}


# --- the split ring (section 1) -----------------------------------------------------------------

def test_vring_size_matches_the_worked_examples():
    assert vring_size(128, 4096) == 5126          # section 1.2 table, the MIC ring
    assert vring_size(256, 4096) == 10246
    lay = VringLayout(128, 4096)
    assert (lay.desc, lay.avail, lay.used, lay.size) == (0, 0x800, 0x1000, 5126)
    assert lay.avail + R.used_event_offset(128) == 0x904       # avail.used_event at 2308
    assert lay.used + R.avail_event_offset(128) == 0x1404      # used.avail_event at 5124
    assert R.used_size(128) == 1030 and R.avail_size(128) == 262


@pytest.mark.parametrize("num", [0, 3, 100, 65536, -1])
def test_a_queue_size_that_is_not_a_power_of_two_is_refused(num):
    with pytest.raises(VringError, match="power of two"):
        vring_size(num, 4096)


def test_ring_structures_follow_the_header():
    assert ctypes.sizeof(R.vring_desc) == R.DESC.size == 16
    assert offsets(R.vring_desc) == {"addr": (0, 8), "len": (8, 4), "flags": (12, 2), "next": (14, 2)}
    assert ctypes.sizeof(R.vring_used_elem) == R.USED_ELEM.size == 8
    assert offsets(R.vring_used_elem) == {"id": (0, 4), "len": (4, 4)}
    d = R.vring_desc(0x1122334455667788, 0x99AABBCC, 3, 7)
    assert bytes(d) == R.DESC.pack(0x1122334455667788, 0x99AABBCC, 3, 7)
    assert (R.VRING_DESC_F_NEXT, R.VRING_DESC_F_WRITE, R.VRING_DESC_F_INDIRECT) == (1, 2, 4)
    assert R.VRING_USED_F_NO_NOTIFY == R.VRING_AVAIL_F_NO_INTERRUPT == 1


@pytest.mark.parametrize("event,old,new,expect", [
    (5, 5, 6, True), (5, 6, 7, False), (6, 5, 8, True), (0xFFFF, 0xFFFE, 0x0001, True), (10, 2, 3, False),
])
def test_vring_need_event_examples_of_section_1_4(event, old, new, expect):
    assert vring_need_event(event, new, old) is expect


# --- device IDs, status, transport bits ---------------------------------------------------------

def test_ids_status_and_transport_bits():
    assert (D.VIRTIO_ID_NET, D.VIRTIO_ID_BLOCK, D.VIRTIO_ID_CONSOLE) == (1, 2, 3)
    assert (D.VIRTIO_CONFIG_S_ACKNOWLEDGE, D.VIRTIO_CONFIG_S_DRIVER, D.VIRTIO_CONFIG_S_DRIVER_OK,
            D.VIRTIO_CONFIG_S_FEATURES_OK, D.VIRTIO_CONFIG_S_NEEDS_RESET, D.VIRTIO_CONFIG_S_FAILED) == \
        (1, 2, 4, 8, 0x40, 0x80)
    assert (D.VIRTIO_F_NOTIFY_ON_EMPTY, D.VIRTIO_F_ANY_LAYOUT, D.VIRTIO_RING_F_INDIRECT_DESC,
            D.VIRTIO_RING_F_EVENT_IDX, D.VIRTIO_F_VERSION_1) == (24, 27, 28, 29, 32)
    assert D.RING_FEATURES == 0x30000000
    assert D.feature_names(0x3C1 | D.RING_FEATURES, N.FEATURE_NAMES) == [
        "CSUM", "GSO", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "RING_INDIRECT_DESC", "RING_EVENT_IDX"]


# --- virtio-net (section 2) ---------------------------------------------------------------------

def test_net_feature_bits_and_the_mpssd_offer():
    assert N.MPSSD_FEATURES == 0x3C1  # section 2.1 / x100-host-abi.md 6.1
    assert (N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM, N.VIRTIO_NET_F_MTU, N.VIRTIO_NET_F_MAC,
            N.VIRTIO_NET_F_GSO, N.VIRTIO_NET_F_HOST_TSO4, N.VIRTIO_NET_F_MRG_RXBUF, N.VIRTIO_NET_F_STATUS,
            N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_MQ) == (0, 1, 3, 5, 6, 11, 15, 16, 17, 22)
    assert N.FEATURE_NAMES[9] == "GUEST_ECN"


def test_virtio_net_hdr_is_10_bytes_and_12_with_mrg_rxbuf():
    assert ctypes.sizeof(N.virtio_net_hdr) == N.VIRTIO_NET_HDR_SIZE == 10
    assert offsets(N.virtio_net_hdr) == {"flags": (0, 1), "gso_type": (1, 1), "hdr_len": (2, 2),
                                         "gso_size": (4, 2), "csum_start": (6, 2), "csum_offset": (8, 2)}
    assert ctypes.sizeof(N.virtio_net_hdr_mrg_rxbuf) == 12 and N.virtio_net_hdr_mrg_rxbuf.num_buffers.offset == 10
    assert N.header_size(0) == 10 and N.header_size(1 << N.VIRTIO_NET_F_MRG_RXBUF) == 12
    assert (N.VIRTIO_NET_HDR_GSO_TCPV4, N.VIRTIO_NET_HDR_GSO_UDP, N.VIRTIO_NET_HDR_GSO_TCPV6,
            N.VIRTIO_NET_HDR_GSO_ECN) == (1, 3, 4, 0x80)


def test_virtio_net_config_is_24_bytes():
    assert ctypes.sizeof(N.virtio_net_config) == 24
    o = offsets(N.virtio_net_config)
    assert o["mac"] == (0, 6) and o["status"] == (6, 2) and o["max_virtqueue_pairs"] == (8, 2)
    assert o["mtu"] == (10, 2) and o["speed"] == (12, 4) and o["duplex"] == (16, 1)
    assert o["rss_max_key_size"] == (17, 1) and o["supported_hash_types"] == (20, 4)
    assert N.RX_QUEUE == 0 and N.TX_QUEUE == 1


# --- virtio-blk (section 3) ---------------------------------------------------------------------

def test_blk_request_header_types_and_status():
    assert ctypes.sizeof(B.virtio_blk_outhdr) == B.OUTHDR.size == 16
    assert offsets(B.virtio_blk_outhdr) == {"type": (0, 4), "ioprio": (4, 4), "sector": (8, 8)}
    assert (B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT, B.VIRTIO_BLK_T_FLUSH, B.VIRTIO_BLK_T_GET_ID,
            B.VIRTIO_BLK_T_DISCARD, B.VIRTIO_BLK_T_WRITE_ZEROES) == (0, 1, 4, 8, 11, 13)
    assert (B.VIRTIO_BLK_S_OK, B.VIRTIO_BLK_S_IOERR, B.VIRTIO_BLK_S_UNSUPP) == (0, 1, 2)
    assert B.VIRTIO_BLK_ID_BYTES == 20
    assert ctypes.sizeof(B.virtio_blk_discard_write_zeroes) == B.DISCARD_WRITE_ZEROES.size == 16


def test_virtio_blk_config_is_the_60_byte_v5_struct():
    assert ctypes.sizeof(B.virtio_blk_config) == 60
    o = offsets(B.virtio_blk_config)
    expect = {"capacity": 0, "size_max": 8, "seg_max": 12, "geometry": 16, "blk_size": 20,
              "physical_block_exp": 24, "alignment_offset": 25, "min_io_size": 26, "opt_io_size": 28, "wce": 32,
              "num_queues": 34, "max_discard_sectors": 36, "max_discard_seg": 40, "discard_sector_alignment": 44,
              "max_write_zeroes_sectors": 48, "max_write_zeroes_seg": 52, "write_zeroes_may_unmap": 56,
              "unused1": 57}
    assert {k: o[k][0] for k in expect} == expect
    assert (B.VIRTIO_BLK_F_SIZE_MAX, B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_RO, B.VIRTIO_BLK_F_BLK_SIZE,
            B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_DISCARD, B.VIRTIO_BLK_F_WRITE_ZEROES) == (1, 2, 5, 6, 9, 13, 14)


# --- virtio-console (section 4) -----------------------------------------------------------------

def test_console_config_and_control_message():
    assert ctypes.sizeof(C.virtio_console_config) == 12
    assert offsets(C.virtio_console_config) == {"cols": (0, 2), "rows": (2, 2), "max_nr_ports": (4, 4),
                                                "emerg_wr": (8, 4)}
    assert ctypes.sizeof(C.virtio_console_control) == 8
    assert (C.VIRTIO_CONSOLE_F_SIZE, C.VIRTIO_CONSOLE_F_MULTIPORT, C.VIRTIO_CONSOLE_F_EMERG_WRITE) == (0, 1, 2)
    assert (C.RX_QUEUE, C.TX_QUEUE) == (0, 1)
