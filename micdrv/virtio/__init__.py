"""Legacy ("0.9.5") virtio: split rings and the net / blk / console formats (virtio-legacy.md).

Transport-independent: nothing here knows about MIC, BARs or doorbells.
The modules, one concept each:

* :mod:`.ring` -- the split-ring layout: ``vring_desc``, avail and used
  parts, flags, ``vring_size``, ``vring_need_event``, :class:`VringError`;
* :mod:`.device` -- device IDs, the status byte, the transport feature bits;
* :mod:`.access` -- reaching one ring part in a :class:`~micdrv.memory.Memory`,
  and the barriers;
* :mod:`.vringh` -- the device side: take chains, validate them, publish used
  entries, notification suppression;
* :mod:`.driver` -- the driver side: add chains, kick, read used entries;
* :mod:`.net`, :mod:`.blk`, :mod:`.console` -- headers, config spaces and
  feature bits of the three devices.

A round trip, driver and device sharing one memory::

    mem = BufferMemory(bytearray(1 << 20))
    drv = DriverRing.legacy(128, mem, 0, 4096)
    dev = Vringh.legacy(128, mem, 0, 4096, buffers=mem)
    head = drv.add(out=[(0x10000, 64)], in_=[(0x20000, 512)])
    chain = dev.pop()              # DescChain: buffers as (addr, len, writable)
    dev.push(chain.head, 512)      # 512 bytes written
    drv.get_used()                 # -> (head, 512)
"""

from .driver import DriverRing, RingFull
from .ring import VringError, VringLayout, vring_need_event, vring_size
from .vringh import Buffer, DescChain, Vringh

__all__ = ["Buffer", "DescChain", "DriverRing", "RingFull", "VringError", "VringLayout", "Vringh",
           "vring_need_event", "vring_size"]
