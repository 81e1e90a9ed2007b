"""The operator's path: ``micdrv --simulate`` daemons driven with ``micctl`` (issue 4, spec 3, 6.5, 6.6, 7).

Two daemons share one run directory, as two cards on one host do: mic0 with
the mpssd policy on (reset after a shutdown), mic1 with ``auto_reset =
false`` so a test can see the card's shutdown status before anyone resets
it. Both cards heartbeat every 0.2 s and the host's watchdog fires after 2 s
of silence. Every wait is bounded; no test checks how fast anything is.
"""

from __future__ import annotations

import gc  # noqa: F401
import grp
import json
import os
import pwd
import stat
import tempfile
import time
from pathlib import Path

import pytest

from micdrv.jsonlines import JsonLinesClient
from tests.as_user import as_user
from tests.daemon_harness import Daemon, micctl, wait_for

HEARTBEAT = 0.2
WATCHDOG = 2.0
CONFIG = f"""
[defaults]
cmdline = "micdrv_sim.heartbeat={HEARTBEAT}"
heartbeat = {{ enable = true, timeout = {WATCHDOG} }}
reset_timeout = 3
"""


@pytest.fixture(scope="module")
def run_dir():
    d = Path(tempfile.mkdtemp(prefix="micdrv-run"))
    os.chmod(d.parent / d.name, 0o755)
    yield d / "run"


@pytest.fixture(scope="module")
def mic0(run_dir):
    d = Daemon(run_dir, "mic0", CONFIG + '\n[global]\nsocket_group = "nogroup"\n')
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


@pytest.fixture(scope="module")
def mic1(run_dir, mic0):
    d = Daemon(run_dir, "mic1", CONFIG + "\n[card.mic1]\nauto_reset = false\n")
    yield d
    assert d.stop() == 0, d.log()


def ensure_ready(d: Daemon) -> None:
    s = d.status()
    if s["state"] != "ready":
        if s["state"] != "resetting":
            d.ok("reset", d.name)
        d.ok("wait", "--state", "ready", "--timeout", "20", d.name)
    assert d.status()["state"] == "ready"


def boot_online(d: Daemon) -> None:
    ensure_ready(d)
    out = d.ok("boot", "--wait", "--timeout", "20", d.name)
    assert f"{d.name}: online" in out, out


# --- state machine (spec 7.3) -----------------------------------------------------------------
def test_a_new_card_is_ready_and_says_what_it_is(mic0):
    ensure_ready(mic0)
    info = json.loads(mic0.ok("info", "--json", "mic0"))[0]
    assert (info["family"], info["stepping"], info["node_id"], info["shutdown_status"]) == ("x100", "C0", 1, "nop")
    assert mic0.ok("-s", "mic0").strip() == "mic0: ready"


def test_boot_reaches_online_and_the_card_gets_the_host_time(mic0):
    boot_online(mic0)
    s = mic0.status()
    assert (s["state"], s["connected"]) == ("online", True)
    rec = mic0.card_os()
    assert rec["state"] == "online"  # the card OS's own view: its COSM client is connected
    assert rec["clock"]["synced_to"] is not None  # SYNC_TIME arrived (spec 7.2)
    assert abs(rec["clock"]["offset"]) < 5.0
    assert " mem=" in rec["cmdline"] and f"micdrv_sim.heartbeat={HEARTBEAT}" in rec["cmdline"]
    wait_for(lambda: mic0.status()["heartbeats"] >= 3, "heartbeats from the card")


def test_the_card_log_is_read_through_bar0(mic0):
    boot_online(mic0)
    log = mic0.ok("log", "mic0")
    assert "cosm_client: connected" in log and "Command line:" in log


def test_shutdown_reports_poweroff_and_auto_reset_brings_the_card_to_ready(mic0, mic1):
    boot_online(mic1)
    mic1.ok("shutdown", "mic1")
    wait_for(lambda: mic1.status()["shutdown_status"] == "poweroff", "mic1's shutdown status")
    assert mic1.status()["state"] == "shutting_down"  # auto_reset = false: it waits for the operator
    mic1.ok("reset", "--wait", "mic1")
    s = mic1.status()
    assert (s["state"], s["shutdown_status"]) == ("ready", "nop")
    boot_online(mic1)
    mic1.card("kernel", action="halt")  # the card halts on its own (its shell's "halt")
    wait_for(lambda: mic1.status()["shutdown_status"] == "halted", "mic1's shutdown status")
    mic1.ok("reset", "--wait", "mic1")

    boot_online(mic0)
    out = mic0.ok("-S", "mic0")
    assert "mic0: shutting_down" in out
    mic0.ok("wait", "--state", "ready", "--timeout", "20", "mic0")
    assert mic0.card("status")["status"]["state"] == "ready"


def test_reboot_boots_the_card_again(mic0):
    boot_online(mic0)
    starts = mic0.card("status")["status"]["os_starts"]
    mic0.ok("-R", "mic0")
    wait_for(lambda: mic0.card("status")["status"]["os_starts"] > starts and mic0.status()["state"] == "online",
             "the card to boot again")


def test_a_restart_from_the_card_boots_it_again(mic0):
    boot_online(mic0)
    starts = mic0.card("status")["status"]["os_starts"]
    mic0.card("kernel", action="reboot")
    wait_for(lambda: mic0.card("status")["status"]["os_starts"] > starts and mic0.status()["state"] == "online",
             "the card to come back after its restart")


def test_a_hung_card_is_declared_crashed_by_the_watchdog_and_can_be_booted_again(mic0):
    boot_online(mic0)
    mic0.card("kernel", action="hang")
    wait_for(lambda: mic0.status()["shutdown_status"] == "crashed", "the watchdog", WATCHDOG + 20)
    assert mic0.status()["state"] == "shutting_down"  # crashed cards wait for the operator
    assert "cosm_client" in mic0.ok("log", "mic0")    # ... who can still read the log
    mic0.ok("reset", "--wait", "mic0")
    boot_online(mic0)


def test_a_panicked_card_goes_silent_and_is_declared_crashed(mic0):
    boot_online(mic0)
    mic0.card("kernel", action="panic", message="test panic")
    wait_for(lambda: mic0.status()["shutdown_status"] == "crashed", "the watchdog", WATCHDOG + 20)
    assert "Kernel panic - not syncing: test panic" in mic0.ok("log", "mic0")
    mic0.ok("reset", "--wait", "mic0")
    assert mic0.status()["state"] == "ready"


def test_with_the_heartbeat_disabled_a_silent_card_stays_online(mic0):
    boot_online(mic0)
    mic0.ok("set", "mic0", "heartbeat_enable", "0")
    try:
        mic0.card("kernel", action="hang")
        time.sleep(WATCHDOG * 2)
        assert mic0.status()["state"] == "online"
    finally:
        mic0.ok("set", "mic0", "heartbeat_enable", "1")
    # Enabling it takes effect at once while online (spec 3.5): the silent card is found out.
    wait_for(lambda: mic0.status()["shutdown_status"] == "crashed", "the watchdog", WATCHDOG + 20)
    mic0.ok("reset", "--wait", "mic0")


def test_a_card_that_never_becomes_ready_ends_in_reset_failed(mic1):
    boot_online(mic1)
    mic1.card("fail_next_reset")
    r = mic1.micctl("reset", "--wait", "--timeout", "30", "mic1")
    assert r.returncode == 1, r                 # the reset asked for did not happen: a failure, not success
    assert "mic1: reset_failed" in r.stdout
    assert r.stderr.strip() == "micctl: mic1: reset ended in reset_failed, not ready", r.stderr
    mic1.ok("reset", "--wait", "mic1")  # the next reset works again
    assert mic1.status()["state"] == "ready"


# --- micctl's errors --------------------------------------------------------------------------
def test_an_invalid_transition_is_a_clear_error(mic0):
    ensure_ready(mic0)
    r = mic0.micctl("shutdown", "mic0")
    assert r.returncode == 1 and "cannot shut down in state ready" in r.stderr and "Traceback" not in r.stderr
    r = mic0.micctl("reset", "mic0")
    assert r.returncode == 1 and "ready already" in r.stderr


def test_a_boot_that_fails_leaves_the_card_ready(mic0):
    ensure_ready(mic0)
    r = mic0.micctl("boot", "--firmware", "/nonexistent/uos.img", "mic0")
    assert r.returncode == 1 and "boot failed" in r.stderr and "/nonexistent/uos.img" in r.stderr
    assert mic0.status()["state"] == "ready"
    info = json.loads(mic0.ok("info", "--json", "mic0"))[0]
    mic0.ok("set", "mic0", "firmware", str(Path(mic0.sim_control).parent / "firmware" / "uos.img"))
    assert info["firmware"] == "/nonexistent/uos.img"
    boot_online(mic0)
    r = mic0.micctl("boot", "mic0")
    assert r.returncode == 1 and "cannot boot in state online" in r.stderr


def test_unknown_cards_and_absent_daemons(run_dir, mic0):
    r = micctl(run_dir, "status", "mic7")
    assert r.returncode == 3 and "mic7: no such card, or its daemon is not running" in r.stderr
    stale = run_dir / "mic9.sock"
    import socket as _s
    s = _s.socket(_s.AF_UNIX, _s.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # what a killed daemon leaves behind
    try:
        r = micctl(run_dir, "status", "mic9")
        assert r.returncode == 3 and "not running" in r.stderr
    finally:
        stale.unlink()
    r = micctl(run_dir.parent / "nowhere", "status")
    assert r.returncode == 3 and "no card daemons are running" in r.stderr


def test_usage_errors_and_timeouts(mic0):
    ensure_ready(mic0)
    for args, code, text in ((("-b", "-S"), 2, "one action at a time"),
                             (("status", "all", "mic0"), 2, "cannot be combined"),
                             (("set", "mic0", "bootmode", "windows"), 1, "bootmode is linux or flash"),
                             (("set", "mic0", "colour", "red"), 1, "no attribute"),
                             (("wait", "--state", "online", "--timeout", "0.5", "mic0"), 4, "still ready")):
        r = mic0.micctl(*args)
        assert r.returncode == code and text in r.stderr, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr


def test_all_means_every_running_card(mic0, mic1):
    ensure_ready(mic0)
    ensure_ready(mic1)
    out = mic0.ok("status")
    assert out.splitlines() == ["mic0: ready", "mic1: ready"]
    out = mic0.ok("boot", "all", "--wait")
    assert "mic0: online" in out and "mic1: online" in out
    mic0.ok("reset", "all", "--wait")


# --- who may ask (SO_PEERCRED) ------------------------------------------------------------------
def test_the_socket_group_may_read_but_not_control(mic0):
    st = os.stat(mic0.socket)
    nogroup = grp.getgrnam("nogroup").gr_gid
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == nogroup
    nobody = pwd.getpwnam("nobody")
    replies = _ask_as(nobody, str(mic0.socket), ["status", "boot"])
    assert replies[0]["ok"] is True and replies[0]["state"]
    assert replies[1]["ok"] is False and replies[1]["errno"] == "EACCES"


def _ask_as(user, path: str, cmds: list[str]) -> list[dict]:
    def ask():
        with JsonLinesClient(path) as c:
            return [c.call(cmd) for cmd in cmds]
    return as_user(user.pw_uid, user.pw_gid, ask)


# --- no leaks (issue 4: 50 cycles) ----------------------------------------------------------------
def test_fifty_boot_shutdown_reset_cycles_leak_nothing_in_the_daemon(mic1):
    ensure_ready(mic1)

    def cycle():
        mic1.ok("boot", "--wait", "--timeout", "20", "mic1")
        mic1.ok("shutdown", "mic1")
        wait_for(lambda: mic1.status()["shutdown_status"] == "poweroff", "the shutdown status")
        mic1.ok("reset", "--wait", "mic1")

    for _ in range(5):  # warm up: first-use allocations, lazily started threads
        cycle()
    fds, threads, rss = mic1.proc_fds(), mic1.proc_threads(), mic1.proc_rss_kib()
    for _ in range(45):
        cycle()
    wait_for(lambda: mic1.proc_threads() <= threads, "the daemon's threads to settle", 10)
    assert mic1.proc_fds() <= fds, "file descriptors leaked"
    assert mic1.proc_rss_kib() - rss < 8 << 10, "resident memory grew by more than 8 MiB"


# --- stopping -------------------------------------------------------------------------------------
def test_sigterm_resets_the_card_and_removes_the_socket(run_dir):
    d = Daemon(run_dir, "mic5", CONFIG)
    d.ok("boot", "--wait", "mic5")
    resets = d.card("counters")["counters"]["bootstrap"]["resets"]
    sim_pid_alive = d.card("ping")["pid"]
    assert d.stop() == 0
    assert not d.socket.exists()
    assert "online -> resetting" in d.log() and "resetting -> ready" in d.log()
    assert resets >= 1
    wait_for(lambda: not os.path.exists(f"/proc/{sim_pid_alive}"), "the simulated card process to end", 20)
