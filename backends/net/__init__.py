"""virtio-net on a tap (virtio-legacy.md 2; x100-host-abi.md 6.1/6.2).

* :mod:`.tap` -- :class:`Tap`, /dev/net/tun with IFF_VNET_HDR: ioctls and ``struct ifreq``;
* :mod:`.link` -- the link through pyroute2: MPSS defaults, address, MTU, up/down, bridge,
  network namespace, stable MACs;
* :mod:`.device` -- :class:`NetBackend`, queue 0 tap -> card, queue 1 card -> tap.
"""

from .device import NetBackend, tap_offloads
from .link import LinkError, mpss_defaults, stable_mac
from .tap import Tap, TapError

__all__ = ["LinkError", "NetBackend", "Tap", "TapError", "mpss_defaults", "stable_mac", "tap_offloads"]
