"""The address spaces that meet in micdrv, each with its own type.

ARCHITECTURE.md "Addresses": mixing these up is the classic bug, so every
value that crosses a layer carries one of these types and each pair of spaces
is converted in exactly one place.

* host virtual -- a ``memoryview`` or ``mmap`` in the daemon (no int type: we
  never hand raw host pointers around, except to the kernel's MAP_DMA, which
  :class:`micdrv.pci.arena.DmaArena` computes once);
* :data:`Iova` -- what the IOMMU maps for the device; the daemon owns the layout;
* :data:`CardPhys` -- card physical addresses: GDDR offsets (equal to BAR0
  offsets) and the SMPT window from 0x80_0000_0000;
* :data:`BarOffset` -- a byte offset inside one BAR / VFIO region.
"""

from typing import NewType

Iova = NewType("Iova", int)
CardPhys = NewType("CardPhys", int)
BarOffset = NewType("BarOffset", int)
