"""The FUSE tree of a real daemon on the simulated card: /sys/class/mic/micN as files (issue 6; spec 3.4, 3.5, 7.3).

Everything here goes through the kernel: a real mount, shells writing with
``echo``, other processes (another uid, a real poll()) reading. The daemon's
control socket (micctl) is the second opinion on what the tree did.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from micdrv.fs.mount import FSTYPE, FUSECTL, MNT_DETACH, mounts_at, umount
from tests.as_user import NOBODY, as_user
from tests.daemon_harness import Daemon, wait_for

CONFIG = """
[defaults]
cmdline = "micdrv_sim.heartbeat=0.2"
heartbeat = { enable = true, timeout = 2.0 }
reset_timeout = 3
[global]
fuse_group = "nogroup"
"""
STRANGER_GID = 4242   # a group that is not fuse_group

ATTRS = {"family", "stepping", "state", "shutdown_status", "heartbeat_enable", "cmdline", "firmware", "ramdisk",
         "bootmode", "log_buf_addr", "log_buf_len", "post_code", "log"}
WRITABLE = {"state", "heartbeat_enable", "cmdline", "firmware", "ramdisk", "bootmode", "log_buf_addr", "log_buf_len"}


@pytest.fixture(scope="module")
def run_dir():
    d = Path(tempfile.mkdtemp(prefix="micdrv-fs"))
    os.chmod(d, 0o755)  # nobody must reach the tree
    yield d / "run"


def tree_of(d: Daemon) -> Path:
    return d.run_dir / d.name


def wait_tree(d: Daemon) -> Path:
    t = tree_of(d)
    wait_for(lambda: any(m.fstype == FSTYPE for m in mounts_at(str(t))), f"the FUSE tree at {t}")
    return t


@pytest.fixture(scope="module")
def mic0(run_dir):
    d = Daemon(run_dir, "mic0", CONFIG)
    wait_tree(d)
    yield d
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture
def tree(mic0) -> Path:
    ensure_ready(mic0)
    return tree_of(mic0)


def ensure_ready(d: Daemon) -> None:
    s = d.status()["state"]
    if s != "ready":
        if s != "resetting":
            d.ok("reset", d.name)
        d.ok("wait", "--state", "ready", "--timeout", "20", d.name)


def sh(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)


def write(path: Path, data: bytes) -> int:
    """One write(2) as ``echo`` does it; 0 or the errno."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    except OSError as e:
        return e.errno
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def info(d: Daemon) -> dict:
    return json.loads(d.ok("info", "--json", d.name))[0]


# --- reading ------------------------------------------------------------------------------------
def test_the_attributes_read_as_sysfs_prints_them(mic0, tree):
    assert set(os.listdir(tree)) == ATTRS | {"block"}
    i = info(mic0)
    expected = {"family": "x100\n", "stepping": "C0\n", "state": "ready\n", "shutdown_status": "nop\n",
                "heartbeat_enable": "1\n", "bootmode": "linux\n", "cmdline": "micdrv_sim.heartbeat=0.2\n",
                "firmware": i["firmware"] + "\n", "ramdisk": "\n", "log_buf_addr": "0\n", "log_buf_len": "0\n"}
    for name, text in expected.items():
        assert (tree / name).read_text() == text, name
    assert (tree / "post_code").read_text() == i["post_code"] + "\n"
    for name in ATTRS:
        st = os.stat(tree / name)
        assert (st.st_uid, st.st_gid) == (0, NOBODY)
        assert st.st_mode & 0o777 == (0o640 if name in WRITABLE else 0o440), name
        assert st.st_size == (0 if name == "log" else 4096)  # what sysfs (and debugfs) report
    assert os.stat(tree).st_mode & 0o777 == 0o750


def test_the_log_is_readable_while_the_card_runs_and_EINVAL_otherwise(mic0, tree):
    with pytest.raises(OSError) as e:
        (tree / "log").read_text()
    assert e.value.errno == errno.EINVAL
    mic0.ok("boot", "--wait", "--timeout", "20", "mic0")
    text = (tree / "log").read_text()
    assert "micdrv-sim-cardos" in text.splitlines()[0]
    assert mic0.ok("log", "mic0").splitlines()[0] == text.splitlines()[0]   # the same log as micctl's


# --- state (spec 7.3) -----------------------------------------------------------------------------
def test_echo_boot_reaches_online_and_echo_shutdown_brings_the_card_down(mic0, tree):
    r = sh(f"echo boot > {tree}/state")
    assert (r.returncode, r.stderr) == (0, "")
    mic0.ok("wait", "--state", "online", "--timeout", "20", "mic0")
    assert (tree / "state").read_text() == "online\n"
    r = sh(f"echo shutdown > {tree}/state")
    assert (r.returncode, r.stderr) == (0, "")
    # The card powers off; the mpssd policy resets it to ready (spec 6.5).
    mic0.ok("wait", "--state", "ready", "--timeout", "20", "mic0")
    assert "online -> shutting_down" in mic0.log() and (tree / "state").read_text() == "ready\n"


def test_anything_but_boot_reset_shutdown_is_EINVAL_and_so_is_an_invalid_transition(mic0, tree):
    r = sh(f"echo bogus > {tree}/state")
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert write(tree / "state", b"boot\n\n") == errno.EINVAL   # only one newline is stripped
    assert write(tree / "state", b"shutdown") == errno.EINVAL   # not online
    assert write(tree / "state", b"reset") == errno.EINVAL      # ready already
    assert (tree / "state").read_text() == "ready\n"
    assert write(tree / "state", b"boot") == 0                  # without a newline too
    mic0.ok("wait", "--state", "online", "--timeout", "20", "mic0")
    assert write(tree / "state", b"boot\n") == errno.EINVAL     # not ready
    assert write(tree / "state", b"reset\n") == 0
    mic0.ok("wait", "--state", "ready", "--timeout", "20", "mic0")


# --- the other attributes (spec 3.5) ---------------------------------------------------------------
def test_attribute_writes_are_validated_by_the_service(mic0, tree):
    try:
        assert write(tree / "heartbeat_enable", b"0\n") == 0
        assert (tree / "heartbeat_enable").read_text() == "0\n" and info(mic0)["heartbeat_enable"] == 0
        assert write(tree / "heartbeat_enable", b"2\n") == errno.EINVAL
        assert write(tree / "bootmode", b"flash\n") == 0 and (tree / "bootmode").read_text() == "flash\n"
        assert write(tree / "bootmode", b"linx\n") == errno.EINVAL and info(mic0)["bootmode"] == "flash"
        assert write(tree / "cmdline", b"console=hvc0 micdrv_sim.heartbeat=0.2\n") == 0
        assert info(mic0)["cmdline"] == "console=hvc0 micdrv_sim.heartbeat=0.2"   # the newline is gone
        assert write(tree / "cmdline", b"x" * 2001) == errno.EINVAL                # spec 3.1: 2000 bytes
        assert write(tree / "cmdline", b"a\0b") == errno.EINVAL
        assert write(tree / "log_buf_addr", b"0xffffffff81f6ee20\n") == 0
        assert (tree / "log_buf_addr").read_text() == "ffffffff81f6ee20\n"
        assert write(tree / "log_buf_len", b"zz\n") == errno.EINVAL
        assert write(tree / "ramdisk", b"mic/mic0.image\n") == 0 and info(mic0)["ramdisk"] == "mic/mic0.image"
    finally:
        for name, value in (("heartbeat_enable", "1"), ("bootmode", "linux"), ("cmdline", "micdrv_sim.heartbeat=0.2"),
                            ("log_buf_addr", "0"), ("ramdisk", "")):
            mic0.ok("set", "mic0", name, value)
    assert (tree / "cmdline").read_text() == "micdrv_sim.heartbeat=0.2\n"


def test_read_only_attributes_refuse_a_write_even_from_root(tree):
    for name in ATTRS - WRITABLE:
        assert write(tree / name, b"x\n") == errno.EACCES, name
    with pytest.raises(OSError):
        (tree / "newfile").write_text("x")
    assert "newfile" not in os.listdir(tree)


# --- who may (spec 3.5 modes; fuse_group) ----------------------------------------------------------
def attempt(fn):
    try:
        result = fn()
        return 0 if result is None else result
    except OSError as e:
        return errno.errorcode[e.errno]


def what_a_user_may(tree: Path) -> dict:
    def write_attr():
        with open(tree / "heartbeat_enable", "w") as f:
            f.write("0\n")
    return {"read": attempt(lambda: (tree / "state").read_text()), "list": attempt(lambda: len(os.listdir(tree))),
            "write": attempt(write_attr), "block": attempt(lambda: len(os.listdir(tree / "block")))}


def test_the_group_may_read_and_nobody_but_root_may_write(mic0, tree):
    member = as_user(NOBODY, NOBODY, lambda: what_a_user_may(tree))
    assert member == {"read": "ready\n", "list": len(ATTRS) + 1, "write": "EACCES", "block": 0}
    stranger = as_user(NOBODY, STRANGER_GID, lambda: what_a_user_may(tree))
    assert stranger == {"read": "EACCES", "list": "EACCES", "write": "EACCES", "block": "EACCES"}
    assert (tree / "heartbeat_enable").read_text() == "1\n" and (tree / "state").read_text() == "ready\n"


# --- poll (sysfs_notify semantics) -----------------------------------------------------------------
CHILD_POLL = """
import os, select, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
first = os.read(fd, 64)
p = select.poll()
p.register(fd, select.POLLPRI | select.POLLERR)
quiet = p.poll(200)                  # nothing changed since the read: no event
print("armed", first.decode().strip(), quiet, flush=True)
events = p.poll(60_000)
os.lseek(fd, 0, os.SEEK_SET)
print("woke", events[0][1] if events else 0, os.read(fd, 64).decode().strip(), flush=True)
"""


def test_poll_on_state_wakes_another_process_on_a_change(mic0, tree):
    child = subprocess.Popen([sys.executable, "-c", CHILD_POLL, str(tree / "state")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().split() == ["armed", "ready", "[]"]
        mic0.ok("boot", "mic0")
        word, revents, state = child.stdout.readline().split()
        assert word == "woke" and int(revents) == select.POLLPRI | select.POLLERR
        assert state in ("booting", "online")
        assert child.wait(30) == 0
    finally:
        child.kill()
    mic0.ok("wait", "--state", "online", "--timeout", "20", "mic0")


# --- life of the mount ------------------------------------------------------------------------------
def test_sigterm_unmounts_the_tree_and_removes_its_directory(run_dir):
    d = Daemon(run_dir, "mic7", CONFIG)
    t = wait_tree(d)
    assert (t / "state").read_text() == "ready\n"
    assert d.stop() == 0
    assert mounts_at(str(t)) == [] and not t.exists()
    assert "Traceback" not in d.log()


def test_sighup_stops_the_daemon_cleanly_instead_of_unmounting_behind_its_back(run_dir):
    d = Daemon(run_dir, "mic8", CONFIG)
    t = wait_tree(d)
    d.proc.send_signal(signal.SIGHUP)
    assert d.proc.wait(30) == 0, d.log()
    assert mounts_at(str(t)) == [] and "SIGHUP: stopping" in d.log()


def test_a_stale_mount_of_a_killed_daemon_is_recovered_by_the_next_start(run_dir):
    d = Daemon(run_dir, "mic6", CONFIG)
    t = wait_tree(d)
    d.kill()   # SIGKILL: no unmount
    with pytest.raises(OSError) as e:
        os.stat(t)
    assert e.value.errno == errno.ENOTCONN and mounts_at(str(t))[-1].fstype == FSTYPE
    try:
        d2 = Daemon(run_dir, "mic6", CONFIG)
        try:
            wait_for(lambda: not _stale(t) and (t / "state").exists(), "the new tree")
            assert (t / "state").read_text() == "ready\n" and len(mounts_at(str(t))) == 1
            assert "still mounted (ENOTCONN); unmounting it" in d2.log()
        finally:
            assert d2.stop() == 0
        assert mounts_at(str(t)) == []
    finally:
        while mounts_at(str(t)):   # a failure above must not leave a dead mount on the host
            umount(str(t), MNT_DETACH)


def _stale(t: Path) -> bool:
    try:
        os.stat(t)
        return False
    except OSError as e:
        return e.errno == errno.ENOTCONN


def fusectl_mounted() -> bool:
    return any(m.fstype == "fusectl" for m in mounts_at(FUSECTL))


@pytest.fixture
def fusectl():
    """/sys/fs/fuse/connections, mounted as systemd mounts it at boot (sys-fs-fuse-connections.mount)."""
    mounted_here = False
    if not fusectl_mounted():
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], check=True, timeout=30)
        mounted_here = True
    yield
    if mounted_here:
        subprocess.run(["umount", FUSECTL], check=True, timeout=30)


def stop_with_a_file_open(run_dir: Path, name: str) -> tuple[Daemon, int]:
    """Stop a daemon while this process holds ``state`` open; the errno a read of it gives afterwards."""
    d = Daemon(run_dir, name, CONFIG)
    t = wait_tree(d)
    fd = os.open(t / "state", os.O_RDONLY)
    try:
        assert d.stop() == 0
        assert mounts_at(str(t)) == [] and not t.exists()   # detached at once: the path is free
        assert "in use; detaching it" in d.log()
        with pytest.raises(OSError) as e:
            os.pread(fd, 64, 0)
        return d, e.value.errno
    finally:
        try:
            os.close(fd)  # the fd is closed; the flush to the gone server reports ENOTCONN
        except OSError as e:
            assert e.errno == errno.ENOTCONN


def test_stopping_with_a_file_open_detaches_the_tree_and_fusectl_ends_it(run_dir, fusectl):
    d, err = stop_with_a_file_open(run_dir, "mic9")
    assert err == errno.ENOTCONN
    assert "no fusectl" not in d.log() and "still running" not in d.log(), d.log()


@pytest.mark.skipif(fusectl_mounted(), reason="fusectl is mounted on this host (the other test covers it)")
def test_stopping_with_a_file_open_and_no_fusectl_ends_it_with_the_daemon(run_dir):
    d, err = stop_with_a_file_open(run_dir, "mic12")
    assert err == errno.ENOTCONN
    assert "no fusectl" in d.log() and "still running" not in d.log(), d.log()


def test_without_a_tree_the_daemon_runs_on(run_dir):
    (run_dir / "mic10").write_text("not a directory")   # the mount point cannot be made
    d = Daemon(run_dir, "mic10", CONFIG)
    try:
        wait_for(lambda: "no FUSE tree, the daemon goes on without it" in d.log(), "the logged failure")
        assert "exists and is not a directory" in d.log()
        d.ok("boot", "--wait", "--timeout", "20", "mic10")
    finally:
        assert d.stop() == 0
    d = Daemon(run_dir, "mic11", CONFIG + "fuse = false\n")
    try:
        wait_for(lambda: "the FUSE tree is off" in d.log(), "the tree to be off")
        assert not (run_dir / "mic11").exists()
    finally:
        assert d.stop() == 0
