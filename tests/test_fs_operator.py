"""Issue 6's operator path: install, start as systemd would, drive the card through its FUSE tree, stop.

The daemon is the installed unit's ExecStart= (with ``--simulate`` for the
card's PCI address), its configuration the installed default file with a
disk added, its
systemd a datagram socket this test binds as $NOTIFY_SOCKET. Everything the
operator does after that goes through /run/micdrv/mic0-style files: a shell's
``echo``, ``cat``, and a poll() that waits for the state to change.
"""

from __future__ import annotations

import hashlib
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from micdrv import install
from micdrv.fs.mount import FSTYPE, MNT_DETACH, mounts_at, umount
from micdrv.sim.cardos.shell_commands import pattern_bytes
from tests.daemon_harness import REPO, WAIT, control_call, wait_for
from tests.test_sdnotify import Manager


def wait_state(state_file: Path, wanted: str, timeout: float = WAIT) -> str:
    """Block in poll() on ``state`` (sysfs_notify semantics) until it reads ``wanted``."""
    fd = os.open(state_file, os.O_RDONLY)
    try:
        p = select.poll()
        p.register(fd, select.POLLPRI | select.POLLERR)
        deadline = time.monotonic() + timeout
        while True:
            state = os.pread(fd, 64, 0).decode().strip()   # a read re-arms the poll
            if state == wanted:
                return state
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{state_file}: still {state}, not {wanted}, after {timeout} s")
            p.poll(left * 1000)
    finally:
        os.close(fd)


def bash(command: str) -> None:
    r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, ""), (command, r.stderr)


@pytest.fixture
def destdir():
    d = Path(tempfile.mkdtemp(prefix="micdrv-destdir"))
    r = subprocess.run([sys.executable, "-m", "micdrv.install", "--destdir", str(d),
                        "--micdrv", install.find_micdrv()], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    return d


def card_shell(run_dir: Path, line: str) -> str:
    """One line typed into the simulated card OS's shell (through the simulator's control socket)."""
    reply = control_call(str(run_dir / "mic0.sim" / "control.sock"), "kernel", action="shell", message=line)
    assert reply["ok"] and reply["succeeded"], reply
    return reply["output"]


def check_the_card_disk(run_dir: Path, tree: Path) -> None:
    """What the card's own virtio-blk driver writes is what block/<disk> reads, and the other way round."""
    image = tree / "block" / "blk0"
    wait_for(image.exists, "the card's disk in the tree")
    assert image.stat().st_size == 4 << 20
    wait_for(lambda: "op-disk" in card_shell(run_dir, "blk list"), "the card to probe its disk (serial op-disk)")
    card_shell(run_dir, "blk write vda 16 operator 128")
    with open(image, "rb") as f:
        f.seek(16 * 512)
        assert f.read(128 * 512) == pattern_bytes("operator", 16, 128)
    mine = os.urandom(4096)
    with open(image, "r+b") as f:
        f.seek(1024 * 512)
        f.write(mine)
    assert card_shell(run_dir, "blk read vda 1024 8").split()[0] == hashlib.sha256(mine).hexdigest()


def test_install_start_as_systemd_boot_and_shut_down_through_the_tree(destdir):
    unit_text = (destdir / "etc/systemd/system/micdrv@.service").read_text()
    exec_start = shlex.split(re.search(r"^ExecStart=(.*)$", unit_text, re.M).group(1))
    assert exec_start[1:] == ["--device", "%I"]
    run_dir = destdir / "run/micdrv"
    argv = [exec_start[0], "--simulate", "--config", str(destdir / "etc/micdrv/micdrv.toml"),
            "--run-dir", str(run_dir)]
    # The operator gives the card a disk in the installed configuration.
    disk = destdir / "var/lib/micdrv/mic0.img"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(bytes(4 << 20))
    with open(destdir / "etc/micdrv/micdrv.toml", "a") as f:
        f.write(f'\n[[card.mic0.blk]]\npath = "{disk}"\nserial = "op-disk"\n')
    name = f"micdrv-op-{uuid.uuid4().hex}"
    manager = Manager(b"\0" + name.encode())
    log_path = destdir / "micdrv.log"
    env = dict(os.environ, NOTIFY_SOCKET="@" + name, PYTHONPATH=str(REPO))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/")
    tree = run_dir / "mic0"
    try:
        msg, pid = manager.receive()
        assert (msg.get("READY"), msg.get("STATUS"), pid) == ("1", "mic0: ready", proc.pid), msg
        # READY comes after the tree is mounted: systemd's After= units can use it at once.
        assert [m.fstype for m in mounts_at(str(tree))] == [FSTYPE]
        assert (tree / "family").read_text() == "x100\n" and (tree / "state").read_text() == "ready\n"

        bash(f"echo boot > {tree}/state")
        assert wait_state(tree / "state", "online") == "online"
        statuses = []
        while "mic0: online" not in statuses:
            statuses.append(manager.receive()[0].get("STATUS"))
        assert "mic0: booting" in statuses
        assert "micdrv-sim-cardos" in (tree / "log").read_text()
        check_the_card_disk(run_dir, tree)

        bash(f"echo shutdown > {tree}/state")
        wait_state(tree / "state", "ready")                 # powered off, then reset by the daemon (spec 6.5)
        # ... and the status goes back to nop just after ready, as cosm_stop orders it.
        wait_for(lambda: (tree / "shutdown_status").read_text() == "nop\n", "shutdown_status nop")

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0, log_path.read_text()
        while manager.receive()[0].get("STOPPING") != "1":
            pass
        assert mounts_at(str(tree)) == [] and not tree.exists()
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        manager.close()
        while mounts_at(str(tree)):   # a killed daemon's dead mount must not outlive the test
            umount(str(tree), MNT_DETACH)
    wait_for(lambda: not (run_dir / "mic0.sock").exists(), "the control socket to go")
