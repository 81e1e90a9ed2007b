"""The X100 hardware: identity, registers, interrupts, SMPT, reset, DMA (spec sections 1, 2, 4).

* :mod:`.regs`, :mod:`.ids` -- the register map and PCI identity (shared with the simulated card);
* :mod:`.mmio` -- BAR4 registers and the BAR0 aperture;
* :mod:`.interrupts` -- MSI-X/MSI/INTx, MXAR routing, ack and workarounds, dispatch;
* :mod:`.smpt` -- the System Memory Page Table and THE Iova -> CardPhys conversion;
* :mod:`.card` -- :class:`X100`: probe, scratch pads, doorbells, reset/ready, post code;
* :mod:`.dma_desc`, :mod:`.dma_channel`, :mod:`.dma` -- the DMA engine driver for host channels 0-3;
* :mod:`.hwops` -- the Protocols COSM, VOP and SCIF program against;
* :mod:`.errors` -- the layer's exceptions.
"""

from .card import DownloadInfo, X100
from .dma import DmaCompletion, DmaEngine
from .errors import (CardNotReady, DmaChannelBusy, DmaChannelError, DmaError, DmaTimeout, InterruptError,
                     NotX100Error, SmptError, X100Error)
from .interrupts import InterruptThread, IntrType, IrqMode

__all__ = [
    "DownloadInfo", "X100", "DmaCompletion", "DmaEngine", "CardNotReady", "DmaChannelBusy", "DmaChannelError",
    "DmaError", "DmaTimeout", "InterruptError", "NotX100Error", "SmptError", "X100Error", "InterruptThread",
    "IntrType", "IrqMode",
]
