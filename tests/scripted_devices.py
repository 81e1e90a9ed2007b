"""Scripted virtio devices for the card drivers' tests: legal on the ring, wrong (or exact) for the device.

A buggy host is more than a broken ring: a device can return runt frames
or headers no driver should accept while following the ring protocol to
the letter. :class:`ScriptedNet` is such a host side behind the real
direct transport: it hands the card exactly the receive chains a test
scripts and keeps every frame the card transmits.
"""

from __future__ import annotations

from backends import iov
from backends.backend import Backend
from micdrv.virtio import net as N
from micdrv.virtio.device import VIRTIO_ID_NET


class ScriptedNet(Backend):
    """A virtio-net device that delivers exactly the receive chains a test scripts, and keeps what is sent."""

    device_id = VIRTIO_ID_NET

    def __init__(self, features: int = 1 << N.VIRTIO_NET_F_MAC, mac: bytes = b"\x02\x00\x00\x00\x00\x01"):
        super().__init__("scripted-net")
        self._features, self.mac = features, mac
        self.sent: list[bytes] = []

    def device_features(self) -> int:
        return self._features

    def queue_sizes(self):
        return (128, 128)

    def config_space(self) -> bytes:
        c = N.virtio_net_config()
        c.mac[:] = self.mac
        return bytes(c)

    def queue_notify(self, index: int) -> None:
        if index == N.TX_QUEUE:
            self.queues[1].drain(lambda ch: self.sent.append(iov.prefix(ch.readable, ch.readable_len)) or 0)

    def deliver(self, stream: bytes, length: int | None = None) -> None:
        """On the loop thread: the next receive chain gets ``stream`` and is returned with ``length``."""
        chain = self.queues[N.RX_QUEUE].pop()
        assert chain is not None, "the card posted no receive buffer"
        n = iov.fill(chain.writable, stream)
        self.queues[N.RX_QUEUE].complete(chain, n if length is None else length)
