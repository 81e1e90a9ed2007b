"""The card's direct transport itself: the host side in this process or in another one mapping the memfd."""

from __future__ import annotations

import os

from backends.blk import BlkBackend
from benchmarks.card_host import HostProcess, RemoteTransport
from micdrv.virtio.device import VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK
from tests.card_kernel import BootedCard

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
