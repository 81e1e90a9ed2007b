"""SCIF: messages, rings, queue pairs and endpoints between a host and cards (spec 8).

The pair tests run a host node and card nodes in one process, wired through
shared bytearrays exactly as the memory is laid out on real hardware (see
:mod:`tests.scif_harness`). Every wait is bounded.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time

import pytest

from micdrv.memory import BufferMemory
from micdrv.scif import (POLLHUP, POLLIN, POLLOUT, SCIF_COSM_LISTEN_PORT, SCIF_ENDPT_QP_SIZE, SCIF_NODE_QP_SIZE,
                         SCIFEP_MAGIC, SCIFMSG_SIZE, EpState, PortId, QueuePair, Ring, RingError, ScifConnectionRefused,
                         ScifConnectionReset, ScifMemory, ScifMsg, ScifNodeDown, ScifNotConnected, ScifProtocolError,
                         ScifTimeout, U32Ptr, Uop)
from micdrv.scif.qp import (QP_INBOUND_SIZE, QP_LOCAL_BUF, QP_LOCAL_QP, QP_LOCAL_READ, QP_LOCAL_WRITE, QP_REMOTE_BUF,
                            QP_REMOTE_QP, read_qp)
from micdrv.scif.ring import circ_cnt, circ_space
from tests.scif_harness import SMPT_BASE, WAIT, Heap, System
from tests.sim_harness import wait_for

# --- struct scifmsg (spec 8.2) ---------------------------------------------------------


def test_scifmsg_is_the_packed_44_byte_kernel_struct():
    m = ScifMsg(Uop.CNCT_REQ, PortId(1, 1089), PortId(0, 201), (0x1122334455667788, 0x80_0001_0000, 3, 4))
    raw = m.encode()
    assert len(raw) == SCIFMSG_SIZE == 44
    assert struct.unpack_from("<HHHHI", raw) == (1, 1089, 0, 201, 9)
    assert struct.unpack_from("<4Q", raw, 12) == m.payload
    assert ScifMsg.decode(raw) == m


def test_uop_codes_and_kernel_names():
    assert len(Uop) == 39 and min(Uop) == 1 and max(Uop) == 39
    assert (Uop.INIT, Uop.EXIT_ACK, Uop.CNCT_REQ, Uop.CNCT_REJ, Uop.CLIENT_SENT, Uop.FREE_VIRT, Uop.SIG_NACK) == \
        (1, 3, 9, 13, 16, 28, 39)
    assert Uop.DISCNT_ACK.kernel_name == "SCIF_DISCNT_ACK"


@pytest.mark.parametrize("uop", [0, 40, 0xFFFFFFFF])
def test_a_message_with_an_unknown_uop_is_refused(uop):
    raw = struct.pack("<HHHHI4Q", 0, 0, 1, 0, uop, 0, 0, 0, 0)
    with pytest.raises(ScifProtocolError, match=f"unknown SCIF message uop {uop}"):
        ScifMsg.decode(raw)


def test_a_short_message_is_refused():
    with pytest.raises(ScifProtocolError, match="44 bytes"):
        ScifMsg.decode(bytes(43))


def test_a_field_too_wide_for_its_c_type_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        ScifMsg(Uop.INIT, PortId(70000, 0)).encode()


# --- the byte ring (spec 8.3) ------------------------------------------------------------

def local_ring(size=64):
    """A ring whose buffer and both offsets live in one bytearray (both ends in this test)."""
    mem = BufferMemory(bytearray(size + 64))
    rp, wp = U32Ptr(mem, size), U32Ptr(mem, size + 8)
    writer = Ring(mem, 0, size, read_ptr=rp, write_ptr=wp, name="writer")
    reader = Ring(mem, 0, size, read_ptr=rp, write_ptr=wp, name="reader")
    return mem, rp, wp, writer, reader


def test_circ_cnt_and_space_keep_one_byte_free():
    assert circ_space(0, 0, 64) == 63 and circ_cnt(0, 0, 64) == 0
    assert circ_space(63, 0, 64) == 0 and circ_cnt(63, 0, 64) == 63
    assert circ_cnt(2, 60, 64) == 6 and circ_space(2, 60, 64) == 57


def test_ring_wraps_around_and_keeps_order():
    _mem, _rp, _wp, w, r = local_ring(64)
    rng = random.Random(1)
    expect = bytearray()
    got = bytearray()
    for _ in range(500):
        if rng.random() < 0.5:
            chunk = os.urandom(rng.randint(1, 40))
            if w.write(chunk):
                w.commit()
                expect += chunk
        else:
            n = rng.randint(1, 40)
            data = r.read(n)
            if data is not None:
                r.update_read_ptr()
                got += data
    while (data := r.read(1)) is not None:
        got += data
    assert got == expect and len(expect) > 64 * 10  # wrapped many times


def test_ring_full_and_empty():
    _mem, _rp, _wp, w, r = local_ring(64)
    assert r.read(1) is None  # empty
    assert w.write(bytes(range(63)))  # size-1 bytes: full
    assert not w.write(b"x")
    w.commit()
    assert r.count() == 63
    assert r.read(63) == bytes(range(63))
    assert r.read(1) is None
    r.update_read_ptr()
    assert w.space() == 63


def test_nothing_is_visible_before_commit_and_no_space_before_the_read_pointer_moves():
    _mem, _rp, _wp, w, r = local_ring(64)
    assert w.write(b"hello")
    assert r.read(5) is None
    w.commit()
    assert r.read(5) == b"hello"
    assert w.space() == 58  # reader has not published yet
    r.update_read_ptr()
    assert w.space() == 63


def test_a_message_larger_than_the_ring_is_refused():
    _mem, _rp, _wp, w, r = local_ring(64)
    with pytest.raises(ValueError, match="can never fit"):
        w.write(bytes(64))
    with pytest.raises(ValueError, match="can never be satisfied"):
        r.read(64)


def test_a_peer_write_offset_beyond_the_ring_is_rejected():
    _mem, _rp, wp, _w, r = local_ring(64)
    wp.store(64)
    with pytest.raises(RingError, match="peer write offset 0x40 is outside the 0x40-byte ring"):
        r.read(1)
    wp.store(0xFFFFFFFF)
    with pytest.raises(RingError):
        r.count()


def test_a_peer_write_offset_moving_back_over_unread_data_is_rejected():
    _mem, _rp, wp, w, r = local_ring(64)
    assert w.write(bytes(20))
    w.commit()
    assert r.count(20) == 20
    wp.store(10)
    with pytest.raises(RingError, match="moved back"):
        r.count(30)


def test_a_peer_read_offset_beyond_what_was_written_is_rejected():
    _mem, rp, _wp, w, _r = local_ring(64)
    assert w.write(bytes(10))
    w.commit()
    rp.store(11)
    with pytest.raises(RingError, match="passes the write offset"):
        w.space()
    rp.store(1000)
    with pytest.raises(RingError, match="outside"):
        w.write(b"x")


def test_a_ring_size_must_be_a_power_of_two():
    mem = BufferMemory(bytearray(256))
    with pytest.raises(ValueError, match="power of two"):
        Ring(mem, 0, 96, read_ptr=None, write_ptr=None)


def test_the_card_publishes_every_pointer_twice():
    """X100 erratum (spec 8.3): with double_publish every offset is stored twice."""
    stores = []

    class Recording(BufferMemory):
        def write_u32(self, addr, value):
            stores.append((addr, value))
            super().write_u32(addr, value)

    mem = Recording(bytearray(128))
    ring = Ring(mem, 0, 64, read_ptr=U32Ptr(mem, 72), write_ptr=U32Ptr(mem, 64), double_publish=True)
    ring.write(b"abc")
    ring.commit()
    assert ring.read(3) == b"abc"
    ring.update_read_ptr()
    assert stores == [(64, 3), (64, 3), (72, 3), (72, 3)]


# --- struct scif_qp (spec 8.3) ---------------------------------------------------------------

def two_memories():
    """Host RAM and card GDDR as in the harness, each side with its ScifMemory."""
    host, card = bytearray(1 << 20), bytearray(1 << 20)
    hh, ch = Heap(0x1000, 1 << 20), Heap(0x1000, 1 << 20)
    hmem, cmem = BufferMemory(host), BufferMemory(card)
    host_side = ScifMemory(hmem, BufferMemory(card), hh.alloc, hh.free, to_peer=lambda a, n: SMPT_BASE + a,
                           name="host")
    card_side = ScifMemory(cmem, BufferMemory(host, SMPT_BASE), ch.alloc, ch.free, name="card")
    return hmem, cmem, host_side, card_side, hh, ch


def test_qp_layout_is_the_kernel_struct():
    hmem, _cmem, host_side, _card_side, _hh, _ch = two_memories()
    qp = QueuePair(host_side, SCIF_NODE_QP_SIZE)
    base = qp.qp_buf.addr
    assert hmem.read_u64(base) == SCIFEP_MAGIC == 0x5C1F000000005C1F
    assert hmem.read_u32(base + QP_INBOUND_SIZE) == SCIF_NODE_QP_SIZE and QP_INBOUND_SIZE == 72
    assert hmem.read_u64(base + QP_LOCAL_BUF) == SMPT_BASE + qp.ring_buf.addr  # what the card uses
    assert hmem.read_u64(base + QP_LOCAL_QP) == qp.dma_addr == SMPT_BASE + base
    assert (QP_LOCAL_WRITE, QP_LOCAL_READ, QP_REMOTE_QP, QP_LOCAL_BUF, QP_LOCAL_QP, QP_REMOTE_BUF) == \
        (128, 192, 200, 208, 216, 224)


def test_connect_and_accept_wire_the_rings_as_spec_8_3_describes():
    hmem, cmem, host_side, card_side, _hh, _ch = two_memories()
    card = QueuePair(card_side, SCIF_ENDPT_QP_SIZE, double_publish=True)     # scif_setup_qp_connect
    host = QueuePair.accept(host_side, SCIF_ENDPT_QP_SIZE, card.dma_addr)   # scif_setup_qp_accept
    card.connect(host.dma_addr)                                            # ..._connect_response
    hq, cq = read_qp(hmem, host.qp_buf.addr), read_qp(cmem, card.qp_buf.addr)
    assert hq["remote_qp"] == card.dma_addr and cq["remote_qp"] == host.dma_addr
    assert hq["remote_buf"] == cq["local_buf"] and cq["remote_buf"] == hq["local_buf"]
    # Each outbound ring is the other's inbound buffer; each side loads only its own QP.
    assert host.outbound.base == card.ring_buf.dma_addr and card.outbound.base == host.ring_buf.dma_addr
    assert host.outbound.read_ptr.mem is host.local and card.outbound.read_ptr.mem is card.local
    assert host.inbound.write_ptr.mem is host.local and card.inbound.write_ptr.mem is card.local
    assert host.outbound.write(b"to the card")
    host.outbound.commit()
    assert cq["local_write"] == 0 and read_qp(cmem, card.qp_buf.addr)["local_write"] == 11
    assert card.inbound.read(11) == b"to the card"
    card.inbound.update_read_ptr()
    assert read_qp(hmem, host.qp_buf.addr)["local_read"] == 11


def test_a_peer_qp_without_the_magic_is_refused():
    _hmem, cmem, host_side, card_side, _hh, _ch = two_memories()
    card = QueuePair(card_side, SCIF_ENDPT_QP_SIZE)
    cmem.write_u64(card.qp_buf.addr, 0x1234)
    with pytest.raises(ScifProtocolError, match="SCIFEP_MAGIC mismatch"):
        QueuePair.accept(host_side, SCIF_ENDPT_QP_SIZE, card.dma_addr)


@pytest.mark.parametrize("field,value,match", [
    (QP_LOCAL_BUF, 0xFFFF_0000, "not reachable"),             # a ring outside card memory
    (QP_INBOUND_SIZE, 3000, "not a power of two"),
    (QP_INBOUND_SIZE, 1 << 30, "not a power of two"),
])
def test_peer_qp_fields_are_validated_before_mapping(field, value, match):
    _hmem, cmem, host_side, card_side, _hh, _ch = two_memories()
    card = QueuePair(card_side, SCIF_ENDPT_QP_SIZE)
    (cmem.write_u32 if field == QP_INBOUND_SIZE else cmem.write_u64)(card.qp_buf.addr + field, value)
    with pytest.raises(ScifProtocolError, match=match):
        QueuePair.accept(host_side, SCIF_ENDPT_QP_SIZE, card.dma_addr)


def test_a_peer_qp_address_outside_reachable_memory_is_refused():
    _hmem, _cmem, host_side, _card_side, _hh, _ch = two_memories()
    with pytest.raises(ScifProtocolError, match="not reachable"):
        QueuePair.accept(host_side, SCIF_ENDPT_QP_SIZE, (1 << 20) - 8)


def test_a_closed_queue_pair_gives_its_memory_back():
    _hmem, _cmem, host_side, card_side, hh, ch = two_memories()
    card = QueuePair(card_side, SCIF_ENDPT_QP_SIZE)
    host = QueuePair.accept(host_side, SCIF_ENDPT_QP_SIZE, card.dma_addr)
    host.close()
    card.close()
    assert hh.live == 0 and ch.live == 0


# --- node queue pair bring-up through the device page (spec 8.4) -------------------------------

@pytest.fixture
def system():
    s = System(ncards=1)
    yield s
    s.close()
    assert not s.irq_errors()


@pytest.fixture
def booted(system):
    system.boot(0)
    return system


def test_node_qp_bring_up_makes_both_nodes_alive(booted):
    host, card = booted.host, booted.cards[0]
    assert host.alive_peers() == [1] and card.node.alive_peers() == [0]
    bp = card.host_bp
    assert bp.node_id == 1 and bp.c2h_scif_db == 0 and bp.h2c_scif_db == 0
    assert bp.scif_host_dma_addr == card.host_qp.dma_addr and bp.scif_card_dma_addr == card.card_qp.dma_addr
    hq = read_qp(booted.host_mem, card.host_qp.qp_buf.addr)
    assert hq["remote_qp"] == card.card_qp.dma_addr and hq["inbound_q.size"] == SCIF_NODE_QP_SIZE
    assert card.host_qp.received == 1 and card.card_qp.received == 1  # one SCIF_INIT each way


def test_nobody_reads_across_pcie_once_connected(booted):
    host, card = booted.host, booted.cards[0]
    lep = host.listen(SCIF_COSM_LISTEN_PORT)
    box = {}
    t = threading.Thread(target=lambda: box.update(ep=lep.accept(timeout=WAIT)), daemon=True)
    t.start()
    cep = card.node.connect(0, SCIF_COSM_LISTEN_PORT, timeout=WAIT)
    t.join(WAIT)
    hep = box["ep"]
    card.bar0.reads = card.smpt.reads = 0
    payload = os.urandom(20000)
    sender = threading.Thread(target=lambda: cep.send(payload, timeout=WAIT), daemon=True)
    sender.start()
    assert hep.recv(len(payload), timeout=WAIT) == payload
    sender.join(WAIT)
    hep.send(b"pong", timeout=WAIT)
    assert cep.recv(4, timeout=WAIT) == b"pong"
    assert card.bar0.reads == 0, "the host loaded card memory"
    assert card.smpt.reads == 0, "the card loaded host memory"


# --- endpoints (spec 8.5) --------------------------------------------------------------------

def connect_pair(system, k=0, port=SCIF_COSM_LISTEN_PORT):
    """Host listens on ``port``, card k connects: (listener, host endpoint, card endpoint)."""
    host, card = system.host, system.cards[k]
    lep = host.listen(port) if port not in host.listeners else host.listeners[port]
    box = {}

    def accept():
        try:
            box["ep"] = lep.accept(timeout=WAIT)
        except BaseException as e:
            box["err"] = e

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    cep = card.node.connect(0, port, timeout=WAIT)
    t.join(WAIT)
    assert "err" not in box, box.get("err")
    return lep, box["ep"], cep


def test_card_connects_to_the_host_cosm_port(booted):
    lep, hep, cep = connect_pair(booted)
    assert hep.state is EpState.CONNECTED and cep.state is EpState.CONNECTED
    assert hep.port == PortId(0, 201) and cep.peer == PortId(0, 201)
    assert hep.peer == cep.port and cep.port.node == 1 and cep.port.port > 1088  # ephemeral (scif_get_new_port)
    assert hep.remote_ep == cep.cookie and cep.remote_ep == hep.cookie


def test_bidirectional_streams_larger_than_the_endpoint_ring(booted):
    _lep, hep, cep = connect_pair(booted)
    rng = random.Random(7)
    up = [os.urandom(rng.randint(1, 9000)) for _ in range(30)]
    down = [os.urandom(rng.randint(1, 9000)) for _ in range(30)]
    assert sum(map(len, up)) > 20 * SCIF_ENDPT_QP_SIZE
    got = {"up": bytearray(), "down": bytearray()}

    def pump(ep, chunks):
        for c in chunks:
            ep.send(c, timeout=WAIT)

    def drain(ep, total, key):
        while len(got[key]) < total:
            got[key] += ep.recv(min(rng.randint(1, 7000), total - len(got[key])), timeout=WAIT)

    ts = [threading.Thread(target=pump, args=(cep, up)), threading.Thread(target=pump, args=(hep, down)),
          threading.Thread(target=drain, args=(hep, sum(map(len, up)), "up")),
          threading.Thread(target=drain, args=(cep, sum(map(len, down)), "down"))]
    for t in ts:
        t.daemon = True
        t.start()
    for t in ts:
        t.join(4 * WAIT)
        assert not t.is_alive(), "transfer stalled"
    assert got["up"] == b"".join(up) and got["down"] == b"".join(down)
    assert hep.bytes_received == cep.bytes_sent == sum(map(len, up))


def test_a_sender_blocks_while_the_ring_is_full_then_times_out(booted):
    _lep, hep, cep = connect_pair(booted)
    assert cep.send_nowait(bytes(10000)) == SCIF_ENDPT_QP_SIZE - 1  # one byte always free
    assert cep.poll(POLLOUT, 0) == 0
    with pytest.raises(ScifTimeout) as e:
        cep.send(b"more", timeout=0.1)
    assert e.value.sent == 0
    assert hep.poll(POLLIN, WAIT) & POLLIN
    hep.recv(100, timeout=WAIT)
    assert cep.poll(POLLOUT, WAIT) & POLLOUT  # CLIENT_RCVD woke it
    assert cep.send(b"more", timeout=WAIT) == 4


def test_recv_timeout_loses_nothing(booted):
    _lep, hep, cep = connect_pair(booted)
    cep.send(b"abc", timeout=WAIT)
    with pytest.raises(ScifTimeout):
        hep.recv(10, timeout=0.2)
    cep.send(b"defghij", timeout=WAIT)
    assert hep.recv(10, timeout=WAIT) == b"abcdefghij"
    assert hep.recv_nowait(10) == b""


def test_on_event_fires_when_data_arrives(booted):
    _lep, hep, cep = connect_pair(booted)
    seen = threading.Event()
    hep.on_event = lambda ep: seen.set()
    cep.send(b"x", timeout=WAIT)
    assert seen.wait(WAIT)
    assert hep.poll(POLLIN) == POLLIN


def test_connect_to_a_port_nobody_listens_on_is_refused(booted):
    with pytest.raises(ScifConnectionRefused, match="CNCT_REJ"):
        booted.cards[0].node.connect(0, 4242, timeout=WAIT)
    assert booted.cards[0].node.endpoints() == []  # the failed endpoint was freed


def test_a_full_backlog_rejects_further_requests(booted):
    host, card = booted.host, booted.cards[0]
    lep = host.listen(300, backlog=1)
    first = card.node.open()
    t = threading.Thread(target=lambda: pytest.raises(Exception, first.connect, 0, 300, timeout=1.0), daemon=True)
    t.start()
    assert lep.poll(POLLIN, WAIT) & POLLIN  # the first request is queued, not accepted
    with pytest.raises(ScifConnectionRefused):
        card.node.connect(0, 300, timeout=WAIT)
    t.join(WAIT)


def test_closing_a_listener_rejects_its_pending_requests(booted):
    host, card = booted.host, booted.cards[0]
    lep = host.listen(301)
    box = {}

    def connect():
        try:
            card.node.connect(0, 301, timeout=WAIT)
        except BaseException as e:
            box["err"] = e

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    assert lep.poll(POLLIN, WAIT) & POLLIN
    lep.close()
    t.join(WAIT)
    assert isinstance(box.get("err"), ScifConnectionRefused)


def test_accept_times_out_and_a_closed_listener_wakes_accept(booted):
    lep = booted.host.listen(302)
    with pytest.raises(ScifTimeout):
        lep.accept(timeout=0.05)
    box = {}
    t = threading.Thread(target=lambda: box.update(r=pytest.raises(ScifNotConnected, lep.accept, timeout=WAIT)),
                         daemon=True)
    t.start()
    time.sleep(0.05)
    lep.close()
    t.join(WAIT)
    assert not t.is_alive() and "r" in box


def test_a_port_can_only_be_bound_once(booted):
    booted.host.listen(400)
    from micdrv.scif import ScifAddressInUse
    with pytest.raises(ScifAddressInUse):
        booted.host.listen(400)


def test_connect_to_a_node_that_is_not_alive_fails_at_once(system):
    node = system.host
    with pytest.raises(ScifNodeDown):
        node.connect(5, 201, timeout=WAIT)


def test_disconnect_leaves_unread_data_readable_then_reports_reset(booted):
    _lep, hep, cep = connect_pair(booted)
    cep.send(b"last words", timeout=WAIT)
    cep.close(timeout=WAIT)
    assert cep.state is EpState.CLOSED
    assert hep.poll(POLLIN, WAIT) & POLLHUP
    assert hep.state is EpState.DISCONNECTED
    assert hep.recv(100, timeout=WAIT) == b"last words"  # short read: the peer is gone
    with pytest.raises(ScifConnectionReset):
        hep.recv(1, timeout=WAIT)
    with pytest.raises(ScifConnectionReset):
        hep.send(b"x", timeout=WAIT)
    hep.close(timeout=WAIT)


def test_close_wakes_a_blocked_receiver(booted):
    _lep, hep, _cep = connect_pair(booted)
    box = {}

    def reader():
        try:
            hep.recv(10, timeout=WAIT)
        except BaseException as e:
            box["err"] = e

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(0.05)
    hep.close(timeout=WAIT)
    t.join(WAIT)
    assert isinstance(box.get("err"), ScifNotConnected)


def test_endpoints_and_queue_memory_are_freed_after_close(booted):
    host, card = booted.host, booted.cards[0]
    host_live, card_live = booted.host_heap.live, card.heap.live
    for _ in range(20):
        _lep, hep, cep = connect_pair(booted)
        t = threading.Thread(target=cep.send, args=(b"x" * 5000,), kwargs={"timeout": WAIT}, daemon=True)
        t.start()
        assert hep.recv(5000, timeout=WAIT) == b"x" * 5000
        t.join(WAIT)
        cep.close(timeout=WAIT)
        hep.close(timeout=WAIT)
    assert [e.state for e in host.endpoints()] == [EpState.LISTENING]
    assert card.node.endpoints() == []
    assert booted.host_heap.live == host_live and card.heap.live == card_live


# --- hostile peers ---------------------------------------------------------------------------

def test_a_bogus_cnct_req_is_rejected_and_accept_reports_it(booted):
    host, card = booted.host, booted.cards[0]
    lep = host.listen(500)
    card.node.send_msg(0, ScifMsg(Uop.CNCT_REQ, PortId(1, 2000), PortId(0, 500), (1234, 0xFFFF_FFFF_0000, 0, 0)))
    with pytest.raises(ScifProtocolError, match="not reachable"):
        lep.accept(timeout=WAIT)
    # The listener still works.
    _lep, hep, cep = connect_pair(booted, port=500)
    assert hep.state is EpState.CONNECTED


def test_messages_naming_unknown_cookies_are_ignored(booted):
    _lep, hep, cep = connect_pair(booted)
    node = booted.cards[0].node
    for uop in (Uop.CNCT_GNT, Uop.CNCT_GNTACK, Uop.CNCT_REJ, Uop.DISCNT_ACK, Uop.CLIENT_SENT, Uop.CLIENT_RCVD):
        node.send_msg(0, ScifMsg(uop, payload=(0xBAD, 0, 0, 0)))
    node.send_msg(0, ScifMsg(Uop.DISCNCT, payload=(0xBAD, hep.cookie, 0, 0)))  # right ep, wrong peer cookie
    cep.send(b"still fine", timeout=WAIT)
    assert hep.recv(10, timeout=WAIT) == b"still fine"
    assert hep.state is EpState.CONNECTED


def test_an_unknown_uop_in_the_node_queue_is_skipped(booted):
    card = booted.cards[0]
    ring = card.card_qp.outbound
    assert ring.write(struct.pack("<HHHHI4Q", 1, 0, 0, 0, 77, 0, 0, 0, 0))
    ring.commit()
    card.host_irq.ring()
    _lep, hep, _cep = connect_pair(booted)  # later messages still flow
    assert hep.state is EpState.CONNECTED


def test_a_corrupted_node_queue_pointer_makes_the_host_give_the_card_up(booted):
    host, card = booted.host, booted.cards[0]
    _lep, hep, _cep = connect_pair(booted)
    host_qp = card.host_qp
    # The card writes a write offset beyond the host's 64 KiB ring into the host's QP.
    card.smpt.write_u32(SMPT_BASE + host_qp.qp_buf.addr + QP_LOCAL_WRITE, SCIF_NODE_QP_SIZE + 44)
    card.host_irq.ring()
    assert hep.poll(POLLIN, WAIT) & POLLHUP
    assert host.alive_peers() == []


def test_a_stray_exit_ack_does_not_stand_for_the_answer_to_a_later_exit(booted):
    host, card = booted.host, booted.cards[0]
    card.node.send_msg(0, ScifMsg(Uop.EXIT_ACK, PortId(1, 0), PortId(0, 0)))   # answering nothing
    wait_for(lambda: host.peer(1).link.received >= 2, "the host to take the stray SCIF_EXIT_ACK")
    assert not host.peer(1).exit_acked.is_set()
    # Removal waits for the card's own answer: by then the card has left (its QP reset), so nothing the
    # card still writes can land in a queue pair the host freed.
    assert host.remove_peer(1, timeout=WAIT) is True
    assert not card.node.peer(0).qp_ready


# --- node teardown (spec 8.4 step 6) -----------------------------------------------------------

def test_card_initiated_exit(booted):
    host, card = booted.host, booted.cards[0]
    _lep, hep, cep = connect_pair(booted)
    from micdrv.scif import Side, unpublish_qp
    unpublish_qp(card.card_bp, Side.CARD)
    assert card.node.remove_peer(0, timeout=WAIT) is True  # SCIF_EXIT answered by SCIF_EXIT_ACK
    assert cep.state is EpState.DISCONNECTED and hep.poll(0, WAIT) & POLLHUP
    assert card.node.alive_peers() == [] and host.alive_peers() == []
    peer = host.peer(1)
    assert peer is not None and not peer.qp_ready  # the host keeps its QP and waits for the card to return
    assert card.card_bp.h2c_scif_db == -1 and card.card_bp.scif_card_dma_addr == 0


def test_host_initiated_exit(booted):
    host, card = booted.host, booted.cards[0]
    _lep, hep, cep = connect_pair(booted)
    assert host.remove_peer(1, timeout=WAIT) is True
    assert hep.state is EpState.DISCONNECTED
    assert cep.poll(0, WAIT) & POLLHUP
    assert host.peer(1) is None and card.node.alive_peers() == []
    with pytest.raises(ScifNodeDown):
        card.node.connect(0, SCIF_COSM_LISTEN_PORT, timeout=WAIT)


def test_removing_an_unresponsive_card_times_out_and_still_cleans_up(booted):
    host, card = booted.host, booted.cards[0]
    card.card_irq.handler = None  # the card hangs
    t0 = time.monotonic()
    assert host.remove_peer(1, timeout=0.2) is False
    assert time.monotonic() - t0 < 2
    assert host.peer(1) is None


def test_node_remove_reaches_the_other_cards():
    s = System(ncards=2)
    try:
        s.boot(0)
        s.boot(1)
        seen = []
        other = s.cards[1].node
        orig = other.dispatch
        other.dispatch = lambda n, m: (seen.append(m.uop), orig(n, m))
        assert s.host.remove_peer(1, timeout=WAIT)
        assert Uop.NODE_REMOVE in seen  # card 2 was told, and acknowledged (host waited for it)
        assert s.host.alive_peers() == [2]
        _lep, hep, cep = connect_pair(s, k=1)
        assert hep.peer.node == 2
        assert s.cards[1].node.get_node_info(timeout=WAIT) == (2, 2)  # maxid 2, host + one card
    finally:
        s.close()
    assert not s.irq_errors()


def test_a_card_can_come_back_after_exit(booted):
    host, card = booted.host, booted.cards[0]
    card.node.remove_peer(0, timeout=WAIT)
    host.remove_peer(1, timeout=WAIT)
    booted.boot(0)
    _lep, hep, cep = connect_pair(booted)
    cep.send(b"again", timeout=WAIT)
    assert hep.recv(5, timeout=WAIT) == b"again"



def test_device_page_handshake_validates_the_peer_doorbell():
    from micdrv.bootparam import Bootparam
    from micdrv.scif import Side, peer_qp, publish_qp, unpublish_qp
    bp = Bootparam(BufferMemory(bytearray(64)))
    bp.init(1)
    assert peer_qp(bp, Side.HOST) is None and peer_qp(bp, Side.CARD) is None
    publish_qp(bp, Side.CARD, 0x1000, db=15)
    assert peer_qp(bp, Side.HOST) == (0x1000, 15)
    bp.c2h_scif_db = 9  # a card->host doorbell the host does not have (spec 1.3: 0..3)
    bp.scif_host_dma_addr = 0x80_0000_2000
    with pytest.raises(ScifProtocolError, match="c2h_scif_db"):
        peer_qp(bp, Side.CARD)
    with pytest.raises(ValueError):
        publish_qp(bp, Side.HOST, 0x2000, db=4)
    unpublish_qp(bp, Side.CARD)
    assert peer_qp(bp, Side.HOST) is None


def raw_cnct_req(card, port):
    """A CNCT_REQ from a hand-made card endpoint QP, bypassing the card's endpoint state machine."""
    qp = QueuePair(card.card_scif_memory, SCIF_ENDPT_QP_SIZE)
    grants = []
    orig = card.node.dispatch
    card.node.dispatch = lambda n, m: grants.append(m) if m.uop == Uop.CNCT_GNT else orig(n, m)
    card.node.send_msg(0, ScifMsg(Uop.CNCT_REQ, PortId(1, 3000), PortId(0, port), (0x5EED, qp.dma_addr, 0, 0)))
    return qp, grants


def test_a_grant_never_acknowledged_times_out(booted):
    host, card = booted.host, booted.cards[0]
    host.alive_timeout = 0.3
    lep = host.listen(600)
    raw_cnct_req(card, 600)
    with pytest.raises(ScifTimeout, match="never answered CNCT_GNT"):
        lep.accept(timeout=WAIT)
    assert [e.state for e in host.endpoints()] == [EpState.LISTENING]  # the half-open endpoint is gone


def test_a_nacked_grant_is_dropped_and_accept_waits_on(booted):
    host, card = booted.host, booted.cards[0]
    lep = host.listen(601)
    _qp, grants = raw_cnct_req(card, 601)
    box = {}
    t = threading.Thread(target=lambda: box.update(r=pytest.raises(ScifTimeout, lep.accept, timeout=1.0)),
                         daemon=True)
    t.start()
    deadline = time.monotonic() + WAIT
    while not grants and time.monotonic() < deadline:
        time.sleep(0.01)
    gnt = grants[0]
    assert gnt.payload[0] == 0x5EED and gnt.src == PortId(0, 601)
    card.node.send_msg(0, ScifMsg(Uop.CNCT_GNTNACK, PortId(1, 3000), PortId(0, 601), (gnt.payload[2], 0, 0, 0)))
    t.join(WAIT)
    assert "r" in box  # accept went on waiting after the NACK, then timed out
    assert [e.state for e in host.endpoints()] == [EpState.LISTENING]


def test_the_host_can_connect_to_a_listener_on_the_card(booted):
    """Same code both ways: here the card accepts and the host connects."""
    card = booted.cards[0]
    lep = card.node.listen(700)
    box = {}
    t = threading.Thread(target=lambda: box.update(ep=lep.accept(timeout=WAIT)), daemon=True)
    t.start()
    hep = booted.host.connect(1, 700, timeout=WAIT)
    t.join(WAIT)
    cep = box["ep"]
    assert hep.peer == PortId(1, 700) and cep.peer == hep.port
    payload = os.urandom(3 * SCIF_ENDPT_QP_SIZE)
    t = threading.Thread(target=hep.send, args=(payload,), kwargs={"timeout": WAIT}, daemon=True)
    t.start()
    assert cep.recv(len(payload), timeout=WAIT) == payload
    t.join(WAIT)
    hep.close(timeout=WAIT)
    assert cep.poll(POLLIN, WAIT) & POLLHUP
