"""UDP throughput of the simulated card's own network stack, each figure beside the raw tap loop.

Run from the repository root, as root (it makes a network namespace with
two taps in it; no traffic leaves it)::

    python -m benchmarks.card_net [--rounds 2] [--count-big 300] [--count-small 5000] [--one-process]

The card is a real card kernel (tests/card_kernel.py) whose eth0 -- the
virtio-net driver, the IP stack, its UDP source and sink -- is bound
through the direct transport (:mod:`micdrv.sim.cardos.direct`) to the
real tap backend (:class:`backends.net.NetBackend`, tap A, host side
172.31.1.254/24). The backend runs in a process of its own
(:mod:`benchmarks.card_host`), as the daemon's backends and the
simulator's card OS do; with ``--one-process`` both sides share this
process and its interpreter lock (the tests' arrangement).

Figures, for 64000-byte payloads (MB/s) and 64-byte ones (packets/s):

* **card -> host**: ``udp send`` from the card (:func:`~micdrv.sim.cardos.ip_apps.udp_source`:
  partial checksums, 16 frames per kick, waiting for ring room when the
  ring is full) to a socket in the namespace nobody reads; the rate is the
  card's, first frame to last. Limit: ``writev`` of the same
  [virtio-net header, frame] pairs into tap B in the same namespace.
* **host -> card**: a process in the namespace sends the datagrams to the
  card's UDP sink (the card's worker drains the tap through the receive
  ring, checks IPv4, counts); the rate is the sink's, first arrival to
  last. Limit: the same datagrams sent to tap B's peer, then ``readv``
  from tap B into a buffer of the card's receive-buffer size.

Figure and limit alternate over ``--rounds``; the best of each is kept.
The last lines are one JSON object per figure: ``{"figure", "value",
"unit", "limit", "ratio"}``, ratio = value / limit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import subprocess
import sys
import time

from benchmarks.common import best, cpu, now, writev_frames

MiB = 1 << 20



class CardNetBench:
    """The card on tap A, a raw tap B, a sender and a sink socket in one namespace."""

    def __init__(self, one_process: bool = False):
        from pyroute2 import IPRoute

        from backends.net import NetBackend, Tap, link

        from .card_host import HostProcess, RemoteTransport
        from tests import packets as P
        from tests.card_kernel import BootedCard
        from tests.netns_harness import namespace, socket_in
        self.P = P
        self._ns = namespace("mdcb")
        self.ns = self._ns.__enter__()
        tag = os.getpid() % 100000
        self.card = BootedCard(bus_size=128 * MiB)
        tap_a = f"mdcb{tag}a"
        self.be = self.host = None
        if one_process:
            self.be = NetBackend.open("mic0", tap=tap_a, netns=self.ns)
            self.dev = self.card.bus.add(self.be)
        else:
            self.host = HostProcess(self.card.bus.arena.fd, self.card.bus.arena.size)
            self.dev = self.card.bus.add(transport=RemoteTransport(
                self.host, {"kind": "net", "card": "mic0", "tap": tap_a, "netns": self.ns}))
        self.stack = self.card.drivers.stack
        self.eth0 = self.card.drivers.netdevs[0]
        self.raw_tap = Tap(f"mdcb{tag}b")
        link.configure(self.raw_tap.name, netns=self.ns, address="172.31.2.254/24", mtu=link.MPSS_MTU)
        self.raw_mac = link.stable_mac("bench-raw")
        with IPRoute(netns=self.ns) as ip:
            for name, peer, mac in ((tap_a, "172.31.1.1", self.eth0.mac),
                                    (self.raw_tap.name, "172.31.2.1", self.raw_mac)):
                idx = ip.link_lookup(ifname=name)[0]
                ip.link("set", index=idx, txqlen=20000)   # room for a whole burst while the reader catches up
                ip.neigh("add", dst=peer, lladdr=link.format_mac(mac), ifindex=idx, state=0x80)  # NUD_PERMANENT
        self.raw_host_mac = bytes.fromhex(link.state(self.raw_tap.name, self.ns).mac.replace(":", ""))
        self.sink = socket_in(self.ns)
        self.sink.bind(("0.0.0.0", 9))
        self.rx_buf = memoryview(bytearray(10 + 4080 + 17 * 4096))    # the card's big receive buffer
        self.cpu = 0.0
        self.moved = 0
        # The card learns the host's MAC once (an ARP exchange), outside every measurement.
        if "1 received" not in self.card.drivers.run("ping 172.31.1.254 -c 1")[1]:
            raise RuntimeError("the card cannot reach the host side")

    # --- card -> host ----------------------------------------------------------------------------
    def tx_card(self, payload: int, count: int) -> float:
        from micdrv.sim.cardos.ip_apps import udp_source
        c0 = cpu()
        r = udp_source(self.stack, "172.31.1.254", 9, payload * count, payload)
        self.cpu += cpu() - c0
        self.moved += r["bytes"]
        if r["dropped"]:
            raise RuntimeError(f"the card dropped {r['dropped']} datagrams")
        return r["datagrams"] * (payload + 42) / r["seconds"]

    def tx_raw(self, payload: int, count: int) -> float:
        P = self.P
        src, dst = P.ip4("172.31.2.1"), P.ip4("172.31.2.254")
        frame = P.eth(self.raw_host_mac, self.raw_mac, P.ETH_P_IP,
                      P.ipv4(src, dst, P.IPPROTO_UDP, P.udp(src, dst, 4000, 9, os.urandom(payload))))
        iov = [memoryview(bytes(10)), memoryview(frame)]
        fd = self.raw_tap.fd
        t0 = now()
        writev_frames(fd, iov, count)
        return count * len(frame) / (now() - t0)

    # --- host -> card ----------------------------------------------------------------------------
    def send(self, dst: str, payload: int, count: int) -> None:
        """``count`` datagrams of ``payload`` bytes to ``dst``:9999 from a process inside the namespace."""
        code = ("import socket,os;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
                f"s.setsockopt(socket.SOL_SOCKET,socket.SO_SNDBUF,{4 * MiB});d=os.urandom({payload})\n"
                f"for _ in range({count}): s.sendto(d,('{dst}',9999))")
        subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-c", code], check=True, timeout=120)

    def rx_card(self, payload: int, count: int) -> float:
        from micdrv.sim.cardos.ip_apps import UdpSink
        sink = UdpSink(self.stack, 9999)
        try:
            c0 = cpu()
            self.send("172.31.1.1", payload, count)
            deadline = time.monotonic() + 60
            last = -1
            while sink.datagrams < count and time.monotonic() < deadline:
                time.sleep(0.01)
                if sink.datagrams == last and sink.last is not None and time.monotonic() - sink.last > 2.0:
                    break                                    # nothing more is coming: some were dropped
                last = sink.datagrams
            self.cpu += cpu() - c0
            st = sink.status()
            self.moved += st["bytes"]
            if st["datagrams"] < count:
                print(f"  host -> card: {count - st['datagrams']} of {count} datagrams lost", file=sys.stderr)
            return st["datagrams"] * (payload + 42) / st["seconds"] if st["seconds"] else 0.0
        finally:
            sink.close()

    def rx_raw(self, payload: int, count: int) -> float:
        self.send("172.31.2.1", payload, count)      # the frames wait in tap B's queue (txqueuelen 20000)
        fd, got = self.raw_tap.fd, 0
        views = [self.rx_buf]
        t0 = now()
        while got < count:
            try:
                n = os.readv(fd, views)
                if n == payload + 42 + 10:
                    got += 1
            except BlockingIOError:
                if not select.select([fd], [], [], 2.0)[0]:
                    break
        return got * (payload + 42) / (now() - t0)

    def counters(self) -> dict:
        return self.dev.transport.counters()

    def close(self) -> None:
        try:
            self.card.close()
        finally:
            if self.be is not None:
                self.be.close()
            if self.host is not None:
                self.host.close()
            self.raw_tap.close()
            self.sink.close()
            self._ns.__exit__(None, None, None)



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of figure and limit (best kept)")
    ap.add_argument("--count-big", type=int, default=300, help="64000-byte datagrams per measurement")
    ap.add_argument("--count-small", type=int, default=5000, help="64-byte datagrams per measurement")
    ap.add_argument("--one-process", action="store_true", help="the host side in this process (as the tests)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("card_net needs root (a network namespace and taps)", file=sys.stderr)
        return 1
    results = []

    def report(figure: str, value: float, limit: float, frame: int | None) -> None:
        unit, scale = ("pkt/s", frame) if frame else ("MB/s", 1e6)
        ratio = value / limit if limit else 0.0
        print(f"{figure:26s} {value / scale:10.1f} {unit:5s}  limit {limit / scale:10.1f} {unit:5s}  "
              f"ratio {ratio:5.3f}", flush=True)
        results.append({"figure": figure, "value": round(value / scale, 2), "unit": unit,
                        "limit": round(limit / scale, 2), "ratio": round(ratio, 4)})

    bench = CardNetBench(args.one_process)
    try:
        for payload, count in ((64000, args.count_big), (64, args.count_small)):
            frame = None if payload > 1500 else payload + 42     # Ethernet + IPv4 + UDP headers
            v, lim = best(args.rounds, lambda: bench.tx_card(payload, count), lambda: bench.tx_raw(payload, count))
            report(f"card_udp_tx_{payload}", v, lim, frame)
            v, lim = best(args.rounds, lambda: bench.rx_card(payload, count), lambda: bench.rx_raw(payload, count))
            report(f"card_udp_rx_{payload}", v, lim, frame)
        print(f"{'card CPU time':26s} {bench.cpu / (bench.moved / 1e9):10.2f} s per GB of payload"
              + (" (card and host)" if args.one_process else ""))
        print(f"{'eth0 counters':26s} {json.dumps(bench.eth0.c)}")
        print(f"{'host transport counters':26s} {json.dumps(bench.counters())}")
    finally:
        bench.close()
    print(f"{'resident memory (max)':26s} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:10.1f} MiB")
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
