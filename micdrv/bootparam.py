"""The device page header, ``struct mic_bootparam`` (spec 3.3).

The device page is 4 KiB of host memory (in the DmaArena); the host tells
the card where it is through SPAD14/15 and both sides then read and write
this header: the card reaches it through the SMPT, the host directly. Its
fields carry the SCIF node id and the SCIF node queue pair hand-shake (spec
8.4 steps 1-3) and the VOP config doorbell (spec 5). The virtio device
descriptors follow at offset 24 (spec 5.1, not here).

:class:`Bootparam` reads and writes the fields through a
:class:`~micdrv.memory.Memory`, so the same class serves the host (memory =
the arena) and the simulated card (memory = its SMPT window).
"""

from __future__ import annotations

from .memory import Memory

MIC_DP_SIZE = 4096          # spec 3.3: the device page is 4096 bytes
MIC_MAGIC = 0xC0FFEE00      # spec 3.3: bootparam.magic
BOOTPARAM_SIZE = 24         # spec 3.3: sizeof(struct mic_bootparam) [INF]
DEVICE_DESC_OFFSET = 24     # spec 3.3 / 5.1: virtio device descriptors start here

# Field offsets (spec 3.3 table).
BP_MAGIC = 0x00              # le32, host
BP_H2C_CONFIG_DB = 0x04      # s8, card (VOP probe), -1 until set
BP_NODE_ID = 0x05            # u8, host: mic id + 1
BP_H2C_SCIF_DB = 0x06        # u8, card (SCIF probe), 0xFF until set
BP_C2H_SCIF_DB = 0x07        # u8, host (SCIF probe), 0xFF until set
BP_SCIF_HOST_DMA_ADDR = 0x08  # u64, host: card-visible address of the host's node scif_qp
BP_SCIF_CARD_DMA_ADDR = 0x10  # u64, card: card physical address of the card's node scif_qp

DB_UNSET = -1   # a doorbell field nobody has written yet (0xFF read as s8)


def _s8(b: int) -> int:
    return b - 256 if b >= 128 else b


class Bootparam:
    """``struct mic_bootparam`` at ``addr`` in ``mem`` (spec 3.3)."""

    def __init__(self, mem: Memory, addr: int = 0):
        self.mem = mem.window(addr, BOOTPARAM_SIZE, "mic_bootparam")
        self.addr = addr

    def _u8(self, off: int) -> int:
        return self.mem.read(self.addr + off, 1)[0]

    def _set_u8(self, off: int, value: int) -> None:
        self.mem.write(self.addr + off, bytes([value & 0xFF]))

    def init(self, node_id: int) -> None:
        """``mic_bootparam_init``: what the host writes before every boot (spec 3.3 "Init value")."""
        if not 1 <= node_id <= 0xFF:
            raise ValueError(f"card node id {node_id} must be 1..255 (spec 3.3: mic id + 1)")
        self.mem.write(self.addr, bytes(BOOTPARAM_SIZE))
        self.mem.write_u32(self.addr + BP_MAGIC, MIC_MAGIC)
        self._set_u8(BP_H2C_CONFIG_DB, DB_UNSET)
        self._set_u8(BP_NODE_ID, node_id)
        self._set_u8(BP_H2C_SCIF_DB, DB_UNSET)
        self._set_u8(BP_C2H_SCIF_DB, DB_UNSET)

    @property
    def magic(self) -> int:
        return self.mem.read_u32(self.addr + BP_MAGIC)

    @property
    def valid(self) -> bool:
        return self.magic == MIC_MAGIC

    @property
    def node_id(self) -> int:
        return self._u8(BP_NODE_ID)

    # Doorbells read back as signed: -1 means "not set yet".
    @property
    def h2c_config_db(self) -> int:
        return _s8(self._u8(BP_H2C_CONFIG_DB))

    @h2c_config_db.setter
    def h2c_config_db(self, db: int) -> None:
        self._set_u8(BP_H2C_CONFIG_DB, db)

    @property
    def h2c_scif_db(self) -> int:
        return _s8(self._u8(BP_H2C_SCIF_DB))

    @h2c_scif_db.setter
    def h2c_scif_db(self, db: int) -> None:
        self._set_u8(BP_H2C_SCIF_DB, db)

    @property
    def c2h_scif_db(self) -> int:
        return _s8(self._u8(BP_C2H_SCIF_DB))

    @c2h_scif_db.setter
    def c2h_scif_db(self, db: int) -> None:
        self._set_u8(BP_C2H_SCIF_DB, db)

    @property
    def scif_host_dma_addr(self) -> int:
        return self.mem.read_u64(self.addr + BP_SCIF_HOST_DMA_ADDR)

    @scif_host_dma_addr.setter
    def scif_host_dma_addr(self, addr: int) -> None:
        self.mem.write_u64(self.addr + BP_SCIF_HOST_DMA_ADDR, addr)

    @property
    def scif_card_dma_addr(self) -> int:
        return self.mem.read_u64(self.addr + BP_SCIF_CARD_DMA_ADDR)

    @scif_card_dma_addr.setter
    def scif_card_dma_addr(self, addr: int) -> None:
        self.mem.write_u64(self.addr + BP_SCIF_CARD_DMA_ADDR, addr)

    def __repr__(self) -> str:
        return (f"<Bootparam magic={self.magic:#x} node_id={self.node_id} h2c_config_db={self.h2c_config_db} "
                f"h2c_scif_db={self.h2c_scif_db} c2h_scif_db={self.c2h_scif_db} "
                f"scif_host_dma_addr={self.scif_host_dma_addr:#x} scif_card_dma_addr={self.scif_card_dma_addr:#x}>")
