"""ScifHwLink: the node queue pair's probe, interrupt work and remove on both sides (spec 8.4), in one process.

Memory is laid out as on hardware (tests/scif_harness.py); doorbells are a
table of callbacks per side. The same class runs the host end and the card
end.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from micdrv.bootparam import Bootparam
from micdrv.scif import SCIFEP_MAGIC, ScifHwLink, ScifNode, Side
from micdrv.scif.qp import QP_MAGIC
from tests.scif_harness import SMPT_BASE, WAIT, System


def wait_for_call(pred, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


class Bells:
    """Both directions of one link's doorbells: ``ring`` on one side calls the other side's callback."""

    def __init__(self, name: str, dbs: range):
        self.name, self.dbs = name, dbs
        self.callbacks: dict[int, object] = {}
        self.peer: "Bells | None" = None
        self.rung = 0
        self._next = 0

    def next_db(self) -> int:
        db = self.dbs[self._next % len(self.dbs)]
        self._next += 1
        return db

    def request(self, db, callback):
        self.callbacks[db] = callback
        return db

    def free(self, handle):
        self.callbacks.pop(handle, None)

    def ring(self, db):
        self.rung += 1
        cb = self.peer.callbacks.get(db)
        if cb is not None:
            cb()


def pair(system: System, host_poll: float = 0.01, card_poll: float = 0.01,
         card_stopped: threading.Event | None = None):
    c = system.cards[0]
    c.host_bp.init(c.node_id)
    host_bells, card_bells = Bells("host", range(4)), Bells("card", range(16))
    host_bells.peer, card_bells.peer = card_bells, host_bells
    host = ScifHwLink(system.host, c.node_id, c.host_scif_memory, c.host_bp, host_bells, Side.HOST,
                      poll_interval=host_poll, name="host")
    node = ScifNode(c.node_id, alive_timeout=system.alive_timeout, accept_step=0.2, double_publish=True, name="card")
    card = ScifHwLink(node, 0, c.card_scif_memory, Bootparam(c.smpt, SMPT_BASE + c.dp_iova), card_bells, Side.CARD,
                      poll_interval=card_poll, name="card", stopped=card_stopped)
    return host, card, node, host_bells, card_bells


@pytest.fixture
def system():
    s = System(alive_timeout=3.0)
    yield s
    s.close()


def test_both_ends_come_up_and_an_endpoint_connects_through_them(system):
    host, card, node, hb, cb = pair(system)
    host.start()
    card.start()
    assert system.host.wait_peer(1, WAIT) and node.wait_peer(0, WAIT)
    assert (host.peer_db, card.peer_db) == (card.db, host.db) and card.db == 0
    lep = system.host.listen(201)
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("ep", node.connect(0, 201, timeout=WAIT)))
    t.start()
    hep = lep.accept(timeout=WAIT)
    t.join(WAIT)
    ep = got["ep"]
    ep.send(b"heartbeat")
    assert hep.recv(9, timeout=WAIT) == b"heartbeat"
    assert host.interrupts > 0 and card.interrupts > 0
    ep.close(timeout=WAIT)
    hep.close(timeout=WAIT)
    lep.close()
    assert card.close(timeout=WAIT) and host.close(timeout=WAIT)
    assert host.bootparam.scif_host_dma_addr == 0 and host.bootparam.c2h_scif_db == -1
    assert card.bootparam.scif_card_dma_addr == 0 and card.bootparam.h2c_scif_db == -1
    assert hb.callbacks == {} and cb.callbacks == {}


def test_the_peers_scif_init_runs_the_poll_at_once(system):
    """The host polls every 100 s here, yet connects as soon as the card's SCIF_INIT arrives (spec 8.4 step 4)."""
    host, card, node, _, _ = pair(system, host_poll=100.0)
    host.start()  # its first poll finds nothing: the card has not published yet
    wait_for_call(lambda: host.peer is not None and host._thread is not None)
    time.sleep(0.05)
    card.start()
    assert system.host.wait_peer(1, WAIT), "the host waited for its next poll"
    card.close(force=True)
    host.close(force=True)


def test_shutdowns_at_both_ends_at_once_do_not_wait_for_each_other(system, caplog):
    host, card, node, _, _ = pair(system)
    host.start()
    card.start()
    assert system.host.wait_peer(1, WAIT) and node.wait_peer(0, WAIT)
    results = {}
    go = threading.Barrier(2)

    def close(name, link):
        go.wait()
        t0 = time.monotonic()
        results[name] = (link.close(timeout=WAIT), time.monotonic() - t0)

    with caplog.at_level(logging.WARNING):
        ts = [threading.Thread(target=close, args=a) for a in (("host", host), ("card", card))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(2 * WAIT)
    assert results["host"][0] and results["card"][0], results
    assert all(took < WAIT for _, took in results.values()), results  # nobody sat out the timeout
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert system.host.peer(1) is None and node.peer(0) is None


@pytest.mark.parametrize("reset", [True, False], ids=["after-a-card-reset", "card-still-running"])
def test_a_worker_whose_card_was_reset_stops_quietly_but_a_real_failure_is_logged(system, caplog, reset):
    """A card reset stops the card OS between two of its worker's accesses: the access that raises is the
    end of that worker's life, not a failure (no traceback). The same exception with the card running is."""
    stopped = threading.Event()
    host, card, node, hb, _ = pair(system, card_stopped=stopped)
    host.start()
    card.start()
    assert system.host.wait_peer(1, WAIT) and node.wait_peer(0, WAIT)
    calls = []

    def interrupt():
        calls.append(1)
        if reset:
            stopped.set()
        raise RuntimeError("card read of [0x0, +0x0): the card was reset")

    card.peer.interrupt = interrupt
    with caplog.at_level(logging.DEBUG, logger="micdrv.scif.hwlink"):
        hb.ring(card.db)
        wait_for_call(lambda: calls)
        wait_for_call(lambda: "worker stopping" in caplog.text or "work failed" in caplog.text)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    if reset:
        assert not errors, caplog.text
    else:
        assert errors and errors[0].exc_info and "work failed" in errors[0].getMessage(), caplog.text
    card.close(force=True)
    host.close(force=True)


def test_after_the_card_left_the_host_remove_does_not_wait(system):
    host, card, node, _, _ = pair(system)
    host.start()
    card.start()
    assert system.host.wait_peer(1, WAIT) and node.wait_peer(0, WAIT)
    assert card.close(timeout=WAIT)  # card-initiated: SCIF_EXIT, answered
    wait_for_call(lambda: not host.connected)
    t0 = time.monotonic()
    assert host.close(timeout=WAIT)
    assert time.monotonic() - t0 < WAIT


def test_a_forced_close_says_nothing_to_the_peer(system):
    host, card, node, hb, cb = pair(system)
    host.start()
    card.start()
    assert system.host.wait_peer(1, WAIT) and node.wait_peer(0, WAIT)
    rung = hb.rung
    assert host.close(force=True)
    assert hb.rung == rung and system.host.peer(1) is None
    card.abandon()  # the card side was reset under it: nothing touched
    assert node.peer(0) is None


def test_a_peer_queue_pair_with_a_bad_magic_keeps_the_node_down(system, caplog):
    host, card, node, _, _ = pair(system)
    card.start()
    c = system.cards[0]
    c.gddr.write_u64(card.qp.dma_addr + QP_MAGIC, SCIFEP_MAGIC ^ 1)  # a card whose QP is not a scif_qp
    with caplog.at_level(logging.ERROR):
        host.start()
        wait_for_call(lambda: host.error is not None)
    assert "SCIFEP_MAGIC mismatch" in host.error and not host.alive
    assert "the node stays down" in caplog.text
    host.close(force=True)
    card.close(force=True)
