"""Four simulated cards on one host, each with network, block and console traffic at once (issue 7).

One ``micdrv --simulate`` daemon per card, as systemd runs ``micdrv@.service``
per card, all four in one run directory; each card has a tap (all four in one
network namespace the test made, MPSS addresses 172.31.<N+1>.0/24), a disk and
a console. For a bounded time (:data:`STEADY` seconds) every card at once:

* answers UDP echo (port 7) and ICMP echo from the namespace;
* writes a stream of distinct, checkable block requests with FLUSHes, which
  the host then finds whole in that card's image (:mod:`tests.blk_stream`);
* runs shell commands typed on its console pty, the output read back.

Checked: no request failed, every device is still active, no daemon logged an
error; each daemon's resident memory, file descriptors and threads, taken at
the start and the end of the steady phase, stayed flat (within a tolerance,
not a timing). The figures are printed.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.blk_stream import SECTOR, Writer, check_image
from tests.daemon_harness import WAIT, Daemon, wait_for
from tests.netns_harness import namespace, ping_from, socket_in

pytestmark = pytest.mark.root

CARDS = 4
STEADY = 20.0                  # seconds of traffic between the two measurements
DISK = 256 << 20              # sparse; a card's writes in the run fill well under half of it
RSS_SLACK_KIB = 4 << 10        # a daemon's resident memory may grow this much in the steady phase
FD_SLACK = 2                   # ... and its fds / threads this many (a connection being accepted)
THREAD_SLACK = 2


def host_ip(n: int) -> str:
    return f"172.31.{n + 1}.254"


def card_ip(n: int) -> str:
    return f"172.31.{n + 1}.1"


@pytest.fixture(scope="module")
def cards():
    with namespace("mdl") as ns:
        base = Path(tempfile.mkdtemp(prefix="micdrv-load"))
        os.chmod(base, 0o755)
        started: list[Daemon] = []
        try:
            for n in range(CARDS):
                img = base / f"disk{n}.img"
                with open(img, "wb") as f:
                    f.truncate(DISK)
                config = f"""
[card.mic{n}]
cmdline = "micdrv_sim.heartbeat=1"
reset_timeout = 10
[[card.mic{n}.console]]
[[card.mic{n}.net]]
tap = "mdl{os.getpid() % 100000}n{n}"
netns = "{ns}"
[[card.mic{n}.blk]]
path = "{img}"
serial = "load-disk{n}"
"""
                d = Daemon(base / "run", f"mic{n}", config)
                d.n, d.img, d.ns = n, img, ns
                started.append(d)
            out = started[0].ok("boot", "--wait", *(d.name for d in started))
            assert out.count(": online") == CARDS, out
            for d in started:
                serving(d)
            yield started
        finally:
            failures = []
            for d in started:
                rc = d.stop()
                if rc != 0 or "Traceback" in d.log():
                    failures.append(f"{d.name}: exit {rc}\n{d.log()[-3000:]}")
            for n in range(CARDS):           # the images (tens of MiB written each); the logs stay
                (base / f"disk{n}.img").unlink(missing_ok=True)
            assert not failures, "\n".join(failures)


def devices(d: Daemon) -> list[dict]:
    return json.loads(d.ok("devices", "--json", d.name))


def serving(d: Daemon) -> None:
    wait_for(lambda: all(x["state"] == "active" for x in devices(d)), f"{d.name}'s devices active")
    wait_for(lambda: "eth0" in (d.card_os() or {}).get("devices", {}) and
             "vda" in d.card("kernel", action="shell", message="blk list")["output"], f"{d.name}'s eth0 and vda")


def udp_echo(sock: socket.socket, dst: str, data: bytes) -> bytes:
    sock.sendto(data, (dst, 7))
    while True:
        got, peer = sock.recvfrom(65536)
        if peer == (dst, 7):
            return got


class Console:
    """The card's console pty (through its link), one shell command at a time."""

    def __init__(self, d: Daemon):
        self.fd = os.open(d.run_dir / d.name / "console", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.seen = b""

    def run(self, line: str, token: bytes) -> bytes:
        """Type ``line``; what came back, once ``token`` showed after the shell's echo of the line."""
        os.write(self.fd, line.encode() + b"\r")
        echo = line.encode()
        deadline = time.monotonic() + WAIT

        def answered() -> bool:
            i = self.seen.find(echo)
            return i >= 0 and token in self.seen[i + len(echo):]
        while not answered() and time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.2)[0]:
                self.seen += os.read(self.fd, 65536)
        assert answered(), self.seen[-300:]
        out, self.seen = self.seen, b""
        return out

    def close(self) -> None:
        os.close(self.fd)


class Traffic:
    """One card's network and console traffic on two threads until :meth:`stop`; every error is kept."""

    def __init__(self, d: Daemon):
        self.d = d
        self.halt = threading.Event()
        self.counts = dict.fromkeys(("udp", "udp_bytes", "ping", "console"), 0)
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._guard, args=(f, ), name=f"{d.name} {f.__name__}")
                        for f in (self._net, self._console)]
        for t in self.threads:
            t.start()

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:
            self.errors.append(f"{self.d.name} {fn.__name__}: {type(e).__name__}: {e}")

    def _net(self) -> None:
        d = self.d
        rng = random.Random(d.n)
        with socket_in(d.ns) as s:
            s.settimeout(WAIT)
            i = 0
            while not self.halt.is_set():
                data = os.urandom(rng.choice((1, 64, 1472, 1473, 9000, 32000)))
                assert udp_echo(s, card_ip(d.n), data) == data
                self.counts["udp"] += 1
                self.counts["udp_bytes"] += len(data)
                if i % 8 == 0:
                    payload = os.urandom(rng.choice((0, 56, 1400)))
                    assert ping_from(d.ns, card_ip(d.n), 0x4C00 + d.n, (i // 8) & 0xFFFF, payload, WAIT) == payload
                    self.counts["ping"] += 1
                i += 1

    def _console(self) -> None:
        con = Console(self.d)
        try:
            i = 0
            while not self.halt.is_set():
                token = f"load{self.d.n}x{i}".encode()
                con.run(f"echo {token.decode()}", token)
                if i % 4 == 0:
                    out = con.run("uname -a", b"k1om")
                    assert f"mic{self.d.n}".encode() in out
                self.counts["console"] += 1
                i += 1
        finally:
            con.close()

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(WAIT)
            assert not t.is_alive(), t.name


def usage(d: Daemon) -> dict:
    return {"rss_kib": d.proc_rss_kib(), "fds": d.proc_fds(), "threads": d.proc_threads()}


def test_four_cards_with_network_block_and_console_traffic_no_errors_and_memory_flat(cards):
    # Warm-up: a few rounds of everything on every card (first-use allocations are not growth).
    writers = [Writer(d.sim_control, 0, random.Random(7300 + d.n), area=DISK // SECTOR, sizes=(8, 32, 128)).start()
               for d in cards]
    traffic = [Traffic(d) for d in cards]
    wait_for(lambda: all(w.flushes >= 2 or w.error for w in writers) and
             all(t.counts["udp"] >= 300 and t.counts["console"] >= 20 and t.counts["ping"] >= 2 or t.errors
                 for t in traffic), "the warm-up")
    start = {d.name: usage(d) for d in cards}
    time.sleep(STEADY)
    end = {d.name: usage(d) for d in cards}
    for w in writers:
        w.stop.set()
    for t in traffic:
        t.stop()
    for w in writers:
        w.thread.join(WAIT)
        assert not w.thread.is_alive()

    errors = [e for t in traffic for e in t.errors] + [f"{d.name} blk: {w.error}" for d, w in zip(cards, writers)
                                                        if w.error is not None]
    assert not errors, "\n".join(errors)
    verified = 0
    for d, w in zip(cards, writers):
        assert w.inflight is None and w.flushes >= 2 and not w.full, (d.name, w.flushes, w.full)
        verified += check_image(d.img, w, tally=False)
        assert all(x["state"] == "active" for x in devices(d)), devices(d)
        assert d.status()["state"] == "online"
        log = d.log()
        assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
    for d in cards:
        s, e = start[d.name], end[d.name]
        print(f"{d.name}: RSS {s['rss_kib']} -> {e['rss_kib']} KiB, fds {s['fds']} -> {e['fds']}, "
              f"threads {s['threads']} -> {e['threads']}")
    for d, t, w in zip(cards, traffic, writers):
        print(f"{d.name}: {t.counts['udp']} UDP echoes ({t.counts['udp_bytes']} bytes), {t.counts['ping']} pings, "
              f"{t.counts['console']} console commands, {len(w.done)} block writes ({w.written_bytes()} bytes, "
              f"{w.flushes} FLUSHes)")
    print(f"block bytes verified: {verified} over {STEADY:g} s")
    for d in cards:
        s, e = start[d.name], end[d.name]
        assert e["rss_kib"] - s["rss_kib"] <= RSS_SLACK_KIB, (d.name, s, e)
        assert e["fds"] - s["fds"] <= FD_SLACK, (d.name, s, e)
        assert e["threads"] - s["threads"] <= THREAD_SLACK, (d.name, s, e)
    for t in traffic:
        assert t.counts["udp"] and t.counts["ping"] and t.counts["console"], t.counts
