"""Throughput of the virtio backends through the direct transport, each beside the raw syscall loop.

Run from the repository root, as root (the net part makes a network
namespace and taps inside it; no traffic leaves it)::

    python -m benchmarks.backends [--seconds 0.5] [--rounds 2] [--no-net]

The guest is :class:`tests.virtio_harness.Guest` -- real split rings in a
memfd, the backend behind :class:`~backends.direct.DirectTransport` -- run
in *one thread*: the driver side posts a batch, the device side drains it
(the kick handler, or the tap's handler for received frames, called
inline), the driver side reaps. Each figure is the throughput of the
**device side** alone (bytes / time spent inside the transport and
backend, syscalls included), so ratio = how much of the bare syscall loop
the ring, the validation and the backend logic leave; the text lines also
give the end-to-end rate of driver plus device in the one thread. (Two
Python threads in one process would mostly measure GIL hand-offs; on MIC
the driver is the card.)

Figures:

* blk sequential read / write, 64 KiB requests in 4 KiB segments and
  1 MiB requests in 64 KiB segments, 32 requests per kick (indirect
  descriptors), on an image in tmpfs; limit: preadv / pwritev of the same
  file with the same segment lists and buffers, one request per syscall;
* net card -> host (transmit queue), 64000-byte UDP payloads (MB/s) and
  64-byte ones (packets/s) as single frames, 32 chains per kick, into a UDP
  socket nobody reads;
  limit: writev of the same [header, frame] pairs into a second tap in the
  same namespace;
* net host -> card (receive queue): the tap's queue is filled with
  datagrams from a socket in the namespace, then drained through the
  receive ring into Linux "big" receive buffers (19 descriptors, indirect);
  limit: readv of as many frames from a second tap into the same buffers.

Figure and limit alternate over ``--rounds`` and the best of each is kept.
The last lines are one JSON object per figure: ``{"figure", "value",
"unit", "limit", "ratio"}``, ratio = value / limit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import sys
import tempfile

from backends.blk import BlkBackend
from backends.eventloop import EventLoop
from micdrv.virtio import blk as B
from micdrv.virtio import net as N
from tests.virtio_harness import Guest

from benchmarks.common import best, cpu, now

KiB, MiB = 1 << 10, 1 << 20
DEPTH = 32                 # requests / chains per kick
BIG = [N.VIRTIO_NET_HDR_SIZE, 4080] + [4096] * 17   # Linux "big packets" receive buffer (virtio-legacy.md 2.5)




class Ring:
    """Book-keeping shared by the ring measurements: device time, end-to-end rate, CPU per byte."""

    def __init__(self):
        self.bytes = 0
        self.cpu = 0.0
        self.e2e: dict[str, float] = {}

    def record(self, name: str, moved: int, device_s: float, total_s: float, cpu_s: float) -> float:
        self.bytes += moved
        self.cpu += cpu_s
        self.e2e[name] = max(self.e2e.get(name, 0.0), moved / total_s)
        return moved / device_s


# --- blk ---------------------------------------------------------------------------------------

class BlkBench:
    def __init__(self, seconds: float, size: int = 128 * MiB):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="micdrv-bench-", dir=base)
        self.path = os.path.join(self.dir, "disk.img")
        with open(self.path, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        self.size = size
        self.seconds = seconds
        self.be = BlkBackend.open(self.path)
        self.g = Guest(self.be, indirect_entries=128, arena_size=256 * MiB, loop=EventLoop("bench"))
        self.ring = self.g.rings[0]
        self.stats = Ring()
        self._bufs: dict = {}

    def buffers(self, req: int, seg: int):
        """DEPTH requests' buffers (header, segments, status), allocated once per shape and reused."""
        key = (req, seg)
        if key not in self._bufs:
            self._bufs[key] = [(self.g.alloc(16), [self.g.alloc(seg) for _ in range(req // seg)], self.g.alloc(1))
                               for _ in range(DEPTH)]
        return self._bufs[key]

    def ring_rate(self, req: int, seg: int, write: bool) -> float:
        reqs = self.buffers(req, seg)
        t = B.VIRTIO_BLK_T_OUT if write else B.VIRTIO_BLK_T_IN
        ring, kick = self.ring, self.g.transport.kick
        sector, moved, device = 0, 0, 0.0
        c0, t0 = cpu(), now()
        while now() - t0 < self.seconds:
            for (ha, hv), segs, (sa, _sv) in reqs:
                hv[:] = B.OUTHDR.pack(t, 0, sector)
                sector = (sector + req // 512) % (self.size // 512)
                data = [(a, len(v)) for a, v in segs]
                if write:
                    ring.add([(ha, 16)] + data, [(sa, 1)])
                else:
                    ring.add([(ha, 16)], data + [(sa, 1)])
            ring.kick_prepare()
            d0 = now()
            kick(0)
            device += now() - d0
            if len(ring.get_all_used()) != DEPTH:
                raise RuntimeError("requests did not complete")
            moved += DEPTH * req
        bad = [sv[0] for _h, _s, (_a, sv) in reqs if sv[0] != B.VIRTIO_BLK_S_OK]
        if bad:
            raise RuntimeError(f"requests failed with status {bad[0]}")
        name = f"blk_seq_{'write' if write else 'read'}_{req // KiB}KiB"
        return self.stats.record(name, moved, device, now() - t0, cpu() - c0)

    def raw_rate(self, req: int, seg: int, write: bool) -> float:
        # The same DEPTH buffer sets as the ring uses, so both touch the same memory.
        iovs = [[v for _a, v in segs] for _h, segs, _s in self.buffers(req, seg)]
        fd = os.open(self.path, os.O_RDWR)
        op = os.pwritev if write else os.preadv
        off, moved = 0, 0
        t0 = now()
        while now() - t0 < self.seconds:
            for views in iovs:
                op(fd, views, off)
                off = (off + req) % self.size
            moved += DEPTH * req
        dt = now() - t0
        os.close(fd)
        return moved / dt

    def close(self) -> None:
        self.g.close()
        self.be.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


# --- net ---------------------------------------------------------------------------------------

class NetBench:
    """A NetBackend on tap A and a raw tap B in one namespace; a UDP sink socket on port 9 nobody reads."""

    def __init__(self, seconds: float):
        from pyroute2 import IPRoute

        from backends.net import NetBackend, Tap, link
        from tests import packets as P
        from tests.netns_harness import namespace, socket_in
        self.P = P
        self.seconds = seconds
        self._ns = namespace("mdvb")
        self.ns = self._ns.__enter__()
        tag = os.getpid() % 100000
        self.be = NetBackend.open("mic0", tap=f"mdvb{tag}a", netns=self.ns)
        self.raw_tap = Tap(f"mdvb{tag}b")
        link.configure(self.raw_tap.name, netns=self.ns, address="172.31.2.254/24", mtu=link.MPSS_MTU)
        self.card_mac = self.be.mac
        self.raw_mac = link.stable_mac("bench-raw")
        with IPRoute(netns=self.ns) as ip:
            for name, peer, mac in ((self.be.tap.name, "172.31.1.1", self.card_mac),
                                    (self.raw_tap.name, "172.31.2.1", self.raw_mac)):
                idx = ip.link_lookup(ifname=name)[0]
                ip.link("set", index=idx, txqlen=20000)   # room for a whole pre-filled burst
                ip.neigh("add", dst=peer, lladdr=link.format_mac(mac), ifindex=idx, state=0x80)  # NUD_PERMANENT
        self.tap_mac = {w: bytes.fromhex(link.state(t, self.ns).mac.replace(":", ""))
                        for w, t in (("a", self.be.tap.name), ("b", self.raw_tap.name))}
        self.sink = socket_in(self.ns)
        self.sink.bind(("0.0.0.0", 9))
        self.sender = socket_in(self.ns)
        self.sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
        self.loop = EventLoop("bench")
        self.g = Guest(self.be, indirect_entries=len(BIG), arena_size=128 * MiB, loop=self.loop)
        self.rx_bufs = [[self.g.alloc(s) for s in BIG] for _ in range(64)]
        self.stats = Ring()

    def frame(self, which: str, payload: int) -> bytes:
        P = self.P
        src, dst = ("172.31.1.1", "172.31.1.254") if which == "a" else ("172.31.2.1", "172.31.2.254")
        mac = self.card_mac if which == "a" else self.raw_mac
        udp = P.udp(P.ip4(src), P.ip4(dst), 4000, 9, os.urandom(payload))
        return P.eth(self.tap_mac[which], mac, P.ETH_P_IP, P.ipv4(P.ip4(src), P.ip4(dst), P.IPPROTO_UDP, udp))

    # card -> host
    def tx_ring(self, payload: int) -> float:
        frame = self.frame("a", payload)
        hdr = self.g.alloc(N.VIRTIO_NET_HDR_SIZE, bytes(N.VIRTIO_NET_HDR_SIZE))[0]
        fa = self.g.alloc(len(frame), frame)[0]
        ring, kick = self.g.rings[N.TX_QUEUE], self.g.transport.kick
        frames, device = 0, 0.0
        c0, t0 = cpu(), now()
        while now() - t0 < self.seconds:
            for _ in range(DEPTH):
                ring.add([(hdr, N.VIRTIO_NET_HDR_SIZE), (fa, len(frame))])
            ring.kick_prepare()
            d0 = now()
            kick(N.TX_QUEUE)
            device += now() - d0
            if len(ring.get_all_used()) != DEPTH:
                raise RuntimeError("transmit chains did not complete")
            frames += DEPTH
        if self.be.counters()["tx_errors"]:
            raise RuntimeError("the tap refused frames")
        return self.stats.record(f"net_tx_udp{payload}", frames * len(frame), device, now() - t0, cpu() - c0)

    def tx_raw(self, payload: int) -> float:
        frame = self.frame("b", payload)
        iov = [memoryview(bytes(N.VIRTIO_NET_HDR_SIZE)), memoryview(frame)]
        fd, frames = self.raw_tap.fd, 0
        t0 = now()
        while now() - t0 < self.seconds:
            for _ in range(DEPTH):
                os.writev(fd, iov)
            frames += DEPTH
        return frames * len(frame) / (now() - t0)

    # host -> card
    def fill(self, dst: str, payload: int) -> int:
        count = 300 if payload > 1500 else 5000
        data = os.urandom(payload)
        for _ in range(count):
            self.sender.sendto(data, (dst, 9999))
        return count

    def rx_ring(self, payload: int) -> float:
        count = self.fill("172.31.1.1", payload)     # no buffers posted: the frames wait in the tap
        frame_len = payload + 42
        ring, kick = self.g.rings[N.RX_QUEUE], self.g.transport.kick
        got, outstanding, device = 0, 0, 0.0
        c0, t0 = cpu(), now()
        for bufs in self.rx_bufs:
            ring.add([], [(a, len(v)) for a, v in bufs], token=bufs)
            outstanding += 1
        while got < count:
            ring.kick_prepare()
            d0 = now()
            kick(N.RX_QUEUE)                          # buffers posted: a parked receive path resumes ...
            self.loop.run_once(0)                     # ... and the tap's readiness is served
            device += now() - d0
            for bufs, n in ring.get_all_used():
                got += 1
                outstanding -= 1
                if n != frame_len + N.VIRTIO_NET_HDR_SIZE:
                    raise RuntimeError(f"received a {n}-byte frame, expected {frame_len + 10}")
                if got + outstanding < count:         # re-post, but leave none behind at the end
                    ring.add([], [(a, len(v)) for a, v in bufs], token=bufs)
                    outstanding += 1
            if now() - t0 > 60:
                raise RuntimeError(f"only {got} of {count} frames arrived")
        return self.stats.record(f"net_rx_udp{payload}", count * frame_len, device, now() - t0, cpu() - c0)

    def rx_raw(self, payload: int) -> float:
        count = self.fill("172.31.2.1", payload)
        views = [v for _a, v in self.rx_bufs[0]]
        fd, got = self.raw_tap.fd, 0
        t0 = now()
        while got < count:
            try:
                os.readv(fd, views)
                got += 1
            except BlockingIOError:
                select.select([fd], [], [], 1.0)
        return count * (payload + 42) / (now() - t0)

    def close(self) -> None:
        self.g.close()
        self.be.close()
        self.raw_tap.close()
        self.sink.close()
        self.sender.close()
        self._ns.__exit__(None, None, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="duration of each measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of figure and limit (best kept)")
    ap.add_argument("--no-net", action="store_true", help="skip the tap figures (they need root)")
    args = ap.parse_args()
    results = []

    def report(figure: str, value: float, limit: float, stats: Ring, frame: int | None = None) -> None:
        """Bytes/s as MB/s; with ``frame`` (small packets) as packets/s of that frame size."""
        unit, scale = ("pkt/s", frame) if frame else ("MB/s", 1e6)
        ratio = value / limit if limit else 0.0
        print(f"{figure:22s} device side {value / scale:9.1f} {unit:5s}  limit {limit / scale:9.1f} {unit:5s}  "
              f"ratio {ratio:5.2f}   (driver + device in one thread: {stats.e2e[figure] / scale:8.1f} {unit})",
              flush=True)
        results.append({"figure": figure, "value": round(value / scale, 2), "unit": unit,
                        "limit": round(limit / scale, 2), "ratio": round(ratio, 3)})

    blk = BlkBench(args.seconds)
    try:
        for req, seg in ((64 * KiB, 4 * KiB), (MiB, 64 * KiB)):
            for write in (False, True):
                v, lim = best(args.rounds, lambda: blk.ring_rate(req, seg, write), lambda: blk.raw_rate(req, seg, write))
                report(f"blk_seq_{'write' if write else 'read'}_{req // KiB}KiB", v, lim, blk.stats)
        print(f"{'blk CPU time':22s} {blk.stats.cpu / (blk.stats.bytes / 1e9):9.2f} s per GB (driver and device)")
    finally:
        blk.close()

    if not args.no_net:
        if os.geteuid() != 0:
            print("net figures need root (use --no-net)", file=sys.stderr)
            return 1
        net = NetBench(args.seconds)
        try:
            for payload in (64000, 64):
                frame = None if payload > 1500 else payload + 42   # Ethernet + IPv4 + UDP headers
                v, lim = best(args.rounds, lambda: net.tx_ring(payload), lambda: net.tx_raw(payload))
                report(f"net_tx_udp{payload}", v, lim, net.stats, frame)
                v, lim = best(args.rounds, lambda: net.rx_ring(payload), lambda: net.rx_raw(payload))
                report(f"net_rx_udp{payload}", v, lim, net.stats, frame)
            print(f"{'net CPU time':22s} {net.stats.cpu / (net.stats.bytes / 1e9):9.2f} s per GB (driver and device)")
            print(f"{'net counters':22s} {json.dumps(net.g.transport.counters())}")
        finally:
            net.close()
    print(f"{'resident memory (max)':22s} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:9.1f} MiB")
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
