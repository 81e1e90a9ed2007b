"""The card's DMA channels 4-7: taken at bring-up, as the card kernel's mic_x100_dma does (spec 4.1, 4.4, 9).

The card owns channels 4-7 (MIC_DMA_NUM_CHAN = 4 per side, card start_ch
4). ``mic_dma_chan_setup`` for a card-owned channel, register by register
(spec 4.4): owner bit 2n of DCR = 0 (card); disable (DCR bit 2n+1 clear);
mask its interrupt (DCAR IM0); DCHERRMSK = 0; the descriptor ring in GDDR
into DRAR_LO/HI (size in bits 20:4, address bits 35:32 in bits 3:0, spec
4.2); head = DTPR; unmask; enable; then -EBUSY if DCHERR is set or DSTAT
says quiesced. The rings are the kernel's size, MIC_DMA_DESC_RX_SIZE =
131068 descriptors (2 MiB each, in the sparse GDDR, never touched until
used).

Nothing on the card copies with DMA yet (SCIF RMA and the card VOP driver
would); the channels are taken so the card looks after bring-up as a card
kernel leaves it, and their interrupts are counted.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from micdrv.x100 import regs

from .memory import CardHeap

if TYPE_CHECKING:
    from ..card import CardSide


class CardDmaError(Exception):
    pass


class CardDma:
    """Card-owned DMA channels 4-7."""

    name = "mic_x100_dma"

    def __init__(self, side: "CardSide", heap: CardHeap, ring_size: int = regs.DMA_RING_SIZE):
        self.side = side
        self.heap = heap
        self.ring_size = ring_size
        self.rings: dict[int, int] = {}
        self.heads: dict[int, int] = {}
        self.interrupts = [0] * regs.DMA_NUM_CHANNELS
        self._lock = threading.Lock()

    def _reg(self, ch: int, reg: int) -> int:
        return regs.dma_reg(ch, reg)

    def probe(self) -> None:
        s = self.side
        s.set_dma_interrupt(self._interrupt)
        for ch in regs.DMA_CARD_CHANNELS:
            ring = self.rings.get(ch)
            if ring is None:
                ring = self.rings[ch] = self.heap.alloc(self.ring_size * regs.DMA_DESC_SIZE, align=64)
            dcr = s.mmio_read(regs.DCR) & ~regs.dcr_owner_bit(ch)      # owner = card
            s.mmio_write(regs.DCR, dcr & ~regs.dcr_enable_bit(ch))      # disabled
            s.mmio_write(self._reg(ch, regs.DCAR), s.mmio_read(self._reg(ch, regs.DCAR)) | regs.DCAR_IM0)
            s.mmio_write(self._reg(ch, regs.DCHERRMSK), 0)
            s.mmio_write(self._reg(ch, regs.DRAR_LO), ring & 0xFFFFFFFF)
            size_bits = (self.ring_size & regs.DRAR_HI_SIZE_MASK) << regs.DRAR_HI_SIZE_SHIFT
            s.mmio_write(self._reg(ch, regs.DRAR_HI), size_bits | (ring >> 32) & regs.DRAR_HI_CARD_ADDR_MASK)
            self.heads[ch] = s.mmio_read(self._reg(ch, regs.DTPR))
            s.mmio_write(self._reg(ch, regs.DCAR), s.mmio_read(self._reg(ch, regs.DCAR)) & ~regs.DCAR_IM0)
            s.mmio_write(regs.DCR, s.mmio_read(regs.DCR) | regs.dcr_enable_bit(ch))
            err, stat = s.mmio_read(self._reg(ch, regs.DCHERR)), s.mmio_read(self._reg(ch, regs.DSTAT))
            if err or stat & regs.DSTAT_QUIESCED:
                raise CardDmaError(f"DMA channel {ch}: DCHERR={err:#x} DSTAT={stat:#x} after enabling (-EBUSY)")

    def shutdown(self) -> None:
        s = self.side
        for ch in self.rings:
            s.mmio_write(regs.DCR, s.mmio_read(regs.DCR) & ~regs.dcr_enable_bit(ch))
            s.mmio_write(self._reg(ch, regs.DCAR), s.mmio_read(self._reg(ch, regs.DCAR)) | regs.DCAR_IM0)
        s.set_dma_interrupt(None)

    def _interrupt(self, ch: int) -> None:
        with self._lock:
            self.interrupts[ch] += 1

    def status(self) -> dict:
        return {"channels": sorted(self.rings), "rings": {str(ch): a for ch, a in sorted(self.rings.items())},
                "ring_size": self.ring_size, "interrupts": self.interrupts[4:]}
