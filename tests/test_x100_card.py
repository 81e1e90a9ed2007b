"""The X100 host layer against the simulated card in another process.

The card runs as ``python -m micdrv.sim`` and the driver reaches it only
through the vfio-user socket, as it would reach silicon; the simulator's
control socket (never used by the driver) rings card doorbells, injects
faults and reports what the card saw. Every wait has a timeout; timings are
never checked.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from micdrv.pci import DmaArena
from micdrv.pci.vfio_user.client import VfioUserDevice
from micdrv.x100 import CardNotReady, IntrType, IrqMode, X100, hwops, regs
from micdrv.x100.interrupts import cookie_parts

REPO = Path(__file__).resolve().parents[1]
WAIT = 5.0  # the longest any single wait in these tests may take
POLL = 0.005  # ready polling interval against the simulated card
ARENA = 32 << 20


class SimCard:
    """``python -m micdrv.sim`` in its own process, with a control connection."""

    def __init__(self, *args: str):
        self.dir = tempfile.mkdtemp(prefix="x100")
        self.path = os.path.join(self.dir, "card.sock")
        self.control_path = os.path.join(self.dir, "control.sock")
        self.log_path = os.path.join(self.dir, "sim.log")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "wb") as log:  # a file, not a pipe: nobody has to drain it
            self.proc = subprocess.Popen([sys.executable, "-m", "micdrv.sim", "--socket", self.path,
                                          "--control", self.control_path, *args],
                                         cwd=REPO, env=env, stderr=log, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while b"listening" not in Path(self.log_path).read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_text = self.log()
                self.stop()
                raise RuntimeError(f"simulated card did not start:\n{log_text}")
            time.sleep(0.01)
        self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._ctl.settimeout(WAIT)
        self._ctl.connect(self.control_path)
        self._ctl_file = self._ctl.makefile("rwb")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def control(self, cmd: str, **kw) -> dict:
        self._ctl_file.write(json.dumps({"cmd": cmd, **kw}).encode() + b"\n")
        self._ctl_file.flush()
        reply = json.loads(self._ctl_file.readline())
        assert reply["ok"], reply
        return reply

    def counters(self) -> dict:
        return self.control("counters")["counters"]

    def status(self) -> dict:
        return self.control("status")["status"]

    def connect(self) -> VfioUserDevice:
        return VfioUserDevice.connect(self.path, WAIT)

    def stop(self) -> None:
        if getattr(self, "_ctl", None) is not None:
            self._ctl_file.close()
            self._ctl.close()
            self._ctl = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_for(pred, timeout: float = WAIT, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


@pytest.fixture(scope="module")
def sim():
    s = SimCard("--memory", "1G", "--ready-delay", "0.05")
    yield s
    s.stop()


@pytest.fixture
def card(sim):
    dev = sim.connect()
    arena = DmaArena(ARENA)
    c = X100.probe(dev, arena, reset_delay=0.0)
    yield c
    c.close()
    dev.close()
    arena.close()


def ready_card(card: X100) -> X100:
    """Reset, wait for ready, restore SMPT/MXAR/enables: the state a boot starts from."""
    card.reset()
    card.wait_ready(WAIT, POLL)
    card.restore_state()
    return card


# --- probe -------------------------------------------------------------------------------
def test_probe_reports_family_and_stepping(card):
    assert card.family == "x100" and card.stepping == "C0"
    assert card.interrupts.mode is IrqMode.MSIX and card.interrupts.num_vectors == regs.MIN_MSIX
    assert not card.regs.mmapped  # the simulated card traps BAR4: every access is a message
    assert card.aperture.view is not None and card.aperture.size == 1 << 30


def test_the_card_implements_the_hardware_ops_protocols(card):
    assert isinstance(card, hwops.CardOps) and isinstance(card, hwops.InterruptOps)
    assert isinstance(card.smpt, hwops.SmptOps)


def test_probe_enables_doorbell_and_dma_sources_with_auto_clear(sim, card):
    irq = sim.counters()["interrupts"]
    assert irq["mode"] == "msix" and irq["sice"] & 0xFF0F == 0xFF0F and irq["siac"] & 0xFF0F == 0xFF0F


def test_smpt_identity_programming_reads_back(card):
    assert card.smpt.read_back() == [i << 2 for i in range(regs.SMPT_ENTRIES)]
    assert card.smpt.to_card(card.arena.iova(0)) == regs.SYSTEM_WINDOW + card.arena.iova_base


def test_smpt_is_restored_after_a_reset_lost_it(card):
    card.reset()
    card.wait_ready(WAIT, POLL)
    assert card.smpt.read_back() == [0] * regs.SMPT_ENTRIES  # the card forgot (spec 2.4)
    card.restore_state()
    assert card.smpt.read_back() == [i << 2 for i in range(regs.SMPT_ENTRIES)]


# --- reset and ready -----------------------------------------------------------------------
def test_reset_with_ready_polling_publishes_download_info(sim, card):
    resets = sim.counters()["bootstrap"]["resets"]
    info = card.reset_and_wait(WAIT, POLL)
    assert info.ready and card.ready()
    st = sim.status()
    assert info.apic_id == st["apic_id"] and info.boot_addr == st["download_addr"] == 64 << 20
    assert sim.counters()["bootstrap"]["resets"] == resets + 1
    assert card.post_code() == "10"


def test_a_failed_reset_times_out_with_a_clear_error(sim, card):
    sim.control("fail_next_reset")
    card.reset()
    with pytest.raises(CardNotReady) as e:
        card.wait_ready(0.3, POLL)
    msg = str(e.value)
    assert "0.3 s" in msg and "SPAD2=0x00000000" in msg and "'01'" in msg
    card.reset_and_wait(WAIT, POLL)  # the next reset works again
    assert card.ready()


# --- doorbells -------------------------------------------------------------------------------
def test_a_card_doorbell_reaches_its_callback_through_the_mxar_routed_vector(sim, card):
    ready_card(card)
    hits = {db: 0 for db in range(4)}
    cookies = {}
    for db in (2, 0, 3, 1):  # request order decides the vectors: the first empty one each time
        cookies[db] = card.request_doorbell(db, lambda db=db: hits.__setitem__(db, hits[db] + 1))
    assert [cookie_parts(cookies[db]) for db in (2, 0, 3, 1)] == [(0, 2), (1, 0), (2, 3), (3, 1)]
    assert [card.interrupts.read_mxar(e) for e in range(4)] == [1 << 2, 1 << 0, 1 << 3, 1 << 1]
    with card.interrupt_thread():
        for db in (3, 1, 1, 0, 2):
            before = dict(hits)
            sim.control("ring", db=db)
            wait_for(lambda: hits[db] == before[db] + 1, what=f"doorbell {db}")
            assert {k: v for k, v in hits.items() if k != db} == {k: v for k, v in before.items() if k != db}
    vector = {db: cookie_parts(c)[0] for db, c in cookies.items()}
    assert card.interrupts.counts[vector[1]] == 2 and card.interrupts.counts[vector[3]] == 1
    msix = sim.counters()["interrupts"]["msix"]
    assert msix[vector[1]] >= 2
    for c in cookies.values():
        card.free_irq(c)
    assert [card.interrupts.read_mxar(e) for e in range(4)] == [0, 0, 0, 0]


def test_mxar_routing_survives_a_reset_through_restore(sim, card):
    ready_card(card)
    hits = []
    card.request_doorbell(1, lambda: hits.append(1))
    card.reset()
    card.wait_ready(WAIT, POLL)
    assert card.interrupts.read_mxar(0) == 0  # the reset lost it
    card.restore_state()
    assert card.interrupts.read_mxar(0) == 1 << 1
    with card.interrupt_thread():
        sim.control("ring", db=1)
        wait_for(lambda: hits, what="doorbell 1 after restore")


def test_dispatch_from_the_event_loop_without_a_thread(sim, card):
    import select
    ready_card(card)
    hits = []
    card.request_doorbell(0, lambda: hits.append(0))
    sim.control("ring", db=0)
    deadline = time.monotonic() + WAIT
    while not hits and time.monotonic() < deadline:
        for fd in select.select(list(card.interrupts.fds), [], [], 0.1)[0]:
            card.interrupts.dispatch(fd)
    assert hits == [0]


def test_next_db_rotates_over_four_and_never_resets(card):
    assert [card.next_db() for _ in range(6)] == [0, 1, 2, 3, 0, 1]
    card.reset_and_wait(WAIT, POLL)
    assert card.next_db() == 2


def test_host_doorbells_are_counted_by_the_card(sim, card):
    info = ready_card(card).download_info()
    card.send_firmware_intr(info.apic_id)  # doorbells 0-7 reach the card OS once it runs
    wait_for(lambda: sim.status()["os_starts"] >= 1, what="the card OS to start")
    before = sim.counters()["doorbells"]["rung"]
    for db in range(regs.NUM_CARD_DOORBELLS):
        for _ in range(db % 3 + 1):
            card.send_intr(db)
    want = [b + db % 3 + 1 for db, b in enumerate(before)]
    wait_for(lambda: sim.counters()["doorbells"]["rung"] == want, what="the card to count every doorbell")
    with pytest.raises(ValueError):
        card.send_intr(16)


def test_a_doorbell_rung_without_waiting_reaches_the_card_after_its_reply(sim, card):
    info = ready_card(card).download_info()
    card.send_firmware_intr(info.apic_id)
    wait_for(lambda: sim.status()["os_starts"] >= 1, what="the card OS to start")
    before = sim.counters()["doorbells"]["rung"]
    told = []
    fd = card.async_fd()
    assert fd is not None  # BAR4 is trapped: the read of the read-modify-write is a message (spec 2.3)
    assert card.send_intr_async(2, told.append) is True
    assert card.send_intr_async(9, told.append) is False and told == [None]  # RDMASR: a posted write
    deadline = time.monotonic() + WAIT
    while card.async_pending() and time.monotonic() < deadline:
        select.select([fd], [], [], 0.1)
        card.poll_async()
    assert told == [None, None]  # the APICICR read answered; the write went out after it
    want = list(before)
    want[2] += 1
    want[9] += 1
    wait_for(lambda: sim.counters()["doorbells"]["rung"] == want, what="the card to count both doorbells")


def test_post_code_and_spads(card):
    ready_card(card)
    card.write_spad(regs.SPAD_FW_SIZE, 0x1234)
    assert card.read_spad(regs.SPAD_FW_SIZE) == 0x1234
    card.write_dp_address(0x80_1234_5000)
    assert (card.read_spad(14), card.read_spad(15)) == (0x1234_5000, 0x80)
    assert len(card.post_code()) == 2


# --- interrupt modes -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [IrqMode.MSI, IrqMode.INTX])
def test_fallback_modes_deliver_doorbells_through_the_shared_handler(sim, mode):
    dev = sim.connect()
    arena = DmaArena(ARENA)
    card = X100.probe(dev, arena, irq_modes=(mode,), reset_delay=0.0)
    try:
        ready_card(card)
        assert card.interrupts.mode is mode and card.interrupts.num_vectors == 1
        hits = []
        card.request_doorbell(2, lambda: hits.append(2))
        card.request_irq(IntrType.DMA, 0, lambda: hits.append("dma"))
        if mode is IrqMode.MSI:
            assert card.interrupts.read_mxar(0) == 1 << 2 | 1 << 8
        with card.interrupt_thread():
            sim.control("ring", db=2)
            wait_for(lambda: hits, what=f"doorbell 2 in {mode.value} mode")
        assert hits == [2]
        assert sim.counters()["interrupts"]["mode"] == mode.value
        assert not sim.counters()["interrupts"]["sicr"] & 1 << 2  # the handler acked SICR0
    finally:
        card.close()
        dev.close()
        arena.close()


def test_an_a0_card_gets_the_pending_bit_array_cleared_after_each_interrupt():
    a0 = SimCard("--memory", "256M", "--ready-delay", "0.05", "--stepping", "A0")
    try:
        dev = a0.connect()
        arena = DmaArena(ARENA)
        card = X100.probe(dev, arena, reset_delay=0.0)
        try:
            assert card.stepping == "A0"
            ready_card(card)
            hits = []
            card.request_doorbell(0, lambda: hits.append(0))
            with card.interrupt_thread():
                a0.control("ring", db=0)
                wait_for(lambda: hits, what="doorbell 0 on an A0 card")
            wait_for(lambda: a0.counters()["interrupts"]["pba_clears"] >= 1, what="MSIXPBACR write")
        finally:
            card.close()
            dev.close()
            arena.close()
    finally:
        a0.stop()

