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
import random
import select
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from micdrv.fs.mount import FSTYPE, MNT_DETACH, mounts_at, umount
from micdrv.sim.cardos.image import write_files
from micdrv.sim.process import SimulatedCardProcess
from tests import hardening
from tests.blk_stream import SECTOR, Writer, check_image
from tests.daemon_harness import WAIT, AttachedDaemon, control_call, wait_for
from tests.netns_harness import namespace, socket_in

pytestmark = pytest.mark.root

HOST_IP, CARD_IP = "172.31.1.254", "172.31.1.1"
AREA = 16384                  # sectors per kill round (8 MiB)


def card_files(prefix: str, sectors: int) -> tuple[Path, Path, Path]:
    """A directory others may enter, the card OS image in it and a sparse disk image of ``sectors``."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    fw = base / "firmware" / "uos.img"
    fw.parent.mkdir()
    write_files(fw)
    img = base / "disk0.img"
    with open(img, "wb") as f:
        f.truncate(sectors * SECTOR)
    return base, fw, img


@pytest.fixture(scope="module")
def card():
    with namespace("mdr") as ns:
        base, fw, img = card_files("micdrv-restart", 4 * AREA)
        tap = f"mdr{os.getpid() % 100000}"
        config = f"""
[card.mic0]
firmware = "{fw}"
cmdline = "micdrv_sim.heartbeat=0.5"
reset_timeout = 3
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
                    umount(str(d.run_dir / "mic0"), MNT_DETACH)
            sim.stop()
            img.unlink(missing_ok=True)           # the logs stay


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


def console_command(d, line: str, token: str, timeout: float = WAIT) -> bytes:
    """Type ``line`` on the card's console pty; what came back up to the second ``token`` (echo, output)."""
    fd = os.open(d.run_dir / "mic0" / "console", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        os.write(fd, line.encode() + b"\r")
        seen, deadline = b"", time.monotonic() + timeout
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
    assert "dropped a message" not in d.log()     # nothing the old card OS wrote reached the new SCIF queues


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


def traffic(d, stop: threading.Event, counts: dict) -> list[threading.Thread]:
    """UDP echo from the namespace and shell commands on the console, until ``stop``; errors tolerated
    (the daemon is killed under them)."""
    def udp() -> None:
        n = 0
        while not stop.is_set():
            try:
                data = os.urandom(1 + n % 1400)
                if udp_echo(d.ns, data, timeout=0.5) == data:
                    counts["udp"] += 1
            except OSError:
                counts["udp_lost"] += 1
                time.sleep(0.1)
            n += 1

    def console() -> None:
        while not stop.is_set():
            try:
                console_command(d, f"echo tick{counts['console']}", f"tick{counts['console']}", timeout=2)
                counts["console"] += 1
            except (OSError, AssertionError):
                counts["console_lost"] += 1
                time.sleep(0.2)
    ts = [threading.Thread(target=udp, name="udp", daemon=True),
          threading.Thread(target=console, name="console", daemon=True)]
    for t in ts:
        t.start()
    return ts


@pytest.mark.parametrize("boot", [False, True], ids=["reset-to-ready", "boot-again"])
def test_sigkill_in_the_middle_of_traffic_then_a_restart_resets_the_card_and_serves_it_again(card, boot):
    d = card
    round_ = 1 + boot
    survived = False
    stop = threading.Event()
    w = None
    try:
        if d.status()["state"] != "online":
            d.ok("boot", "--wait", "mic0")
        serving(d)
        assert d.started_path().read_text().strip() == str(d.proc.pid)
        rng = random.Random(7100 + round_)
        counts = dict.fromkeys(("udp", "udp_lost", "console", "console_lost"), 0)
        ts = traffic(d, stop, counts)
        # Network and console first: the writer's area is finite, and a console slow to answer its
        # first command must not let the writer fill it before the kill (it once did, on CI).
        wait_for(lambda: counts["udp"] >= 3 and counts["console"] >= 1, "network and console traffic")
        w = Writer(d.sim_control, round_, rng, area=AREA, hold=2).start()
        wait_for(lambda: w.held.is_set() or w.error or w.full, "block traffic")
        assert w.error is None and not w.full, (w.error, w.full)
        w.sent.clear()
        w.go()
        assert w.sent.wait(WAIT), (w.error, w.full, len(w.done))
        time.sleep(rng.uniform(0, 0.003))
        old = kill(d)                                        # in the middle of it all
        assert d.started_path().read_text().strip() == str(old)
        time.sleep(0.5)                                      # the card, alone, carries on (or waits)
        d.start(*(("--boot",) if boot else ()))
        assert f"a daemon (pid {old}) died with the card started; resetting the card" in d.log()
        if boot:
            wait_for(lambda: d.status()["state"] == "online", "the card online again (--boot)")
        else:
            wait_for(lambda: d.status()["state"] == "ready", "the card reset to ready")
            assert not d.started_path().exists()
            d.ok("boot", "--wait", "mic0")
        w.thread.join(WAIT)                                  # the reset ended the card's wait for its write
        assert not w.thread.is_alive() and w.error is not None
        stop.set()
        for t in ts:
            t.join(WAIT)
        serving(d)
        no_stale_state(d)
        assert d.started_path().read_text().strip() == str(d.proc.pid)
        rec = d.card_os()
        assert rec["state"] == "online" and not rec["errors"], rec["errors"]
        good = check_image(d.img, w)
        assert good >= w.written_bytes(w.flushed) and w.flushed >= 2 * 4
        sector, count, word = w.done[w.flushed - 1]
        assert f"verified {count} sectors at {sector} of vda: OK" in shell(d, f"blk verify vda {sector} {word} {count}")
        assert udp_echo(d.ns, b"after the restart") == b"after the restart"
        console_command(d, f"echo restarted{round_}", f"restarted{round_}")
        survived = True
    finally:
        stop.set()                      # a failed round's traffic must not run into the next test
        if w is not None:
            w.stop.set()
        hardening.fault(survived)
    print(f"kill {round_}: {len(w.done)} writes ({w.flushed} flushed), {good} bytes verified; traffic {counts}; "
          f"the card's write in flight ended with {w.error!r}")


def test_a_card_that_does_not_come_back_from_the_reset_after_a_kill_is_reset_failed(card):
    d = card
    survived = False
    try:
        if d.status()["state"] != "online":
            d.ok("boot", "--wait", "mic0")
        serving(d)
        old = kill(d)
        d.card("fail_next_reset")                  # the reset the next daemon does never becomes ready
        d.start("--boot")
        assert f"a daemon (pid {old}) died with the card started; resetting the card" in d.log()
        wait_for(lambda: d.status()["state"] == "reset_failed", "reset_failed")
        wait_for(lambda: "boot on start: " in d.log(), "the boot on start to give up")
        assert d.started_path().exists()           # the card is still not known to be stopped
        no_stale_state(d)
        d.ok("reset", "--wait", "mic0")            # the operator's way out
        assert d.status()["state"] == "ready" and not d.started_path().exists()
        d.ok("boot", "--wait", "mic0")
        serving(d)
        assert udp_echo(d.ns, b"after reset_failed") == b"after reset_failed"
        survived = True
    finally:
        hardening.fault(survived)


def test_a_killed_simulate_daemon_takes_its_card_along_and_the_next_one_starts_clean(tmp_path):
    """``micdrv --simulate``: the simulated card is the daemon's own hardware and dies with it
    (PR_SET_PDEATHSIG); the next daemon starts a fresh card over the stale sockets and tree."""
    from tests.daemon_harness import Daemon
    base = Path(tempfile.mkdtemp(prefix="micdrv-restart-sim"))
    os.chmod(base, 0o755)
    config = "[card.mic0]\ncmdline = \"micdrv_sim.heartbeat=0.5\"\nreset_timeout = 5\n[[card.mic0.console]]\n"
    d = Daemon(base / "run", "mic0", config)
    survived = False
    try:
        d.ok("boot", "--wait", "mic0")
        sim_pid = d.card("ping")["pid"]
        kill(d)
        wait_for(lambda: not os.path.exists(f"/proc/{sim_pid}") or
                 Path(f"/proc/{sim_pid}/stat").read_text().split()[2] == "Z", "the card to die with its daemon")
        d2 = Daemon(base / "run", "mic0", config)
        try:
            assert "died with the card started" in d2.log()   # a fresh card: the reset costs nothing
            wait_for(lambda: d2.status()["state"] == "ready", "the fresh card ready")
            d2.ok("boot", "--wait", "mic0")
            wait_for(lambda: all(x["state"] == "active" for x in devices(d2)), "the console active")
            no_stale_state(d2)
            assert d2.card("ping")["pid"] != sim_pid
        finally:
            assert d2.stop() == 0, d2.log()
        assert not d2.started_path().exists() and not mounts_at(str(d2.run_dir / "mic0"))
        survived = True
    finally:
        d.kill()
        for _ in mounts_at(str(d.run_dir / "mic0")):
            umount(str(d.run_dir / "mic0"), MNT_DETACH)
        hardening.fault(survived)


def test_a_card_that_vanishes_under_an_online_daemon_leaves_it_running_and_sigterm_still_stops_it():
    """The card's process SIGKILLed while it is online with a disk and a console -- what a card that falls
    off the bus looks like to the driver: every register access and DMA map fails. The daemon keeps
    answering, and SIGTERM still tears it down (socket, tree) without waiting for a card that will not
    answer. It once hung: SCIF's node removal raised on the dead link before it dropped the peer, so
    COSM's work thread waited forever on an endpoint nobody would close."""
    base, fw, img = card_files("micdrv-vanish", AREA)
    config = (f'[card.mic0]\nfirmware = "{fw}"\ncmdline = "micdrv_sim.heartbeat=0.5"\nreset_timeout = 3\n'
              f'heartbeat = {{ enable = true, timeout = 2.0 }}\n'
              f'[[card.mic0.console]]\n[[card.mic0.blk]]\npath = "{img}"\nserial = "vanish-disk0"\n')
    sim = SimulatedCardProcess(base / "sim", "--ready-delay", "0.05", "--memory", "1G")
    d = None
    try:
        d = AttachedDaemon(base / "run", sim, "mic0", config)
        d.ok("boot", "--wait", "mic0")
        wait_for(lambda: all(x["state"] == "active" for x in devices(d)), "every device active")
        assert "vda" in shell(d, "blk list")
        sim.proc.kill()
        sim.proc.wait(WAIT)
        # the watchdog misses the heartbeats and declares the card crashed (left for the operator) ...
        wait_for(lambda: d.status()["shutdown_status"] == "crashed", "the watchdog to declare the card crashed")
        # ... whose reset cannot reach it
        r = d.micctl("reset", "--wait", "--timeout", "20", "mic0")
        assert r.returncode == 1 and "mic0: reset_failed" in r.stdout, r
        assert d.proc.poll() is None
        assert d.stop() == 0, d.log()
        assert not d.socket.exists() and not mounts_at(str(d.run_dir / "mic0"))
        assert "Traceback" not in d.log(), d.log()
    finally:
        if d is not None:
            d.kill()
            for _ in mounts_at(str(d.run_dir / "mic0")):
                umount(str(d.run_dir / "mic0"), MNT_DETACH)
        sim.stop()
