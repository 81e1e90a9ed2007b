"""SCIF: messages, rings, queue pairs and endpoints between a host and cards (spec 8).

Queue pairs are built between host memory and card memory laid out as on
real hardware: the host hands out SMPT addresses, the card GDDR offsets.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from micdrv.memory import BufferMemory
from micdrv.scif import (SCIF_ENDPT_QP_SIZE, SCIF_NODE_QP_SIZE, SCIFEP_MAGIC, SCIFMSG_SIZE, PortId, QueuePair, Ring,
                         RingError, ScifMemory, ScifMsg, ScifProtocolError, U32Ptr, Uop)
from micdrv.scif.qp import (QP_INBOUND_SIZE, QP_LOCAL_BUF, QP_LOCAL_QP, QP_LOCAL_READ, QP_LOCAL_WRITE, QP_REMOTE_BUF,
                            QP_REMOTE_QP, read_qp)
from micdrv.scif.ring import circ_cnt, circ_space

SMPT_BASE = 0x80_0000_0000  # host IOVA a is card address 0x80_0000_0000 + a (spec 2.4)


class Heap:
    """Bump allocator that counts live allocations."""

    def __init__(self, start, end):
        self.next, self.end, self.live = start, end, 0

    def alloc(self, size):
        a, self.next = self.next, self.next + -(-size // 64) * 64
        assert self.next <= self.end
        self.live += 1
        return a

    def free(self, addr, size):
        self.live -= 1

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
