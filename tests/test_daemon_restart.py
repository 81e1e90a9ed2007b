"""The daemon killed with SIGKILL while its card runs, then started again (issue 7; README "Running a card").

The card is a simulated X100 in a process the test started
(:class:`~micdrv.sim.process.SimulatedCardProcess`), so it outlives the
daemon as a real card does; the daemon is ``micdrv --vfio-user`` over it,
with a console, a tap in a network namespace the test made and a disk.

A killed daemon leaves behind its control socket, its FUSE tree (dead:
ENOTCONN), the console link to a pty that is gone, and a card whose OS still
runs with devices, rings and SCIF queues that were in the dead process's
memory. The next daemon must not trip over any of it: it removes the socket,
detaches the dead tree before it opens the console, and -- the card having
been started by the dead daemon (``<run_dir>/<card>.started``) -- resets the
card before it maps anything for it, then boots it again when asked to
(``--boot``) or leaves it ready. Whatever the card had seen written and
flushed is in the image. Each kill goes to the hardening tally.
"""

from __future__ import annotations

import json
import os
import select
import signal
import tempfile
import time
from pathlib import Path

import pytest

from micdrv.fs.mount import FSTYPE, mounts_at
from micdrv.sim.cardos.image import write_files
from micdrv.sim.process import SimulatedCardProcess
from tests import hardening
from tests.blk_stream import SECTOR
from tests.daemon_harness import WAIT, AttachedDaemon, control_call, wait_for
from tests.netns_harness import namespace, socket_in

pytestmark = pytest.mark.root

HOST_IP, CARD_IP = "172.31.1.254", "172.31.1.1"
AREA = 16384                  # sectors per kill round (8 MiB)


@pytest.fixture(scope="module")
def card():
    with namespace("mdr") as ns:
        base = Path(tempfile.mkdtemp(prefix="micdrv-restart"))
        os.chmod(base, 0o755)
        fw = base / "firmware" / "uos.img"
        fw.parent.mkdir()
        write_files(fw)
        img = base / "disk0.img"
        with open(img, "wb") as f:
            f.truncate(4 * AREA * SECTOR)
        tap = f"mdr{os.getpid() % 100000}"
        config = f"""
[card.mic0]
firmware = "{fw}"
cmdline = "micdrv_sim.heartbeat=0.5"
reset_timeout = 10
[[card.mic0.console]]
[[card.mic0.net]]
tap = "{tap}"
netns = "{ns}"
[[card.mic0.blk]]
path = "{img}"
serial = "restart-disk0"
"""
        sim = SimulatedCardProcess(base / "sim", "--ready-delay", "0.05", "--memory", "1G")
        d = None
        try:
            d = AttachedDaemon(base / "run", sim, "mic0", config)
            d.img, d.ns, d.base = img, ns, base
            yield d
            assert d.stop() == 0, d.log()
            assert "Traceback" not in d.log(), d.log()
            assert not d.started_path().exists()          # a clean stop reset the card: nothing to recover
            assert not mounts_at(str(d.run_dir / "mic0"))
        finally:
            if d is not None:
                d.kill()
                for _ in mounts_at(str(d.run_dir / "mic0")):    # a failed test's dead tree goes with it
                    os.system(f"umount -l {d.run_dir / 'mic0'}")
            sim.stop()


def _started_path(self) -> Path:
    return self.run_dir / f"{self.name}.started"


AttachedDaemon.started_path = _started_path


def devices(d) -> list[dict]:
    return json.loads(d.ok("devices", "--json", "mic0"))


def shell(d, line: str) -> str:
    r = d.card("kernel", action="shell", message=line)
    assert r["succeeded"], r
    return r["output"]


def serving(d) -> None:
    wait_for(lambda: all(x["state"] == "active" for x in devices(d)), "every device active")
    wait_for(lambda: "vda" in shell(d, "blk list") and "eth0" in (d.card_os() or {}).get("devices", {}),
             "the card's vda and eth0")


def udp_echo(ns: str, data: bytes, timeout: float = WAIT) -> bytes:
    with socket_in(ns) as s:
        s.settimeout(timeout)
        s.sendto(data, (CARD_IP, 7))
        return s.recvfrom(65536)[0]


def console_command(d, line: str, token: str) -> bytes:
    """Type ``line`` on the card's console pty; what came back up to the second ``token`` (echo, output)."""
    fd = os.open(d.run_dir / "mic0" / "console", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        os.write(fd, line.encode() + b"\r")
        seen, deadline = b"", time.monotonic() + WAIT
        while seen.count(token.encode()) < 2 and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                seen += os.read(fd, 65536)
        assert seen.count(token.encode()) >= 2, seen[-500:]
        return seen
    finally:
        os.close(fd)


def no_stale_state(d) -> None:
    """One live tree at the mount point, the control socket answering this daemon, a live console link."""
    tree = str(d.run_dir / "mic0")
    stack = mounts_at(tree)
    assert [m.fstype for m in stack] == [FSTYPE], stack
    assert (Path(tree) / "state").read_text().strip() == d.status()["state"]
    assert control_call(str(d.socket), "ping")["pid"] == d.proc.pid
    link = Path(tree) / "console"
    assert link.is_symlink() and os.path.exists(os.path.realpath(link)), os.readlink(link)
    assert "not served" not in d.log()


def kill(d) -> int:
    pid = d.proc.pid
    os.kill(pid, signal.SIGKILL)
    d.proc.wait(WAIT)
    return pid


def test_a_daemon_killed_with_the_card_ready_leaves_nothing_the_next_one_trips_over(card):
    d = card
    survived = False
    try:
        assert d.status()["state"] == "ready"
        kill(d)
        with pytest.raises(OSError):                     # the dead tree: Transport endpoint is not connected
            os.stat(d.run_dir / "mic0")
        assert d.socket.exists()                         # and a socket nobody answers on
        with pytest.raises(ConnectionRefusedError):
            control_call(str(d.socket), "ping")
        log_before = len(d.log())
        d.start()
        assert d.status()["state"] == "ready"
        no_stale_state(d)
        assert [x["name"] for x in devices(d)] == ["console", "net0", "blk0"]   # the console is served again
        assert "died with the card started" not in d.log()[log_before:]     # a ready card is not reset
        survived = True
    finally:
        hardening.fault(survived)
