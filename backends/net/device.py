"""The virtio-net backend: a card's network interface on a host tap (virtio-legacy.md 2; x100-host-abi.md 6.1/6.2).

Queue 0 is the card's receive queue (tap -> card), queue 1 its transmit
queue (card -> tap). The tap speaks the same 10-byte ``virtio_net_hdr`` as
the driver (no MRG_RXBUF), so frames pass through untouched:

* tap -> card: ``readv`` straight into the chain's writable views (the tap
  writes the header first, then the frame; the chain is a byte stream,
  section 2.5);
* card -> tap: ``writev`` of the chain's readable views.

No per-byte Python work: a 64 KiB GSO frame is one vectored syscall over
the chain's views.

Offered features (spec 6.1 plus a MAC): CSUM | GSO | GUEST_TSO4 |
GUEST_TSO6 | GUEST_ECN, and MAC with a stable, locally administered
address; MTU only when asked for. On activation the tap's offloads are
narrowed to what the card acked (:func:`tap_offloads`).

Flow control, never a silent drop:

* no receive buffers posted -> the tap is not read (frames wait in the
  tap's queue, whose own overflow the kernel counts as the tap's tx_dropped)
  until the card kicks queue 0;
* a frame larger than the chain -> dropped, counted ``rx_dropped_oversize``,
  the chain stays available for the next frame (section 6.3 check 11);
* a short transmit chain (less than header + Ethernet header) or a frame
  the tap refuses (EINVAL: a bad GSO header) -> counted ``tx_errors``,
  completed;
* the tap not taking writes (EAGAIN) -> transmit chains wait in the ring
  until the tap is writable.
"""

from __future__ import annotations

import errno
import logging
import os

from micdrv.config import NetConfig
from micdrv.virtio import net as N
from micdrv.virtio.device import VIRTIO_ID_NET

from ..backend import Backend
from ..eventloop import EVENT_READ, EVENT_WRITE
from ..virtqueue import Chain, Drained
from . import link
from .tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, Tap

log = logging.getLogger(__name__)

QUEUE_SIZE = 128
ETH_HLEN = 14
# The largest frame a tap hands out: a 64 KiB GSO packet (IP total length is 16 bits) + Ethernet + VLAN.
MAX_FRAME = 0xFFFF + ETH_HLEN + 4

DEFAULT_FEATURES = N.MPSSD_FEATURES | (1 << N.VIRTIO_NET_F_MAC)
# Staging per queue, for a copying transport [choice: a whole drain batch of 64 KiB frames, twice over --
# a transmit pop of 64 such chains is 4.1 MB. At VOP's 2 MiB default (28 big receive chains) a 64000-byte
# echo took 0.41 arena overflow allocations per datagram and drains waited for the oldest DMA; at 8 MiB
# none, and +5-8 % echo throughput in three alternated pairs. 16 MiB of a card's 64 MiB arena.]
STAGING_BYTES = 8 << 20
RX_BATCH = 8       # receive chains taken at a time (see NetBackend._receive) [choice: 8 of the largest receive
#                    buffers, 73 KiB each, fit a VOP queue's 2 MiB staging twice over]


def tap_offloads(acked: int) -> int:
    """The TUN_F_* offloads a card that acked ``acked`` can receive (QEMU ``virtio_net_apply_guest_offloads``).

    One difference, as mpssd: GUEST_TSO4/6 without GUEST_CSUM still enables
    TUN_F_CSUM, because tun ignores TSO bits without it and a TSO frame is
    always checksum-partial; the Linux driver honours NEEDS_CSUM whatever it
    negotiated (virtio-legacy.md 2.7) [INF: mpssd's working combination].
    """
    def has(bit: int) -> bool:
        return bool(acked >> bit & 1)

    tso4, tso6 = has(N.VIRTIO_NET_F_GUEST_TSO4), has(N.VIRTIO_NET_F_GUEST_TSO6)
    flags = TUN_F_CSUM if (has(N.VIRTIO_NET_F_GUEST_CSUM) or tso4 or tso6) else 0
    if tso4:
        flags |= TUN_F_TSO4
    if tso6:
        flags |= TUN_F_TSO6
    if (tso4 or tso6) and has(N.VIRTIO_NET_F_GUEST_ECN):
        flags |= TUN_F_TSO_ECN
    return flags


class NetBackend(Backend):
    """One virtio-net device on one tap."""

    device_id = VIRTIO_ID_NET
    # A transport may publish a drain's last completions once their copies are done, after drain returned
    # (VOP: its poller), instead of waiting for them: nothing here depends on when the card sees them.
    lazy_completion = True

    def __init__(self, tap: Tap, mac: bytes, name: str | None = None, features: int = DEFAULT_FEATURES,
                 mtu: int | None = None, queue_size: int = QUEUE_SIZE, netns: str | None = None):
        super().__init__(name or f"net:{tap.name}")
        if features & N.NEEDS_CTRL_VQ:
            raise ValueError("features that need a control queue cannot be offered (no CTRL_VQ)")
        self.tap = tap
        self.mac = bytes(mac)
        self.mtu = mtu
        self.netns = netns
        self._features = features | (1 << N.VIRTIO_NET_F_MAC) | ((1 << N.VIRTIO_NET_F_MTU) if mtu else 0)
        self.queue_size = queue_size
        self.hdr_len = N.VIRTIO_NET_HDR_SIZE
        self._overflow = memoryview(bytearray(MAX_FRAME + N.VIRTIO_NET_HDR_MRG_RXBUF_SIZE))
        self._rx_parked = False
        self._tx_stalled = False
        self._watched: int | None = None   # the tap events the loop watches for (None: not watched)
        self._c = dict.fromkeys(("rx_packets", "rx_bytes", "rx_dropped_oversize", "rx_no_buffers", "rx_errors",
                                 "tx_packets", "tx_bytes", "tx_errors", "tx_stalls"), 0)

    def staging_bytes(self, index: int) -> int:
        return STAGING_BYTES

    @classmethod
    def open(cls, card: str, identity: str | None = None, tap: str | None = None, address: str | None = None,
             mtu: int = link.MPSS_MTU, mac: bytes | None = None, bridge: str | None = None,
             netns: str | None = None, offer_mtu: bool = False) -> "NetBackend":
        """Create and configure the tap for ``card`` with MPSS defaults, and serve it.

        ``identity`` (the PCI address, else the card name) seeds the stable
        MACs: the card's (in the config space) and the host end's. With a
        ``bridge`` the tap gets no address unless one is given.
        """
        eff = link.addresses(card, tap, address, bridge=bridge)
        ident = identity or card
        t = Tap(eff.tap)
        try:
            link.configure(t.name, netns=netns, address=eff.host, mtu=mtu, mac=link.stable_mac(f"{ident}/host"),
                           bridge=bridge)
        except BaseException:
            t.close()
            raise
        return cls(t, mac or link.stable_mac(ident), mtu=mtu if offer_mtu else None, netns=netns)

    @classmethod
    def from_config(cls, card: str, cfg: NetConfig, identity: str | None = None) -> "NetBackend":
        """The device a ``[[card.<name>.net]]`` entry describes (micdrv.config.NetConfig)."""
        return cls.open(card, identity, tap=cfg.tap, address=cfg.address, mtu=cfg.mtu,
                        mac=link.parse_mac(cfg.mac) if cfg.mac else None, bridge=cfg.bridge, netns=cfg.netns)

    # --- description --------------------------------------------------------------------------

    def device_features(self) -> int:
        return self._features

    def queue_sizes(self) -> tuple[int, int]:
        return (self.queue_size, self.queue_size)

    def config_space(self) -> bytes:
        c = N.virtio_net_config()
        c.mac[:] = self.mac
        c.status = N.VIRTIO_NET_S_LINK_UP
        c.max_virtqueue_pairs = 1
        c.mtu = self.mtu or 0
        return bytes(c)

    def describe(self) -> dict:
        return {**super().describe(), "tap": self.tap.name, "netns": self.netns, "mac": link.format_mac(self.mac),
                "mtu": self.mtu, "offload": self.tap.offload}

    def counters(self) -> dict[str, int]:
        return dict(self._c)

    # --- life cycle ---------------------------------------------------------------------------

    def activate(self, features, queues, loop) -> None:
        super().activate(features, queues, loop)
        self.hdr_len = N.header_size(features)
        if self.tap.vnet_hdr_size != self.hdr_len:
            raise ValueError(f"{self.name}: the tap carries {self.tap.vnet_hdr_size}-byte headers, the driver "
                             f"{self.hdr_len}")
        self.tap.set_offload(tap_offloads(features))
        self._rx_parked = self._tx_stalled = False
        self._watched = None
        self._watch()

    def reset(self) -> None:
        if self.loop is not None:
            self.loop.unwatch(self.tap.fd)
        self._watched = None
        super().reset()

    def close(self) -> None:
        self.tap.close()

    def _watch(self) -> None:
        events = (0 if self._rx_parked else EVENT_READ) | (EVENT_WRITE if self._tx_stalled else 0)
        if events != self._watched:      # called after every event; the loop is told only of a change
            self.loop.watch(self.tap.fd, events, self._on_tap)
            self._watched = events

    # --- events -------------------------------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        if index == N.RX_QUEUE:
            if self._rx_parked:
                self._rx_parked = False
                self._receive()
        elif index == N.TX_QUEUE:
            self._transmit()
        self._watch()

    def _on_tap(self, events: int) -> None:
        if events & EVENT_WRITE:
            self._tx_stalled = False
            self._transmit()
        if events & EVENT_READ:
            self._receive()
        self._watch()

    # --- tap -> card (queue 0) ----------------------------------------------------------------

    def _receive(self) -> None:
        # Until the tap runs dry (a readv finds nothing: the drain stops and the rest of its batch is given
        # back -- a staging transport keeps such chains staged for the next drain, micdrv/vop/queue.py), in
        # batches of RX_BATCH: the tap's queue cannot be measured beforehand, and asking it (a poll(2)) before
        # each batch costs what the readv that finds it empty does.
        if self.queues[N.RX_QUEUE].drain(self._rx, RX_BATCH) is Drained.EMPTY:
            self._rx_parked = True   # no buffers: frames wait in the tap until the card posts some
            self._c["rx_no_buffers"] += 1

    def _rx(self, chain: Chain) -> int | None:
        cap = chain.writable_len
        if cap < self.hdr_len + ETH_HLEN:
            self._c["rx_errors"] += 1   # a receive buffer no frame fits in: return it empty
            return 0
        # A spill-over buffer after the chain's views: a frame that does not fit is recognised (and
        # dropped) instead of being silently truncated by the kernel.
        iov = chain.writable if cap >= self.hdr_len + MAX_FRAME else [*chain.writable, self._overflow]
        fd = self.tap.fd
        while True:
            try:
                n = os.readv(fd, iov)
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno not in (errno.EIO, errno.EAGAIN):
                    self._c["rx_errors"] += 1
                    log.warning("%s: tap read failed: %s", self.name, e)
                return None
            if n > cap:
                self._c["rx_dropped_oversize"] += 1
                continue          # the same chain takes the next frame
            self._c["rx_packets"] += 1
            self._c["rx_bytes"] += n - self.hdr_len
            return n

    # --- card -> tap (queue 1) ----------------------------------------------------------------

    def _transmit(self) -> None:
        # resume: the transport may fetch a batch's frames while the loop serves the tap (Drained.WAITING),
        # and call _resume_tx once they are in
        if self.queues[N.TX_QUEUE].drain(self._tx, resume=self._resume_tx) is Drained.STOPPED:
            self._tx_stalled = True
            self._c["tx_stalls"] += 1

    def _resume_tx(self) -> None:
        self._transmit()
        self._watch()

    def _tx(self, chain: Chain) -> int | None:
        n = chain.readable_len
        if n < self.hdr_len + ETH_HLEN:
            self._c["tx_errors"] += 1
            return 0
        try:
            os.writev(self.tap.fd, chain.readable)
        except BlockingIOError:
            return None
        except OSError as e:
            self._c["tx_errors"] += 1
            log.debug("%s: tap refused a %d-byte frame: %s", self.name, n - self.hdr_len, e)
            return 0
        self._c["tx_packets"] += 1
        self._c["tx_bytes"] += n - self.hdr_len
        return 0
