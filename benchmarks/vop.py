"""VOP end to end through the real daemon, each figure beside a limit measured in the same run (issue 5).

Run from the repository root, as root (it makes two network namespaces, a
tap and a veth pair in them; no traffic leaves them)::

    python -m benchmarks.vop [--rounds 2] [--seconds 1] [--window 128] [--blk-bytes 64M]
                             [--rand-count 8000] [--no-net]

The card is the simulated X100 in its own process
(:class:`~micdrv.sim.process.SimulatedCardProcess`) running the card OS
with its own virtio-net (IP stack, UDP echo on port 7) and virtio-blk
drivers over the card's VOP transport. The host is the daemon as an
operator runs it, ``python -m micdrv.daemon --vfio-user SOCKET``, in a
process of its own, with a TOML configuration naming one net device (tap
in namespace A, 172.31.1.254/24, MTU 64512, the card at 172.31.1.1) and one
blk device (an image of random bytes in tmpfs); FUSE off. It is booted with
``micctl``; the card's shell is driven through the simulator's control
socket.

Figures (value; limit measured in the same run):

* **net_echo_udp64000 / net_echo_udp64** -- UDP echo host -> card -> host:
  a sender/receiver in namespace A (this process) keeps ``--window``
  datagrams (default :data:`WINDOW`, as many as the card's receive ring
  holds) in flight to the card's echo service (port 7) for
  ``--seconds``, each carrying a sequence number, and counts the echoes:
  echoed payload bytes per second (MB/s) for 64000-byte datagrams,
  echoed datagrams per second (pkt/s) for 64-byte ones. Every 16th echo is
  compared byte for byte with what was sent; a datagram not back within
  :data:`LOSS_TIMEOUT` counts as lost (and frees its window slot). Limit:
  the very same sender/receiver and window against a Python UDP echo
  responder (a process) in namespace B across a veth pair with the tap's
  MTU.
* **blk_seq_write_card / blk_seq_read_card** -- the card's shell command
  over the first ``--blk-bytes`` of the disk (one command; at most
  :data:`BLK_COMMAND` bytes each), timed from this process around it:
  ``blk write vda 0 0xHH N`` (a new HH each run) fills each 1 MiB
  request's card memory in place with HH and writes it, as ``dd
  if=/dev/zero of=/dev/vda bs=1M oflag=direct`` would; ``blk read -n vda 0
  N`` reads 1 MiB requests into card memory and discards them unread, as
  ``dd if=/dev/vda of=/dev/null bs=1M iflag=direct`` would. The card's
  driver keeps :data:`~micdrv.sim.cardos.blk.STREAM_WINDOW` (16) requests
  in flight. Checked after each run, untimed: the image file holds HH over
  the range (write); a hashing ``blk read vda 0 N`` gives the sha256 of
  the image file's bytes there, which the host put there fresh from
  ``os.urandom`` before the run (read). One untimed write and read of the
  range go first (the first touch of card memory and of the daemon's
  staging costs ten times a warm run). Limit: ``pwritev`` / ``preadv`` of
  the same bytes of the image file in 1 MiB requests, one at a time, from
  one reused buffer.
* **blk_seq_write_bound_2copies / blk_seq_read_bound_2copies** (and
  ``_1copy``) -- what this machine allows those figures, beside the same
  limit: the two copies a sequential request costs the host's CPUs here
  (the image's ``preadv``/``pwritev`` and the simulated DMA engine's
  ``memmove``) as an ideal pipeline of two processes over 16 rotating 1 MiB
  slots, nothing else of the stack (:mod:`benchmarks.pipeline`); ``_1copy``
  hands the slots over without the second copy, the file side alone, as
  on silicon, where the card's engine does the other copy.
* **blk_rand4k_qd32_read_card** -- the card's ``blk randread vda COUNT 32``:
  4 KiB reads at random aligned offsets, 32 in flight, timed on the card
  (IOPS). Limit: ``preadv`` of 4 KiB at the same offsets of the image file,
  one at a time.
* **daemon_cpu_per_gb** -- the daemon process's user + system CPU time
  (``/proc/PID/stat``, all its threads) over the bulk figures (64000-byte
  echo, counting the payload once each way, and sequential blk), per GB
  through VOP; per-figure CPU is printed too (in clock ticks of 10 ms, so
  the small blk figures' are coarse). **daemon_rss** -- its peak
  resident memory (VmHWM) at the end; VmRSS printed beside it.

Also printed: the issue's targets beside the figures (met / not met), the
copy-path byte counters and vring counters of each device (``micctl
devices --json``). Figure and limit alternate over ``--rounds``; the best
of each is kept. The last lines are one JSON object per figure:
``{"figure", "value", "unit", "limit", "ratio"}`` (limit and ratio null
for the daemon's CPU time and memory).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import best, now, parse_size, wait_for
from benchmarks.pipeline import pipeline

KiB, MiB = 1 << 10, 1 << 20
HOST_IP, CARD_IP = "172.31.1.254", "172.31.1.1"          # MPSS defaults for mic0 (README "Configuration")
VETH_A, VETH_B = "172.31.2.254", "172.31.2.1"            # the limit's two ends
MTU = 64512                                              # the tap's MTU (MPSS), and so the veth's
ECHO_PORT = 7                                            # RFC 862, the card's UdpEcho
IMAGE_BYTES = 128 * MiB
BLK_COMMAND = IMAGE_BYTES  # bytes per blk write/read command at most: one command per measurement, as one dd is
LOSS_TIMEOUT = 0.5         # seconds after which a datagram not echoed is lost
CHECK_EVERY = 16           # every Nth echo compared byte for byte
SEQ = struct.Struct("<Q")  # each datagram starts with its sequence number
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33   # <asm-generic/socket.h>: buffer sizes past rmem/wmem_max (root)
# Echo datagrams in flight: the depth of the card's receive ring, MIC_VRING_ENTRIES = 128 (spec 5.6; the
# vring num the host offers), so a throughput figure keeps every buffer the card can post busy without
# more queued than it can take. At 32 the figure measures the round trip through three processes instead
# (README, "vop" benchmark).
WINDOW = 128
SOCK_BUF = 16 << 20        # room for any window of 64000-byte datagrams, so no socket drops one
WAIT = 60.0
TARGETS = {"net_echo_udp64000": ("MB/s", 1000.0), "net_echo_udp64": ("pkt/s", 50000.0),
           "blk_seq_read_card": ("ratio", 0.7), "blk_seq_write_card": ("ratio", 0.7),
           "blk_rand4k_qd32_read_card": ("IOPS", 20000.0)}

RESPONDER = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, int(sys.argv[3]))   # SO_RCVBUFFORCE
s.setsockopt(socket.SOL_SOCKET, 32, int(sys.argv[3]))   # SO_SNDBUFFORCE
s.bind((sys.argv[1], int(sys.argv[2])))
buf = bytearray(65536)
mv = memoryview(buf)
print("ready", flush=True)
while True:
    n, peer = s.recvfrom_into(buf)
    s.sendto(mv[:n], peer)
"""


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads), from /proc/PID/stat (proc(5) fields 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0])
    return out


def echo_run(sock: socket.socket, size: int, window: int, seconds: float) -> dict:
    """Keep ``window`` datagrams of ``size`` bytes in flight on the connected ``sock`` for ``seconds``.

    The same code measures the card and the limit. Returns the echoed count and bytes, the time from the
    first send to the last echo, the lost / late / corrupt / refused (ICMP port unreachable) counts and how
    many echoes were compared.
    """
    body = memoryview(os.urandom(size))[SEQ.size:]
    buf = bytearray(size + 64)
    outstanding: dict[int, float] = {}
    seq = echoed = lost = late = bad = checked = refused = 0
    sock.setblocking(False)
    while True:                       # nothing of an earlier run left in the socket
        try:
            sock.recv_into(buf)
        except BlockingIOError:
            break
    t0 = last = now()
    end = t0 + seconds
    while True:
        t = now()
        sending = t < end
        while sending and len(outstanding) < window:
            try:
                sock.sendmsg([SEQ.pack(seq), body])
            except BlockingIOError:
                break
            except ConnectionRefusedError:    # an ICMP port unreachable came back for an earlier one
                refused += 1
                continue
            outstanding[seq] = t
            seq += 1
        if not outstanding:
            if not sending:
                break
            continue
        if select.select([sock], [], [], 0.05)[0]:
            while True:
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    refused += 1
                    continue
                s = SEQ.unpack_from(buf)[0] if n >= SEQ.size else -1
                if outstanding.pop(s, None) is None:
                    late += 1                 # expired earlier (counted lost), or not ours
                    continue
                if n != size:
                    bad += 1
                    continue
                echoed += 1
                last = now()
                if echoed % CHECK_EVERY == 0:
                    checked += 1
                    if bytes(buf[SEQ.size:n]) != body:
                        bad += 1
        t = now()
        oldest = next(iter(outstanding.values()), t)
        if t - oldest > LOSS_TIMEOUT:         # dicts keep insertion order: the oldest first
            for s, sent in list(outstanding.items()):
                if t - sent <= LOSS_TIMEOUT:
                    break
                del outstanding[s]
                lost += 1
    return {"sent": seq, "echoed": echoed, "bytes": echoed * size, "seconds": max(last - t0, 1e-9),
            "lost": lost, "late": late, "bad": bad, "checked": checked, "refused": refused}


class Rig:
    """Namespaces A and B with the veth pair and the echo responder, the simulated card, the daemon driving it."""

    def __init__(self, net: bool):
        from micdrv.jsonlines import JsonLinesClient
        from micdrv.sim.cardos.image import write_files
        from micdrv.sim.process import SimulatedCardProcess
        self.stack = contextlib.ExitStack()
        self.daemon = self.responder = None
        self.net = net
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="micdrv-bench-vop-", dir=base))
        self.stack.callback(shutil.rmtree, self.dir, True)
        try:
            self.image = self.dir / "disk.img"
            with open(self.image, "wb") as f:
                for _ in range(IMAGE_BYTES // MiB):
                    f.write(os.urandom(MiB))
            firmware = self.dir / "uos.img"
            write_files(firmware)
            if net:
                self._namespaces()
            self.sim = SimulatedCardProcess(self.dir / "sim", "--memory", "2G", "--ready-delay", "0.05")
            self.stack.callback(self.sim.stop)
            self.ctl = JsonLinesClient(self.sim.control, timeout=WAIT * 4)
            self.stack.callback(self.ctl.close)
            self._daemon(firmware)
        except BaseException:
            self.close()
            raise

    # --- namespaces ------------------------------------------------------------------------------
    def _namespaces(self) -> None:
        from tests.netns_harness import namespace
        self.ns = self.stack.enter_context(namespace("mdvva"))
        self.ns_b = self.stack.enter_context(namespace("mdvvb"))
        tag = os.getpid() % 100000
        self.tap = f"mdvv{tag}"
        va, vb = f"mdvv{tag}a", f"mdvv{tag}b"

        def ip(*args: str) -> None:
            subprocess.run(["ip", *args], check=True, timeout=WAIT)
        ip("-n", self.ns, "link", "add", va, "mtu", str(MTU), "type", "veth", "peer", "name", vb, "mtu", str(MTU),
           "netns", self.ns_b)
        ip("-n", self.ns, "addr", "add", f"{VETH_A}/24", "dev", va)
        ip("-n", self.ns_b, "addr", "add", f"{VETH_B}/24", "dev", vb)
        ip("-n", self.ns, "link", "set", va, "up")
        ip("-n", self.ns_b, "link", "set", vb, "up")
        self.responder = subprocess.Popen(["ip", "netns", "exec", self.ns_b, sys.executable, "-c", RESPONDER, VETH_B,
                                           str(ECHO_PORT), str(SOCK_BUF)], stdout=subprocess.PIPE, text=True)
        self.stack.callback(self._stop_responder)
        if self.responder.stdout.readline().strip() != "ready":
            raise RuntimeError("the echo responder in namespace B did not start")

        self.to_veth = self.sender(VETH_B)

    def sender(self, dst: str) -> socket.socket:
        """A UDP socket in namespace A connected to ``dst``'s echo port."""
        from tests.netns_harness import socket_in
        s = socket_in(self.ns)
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCK_BUF)
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCK_BUF)
        s.connect((dst, ECHO_PORT))
        self.stack.callback(s.close)
        return s

    def _stop_responder(self) -> None:
        if self.responder.poll() is None:
            self.responder.send_signal(signal.SIGTERM)
            try:
                self.responder.wait(10)
            except subprocess.TimeoutExpired:
                self.responder.kill()
                self.responder.wait(10)

    # --- the daemon --------------------------------------------------------------------------------
    def _daemon(self, firmware: Path) -> None:
        self.run_dir = self.dir / "run"
        config = self.dir / "micdrv.toml"
        text = (f'[global]\nfuse = false\nlog_level = "warning"\n'
                f'[card.mic0]\nfirmware = "{firmware}"\nreset_timeout = 20\n'
                f'[[card.mic0.blk]]\npath = "{self.image}"\nserial = "bench-vop"\n')
        if self.net:
            text += (f'[[card.mic0.net]]\ntap = "{self.tap}"\naddress = "{HOST_IP}/24"\n'
                     f'card_address = "{CARD_IP}"\nnetns = "{self.ns}"\nmtu = {MTU}\n')
        config.write_text(text)
        self.log_path = self.dir / "daemon.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")) if p))
        self.env = env
        with open(self.log_path, "ab") as log:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "micdrv.daemon", "--vfio-user", self.sim.socket, "--name", "mic0",
                 "--run-dir", str(self.run_dir), "--config", str(config)],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.stack.callback(self._stop_daemon)
        sock = self.run_dir / "mic0.sock"

        def up() -> bool:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"micdrv exited with {self.daemon.returncode}:\n{self.log()}")
            return sock.exists()
        wait_for(up, "the daemon's control socket")
        if self.status()["state"] != "ready":
            self.micctl("reset", "--wait", "mic0")
        self.micctl("boot", "--wait", "mic0")
        want = ("vda", "eth0") if self.net else ("vda",)
        wait_for(lambda: all(d in (self.record() or {}).get("devices", {}) for d in want), "the card's devices")
        if self.net:
            self.to_card = self.sender(CARD_IP)      # the tap and its route exist now
            self.shell(f"ping {HOST_IP} -c 1")       # ARP both ways before anything is timed

    def micctl(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "micdrv.cli", "--run-dir", str(self.run_dir), *args],
                           capture_output=True, text=True, timeout=WAIT * 2, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"micctl {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}\n{self.log()}")
        return r.stdout

    def status(self) -> dict:
        return json.loads(self.micctl("status", "--json", "mic0"))[0]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _stop_daemon(self) -> None:
        if self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(WAIT)

    # --- the card ---------------------------------------------------------------------------------
    def record(self) -> dict | None:
        return self.ctl.call("os")["record"]

    def shell(self, line: str) -> str:
        r = self.ctl.call("kernel", action="shell", message=line)
        if not r.get("ok") or not r.get("succeeded"):
            raise RuntimeError(f"card shell {line!r}: {r}")
        return r["output"]

    def close(self) -> None:
        self.stack.close()


class Measure:
    """The figures and their limits on one rig; the daemon's CPU time per figure."""

    def __init__(self, rig: Rig, seconds: float, window: int, blk_bytes: int, rand_count: int):
        self.rig, self.seconds, self.window = rig, seconds, window
        self.blk_bytes, self.rand_count = blk_bytes, rand_count
        self.cpu: dict[str, list[float]] = {}      # figure -> [daemon CPU s, bytes through VOP, operations]
        self.echo_stats: dict[str, dict] = {}
        self.blk_runs = 0                          # card write runs so far: each writes a byte of its own
        self.blk_fresh = False                     # the blk range holds random bytes the card has not written

    def _daemon_cpu(self, figure: str, fn):
        pid = self.rig.daemon.pid
        c0 = proc_cpu(pid)
        value, moved, ops = fn()
        acc = self.cpu.setdefault(figure, [0.0, 0, 0])
        acc[0] += proc_cpu(pid) - c0
        acc[1] += moved
        acc[2] += ops
        return value

    # --- net ---------------------------------------------------------------------------------------
    def _echo(self, key: str, sock: socket.socket, size: int) -> tuple[float, int, int]:
        r = echo_run(sock, size, self.window, self.seconds)
        tot = self.echo_stats.setdefault(key, dict.fromkeys(r, 0))
        for k, v in r.items():
            tot[k] += v
        rate = (r["bytes"] if size > 1500 else r["echoed"]) / r["seconds"]
        return rate, 2 * r["bytes"], 2 * r["echoed"]

    def echo_card(self, size: int) -> float:
        return self._daemon_cpu(f"net_echo_udp{size}", lambda: self._echo(f"card {size}", self.rig.to_card, size))

    def echo_veth(self, size: int) -> float:
        return self._echo(f"veth {size}", self.rig.to_veth, size)[0]

    # --- blk ---------------------------------------------------------------------------------------
    def _blk_commands(self):
        for off in range(0, self.blk_bytes, BLK_COMMAND):
            yield off // 512, min(BLK_COMMAND, self.blk_bytes - off) // 512

    def blk_warm(self) -> None:
        """One untimed write and read of the range first: the first touch of the card memory the requests
        use and of the daemon's staging costs ten times a warm run (page faults), once."""
        for s, n in self._blk_commands():
            self.rig.shell(f"blk write vda {s} 0x00 {n}")
            self.rig.shell(f"blk read -n vda {s} {n}")

    def blk_card(self, write: bool) -> float:
        """The timed commands (module docstring), then their untimed check."""
        if write:
            self.blk_runs += 1
            byte = 0x5a + self.blk_runs % 64        # never the limit's 0xa5: every run writes what it checks
            self.blk_fresh = False
        elif not self.blk_fresh:
            self._blk_randomize()
        lines = [f"blk write vda {s} {byte:#04x} {n}" if write else f"blk read -n vda {s} {n}"
                 for s, n in self._blk_commands()]

        def run():
            t0 = now()
            for line in lines:
                self.rig.shell(line)
            return self.blk_bytes / (now() - t0), self.blk_bytes, self.blk_bytes // MiB
        rate = self._daemon_cpu(f"blk_seq_{'write' if write else 'read'}_card", run)
        if write:
            self._blk_check_written(byte)
        else:
            self._blk_check_read()
        return rate

    def _blk_randomize(self) -> None:
        """Fresh random bytes over the range, written by the host (the image is the daemon's too: its page
        cache is the one the daemon reads)."""
        with open(self.rig.image, "r+b") as f:
            for off in range(0, self.blk_bytes, MiB):
                f.write(os.urandom(MiB))
        self.blk_fresh = True

    def _blk_check_written(self, byte: int) -> None:
        want = bytes([byte]) * MiB
        with open(self.rig.image, "rb") as f:
            for off in range(0, self.blk_bytes, MiB):
                if f.read(MiB) != want:
                    raise RuntimeError(f"blk write {byte:#04x}: the image does not hold it at {off:#x}")

    def _blk_check_read(self) -> None:
        with open(self.rig.image, "rb") as f:
            for s, n in self._blk_commands():
                f.seek(s * 512)
                want = hashlib.sha256(f.read(n * 512)).hexdigest()
                got = self.rig.shell(f"blk read vda {s} {n}").split()
                if not got or got[0] != want:
                    raise RuntimeError(f"blk read vda {s} {n}: sha256 {got[:1]}, the image's is {want}")

    def blk_host(self, write: bool) -> float:
        fd = os.open(self.rig.image, os.O_RDWR)
        try:
            buf = memoryview(bytearray(MiB) if not write else bytearray(b"\xa5" * MiB))
            if write:
                self.blk_fresh = False
            t0 = now()
            for off in range(0, self.blk_bytes, MiB):
                (os.pwritev if write else os.preadv)(fd, [buf], off)
            return self.blk_bytes / (now() - t0)
        finally:
            os.close(fd)

    def blk_bound(self, write: bool, dma: bool) -> float:
        """The two copies of a sequential blk request as an ideal pipeline of two processes, over the same bytes
        of the image (:mod:`benchmarks.pipeline`); ``dma=False``: the file's copy alone, its buffers handed
        over."""
        if write:
            self.blk_fresh = False
        return pipeline(str(self.rig.image), self.blk_bytes, write, dma)

    def rand_card(self, seed: int) -> float:
        def run():
            out = self.rig.shell(f"blk randread vda {self.rand_count} 32 {seed}")
            m = re.search(r"randread vda: (\d+) requests of 4096 bytes at depth 32 in ([\d.]+) s", out)
            if not m or int(m.group(1)) != self.rand_count:
                raise RuntimeError(f"blk randread: {out}")
            return int(m.group(1)) / float(m.group(2)), self.rand_count * 4 * KiB, self.rand_count
        return self._daemon_cpu("blk_rand4k_qd32_read_card", run)

    def rand_host(self, seed: int) -> float:
        """``preadv`` of 4 KiB at the card's offsets (the shell's documented draw), one at a time."""
        rng = random.Random(seed)
        blocks = IMAGE_BYTES // (4 * KiB)
        offsets = [rng.randrange(blocks) * 4 * KiB for _ in range(self.rand_count)]
        fd = os.open(self.rig.image, os.O_RDONLY)
        try:
            buf = [memoryview(bytearray(4 * KiB))]
            t0 = now()
            for off in offsets:
                os.preadv(fd, buf, off)
            return self.rand_count / (now() - t0)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per echo measurement")
    ap.add_argument("--window", type=int, default=WINDOW, help="echo datagrams kept in flight")
    ap.add_argument("--blk-bytes", type=parse_size, default=64 * MiB, help="bytes per sequential blk measurement")
    ap.add_argument("--rand-count", type=int, default=8000, help="random 4 KiB reads per measurement")
    ap.add_argument("--no-net", action="store_true", help="skip the net figures")
    args = ap.parse_args()
    if not args.no_net and os.geteuid() != 0:
        print("the net figures need root (namespaces, a tap, a veth pair); --no-net skips them", file=sys.stderr)
        return 1
    if not 0 < args.blk_bytes <= IMAGE_BYTES or args.blk_bytes % MiB:
        print(f"--blk-bytes: whole MiB, at most {IMAGE_BYTES // MiB} MiB", file=sys.stderr)
        return 2
    results = []

    def report(figure: str, value: float, limit: float, unit: str, scale: float, what: str) -> None:
        ratio = value / limit if limit else 0.0
        tunit, target = TARGETS[figure]
        got = ratio if tunit == "ratio" else value / scale
        verdict = "met" if got >= target else "NOT met"
        tgt = f"target {target:g} x limit" if tunit == "ratio" else f"target {target:g} {tunit}"
        print(f"{figure:28s} {value / scale:10.1f} {unit:5s}  limit {limit / scale:10.1f} {unit:5s} ({what})  "
              f"ratio {ratio:5.2f}   {tgt}: {verdict}", flush=True)
        results.append({"figure": figure, "value": round(value / scale, 2), "unit": unit,
                        "limit": round(limit / scale, 2), "ratio": round(ratio, 3)})

    t_start = now()
    rig = Rig(net=not args.no_net)
    print(f"rig up in {now() - t_start:.1f} s: daemon pid {rig.daemon.pid}, window {args.window}, "
          f"{args.seconds:g} s per echo run, {args.rounds} rounds", flush=True)
    try:
        m = Measure(rig, args.seconds, args.window, args.blk_bytes, args.rand_count)
        if not args.no_net:
            for size in (64000, 64):
                v, lim = best(args.rounds, lambda: m.echo_card(size), lambda: m.echo_veth(size))
                unit, scale = ("MB/s", 1e6) if size > 1500 else ("pkt/s", 1.0)
                report(f"net_echo_udp{size}", v, lim, unit, scale, "veth + Python echo")
                for key in (f"card {size}", f"veth {size}"):
                    s = m.echo_stats[key]
                    print(f"  {key + ' B echo':22s} sent {s['sent']}, echoed {s['echoed']}, lost {s['lost']}, "
                          f"late {s['late']}, refused {s['refused']}, compared {s['checked']}, wrong {s['bad']}",
                          flush=True)
        m.blk_warm()
        for write in (True, False):
            v, lim, two, one = best(args.rounds, lambda: m.blk_card(write), lambda: m.blk_host(write),
                                    lambda: m.blk_bound(write, True), lambda: m.blk_bound(write, False))
            way = "write" if write else "read"
            report(f"blk_seq_{way}_card", v, lim, "MB/s", 1e6, "pwritev" if write else "preadv")
            # what the same machine allows the stack's copies (benchmarks.pipeline): beside the same limit
            for figure, bound, what in ((f"blk_seq_{way}_bound_2copies", two, "file copy + DMA memmove"),
                                        (f"blk_seq_{way}_bound_1copy", one, "file copy, slots handed over")):
                print(f"{figure:28s} {bound / 1e6:10.1f} MB/s   limit {lim / 1e6:10.1f} MB/s  ratio "
                      f"{bound / lim:5.2f}   (ideal pipeline: {what}; the card's figure is "
                      f"{v / bound:.2f} of it)", flush=True)
                results.append({"figure": figure, "value": round(bound / 1e6, 2), "unit": "MB/s",
                                "limit": round(lim / 1e6, 2), "ratio": round(bound / lim, 3)})
        seed = [0]                # a new seed each round; the card's and the host's reads at the same offsets

        def rand_card() -> float:
            seed[0] += 1
            return m.rand_card(seed[0])
        v, lim = best(args.rounds, rand_card, lambda: m.rand_host(seed[0]))
        report("blk_rand4k_qd32_read_card", v, lim, "IOPS", 1.0, "preadv 4 KiB, one at a time")

        devices = json.loads(rig.micctl("devices", "--json", "mic0"))
        for dev in devices:
            vop = dev.get("vop") or {}
            print(f"{dev['name'] + ' copy paths':28s} {json.dumps(vop.get('copy'))}")
            for q in vop.get("queues", []):
                print(f"{dev['name'] + ' vring ' + str(q.get('index')):28s} chains {q.get('chains')}, batches "
                      f"{q.get('batches')} (max {q.get('max_batch')}), interrupts {q.get('interrupts')}, "
                      f"suppressed {q.get('interrupts_suppressed')}")
        bulk_cpu = bulk_bytes = 0.0
        for figure, (c, moved, ops) in m.cpu.items():
            per_gb = c / (moved / 1e9) if moved else 0.0
            print(f"{'daemon CPU ' + figure:40s} {c:6.2f} s for {moved / 1e6:8.1f} MB: {per_gb:6.2f} s/GB, "
                  f"{c / ops * 1e6 if ops else 0:7.1f} us per {'datagram' if 'net' in figure else 'request'}")
            if figure in ("net_echo_udp64000", "blk_seq_write_card", "blk_seq_read_card"):
                bulk_cpu += c
                bulk_bytes += moved
        per_gb = bulk_cpu / (bulk_bytes / 1e9) if bulk_bytes else 0.0
        print(f"{'daemon CPU per GB (bulk)':28s} {per_gb:10.2f} s/GB (64000-byte echo both ways, sequential blk)")
        mem = proc_mem_kib(rig.daemon.pid)
        print(f"{'daemon resident memory':28s} {mem['VmHWM'] / 1024:10.1f} MiB peak (VmHWM), "
              f"{mem['VmRSS'] / 1024:.1f} MiB now (VmRSS)")
        results.append({"figure": "daemon_cpu_per_gb", "value": round(per_gb, 3), "unit": "s/GB",
                        "limit": None, "ratio": None})
        results.append({"figure": "daemon_rss", "value": round(mem["VmHWM"] / 1024, 1), "unit": "MiB",
                        "limit": None, "ratio": None})
        if rig.daemon.poll() is not None or "Traceback" in rig.log():
            print(f"the daemon failed:\n{rig.log()}", file=sys.stderr)
            return 1
    finally:
        rig.close()
    print(f"total {now() - t_start:.1f} s", flush=True)
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
