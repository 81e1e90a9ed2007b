"""The direct transport and the virtqueue drain loop: real rings in shared memory, kicks and interrupts on eventfds.

Includes a driver in another process (a memfd both map), to show the
backend never relies on sharing the driver's address space.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from backends.backend import Backend
from backends.blk import BlkBackend
from backends.direct import DirectTransport, QueueSetup
from backends.eventloop import EventLoop
from backends.virtqueue import Chain, Drained, Virtqueue
from micdrv.memory import BufferMemory
from micdrv.pci import DmaArena
from micdrv.virtio import VringLayout, vring_size
from micdrv.virtio import blk as B
from micdrv.virtio.device import VIRTIO_RING_F_EVENT_IDX
from micdrv.virtio.ring import DESC, VRING_DESC_F_NEXT, USED_FLAGS, VRING_USED_F_NO_NOTIFY
from tests.virtio_harness import ALIGN, Guest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Echo(Backend):
    """A one-queue device that answers each chain with its readable bytes reversed.

    ``stop_at`` makes it say "stop" (its sink is full) at that chain, ``fail_at`` makes a bug escape.
    """

    device_id = 0x7F

    def __init__(self):
        super().__init__("echo")
        self.stop_at: int | None = None
        self.fail_at: int | None = None
        self.seen = 0
        self.results: list[Drained] = []

    def device_features(self) -> int:
        return 0

    def queue_sizes(self):
        return (16,)

    def config_space(self) -> bytes:
        return b"echo"

    def queue_notify(self, index: int) -> None:
        self.results.append(self.queues[0].drain(self.process, batch=4))

    def process(self, chain: Chain):
        if self.seen == self.stop_at:
            self.stop_at = None
            return None
        if self.seen == self.fail_at:
            self.fail_at = None
            raise RuntimeError("backend bug")
        self.seen += 1
        data = b"".join(bytes(v) for v in chain.readable)[::-1]
        pos = 0
        for v in chain.writable:
            n = min(len(v), len(data) - pos)
            v[:n] = data[pos:pos + n]
            pos += n
        return pos


def echo(g: Guest, text: bytes, kick: bool = True):
    a, _ = g.alloc(len(text), text)
    b, view = g.alloc(len(text))
    g.add(0, [(a, len(text))], [(b, len(text))], token=view, kick=kick)


def test_a_chain_goes_through_and_the_driver_is_interrupted():
    with Guest(Echo()) as g:
        echo(g, b"hello, device")
        view, n = g.wait(0)
        assert bytes(view[:n]) == b"ecived ,olleh"
        assert g.config() == b"echo"
        c = g.transport.counters()
        assert c["queue0_chains"] == 1 and c["queue0_interrupts"] == 1


def test_a_drain_completes_in_batches_and_re_enables_kicks():
    with Guest(Echo(), features=0) as g:  # without EVENT_IDX, so suppression shows in used.flags
        for i in range(8):  # 16 descriptors: a full ring, two batches of 4
            echo(g, b"%02d" % i, kick=False)
        g.kick(0)
        got = [bytes(v[:n]) for v, n in g.wait_many(0, 8)]
        assert got == [(b"%02d" % i)[::-1] for i in range(8)]
        g.transport.kick(0)  # a spurious kick finds nothing
        assert g.backend.results[-1] is Drained.EMPTY
        lay = VringLayout(16, ALIGN)
        used_flags = g.mem.read(g.setups[0].used + USED_FLAGS, 2)
        assert int.from_bytes(used_flags, "little") & VRING_USED_F_NO_NOTIFY == 0  # kicks enabled again
        assert lay.size == vring_size(16, ALIGN)


def test_a_backend_that_says_stop_leaves_the_rest_in_the_ring():
    with Guest(Echo(), features=0) as g:
        g.backend.stop_at = 2
        for i in range(5):
            echo(g, b"%d" % i, kick=False)
        g.kick(0)
        assert [bytes(v[:n]) for v, n in g.wait_many(0, 2)] == [b"0", b"1"]
        g.transport.loop.call(lambda: None)  # the drain has returned
        assert g.backend.results == [Drained.STOPPED]
        flags = int.from_bytes(g.mem.read(g.setups[0].used + USED_FLAGS, 2), "little")
        assert flags & VRING_USED_F_NO_NOTIFY  # kicks stay off: the backend will call again
        assert g.rings[0].in_flight == 3
        g.transport.kick(0)  # the backend's sink is ready again
        assert [bytes(v[:n]) for v, n in g.wait_many(0, 3)] == [b"2", b"3", b"4"]


def test_a_backend_bug_keeps_the_ring_consistent():
    with Guest(Echo()) as g:
        g.backend.fail_at = 1
        for i in range(3):
            echo(g, b"%d" % i, kick=False)
        g.kick(0)
        assert bytes(g.wait(0)[0][:1]) == b"0"   # done before the bug: completed
        g.transport.loop.call(lambda: None)
        assert g.rings[0].in_flight == 2 and g.transport.broken is None
        g.transport.kick(0)                      # the rest was given back, not lost
        assert [bytes(v[:n]) for v, n in g.wait_many(0, 2)] == [b"1", b"2"]


def test_a_drain_asks_the_source_before_taking_another_batch():
    with Guest(Echo(), features=0) as g:
        asked = []

        def more() -> bool:
            asked.append(g.backend.seen)
            return False                       # the source ran dry after the first batch

        g.backend.queue_notify = lambda index: g.backend.results.append(
            g.backend.queues[0].drain(g.backend.process, batch=4, more=more))
        for i in range(6):
            echo(g, b"%d" % i, kick=False)
        g.kick(0)
        assert [bytes(v[:n]) for v, n in g.wait_many(0, 4)] == [b"0", b"1", b"2", b"3"]
        g.transport.loop.call(lambda: None)
        assert g.backend.results == [Drained.STOPPED] and asked == [4]
        assert g.rings[0].in_flight == 2       # never taken: nothing staged or given back for them


class _Later(Virtqueue):
    """A transport whose chains' data arrives later: pop_start hands nothing out until the test says so."""

    index, size, name = 0, 8, "later"

    def __init__(self, chains: int):
        self.waiting = [Chain(h, [memoryview(b"%d" % h)], [], 1, 0) for h in range(chains)]
        self.arrived: list[Chain] = []
        self.resume = None
        self.completed: list[int] = []
        self.kicks_on = True

    def pop_many(self, limit):
        out, self.arrived = self.arrived[:limit], self.arrived[limit:]
        return out

    def pop_start(self, limit, resume):
        if self.arrived:
            return self.pop_many(limit)
        if not self.waiting:
            return []
        self.resume = resume                   # under way: the drain returns, and is resumed
        return None

    def arrive(self) -> None:
        self.arrived, self.waiting = self.waiting, []
        resume, self.resume = self.resume, None
        resume()

    def complete_many(self, done):
        self.completed.extend(c.head for c, _w in done)

    def abandon(self, chains):
        raise AssertionError("nothing is abandoned here")

    def disable_notify(self):
        self.kicks_on = False

    def enable_notify(self):
        self.kicks_on = True
        return True


def test_a_drain_with_resume_returns_while_the_data_is_on_its_way_and_goes_on_when_resumed():
    q = _Later(3)
    seen, results = [], []

    def drain() -> None:
        results.append(q.drain(lambda c: seen.append(bytes(c.readable[0])) or 0, resume=drain))

    drain()
    assert results == [Drained.WAITING] and seen == [] and not q.kicks_on
    q.arrive()                                 # the transport's callback: the backend drains again
    assert results == [Drained.WAITING, Drained.EMPTY] and seen == [b"0", b"1", b"2"]
    assert q.completed == [0, 1, 2] and q.kicks_on
    # without resume the same queue is drained synchronously (pop_many), as every other backend does
    assert q.drain(lambda c: 0) is Drained.EMPTY


def test_interrupts_are_suppressed_while_the_driver_asks():
    for features in (0, 1 << VIRTIO_RING_F_EVENT_IDX):
        with Guest(Echo(), features=features) as g:
            g.rings[0].disable_cb()
            echo(g, b"quiet")
            g.transport.loop.call(lambda: None)
            g.transport.kick(0)
            assert g.rings[0].used_pending() == 1
            assert g.transport.counters()["queue0_interrupts"] == 0
            g.rings[0].get_used()
            assert g.rings[0].enable_cb()
            echo(g, b"loud")
            g.wait(0)
            assert g.transport.counters()["queue0_interrupts"] == 1


def test_a_hostile_ring_breaks_only_its_device_until_reset(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(1 << 20))
    loop = EventLoop("shared").start()
    good = Guest(Echo(), loop=loop)
    bad = Guest(BlkBackend.open(str(p)), loop=loop)
    try:
        s = bad.setups[0]
        bad.mem.write(s.desc + 16 * 5, DESC.pack(0x1000, 16, VRING_DESC_F_NEXT, 300))
        bad.mem.write(s.avail + 4, (5).to_bytes(2, "little"))
        bad.mem.write(s.avail + 2, (1).to_bytes(2, "little"))
        os.eventfd_write(bad.kick_fds[0], 1)
        assert bad.wait_broken() == "blk:disk.img queue 0: descriptor 5: next 300 out of range 0..127"
        echo(good, b"still here")               # the loop and the other device carry on
        assert bytes(good.wait(0)[0][:10]) == b"ereh llits"
        os.eventfd_write(bad.kick_fds[0], 1)    # further kicks are not even read
        bad.reset()                             # the driver resets the device: working again
        assert bad.transport.broken is None
        hdr, _ = bad.alloc(16, struct.pack("<IIQ", B.VIRTIO_BLK_T_FLUSH, 0, 0))
        st, sv = bad.alloc(1, b"\xff")
        bad.add(0, [(hdr, 16)], [(st, 1)])
        bad.wait(0)
        assert sv[0] == B.VIRTIO_BLK_S_OK
    finally:
        good.close()
        bad.close()
        bad.backend.close()
        loop.stop()


def test_the_transport_checks_what_the_driver_sets_up():
    arena = DmaArena(1 << 20)
    mem = BufferMemory(arena.view)
    loop = EventLoop()
    t = DirectTransport(Echo(), mem, loop)
    with pytest.raises(ValueError, match="include bits not offered"):
        t.set_features(1 << 3)
    with pytest.raises(ValueError, match="queue 1 does not exist"):
        t.set_queue(1, QueueSetup(16, 0, 256, 4096))
    with pytest.raises(ValueError, match="at most 16"):
        t.set_queue(0, QueueSetup(32, 0, 512, 4096))
    with pytest.raises(ValueError, match=r"queues \[0\] were not set up"):
        t.start()
    loop.stop()
    mem.release()
    arena.close()


def test_a_driver_in_another_process(tmp_path):
    """The device runs here; the driver maps the same memfd in a child process and does blk I/O."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    arena = DmaArena(1 << 20, "shared-with-child")
    mem = BufferMemory(arena.view)
    loop = EventLoop("device").start()
    be = BlkBackend.open(str(image))
    t = DirectTransport(be, mem, loop)
    num = 128
    block = arena.alloc(vring_size(num, ALIGN), ALIGN)
    lay = VringLayout(num, ALIGN)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    heap = arena.alloc(256 << 10, 4096)
    try:
        t.set_features(0)
        t.set_queue(0, QueueSetup(num, block.offset + lay.desc, block.offset + lay.avail,
                                  block.offset + lay.used, kick, call))
        t.start()
        args = {"memfd": arena.fd, "size": arena.size, "num": num, "desc": block.offset + lay.desc,
                "avail": block.offset + lay.avail, "used": block.offset + lay.used, "features": 0,
                "kick": kick, "call": call, "heap": heap.offset, "sector": 16}
        proc = subprocess.run([sys.executable, "-m", "tests.direct_driver_proc", json.dumps(args)],
                              pass_fds=(arena.fd, kick, call), capture_output=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 0, proc.stderr.decode()
        r = json.loads(proc.stdout)
        assert r["pid"] != os.getpid()
        assert (r["write_status"], r["read_status"], r["read_ok"], r["read_used"]) == (0, 0, True, 8193)
        assert image.read_bytes()[16 * 512:16 * 512 + 8192] == bytes(range(256)) * 32
        assert t.counters()["write_requests"] == 1 and t.broken is None
    finally:
        t.close()
        loop.stop()
        be.close()
        os.close(kick)
        os.close(call)
        mem.release()
        arena.close()
