"""The PCI device layer: PciDevice over kernel VFIO or vfio-user, and the DmaArena.

See :mod:`micdrv.pci.device` for the interface, :mod:`micdrv.pci.vfio` for
kernel VFIO, :mod:`micdrv.pci.vfio_user` for both ends of vfio-user and
:mod:`micdrv.pci.arena` for DMA memory.
"""

from .arena import Allocation, DmaArena
from .device import (BAR0, BAR4, CONFIG, INTX, MSI, MSIX, DeviceInfo, IrqInfo, PciDevice, RegionInfo,
                     SparseArea, new_eventfd, read_eventfd)
from .errors import (AccessError, DisconnectedError, DmaMapError, GroupNotViableError, IrqError, MemlockError,
                     NoIommuGroupError, NotRootError, PciError, ProtocolError, RegionError, RemoteError,
                     ReplyTimeout, VfioError, VfioUserError)

__all__ = [
    "Allocation", "DmaArena", "BAR0", "BAR4", "CONFIG", "INTX", "MSI", "MSIX", "DeviceInfo", "IrqInfo",
    "PciDevice", "RegionInfo", "SparseArea", "new_eventfd", "read_eventfd", "AccessError", "DisconnectedError",
    "DmaMapError", "GroupNotViableError", "IrqError", "MemlockError", "NoIommuGroupError", "NotRootError",
    "PciError", "ProtocolError", "RegionError", "RemoteError", "ReplyTimeout", "VfioError", "VfioUserError",
]
