"""The card's IP stack: Ethernet, ARP, IPv4, ICMP and UDP on the card's network interface.

Enough of RFC 826 / 791 / 792 / 768 for what a MIC card's network was used
for in tests and benchmarks: being pinged, pinging, UDP. No TCP, no IP
options, no fragmentation: the interface MTU (64512 by default, spec 6.2)
holds a 64000-byte datagram in one frame, so received fragments are dropped
and counted, and sends larger than the MTU fail with EMSGSIZE (as a socket
with DF set does).

**Receive** (:meth:`IpStack.receive`, on the interface's worker thread):
Ethernet destination ours or broadcast; ARP requests for our address are
answered and their sender learnt, replies fill the cache; IPv4 header
checksummed, length checked, addressed to us (or broadcast, UDP only);
then ICMP echo requests are answered (to the frame's source MAC: no ARP
needed to reply), echo replies go to the waiting ``ping``, UDP datagrams to
the handler bound to their port (none -> ICMP port unreachable, as Linux).

**Checksums** of ICMP and UDP, per the virtio-net header the host wrote
(virtio-legacy.md 2.3): DATA_VALID -- the host verified it, not checked
again; NEEDS_CSUM -- the field holds only the pseudo-header sum (the host's
stack left it for a device that never computes it on a local path),
accepted like Linux's CHECKSUM_PARTIAL; otherwise verified here
(:mod:`.ip_csum`, one C-speed pass) and dropped if wrong. UDP leaves with a
partial checksum when the device acked CSUM, else a full one. A UDP reply
that carries the payload its handler was just given (the echo) may leave
from the receive buffer (:meth:`IpStack.send_ip` ``in_place``).

**Transmit** (:meth:`IpStack.send_ip` and the UDP / ICMP helpers): the
next hop is the destination if on-link, else the gateway (if configured);
its MAC from the ARP cache, resolved on demand (three requests a second
apart) by callers that may block -- shell commands and the benchmark
source, never the worker, which replies to the MAC a request came from.

The ARP cache is small (256 entries, oldest evicted) and entries live 300 s
[choice: Linux's neighbour entries go stale sooner but are kept while used].
"""

from __future__ import annotations

import ipaddress
import itertools
import struct
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from micdrv.virtio import net as N

from . import ip_csum
from .ip_config import IpConfig

if TYPE_CHECKING:
    from .net import NetDriver

ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
ETH_HLEN = 14
BROADCAST_MAC = b"\xff" * 6
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
ICMP_ECHOREPLY, ICMP_DEST_UNREACH, ICMP_ECHO = 0, 3, 8
ICMP_PROT_UNREACH, ICMP_PORT_UNREACH = 2, 3
IP_DF, IP_MF, IP_OFFMASK = 0x4000, 0x2000, 0x1FFF
TTL = 64
IP_HLEN, UDP_HLEN, ICMP_HLEN = 20, 8, 8
ARP_CACHE_SIZE = 256
ARP_LIFETIME = 300.0
ARP_TRIES, ARP_INTERVAL = 3, 1.0

ETH = struct.Struct("!6s6sH")
ETH_IPV4 = struct.Struct("!6s6sHBBHHHBBH4s4s")   # an Ethernet header and an IPv4 header without options, one pack
ETH_IPV4_UDP = struct.Struct("!6s6sHBBHHHBBH4s4sHHHH")   # ... and a UDP header
ARP = struct.Struct("!HHBBH6s4s6s4s")       # RFC 826 for Ethernet / IPv4
IPV4 = struct.Struct("!BBHHHBBH4s4s")       # RFC 791 header without options
UDP = struct.Struct("!HHHH")
ICMP_ECHO_HDR = struct.Struct("!BBHHH")     # type, code, checksum, identifier, sequence

UdpHandler = Callable[[bytes, int, memoryview, bytes], None]   # (src ip, src port, payload, src MAC)
EchoWaiter = Callable[[int, memoryview, int, float], None]     # (seq, data, ttl, monotonic time)


class NetError(OSError):
    """A send that cannot be done; ``errno``-like names in the message (ENETUNREACH, EHOSTUNREACH, EMSGSIZE)."""


def ip_bytes(addr: str | bytes | ipaddress.IPv4Address) -> bytes:
    if isinstance(addr, bytes):
        return addr
    return ipaddress.IPv4Address(addr).packed


def ip_text(raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw))


class IpStack:
    """The card's one IP stack; one configured interface (the first virtio-net device)."""

    def __init__(self, config: IpConfig, printk: Callable[[str], None]):
        self.config = config
        self.printk = printk
        self.netdev: "NetDriver | None" = None
        self.ip = config.ip.packed
        self._mask = int(config.network.netmask)
        self._net = int(config.network.network_address)
        self._bcast = config.network.broadcast_address.packed
        # The sums of what every header we send repeats (RFC 1071: a 4-byte address read as one big-endian
        # integer is congruent to the sum of its two words modulo 0xFFFF, see ip_csum): IPv4 version/IHL,
        # DF and TTL with our address; the pseudo-header's source.
        self._ip_sum = 0x4500 + IP_DF + (TTL << 8) + int.from_bytes(self.ip, "big")
        self._src_sum = int.from_bytes(self.ip, "big")
        # The payload a UDP handler is being given (the worker thread's, during the call) and its offset in
        # the frame: a reply carrying that very payload may go back from the receive buffer (udp_send).
        self._rx_payload: memoryview | None = None
        self._rx_payload_at = 0
        self._arp: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()
        self._arp_cv = threading.Condition()
        self._udp: dict[int, UdpHandler] = {}
        self._echo_waiters: dict[int, EchoWaiter] = {}
        self._lock = threading.Lock()
        self._ident = itertools.count(1)
        self._ephemeral = itertools.cycle(range(32768, 61000))   # Linux's ip_local_port_range
        self.c = dict.fromkeys(("eth_in", "eth_other", "arp_in", "arp_out", "ip_in", "ip_out", "ip_bad", "ip_frag",
                                "ip_not_ours", "icmp_in", "icmp_out", "echo_replied", "udp_in", "udp_out",
                                "udp_no_port", "csum_errors", "csum_offloaded", "csum_trusted", "proto_unknown",
                                "tcp_dropped"), 0)

    # --- interfaces --------------------------------------------------------------------------
    def attach(self, netdev: "NetDriver") -> bool:
        """Give ``netdev`` the configured address if no interface has it yet; True if it got it."""
        with self._lock:
            if self.netdev is not None:
                return False
            self.netdev = netdev
        self.printk(f"IPv4: {netdev.ifname}: {self.config.address} ({self.config.source})")
        return True

    def detach(self, netdev: "NetDriver") -> None:
        with self._lock:
            if self.netdev is netdev:
                self.netdev = None
                self._arp.clear()

    def on_link(self, ip: bytes) -> bool:
        return int.from_bytes(ip, "big") & self._mask == self._net

    # --- ARP -----------------------------------------------------------------------------------
    def _learn(self, ip: bytes, mac: bytes, create: bool) -> None:
        with self._arp_cv:
            if ip in self._arp or create:
                self._arp[ip] = (mac, time.monotonic())
                self._arp.move_to_end(ip)
                while len(self._arp) > ARP_CACHE_SIZE:
                    self._arp.popitem(last=False)
                self._arp_cv.notify_all()

    def _cached(self, ip: bytes) -> bytes | None:
        hit = self._arp.get(ip)
        if hit is None or time.monotonic() - hit[1] > ARP_LIFETIME:
            return None
        return hit[0]

    def arp_table(self) -> list[tuple[str, str, float]]:
        now = time.monotonic()
        with self._arp_cv:
            return [(ip_text(ip), ":".join(f"{b:02x}" for b in mac), now - t) for ip, (mac, t) in self._arp.items()]

    def resolve(self, ip: bytes, timeout_each: float = ARP_INTERVAL, tries: int = ARP_TRIES) -> bytes:
        """The MAC of on-link ``ip`` (blocking; not for the worker thread). EHOSTUNREACH if nobody answers."""
        if ip == self._bcast or ip == b"\xff\xff\xff\xff":
            return BROADCAST_MAC
        for _ in range(tries):
            with self._arp_cv:
                mac = self._cached(ip)
                if mac is not None:
                    return mac
            self._arp_request(ip)
            deadline = time.monotonic() + timeout_each
            with self._arp_cv:
                while (mac := self._cached(ip)) is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._arp_cv.wait(left)
                if mac is not None:
                    return mac
        raise NetError(f"EHOSTUNREACH: no ARP reply from {ip_text(ip)}")

    def _arp_request(self, ip: bytes) -> None:
        dev = self._dev()
        pkt = ARP.pack(1, ETH_P_IP, 6, 4, 1, dev.mac, self.ip, bytes(6), ip)
        self.c["arp_out"] += 1
        dev.xmit([ETH.pack(BROADCAST_MAC, dev.mac, ETH_P_ARP), pkt])

    def _arp_in(self, dev: "NetDriver", frame: memoryview) -> None:
        if len(frame) < ETH_HLEN + ARP.size:
            self.c["ip_bad"] += 1
            return
        htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = ARP.unpack_from(frame, ETH_HLEN)
        if htype != 1 or ptype != ETH_P_IP or hlen != 6 or plen != 4:
            return
        self.c["arp_in"] += 1
        for_us = tpa == self.ip
        if self.on_link(spa) and spa != self.ip:
            self._learn(spa, sha, create=for_us)   # RFC 826 "merge", new entries only when addressed to us
        if op == 1 and for_us:
            self.c["arp_out"] += 1
            dev.xmit([ETH.pack(sha, dev.mac, ETH_P_ARP), ARP.pack(1, ETH_P_IP, 6, 4, 2, dev.mac, self.ip, sha, spa)])

    # --- receive ---------------------------------------------------------------------------------
    def receive(self, dev: "NetDriver", hdr_flags: int, frame: memoryview) -> None:
        """One received frame (valid only during the call) with the flags of its virtio-net header."""
        if dev is not self.netdev:
            return
        c = self.c
        c["eth_in"] += 1
        if len(frame) >= ETH_HLEN + IP_HLEN:     # the Ethernet header and what would be an IPv4 one: one unpack
            dst_mac, src_mac, ethertype, vihl, _tos, total, _ident, frag, ttl, proto, _sum, src, dst = \
                ETH_IPV4.unpack_from(frame)
        else:
            dst_mac, src_mac, ethertype = ETH.unpack_from(frame)
        if dst_mac != dev.mac and dst_mac != BROADCAST_MAC:
            c["eth_other"] += 1      # multicast (IPv6 neighbour discovery, ...) or another host's
            return
        if ethertype != ETH_P_IP:
            if ethertype == ETH_P_ARP:
                self._arp_in(dev, frame)
            else:
                c["proto_unknown"] += 1
            return
        # IPv4
        if len(frame) < ETH_HLEN + IP_HLEN:
            c["ip_bad"] += 1
            return
        ihl = (vihl & 0xF) * 4
        # The header checksum: ip_csum.valid(ip_csum.partial(header)), inline (every header is even-sized).
        if vihl >> 4 != 4 or ihl < IP_HLEN or total < ihl or ETH_HLEN + total > len(frame) or \
                int.from_bytes(frame[ETH_HLEN:ETH_HLEN + ihl], "big") % 0xFFFF:
            c["ip_bad"] += 1
            return
        c["ip_in"] += 1
        broadcast = False
        if dst != self.ip:
            broadcast = dst == self._bcast or dst == b"\xff\xff\xff\xff"
            if not broadcast:
                c["ip_not_ours"] += 1     # no forwarding
                return
        if frag & (IP_MF | IP_OFFMASK):
            c["ip_frag"] += 1         # no reassembly (see the module docstring)
            return
        datagram = frame[ETH_HLEN:ETH_HLEN + total]
        if hdr_flags & N.VIRTIO_NET_HDR_F_DATA_VALID:
            c["csum_trusted"] += 1
            trusted = True
        elif hdr_flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM:
            c["csum_offloaded"] += 1
            trusted = True
        else:
            trusted = False
        if proto == IPPROTO_UDP:
            self._udp_in(src, dst, datagram, ihl, trusted, src_mac, broadcast)
        elif proto == IPPROTO_ICMP and not broadcast:
            self._icmp_in(src, datagram[ihl:], trusted, src_mac, ttl)
        elif not broadcast:
            c["tcp_dropped" if proto == IPPROTO_TCP else "proto_unknown"] += 1
            self._unreachable(src, src_mac, ICMP_PROT_UNREACH, datagram[:ihl + 8])

    def _icmp_in(self, src: bytes, msg: memoryview, trusted: bool, src_mac: bytes, ttl: int) -> None:
        if len(msg) < ICMP_HLEN:
            self.c["ip_bad"] += 1
            return
        if not trusted and not ip_csum.valid(ip_csum.partial(msg)):
            self.c["csum_errors"] += 1
            return
        self.c["icmp_in"] += 1
        type_, _code, _sum, ident, seq = ICMP_ECHO_HDR.unpack_from(msg)
        if type_ == ICMP_ECHO:
            data = msg[ICMP_HLEN:]
            head = ICMP_ECHO_HDR.pack(ICMP_ECHOREPLY, 0, 0, ident, seq)
            head = ICMP_ECHO_HDR.pack(ICMP_ECHOREPLY, 0, ip_csum.checksum(data, ip_csum.partial(head)), ident, seq)
            if self.send_ip(src, IPPROTO_ICMP, [head, data], dst_mac=src_mac):
                self.c["echo_replied"] += 1
        elif type_ == ICMP_ECHOREPLY:
            waiter = self._echo_waiters.get(ident)
            if waiter is not None:
                waiter(seq, msg[ICMP_HLEN:], ttl, time.monotonic())

    def _udp_in(self, src: bytes, dst: bytes, datagram: memoryview, ihl: int, trusted: bool, src_mac: bytes,
                broadcast: bool) -> None:
        c = self.c
        if len(datagram) < ihl + UDP_HLEN:
            c["ip_bad"] += 1
            return
        sport, dport, ulen, csum = UDP.unpack_from(datagram, ihl)
        if ulen < UDP_HLEN or ihl + ulen > len(datagram):
            c["ip_bad"] += 1
            return
        if csum and not trusted:
            seg = datagram[ihl:ihl + ulen]
            if not ip_csum.valid(ip_csum.partial(seg) + ip_csum.pseudo_header(src, dst, IPPROTO_UDP, ulen)):
                c["csum_errors"] += 1
                return
        c["udp_in"] += 1
        handler = self._udp.get(dport)
        if handler is None:
            c["udp_no_port"] += 1
            if not broadcast:
                self._unreachable(src, src_mac, ICMP_PORT_UNREACH, datagram[:ihl + UDP_HLEN])
            return
        payload = datagram[ihl + UDP_HLEN:ihl + ulen]
        self._rx_payload, self._rx_payload_at = payload, ETH_HLEN + ihl + UDP_HLEN
        try:
            handler(src, sport, payload, src_mac)
        finally:
            self._rx_payload = None

    def _unreachable(self, dst: bytes, dst_mac: bytes, code: int, quote: memoryview) -> None:
        """ICMP destination unreachable quoting the offending IP header and 8 bytes of data (RFC 792)."""
        quoted = bytes(quote)
        head = struct.pack("!BBHI", ICMP_DEST_UNREACH, code, 0, 0)
        head = struct.pack("!BBHI", ICMP_DEST_UNREACH, code, ip_csum.checksum(quoted, ip_csum.partial(head)), 0)
        self.send_ip(dst, IPPROTO_ICMP, [head, quoted], dst_mac=dst_mac, wait=0.0)

    # --- transmit ----------------------------------------------------------------------------------
    def _dev(self) -> "NetDriver":
        dev = self.netdev
        if dev is None:
            raise NetError("ENETDOWN: no network interface")
        return dev

    def next_hop(self, dst: bytes) -> bytes:
        if self.on_link(dst) or dst == b"\xff\xff\xff\xff":
            return dst
        if self.config.gateway is not None:
            return self.config.gateway.packed
        raise NetError(f"ENETUNREACH: {ip_text(dst)} is not on {self.config.network} and there is no gateway")

    def send_ip(self, dst: bytes, proto: int, parts: list, dst_mac: bytes | None = None,
                csum: tuple[int, int] | None = None, kick: bool = True, wait: float | None = None,
                in_place: bool = False) -> bool:
        """One IPv4 datagram of ``parts`` (the L4 header and data); False if the interface dropped it.

        ``csum`` = (start, offset) inside the L4 data for a partial checksum
        the device completes. Without ``dst_mac`` the next hop is resolved
        (may block up to 3 s). ``in_place``: ``parts`` are a header and the
        payload of the frame being received, which lies right after where
        the headers go: the device may send the frame from its receive buffer
        (:meth:`NetDriver.xmit_in_place`) instead of copying it.
        """
        dev = self.netdev
        if dev is None:
            raise NetError("ENETDOWN: no network interface")
        length = 0
        for p in parts:
            length += len(p)
        total = IP_HLEN + length
        if total > dev.mtu:
            raise NetError(f"EMSGSIZE: a {total}-byte datagram exceeds {dev.ifname}'s MTU {dev.mtu}")
        if dst_mac is None:
            dst_mac = self.resolve(self.next_hop(dst))
        ident = next(self._ident) & 0xFFFF
        # The header checksum from the sums of its fields (what ip_csum.checksum of the packed header gives).
        hsum = ip_csum.finish(self._ip_sum + total + ident + proto + int.from_bytes(dst, "big"))
        c = self.c
        c["ip_out"] += 1
        if proto == IPPROTO_ICMP:
            c["icmp_out"] += 1
        off = None if csum is None else (ETH_HLEN + IP_HLEN + csum[0], csum[1])
        # The headers as one piece (Ethernet + IPv4 + the L4 header): one copy into the frame, not three.
        head = ETH_IPV4.pack(dst_mac, dev.mac, ETH_P_IP, 0x45, 0, total, ident, IP_DF, TTL, proto, hsum, self.ip,
                             dst) + parts[0]
        if in_place and len(parts) == 2 and len(head) == self._rx_payload_at:
            sent = dev.xmit_in_place(head, ETH_HLEN + total, off)
            if sent is not None:
                return sent
        if wait is None:
            return dev.xmit([head, *parts[1:]], off, kick)
        return dev.xmit([head, *parts[1:]], off, kick, wait=wait)

    def udp_send(self, dst: bytes, dport: int, sport: int, payload, dst_mac: bytes | None = None,
                 kick: bool = True) -> bool:
        """One UDP datagram; its checksum partial (NEEDS_CSUM) if the device takes that, else computed.

        What :meth:`send_ip` does, with the three headers packed at once (every echo reply comes here).
        """
        dev = self.netdev
        if dev is None:
            raise NetError("ENETDOWN: no network interface")
        c = self.c
        c["udp_out"] += 1
        ulen = UDP_HLEN + len(payload)
        total = IP_HLEN + ulen
        if total > dev.mtu:
            raise NetError(f"EMSGSIZE: a {total}-byte datagram exceeds {dev.ifname}'s MTU {dev.mtu}")
        if dst_mac is None:
            dst_mac = self.resolve(self.next_hop(dst))
        dst_sum = int.from_bytes(dst, "big")
        # ip_csum.pseudo_header(self.ip, dst, IPPROTO_UDP, ulen), from the sums of its fields.
        seed = self._src_sum + dst_sum + IPPROTO_UDP + ulen
        if dev.csum_tx:
            ucsum = seed % 0xFFFF or 0xFFFF           # ip_csum.fold(seed)
            csum = (ETH_HLEN + IP_HLEN, 6)           # the device completes it (send_ip's ``csum``, in the frame)
        else:
            ucsum = ip_csum.udp_field(ip_csum.finish(seed + sport + dport + ulen + ip_csum.partial(payload)))
            csum = None
        ident = next(self._ident) & 0xFFFF
        hsum = ip_csum.finish(self._ip_sum + total + ident + IPPROTO_UDP + dst_sum)
        c["ip_out"] += 1
        head = ETH_IPV4_UDP.pack(dst_mac, dev.mac, ETH_P_IP, 0x45, 0, total, ident, IP_DF, TTL, IPPROTO_UDP, hsum,
                                 self.ip, dst, sport, dport, ulen, ucsum)
        if payload is self._rx_payload and len(head) == self._rx_payload_at:
            sent = dev.xmit_in_place(head, ETH_HLEN + total, csum)
            if sent is not None:
                return sent
        return dev.xmit([head, payload], csum, kick)

    def flush(self) -> None:
        dev = self.netdev
        if dev is not None:
            dev.flush()

    # --- sockets, such as they are ---------------------------------------------------------------
    def udp_bind(self, port: int, handler: UdpHandler) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"UDP port {port} out of range 1..65535")
        with self._lock:
            if port in self._udp:
                raise NetError(f"EADDRINUSE: UDP port {port} is bound")
            self._udp[port] = handler

    def udp_unbind(self, port: int) -> None:
        with self._lock:
            self._udp.pop(port, None)

    def udp_ports(self) -> list[int]:
        return sorted(self._udp)

    def ephemeral_port(self) -> int:
        with self._lock:
            for _ in range(28232):
                p = next(self._ephemeral)
                if p not in self._udp:
                    return p
        raise NetError("EADDRNOTAVAIL: no free UDP port")

    def echo_listen(self, ident: int, waiter: EchoWaiter | None) -> None:
        """Deliver echo replies with ``ident`` to ``waiter(seq, data, ttl, when)`` (None: stop); ``data`` is
        valid only during the call."""
        with self._lock:
            if waiter is None:
                self._echo_waiters.pop(ident, None)
            else:
                self._echo_waiters[ident] = waiter

    def status(self) -> dict:
        dev = self.netdev
        return {**self.config.as_dict(), "interface": dev.ifname if dev else None, "udp_ports": self.udp_ports(),
                "arp": [{"ip": ip, "mac": mac} for ip, mac, _age in self.arp_table()], "counters": dict(self.c)}
