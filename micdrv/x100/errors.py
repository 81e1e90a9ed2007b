"""One error hierarchy for the X100 hardware layer.

Like :class:`micdrv.pci.errors.PciError`, every error names the step that
failed, so a message alone tells an operator what the driver was doing. The
PCI layer's own errors (a dead vfio-user socket, a refused mmap) pass through
unchanged: they already name their step.
"""

from __future__ import annotations


class X100Error(Exception):
    """A failure of the X100 hardware layer; ``step`` says what was being done."""

    def __init__(self, step: str, detail: str = ""):
        self.step = step
        self.detail = detail
        super().__init__(f"{step} failed: {detail}" if detail else f"{step} failed")


class NotX100Error(X100Error):
    """The PCI device is not one of the fifteen X100 device IDs (spec 1.1)."""


class InterruptError(X100Error):
    """Interrupt setup or a request the interrupt mode cannot serve (spec 1.3)."""


class CardNotReady(X100Error, TimeoutError):
    """The card did not set SPAD2 bit 0 within the ready timeout after a reset (spec 2.5)."""


class SmptError(X100Error):
    """A host range the SMPT cannot translate for the card (spec 2.4)."""


class DmaError(X100Error):
    """A DMA request the engine cannot take: misaligned, out of range, host to host (spec 4.1)."""


class DmaTimeout(DmaError, TimeoutError):
    """A DMA completion (or ring space) did not arrive in time."""


class DmaChannelBusy(DmaError):
    """Channel setup found DCHERR set or the engine quiesced after enabling (spec 4.4: -EBUSY)."""

    def __init__(self, channel: int, detail: str):
        self.channel = channel
        super().__init__(f"DMA channel {channel} setup", detail)


class DmaChannelError(DmaError):
    """The engine stopped a channel on a descriptor (DCHERR non-zero, spec 4.2).

    ``channel`` is the channel number, ``descriptor`` the ring index of the
    descriptor the hardware stopped at (its tail, DSTAT bits 16:0), ``dcherr``
    the DCHERR value and ``text`` a decoding of that descriptor. The channel
    takes no more work until :meth:`micdrv.x100.dma_channel.DmaChannel.reinit`.
    """

    def __init__(self, channel: int, descriptor: int, dcherr: int, text: str = ""):
        self.channel = channel
        self.descriptor = descriptor
        self.dcherr = dcherr
        self.text = text
        detail = f"DCHERR={dcherr:#x} at descriptor {descriptor}"
        if text:
            detail += f" ({text})"
        super().__init__(f"DMA channel {channel}", detail + "; reinit the channel to use it again")

    def again(self) -> "DmaChannelError":
        """A fresh exception with the same facts, for raising once more without growing a traceback."""
        return DmaChannelError(self.channel, self.descriptor, self.dcherr, self.text)
