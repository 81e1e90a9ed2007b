"""vfio-user: both ends of the protocol that lets a device live in another process.

vfio-user (spec section 2, QEMU's docs/interop/vfio-user.rst) is VFIO's device
API -- region info and access, IRQ eventfds, DMA mappings, reset -- carried as
messages over an AF_UNIX stream socket, with memory and eventfds passed as
SCM_RIGHTS. micdrv uses it to reach the simulated X100 exactly as it reaches
a real card through kernel VFIO (ARCHITECTURE.md, "The one rule").

A session, from the client's side (spec 2.6, 2.7)::

    VERSION              -> capabilities of both sides          (spec 2.4)
    DMA_MAP  + memfd     -> the server maps the client's arena   (spec 2.5)
    DEVICE_GET_INFO      -> number of regions and IRQ indices
    GET_REGION_INFO (+fd)-> size, flags, sparse areas; mmap the fd
    GET_IRQ_INFO, SET_IRQS + eventfds
    REGION_READ/WRITE    -> trapped register access
    ... server -> client DMA_READ/DMA_WRITE for memory passed without an fd

Modules:

* :mod:`.wire` / :mod:`.protocol` -- the message format and the symmetric
  :class:`~.protocol.Connection` both ends use;
* :mod:`.version` -- VERSION negotiation and capabilities;
* :mod:`.client` -- :class:`~.client.VfioUserDevice`, a
  :class:`~micdrv.pci.PciDevice`;
* the server framework a device model is built on: :mod:`.server`
  (:class:`~.server.VfioUserServer`), :mod:`.model`
  (:class:`~.model.DeviceModel`), :mod:`.config_space`, :mod:`.regions`,
  :mod:`.irqs`, :mod:`.dma`.
"""

from .client import VfioUserDevice
from .config_space import ConfigSpace
from .dma import DmaFault, DmaSpace
from .irqs import Interrupts
from .model import DeviceModel
from .protocol import CommandError, Connection, Message
from .regions import ConfigRegion, MemoryRegion, Region, TrappedRegion
from .server import VfioUserServer
from .version import Capabilities

__all__ = [
    "VfioUserDevice", "ConfigSpace", "DmaFault", "DmaSpace", "Interrupts", "DeviceModel", "CommandError",
    "Connection", "Message", "ConfigRegion", "MemoryRegion", "Region", "TrappedRegion", "VfioUserServer",
    "Capabilities",
]
