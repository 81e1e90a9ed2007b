"""COSM messages, states and statuses (spec 3.4, 7.1-7.3), and a COSM exchange over SCIF."""

from __future__ import annotations

import struct
import threading

import pytest

from micdrv.cosm import (COSM_MSG_SIZE, STATE_STRINGS, STATUS_STRINGS, CosmMsg, CosmMsgId, CosmProtocolError,
                         MicState, MicStatus, recv_msg, send_msg)
from micdrv.scif import POLLHUP, POLLIN, SCIF_COSM_LISTEN_PORT
from tests.scif_harness import WAIT, System


def test_states_and_statuses_are_exactly_the_sysfs_strings():
    assert STATE_STRINGS == ("ready", "booting", "online", "shutting_down", "resetting", "reset_failed")
    assert STATUS_STRINGS == ("nop", "crashed", "halted", "poweroff", "restart")
    assert [s.sysfs for s in MicState] == list(STATE_STRINGS) and [int(s) for s in MicState] == list(range(6))
    assert [s.sysfs for s in MicStatus] == list(STATUS_STRINGS) and [int(s) for s in MicStatus] == list(range(5))
    assert MicState.from_sysfs("shutting_down") is MicState.SHUTTING_DOWN and str(MicState.RESET_FAILED) == "reset_failed"
    assert MicStatus.from_sysfs("poweroff") is MicStatus.POWER_OFF
    with pytest.raises(ValueError, match="unknown card state 'offline'"):
        MicState.from_sysfs("offline")


def test_message_ids_and_layout():
    assert [(m.name, int(m)) for m in CosmMsgId] == [("SHUTDOWN", 0), ("SYNC_TIME", 1), ("HEARTBEAT", 2),
                                                     ("SHUTDOWN_STATUS", 3)]
    assert CosmMsg.sync_time(1_700_000_000, 5).encode() == struct.pack("<QQQ", 1, 1_700_000_000, 5)
    assert CosmMsg.status(MicStatus.HALTED).encode() == struct.pack("<QQQ", 3, 2, 0)
    assert CosmMsg.heartbeat().encode() == struct.pack("<QQQ", 2, 0, 0)
    assert len(CosmMsg.shutdown().encode()) == COSM_MSG_SIZE == 24


@pytest.mark.parametrize("msg", [CosmMsg.shutdown(), CosmMsg.heartbeat(), CosmMsg.sync_time(12, 999_999_999),
                                 *(CosmMsg.status(s) for s in (1, 2, 3, 4))])
def test_round_trip(msg):
    assert CosmMsg.decode(msg.encode()) == msg


def test_sync_time_defaults_to_the_wall_clock():
    m = CosmMsg.sync_time()
    import time
    assert abs(m.time_ns - time.time_ns()) < 5 * 10**9


def test_an_unknown_id_is_refused():
    with pytest.raises(CosmProtocolError, match="unknown COSM message id 4"):
        CosmMsg.decode(struct.pack("<QQQ", 4, 0, 0))


@pytest.mark.parametrize("status", [0, 5, 2**64 - 1])
def test_a_shutdown_status_outside_1_to_4_is_unexpected(status):
    with pytest.raises(CosmProtocolError, match=f"Unexpected shutdown_status {status}"):
        CosmMsg.decode(struct.pack("<QQQ", 3, status, 0))
    if status < 2**63:
        with pytest.raises(CosmProtocolError):
            CosmMsg.status(status)


def test_a_short_message_or_bad_nanoseconds_are_refused():
    with pytest.raises(CosmProtocolError, match="24 bytes"):
        CosmMsg.decode(bytes(16))
    with pytest.raises(CosmProtocolError, match="tv_nsec"):
        CosmMsg.decode(struct.pack("<QQQ", 1, 0, 10**9))


def test_heartbeat_ignores_the_unused_union():
    assert CosmMsg.decode(struct.pack("<QQQ", 2, 0xDEAD, 0xBEEF)) == CosmMsg.heartbeat()


def test_a_cosm_conversation_over_scif():
    """Card client connects to 0:201; host sends SYNC_TIME; heartbeats; SHUTDOWN; status; close (spec 7.2)."""
    s = System()
    try:
        card = s.boot(0)
        lep = s.host.listen(SCIF_COSM_LISTEN_PORT)
        box = {}
        t = threading.Thread(target=lambda: box.update(ep=lep.accept(timeout=WAIT)), daemon=True)
        t.start()
        client = card.node.connect(0, SCIF_COSM_LISTEN_PORT, timeout=WAIT)
        t.join(WAIT)
        server = box["ep"]
        assert server.peer.node == 1  # node n is COSM device n - 1
        send_msg(server, CosmMsg.sync_time(), timeout=WAIT)
        assert recv_msg(client, timeout=WAIT).id is CosmMsgId.SYNC_TIME
        send_msg(client, CosmMsg.heartbeat(), timeout=WAIT)
        assert server.poll(POLLIN, WAIT) & POLLIN
        assert recv_msg(server, timeout=WAIT) == CosmMsg.heartbeat()
        send_msg(server, CosmMsg.shutdown(), timeout=WAIT)
        assert recv_msg(client, timeout=WAIT) == CosmMsg.shutdown()
        send_msg(client, CosmMsg.status(MicStatus.POWER_OFF), timeout=WAIT)
        client.close(timeout=WAIT)
        assert server.poll(POLLIN, WAIT) & POLLHUP
        assert recv_msg(server, timeout=WAIT).shutdown_status is MicStatus.POWER_OFF
        with pytest.raises(ConnectionResetError):
            recv_msg(server, timeout=WAIT)
        server.close(timeout=WAIT)
    finally:
        s.close()
