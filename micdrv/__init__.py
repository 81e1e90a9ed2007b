"""micdrv: a user-space host driver for Intel Xeon Phi MIC X100 cards.

The layers, from the bottom (see ../shared/design/ARCHITECTURE.md):

* :mod:`micdrv.pci` -- the only way to reach a card: :class:`~micdrv.pci.PciDevice`
  over kernel VFIO (a real card) or vfio-user (the simulated card).
"""

__version__ = "0.1.0"
