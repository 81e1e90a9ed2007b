"""struct mic_bootparam, the device page header (spec 3.3)."""

import struct

import pytest

from micdrv.bootparam import BOOTPARAM_SIZE, MIC_DP_SIZE, MIC_MAGIC, Bootparam
from micdrv.memory import BufferMemory, MemoryAccessError


def test_init_writes_the_spec_initial_values_at_the_spec_offsets():
    page = bytearray(b"\xAA" * MIC_DP_SIZE)
    bp = Bootparam(BufferMemory(page, 0x4000), 0x4000)
    bp.init(node_id=3)
    magic, h2c_config_db, node_id, h2c_scif_db, c2h_scif_db, host_addr, card_addr = \
        struct.unpack_from("<IbBBBQQ", page, 0)
    assert (magic, h2c_config_db, node_id, h2c_scif_db, c2h_scif_db, host_addr, card_addr) == \
        (0xC0FFEE00, -1, 3, 0xFF, 0xFF, 0, 0)
    assert magic == MIC_MAGIC and BOOTPARAM_SIZE == 24
    assert page[24] == 0xAA  # the virtio descriptors after the header are not touched
    assert bp.valid and bp.h2c_scif_db == -1 and bp.c2h_scif_db == -1 and bp.h2c_config_db == -1


def test_fields_round_trip():
    bp = Bootparam(BufferMemory(bytearray(64)))
    bp.init(1)
    bp.c2h_scif_db, bp.h2c_scif_db, bp.h2c_config_db = 2, 15, 0
    bp.scif_host_dma_addr, bp.scif_card_dma_addr = 0x80_0012_3000, 0x4000_0000
    assert (bp.c2h_scif_db, bp.h2c_scif_db, bp.h2c_config_db) == (2, 15, 0)
    assert (bp.scif_host_dma_addr, bp.scif_card_dma_addr) == (0x80_0012_3000, 0x4000_0000)
    assert "node_id=1" in repr(bp)


def test_the_node_id_must_fit_a_byte_and_not_be_the_host():
    bp = Bootparam(BufferMemory(bytearray(64)))
    for bad in (0, 256):
        with pytest.raises(ValueError):
            bp.init(bad)


def test_a_bootparam_that_does_not_fit_its_memory_is_refused():
    with pytest.raises(MemoryAccessError):
        Bootparam(BufferMemory(bytearray(16)))
