"""VOP throughput through the whole stack, each figure beside the limits measured in the same run.

Run from the repository root, as root (it makes a network namespace and
two taps in it; no traffic leaves it)::

    python -m benchmarks.vop [--rounds 2] [--net-bytes 32M] [--blk-bytes 32M] [--no-net]

The card is the simulated X100 in its own process (``micdrv sim``) running
the card OS with its own virtio-net (IP stack, UDP source and sink) and
virtio-blk drivers over the card's VOP transport; this process is the host:
:class:`~micdrv.mic.MicDevice` with its VOP host, the tap backend (tap A,
172.31.1.254/24 in the namespace) and the blk backend on an image in
tmpfs -- what the daemon runs, without its control socket. The card is
driven through the simulator's control socket (its shell's ``udp send``,
``udp sink``, ``blk write``, ``blk read``).

Figures:

* **net card -> host**, 64000-byte datagrams (MB/s) and 64-byte ones
  (packets/s): the card's ``udp send`` to a socket in the namespace nobody
  reads, the card's rate first frame to last. Limits: ``writev`` of the
  same [header, frame] pairs into tap B, and the DMA engine copying the same
  sizes card -> host in batches of 16 (the copy the path makes);
* **net host -> card**: a process in the namespace sends the datagrams to
  the card's UDP sink, the sink's rate first arrival to last. Limits:
  ``readv`` of as many frames from tap B, and DMA host -> card of the same
  sizes;
* **blk sequential write / read by the card**, ``--blk-bytes`` in one
  ``blk write`` / ``blk read`` (the card's driver issues requests of up to
  1 MiB); limits: ``pwritev`` / ``preadv`` of the same file in 1 MiB
  requests, and DMA of 1 MiB copies.

The JSON limit of each figure is the tighter of its limits; the text lines
show both. Also printed: the copy-path byte counters of each device (DMA /
BAR0 / unaligned), this process's CPU time per GB moved through VOP, and
its peak resident memory. Figure and limits alternate over ``--rounds``;
the best of each is kept. The last lines are one JSON object per figure:
``{"figure", "value", "unit", "limit", "ratio"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import best, cpu, now, parse_size, wait_for, writev_frames

KiB, MiB = 1 << 10, 1 << 20
HOST_IP, CARD_IP = "172.31.1.254", "172.31.1.1"
RAW_HOST, RAW_PEER = "172.31.2.254", "172.31.2.1"
WAIT = 60.0






class Rig:
    """The simulated card booted under MicDevice, net and blk devices on VOP, the namespace with taps A and B."""

    def __init__(self, net: bool, copy=None):
        from backends.blk import BlkBackend
        from micdrv.cosm.hwops import BootSpec
        from micdrv.jsonlines import JsonLinesClient
        from micdrv.mic import MicDevice
        from micdrv.pci.vfio_user import VfioUserDevice
        from micdrv.sim.cardos.image import write_files
        from micdrv.sim.process import SimulatedCardProcess
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="micdrv-bench-vop-", dir=base))
        self.image = self.dir / "disk.img"
        with open(self.image, "wb") as f:
            f.truncate(256 * MiB)
        firmware = self.dir / "uos.img"
        write_files(firmware)
        self.sim = SimulatedCardProcess(self.dir / "sim", "--memory", "2G", "--ready-delay", "0.05")
        self.ctl = JsonLinesClient(self.sim.control, timeout=WAIT * 4)
        from micdrv.vop.host import VopOptions
        self.mic = MicDevice.open(VfioUserDevice.connect(self.sim.socket), mic_id=0, reset_delay=0.05,
                                  scif_poll_interval=0.05, vop=VopOptions(copy=copy) if copy else None)
        self.mic.reset()
        wait_for(self.mic.ready, "the card to be ready")
        self.mic.start(BootSpec(firmware, cmdline=f"ifcfg=static;address,{CARD_IP};netmask,255.255.255.0"))
        self.backends = []
        self.blk = BlkBackend.open(str(self.image))
        self.backends.append(self.blk)
        self.blk_dev = self._add(self.blk)
        self.ns = self.net = None
        if net:
            self._net()
        wait_for(lambda: "vda" in (self.record() or {}).get("devices", {}), "the card's vda")

    def _add(self, backend):
        dev = self.mic.vop.add(backend)
        wait_for(lambda: dev.state == "active", f"{dev.name} to be active")
        return dev

    def _net(self) -> None:
        from pyroute2 import IPRoute

        from backends.net import NetBackend, Tap, link
        from tests.netns_harness import namespace, socket_in
        self._ns = namespace("mdvv")
        self.ns = self._ns.__enter__()
        tag = os.getpid() % 100000
        self.net = NetBackend.open("mic0", tap=f"mdvv{tag}a", netns=self.ns)
        self.backends.append(self.net)
        self.raw_tap = Tap(f"mdvv{tag}b")
        link.configure(self.raw_tap.name, netns=self.ns, address=f"{RAW_HOST}/24", mtu=link.MPSS_MTU)
        self.raw_mac = link.stable_mac("bench-vop-raw")
        with IPRoute(netns=self.ns) as ip:
            for name in (self.net.tap.name, self.raw_tap.name):
                ip.link("set", index=ip.link_lookup(ifname=name)[0], txqlen=20000)
            ip.neigh("add", dst=RAW_PEER, lladdr=link.format_mac(self.raw_mac),
                     ifindex=ip.link_lookup(ifname=self.raw_tap.name)[0], state=0x80)   # NUD_PERMANENT
        self.raw_tap_mac = bytes.fromhex(link.state(self.raw_tap.name, self.ns).mac.replace(":", ""))
        self.net_dev = self._add(self.net)
        wait_for(lambda: "eth0" in (self.record() or {}).get("devices", {}), "the card's eth0")
        self.sink = socket_in(self.ns)
        self.sink.bind(("0.0.0.0", 9000))
        self.sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.shell(f"ping {HOST_IP} -c 1")          # ARP both ways before anything is timed

    def record(self) -> dict | None:
        return self.ctl.call("os")["record"]

    def shell(self, line: str) -> str:
        r = self.ctl.call("kernel", action="shell", message=line)
        if not r.get("ok") or not r.get("succeeded"):
            raise RuntimeError(f"card shell {line!r}: {r}")
        return r["output"]

    def close(self) -> None:
        try:
            self.ctl.close()
            dev = self.mic.dev
            self.mic.close()
            dev.close()
            for b in self.backends:
                b.close()
            if self.ns is not None:
                self.raw_tap.close()
                self.sink.close()
                self._ns.__exit__(None, None, None)
        finally:
            self.sim.stop()


class Measure:
    """The figures and their limits on one rig; VOP bytes and this process's CPU time kept for the summary."""

    def __init__(self, rig: Rig, net_bytes: int, blk_bytes: int):
        self.rig = rig
        self.net_bytes = net_bytes
        self.blk_bytes = blk_bytes
        self.vop_bytes = 0
        self.vop_cpu = 0.0
        from tests import packets as P
        self.P = P

    def _vop(self, moved: int, cpu_s: float) -> None:
        self.vop_bytes += moved
        self.vop_cpu += cpu_s

    # --- DMA limits ------------------------------------------------------------------------------
    def dma(self, size: int, c2h: bool, total: int) -> float:
        """The DMA engine copying ``size``-byte pieces between card memory and the arena, 16 per batch."""
        mic = self.rig.mic
        m = -(-size // 64) * 64
        batch = 16
        a = mic.arena.alloc(m * batch, 4096)
        try:
            host = mic.card.smpt.to_card(mic.arena.iova(a), m * batch)
            card = 1 << 30   # 1 GiB into card memory: nothing of the card OS lives there
            copies = [((host + i * m, card + i * m) if c2h else (card + i * m, host + i * m)) + (m,)
                      for i in range(batch)]
            n = max(1, total // (size * batch))
            t0 = now()
            for _ in range(n):
                mic.dma.memcpy_batch(copies).result(WAIT)
            return n * batch * size / (now() - t0)
        finally:
            mic.arena.free(a)

    # --- net -------------------------------------------------------------------------------------
    def net_c2h(self, size: int) -> float:
        total = self.net_bytes if size > 1500 else max(size * 2000, self.net_bytes // 200)
        c0 = cpu()
        out = self.rig.shell(f"udp send {HOST_IP} 9000 {total} {size}")
        self._vop(total, cpu() - c0)
        m = re.search(r"sent (\d+) datagrams, (\d+) bytes in ([\d.]+) s", out)
        if not m or int(m.group(1)) == 0:
            raise RuntimeError(f"udp send: {out}")
        self._drain_sink()
        return int(m.group(2)) / float(m.group(3))

    def _drain_sink(self) -> None:
        s = self.rig.sink
        s.setblocking(False)
        try:
            while True:
                s.recv(65536)
        except BlockingIOError:
            pass

    def frame(self, size: int) -> bytes:
        P = self.P
        udp = P.udp(P.ip4(RAW_PEER), P.ip4(RAW_HOST), 4000, 9000, os.urandom(size))
        return P.eth(self.rig.raw_tap_mac, self.rig.raw_mac, P.ETH_P_IP,
                     P.ipv4(P.ip4(RAW_PEER), P.ip4(RAW_HOST), P.IPPROTO_UDP, udp))

    def tap_write(self, size: int) -> float:
        frame = self.frame(size)
        iov = [memoryview(bytes(10)), memoryview(frame)]
        fd = self.rig.raw_tap.fd
        count = max(200, min(20000, self.net_bytes // len(frame)))
        t0 = now()
        writev_frames(fd, iov, count)
        rate = count * size / (now() - t0)
        self._drain_sink()
        return rate

    def _send_from_namespace(self, dst: str, port: int, size: int, count: int) -> None:
        code = (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)\nd = bytes({size})\n"
                f"for _ in range({count}):\n    s.sendto(d, ({dst!r}, {port}))\n")
        subprocess.run(["ip", "netns", "exec", self.rig.ns, sys.executable, "-c", code], check=True, timeout=WAIT)

    def net_h2c(self, size: int) -> float:
        count = max(100, self.net_bytes // size) if size > 1500 else 5000
        rig = self.rig
        rig.shell("udp sink 9001")
        rig.shell("udp sink 9001 reset")
        c0 = cpu()
        self._send_from_namespace(CARD_IP, 9001, size, count)

        def done():
            m = re.search(r"sink port 9001: (\d+) datagrams, (\d+) bytes in ([\d.]+) s", rig.shell("udp stat"))
            return m if m and int(m.group(1)) >= count * 0.98 else None
        try:
            m = wait_for(done, "the card's sink to count the datagrams", 30)
        except TimeoutError:
            m = re.search(r"sink port 9001: (\d+) datagrams, (\d+) bytes in ([\d.]+) s", rig.shell("udp stat"))
        self._vop(int(m.group(2)), cpu() - c0)
        return int(m.group(2)) / max(float(m.group(3)), 1e-6)

    def tap_read(self, size: int) -> float:
        count = max(100, self.net_bytes // size) if size > 1500 else 5000
        fd = self.rig.raw_tap.fd
        buf = memoryview(bytearray(65536 + 64))
        while True:    # empty tap B first
            try:
                os.readv(fd, [buf])
            except BlockingIOError:
                break
        self._send_from_namespace(RAW_PEER, 9000, size, count)
        got = 0
        t0 = now()
        while got < count:
            try:
                os.readv(fd, [buf])
                got += 1
            except BlockingIOError:
                if not select.select([fd], [], [], 1.0)[0]:
                    break
        return got * size / (now() - t0)

    # --- blk -------------------------------------------------------------------------------------
    def blk_card(self, write: bool) -> float:
        sectors = self.blk_bytes // 512
        line = f"blk write vda 0 0x5a {sectors}" if write else f"blk read vda 0 {sectors}"
        c0 = cpu()
        t0 = now()
        self.rig.shell(line)
        t = now() - t0
        self._vop(self.blk_bytes, cpu() - c0)
        return self.blk_bytes / t

    def blk_raw(self, write: bool) -> float:
        fd = os.open(self.rig.image, os.O_RDWR)
        try:
            buf = memoryview(bytearray(MiB))
            t0 = now()
            for off in range(0, self.blk_bytes, MiB):
                (os.pwritev if write else os.preadv)(fd, [buf], off)
            return self.blk_bytes / (now() - t0)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--net-bytes", type=parse_size, default=32 * MiB, help="bytes per big-datagram measurement")
    ap.add_argument("--blk-bytes", type=parse_size, default=32 * MiB, help="bytes per blk measurement")
    ap.add_argument("--no-net", action="store_true", help="skip the net figures (they need root)")
    ap.add_argument("--copy", choices=("spec", "bar0", "small-bar0"), default="spec",
                    help="copy policy: upstream's rules (default), BAR0 both ways, or host -> card pieces under "
                         "4 KiB through BAR0")
    args = ap.parse_args()
    if not args.no_net and os.geteuid() != 0:
        print("net figures need root (use --no-net)", file=sys.stderr)
        return 1
    results = []

    def report(figure: str, value: float, limits: dict[str, float], pkt: int | None = None) -> None:
        unit, scale = ("pkt/s", pkt) if pkt else ("MB/s", 1e6)
        limit = min(limits.values())
        ratio = value / limit if limit else 0.0
        extra = ", ".join(f"{k} {v / scale:.1f}" for k, v in limits.items())
        print(f"{figure:24s} {value / scale:10.1f} {unit:5s}  limit {limit / scale:10.1f} {unit:5s}  "
              f"ratio {ratio:5.2f}   ({extra})", flush=True)
        results.append({"figure": figure, "value": round(value / scale, 2), "unit": unit,
                        "limit": round(limit / scale, 2), "ratio": round(ratio, 3)})

    from micdrv.vop.copy import CopyPolicy
    policy = {"spec": None, "bar0": CopyPolicy(c2h_dma=False, h2c_dma=False),
              "small-bar0": CopyPolicy(h2c_dma_min=4096)}[args.copy]
    rig = Rig(net=not args.no_net, copy=policy)
    print(f"copy policy: {args.copy} ({(policy or CopyPolicy()).describe()})")
    try:
        m = Measure(rig, args.net_bytes, args.blk_bytes)
        for write in (True, False):
            v, raw, dma = best(args.rounds, lambda: m.blk_card(write), lambda: m.blk_raw(write),
                               lambda: m.dma(MiB, c2h=write, total=args.blk_bytes))
            report(f"blk_seq_{'write' if write else 'read'}_card", v,
                   {"pwritev" if write else "preadv": raw, "DMA": dma})
        if not args.no_net:
            for size in (64000, 64):
                pkt = None if size > 1500 else size
                v, tap, dma = best(args.rounds, lambda: m.net_c2h(size), lambda: m.tap_write(size),
                                   lambda: m.dma(size, c2h=True, total=args.net_bytes))
                report(f"net_card_to_host_udp{size}", v, {"tap writev": tap, "DMA": dma}, pkt)
                v, tap, dma = best(args.rounds, lambda: m.net_h2c(size), lambda: m.tap_read(size),
                                   lambda: m.dma(size, c2h=False, total=args.net_bytes))
                report(f"net_host_to_card_udp{size}", v, {"tap readv": tap, "DMA": dma}, pkt)
        for dev in rig.mic.vop.devices:
            print(f"{dev.name + ' copy paths':24s} {json.dumps(dev.engine.counters)}")
            for q in dev.queues:
                c = q.counters
                print(f"{dev.name + ' vring ' + str(q.index):24s} chains {c['chains']}, batches {c['batches']} "
                      f"(max {c['max_batch']}), interrupts {c['interrupts']}, suppressed {c['interrupts_suppressed']}")
        if m.vop_bytes:
            print(f"{'host CPU time':24s} {m.vop_cpu / (m.vop_bytes / 1e9):10.2f} s per GB through VOP")
        print(f"{'resident memory (max)':24s} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:10.1f} MiB")
    finally:
        rig.close()
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
