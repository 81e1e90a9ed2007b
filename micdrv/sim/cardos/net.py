"""The card's virtio-net driver: eth0 on a virtio device (virtio-legacy.md 2; x100-host-abi.md 6.1, 6.2).

What Linux v5.x ``drivers/net/virtio_net.c`` does, for the card's small IP
stack (:mod:`.ip`):

**Features** (section 2.1). The host offers CSUM | GSO | GUEST_TSO4 |
GUEST_TSO6 | GUEST_ECN (spec 6.1) and MAC. Acked, with why:

* MAC -- the address the host chose (stable across boots); without it a
  random locally administered one, as Linux;
* CSUM -- the stack sends UDP with a partial checksum (NEEDS_CSUM) and the
  host completes it: no Python sum over 64 KiB payloads on transmit;
* GUEST_TSO4 / GUEST_TSO6 / GUEST_ECN -- the host may hand over frames of
  up to 64 KiB. The stack takes any frame that fits a receive buffer and
  drops TCP (it has none), so a TSO frame costs nothing; and the host
  offers no GUEST_CSUM, so these are what makes its tap take TUN_F_CSUM
  (``backends.net.tap_offloads``): host UDP then arrives with NEEDS_CSUM
  (honoured: not verified) instead of a full checksum the card would have
  to verify;
* MTU, STATUS when offered (config ``mtu`` / link state), and the ring
  features INDIRECT_DESC and EVENT_IDX;
* not GSO / HOST_TSO*: the stack never builds a frame larger than the MTU;
  not GUEST_UFO / MRG_RXBUF / CTRL_*: not offered, nothing to gain.
  Offering CTRL_RX, CTRL_VLAN, GUEST_ANNOUNCE, MQ or CTRL_MAC_ADDR without
  CTRL_VQ fails probe, as ``virtnet_validate_features`` does.

**Receive buffers** (section 2.5): non-mergeable, so the mode is fixed at
probe. *Big* when any GUEST_TSO/ECN/UFO is acked or the MTU exceeds 1500 --
the mpssd case, and the only way 64 KiB frames fit -- each buffer the
19-descriptor Linux layout: the 10-byte header alone, 4080 bytes at offset
16 of the same page, 17 more pages, 73722 bytes (one INDIRECT descriptor
when negotiated, else 19 descriptors: 6 buffers in a 128-entry ring, as
Linux). The 18 pages are contiguous here, so a frame is one slice of card
memory. Otherwise *small*: one descriptor of header + 1518 bytes, header
and frame together. The ring is filled at open and refilled after every
receive batch with one kick.

**Transmit** (section 2.6): header in its own 10-byte readable descriptor
(ANY_LAYOUT is not offered), then the frame; one INDIRECT descriptor when
negotiated. Frames the receive worker sends (echo replies, ARP answers) are
kicked once at the end of its batch, as Linux defers the kick while
``xmit_more`` says more frames follow. Buffers come from two slot pools in card memory (2 KiB and
64 KiB + header). Completed chains are reaped lazily on the next transmit
with the transmit interrupt off; a sender that finds no room enables it
and waits (``virtqueue_enable_cb_delayed``'s purpose), so a burst is
"as fast as the ring allows". A reply bigger than a 2 KiB slot that carries
the very payload of the frame being received (the UDP echo) is sent from
the receive buffer itself, its headers written over the received ones --
what XDP_TX does -- instead of being copied (:meth:`NetDriver.xmit_in_place`):
the buffer is posted for receive again when its transmit chain comes back
(reaped after every receive batch while any is out), and at most
LEND_SHARE of the receive buffers are out that way [choice].

**Receive processing** is NAPI: the receive interrupt disables further
receive interrupts and polls right there, in the interrupt's context, as
Linux's softirq runs the poll the hard interrupt scheduled, on the same CPU
-- no other thread is woken for a frame. A poll drains (up to 64 used
entries, ``used.idx`` read once), hands frames to the stack in place (one
view of the receive buffers and one of each transmit pool per batch, taken
through the card bus, so a stopped card OS is refused at the next batch),
kicks once for the replies, refills in one ``avail.idx`` store and one kick,
re-enables and re-checks (the notification-suppression loop of section 1.6,
driver side). The interrupt context never waits: when the transmit ring has
no room for a batch's replies, after a full budget, or while another poll
runs, the poll is left to the device's worker thread (ksoftirqd's part),
which may wait for transmit room and also polls every 0.5 s whatever
happens. Only one context polls at a time (NAPI_STATE_SCHED). Frames shorter
than header + 14, a bad GSO type, or checksum offsets outside the frame are
dropped and counted (section 2.3).

**A buggy host**: anything :class:`~micdrv.virtio.DriverRing` refuses (an
id that is not a head in flight, a used length larger than the buffer,
used.idx running ahead) is Linux's BAD_RING: logged, the device marked
broken and FAILED, every later transmit refused -- the card OS carries on.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from typing import TYPE_CHECKING

from micdrv.virtio import RingFull, VringError
from micdrv.virtio import net as N
from micdrv.virtio.device import (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_ID_NET,
                                  VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, feature_names)

from . import ip_config
from .virtio_bus import VirtioDevice, VirtioDriver, Virtqueue

if TYPE_CHECKING:
    from .drivers import CardDrivers

log = logging.getLogger(__name__)

HDR = struct.Struct("<BBHHHH")     # virtio_net_hdr (section 2.3): flags, gso_type, hdr_len, gso_size, csum_*
HDR_LEN = N.VIRTIO_NET_HDR_SIZE    # 10: MRG_RXBUF is never acked
ETH_HLEN = 14
PAGE = 4096
BIG_DESCS = [HDR_LEN, PAGE - 16] + [PAGE] * 17          # section 2.5: MAX_SKB_FRAGS + 2 = 19 descriptors
BIG_FRAME_OFFSET = 16              # the frame starts at offset 16 of the first page (padded_vnet_hdr)
BIG_BLOCK = 18 * PAGE              # 73728 bytes of card memory per big buffer
SMALL_CAPACITY = HDR_LEN + 1518    # section 2.5: hdr_len + 14 + 4 (VLAN) + 1500
SMALL_TX_SLOT, BIG_TX_SLOT = 2048, 65600   # transmit slot pools; 65600 = mpssd's ALIGN(64 KiB + 14, 64)
BIG_TX_SLOTS = 32                  # 64 KiB frames in flight at most [choice: 2 MiB of card memory]
NAPI_BUDGET = 64                   # frames per receive batch (Linux's NAPI weight)
INLINE_ROUNDS = 4                  # polls in one interrupt before the rest goes to the worker [choice]
LENT = -1                          # transmit token pool of a receive buffer sent back in place (xmit_in_place)
# Receive buffers out on the transmit ring at most (xmit_in_place) [choice]: 15/16 keeps 8 of 128 posted. At 3/4
# a fifth of the 64000-byte echoes at 128 in flight found the share used up and were copied into a big slot (a
# 64 KiB copy holding the GIL); at 15/16 one in twenty, 1.4 us less simulator CPU per echo (alternated runs).
LEND_SHARE = 15 / 16
TX_WAIT = 2.0                      # a transmit waits this long for ring room before the frame is dropped

WANTED = sum(1 << b for b in (N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_TSO4,
                              N.VIRTIO_NET_F_GUEST_TSO6, N.VIRTIO_NET_F_GUEST_ECN, N.VIRTIO_NET_F_MTU,
                              N.VIRTIO_NET_F_STATUS, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX))
BIG_MODE_FEATURES = sum(1 << b for b in (N.VIRTIO_NET_F_GUEST_TSO4, N.VIRTIO_NET_F_GUEST_TSO6,
                                         N.VIRTIO_NET_F_GUEST_ECN, N.VIRTIO_NET_F_GUEST_UFO))
_PLAIN_HDR = HDR.pack(0, 0, 0, 0, 0, 0)  # no offload asked for
GSO_TYPES = {N.VIRTIO_NET_HDR_GSO_NONE, N.VIRTIO_NET_HDR_GSO_TCPV4, N.VIRTIO_NET_HDR_GSO_TCPV6}
_CSUM_HDRS: dict[tuple[int, int], bytes] = {}   # (start, offset) -> its NEEDS_CSUM header, packed once


def _csum_hdr(csum: tuple[int, int]) -> bytes:
    """The virtio-net header asking the device to complete a checksum at ``csum`` = (start, offset)."""
    h = _CSUM_HDRS.get(csum)
    if h is None:
        h = HDR.pack(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, *csum)
        if len(_CSUM_HDRS) < 64:      # a UDP or ICMP header's field: a handful of values at most
            _CSUM_HDRS[csum] = h
    return h


class NetDeviceBroken(Exception):
    """The device broke the ring protocol; the interface no longer moves frames."""


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class _SlotPool:
    """Equal transmit buffers carved from one allocation of card memory."""

    def __init__(self, dev: VirtioDevice, size: int, count: int):
        self.size, self.count = size, count
        self.base = dev.alloc(size * count, PAGE)
        self.free = list(range(count - 1, -1, -1))

    def addr(self, slot: int) -> int:
        return self.base + slot * self.size


class NetDriver(VirtioDriver):
    """One virtio-net device as the card's network interface (``ethN``)."""

    device_id = VIRTIO_ID_NET
    name = "virtio_net"

    def __init__(self, drivers: "CardDrivers", accept: int = WANTED):
        self.drivers = drivers
        self.kernel = drivers.kernel
        self.accept = accept & WANTED
        self.ifname = "eth?"
        self.dev: VirtioDevice | None = None
        self.mac = b""
        self.mtu = ip_config.MPSS_MTU
        self.features = 0
        self.big = False
        self.link_up = True
        self.csum_tx = False          # CSUM acked: UDP may leave with a partial checksum
        self.broken: str | None = None
        self.rx: Virtqueue | None = None
        self.tx: Virtqueue | None = None
        self._rx_bufs: list[tuple[int, int]] = []   # token -> (card address, frame offset)
        self._rx_alloc: list[tuple[int, int]] = []
        self._rx_prepared: list = []                # token -> its chain as DriverRing.prepare built it
        self._rx_area = (0, 0)                      # the receive buffers' one allocation: (card address, bytes)
        self._batch_tx: list | None = None          # the transmit pools' views while the worker runs a batch
        self._rx_view: memoryview | None = None     # the receive area's view while the worker runs a batch
        self._rx_cur: tuple | None = None           # (token, card address, frame offset, frame) being received
        self._lent: set[int] = set()                # receive buffers out on the transmit ring (xmit_in_place)
        self._lent_batch: set[int] = set()          # those of them the current batch sent (the worker's own)
        self._lend_max = 0
        self._returned: list[int] = []              # lent buffers the device completed, to post again (tx lock)
        self._pools: list[_SlotPool] = []
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._tx_room = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._tx_pending = 0          # chains added since the last kick
        self._polling = threading.Lock()   # held by whoever polls (NAPI_STATE_SCHED): the interrupt or the worker
        self._napi_ident: int | None = None   # the polling thread, while it polls: its transmits kick per batch
        self._napi_inline = False             # that poll runs in the interrupt's context: it must not wait
        self.c = dict.fromkeys(("rx_packets", "rx_bytes", "rx_dropped", "rx_short", "rx_bad_header",
                                "rx_batches", "rx_interrupts", "tx_packets", "tx_bytes", "tx_dropped",
                                "tx_too_big", "tx_waits", "tx_interrupts", "tx_in_place", "kicks"), 0)

    # --- probe ---------------------------------------------------------------------------------
    def probe(self, dev: VirtioDevice) -> None:
        offered = dev.host_features()
        if offered & N.NEEDS_CTRL_VQ and not offered >> N.VIRTIO_NET_F_CTRL_VQ & 1:
            raise ValueError(f"device offers {', '.join(feature_names(offered & N.NEEDS_CTRL_VQ, N.FEATURE_NAMES))} "
                             f"without CTRL_VQ (virtnet_validate_features)")
        acked = offered & self.accept
        cfg = dev.read_config(0, N.VIRTIO_NET_CONFIG_SIZE_V54).ljust(N.VIRTIO_NET_CONFIG_SIZE_V54, b"\0")
        config_mtu = struct.unpack_from("<H", cfg, 10)[0]
        if acked >> N.VIRTIO_NET_F_MTU & 1 and config_mtu < ip_config.ETH_MIN_MTU:
            acked &= ~(1 << N.VIRTIO_NET_F_MTU)   # virtnet_validate: a useless MTU is ignored
        dev.finalize_features(acked)
        self.dev, self.features = dev, acked
        self.ifname = self.drivers.claim_ifname(self)
        self.mac = bytes(cfg[0:6]) if acked >> N.VIRTIO_NET_F_MAC & 1 else self._random_mac()
        if acked >> N.VIRTIO_NET_F_MTU & 1:
            self.mtu = min(config_mtu, ip_config.ETH_MAX_MTU)
        else:
            self.mtu = self.kernel.params.mtu or ip_config.MPSS_MTU
        if acked >> N.VIRTIO_NET_F_STATUS & 1:
            self.link_up = bool(struct.unpack_from("<H", cfg, 6)[0] & N.VIRTIO_NET_S_LINK_UP)
        self.csum_tx = bool(acked >> N.VIRTIO_NET_F_CSUM & 1)
        self.big = bool(acked & BIG_MODE_FEATURES) or self.mtu > 1500
        if self.mtu + ETH_HLEN > (BIG_BLOCK - BIG_FRAME_OFFSET if self.big else SMALL_CAPACITY - HDR_LEN):
            self.mtu = (BIG_BLOCK - BIG_FRAME_OFFSET if self.big else 1500 + ETH_HLEN) - ETH_HLEN
        try:
            self.rx, self.tx = dev.find_vqs([self._rx_interrupt, self._tx_interrupt])
            self.tx.ring.disable_cb()          # transmit completions are reaped lazily (see the docstring)
            self._alloc_buffers()
            dev.set_status(dev.get_status() | VIRTIO_CONFIG_S_DRIVER_OK)   # virtio_device_ready
            with self._rx_lock:
                self._refill(range(len(self._rx_bufs)))
        except BaseException:
            self._release(reset=True)
            self.drivers.release_ifname(self)
            raise
        self._worker = threading.Thread(target=self._napi, name=f"napi/{self.ifname}", daemon=True)
        self._worker.start()
        self.kernel.printk(f"virtio_net {dev.name}: {self.ifname}: MAC {format_mac(self.mac)}, mtu {self.mtu}, "
                           f"{'big' if self.big else 'small'} receive buffers ({len(self._rx_bufs)}), features "
                           f"{' '.join(feature_names(acked, N.FEATURE_NAMES))}")
        self.drivers.net_up(self)

    @staticmethod
    def _random_mac() -> bytes:
        raw = bytearray(os.urandom(6))
        raw[0] = (raw[0] & 0xFC) | 0x02    # eth_random_addr: unicast, locally administered
        return bytes(raw)

    def _alloc_buffers(self) -> None:
        dev, ring = self.dev, self.rx.ring
        if self.big:
            per = 1 if ring.use_indirect else len(BIG_DESCS)
            count, block, off = ring.num // per, BIG_BLOCK, BIG_FRAME_OFFSET
        else:
            count, block, off = ring.num, -(-SMALL_CAPACITY // 64) * 64, HDR_LEN
        base = dev.alloc(count * block, PAGE)
        self._rx_alloc.append((base, count * block))
        self._rx_area = (base, count * block)
        self._rx_bufs = [(base + i * block, off) for i in range(count)]
        self._lend_max = int(count * LEND_SHARE)   # the rest always stays posted or in the worker's hands
        self._pools = [_SlotPool(dev, SMALL_TX_SLOT, self.tx.num), _SlotPool(dev, BIG_TX_SLOT, BIG_TX_SLOTS)]

    def _rx_chain(self, addr: int) -> list[tuple[int, int]]:
        if not self.big:
            return [(addr, SMALL_CAPACITY)]
        out, at = [(addr, HDR_LEN)], addr + BIG_FRAME_OFFSET
        for n in BIG_DESCS[1:]:
            out.append((at, n))
            at += n
        return out

    def _refill(self, tokens) -> None:
        """Post receive buffers ``tokens`` and kick once (rx lock held)."""
        ring = self.rx.ring
        prepared = self._rx_prepared
        if not prepared:     # each buffer's chain (its indirect table) is built once, then posted as built
            prepared.extend(ring.prepare((), self._rx_chain(addr)) for addr, _off in self._rx_bufs)
        ring.add_prepared_many([(prepared[t], t) for t in tokens])
        if self.rx.kick():
            self.c["kicks"] += 1

    # --- interrupts (the transport's thread: never block) ------------------------------------------
    def _rx_interrupt(self, vq: Virtqueue) -> None:
        self.c["rx_interrupts"] += 1
        with self._rx_lock:
            if self.broken is None:
                vq.ring.disable_cb()
        if self._stop.is_set() or not self._polling.acquire(blocking=False):
            self._wake.set()        # a poll runs (it re-checks on waking), or we are going away
            return
        try:
            self._napi_ident, self._napi_inline = threading.get_ident(), True
            self._poll(inline=True)
        except Exception as e:      # as the worker: card memory gone (a card reset), or a bug
            if not self._stop.is_set():
                log.exception("%s: receive poll failed", self.ifname)
                self._break(f"receive poll: {type(e).__name__}: {e}")
        finally:
            self._napi_ident, self._napi_inline = None, False
            self._polling.release()

    def _tx_interrupt(self, vq: Virtqueue) -> None:
        self.c["tx_interrupts"] += 1
        self._tx_room.set()

    # --- receive: NAPI polls, in the interrupt or in the worker ---------------------------------------
    def _napi(self) -> None:
        try:
            self._poll_loop()
        except Exception as e:      # card memory gone (a card reset), or a bug: never a silent dead thread
            if not self._stop.is_set():
                log.exception("%s: receive worker failed", self.ifname)
                self._break(f"receive worker: {type(e).__name__}: {e}")

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            with self._polling:
                self._napi_ident = threading.get_ident()
                try:
                    self._poll(inline=False)
                finally:
                    self._napi_ident = None

    def _poll(self, inline: bool) -> None:
        """Receive batches until the ring is empty with interrupts on again (the poller holds ``_polling``).

        ``inline`` (the interrupt's context): at most INLINE_ROUNDS batches,
        and none the transmit ring could not take the replies of without
        waiting; what is left is the worker's, interrupts still off.
        """
        rounds = 0
        budget = NAPI_BUDGET
        while not self._stop.is_set() and self.broken is None:
            if inline:
                rounds += 1
                budget = self._tx_room_for_batch() if rounds <= INLINE_ROUNDS else 0
                if not budget:
                    self._wake.set()
                    return
            try:
                with self._rx_lock:
                    batch = self.rx.ring.get_used_many(budget)
            except VringError as e:
                self._break(str(e))
                break
            if batch:
                self.c["rx_batches"] += 1
                self._receive(batch)
                # The batch's buffers but those it sent in place: they come back (in _returned) when the
                # device completes their transmit chains, which may have happened already.
                lent = self._lent_batch
                tokens = [t for t, _n in batch if t not in lent] if lent else [t for t, _n in batch]
                with self._tx_lock:       # what the batch sent (echo replies, ARP answers): one kick
                    self._kick_tx()
                    if self._lent:
                        self._reap()
                    returned, self._returned = self._returned, []
                with self._rx_lock:
                    try:
                        self._refill(tokens + returned)
                    except (VringError, RingFull) as e:
                        self._break(f"refill: {e}")
                        break
            if len(batch) < budget:
                with self._rx_lock:
                    if self.rx.ring.enable_cb():
                        break           # nothing pending: sleep until the next interrupt
                    self.rx.ring.disable_cb()

    def _tx_room_for_batch(self) -> int:
        """How many frames the next batch in the interrupt's context may take: a reply to each must find
        room without waiting, reaping only if need be (0: the worker's, which may wait).

        A received frame makes at most one reply (echo, ARP or ICMP answer): a descriptor pair (or one
        indirect) on the transmit ring and a small slot, or a big one -- sent in place while the lend
        share lasts, else a big slot. The batch takes no more than that (:meth:`_poll`'s budget): sized
        by what was pending at the check, a batch could take frames that arrived just after it, whose
        replies then found no room and were dropped (1-2 of 30 k 64000-byte echoes at about 1 GB/s)."""
        try:
            with self._rx_lock:
                frames = min(self.rx.ring.used_pending(), NAPI_BUDGET)
        except VringError:
            return NAPI_BUDGET      # the batch itself meets it and breaks the device
        with self._tx_lock:
            room = self._tx_room_now()
            if room < frames:
                self._reap()
                room = self._tx_room_now()
        return min(room, NAPI_BUDGET)

    def _tx_room_now(self) -> int:
        """Replies the transmit side takes now without waiting, whatever their sizes (tx lock held)."""
        ring, (small, big) = self.tx.ring, self._pools
        return min(ring.num_free // (1 if ring.use_indirect else 2), len(small.free),
                   len(big.free) + max(0, self._lend_max - len(self._lent)))

    def _receive(self, batch: list[tuple[int, int]]) -> None:
        """Hand a batch of received frames to the stack, each in place in its receive buffer.

        Card memory is reached through one view of the receive buffers and
        one of each transmit pool for the whole batch (the replies the stack
        sends go into the pools through them, :meth:`xmit`), each frame a
        slice valid during its :meth:`IpStack.receive` call.
        """
        mem, stack, c = self.dev.memory, self.drivers.stack, self.c
        rx_bufs = self._rx_bufs
        base, size = self._rx_area
        area = mem.view(base, size)
        tx_views = [mem.view(p.base, p.size * p.count) for p in self._pools] if area is not None else []
        if tx_views and None not in tx_views:
            self._batch_tx = tx_views
        self._rx_view = area
        self._lent_batch = set()
        packets = nbytes = 0
        try:
            if area is None:
                self._receive_copied(batch)
                return
            for token, n in batch:
                addr, off = rx_bufs[token]
                flen = n - HDR_LEN
                if flen < ETH_HLEN:
                    c["rx_short"] += 1
                    c["rx_dropped"] += 1
                    continue
                at = addr - base
                flags, gso, _hl, gso_size, cstart, coff = HDR.unpack_from(area, at)
                if gso and ((gso & ~N.VIRTIO_NET_HDR_GSO_ECN) not in GSO_TYPES or not gso_size) or \
                        flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM and cstart + coff + 2 > flen:
                    c["rx_bad_header"] += 1
                    c["rx_dropped"] += 1
                    continue
                at += off
                frame = area[at:at + flen]
                packets += 1
                nbytes += flen
                self._rx_cur = (token, addr, off, frame)
                try:
                    stack.receive(self, flags, frame)
                except Exception:
                    log.exception("%s: the stack failed on a %d-byte frame", self.ifname, flen)
                finally:
                    self._rx_cur = None
                    frame.release()
        finally:
            c["rx_packets"] += packets
            c["rx_bytes"] += nbytes
            self._batch_tx = self._rx_view = None
            for v in tx_views:
                if v is not None:
                    v.release()
            if area is not None:
                area.release()

    def _receive_copied(self, batch: list[tuple[int, int]]) -> None:
        """:meth:`_receive` when the receive buffers cannot be viewed: each frame read out of card memory."""
        mem, stack, c, rx_bufs = self.dev.memory, self.drivers.stack, self.c, self._rx_bufs
        for token, n in batch:
            addr, off = rx_bufs[token]
            flen = n - HDR_LEN
            if flen < ETH_HLEN:
                c["rx_short"] += 1
                c["rx_dropped"] += 1
                continue
            flags, gso, _hl, gso_size, cstart, coff = HDR.unpack(mem.read(addr, HDR_LEN))
            if (gso & ~N.VIRTIO_NET_HDR_GSO_ECN) not in GSO_TYPES or (gso and not gso_size) or \
                    flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM and cstart + coff + 2 > flen:
                c["rx_bad_header"] += 1
                c["rx_dropped"] += 1
                continue
            frame = memoryview(mem.read(addr + off, flen))
            c["rx_packets"] += 1
            c["rx_bytes"] += flen
            try:
                stack.receive(self, flags, frame)
            except Exception:
                log.exception("%s: the stack failed on a %d-byte frame", self.ifname, flen)
            finally:
                frame.release()

    # --- transmit ----------------------------------------------------------------------------------
    def xmit(self, parts, csum: tuple[int, int] | None = None, kick: bool = True,
             wait: float = TX_WAIT) -> bool:
        """Send one frame made of ``parts`` (bytes-likes); ``csum`` = (start, offset) for NEEDS_CSUM.

        False if it was dropped (too big, device broken, no room within
        ``wait`` seconds). With ``kick=False`` the device is told only at the
        next kick (:meth:`flush`), or when a later frame has to wait.
        """
        flen = 0
        for p in parts:
            flen += len(p)
        size = HDR_LEN + flen
        c = self.c
        if size > BIG_TX_SLOT:
            c["tx_too_big"] += 1
            return False
        # The virtio-net header and the first part (the frame's headers) as one piece: one store, not two.
        first = (_csum_hdr(csum) if csum else _PLAIN_HDR) + (parts[0] if parts else b"")
        pool_i = 0 if size <= SMALL_TX_SLOT else 1
        batch_tx = None
        if threading.get_ident() == self._napi_ident:
            kick = False      # a reply from a receive poll: kicked once at the end of its batch (_poll)
            batch_tx = self._batch_tx
            if self._napi_inline:
                wait = 0.0    # the interrupt's context never waits (_poll made sure of room for a batch)
        with self._tx_lock:
            if self.broken is not None or self.dev is None:
                slot = None
            else:
                free, ring = self._pools[pool_i].free, self.tx.ring
                if free and ring.num_free >= (1 if ring.use_indirect else 2):
                    slot = free.pop()
                else:
                    slot = self._tx_slot(pool_i, wait)
            if slot is None:
                c["tx_dropped"] += 1
                return False
            pool = self._pools[pool_i]
            addr = pool.base + slot * pool.size
            if batch_tx is not None:            # the worker's view of the pool for its batch
                view, at = batch_tx[pool_i], slot * pool.size
            else:
                view, at = self.dev.memory.view(addr, size), 0
            if view is not None:
                end = at + len(first)
                view[at:end] = first
                for i in range(1, len(parts)):
                    p = parts[i]
                    at, end = end, end + len(p)
                    view[at:end] = p
                if batch_tx is None:
                    view.release()
            else:
                self.dev.memory.write(addr, first + b"".join(bytes(parts[i]) for i in range(1, len(parts))))
            try:
                self.tx.ring.add_pair(addr, HDR_LEN, addr + HDR_LEN, flen, (pool_i, slot))
            except (VringError, RingFull) as e:
                pool.free.append(slot)
                self._break(f"transmit: {e}")
                return False
            self._tx_pending += 1
            c["tx_packets"] += 1
            c["tx_bytes"] += flen
            if kick:
                self._kick_tx()
        return True

    def xmit_in_place(self, head: bytes, flen: int, csum: tuple[int, int] | None = None) -> bool | None:
        """Send the frame being received back from its receive buffer, as XDP_TX does.

        Its first ``flen`` bytes go, ``head`` written over its start. Only from
        the receive worker during :meth:`IpStack.receive`; None when the frame
        cannot go that way (the caller copies it with :meth:`xmit`). Frames
        that fit a small transmit slot are always copied (cheaper than lending
        a buffer); the buffer is posted for receive again once the device
        returns its transmit chain, and at most LEND_SHARE of the buffers are
        out at a time, so the receive ring keeps buffers however long the
        device holds transmit chains.
        """
        cur, area = self._rx_cur, self._rx_view
        if cur is None or area is None or flen + HDR_LEN <= SMALL_TX_SLOT or len(self._lent) >= self._lend_max \
                or threading.get_ident() != self._napi_ident:
            return None
        token, addr, off, frame = cur
        if not len(head) <= flen <= len(frame):
            return None
        with self._tx_lock:
            if self.broken is not None or self.dev is None:
                self.c["tx_dropped"] += 1
                return False
            ring = self.tx.ring
            need = 1 if ring.use_indirect else 2
            if ring.num_free < need:
                self._reap()
                if ring.num_free < need:
                    return None
            frame[:len(head)] = head
            # The header right before the frame (in the big buffers' padding, over the small ones' received
            # header), as XDP_TX puts it in the headroom: header and frame adjacent, one piece for the device.
            at = addr + off - HDR_LEN - self._rx_area[0]
            area[at:at + HDR_LEN] = _csum_hdr(csum) if csum else _PLAIN_HDR
            try:
                ring.add_pair(addr + off - HDR_LEN, HDR_LEN, addr + off, flen, (LENT, token))
            except (VringError, RingFull) as e:
                self._break(f"transmit: {e}")
                return False
            self._lent.add(token)
            self._lent_batch.add(token)
            self._tx_pending += 1
            self.c["tx_packets"] += 1
            self.c["tx_in_place"] += 1
            self.c["tx_bytes"] += flen
        return True

    def flush(self) -> None:
        """Kick the transmit queue if frames were added without a kick."""
        with self._tx_lock:
            self._kick_tx()

    def _kick_tx(self) -> None:
        if self._tx_pending and self.broken is None:
            self._tx_pending = 0
            if self.tx.kick():
                self.c["kicks"] += 1

    def _reap(self) -> None:
        """Give back the slots of completed transmit chains (tx lock held)."""
        pools = self._pools
        try:
            for (pool_i, slot), _n in self.tx.ring.get_all_used():
                if pool_i == LENT:
                    self._lent.discard(slot)
                    self._returned.append(slot)
                else:
                    pools[pool_i].free.append(slot)
        except VringError as e:
            self._break(f"transmit completions: {e}")

    def _tx_slot(self, pool_i: int, wait: float) -> int | None:
        """A free slot with ring room for it (tx lock held), waiting up to ``wait`` s for completions."""
        pool, ring = self._pools[pool_i], self.tx.ring
        need = 1 if ring.use_indirect else 2

        def room() -> bool:
            return bool(pool.free) and ring.num_free >= need

        if not room():
            self._reap()
        if room():
            return pool.free.pop()
        self._kick_tx()                          # what waits in the ring must reach the device first
        self.c["tx_waits"] += 1
        deadline = time.monotonic() + wait
        slot = None
        while self.broken is None and not self._stop.is_set():
            self._tx_room.clear()
            if ring.enable_cb():                 # nothing completed yet: wait for the interrupt
                self._wait_room(min(0.2, max(0.0, deadline - time.monotonic())))
            self._reap()
            if room():
                slot = pool.free.pop()
                break
            if time.monotonic() >= deadline:
                break
        if self.broken is None:
            ring.disable_cb()
        return slot

    def _wait_room(self, timeout: float) -> bool:
        self._tx_lock.release()
        try:
            return self._tx_room.wait(timeout)
        finally:
            self._tx_lock.acquire()

    # --- a broken device -----------------------------------------------------------------------------
    def _break(self, why: str) -> None:
        if self.broken is not None:
            return
        self.broken = why
        self.kernel.printk(f"virtio_net {self.dev.name}: {self.ifname}: BAD_RING: {why}; device marked broken")
        try:
            self.dev.set_status(self.dev.get_status() | VIRTIO_CONFIG_S_FAILED)
        except Exception as e:   # the transport itself may be gone
            log.debug("%s: setting FAILED: %s", self.ifname, e)
        self._tx_room.set()
        self.drivers.changed()

    # --- life cycle -----------------------------------------------------------------------------------
    def _stop_worker(self) -> None:
        self._stop.set()
        self._wake.set()
        self._tx_room.set()
        w = self._worker
        if w is not None and w is not threading.current_thread():
            w.join(5.0)
        if self._napi_ident != threading.get_ident() and self._polling.acquire(timeout=5.0):
            self._polling.release()        # a poll in an interrupt's context has seen the stop

    def _release(self, reset: bool) -> None:
        dev = self.dev
        if dev is None:
            return
        if reset:
            dev.reset()
        for addr, size in self._rx_alloc:
            dev.free(addr, size)
        for p in self._pools:
            dev.free(p.base, p.size * p.count)
        self._rx_alloc, self._pools, self._rx_bufs, self._rx_prepared = [], [], [], []
        self._rx_area = (0, 0)
        self._lent, self._returned = set(), []

    def remove(self) -> None:
        """Hot remove / unbind: stop receiving, reset the device, give back every buffer."""
        self._stop_worker()
        self.drivers.net_down(self)
        with self._rx_lock, self._tx_lock:
            self._release(reset=True)
            self.dev = None
        self.kernel.printk(f"virtio_net: {self.ifname} removed")
        self.drivers.release_ifname(self)

    def shutdown(self) -> None:
        """Kernel power-off: the device is reset so the host stops sending (then it is as removed)."""
        if self.dev is not None:
            self.remove()

    def abandon(self) -> None:
        """The card was reset under us: stop the worker, touch no memory."""
        self._stop.set()
        self._wake.set()
        self._tx_room.set()

    def join(self, timeout: float) -> None:
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)

    def config_changed(self) -> None:
        dev = self.dev
        if dev is not None and self.features >> N.VIRTIO_NET_F_STATUS & 1:
            up = bool(struct.unpack_from("<H", dev.read_config(6, 2))[0] & N.VIRTIO_NET_S_LINK_UP)
            if up != self.link_up:
                self.link_up = up
                self.kernel.printk(f"virtio_net: {self.ifname}: link {'up' if up else 'down'}")

    def status(self) -> dict:
        return {"driver": self.name, "device": self.dev.name if self.dev else None, "ifname": self.ifname,
                "mac": format_mac(self.mac), "mtu": self.mtu, "link_up": self.link_up,
                "features": feature_names(self.features, N.FEATURE_NAMES),
                "rx_mode": "big" if self.big else "small", "rx_buffers": len(self._rx_bufs),
                "indirect": bool(self.rx and self.rx.ring.use_indirect), "broken": self.broken,
                "counters": dict(self.c),
                **({"ipv4": self.drivers.status()} if self.drivers.stack.netdev is self else {})}
