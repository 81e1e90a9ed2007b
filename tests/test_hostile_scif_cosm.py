"""A hostile card against the daemon's SCIF and COSM (issue 7): bad ports, cookies, sizes, ids -- the card alone pays.

Two daemons, two simulated cards, as on a host with two cards: mic0's card
OS turns hostile (:mod:`micdrv.sim.cardos.hostile`), mic1's is the witness.

* SCIF: hypothesis draws node messages with any uop (unknown ones, RMA ones
  the host does not support, connection messages with made-up cookies,
  CNCT_REQs to unbound ports or with a queue pair whose size or ring lies
  outside card memory, a stray SCIF_EXIT_ACK) and sends them raw into the
  host's node queue. mic0 stays online: its COSM connection -- the same
  node queue -- keeps carrying heartbeats.
* A write offset beyond the host's ring: the host gives the node up and
  declares the card crashed, with one log line.
* COSM: a message that is no ``cosm_msg`` (unknown id, a shutdown status
  outside 1..4), one only the host sends, or half a message: the card is
  declared crashed (shutting_down / crashed) with one log line, left for
  the operator, and a reset and boot bring it back.

mic1 stays online through all of it.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from micdrv.cosm.msg import CosmMsgId
from micdrv.scif.qp import MAX_PEER_RING, QP_INBOUND_SIZE, QP_LOCAL_BUF, QP_SIZE, SCIFEP_MAGIC
from micdrv.scif.wire import SCIF_COSM_LISTEN_PORT, Uop
from tests import hardening
from tests.daemon_harness import Daemon, control_call, wait_for

HEARTBEAT = 0.2
CONFIG = f"""
[defaults]
cmdline = "micdrv_sim.heartbeat={HEARTBEAT}"
heartbeat = {{ enable = true, timeout = 5 }}
reset_timeout = 5
"""
BROKEN = "the card broke the protocol, declared crashed"
MSG = struct.Struct("<HHHHI4Q")   # struct scifmsg (spec 8.2)


def ctl(d: Daemon, cmd: str, **args) -> dict:
    reply = control_call(str(d.socket), cmd, **args)
    assert reply["ok"], reply
    return reply


def online(d: Daemon) -> None:
    s = ctl(d, "status")
    if s["state"] == "online" and s["connected"]:
        return
    if s["state"] not in ("ready", "resetting"):
        ctl(d, "reset")
    ctl(d, "wait", states=["ready"], timeout=20)
    ctl(d, "boot")
    ctl(d, "wait", states=["online"], timeout=20)
    wait_for(lambda: ctl(d, "status")["connected"], f"{d.name}'s COSM connection")


def beating(d: Daemon) -> None:
    """The card's heartbeats still arrive over COSM (so its SCIF node queue still works both ways)."""
    n = ctl(d, "status")["heartbeats"]
    wait_for(lambda: ctl(d, "status")["heartbeats"] > n, f"a heartbeat from {d.name}")


def broken_lines(d: Daemon) -> int:
    return d.log().count(BROKEN)


@pytest.fixture(scope="module")
def cards():
    run = Path(tempfile.mkdtemp(prefix="micdrv-hostile")) / "run"
    mic0 = Daemon(run, "mic0", CONFIG)
    mic1 = Daemon(run, "mic1", CONFIG)
    try:
        online(mic0)
        online(mic1)
        mic0.scratch = mic0.card("hostile", op="scratch", size=QP_SIZE)["addr"]
        yield mic0, mic1
    finally:
        for d in (mic0, mic1):
            rc = d.stop()
            assert rc == 0, d.log()
            assert "Traceback" not in d.log(), d.log()


# --- SCIF ----------------------------------------------------------------------------------------------

HARMLESS_UOPS = [u for u in Uop if u not in (Uop.EXIT, Uop.NODE_REMOVE)]   # the card's own orderly exits aside
u16 = st.one_of(st.integers(0, 3), st.sampled_from([SCIF_COSM_LISTEN_PORT, 1088, 1089, 0xFFFF]),
                st.integers(0, 0xFFFF))
u64 = st.one_of(st.integers(0, 0xFF), st.integers(0, (1 << 64) - 1))


@st.composite
def scif_messages(draw, fake_qp: int):
    uop = draw(st.one_of(st.sampled_from(HARMLESS_UOPS), st.sampled_from([0, 40, 255]), st.integers(0, 1 << 32 - 1)))
    src = (draw(u16), draw(u16))
    dst = (draw(u16), draw(u16))
    payload = [draw(u64) for _ in range(4)]
    if uop == Uop.CNCT_REQ and draw(st.booleans()):
        payload[1] = fake_qp                         # a queue pair that is there, but wrong (see fake_qps)
    return MSG.pack(*src, *dst, uop, *payload)


# A queue pair with the right magic whose ring is impossible: its size no power of two in range, or its
# buffer outside card memory (spec 8.3; micdrv.scif.qp MIN/MAX_PEER_RING).
fake_qps = st.one_of(
    st.tuples(st.sampled_from([0, 3, 100, MAX_PEER_RING * 2, 0xFFFFFFFF]), st.integers(0, 1 << 20)),
    st.tuples(st.just(0x1000), st.integers(1 << 40, (1 << 64) - 1)),
)


def test_hostile_scif_messages_leave_the_card_online_and_the_other_card_alone(cards):
    mic0, mic1 = cards
    before = broken_lines(mic0)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(msgs=st.lists(scif_messages(mic0.scratch), min_size=1, max_size=6), qp=fake_qps)
    def fuzz(msgs, qp):
        size, buf = qp
        fake = bytearray(QP_SIZE)
        struct.pack_into("<Q", fake, 0, SCIFEP_MAGIC)
        struct.pack_into("<I", fake, QP_INBOUND_SIZE, size)
        struct.pack_into("<Q", fake, QP_LOCAL_BUF, buf)
        mic0.card("card_write", addr=mic0.scratch, data=fake.hex())
        mic0.card("hostile", op="scif_send", messages=[m.hex() for m in msgs])
        beating(mic0)
        s = ctl(mic0, "status")
        assert (s["state"], s["connected"], s["broken"]) == ("online", True, None), s
        hardening.fuzz_cases()

    fuzz()
    assert broken_lines(mic0) == before
    beating(mic1)
    assert ctl(mic1, "status")["state"] == "online"


def declared_crashed(d) -> bool:
    """Shutting down with the status crashed. COSM sets the state first and publishes the status next (as
    upstream's cosm_shutdown_status_int, then cosm_update_mic_status), so a status read in between -- seen
    on a loaded machine -- shows shutting_down with nop: not yet declared."""
    s = ctl(d, "status")
    return s["state"] == "shutting_down" and s["shutdown_status"] == "crashed"


def test_a_corrupted_scif_ring_offset_gets_the_card_declared_crashed_once(cards):
    mic0, mic1 = cards
    before = broken_lines(mic0)
    mic0.card("hostile", op="scif_write_ptr", value=0x10000 + 44)     # beyond the 64 KiB node ring (spec 8.3)
    wait_for(lambda: declared_crashed(mic0), "mic0 to be declared crashed")
    s = ctl(mic0, "status")
    assert s["shutdown_status"] == "crashed" and "corrupted its queue pair" in s["broken"], s
    wait_for(lambda: not ctl(mic0, "status")["connected"], "mic0's COSM connection to close")
    assert broken_lines(mic0) - before == 1
    beating(mic1)
    online(mic0)                                     # the operator's reset and boot bring it back
    beating(mic0)
    assert ctl(mic0, "status")["broken"] is None
    hardening.fault(ctl(mic1, "status")["state"] == "online")


# --- COSM ------------------------------------------------------------------------------------------------

COSM = struct.Struct("<QQQ")   # struct cosm_msg (spec 7.1)
heartbeat = COSM.pack(CosmMsgId.HEARTBEAT, 0, 0)
bad_cosm = st.one_of(
    st.builds(lambda i, a, b: COSM.pack(i, a, b), st.integers(4, (1 << 64) - 1), u64, u64),          # unknown id
    st.builds(lambda s: COSM.pack(CosmMsgId.SHUTDOWN_STATUS, s, 0),
              st.one_of(st.just(0), st.integers(5, (1 << 64) - 1))),                               # bad status
    st.builds(lambda a, b: COSM.pack(CosmMsgId.SYNC_TIME, a, b), u64, u64),                       # host's own
    st.just(COSM.pack(CosmMsgId.SHUTDOWN, 0, 0)),
)


def test_hostile_cosm_messages_get_the_card_declared_crashed_once(cards):
    mic0, mic1 = cards

    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(good=st.integers(0, 3), bad=bad_cosm, tail=st.binary(max_size=48))
    def fuzz(good, bad, tail):
        online(mic0)
        before = broken_lines(mic0)
        mic0.card("hostile", op="cosm_send", data=(heartbeat * good + bad + tail).hex())
        wait_for(lambda: declared_crashed(mic0), "mic0 to be declared crashed")
        s = ctl(mic0, "status")
        assert s["shutdown_status"] == "crashed" and "COSM message" in s["broken"], s
        wait_for(lambda: not ctl(mic0, "status")["connected"], "mic0's COSM connection to close")
        assert broken_lines(mic0) - before == 1
        assert ctl(mic1, "status")["state"] == "online"
        hardening.fuzz_cases()

    fuzz()
    beating(mic1)
    online(mic0)


def test_half_a_cosm_message_gets_the_card_declared_crashed(cards):
    mic0, mic1 = cards
    online(mic0)
    before = broken_lines(mic0)
    mic0.card("kernel", action="hang")             # not another byte after these: no heartbeat completes them
    mic0.card("hostile", op="cosm_send", data=heartbeat[:10].hex())
    wait_for(lambda: declared_crashed(mic0), "mic0 to be declared crashed")
    assert "part of a cosm_msg" in ctl(mic0, "status")["broken"]
    assert broken_lines(mic0) - before == 1
    hardening.fault(ctl(mic1, "status")["state"] == "online")
    online(mic0)
