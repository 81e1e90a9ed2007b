"""The card kernel's virtio bus: what a transport gives a virtio driver, and what a driver is (card side).

This is Linux's ``struct virtio_device`` + ``virtio_config_ops`` +
``struct virtio_driver`` for the simulated card OS, so the card's device
drivers (virtio-net with its IP stack, virtio-blk, virtio-console with its
shell) are written once and run on any transport:

* the card's **VOP** transport (spec 5.4: device page entries, vrings the
  host allocated, used rings in card memory, doorbells), the way the real
  card ran them;
* a **direct** transport for tests, whose rings live in memory shared with a
  :class:`backends.direct.DirectTransport` on the host side.

A transport creates one :class:`VirtioDevice` per device it finds and hands
it to the driver registered for its device ID (:func:`match`). The legacy
initialisation sequence (virtio-legacy.md section 5) is the driver's, as in
Linux: ACKNOWLEDGE and DRIVER (the transport sets both before ``probe``),
read the host features, ``finalize_features(accepted)``, ``find_vqs``, set
up what the device needs, then DRIVER_OK.

Callbacks (a queue's interrupt handler, ``config_changed``) run on the
transport's interrupt thread; a driver must not block in them.

Memory: every ring and every buffer a driver hands a device is card memory
(card physical addresses) reached through :attr:`VirtioDevice.memory`, a
bounds-checked :class:`~micdrv.memory.Memory`; the driver allocates buffers
with :meth:`VirtioDevice.alloc` so a transport can place them where the host
can reach them.
"""

from __future__ import annotations

import abc
from typing import Callable, Sequence

from micdrv.memory import Memory
from micdrv.virtio.driver import DriverRing

QueueCallback = Callable[["Virtqueue"], None]


class Virtqueue:
    """One queue as a driver uses it: the driver side of the ring, and a kick that tells the host.

    ``ring`` is a :class:`~micdrv.virtio.driver.DriverRing` in card memory:
    ``ring.add(out, in_, token)`` then :meth:`kick` (which asks
    ``ring.kick_prepare()`` first), ``ring.get_used()`` in the callback.
    """

    def __init__(self, index: int, ring: DriverRing, notify: Callable[[], None], name: str = ""):
        self.index = index
        self.ring = ring
        self._notify = notify
        self.name = name or f"vq{index}"
        self.callback: QueueCallback | None = None
        self.kicks = 0
        self.interrupts = 0

    @property
    def num(self) -> int:
        return self.ring.num

    def kick(self) -> bool:
        """``virtqueue_kick``: notify the device if it wants to be notified; True if it was."""
        if self.ring.kick_prepare():
            self.kicks += 1
            self._notify()
            return True
        return False

    def interrupt(self) -> None:
        """Called by the transport when the device signalled this queue (``vring_interrupt``)."""
        self.interrupts += 1
        cb = self.callback
        if cb is not None:
            cb(self)


class VirtioDevice(abc.ABC):
    """One device as its driver sees it; a transport implements the abstract methods."""

    device_id: int      # virtio device ID (1 net, 2 block, 3 console)
    index: int          # the transport's number for it (its slot)
    memory: Memory      # card memory: rings and buffers
    name: str

    @abc.abstractmethod
    def host_features(self) -> int:
        """The device's feature bits (the host's bitmap; 32 bits on VOP)."""

    @abc.abstractmethod
    def finalize_features(self, accepted: int) -> None:
        """Write the driver's accepted features (a subset of :meth:`host_features`)."""

    @abc.abstractmethod
    def read_config(self, offset: int, length: int) -> bytes:
        """Bytes of the device's config space."""

    @abc.abstractmethod
    def get_status(self) -> int: ...

    @abc.abstractmethod
    def set_status(self, status: int) -> None:
        """Write the virtio status byte (the transport tells the host, spec 5.4 "Status writes")."""

    @abc.abstractmethod
    def find_vqs(self, callbacks: Sequence[QueueCallback | None]) -> list[Virtqueue]:
        """Set up one queue per callback (their sizes are the device's), interrupts on."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Reset the device (status 0, queues gone); the driver's remove path calls it."""

    @abc.abstractmethod
    def alloc(self, size: int, align: int = 64) -> int:
        """Card memory for a buffer the device will reach; returns its card physical address."""

    @abc.abstractmethod
    def free(self, addr: int, size: int) -> None: ...


class VirtioDriver(abc.ABC):
    """A driver for one device ID; one instance per device (``struct virtio_driver`` + its private data)."""

    device_id: int
    name: str

    @abc.abstractmethod
    def probe(self, dev: VirtioDevice) -> None:
        """Bring the device up (features, queues, DRIVER_OK). Raise to refuse it (status FAILED)."""

    @abc.abstractmethod
    def remove(self) -> None:
        """The device goes away (hot remove or shutdown): stop using it, give back its buffers."""

    def config_changed(self) -> None:
        """The host changed the config space (spec 5.4 "Config change")."""

    def status(self) -> dict:
        """What the driver is doing, as plain data (the card OS's published record)."""
        return {}


DriverFactory = Callable[[], VirtioDriver]
_registry: dict[int, DriverFactory] = {}


def register(device_id: int, factory: DriverFactory) -> None:
    """``register_virtio_driver``: ``factory()`` makes the driver for each device of ``device_id``."""
    _registry[device_id] = factory


def match(device_id: int) -> DriverFactory | None:
    return _registry.get(device_id)
