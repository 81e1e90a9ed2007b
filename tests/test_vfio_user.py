"""vfio-user: both ends, against a test device running in another process.

The device (tests/vfio_user_testdev.py) runs as ``python -m
tests.vfio_user_testdev`` so nothing but the socket connects it to the client,
as with the simulated card. Fake servers and raw sockets in threads cover
misbehaving peers. Every blocking wait has a timeout.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from micdrv.pci import (BAR0, CONFIG, INTX, MSIX, AccessError, DisconnectedError, DmaArena, ProtocolError,
                        RegionError, RemoteError, ReplyTimeout, RegionInfo, SparseArea, new_eventfd, read_eventfd)
from micdrv.pci.vfio_abi import (VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, decode_region_info,
                                 encode_region_info)
from micdrv.pci.vfio_user import (CommandError, ConfigSpace, Connection, TrappedRegion, VfioUserDevice,
                                  protocol as P)
from micdrv.pci.vfio_user.version import Capabilities, check_reply, decode_version, encode_version, negotiate
from tests import vfio_user_testdev as T

REPO = Path(__file__).resolve().parents[1]
WAIT = 5.0  # the longest any single wait in these tests may take


# --- helpers -------------------------------------------------------------------------
class DeviceProcess:
    """The test device in its own process, on a short socket path."""

    def __init__(self, *args: str):
        self.dir = tempfile.mkdtemp(prefix="vu")
        self.path = os.path.join(self.dir, "dev.sock")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.vfio_user_testdev", "--socket", self.path, *args],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.kill()
            raise RuntimeError(f"test device did not start: {line!r}")

    def connect(self, **kw) -> VfioUserDevice:
        return VfioUserDevice.connect(self.path, kw.pop("timeout", WAIT), **kw)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        self.proc.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def device():
    d = DeviceProcess("--max-xfer", str(64 << 10), "--max-msg-fds", "4")
    yield d
    d.kill()


@pytest.fixture
def dev(device):
    d = device.connect()
    yield d
    d.close()


@pytest.fixture
def eventfds():
    fds = [new_eventfd() for _ in range(T.VECTORS)]
    yield fds
    for fd in fds:
        os.close(fd)


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def count_calls(dev: VfioUserDevice, monkeypatch) -> list[tuple[int, bool, int]]:
    """Record (command, no_reply, number of fds) of every call the client makes from now on."""
    for i in range(dev.info.num_regions):  # region info is cached after its first use
        dev.region_info(i)
    for i in range(dev.info.num_irqs):
        dev.irq_info(i)
    seen = []
    real = dev.connection.call

    def call(command, payload=b"", fds=(), **kw):
        seen.append((command, kw.get("no_reply", False), len(fds)))
        return real(command, payload, fds, **kw)

    monkeypatch.setattr(dev.connection, "call", call)
    return seen


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FakeServer:
    """A thread that accepts one client and runs ``script(sock)``: for misbehaving servers."""

    def __init__(self, script):
        self.dir = tempfile.mkdtemp(prefix="vuf")
        self.path = os.path.join(self.dir, "fake.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(WAIT)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script):
        try:
            sock, _ = self.listener.accept()
            sock.settimeout(WAIT)
            with sock:
                script(sock)
                self.done.wait(WAIT)  # keep the socket open until the test is done
        except OSError:
            pass

    def close(self):
        self.done.set()
        self.thread.join(WAIT)
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def recv_message(sock: socket.socket) -> tuple[int, int, bytes]:
    head = b""
    while len(head) < 16:
        head += sock.recv(16 - len(head))
    msg_id, command, size, _flags, _err = P.HEADER.unpack(head)
    body = b""
    while len(body) < size - 16:
        body += sock.recv(size - 16 - len(body))
    return msg_id, command, body


def reply(sock: socket.socket, msg_id: int, command: int, payload: bytes = b"") -> None:
    sock.sendall(P.encode_header(msg_id, command, len(payload), P.FLAGS_TYPE_REPLY) + payload)


def version_reply(caps: dict | None = None, major: int = 0, minor: int = 0, nul: bool = True) -> bytes:
    text = json.dumps({"capabilities": caps if caps is not None else {"max_msg_fds": 1}}).encode()
    return struct.pack("<HH", major, minor) + text + (b"\0" if nul else b"")


# --- encoding ----------------------------------------------------------------------------
def test_header_is_16_bytes_with_type_and_flag_bits():
    h = P.encode_header(7, P.REGION_READ, 16, P.FLAGS_TYPE_REPLY | P.FLAGS_ERROR, errno.EINVAL)
    assert len(h) == 16
    assert P.HEADER.unpack(h) == (7, 9, 32, 0x21, errno.EINVAL)
    assert (P.VERSION, P.DEVICE_RESET, P.REGION_WRITE_MULTI) == (1, 13, 15)


def test_region_info_with_sparse_and_type_caps_round_trips():
    info = RegionInfo(index=2, flags=0xF, size=1 << 20, offset=0,
                      sparse=(SparseArea(0, 0x40000), SparseArea(0x80000, 0x80000)), type=((1 << 31) | 0x8086, 1))
    raw = encode_region_info(info)
    assert struct.unpack_from("<I", raw)[0] == len(raw) == 32 + 16 + 32 + 16
    assert decode_region_info(raw, expected_index=2) == info


def test_version_payload_is_nul_terminated_json():
    caps = Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20, pgsizes=4096, max_dma_maps=65535)
    raw = encode_version(0, 0, caps)
    assert raw[:4] == b"\0\0\0\0" and raw.endswith(b"}\0")
    assert json.loads(raw[4:-1]) == {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20,
                                                      "max_dma_maps": 65535, "pgsizes": 4096}}
    assert decode_version(raw, "t") == (0, 0, caps)
    with pytest.raises(ProtocolError, match="NUL"):
        decode_version(raw[:-1], "t")
    with pytest.raises(ProtocolError, match="max_msg_fds"):
        decode_version(version_reply({"max_msg_fds": 0}), "t")
    with pytest.raises(ProtocolError, match="pgsizes"):
        decode_version(version_reply({"pgsizes": 4097}), "t")


def test_server_answers_version_with_a_subset_of_the_proposal():
    ours = Capabilities(max_msg_fds=8, max_data_xfer_size=4096, max_dma_maps=10, pgsizes=4096, write_multiple=True)
    answer = negotiate(ours, Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20))
    assert answer == Capabilities(max_msg_fds=8, max_data_xfer_size=4096)
    proposed = (0, 0, Capabilities(max_msg_fds=16, write_multiple=False))
    with pytest.raises(ProtocolError, match="major"):
        check_reply(proposed, (1, 0, Capabilities()), "t")
    with pytest.raises(ProtocolError, match="minor"):
        check_reply(proposed, (0, 1, Capabilities()), "t")
    with pytest.raises(ProtocolError, match="write_multiple"):
        check_reply(proposed, (0, 0, Capabilities(write_multiple=True)), "t")


def test_config_space_keeps_read_only_bits_and_sizes_bars():
    cfg = ConfigSpace(0x8086, 0x2250)
    cfg.add_bar(0, 0x4000)
    cfg.add_bar(2, 1 << 33, mem64=True, prefetchable=True)
    msix = cfg.add_msix(9, 0, 0x2000, 0, 0x3000)
    cfg.write(0x00, b"\xff\xff\xff\xff")  # vendor/device are read-only
    assert cfg.get(0, 4) == 0x22508086
    cfg.write(0x10, b"\xff" * 4)
    assert cfg.get(0x10, 4) == 0xFFFFC000  # ~(size - 1), 32-bit non-prefetchable
    cfg.write(0x18, b"\xff" * 8)
    assert cfg.get(0x18, 8) == ~((1 << 33) - 1) & (2**64 - 1) | 0xC  # 64-bit prefetchable type bits stay
    cfg.write(0x04, struct.pack("<H", 0xFFFF))
    assert cfg.command == 0x406 and cfg.bus_master and cfg.memory_enabled
    assert cfg.get(0x34, 1) == msix and cfg.get(0x06, 2) & 0x10
    cfg.write(msix + 2, struct.pack("<H", 0xFFFF))  # enable + function mask writable, table size not
    assert cfg.get(msix + 2, 2) == 0xC008 and cfg.msix_enabled
    msi = cfg.add_msi(4, per_vector_mask=True)
    assert cfg.get(msix + 1, 1) == msi  # linked after MSI-X
    cfg.write(msi + 2, struct.pack("<H", 0xFFFF))  # enable and multiple-message-enable are writable
    assert cfg.get(msi + 2, 2) == 0x1F5 and cfg.msi_enabled  # 0x71 | MMC 4 vectors | 64-bit | per-vector mask
    cfg.write(msi + 16, b"\xff" * 4)  # mask bits: one per vector
    assert cfg.get(msi + 16, 4) == 0xF and cfg.msi_masked(3)
    cfg.reset()
    assert cfg.get(0x10, 4) == 0 and cfg.command == 0 and not cfg.msix_enabled and not cfg.msi_enabled


# --- Connection, in process ------------------------------------------------------------------
def test_handler_may_call_the_peer_and_later_commands_wait_in_order():
    a_sock, b_sock = socket.socketpair()
    order = []

    def a_handler(msg):  # A serves "read memory" for B's handler
        order.append(("A", msg.command))
        if msg.command != 200:
            raise CommandError(errno.ENOSYS, "A serves only 200")
        return b"from-a"

    def b_handler(msg):
        order.append(("B", msg.command))
        if msg.command == 100:
            got = b_conn.call(200).payload  # nested call from inside a handler
            return b"b+" + bytes(got)
        return bytes(msg.payload)

    a_conn = Connection(a_sock, a_handler, name="A", reply_timeout=WAIT)
    b_conn = Connection(b_sock, b_handler, name="B", reply_timeout=WAIT)
    t = threading.Thread(target=b_conn.serve_forever, daemon=True)
    t.start()
    try:
        a_conn.call(101, b"posted", no_reply=True)
        assert bytes(a_conn.call(100).payload) == b"b+from-a"
        results = {}

        def worker(i):
            results[i] = bytes(a_conn.call(102, b"%d" % i).payload)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(WAIT)
        assert results == {i: b"%d" % i for i in range(8)}
        assert order[:3] == [("B", 101), ("B", 100), ("A", 200)]
        a_conn.start_service_thread()  # A serves B's commands while none of A's calls waits
        assert bytes(b_conn.call(200).payload) == b"from-a"
        with pytest.raises(RemoteError) as e:
            b_conn.call(999)
        assert e.value.errno == errno.ENOSYS
    finally:
        a_conn.close()
        t.join(WAIT)
        b_conn.close()
    with pytest.raises(DisconnectedError):
        a_conn.call(100)


# --- against the test device ------------------------------------------------------------
def test_version_negotiation_reports_server_capabilities(dev):
    assert dev.version == (0, 0)
    caps = dev.server_capabilities
    assert caps.max_data_xfer_size == 64 << 10 and caps.max_msg_fds == 4 and caps.write_multiple
    assert dev.max_data_xfer_size == 64 << 10 and dev.iova_pgsize == 4096


def test_device_region_and_irq_info(dev):
    assert dev.info.flags == VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI
    assert dev.info.num_regions == 9 and dev.info.num_irqs == 5
    bar0 = dev.region_info(BAR0)
    assert bar0.size == T.BAR0_SIZE and bar0.readable and bar0.writable and not bar0.mmappable
    bar2 = dev.region_info(T.BAR2)
    assert bar2.mmappable and bar2.size == T.BAR2_SIZE
    assert bar2.sparse == tuple(SparseArea(o, s) for o, s in T.BAR2_SPARSE)
    assert dev.region_info(1).size == 0 and dev.region_info(CONFIG).size == 256
    msix = dev.irq_info(MSIX)
    assert msix.count == T.VECTORS and msix.eventfd
    assert dev.irq_info(INTX).automasked
    assert dev.config_read(0, 4) == 0xABCD1234
    assert dev.find_capability(0x11) is not None


def test_region_info_is_asked_again_when_the_capability_chain_does_not_fit(device, monkeypatch):
    d = device.connect()
    try:
        calls = []
        real = d.connection.call
        monkeypatch.setattr(d.connection, "call", lambda c, *a, **kw: calls.append(c) or real(c, *a, **kw))
        d.region_info(T.BAR2)
        assert calls == [P.DEVICE_GET_REGION_INFO] * 2
    finally:
        d.close()


def test_trapped_sized_reads_and_writes(dev):
    for size in (1, 2, 4, 8):
        value = int.from_bytes(bytes(range(0x11, 0x11 + size)), "little")
        dev.write(BAR0, T.SCRATCH, 8, 0)
        dev.write(BAR0, T.SCRATCH, size, value, posted=False)
        assert dev.read(BAR0, T.SCRATCH, size) == value
        assert dev.read(BAR0, T.SCRATCH, 8) == value
    dev.write(BAR0, T.SCRATCH + 4, 2, 0xBEEF)
    assert dev.read(BAR0, T.SCRATCH + 4, 2) == 0xBEEF


def test_counter_register_reads_back_increasing_values(dev):
    first = dev.read(BAR0, T.COUNTER, 8)
    assert [dev.read(BAR0, T.COUNTER, 8) for _ in range(3)] == [first + 1, first + 2, first + 3]


def test_misaligned_access_is_rejected(dev):
    with pytest.raises(AccessError, match="misaligned"):
        dev.read(BAR0, T.SCRATCH + 1, 4)
    with pytest.raises(AccessError):
        dev.read(BAR0, T.BAR0_SIZE - 2, 4)
    # The device checks too: a raw 4-byte read at offset 2 gets EINVAL.
    with pytest.raises(RemoteError) as e:
        dev.connection.call(P.REGION_READ, P.region_rw.pack(2, BAR0, 4))
    assert e.value.errno == errno.EINVAL
    assert dev.read(BAR0, T.SCRATCH, 4) is not None  # and keeps serving


def test_posted_doorbell_write_reaches_device_without_reply(dev, monkeypatch):
    calls = count_calls(dev, monkeypatch)
    dev.write(BAR0, T.SCRATCH, 4, 0xD00B)  # posted by default
    assert calls == [(P.REGION_WRITE, True, 0)]
    assert dev.read(BAR0, T.SCRATCH, 4) == 0xD00B  # processed before the later read (arrival order)


def test_bulk_transfers_larger_than_max_data_xfer_size_are_chunked(dev, monkeypatch):
    data = os.urandom(200 << 10)
    calls = count_calls(dev, monkeypatch)
    dev.write_bytes(T.BAR2, 0x10000, data)
    assert [c for c, *_ in calls] == [P.REGION_WRITE] * 4  # 200 KiB in pieces of <= 64 KiB
    assert dev.read_bytes(T.BAR2, 0x10000, len(data)) == data
    assert [c for c, *_ in calls].count(P.REGION_READ) == 4
    bulk = os.urandom(T.BULK_SIZE)
    dev.write_bytes(BAR0, T.BULK, bulk)
    assert dev.read_bytes(BAR0, T.BULK, T.BULK_SIZE) == bulk


def test_mmap_of_sparse_bar_is_the_memory_the_device_sees(dev):
    with pytest.raises(RegionError, match="sparse"):
        dev.mmap(T.BAR2)
    area1 = dev.mmap(T.BAR2, 1)
    assert len(area1) == 0x80000
    area1[0x100:0x108] = b"via-mmap"
    assert dev.read_bytes(T.BAR2, 0x80100, 8) == b"via-mmap"  # REGION_READ in the device process
    dev.write_bytes(T.BAR2, 0x80200, b"via-trap")
    assert bytes(area1[0x200:0x208]) == b"via-trap"
    area0 = dev.mmap(T.BAR2, 0)
    area0[0:4] = b"\x01\x02\x03\x04"
    assert dev.read(T.BAR2, 0, 4) == 0x04030201
    area0.release()
    area1.release()


def test_msix_vector_raised_by_device_arrives_on_its_eventfd(dev, eventfds):
    dev.enable_irqs(MSIX, eventfds)
    assert dev.read(BAR0, T.IRQ_ASSIGNED, 4) == T.VECTORS
    dev.write(BAR0, T.IRQ, 4, 5)
    assert readable(eventfds[5], WAIT)
    assert read_eventfd(eventfds[5]) == 1
    assert not any(readable(fd, 0) for fd in eventfds)
    # A vector masked in the MSI-X table (the model's business) is not delivered.
    dev.write(BAR0, T.MSIX_TABLE + 16 * 3 + 12, 4, 1)
    dev.write(BAR0, T.IRQ, 4, 3)
    dev.read(BAR0, T.SCRATCH, 4)  # a round trip after the posted writes
    assert not readable(eventfds[3], 0.1)
    dev.write(BAR0, T.MSIX_TABLE + 16 * 3 + 12, 4, 0)
    dev.disable_irqs(MSIX)
    assert dev.read(BAR0, T.IRQ_ASSIGNED, 4) == 0
    dev.write(BAR0, T.IRQ, 4, 5)
    dev.read(BAR0, T.SCRATCH, 4)
    assert not readable(eventfds[5], 0.1)


def test_software_trigger_with_data_none_and_data_bool_fires_the_vectors(dev, eventfds):
    from micdrv.pci.vfio_abi import VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_BOOL
    dev.enable_irqs(MSIX, eventfds)
    dev.trigger_irqs(MSIX, 2, 2)  # DATA_NONE | TRIGGER: loopback (spec 1.7)
    assert readable(eventfds[2], WAIT) and readable(eventfds[3], WAIT)
    dev._set_irqs(MSIX, VFIO_IRQ_SET_DATA_BOOL | VFIO_IRQ_SET_ACTION_TRIGGER, 8, 3, bools=[True, False, True])
    assert readable(eventfds[8], WAIT) and readable(eventfds[10], WAIT) and not readable(eventfds[9], 0.05)
    dev.disable_irqs(MSIX)


def test_intx_is_automasked_until_unmasked(dev):
    fd = new_eventfd()
    try:
        dev.enable_irqs(INTX, [fd])
        dev.write(BAR0, T.INTX_REG, 4, 1)
        assert readable(fd, WAIT) and read_eventfd(fd) == 1
        dev.write(BAR0, T.INTX_REG, 4, 1)  # masked now: remembered, not delivered
        dev.read(BAR0, T.SCRATCH, 4)
        assert not readable(fd, 0.1)
        dev.unmask_irq(INTX)
        assert readable(fd, WAIT) and read_eventfd(fd) == 1
    finally:
        dev.disable_irqs(INTX)
        os.close(fd)


def test_set_irqs_splits_eventfds_into_chunks_and_sends_minus_one_runs_without_fds(dev, eventfds, monkeypatch):
    fds = list(eventfds)
    fds[6:9] = [-1, -1, -1]
    calls = count_calls(dev, monkeypatch)
    dev.enable_irqs(MSIX, fds)
    # the server takes 4 fds per message: 0-3, 4-5, (6-8 with no fds), 9-12, 13-15
    assert [n for _c, _nr, n in calls] == [4, 2, 0, 4, 3]
    assert dev.read(BAR0, T.IRQ_ASSIGNED, 4) == T.VECTORS - 3
    dev.write(BAR0, T.IRQ, 4, 15)
    assert readable(eventfds[15], WAIT)
    dev.disable_irqs(MSIX)


def test_dma_mapped_arena_is_shared_memory_with_the_device(dev):
    with DmaArena(1 << 16) as arena:
        arena.map(dev, 0x100000)
        assert dev.read(BAR0, T.DMA_MAPS, 4) == 1
        before = dev.read(BAR0, T.MSG_BYTES, 8)
        for cmd in (T.DMA_COPY, T.DMA_COPY_VIEW):
            pattern = os.urandom(4096)
            arena.view[0:4096] = pattern
            dma_copy(dev, 0x100000, 0x108000, 4096, cmd)
            assert dev.read(BAR0, T.DMA_STATUS, 4) == T.STATUS_DONE
            assert bytes(arena.view[0x8000:0x9000]) == pattern  # the device wrote the host's pages
        assert dev.read(BAR0, T.MSG_BYTES, 8) == before  # no DMA_READ/WRITE messages were needed
        arena.unmap(dev)
        assert dev.read(BAR0, T.DMA_MAPS, 4) == 0


def dma_copy(dev, src: int, dst: int, length: int, cmd: int = T.DMA_COPY, posted: bool = False) -> None:
    dev.write(BAR0, T.DMA_SRC, 8, src)
    dev.write(BAR0, T.DMA_DST, 8, dst)
    dev.write(BAR0, T.DMA_LEN, 4, length)
    dev.write(BAR0, T.DMA_CMD, 4, cmd, posted=posted)


def test_dma_without_fd_goes_through_dma_read_and_write_messages(device):
    d = device.connect(share_dma_fds=False, max_data_xfer_size=16 << 10)
    try:
        with DmaArena(1 << 17) as arena:
            arena.map(d, 0x200000)
            pattern = os.urandom(40 << 10)
            arena.view[0:len(pattern)] = pattern
            before = d.read(BAR0, T.MSG_BYTES, 8)
            dma_copy(d, 0x200000, 0x210000, len(pattern))  # the reply waits for the device's DMA messages
            assert d.read(BAR0, T.DMA_STATUS, 4) == T.STATUS_DONE
            assert bytes(arena.view[0x10000:0x10000 + len(pattern)]) == pattern
            assert d.read(BAR0, T.MSG_BYTES, 8) - before == 2 * len(pattern)
            dma_copy(d, 0x200000, 0x210000, 16, T.DMA_COPY_VIEW)  # no shared memory: no zero-copy view
            assert d.read(BAR0, T.DMA_STATUS, 4) == T.STATUS_FAULT
            arena.unmap(d)
    finally:
        d.close()


def test_dma_messages_after_posted_writes_are_served_by_the_service_thread(device):
    d = device.connect(share_dma_fds=False, service_thread=True)
    try:
        with DmaArena(1 << 16) as arena:
            arena.map(d, 0x300000)
            arena.view[0:8] = b"serviced"
            dma_copy(d, 0x300000, 0x308000, 8, posted=True)  # nobody waits for a reply
            deadline = time.monotonic() + WAIT
            while bytes(arena.view[0x8000:0x8008]) != b"serviced" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert bytes(arena.view[0x8000:0x8008]) == b"serviced"
            arena.unmap(d)
    finally:
        d.close()


def test_dma_outside_any_mapping_is_a_device_fault_and_the_server_survives(dev):
    faults = dev.read(BAR0, T.FAULTS, 4)
    with DmaArena(1 << 16) as arena:
        arena.map(dev, 0x400000)
        dma_copy(dev, 0x400000 + 0xF000, 0x400000, 0x2000)  # source runs past the end of the mapping
        assert dev.read(BAR0, T.DMA_STATUS, 4) == T.STATUS_FAULT
        dma_copy(dev, 0x900000, 0x400000, 16)  # nothing mapped there at all
        assert dev.read(BAR0, T.DMA_STATUS, 4) == T.STATUS_FAULT
        assert dev.read(BAR0, T.FAULTS, 4) == faults + 2
        arena.unmap(dev)


def test_client_answers_efault_for_dma_outside_its_mappings(device):
    d = device.connect(share_dma_fds=False)
    try:
        with DmaArena(1 << 16) as arena:
            arena.map(d, 0x500000)
            ok = P.Message(1, P.DMA_READ, 0, 0, P.dma_rw.pack(0x500000, 4))
            assert d._serve_server(ok)[16:] == bytes(arena.view[0:4])
            for addr, count in ((0x500000 + 0xFFFC, 8), (0x4FFFFC, 8), (0x600000, 1)):
                with pytest.raises(CommandError) as e:
                    d._serve_server(P.Message(1, P.DMA_READ, 0, 0, P.dma_rw.pack(addr, count)))
                assert e.value.errno == errno.EFAULT
            arena.unmap(d)
    finally:
        d.close()


def test_reset_returns_registers_and_config_space_to_power_on(dev):
    dev.write(BAR0, T.SCRATCH, 8, 0x1234)
    dev.config_write(0x10, 4, 0xFFFFFFFF)
    assert dev.config_read(0x10, 4) == 0xFFFFC000
    dev.reset()
    assert dev.read(BAR0, T.SCRATCH, 8) == 0
    assert dev.config_read(0x10, 4) == 0


def test_write_multi_batches_small_writes(dev, monkeypatch):
    calls = count_calls(dev, monkeypatch)
    dev.write_multi([(BAR0, T.BULK + 8 * i, struct.pack("<Q", i * 3)) for i in range(10)], posted=False)
    assert [c for c, *_ in calls] == [P.REGION_WRITE_MULTI]
    assert [dev.read(BAR0, T.BULK + 8 * i, 8) for i in range(10)] == [i * 3 for i in range(10)]


def test_concurrent_calls_from_threads_each_get_their_own_reply(dev):
    errors = []

    def worker(i):
        try:
            for n in range(100):
                dev.write(BAR0, T.BULK + 8 * i, 8, n * 1000 + i)
                assert dev.read(BAR0, T.BULK + 8 * i, 8) == n * 1000 + i
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(4 * WAIT)
    assert not errors and not any(t.is_alive() for t in threads)


def _answers():
    got = []
    return got, lambda value, error: got.append((value, error))


def test_async_read_answers_through_process_events_or_another_callers_reply(dev):
    dev.write(BAR0, T.SCRATCH, 8, 0x1122334455667788, posted=False)
    got, cb = _answers()
    assert dev.read_async(BAR0, T.SCRATCH, 4, cb) is True and dev.async_pending == 1
    deadline = time.monotonic() + WAIT
    while not got and time.monotonic() < deadline:
        select.select([dev.fileno()], [], [], WAIT)
        dev.process_events()
    assert got == [(0x55667788, None)] and dev.async_pending == 0
    # a synchronous call reads the socket meanwhile: it routes the async reply to its callback
    got2, cb2 = _answers()
    first = dev.read(BAR0, T.COUNTER, 8)
    dev.read_async(BAR0, T.COUNTER, 8, cb2)
    assert dev.read(BAR0, T.COUNTER, 8) == first + 2
    assert got2 == [(first + 1, None)] and dev.async_pending == 0


def test_async_reads_fail_with_the_connections_death_or_time_out():
    proc = DeviceProcess()
    d = proc.connect()
    try:
        d.write(BAR0, T.STALL_MS, 4, 20000)
        got, cb = _answers()
        d.connection.call_async(P.REGION_READ, P.region_rw.pack(T.STALL, BAR0, 4),
                                lambda reply, error: cb(reply, error), timeout=0.2)
        time.sleep(0.3)
        assert d.connection.expire_async() == 1
        assert got[0][0] is None and isinstance(got[0][1], ReplyTimeout)
        got.clear()
        d.read_async(BAR0, T.SCRATCH, 4, cb)  # queued behind the stall
        os.kill(proc.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT
        while not got and time.monotonic() < deadline:
            select.select([d.fileno()], [], [], 0.1)
            try:
                d.process_events()
            except DisconnectedError:
                pass
        assert got and got[0][0] is None and isinstance(got[0][1], DisconnectedError) and d.async_pending == 0
        with pytest.raises(DisconnectedError):
            d.read_async(BAR0, T.SCRATCH, 4, cb)
    finally:
        d.close()
        proc.kill()


def test_in_process_server_replaces_a_stale_socket_and_stops_cleanly():
    tmp = tempfile.mkdtemp(prefix="vus")
    path = os.path.join(tmp, "dev.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket file left behind by a dead server
    stale.close()
    server = T.VfioUserServer(T.TestDevice(), path)
    server.regions[5] = TrappedRegion(0x1000, read=lambda offset, size: 0x5A)  # a read-only BAR5
    try:
        server.start()
        with VfioUserDevice.connect(path, WAIT) as d:
            d.write(BAR0, T.SCRATCH, 4, 7, posted=False)
            assert server.model.regs[T.SCRATCH] == 7  # same process: the model is right here
            assert d.read(5, 0, 1) == 0x5A and not d.region_info(5).writable
            with pytest.raises(RemoteError) as e:
                d.connection.call(P.REGION_WRITE, P.region_rw.pack(0, 5, 1) + b"\1")
            assert e.value.errno == errno.EINVAL
        server.stop()
        assert not server._thread.is_alive()
    finally:
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not os.path.exists(path)


# --- malformed messages and lost peers -----------------------------------------------------
def raw_session(path: str) -> Connection:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return Connection(s, name="raw", reply_timeout=WAIT)


def test_malformed_commands_get_error_replies_and_the_connection_stays(device):
    c = raw_session(device.path)
    try:
        def err(command, payload=b""):
            with pytest.raises(RemoteError) as e:
                c.call(command, payload)
            return e.value.errno

        assert err(P.DEVICE_GET_INFO, P.device_info.pack(16, 0, 0, 0)) == errno.EINVAL  # VERSION first
        assert err(P.VERSION, version_reply(major=1)) == errno.EINVAL
        c.call(P.VERSION, encode_version(0, 0, Capabilities(max_msg_fds=1)))
        assert err(P.VERSION, encode_version(0, 0, None)) == errno.EINVAL
        assert err(P.REGION_READ, b"\0" * 3) == errno.EINVAL  # wrong payload size
        assert err(P.REGION_READ, P.region_rw.pack(0, 5, 4)) == errno.EINVAL  # region without backing
        assert err(P.REGION_READ, P.region_rw.pack(0, 42, 4)) == errno.EINVAL  # no such region
        assert err(P.REGION_READ, P.region_rw.pack(T.BAR0_SIZE - 4, 0, 8)) == errno.EINVAL  # beyond the end
        assert err(P.REGION_WRITE, P.region_rw.pack(0, 0, 8) + b"\0" * 4) == errno.EINVAL  # count != data
        assert err(P.DEVICE_GET_REGION_INFO, b"\0" * 8) == errno.EINVAL
        assert err(P.DMA_MAP, P.dma_map.pack(32, 3, 0, 0x1000, 0x1000)[:-1]) == errno.EINVAL
        assert err(P.DMA_UNMAP, P.dma_unmap.pack(24, 0, 0x1000, 0x1000)) == errno.EINVAL  # matches no map
        assert err(P.DEVICE_SET_IRQS, P.irq_set.pack(24, 0x24, MSIX, 0, 1)) == errno.EINVAL  # argsz != payload
        assert err(P.DEVICE_SET_IRQS, P.irq_set.pack(20, 0x23, MSIX, 0, 1)) == errno.EINVAL  # two data types
        assert err(P.DEVICE_SET_IRQS, P.irq_set.pack(20, 0x24, MSIX, 15, 2)) == errno.EINVAL  # beyond the vectors
        assert err(99) == errno.ENOSYS
        assert err(P.DMA_READ, P.dma_rw.pack(0, 4)) == errno.ENOSYS  # server->client only
        small = os.memfd_create("small")
        os.ftruncate(small, 0x1000)
        try:
            with pytest.raises(RemoteError) as e:  # the fd is smaller than offset + size
                c.call(P.DMA_MAP, P.dma_map.pack(32, 3, 0, 0x1000, 0x2000), [small])
            assert e.value.errno == errno.EINVAL
            with pytest.raises(RemoteError) as e:  # fds where none belong
                c.call(P.REGION_READ, P.region_rw.pack(T.SCRATCH, 0, 4), [small])
            assert e.value.errno == errno.EINVAL
        finally:
            os.close(small)
        c.call(P.DMA_MAP, P.dma_map.pack(32, 3, 0, 0x1000, 0x1000))  # without fd: fine
        assert err(P.DMA_MAP, P.dma_map.pack(32, 3, 0, 0x1000, 0x1000)) == errno.EEXIST
        reply_ = c.call(P.DMA_UNMAP, P.dma_unmap.pack(24, P.DMA_UNMAP_FLAG_ALL, 0, 0))
        assert P.dma_unmap.unpack(reply_.payload) == (24, P.DMA_UNMAP_FLAG_ALL, 0, 0)
        got = c.call(P.REGION_READ, P.region_rw.pack(T.SCRATCH, 0, 4))
        assert len(got.payload) == 20
    finally:
        c.close()


@pytest.mark.parametrize("garbage", [
    P.HEADER.pack(1, P.VERSION, 0xFFFFFFF0, 0, 0),  # absurd size
    P.HEADER.pack(1, P.VERSION, 8, 0, 0),  # size below the header
    P.HEADER.pack(1, P.VERSION, 16, 0x7, 0),  # unknown message type
    b"\x01\x02\x03",  # a truncated header, then EOF
], ids=["huge-size", "tiny-size", "bad-type", "truncated"])
def test_server_survives_garbage_and_serves_the_next_client(device, garbage):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT)
    s.connect(device.path)
    s.sendall(garbage)
    if len(garbage) >= 16:
        assert s.recv(16) == b""  # the server drops a connection it cannot resynchronise
    s.close()
    d = device.connect()
    try:
        assert d.read(BAR0, T.COUNTER, 8) >= 0
    finally:
        d.close()


def test_client_raises_protocol_error_on_a_garbage_reply():
    def script(sock):
        msg_id, _cmd, _body = recv_message(sock)
        sock.sendall(P.HEADER.pack(msg_id, P.VERSION, 4, P.FLAGS_TYPE_REPLY, 0))  # size < 16

    fake = FakeServer(script)
    try:
        with pytest.raises(ProtocolError, match="size"):
            VfioUserDevice.connect(fake.path, 2.0)
    finally:
        fake.close()


@pytest.mark.parametrize("answer,match", [
    (version_reply(major=1), "major"),
    (version_reply(minor=3), "minor"),
    (version_reply(nul=False), "NUL"),
    (version_reply({"max_data_xfer_size": 1 << 40}), "max_data_xfer_size"),
    (b"\0", "VERSION payload"),
], ids=["major", "minor", "no-nul", "xfer-range", "short"])
def test_client_rejects_a_bad_version_reply(answer, match):
    def script(sock):
        msg_id, cmd, _body = recv_message(sock)
        reply(sock, msg_id, cmd, answer)

    fake = FakeServer(script)
    try:
        with pytest.raises(ProtocolError, match=match):
            VfioUserDevice.connect(fake.path, 2.0)
    finally:
        fake.close()


def test_call_times_out_when_the_server_never_answers():
    def script(sock):
        msg_id, cmd, _body = recv_message(sock)
        reply(sock, msg_id, cmd, version_reply())
        recv_message(sock)  # DEVICE_GET_INFO: never answered

    fake = FakeServer(script)
    try:
        start = time.monotonic()
        with pytest.raises(ReplyTimeout):
            VfioUserDevice.connect(fake.path, 0.3)
        assert time.monotonic() - start < 2.0
    finally:
        fake.close()


def test_killed_server_makes_pending_and_later_calls_raise_disconnected_quickly():
    proc = DeviceProcess()
    d = proc.connect()
    try:
        d.write(BAR0, T.STALL_MS, 4, 20000)
        outcome = []

        def stalled():
            try:
                d.read(BAR0, T.STALL, 4)
            except Exception as e:  # noqa: BLE001
                outcome.append(e)

        t = threading.Thread(target=stalled)
        t.start()
        time.sleep(0.2)
        start = time.monotonic()
        os.kill(proc.proc.pid, signal.SIGKILL)
        t.join(WAIT)
        assert not t.is_alive() and isinstance(outcome[0], DisconnectedError)
        assert time.monotonic() - start < 2.0
        with pytest.raises(DisconnectedError):
            d.read(BAR0, T.SCRATCH, 4)
        with pytest.raises(DisconnectedError):
            d.write(BAR0, T.SCRATCH, 4, 1)
    finally:
        d.close()
        proc.kill()


def test_client_disconnect_cleans_up_and_the_server_accepts_the_next_client(device, eventfds):
    d = device.connect()
    arena = DmaArena(1 << 16)
    try:
        arena.map(d, 0x700000)
        d.enable_irqs(MSIX, eventfds)
        d.write(BAR0, T.SCRATCH, 8, 0xC0FFEE)
        assert d.read(BAR0, T.DMA_MAPS, 4) == 1 and d.read(BAR0, T.IRQ_ASSIGNED, 4) == T.VECTORS
        clients = d.read(BAR0, T.CLIENTS, 4)
    finally:
        d.close()  # without unmapping: the server must clean up (spec 2.6)
        arena.close()
    d2 = device.connect()
    try:
        assert d2.read(BAR0, T.CLIENTS, 4) == clients + 1
        assert d2.read(BAR0, T.DMA_MAPS, 4) == 0 and d2.read(BAR0, T.IRQ_ASSIGNED, 4) == 0
        assert d2.read(BAR0, T.SCRATCH, 8) == 0xC0FFEE  # device state survives the client
    finally:
        d2.close()


def server_fds(device, settle: bool = False) -> int:
    """The device process's open fds; with ``settle``, once a closed client has been cleaned up."""
    count = len(os.listdir(f"/proc/{device.proc.pid}/fd"))
    deadline = time.monotonic() + WAIT
    while settle and time.monotonic() < deadline:
        time.sleep(0.1)
        again = len(os.listdir(f"/proc/{device.proc.pid}/fd"))
        if again == count:
            break
        count = again
    return count


def test_connect_close_cycles_leak_no_fds(device):
    def cycle():
        fds = [new_eventfd() for _ in range(4)]
        with device.connect() as d, DmaArena(1 << 16) as arena:
            arena.map(d, 0x800000)
            d.enable_irqs(MSIX, fds)
            m = d.mmap(T.BAR2, 0)
            m[0] = 1
            m.release()
            d.read(BAR0, T.SCRATCH, 4)
        for fd in fds:
            os.close(fd)

    cycle()
    before, before_server = open_fds(), server_fds(device, settle=True)
    for _ in range(5):
        cycle()
    assert open_fds() == before
    assert server_fds(device, settle=True) == before_server


def test_server_closes_fds_that_come_with_refused_commands(device):
    c = raw_session(device.path)
    try:
        c.call(P.VERSION, encode_version(0, 0, Capabilities(max_msg_fds=1)))
        before = server_fds(device)
        efd = new_eventfd()
        try:
            for _ in range(10):
                with pytest.raises(RemoteError):
                    c.call(P.REGION_READ, P.region_rw.pack(T.SCRATCH, 0, 4), [efd, efd])
                with pytest.raises(RemoteError):  # SET_IRQS of 2 vectors with 1 fd
                    c.call(P.DEVICE_SET_IRQS, P.irq_set.pack(20, 0x24, MSIX, 0, 2), [efd])
        finally:
            os.close(efd)
        assert server_fds(device) == before
    finally:
        c.close()


def test_framing_gives_each_message_of_a_burst_exactly_its_own_fds():
    """Messages that arrive together come out of one read; fds go with the message they were sent with."""
    from micdrv.pci.vfio_user.framing import Framing

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender = Framing(a, max_msg_size=1 << 21, io_timeout=WAIT)
    receiver = Framing(b, max_msg_size=1 << 21, io_timeout=WAIT)
    memfds = []

    def memfd(tag: int) -> int:
        fd = os.memfd_create(f"t{tag}")
        os.pwrite(fd, struct.pack("<I", tag), 0)
        memfds.append(fd)
        return fd

    # (msg_id, payload size, fd tags): small and large messages, with and without fds
    plan = [(1, 4, []), (2, 20, [2]), (3, 0, []), (4, 8, [4, 40]), (5, 200 << 10, [5]), (6, 12, []),
            (7, 300 << 10, []), (8, 16, [8]), (9, 4, [])]
    sent = threading.Event()

    def send_all():
        for msg_id, n, tags in plan:
            sender.send(msg_id, P.REGION_WRITE, P.FLAGS_NO_REPLY, 0, bytes([msg_id]) * n, [memfd(t) for t in tags], "t")
        # a peer that attaches an fd to the second half of a message: that message gets it, if anyone
        head = P.HEADER.pack(10, P.REGION_WRITE, P.HEADER_SIZE + 8, P.FLAGS_NO_REPLY, 0)
        a.sendmsg([head + b"\x0a" * 4])
        a.sendmsg([b"\x0a" * 4], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", memfd(99)))])
        sender.send(11, P.REGION_WRITE, P.FLAGS_NO_REPLY, 0, b"\x0b", [], "t")
        sent.set()

    t = threading.Thread(target=send_all)
    t.start()
    try:
        time.sleep(0.2)  # let the small ones pile up in the socket
        got = []
        for _ in range(len(plan) + 2):
            m = receiver.receive(WAIT, "t")
            assert isinstance(m, P.Message)
            tags = sorted(struct.unpack("<I", os.pread(fd, 4, 0))[0] for fd in m.fds)
            got.append((m.msg_id, len(m.payload), tags, set(m.payload) <= {m.msg_id}))
            m.close_fds()
        assert got[:len(plan)] == [(i, n, sorted(tags), True) for i, n, tags in plan]
        assert got[len(plan)] in ((10, 8, [], True), (10, 8, [99], True)) and got[-1] == (11, 1, [], True)
        assert sent.wait(WAIT)
        assert receiver.receive(0, "t") == "timeout"
    finally:
        t.join(WAIT)
        for fd in memfds:
            os.close(fd)
        sender.close()
        receiver.close()


def test_a_command_that_arrives_with_a_reply_is_served_by_the_documented_event_loop():
    """A DMA_READ right behind a reply, in one write, is served by a client that polls fileno() and calls
    process_events() -- although the reader may have taken both into its receive buffer at once."""
    answered = []

    def script(sock):
        msg_id, cmd, _body = recv_message(sock)
        reply(sock, msg_id, cmd, version_reply())
        msg_id, cmd, _body = recv_message(sock)
        reply(sock, msg_id, cmd, P.device_info.pack(16, 3, 9, 5))
        msg_id, cmd, _body = recv_message(sock)  # DEVICE_RESET: the reply and a DMA_READ in one write
        sock.sendall(P.encode_header(msg_id, cmd, 0, P.FLAGS_TYPE_REPLY) +
                     P.encode_header(77, P.DMA_READ, P.dma_rw.size, P.FLAGS_TYPE_COMMAND) + P.dma_rw.pack(0x1000, 4))
        msg_id, cmd, size, flags, err = P.HEADER.unpack(sock.recv(16))
        answered.append((msg_id, cmd, flags & P.FLAGS_ERROR, err))

    fake = FakeServer(script)
    try:
        d = VfioUserDevice.connect(fake.path, WAIT)
        try:
            d.reset()
            deadline = time.monotonic() + WAIT
            while not answered and time.monotonic() < deadline:
                if select.select([d.fileno()], [], [], 0.05)[0]:
                    d.process_events()
            assert answered == [(77, P.DMA_READ, P.FLAGS_ERROR, errno.EFAULT)]  # nothing mapped there
        finally:
            d.close()
    finally:
        fake.close()
