"""The device backend interface: what a transport calls, and when.

A backend is the host side of one virtio device (net on a tap, blk on an
image file, console on a pty). It knows its device's formats and its host
resource; it knows nothing of the transport (VOP, the direct transport,
later vhost-user). STYLE.md (rust-vmm vhost-user-backend): a small required
core, defaults for the rest, and every method says when it is called.

Life of a device, as a transport drives it:

1. construction opens the host resource (tap, image, pty); the transport
   reads :attr:`device_id`, :meth:`device_features`, :meth:`queue_sizes`
   and :meth:`config_space` to describe the device to the driver (VOP: the
   device page entry) and registers a config listener;
2. the driver negotiates and sets up its rings; on DRIVER_OK (or the first
   kick, legacy drivers may kick before it) the transport calls
   :meth:`activate` with the acked features, the queues and the owner's
   event loop;
3. kicks arrive as :meth:`queue_notify` calls; backend fds registered with
   the loop call the backend's handlers; both on the loop thread;
4. a driver reset (status 0, VOP's vdev_reset) calls :meth:`reset`: the
   queues are gone, the host resource stays; the device may be activated
   again;
5. :meth:`close` releases the host resource (device removed, daemon exit).

Ring errors (:class:`micdrv.virtio.VringError`) raised inside
``queue_notify`` or a backend fd handler propagate to the transport, which
marks the device broken and calls :meth:`reset`.
"""

from __future__ import annotations

import abc
import logging
from typing import Callable, ClassVar, Sequence

from .eventloop import FdWatcher
from .virtqueue import Virtqueue

log = logging.getLogger(__name__)


class Backend(abc.ABC):
    """The host side of one virtio device."""

    device_id: ClassVar[int]  # virtio device ID (micdrv.virtio.device: net 1, block 2, console 3)

    def __init__(self, name: str):
        self.name = name
        self.features = 0                       # acked features, valid while active
        self.queues: tuple[Virtqueue, ...] = ()
        self.loop: FdWatcher | None = None
        self._config_listener: Callable[[], None] | None = None

    # --- the required core --------------------------------------------------------------------

    @abc.abstractmethod
    def device_features(self) -> int:
        """Device feature bits offered to the driver (transport bits are the transport's to add).

        Called when the transport describes the device, before any driver
        sees it, and may be called again after a reset; the value must not
        change while the device exists.
        """

    @abc.abstractmethod
    def queue_sizes(self) -> Sequence[int]:
        """The device's queues: one entry per queue, its maximum size. Called when the device is described."""

    def staging_bytes(self, index: int) -> int | None:
        """Room for queue ``index``'s buffers that a transport copying them keeps at once (VOP stages each
        chain's payload, spec 5.7), when this device's batches need more than the transport's default;
        None: the default. Called when the device is described."""
        return None

    @abc.abstractmethod
    def config_space(self) -> bytes:
        """The device's config space, current values. Called when the device is described and after every
        :meth:`config_changed`; its length never changes."""

    @abc.abstractmethod
    def queue_notify(self, index: int) -> None:
        """The driver kicked queue ``index``. Called on the loop thread, only while active."""

    # --- defaults -----------------------------------------------------------------------------

    def activate(self, features: int, queues: Sequence[Virtqueue], loop: FdWatcher) -> None:
        """The driver is ready: ``features`` acked, ``queues`` set up, ``loop`` for the backend's fds.

        Called once per driver session on the loop thread, before any
        :meth:`queue_notify`. The default stores the three; subclasses that
        watch fds extend it.
        """
        self.features = features
        self.queues = tuple(queues)
        self.loop = loop

    def reset(self) -> None:
        """The driver reset the device: drop the queues, stop watching fds, keep the host resource.

        Called on the loop thread (also when the transport marks the device
        broken). The default forgets the queues.
        """
        self.features = 0
        self.queues = ()
        self.loop = None

    def config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the config space (legacy drivers may). Default: ignored."""
        log.debug("%s: config write of %d bytes at %d ignored", self.name, len(data), offset)

    def close(self) -> None:
        """Release the host resource. Called once, after :meth:`reset` if the device was active."""

    def counters(self) -> dict[str, int]:
        """Counters for metrics (bytes/packets/requests per direction, errors, drops). Called at any time."""
        return {}

    def describe(self) -> dict:
        """The backend's configuration as JSON-able data (for ``micctl info`` and logs)."""
        return {"name": self.name, "device_id": self.device_id}

    # --- config changes -----------------------------------------------------------------------

    def set_config_listener(self, listener: Callable[[], None] | None) -> None:
        """Called by the transport: ``listener()`` runs whenever the config space changed."""
        self._config_listener = listener

    def config_changed(self) -> None:
        """Tell the transport the config space changed (VOP: config_change = 2, h2c_config_db)."""
        if self._config_listener is not None:
            self._config_listener()

    # --- context manager ----------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
