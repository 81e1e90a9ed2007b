"""The X100 hardware: identity, registers, interrupts, SMPT, reset, DMA (spec sections 1, 2, 4)."""
