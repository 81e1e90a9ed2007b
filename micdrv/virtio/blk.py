"""virtio-blk formats: feature bits, request header and types, status, ``struct virtio_blk_config`` (virtio-legacy.md 3).

Device ID 2 (section B), one request queue (queue 0). A request is one
chain: a 16-byte readable ``virtio_blk_outhdr``, the data buffers (readable
for OUT / DISCARD / WRITE_ZEROES, writable for IN / GET_ID), and a 1-byte
writable status, always last (section 3.4). Sectors are 512 bytes whatever
``blk_size`` says (section 3.2/3.3).
"""

from __future__ import annotations

import ctypes
import struct

SECTOR_SIZE = 512        # section 3.2: capacity and sector fields are in 512-byte units
SECTOR_SHIFT = 9

# --- feature bits (section 3.1) ---------------------------------------------------------------

VIRTIO_BLK_F_BARRIER = 0       # legacy; not offered
VIRTIO_BLK_F_SIZE_MAX = 1      # config.size_max: max bytes per data segment
VIRTIO_BLK_F_SEG_MAX = 2       # config.seg_max: max data segments per request
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5            # read-only disk
VIRTIO_BLK_F_BLK_SIZE = 6      # config.blk_size: logical block size
VIRTIO_BLK_F_SCSI = 7          # legacy; do not offer
VIRTIO_BLK_F_FLUSH = 9         # FLUSH command (legacy name WCE)
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13      # v5.0+
VIRTIO_BLK_F_WRITE_ZEROES = 14  # v5.0+

FEATURE_NAMES = {v: k[len("VIRTIO_BLK_F_"):] for k, v in globals().items() if k.startswith("VIRTIO_BLK_F_")}

# --- request (section 3.3) --------------------------------------------------------------------

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_SCSI_CMD = 2      # legacy
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_FLUSH_OUT = 5     # legacy synonym of FLUSH
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_BARRIER = 0x80000000  # legacy flag OR-ed into type with F_BARRIER

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20       # GET_ID: ASCII, NUL-padded, no terminator at exactly 20

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1


class virtio_blk_outhdr(ctypes.LittleEndianStructure):
    """``struct virtio_blk_outhdr``, 16 bytes: the readable header of every request."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint32),    # @0 VIRTIO_BLK_T_*
        ("ioprio", ctypes.c_uint32),  # @4 reserved (a priority hint)
        ("sector", ctypes.c_uint64),  # @8 in 512-byte sectors
    ]


class virtio_blk_discard_write_zeroes(ctypes.LittleEndianStructure):
    """``struct virtio_blk_discard_write_zeroes``, 16 bytes: one range of DISCARD / WRITE_ZEROES."""

    _pack_ = 1
    _fields_ = [
        ("sector", ctypes.c_uint64),       # @0
        ("num_sectors", ctypes.c_uint32),  # @8
        ("flags", ctypes.c_uint32),        # @12 bit0 UNMAP (WRITE_ZEROES only)
    ]


OUTHDR = struct.Struct("<IIQ")            # hot path twin of virtio_blk_outhdr
DISCARD_WRITE_ZEROES = struct.Struct("<QII")
OUTHDR_SIZE = OUTHDR.size                 # 16
STATUS_SIZE = 1

# --- struct virtio_blk_config (section 3.2) ---------------------------------------------------


class virtio_blk_geometry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("cylinders", ctypes.c_uint16),  # @16
        ("heads", ctypes.c_uint8),       # @18
        ("sectors", ctypes.c_uint8),     # @19
    ]


class virtio_blk_config(ctypes.LittleEndianStructure):
    """``struct virtio_blk_config`` of the v5.0-v5.9 uapi header: 60 bytes (36 before v5.0)."""

    _pack_ = 1
    _fields_ = [
        ("capacity", ctypes.c_uint64),                  # @0  512-byte sectors, always valid
        ("size_max", ctypes.c_uint32),                  # @8  SIZE_MAX
        ("seg_max", ctypes.c_uint32),                   # @12 SEG_MAX
        ("geometry", virtio_blk_geometry),              # @16 GEOMETRY
        ("blk_size", ctypes.c_uint32),                  # @20 BLK_SIZE
        ("physical_block_exp", ctypes.c_uint8),         # @24 TOPOLOGY
        ("alignment_offset", ctypes.c_uint8),           # @25 TOPOLOGY
        ("min_io_size", ctypes.c_uint16),               # @26 TOPOLOGY
        ("opt_io_size", ctypes.c_uint32),               # @28 TOPOLOGY
        ("wce", ctypes.c_uint8),                        # @32 CONFIG_WCE
        ("unused", ctypes.c_uint8),                     # @33
        ("num_queues", ctypes.c_uint16),                # @34 MQ
        ("max_discard_sectors", ctypes.c_uint32),       # @36 DISCARD
        ("max_discard_seg", ctypes.c_uint32),           # @40 DISCARD
        ("discard_sector_alignment", ctypes.c_uint32),  # @44 DISCARD
        ("max_write_zeroes_sectors", ctypes.c_uint32),  # @48 WRITE_ZEROES
        ("max_write_zeroes_seg", ctypes.c_uint32),      # @52 WRITE_ZEROES
        ("write_zeroes_may_unmap", ctypes.c_uint8),     # @56 WRITE_ZEROES
        ("unused1", ctypes.c_uint8 * 3),                # @57
    ]


VIRTIO_BLK_CONFIG_SIZE = ctypes.sizeof(virtio_blk_config)  # 60
VIRTIO_BLK_CONFIG_SIZE_PRE_V5 = 36                         # section 3.2: ends after num_queues
