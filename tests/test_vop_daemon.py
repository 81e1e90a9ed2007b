"""The operator's view of VOP: a ``micdrv --simulate`` daemon serving the configured devices, driven by micctl.

The daemon's simulated card runs the test drivers of
:mod:`tests.vop_card_drivers` (``$MICDRV_SIM_IMPORT``): an echoing console
and a block prober, so what the card reads and writes is chosen by the test
through the simulator's control socket. Checked here: the configured
devices are added when the card boots (console, then block) and removed
when it stops; blk hot add / list / remove with micctl while the card is
online; ``micctl console`` driven through a pty, its escape sequence and
the terminal restored; a hostile card breaks one device while the daemon
goes on serving the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

import pytest

from tests.daemon_harness import REPO, WAIT, Daemon, _env, wait_for
from tests.vop_card_drivers import pattern


@contextlib.contextmanager
def scripted_card_drivers(placement: Path | None):
    """Daemons started inside get a simulator with the scripted card drivers (tests.vop_card_drivers),
    their buffer placement from ``placement`` (None: the defaults); the environment is restored after."""
    keys = ("MICDRV_SIM_IMPORT", "VOPTEST_CONFIG")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ["MICDRV_SIM_IMPORT"] = "tests.vop_card_drivers"
    if placement is None:
        os.environ.pop("VOPTEST_CONFIG", None)
    else:
        os.environ["VOPTEST_CONFIG"] = str(placement)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = Path(tempfile.mkdtemp(prefix="micdrv-vop"))
    os.chmod(base, 0o755)
    img = base / "disk0.img"
    img.write_bytes(bytes(2 << 20))
    cfg = base / "voptest.json"
    cfg.write_text(json.dumps({"rx": [16, 4096, 0], "tx_offset": 0, "ring": "offered"}))
    config = f"""
[card.mic0]
cmdline = "micdrv_sim.heartbeat=0.5"
reset_timeout = 5
[[card.mic0.blk]]
path = "{img}"
serial = "daemon-disk0"
[[card.mic0.console]]
"""
    with scripted_card_drivers(cfg):
        d = Daemon(base / "run", "mic0", config)
    d.base, d.img = base, img
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture
def online(setup):
    d = setup
    if d.status()["state"] != "online":
        if d.status()["state"] != "ready":
            d.ok("reset", "--wait", "mic0")
        d.ok("boot", "--wait", "mic0")
    wait_for(lambda: all(x["state"] == "active" for x in devices(d)), "every device active")
    return d


def devices(d: Daemon) -> list[dict]:
    return json.loads(d.ok("devices", "--json", "mic0"))


def card_vop(d: Daemon) -> dict:
    return d.card_os()["devices"]["vop"]


def card_blk(d: Daemon, serial: str) -> int:
    """The card's index of the block device whose ID is ``serial``."""
    for dev in card_vop(d)["devices"]:
        if dev["type"] == 2 and dev["state"] == "probed":
            if d.card("vop", switch="driver", device=dev["index"], op="get_id")["id"] == serial:
                return dev["index"]
    raise AssertionError(f"no card block device {serial!r}: {card_vop(d)}")


def test_the_configured_devices_are_added_in_spec_order_when_the_card_boots(online):
    d = online
    names = [x["name"] for x in devices(d)]
    assert names == ["console", "blk0"]      # spec 6.1: console, net, then block
    card = card_vop(d)["devices"]
    assert [x["type"] for x in card] == [3, 2] and all(x["state"] == "probed" for x in card)
    assert os.path.islink(d.run_dir / "mic0" / "console")


def test_the_card_writes_and_the_image_file_has_it(online):
    d = online
    i = card_blk(d, "daemon-disk0")
    w = d.card("vop", switch="driver", device=i, op="write", sector=16, length=64 << 10, seed=21, offset=9)
    assert w["status"] == 0
    with open(d.img, "rb") as f:
        f.seek(16 * 512)
        assert f.read(64 << 10) == pattern(21, 64 << 10)


def test_blk_hot_add_list_and_remove_while_online(online, tmp_path):
    d = online
    img = tmp_path / "hot.img"
    img.write_bytes(bytes(1 << 20))
    out = d.ok("blk", "add", "mic0", str(img), "--serial", "hot-disk")
    assert "blk1" in out
    i = wait_for(lambda: _try(lambda: card_blk(d, "hot-disk")), "the card to see the new disk")
    assert d.card("vop", switch="driver", device=i, op="write", sector=0, length=4096, seed=4)["status"] == 0
    assert img.read_bytes()[:4096] == pattern(4, 4096)
    rows = json.loads(d.ok("blk", "list", "mic0", "--json"))
    assert [(r["name"], r["serial"], r["state"]) for r in rows] == [("blk0", "daemon-disk0", "active"),
                                                                  ("blk1", "hot-disk", "active")]
    assert "hot-disk" in d.ok("blk", "list", "mic0")
    d.ok("blk", "remove", "mic0", "blk1")
    assert [r["name"] for r in json.loads(d.ok("blk", "list", "mic0", "--json"))] == ["blk0"]
    assert card_vop(d)["removed"][-1]["why"] == "removed by the host"
    import fcntl
    with open(img, "rb") as f:            # the daemon let go of the image: its lock is free
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    r = d.micctl("blk", "remove", "mic0", "blk7")
    assert r.returncode == 1 and "no block device" in r.stderr


def _try(fn):
    try:
        return fn()
    except AssertionError:
        return None


def test_micctl_console_through_a_pty_echoes_and_detaches_with_ctrl_bracket_q(online):
    d = online
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen([sys.executable, "-m", "micdrv.cli", "--run-dir", str(d.run_dir), "console", "mic0"],
                         stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=_env(), start_new_session=True)
    try:
        got = _read_until(master, b"Escape: Ctrl-] then q.")
        assert b"Connected to mic0 console" in got
        os.write(master, b"hello card\x1d\x1d!")       # Ctrl-] twice: one literal Ctrl-] reaches the card
        assert b"hello card\x1d!" in _read_until(master, b"card\x1d!")
        os.write(master, b"\x1dq")
        assert p.wait(WAIT) == 0
        assert b"detached" in _read_until(master, b"detached")
        assert termios.tcgetattr(slave) == before     # the terminal is as micctl found it
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
        os.close(slave)


def _read_until(fd: int, marker: bytes, timeout: float = WAIT) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return out


def test_a_hostile_card_breaks_one_device_and_the_daemon_serves_the_rest(online):
    d = online
    d.card("vop", switch="bad_desc", device="console", queue=1, kind="addr")
    wait_for(lambda: next(x for x in devices(d) if x["name"] == "console")["state"] == "broken", "console broken")
    line = next(x for x in d.ok("devices", "mic0").splitlines() if "console" in x)
    assert "broken" in line and "outside the driver memory" in line
    i = card_blk(d, "daemon-disk0")
    w = d.card("vop", switch="driver", device=i, op="write", sector=40, length=8192, seed=5)
    assert w["status"] == 0
    assert d.status()["state"] == "online"
    d.ok("reboot", "--wait", "mic0")            # a fresh boot: every device is served again
    wait_for(lambda: all(x["state"] == "active" for x in devices(d)), "every device active after the reboot")


def test_stopping_the_card_removes_its_devices_and_keeps_their_resources(online):
    d = online
    link = d.run_dir / "mic0" / "console"
    pty = os.path.realpath(link)
    d.ok("shutdown", "--wait", "mic0")
    assert all(x["state"] == "detached" for x in devices(d))
    assert os.path.realpath(link) == pty                # the same pty across boots
    d.ok("boot", "--wait", "mic0")
    wait_for(lambda: all(x["state"] == "active" for x in devices(d)), "every device active again")


def test_vop_copy_h2c_direct_in_the_configuration_reaches_the_copy_engine(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="micdrv-vopd"))
    os.chmod(base, 0o755)
    img = base / "disk0.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    with scripted_card_drivers(None):
        d = Daemon(base / "run", "mic0", f"""
[card.mic0]
cmdline = "micdrv_sim.heartbeat=0.5"
reset_timeout = 5
vop_copy = "h2c-direct"
[[card.mic0.blk]]
path = "{img}"
serial = "direct-disk"
""")
    try:
        d.ok("boot", "--wait", "mic0")
        wait_for(lambda: all(x["state"] == "active" for x in devices(d)), "the disk active")
        i = card_blk(d, "direct-disk")
        r = d.card("vop", switch="driver", device=i, op="read", sector=8, length=256 << 10, offset=5, segments=3)
        assert r["status"] == 0 and r["sha256"] == hashlib.sha256(data[4096:4096 + (256 << 10)]).hexdigest()
        copy = devices(d)[0]["vop"]["copy"]
        assert copy["h2c_direct_bytes"] >= 256 << 10 and copy["h2c_dma_bytes"] == 0
    finally:
        rc = d.stop()
        assert rc == 0, d.log()
