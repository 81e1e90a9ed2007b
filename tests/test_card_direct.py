"""The card's direct transport itself: the host side in this process or in another one mapping the memfd."""

from __future__ import annotations

import os

from backends.blk import BlkBackend
from benchmarks.card_host import HostProcess, RemoteTransport
from micdrv.virtio.device import VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK
from tests.card_kernel import BootedCard, wait_for

MiB = 1 << 20


def test_a_host_side_in_another_process_serves_the_cards_disk(tmp_path):
    data = os.urandom(2 * MiB)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    with BootedCard() as c:
        host = HostProcess(c.bus.arena.fd, c.bus.arena.size)
        try:
            dev = c.bus.add(transport=RemoteTransport(host, {"kind": "blk", "path": str(path), "serial": "remote"}))
            disk = dev.driver
            assert disk.disk == "vda" and disk.get_id() == "remote" and host.proc.pid != os.getpid()
            assert disk.read(0, 4096) == data
            disk.write(8, b"from the card".ljust(1024, b"!"))
            disk.flush()
            assert path.read_bytes()[8 * 512:9 * 512 + 512] == b"from the card".ljust(1024, b"!")
            assert dev.transport.counters()["flushes"] == 1
            c.bus.remove(dev)
            assert "vda" not in c.record()["devices"]
        finally:
            host.close()
        assert host.proc.returncode == 0


def test_the_bus_runs_the_legacy_init_sequence(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))
    with BootedCard() as c:
        be = BlkBackend.open(str(path))
        try:
            dev = c.bus.add(be)
            assert dev.get_status() == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK
            assert dev.transport.active and dev.acked & ~dev.host_features() == 0
            assert [q.num for q in dev.queues] == [128]
            before = c.bus.interrupts.fired
            dev.driver.read(0, 1)
            assert c.bus.interrupts.fired > before            # completions arrive as call-eventfd interrupts
            dev.interrupt_all()                               # a spurious interrupt is harmless
            assert dev.driver.broken is None and dev.driver.read(0, 1) == bytes(512)
            c.bus.remove(dev)
            assert dev.get_status() == 0 and not dev.transport.active
        finally:
            be.close()


def test_drivers_work_without_views_of_card_memory_as_over_vop(tmp_path):
    """VOP gives drivers card memory through the card bus (no memoryviews): every path has a read/write twin."""
    from tests import packets as P
    from tests.scripted_devices import ScriptedNet
    data = os.urandom(MiB)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    with BootedCard(mapped=False) as c:
        be, net = BlkBackend.open(str(path)), ScriptedNet()
        try:
            disk = c.bus.add(be).driver
            assert disk.dev.memory.view(disk.dev.memory.base, 1) is None
            assert disk.read(0, 2048) == data
            disk.write(3, b"unmapped".ljust(512, b"."))
            assert path.read_bytes()[3 * 512:3 * 512 + 8] == b"unmapped"
            eth0 = c.bus.add(net).driver
            host_mac, card_ip, host_ip = b"\x02\xaa\xbb\xcc\xdd\xee", P.ip4("172.31.1.1"), P.ip4("172.31.1.254")
            ping = P.eth(net.mac, host_mac, P.ETH_P_IP, P.ipv4(host_ip, card_ip, P.IPPROTO_ICMP,
                                                              P.icmp_echo(5, 1, b"over the card bus")))
            c.bus.loop.call(net.deliver, bytes(10) + ping, None)
            wait_for(lambda: net.sent, "the card's echo reply")
            reply = P.Frame.parse(net.sent[0][10:])
            assert reply.icmp_type == 0 and reply.payload == b"over the card bus" and reply.dst == host_mac
            assert eth0.c["rx_packets"] == 1 and eth0.broken is None
        finally:
            be.close()
