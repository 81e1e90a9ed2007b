"""The card's virtio-net driver and IP stack against the real tap backend, in a namespace the test creates (root).

The card is a real card kernel (tests/card_kernel.py) whose eth0 is bound
through the direct transport to :class:`backends.net.NetBackend`; the tap
lives in a test-made network namespace with the host address
172.31.1.254/24, so every packet stays inside it. The namespace side
pings the card and talks UDP to it with ordinary sockets; the card pings,
echoes and sends through its shell commands.
"""

from __future__ import annotations

import itertools
import os
import socket

import pytest

from backends.net import NetBackend, link
from micdrv.sim.cardos.net import WANTED, NetDriver
from micdrv.sim.cardos import virtio_bus
from micdrv.virtio import net as N
from micdrv.virtio.device import VIRTIO_ID_NET
from tests import packets as P
from tests.card_kernel import BootedCard, wait_for
from tests.netns_harness import namespace, ping_from, socket_in

pytestmark = pytest.mark.root

HOST_IP, CARD_IP = "172.31.1.254", "172.31.1.1"
WAIT = 20.0
SO_RCVBUFFORCE = 33   # asm-generic/socket.h: SO_RCVBUF beyond rmem_max (root)
_taps = itertools.count()


def tap_name() -> str:
    return f"mdc{os.getpid() % 100000}n{next(_taps)}"


class NetCard:
    """A booted card with eth0 on a tap in ``ns``."""

    def __init__(self, ns: str, cmdline: str = "", address: str | None = None, accept: int | None = None,
                 mtu: int = link.MPSS_MTU):
        self.ns = ns
        self.c = BootedCard(cmdline)
        if accept is not None:
            drivers = self.c.drivers
            virtio_bus.register(VIRTIO_ID_NET, lambda: NetDriver(drivers, accept))
        self.backend = NetBackend.open("mic0", tap=tap_name(), netns=ns, address=address, mtu=mtu)
        self.dev = self.c.bus.add(self.backend)
        self.eth0: NetDriver = self.c.drivers.netdevs[0]

    def sh(self, line: str) -> str:
        ok, out = self.c.drivers.run(line)
        return out

    def close(self) -> None:
        try:
            self.c.close()
        finally:
            self.backend.close()


@pytest.fixture(scope="module")
def ns():
    with namespace("mdc") as name:
        yield name


@pytest.fixture(scope="module")
def card(ns):
    c = NetCard(ns)
    yield c
    c.close()


# --- the interface -------------------------------------------------------------------------------

def test_eth0_takes_the_hosts_mac_offloads_and_big_buffers(card):
    eth0 = card.eth0
    assert eth0.mac == card.backend.mac and eth0.ifname == "eth0" and eth0.mtu == 64512
    acked = card.dev.acked
    assert acked == (card.backend.device_features() | card.dev.transport.device_features) & WANTED
    assert not acked >> N.VIRTIO_NET_F_GSO & 1            # never sends GSO frames: nothing to offload
    assert eth0.csum_tx and eth0.big and eth0.rx.ring.use_indirect
    assert len(eth0._rx_bufs) == 128                       # one INDIRECT descriptor per 73722-byte buffer
    assert card.backend.tap.offload == 0x0F                # GUEST_TSO* acked: the tap takes TUN_F_CSUM|TSO*
    rec = card.c.record()["devices"]
    assert rec["eth0"]["mac"] == link.format_mac(card.backend.mac) and rec["eth0"]["rx_mode"] == "big"
    ip = rec["eth0"]["ipv4"]["ip"]
    assert ip["address"] == "172.31.1.1/24" and ip["source"] == "default" and 7 in ip["udp_ports"]
    out = card.sh("ip")
    assert "eth0: <BROADCAST,UP,LOWER_UP> mtu 64512" in out and f"link/ether {link.format_mac(eth0.mac)}" in out
    assert "inet 172.31.1.1/24 brd 172.31.1.255 scope global eth0" in out


# --- ICMP ------------------------------------------------------------------------------------------

def test_the_card_answers_a_ping_from_the_namespace(card):
    for seq, size in enumerate((0, 56, 1400, 20000), start=1):
        data = os.urandom(size)
        assert ping_from(card.ns, CARD_IP, 0x1234, seq, data, timeout=WAIT) == data
    wait_for(lambda: card.c.drivers.stack.c["echo_replied"] >= 4, "the card to count its replies")
    # The host's ARP request was answered and its sender learnt: the card knows the host's MAC.
    host_mac = link.state(card.backend.tap.name, card.ns).mac
    assert f"{HOST_IP} dev eth0 lladdr {host_mac}" in card.sh("ip neigh")


def test_the_card_pings_the_namespace(card):
    out = card.sh(f"ping {HOST_IP} -c 3 -i 0.05 -s 1000")
    assert f"PING {HOST_IP} ({HOST_IP}) 1000(1028) bytes of data." in out
    assert out.count(f"1008 bytes from {HOST_IP}: icmp_seq=") == 3 and "wrong data" not in out
    assert "3 packets transmitted, 3 received, 0% packet loss" in out and "rtt min/avg/max/mdev" in out


def test_a_ping_to_nobody_reports_the_host_unreachable(card):
    out = card.sh("ping 172.31.1.77 -c 1 -W 0.2")
    assert "Destination Host Unreachable" in out and "1 packets transmitted, 0 received, +1 errors" in out
    assert "Network is unreachable" in card.sh("ping 10.1.2.3 -c 1")       # no gateway configured
    assert "Name or service not known" in card.sh("ping nosuchhost -c 1")


# --- UDP ---------------------------------------------------------------------------------------------

@pytest.fixture
def udp(card):
    with socket_in(card.ns) as s:
        s.bind((HOST_IP, 0))
        s.settimeout(WAIT)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        yield s


@pytest.mark.parametrize("size", [1, 2, 7, 100, 1472, 1473, 8972, 32768, 64000, 64512 - 28])
def test_udp_echo_on_port_7(card, udp, size):
    data = os.urandom(size)
    udp.sendto(data, (CARD_IP, 7))
    got, peer = udp.recvfrom(65536)
    assert got == data and peer == (CARD_IP, 7)


def test_many_echoes_in_flight_come_back_complete(card, udp):
    sent = [os.urandom(n) for n in range(1, 3001, 37)]
    for d in sent:
        udp.sendto(d, (CARD_IP, 7))
    got = sorted(udp.recvfrom(65536)[0] for _ in sent)
    assert got == sorted(sent)


def test_big_echoes_go_back_from_their_receive_buffers_which_are_posted_again(card, udp):
    eth0 = card.eth0
    before = eth0.c["tx_in_place"]
    for i in range(60):
        data = os.urandom((2100, 64000, 100)[i % 3])
        udp.sendto(data, (CARD_IP, 7))
        assert udp.recvfrom(65536)[0] == data
    assert eth0.c["tx_in_place"] - before == 40          # the 100-byte ones are copied into a transmit slot
    # Every receive buffer is posted or out on the transmit ring once the worker is done with its batch, none
    # twice (a double post would break the ring).
    wait_for(lambda: eth0.rx.ring.in_flight + len(eth0._lent) == len(eth0._rx_bufs), "the buffers to be posted")
    assert len(eth0._lent) <= eth0._lend_max
    assert eth0.broken is None and card.c.drivers.echo.dropped == 0


def test_datagrams_beyond_the_mtu_are_fragments_the_card_drops(card, udp):
    before = card.c.drivers.stack.c["ip_frag"]
    udp.sendto(os.urandom(64600), (CARD_IP, 7))           # the host fragments it at the tap's 64512 MTU
    wait_for(lambda: card.c.drivers.stack.c["ip_frag"] > before, "the card to drop the fragments")
    udp.settimeout(0.3)
    with pytest.raises(socket.timeout):
        udp.recvfrom(65536)
    out = card.sh(f"udp send {HOST_IP} 9 65000 65000")   # and the card refuses to send one
    assert "udp: EMSGSIZE" in out


def test_the_udp_source_sends_every_byte_to_the_host(card, udp):
    port = udp.getsockname()[1]
    out = card.sh(f"udp send {HOST_IP} {port} 1M 8000")
    assert "sent 132 datagrams, 1048576 bytes in" in out and ", 0 dropped" in out
    total = 0
    sizes = []
    while total < 1 << 20:
        d, peer = udp.recvfrom(65536)
        assert peer[0] == CARD_IP
        total += len(d)
        sizes.append(len(d))
    assert total == 1 << 20 and sizes.count(8000) == 131 and sizes[-1] == (1 << 20) - 131 * 8000


def test_the_udp_sink_counts_what_the_host_sends(card, udp):
    assert "udp sink on port 9001" in card.sh("udp sink 9001")
    for i in range(200):
        udp.sendto(bytes([i & 0xFF]) * 1000, (CARD_IP, 9001))
    sink = card.c.drivers.sinks[9001]
    wait_for(lambda: sink.datagrams == 200, "the sink to count 200 datagrams")
    assert sink.bytes == 200_000
    assert "sink port 9001: 200 datagrams, 200000 bytes" in card.sh("udp sink 9001 stop")
    assert 9001 not in card.c.drivers.stack.udp_ports()


def test_a_closed_port_answers_port_unreachable(card, udp):
    udp.connect((CARD_IP, 9999))
    udp.send(b"anyone?")
    with pytest.raises(ConnectionRefusedError):       # the card's ICMP port unreachable reached the socket
        udp.settimeout(WAIT)
        udp.recv(100)


def test_a_frame_with_a_bad_checksum_is_dropped(card, udp):
    """A raw frame into the tap (no virtio-net header flags): the card verifies and drops a wrong UDP sum."""
    eth0 = card.eth0
    host_mac = bytes.fromhex(link.state(card.backend.tap.name, card.ns).mac.replace(":", ""))
    port = udp.getsockname()[1]
    good = P.udp(P.ip4(HOST_IP), P.ip4(CARD_IP), port, 7, b"checked")
    bad = good[:6] + bytes([good[6] ^ 0xFF]) + good[7:]
    before = card.c.drivers.stack.c["csum_errors"]
    with socket_in(card.ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800)) as raw:
        raw.bind((card.backend.tap.name, 0))
        for seg in (bad, good):
            raw.send(P.eth(eth0.mac, host_mac, P.ETH_P_IP, P.ipv4(P.ip4(HOST_IP), P.ip4(CARD_IP), P.IPPROTO_UDP, seg)))
    got, _ = udp.recvfrom(100)
    assert got == b"checked"                            # only the good one was echoed
    assert card.c.drivers.stack.c["csum_errors"] == before + 1


# --- configuration ------------------------------------------------------------------------------------

def test_the_address_comes_from_the_mpss_command_line(ns):
    c = NetCard(ns, cmdline="ifcfg=static;address,172.31.5.1;netmask,255.255.255.0", address="172.31.5.254/24")
    try:
        assert c.c.drivers.stack.config.source == "ifcfg"
        data = os.urandom(100)
        assert ping_from(ns, "172.31.5.1", 7, 1, data, timeout=WAIT) == data
        assert "1 received" in c.sh("ping 172.31.5.254 -c 1")
    finally:
        c.close()


def test_a_card_that_declines_the_offloads_verifies_checksums_and_uses_small_buffers(ns):
    accept = WANTED & ~sum(1 << b for b in (N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_TSO4,
                                            N.VIRTIO_NET_F_GUEST_TSO6, N.VIRTIO_NET_F_GUEST_ECN))
    c = NetCard(ns, cmdline="micdrv_sim.ip=172.31.6.1/24 micdrv_sim.mtu=1500", address="172.31.6.254/24",
                accept=accept, mtu=1500)
    try:
        eth0 = c.eth0
        assert not eth0.big and not eth0.csum_tx and eth0.mtu == 1500 and c.backend.tap.offload == 0
        with socket_in(ns) as s:
            s.bind(("172.31.6.254", 0))
            s.settimeout(WAIT)
            for size in (1, 1472):
                data = os.urandom(size)
                s.sendto(data, ("172.31.6.1", 7))
                got, _ = s.recvfrom(65536)
                assert got == data
            st = c.c.drivers.stack.c
            assert st["csum_offloaded"] == 0 and st["udp_in"] == 2   # full sums, verified by the card
            s.sendto(os.urandom(1473), ("172.31.6.1", 7))            # fragmented at MTU 1500: dropped
            wait_for(lambda: st["ip_frag"] >= 1, "the fragments to be dropped")
        assert ping_from(ns, "172.31.6.1", 9, 1, b"x" * 1000, timeout=WAIT) == b"x" * 1000
    finally:
        c.close()


def test_hot_remove_of_eth0_detaches_the_stack(ns):
    c = NetCard(ns)
    try:
        assert "eth0" in c.c.record()["devices"]
        c.c.bus.remove(c.dev)
        assert "eth0" not in c.c.record()["devices"] and c.c.drivers.stack.netdev is None
        assert "ENETDOWN" in c.sh(f"udp send {HOST_IP} 9 100 100")
        c.dev = c.c.bus.add(c.backend)                   # plugged in again: eth0 again, traffic again
        assert c.c.drivers.netdevs[0].ifname == "eth0"
        assert ping_from(ns, CARD_IP, 3, 1, b"back", timeout=WAIT) == b"back"
    finally:
        c.close()

