"""virtio-net on a real tap in a network namespace the test creates (root; traffic never leaves it).

The test plays the card: a guest driver (tests/virtio_harness.py) with
the card's MAC and IP builds frames (tests/packets.py), answers the host
kernel's ARP, and talks to sockets inside the namespace and to the
namespace's own ICMP and TCP stacks.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

import pytest
from pyroute2 import IPRoute

from backends.net import NetBackend, Tap, TapError, link, stable_mac, tap_offloads
from backends.net.device import MAX_FRAME
from backends.net.link import LinkError
from backends.net.tap import (MPSSD_OFFLOAD, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUNGETFEATURES,
                              TUNGETVNETHDRSZ, TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ, ifreq)
from micdrv.virtio import net as N
from tests import packets as P
from tests.netns_harness import namespace, socket_in
from tests.virtio_harness import WAIT, Guest

pytestmark = pytest.mark.root

HOST_IP, CARD_IP = "172.31.1.254", "172.31.1.1"
BIG = [N.VIRTIO_NET_HDR_SIZE, 4080] + [4096] * 17   # Linux "big packets" receive layout (section 2.5)
_taps = itertools.count()


# --- no root needed: the ABI and the feature mapping -------------------------------------------

def test_tun_ioctl_numbers_and_ifreq_follow_the_headers():
    assert (TUNSETIFF, TUNGETFEATURES, TUNSETOFFLOAD, TUNGETVNETHDRSZ, TUNSETVNETHDRSZ) == \
        (0x400454CA, 0x800454CF, 0x400454D0, 0x800454D7, 0x400454D8)   # virtio-legacy.md 2.7
    import ctypes
    assert ctypes.sizeof(ifreq) == 40 and ifreq.ifr_ifru.offset == 16
    assert MPSSD_OFFLOAD == 0x0F


def test_tap_offloads_follow_what_the_card_acked():
    g = lambda *bits: sum(1 << b for b in bits)  # noqa: E731
    assert tap_offloads(0) == 0
    assert tap_offloads(g(N.VIRTIO_NET_F_GUEST_CSUM)) == TUN_F_CSUM
    assert tap_offloads(N.MPSSD_FEATURES) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    assert tap_offloads(g(N.VIRTIO_NET_F_GUEST_TSO4)) == TUN_F_CSUM | TUN_F_TSO4
    assert tap_offloads(g(N.VIRTIO_NET_F_GUEST_ECN)) == 0  # ECN alone means nothing


def test_effective_addresses_of_a_net_entry():
    assert link.addresses("mic2") == link.NetDefaults("mic2", "172.31.3.254/24", "172.31.3.1")
    assert link.addresses("mic2", bridge="br0").host is None
    assert link.addresses("mic2", bridge="br0", address="10.0.0.1/8").host == "10.0.0.1/8"
    assert link.addresses("0000:03:00.0", tap="t0", address="10.0.0.1/8") == link.NetDefaults("t0", "10.0.0.1/8",
                                                                                              None)


def test_mpss_defaults_and_stable_macs():
    d = link.mpss_defaults("mic0")
    assert (d.tap, d.host, d.card) == ("mic0", "172.31.1.254/24", "172.31.1.1")
    assert link.mpss_defaults("mic7").host == "172.31.8.254/24"
    with pytest.raises(ValueError):
        link.mpss_defaults("card0")
    mac = stable_mac("0000:03:00.0")
    assert mac == stable_mac("0000:03:00.0") != stable_mac("0000:04:00.0")
    assert mac[0] & 0x02 and not mac[0] & 0x01 and len(mac) == 6
    assert link.parse_mac(link.format_mac(mac)) == mac
    with pytest.raises(ValueError, match="multicast"):
        link.parse_mac("01:00:5e:00:00:01")


# --- the card's side of the link ------------------------------------------------------------------

class Card:
    """A guest playing the card's network stack over the virtio-net device."""

    def __init__(self, guest: Guest, ns: str):
        self.g = guest
        self.ns = ns
        be: NetBackend = guest.backend
        self.mac = be.mac
        self.ip = P.ip4(CARD_IP)
        self.host_ip = P.ip4(HOST_IP)
        self.host_mac = bytes.fromhex(link.state(be.tap.name, ns).mac.replace(":", ""))
        self.headers: list[tuple] = []

    def post_rx(self, n: int = 5, layout: list[int] = BIG) -> None:
        for _ in range(n):
            self._post([self.g.alloc(size) for size in layout])

    def _post(self, bufs: list[tuple[int, memoryview]]) -> None:
        self.g.add(N.RX_QUEUE, in_=[(a, len(v)) for a, v in bufs], token=bufs)

    def send(self, frame: bytes, hdr: tuple = (0, 0, 0, 0, 0, 0), split: bool = True) -> None:
        """Transmit: header in its own descriptor (``split``) or in front of the frame (ANY_LAYOUT style)."""
        raw = P.VNET_HDR.pack(*hdr)
        if split:
            h, _ = self.g.alloc(len(raw), raw)
            f, _ = self.g.alloc(len(frame), frame)
            self.g.add(N.TX_QUEUE, out=[(h, len(raw)), (f, len(frame))])
        else:
            b, _ = self.g.alloc(len(raw) + len(frame), raw + frame)
            self.g.add(N.TX_QUEUE, out=[(b, len(raw) + len(frame))])
        self.g.wait(N.TX_QUEUE)

    def ip_frame(self, proto: int, l4: bytes, ident: int = 0) -> bytes:
        return P.eth(self.host_mac, self.mac, P.ETH_P_IP, P.ipv4(self.ip, self.host_ip, proto, l4, ident))

    def recv(self, match, timeout: float = WAIT, repost: bool = True) -> tuple[tuple, P.Frame]:
        """The next received frame ``match`` accepts, answering ARP and skipping the rest (IPv6 noise).

        Every buffer goes back to the ring once read, except the matching
        frame's when ``repost`` is False.
        """
        deadline = time.monotonic() + timeout
        while True:
            bufs, n = self.g.wait(N.RX_QUEUE, max(0.0, deadline - time.monotonic()))
            stream = b"".join(bytes(v) for _a, v in bufs)[:n]
            hdr = P.VNET_HDR.unpack(stream[:N.VIRTIO_NET_HDR_SIZE])
            f = P.Frame.parse(stream[N.VIRTIO_NET_HDR_SIZE:])
            matched = match(f) and not (f.ethertype == P.ETH_P_ARP and f.arp_op == 1)
            if repost or not matched:
                self._post(bufs)
            if f.ethertype == P.ETH_P_ARP and f.arp_op == 1 and f.ip_dst == self.ip:
                self.send(P.eth(f.src, self.mac, P.ETH_P_ARP, P.arp(2, self.mac, self.ip, f.src, f.ip_src)))
                continue
            if matched:
                self.headers.append(hdr)
                return hdr, f

    def ping(self, seq: int = 1) -> P.Frame:
        data = os.urandom(56)
        self.send(self.ip_frame(P.IPPROTO_ICMP, P.icmp_echo(0x4D49, seq, data)))
        _, f = self.recv(lambda f: f.proto == P.IPPROTO_ICMP and f.icmp_type == 0 and f.seq == seq)
        assert f.payload == data and f.ident == 0x4D49 and f.ip_src == self.host_ip
        return f


@pytest.fixture(scope="module")
def ns():
    with namespace() as name:
        yield name


def open_card(ns: str, **kw) -> Card:
    tap = f"mdv{os.getpid() % 100000}t{next(_taps)}"
    be = NetBackend.open("mic0", identity="0000:03:00.0", tap=tap, netns=ns, **kw)
    g = Guest(be, indirect_entries=len(BIG))
    return Card(g, ns)


@pytest.fixture
def card(ns):
    c = open_card(ns)
    yield c
    c.g.close()
    c.g.backend.close()


# --- the tap and its link ------------------------------------------------------------------------

def test_the_tap_is_configured_as_mpss_does(card):
    be: NetBackend = card.g.backend
    st = link.state(be.tap.name, card.ns)
    assert st.mtu == 64512 and st.up and f"{HOST_IP}/24" in st.addresses and st.master is None
    assert st.mac == link.format_mac(stable_mac("0000:03:00.0/host"))
    assert be.tap.vnet_hdr_size_in_kernel() == 10
    assert be.tap.offload == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN   # what the guest acked
    cfg = N.virtio_net_config.from_buffer_copy(card.g.config())
    assert bytes(cfg.mac) == stable_mac("0000:03:00.0") == be.mac and cfg.status == N.VIRTIO_NET_S_LINK_UP
    assert be.device_features() == N.MPSSD_FEATURES | (1 << N.VIRTIO_NET_F_MAC)
    assert be.queue_sizes() == (128, 128)
    assert not os.path.exists(f"/sys/class/net/{be.tap.name}")   # it lives only in the test's namespace


def test_up_down_and_a_bridge(ns):
    with IPRoute(netns=ns) as ip:
        ip.link("add", ifname="mdvbr0", kind="bridge")
    try:
        c = open_card(ns, bridge="mdvbr0")
        try:
            name = c.g.backend.tap.name
            st = link.state(name, ns)
            assert st.master == "mdvbr0" and not any(a.startswith("172.") for a in st.addresses)
            link.set_up(name, False, ns)
            assert not link.state(name, ns).up
            c.send(P.eth(b"\xff" * 6, c.mac, P.ETH_P_ARP, P.arp(1, c.mac, c.ip, bytes(6), c.host_ip)))
            assert c.g.transport.counters()["tx_errors"] == 1      # a down tap refuses frames (EIO)
            link.set_up(name, True, ns)
            assert link.state(name, ns).up
        finally:
            c.g.close()
            c.g.backend.close()
    finally:
        with IPRoute(netns=ns) as ip:
            ip.link("del", index=ip.link_lookup(ifname="mdvbr0")[0])


def test_configuration_errors_are_clear(ns):
    with pytest.raises(LinkError, match="network namespace 'no-such-ns' does not exist"):
        NetBackend.open("mic0", tap=f"mdv{os.getpid() % 100000}x", netns="no-such-ns")
    with pytest.raises(ValueError, match="not a valid interface name"):
        Tap("a/b")
    with pytest.raises(LinkError, match="no such interface"):
        NetBackend.open("mic0", tap=f"mdv{os.getpid() % 100000}y", netns=ns, bridge="no-such-br")
    assert TapError("TUNSETIFF", "x", OSError(16, "busy")).errno == 16


# --- traffic -----------------------------------------------------------------------------------

def test_the_card_pings_the_host(card):
    card.post_rx()
    f = card.ping(1)
    assert f.src == card.host_mac and f.dst == card.mac
    card.ping(2)
    c = card.g.transport.counters()
    assert c["tx_packets"] >= 3 and c["rx_packets"] >= 3   # ARP request/reply + two echoes


def test_udp_both_ways_header_split_or_not(card):
    card.post_rx()
    with socket_in(card.ns) as s:
        s.bind((HOST_IP, 7777))
        s.settimeout(WAIT)
        for split in (True, False):
            data = os.urandom(1200)
            card.send(card.ip_frame(P.IPPROTO_UDP, P.udp(card.ip, card.host_ip, 5555, 7777, data)), split=split)
            got, peer = s.recvfrom(65536)
            assert got == data and peer == (CARD_IP, 5555)
        s.sendto(b"pong" * 100, (CARD_IP, 5555))
        _, f = card.recv(lambda f: f.proto == P.IPPROTO_UDP and f.dport == 5555)
        assert f.payload == b"pong" * 100 and f.sport == 7777


def test_64k_frames_pass_intact_with_their_checksum_offload_headers(card):
    card.post_rx()
    with socket_in(card.ns) as s:
        s.bind((HOST_IP, 7778))
        s.settimeout(WAIT)
        data = os.urandom(64000)
        # Card -> host: one 64042-byte frame with a partial UDP checksum for the host to finish (NEEDS_CSUM).
        frame = card.ip_frame(P.IPPROTO_UDP, P.udp(card.ip, card.host_ip, 5556, 7778, data, partial=True))
        card.send(frame, hdr=(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6))
        got, _ = s.recvfrom(65536)
        assert got == data
        # Host -> card: 64000 bytes in one frame (MTU 64512), spread over the 19 descriptors of a big buffer.
        s.sendto(data[::-1], (CARD_IP, 5556))
        hdr, f = card.recv(lambda f: f.proto == P.IPPROTO_UDP and f.dport == 5556)
        assert f.payload == data[::-1] and len(f.raw) == 64042
        flags, gso_type, _hl, _gs, csum_start, csum_offset = hdr
        assert gso_type == N.VIRTIO_NET_HDR_GSO_NONE
        if flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM:   # locally generated: the checksum is left to the card
            assert (csum_start, csum_offset) == (34, 6)
        else:
            assert flags & N.VIRTIO_NET_HDR_F_DATA_VALID or P.checksum(
                f.raw[34:], P.pseudo(f.ip_src, f.ip_dst, P.IPPROTO_UDP, len(f.raw) - 34)) == 0


def test_tso_segments_pass_whole_both_ways(card):
    """A TCP connection to the namespace's stack: a 60000-byte GSO frame out, TSO frames back."""
    card.post_rx()
    with socket_in(card.ns, type_=socket.SOCK_STREAM) as lsock:
        lsock.bind((HOST_IP, 8080))
        lsock.listen(1)
        lsock.settimeout(WAIT)
        tcp = lambda seq, ack, flags, data=b"", **kw: card.ip_frame(  # noqa: E731
            P.IPPROTO_TCP, P.tcp(card.ip, card.host_ip, 40000, 8080, seq, ack, flags, data, **kw))
        mine = lambda f: f.proto == P.IPPROTO_TCP and f.dport == 40000  # noqa: E731
        card.send(tcp(1000, 0, P.TCP_SYN, mss=1460))
        _, synack = card.recv(lambda f: mine(f) and f.flags & P.TCP_SYN)
        assert synack.flags & P.TCP_ACK and synack.ack == 1001
        rcv = synack.seq + 1
        card.send(tcp(1001, rcv, P.TCP_ACK))
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(WAIT)
            data = os.urandom(min(60000, synack.window - 1))   # one GSO frame the window takes whole
            assert len(data) > 32000
            seg = P.tcp(card.ip, card.host_ip, 40000, 8080, 1001, rcv, P.TCP_ACK | P.TCP_PSH, data, partial=True)
            frame = P.eth(card.host_mac, card.mac, P.ETH_P_IP, P.ipv4(card.ip, card.host_ip, P.IPPROTO_TCP, seg))
            card.send(frame, hdr=(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, N.VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 34, 16))
            got = b""
            while len(got) < len(data):
                got += conn.recv(65536)
            assert got == data
            back = os.urandom(20000)
            conn.sendall(back)
            received, tso = {}, []
            while sum(len(v) for v in received.values()) < len(back):
                hdr, f = card.recv(lambda f: mine(f))
                if f.payload and f.seq >= rcv and f.seq not in received:
                    received[f.seq] = f.payload
                    if hdr[1] == N.VIRTIO_NET_HDR_GSO_TCPV4:
                        tso.append(hdr)
                nxt = rcv
                while nxt in received:
                    nxt += len(received[nxt])
                card.send(tcp(1001 + len(data), nxt, P.TCP_ACK))
            assert b"".join(received[k] for k in sorted(received)) == back
            assert tso, "the host sent no TSO frame"
            assert all(h[3] == 1460 and h[0] & N.VIRTIO_NET_HDR_F_NEEDS_CSUM for h in tso)
            assert max(len(received[k]) for k in received) > 1460        # one frame, many segments
            card.send(tcp(1001 + len(data), rcv + len(back), P.TCP_RST))


def test_a_full_receive_queue_leaves_frames_in_the_tap(card):
    card.post_rx(1)
    card.ping(1)                                      # ARP resolved; the one buffer was re-posted
    with socket_in(card.ns) as s:
        s.sendto(b"first", (CARD_IP, 6000))           # takes that buffer for good: none is posted now
        _, f = card.recv(lambda f: f.dport == 6000, repost=False)
        assert f.payload == b"first"
        before = card.g.transport.counters()
        for i in range(5):
            s.sendto(b"queued %d" % i, (CARD_IP, 6000))
        time.sleep(0.3)
        after = card.g.transport.counters()
        assert after["rx_packets"] == before["rx_packets"] and after["rx_no_buffers"] >= 1
        card.post_rx(3)                               # buffers arrive: the frames come out, in order
        got = [card.recv(lambda f: f.dport == 6000)[1].payload for _ in range(5)]
        assert got == [b"queued %d" % i for i in range(5)]


def test_a_frame_larger_than_the_buffer_is_dropped_and_counted(card):
    card.post_rx(1)
    card.ping(1)
    with socket_in(card.ns) as s:
        s.sendto(b"first", (CARD_IP, 6001))          # takes the one big buffer for good
        card.recv(lambda f: f.dport == 6001, repost=False)
        for _ in range(4):
            card.post_rx(1, layout=[1528])        # "small" buffers (section 2.5)
        s.sendto(os.urandom(3000), (CARD_IP, 6001))
        s.sendto(b"small enough", (CARD_IP, 6001))
        _, f = card.recv(lambda f: f.dport == 6001)
        assert f.payload == b"small enough"
    assert card.g.transport.counters()["rx_dropped_oversize"] == 1
    assert MAX_FRAME == 65553


def test_bad_transmit_chains_are_counted_and_traffic_continues(card):
    card.post_rx()
    card.send(b"tiny", split=False)                                   # shorter than header + Ethernet
    bad = card.ip_frame(P.IPPROTO_UDP, P.udp(card.ip, card.host_ip, 1, 2, b"x" * 100))
    card.send(bad, hdr=(0, 99, 0, 1448, 0, 0))                        # an invalid GSO type: tun says EINVAL
    assert card.g.transport.counters()["tx_errors"] == 2
    card.ping(1)
    assert card.g.transport.broken is None


def test_offloads_follow_a_card_that_declines_them(ns):
    tap = f"mdv{os.getpid() % 100000}t{next(_taps)}"
    be = NetBackend.open("mic0", tap=tap, netns=ns)
    try:
        with Guest(be, features=1 << N.VIRTIO_NET_F_MAC):
            assert be.tap.offload == 0
            assert struct.calcsize("<BBHHHH") == 10
    finally:
        be.close()


def test_a_net_device_from_its_configuration_entry(ns):
    from micdrv.config import NetConfig
    tap = f"mdv{os.getpid() % 100000}t{next(_taps)}"
    be = NetBackend.from_config("mic0", NetConfig(tap=tap, netns=ns, mtu=9000, mac="02:00:00:00:00:42",
                                                  address="10.1.2.3/16"))
    try:
        st = link.state(tap, ns)
        assert st.mtu == 9000 and "10.1.2.3/16" in st.addresses and be.mac == bytes.fromhex("020000000042")
        assert be.describe()["netns"] == ns and be.describe()["mac"] == "02:00:00:00:00:42"
    finally:
        be.close()
