"""DeviceModel: what a device served over vfio-user is made of.

A model is config space, regions and IRQ counts, plus a few hooks the server
calls. Subclass it, build everything in ``__init__`` and hand it to
:class:`~.server.VfioUserServer`::

    class Edu(DeviceModel):
        def __init__(self):
            cfg = ConfigSpace(0x1234, 0x11e8)
            cfg.add_bar(0, 1 << 20)
            cfg.add_msi(1)
            super().__init__(cfg)
            self.regions[BAR0] = TrappedRegion(1 << 20, self.mmio_read, self.mmio_write)

        def mmio_write(self, offset, data):
            ...
            self.irqs.trigger(MSI, 0)          # raise an interrupt
            self.dma.write(iova, b"...")       # write host memory

The server adds region 7 (config space) itself. :attr:`irqs` and :attr:`dma`
are the server's :class:`~.irqs.Interrupts` and :class:`~.dma.DmaSpace`,
available once the model is attached (in the server's constructor).

Threads: region callbacks, :meth:`reset`, :meth:`connected` and
:meth:`disconnected` run in the server thread, one at a time, in the order
the client's commands arrived (spec 2.6). The model may call ``irqs.trigger``
and ``dma.*`` from any thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..device import INTX, MSI, MSIX
from .config_space import PCI_INTERRUPT_PIN, ConfigSpace
from .regions import Region

if TYPE_CHECKING:
    from .dma import DmaSpace
    from .irqs import Interrupts
    from .server import VfioUserServer


class DeviceModel:
    """Base of a device model: ``config``, ``regions`` {index: Region}, ``irq_counts`` {index: vectors}."""

    def __init__(self, config: ConfigSpace):
        self.config = config
        self.regions: dict[int, Region] = {}
        #: IRQ index -> vector count; None derives it from config space (see :meth:`irq_vector_counts`).
        self.irq_counts: dict[int, int] | None = None
        self.server: VfioUserServer | None = None

    def irq_vector_counts(self) -> dict[int, int]:
        """``irq_counts`` if set, else one INTx line if the header names a pin and the MSI/MSI-X vectors."""
        if self.irq_counts is not None:
            return dict(self.irq_counts)
        cfg = self.config
        return {INTX: 1 if cfg.get(PCI_INTERRUPT_PIN, 1) else 0, MSI: cfg.msi.vectors if cfg.msi else 0,
                MSIX: cfg.msix.vectors if cfg.msix else 0}

    def attach(self, server: "VfioUserServer") -> None:
        """Called once by the server's constructor."""
        self.server = server

    @property
    def irqs(self) -> "Interrupts":
        return self.server.irqs

    @property
    def dma(self) -> "DmaSpace":
        return self.server.dma

    def reset(self) -> None:
        """DEVICE_RESET: called after config space went back to power-on values. Default: nothing else."""

    def connected(self) -> None:
        """A client connected (before its VERSION)."""

    def disconnected(self) -> None:
        """The client went away; its DMA maps and eventfds are already gone. Device state stays (spec 2.6)."""

    def close(self) -> None:
        """The server shuts down: release region memory."""
        for region in self.regions.values():
            region.close()
