"""Booting the simulated card through MicDevice over vfio-user, to the card's COSM client (spec 3, 7, 8.4).

The card runs as ``python -m micdrv.sim`` in its own process; the host side
is :class:`micdrv.mic.MicDevice`, which reaches it only through the
vfio-user socket. The tests play COSM's part: they listen on SCIF port 201
through ``MicDevice.scif`` and talk ``struct cosm_msg`` with the card. The
simulator's control socket (never used by the driver) shows what the card
OS saw and flips its test switches. Every wait has a timeout; no test checks
how fast anything is.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from pathlib import Path

import pytest

from micdrv.boot import CMDLINE_SIZE
from micdrv.cosm import CosmMsg, CosmMsgId, MicStatus, recv_msg, send_msg
from micdrv.cosm.hwops import BootError, BootSpec, CosmHwOps
from micdrv.cosm.klog import log_text, read_log_buf, system_map_symbols
from micdrv.mic import MicDevice
from micdrv.scif import POLLHUP, SCIF_COSM_LISTEN_PORT, ScifConnectionReset, ScifTimeout
from micdrv.sim.cardos.image import build_image, system_map, parse_image
from micdrv.x100 import CardNotReady, regs
from tests.sim_harness import MEMORY, module_sim, wait_for

WAIT = 10.0            # the longest any single wait here may take
HEARTBEAT = 0.2        # micdrv_sim.heartbeat for these tests
BOOT_ADDR = 64 << 20   # the simulator's default download address
FAST = f"micdrv_sim.heartbeat={HEARTBEAT}"


@pytest.fixture(scope="module")
def sim():
    yield from module_sim()


@pytest.fixture(scope="module")
def firmware(tmp_path_factory) -> Path:
    """``micdrv sim image`` output: the image and System.map beside it."""
    d = tmp_path_factory.mktemp("firmware")
    img = d / "uos.img"
    img.write_bytes(build_image())
    (d / "System.map").write_text(system_map(parse_image(img.read_bytes())))
    return img


def open_mic(sim, mic_id: int = 0) -> MicDevice:
    return MicDevice.open(sim.connect(), mic_id=mic_id, reset_delay=0.0, scif_poll_interval=0.05, scif_timeout=5.0)


@pytest.fixture
def mic(sim):
    m = open_mic(sim)
    yield m
    dev = m.dev
    m.close()
    dev.close()


@pytest.fixture
def cosm(mic):
    """COSM's listening endpoint on port 201 (spec 7.2)."""
    lep = mic.scif.listen(SCIF_COSM_LISTEN_PORT)
    yield lep
    lep.close(timeout=0)


def reset_ready(mic: MicDevice) -> None:
    mic.reset()
    wait_for(mic.ready, "the card to become ready", WAIT, 0.005)


def boot(mic: MicDevice, cosm, firmware: Path, cmdline: str = FAST, **kw):
    """Reset, start, accept the card's COSM connection: the card is "online" (spec 3.2, 7.2)."""
    reset_ready(mic)
    mic.start(BootSpec(firmware, cmdline=cmdline, **kw))
    return cosm.accept(timeout=WAIT)


def record(sim) -> dict | None:
    return sim.control("os")["record"]


def wait_state(sim, state: str) -> dict:
    return wait_for(lambda: (r := record(sim)) and r["state"] == state and r, f"the card OS in state {state}", WAIT)


def next_msg(ep, want: CosmMsgId, timeout: float = WAIT) -> CosmMsg:
    """The next message of kind ``want``, skipping heartbeats."""
    deadline = time.monotonic() + timeout
    while True:
        msg = recv_msg(ep, timeout=max(0.01, deadline - time.monotonic()))
        if msg.id is want:
            return msg
        assert msg.id is CosmMsgId.HEARTBEAT, msg


def card_log(mic: MicDevice, firmware: Path) -> str:
    """The card's kernel log through BAR0, the way COSM's ``log`` command reads it (spec 3.5)."""
    syms = system_map_symbols((firmware.parent / "System.map").read_text())
    return log_text(read_log_buf(mic, syms["__log_buf"], syms["log_buf_len"]))


# --- reset and ready (spec 2.5) -----------------------------------------------------------------
def test_microdevice_is_the_cosm_hw_ops_of_an_x100(mic):
    assert isinstance(mic, CosmHwOps)
    assert (mic.name, mic.node_id, mic.family, mic.stepping, mic.memory_size) == ("mic0", 1, "x100", "C0", MEMORY)


def test_reset_then_ready(sim, mic):
    resets = sim.control.counters()["bootstrap"]["resets"]
    reset_ready(mic)
    assert mic.post_code() == "10" and sim.control.counters()["bootstrap"]["resets"] == resets + 1


def test_a_card_that_never_becomes_ready_times_out_in_ready_polling(sim, mic):
    sim.control("fail_next_reset")
    mic.reset()
    with pytest.raises(CardNotReady, match="SPAD2 bit 0 not set"):
        mic.card.wait_ready(timeout=0.5, interval=0.01)
    assert not mic.ready() and mic.post_code() == "01"
    reset_ready(mic)  # the next reset works


# --- boot to online (spec 3.2, 7.2, 8.4) ---------------------------------------------------------
def test_boot_reaches_the_cosm_client_which_heartbeats_at_the_configured_interval(sim, mic, cosm, firmware):
    t0 = time.monotonic()
    ep = boot(mic, cosm, firmware)
    assert ep.peer.node == 1 and mic.started
    rec = wait_state(sim, "online")
    assert rec["params"]["heartbeat"] == HEARTBEAT and rec["devices"]["cosm_client"]["connected"]
    assert mic.post_code() == "80"
    for _ in range(5):
        assert recv_msg(ep, timeout=WAIT).id is CosmMsgId.HEARTBEAT
    # The card sends one per interval and the host sent it nothing, so five took at least five
    # intervals (a bound a slow machine cannot break: it can only make them later).
    assert time.monotonic() - t0 >= 5 * HEARTBEAT
    assert record(sim)["devices"]["cosm_client"]["heartbeats"] >= 5
    # The host side of spec 8.4: the node QP is up and the host's DMA channels 0-3 run.
    assert mic.scif_link.alive and mic.scif_link.peer_db == rec["bootparam"]["h2c_scif_db"]
    channels = sim.control.counters()["dma"]["channels"]
    assert all(channels[ch]["enabled"] and channels[ch]["owner"] == "host" for ch in range(4))
    assert all(channels[ch]["enabled"] and channels[ch]["owner"] == "card" for ch in range(4, 8))
    ep.close(timeout=0)


def test_sync_time_sets_the_card_clock(sim, mic, cosm, firmware):
    ep = boot(mic, cosm, firmware)
    send_msg(ep, CosmMsg.sync_time(1_000_000_000, 123_456_789))
    rec = wait_for(lambda: (r := record(sim))["clock"]["synced_to"] and r, "SYNC_TIME on the card", WAIT)
    assert rec["clock"]["synced_to"] == [1_000_000_000, 123_456_789]
    assert 1_000_000_000 <= rec["clock"]["time"] < 1_000_000_000 + 3600
    # the card prints after it sets the clock, and the record may be published in between
    line = "clock set to 2001-09-09 01:46:40.123456 UTC"
    wait_for(lambda: line in card_log(mic, firmware), "the clock line in the card's log", WAIT)
    ep.close(timeout=0)


def test_shutdown_reports_poweroff_and_closes_then_stop_reset_and_boot_again(sim, mic, cosm, firmware):
    ep = boot(mic, cosm, firmware)
    send_msg(ep, CosmMsg.shutdown())
    status = next_msg(ep, CosmMsgId.SHUTDOWN_STATUS)
    assert status.shutdown_status is MicStatus.POWER_OFF
    assert wait_for(lambda: ep.poll(timeout=0.05) & POLLHUP, "the card to close its COSM endpoint", WAIT)
    with pytest.raises(ScifConnectionReset):
        while True:
            assert recv_msg(ep, timeout=WAIT).id is CosmMsgId.HEARTBEAT
    rec = wait_state(sim, "poweroff")
    assert rec["devices"]["cosm_client"]["status_sent"] == "poweroff"
    wait_for(lambda: mic.post_code() == "F3", "post code F3", WAIT)
    wait_for(lambda: not mic.scif_link.alive, "the card's SCIF exit", WAIT)
    ep.close(timeout=0)
    mic.stop()
    assert not mic.started and mic.scif_link is None
    assert mic.device_page.bootparam.scif_card_dma_addr == 0 and mic.device_page.bootparam.c2h_scif_db == -1
    reset_ready(mic)
    ep = boot(mic, cosm, firmware)  # and again
    assert wait_state(sim, "online")["devices"]["cosm_client"]["attempts"] == 1
    ep.close(timeout=0)


@pytest.mark.parametrize("action, status, post", [("halt", MicStatus.HALTED, "F2"),
                                                 ("reboot", MicStatus.RESTART, "F4")])
def test_halt_and_reboot_report_their_status(sim, mic, cosm, firmware, action, status, post):
    ep = boot(mic, cosm, firmware)
    sim.control("kernel", action=action)
    assert next_msg(ep, CosmMsgId.SHUTDOWN_STATUS).shutdown_status is status
    wait_state(sim, status.sysfs)
    wait_for(lambda: mic.post_code() == post, f"post code {post}", WAIT)
    ep.close(timeout=0)


def test_an_orderly_stop_of_an_online_card_tells_its_scif(sim, mic, cosm, firmware):
    ep = boot(mic, cosm, firmware)
    wait_state(sim, "online")
    mic.stop()  # SCIF_EXIT, answered: the card's COSM connection ends with it
    rec = wait_for(lambda: (r := record(sim))["devices"]["cosm_client"]["closed_by_host"] and r,
                   "the card to see its connection end", WAIT)
    assert not rec["devices"]["scif"]["host_alive"]
    assert "scif0: the card did not acknowledge" not in sim.log()
    with pytest.raises(ScifConnectionReset):
        ep.recv(1, timeout=WAIT)
    ep.close(timeout=0)


def test_the_device_page_carries_node_id_mic_id_plus_one(sim, firmware):
    mic = open_mic(sim, mic_id=2)
    try:
        lep = mic.scif.listen(SCIF_COSM_LISTEN_PORT)
        ep = boot(mic, lep, firmware)
        assert mic.node_id == 3 and ep.peer.node == 3
        rec = wait_state(sim, "online")
        assert rec["bootparam"]["node_id"] == 3 and rec["devices"]["scif"]["node_id"] == 3
        ep.close(timeout=0)
        lep.close(timeout=0)
    finally:
        dev = mic.dev
        mic.close()
        dev.close()


# --- what the host loaded, as the card sees it (spec 3.1) ---------------------------------------------
def test_cmdline_has_mem_first_and_the_ramdisk_patch_reaches_the_card(sim, mic, cosm, firmware, tmp_path):
    ramdisk = tmp_path / "mic0.image"
    ramdisk.write_bytes(os.urandom(100_000))
    ep = boot(mic, cosm, firmware, cmdline=f"console=hvc0 {FAST}", ramdisk=ramdisk)
    rec = wait_state(sim, "online")
    assert rec["cmdline"] == f" mem={MEMORY >> 20}M console=hvc0 {FAST}"
    assert (rec["ramdisk_image"], rec["ramdisk_size"]) == (2 * BOOT_ADDR, 100_000)
    assert mic.read_card(2 * BOOT_ADDR, 100_000) == ramdisk.read_bytes()
    assert rec["image_size"] == firmware.stat().st_size
    assert mic.card.read_spad(regs.SPAD_FW_SIZE) == firmware.stat().st_size
    log = card_log(mic, firmware)
    assert f"RAMDISK: [mem {2 * BOOT_ADDR:#x}-{2 * BOOT_ADDR + 100_000 - 1:#x}]" in log
    ep.close(timeout=0)


def test_the_card_log_read_through_bar0_has_the_boot_messages(sim, mic, cosm, firmware):
    ep = boot(mic, cosm, firmware)
    wait_state(sim, "online")
    log = card_log(mic, firmware)
    for line in ("micdrv-sim-cardos 1.0 (image format 1) on an X100 with 256 MiB",
                 f"Command line:  mem=256M {FAST}", "mic: device page at 0x80", "mic_x100_dma: DMA channels 4-7 up",
                 "scif: node 1, doorbell", "scif: the host node 0 is up",
                 "cosm_client: connected to the host's COSM server, port 201"):
        assert line in log, log
    assert log.index("mic: device page") < log.index("scif: node 1") < log.index("cosm_client: connected")
    assert all(line.startswith("[") for line in log.splitlines())
    ep.close(timeout=0)


# --- boot errors leave the card untouched (spec 3.1) ----------------------------------------------------
def card_state(sim, mic) -> tuple:
    return (mic.card.read_spad(regs.SPAD_FW_SIZE), mic.card.read_spad(regs.SPAD_DPLO),
            mic.card.read_spad(regs.SPAD_DPHI), mic.read_card(BOOT_ADDR, 4096), mic.read_card(2 * BOOT_ADDR, 64),
            sim.control.counters()["bootstrap"]["kicks"], sim.control.status()["state"],
            [c["enabled"] for c in sim.control.counters()["dma"]["channels"]])


def bad_boot(kind: str, firmware: Path, tmp: Path, mic: MicDevice) -> tuple[BootSpec, str]:
    if kind == "missing firmware":
        return BootSpec(tmp / "absent.img"), "firmware: .*absent.img: No such file"
    if kind == "image too large":
        big = tmp / "big.img"
        with open(big, "wb") as f:
            f.truncate(MEMORY - BOOT_ADDR + 1)  # sparse: one byte more than fits above the boot address
        return BootSpec(big), "firmware: .*more than the .* bytes of card memory"
    if kind == "download address above 2 GiB":
        mic.card.write_spad(regs.SPAD_DOWNLOAD_INFO, 0x8000_1000 | 240 << 1 | 1)  # a broken bootstrap
        return BootSpec(firmware), "download address: .*above 0x80000000"
    if kind == "download address outside memory":
        mic.card.write_spad(regs.SPAD_DOWNLOAD_INFO, (MEMORY + (16 << 20)) | 240 << 1 | 1)
        return BootSpec(firmware), "download address: .*outside the card's"
    if kind == "flash bootmode":
        return BootSpec(firmware, bootmode="flash"), "bootmode: flash mode is not supported"
    if kind == "command line too long":
        return BootSpec(firmware, cmdline="x" * CMDLINE_SIZE), "cmdline: .*holds 2048"
    if kind == "missing ramdisk":
        return BootSpec(firmware, ramdisk=tmp / "absent.image"), "ramdisk: .*absent.image"
    if kind == "ramdisk too large":
        big = tmp / "big.image"
        with open(big, "wb") as f:
            f.truncate(MEMORY - 2 * BOOT_ADDR + 1)
        return BootSpec(firmware, ramdisk=big), "ramdisk: .*more than"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing firmware", "image too large", "download address above 2 GiB",
                                  "download address outside memory", "flash bootmode", "command line too long",
                                  "missing ramdisk", "ramdisk too large"])
def test_a_boot_error_names_its_step_and_leaves_the_card_untouched(sim, mic, firmware, tmp_path, kind):
    reset_ready(mic)
    mic.card.aperture.write(BOOT_ADDR, b"untouched" * 100)
    spec, match = bad_boot(kind, firmware, tmp_path, mic)
    before = card_state(sim, mic)
    with pytest.raises(BootError, match=match):
        mic.start(spec)
    assert card_state(sim, mic) == before
    assert not mic.started and mic.scif_link is None
    assert mic.device_page.bootparam.scif_host_dma_addr == 0


def test_start_twice_is_refused(sim, mic, cosm, firmware):
    ep = boot(mic, cosm, firmware)
    with pytest.raises(BootError, match="already started"):
        mic.start(BootSpec(firmware))
    ep.close(timeout=0)


# --- test switches: panic and hang (spec 7.2) -------------------------------------------------------------
@pytest.mark.parametrize("switch", ["panic", "hang"])
def test_a_panicked_or_hung_card_goes_quiet_without_closing_and_can_be_reset_and_booted(sim, mic, cosm, firmware,
                                                                                       switch):
    ep = boot(mic, cosm, firmware)
    wait_state(sim, "online")
    assert recv_msg(ep, timeout=WAIT).id is CosmMsgId.HEARTBEAT
    sim.control("kernel", action=switch, **({"message": "test switch"} if switch == "panic" else {}))
    wait_state(sim, {"panic": "panic", "hang": "hung"}[switch])
    with pytest.raises(ScifTimeout):  # the last heartbeat may still be on its way; then nothing
        while True:
            assert recv_msg(ep, timeout=HEARTBEAT * 5).id is CosmMsgId.HEARTBEAT
    assert not ep.poll(timeout=0) & POLLHUP  # the connection stays open: only a watchdog can tell
    log = card_log(mic, firmware)
    if switch == "panic":
        assert "Kernel panic - not syncing: test switch" in log and mic.post_code() == "EE"
    else:
        assert "panic" not in log and mic.post_code() == "80"
    mic.stop(force=True)  # a dead card is never waited for
    ep.close(timeout=0)
    ep = boot(mic, cosm, firmware)
    wait_state(sim, "online")
    ep.close(timeout=0)


def test_an_unknown_kernel_action_is_refused(sim, mic, cosm, firmware):
    ep = boot(mic, cosm, firmware)
    reply = sim.control.call("kernel", action="explode")
    assert not reply["ok"] and "unknown kernel action" in reply["error"]
    ep.close(timeout=0)


# --- no leaks -------------------------------------------------------------------------------------------------------
def fds() -> int:
    gc.collect()  # what earlier tests dropped (their mappings) goes now, not in the middle of the count
    return len(os.listdir("/proc/self/fd"))


def cycle(sim, mic, cosm, firmware) -> None:
    """Boot to online, shut down, stop, reset: one operator cycle (spec 3.2, 7.3)."""
    ep = boot(mic, cosm, firmware, cmdline="")
    send_msg(ep, CosmMsg.shutdown())
    assert next_msg(ep, CosmMsgId.SHUTDOWN_STATUS).shutdown_status is MicStatus.POWER_OFF
    wait_for(lambda: ep.poll(timeout=0.05) & POLLHUP, "the endpoint to close", WAIT)
    ep.close(timeout=0)
    mic.stop()
    mic.reset()


def test_fifty_start_stop_reset_cycles_leak_no_fds_or_threads(sim, mic, cosm, firmware):
    cycle(sim, mic, cosm, firmware)  # warm-up: lazily created things exist from here on
    fds0, threads0, arena0 = fds(), threading.active_count(), mic.arena.free_bytes
    card_threads0 = sim.control.status()["threads"]
    for _ in range(50):
        cycle(sim, mic, cosm, firmware)
    assert fds() == fds0
    assert threading.active_count() == threads0, threading.enumerate()
    wait_for(lambda: sim.control.status()["threads"] <= card_threads0, "the card's threads to settle", WAIT)
    assert len(mic.scif.endpoints()) == 1  # only the listener
    assert mic.arena.free_bytes == arena0  # every SCIF queue pair went back
