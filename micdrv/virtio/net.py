"""virtio-net formats: feature bits, ``struct virtio_net_hdr``, ``struct virtio_net_config`` (virtio-legacy.md 2).

Device ID 1 (section B). Queue 0 is the driver's receive queue (device ->
driver), queue 1 its transmit queue (section 2.4; x100-host-abi.md 6.1).
Every packet on either queue is prefixed by a ``virtio_net_hdr``: 10 bytes
without VIRTIO_NET_F_MRG_RXBUF, 12 with it (section 2.3). A tap opened with
IFF_VNET_HDR uses the same header (section 2.7), so a device backed by a
tap passes it through untouched.
"""

from __future__ import annotations

import ctypes

# --- feature bits (section 2.1) ---------------------------------------------------------------

VIRTIO_NET_F_CSUM = 0                 # device accepts TX packets with a partial checksum
VIRTIO_NET_F_GUEST_CSUM = 1           # driver accepts RX packets with a partial checksum
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3                  # config.mtu valid
VIRTIO_NET_F_MAC = 5                  # config.mac valid
VIRTIO_NET_F_GSO = 6                  # legacy: device accepts any GSO type on TX
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15           # mergeable RX buffers, 12-byte header
VIRTIO_NET_F_STATUS = 16              # config.status valid
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23

FEATURE_NAMES = {v: k[len("VIRTIO_NET_F_"):] for k, v in globals().items() if k.startswith("VIRTIO_NET_F_")}

# What mpssd offers (x100-host-abi.md 6.1): CSUM | GSO | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN = 0x3C1.
MPSSD_FEATURES = sum(1 << b for b in (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GSO, VIRTIO_NET_F_GUEST_TSO4,
                                      VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN))

# The driver fails probe if these are offered without CTRL_VQ (section 2.1, virtnet_validate_features).
NEEDS_CTRL_VQ = sum(1 << b for b in (VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_GUEST_ANNOUNCE,
                                     VIRTIO_NET_F_MQ, VIRTIO_NET_F_CTRL_MAC_ADDR))

# --- queues (section 2.4) ---------------------------------------------------------------------

RX_QUEUE = 0   # receiveq1: device -> driver, the driver posts writable buffers
TX_QUEUE = 1   # transmitq1: driver -> device, readable buffers

# --- struct virtio_net_hdr (section 2.3) ------------------------------------------------------

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1   # checksum from csum_start, stored at csum_start + csum_offset
VIRTIO_NET_HDR_F_DATA_VALID = 2   # RX only: checksum already verified
VIRTIO_NET_HDR_F_RSC_INFO = 4     # VERSION_1 only

VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80


class virtio_net_hdr(ctypes.LittleEndianStructure):
    """``struct virtio_net_hdr``, 10 bytes: the prefix of every packet without MRG_RXBUF."""

    _pack_ = 1
    _fields_ = [
        ("flags", ctypes.c_uint8),        # @0 NEEDS_CSUM | DATA_VALID
        ("gso_type", ctypes.c_uint8),     # @1 GSO_NONE/TCPV4/UDP/TCPV6, | GSO_ECN
        ("hdr_len", ctypes.c_uint16),     # @2 Ethernet + IP + L4 header length (a hint)
        ("gso_size", ctypes.c_uint16),    # @4 segment payload size (MSS)
        ("csum_start", ctypes.c_uint16),  # @6 where checksumming starts, from the start of the frame
        ("csum_offset", ctypes.c_uint16),  # @8 where the checksum goes, from csum_start
    ]


class virtio_net_hdr_mrg_rxbuf(ctypes.LittleEndianStructure):
    """``struct virtio_net_hdr_mrg_rxbuf``, 12 bytes: the header with MRG_RXBUF."""

    _pack_ = 1
    _fields_ = [
        ("hdr", virtio_net_hdr),          # @0
        ("num_buffers", ctypes.c_uint16),  # @10 buffers this packet spans (RX); 0 on TX
    ]


VIRTIO_NET_HDR_SIZE = ctypes.sizeof(virtio_net_hdr)                 # 10
VIRTIO_NET_HDR_MRG_RXBUF_SIZE = ctypes.sizeof(virtio_net_hdr_mrg_rxbuf)  # 12


def header_size(features: int) -> int:
    """Bytes of the per-packet header for the negotiated ``features`` (legacy: 12 only with MRG_RXBUF)."""
    return VIRTIO_NET_HDR_MRG_RXBUF_SIZE if features >> VIRTIO_NET_F_MRG_RXBUF & 1 else VIRTIO_NET_HDR_SIZE


# --- struct virtio_net_config (section 2.2) ---------------------------------------------------

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2


class virtio_net_config(ctypes.LittleEndianStructure):
    """``struct virtio_net_config`` as in the v5.7-v5.9 uapi header: 24 bytes (17 before v5.7)."""

    _pack_ = 1
    _fields_ = [
        ("mac", ctypes.c_uint8 * 6),                          # @0  MAC
        ("status", ctypes.c_uint16),                          # @6  STATUS: LINK_UP | ANNOUNCE
        ("max_virtqueue_pairs", ctypes.c_uint16),             # @8  MQ
        ("mtu", ctypes.c_uint16),                             # @10 MTU
        ("speed", ctypes.c_uint32),                           # @12 SPEED_DUPLEX (bit 63, v1 only)
        ("duplex", ctypes.c_uint8),                           # @16 SPEED_DUPLEX
        ("rss_max_key_size", ctypes.c_uint8),                 # @17 RSS / HASH_REPORT (v5.7+)
        ("rss_max_indirection_table_length", ctypes.c_uint16),  # @18 RSS (v5.7+)
        ("supported_hash_types", ctypes.c_uint32),            # @20 RSS / HASH_REPORT (v5.7+)
    ]


VIRTIO_NET_CONFIG_SIZE = ctypes.sizeof(virtio_net_config)  # 24; a VOP config_len must cover it (section A)
VIRTIO_NET_CONFIG_SIZE_V54 = 17                           # sizeof in the v5.4-v5.6 headers (section 2.2)
