"""A VOP queue's chains given back and its staging per chunk (micdrv/vop/queue.py), in process.

Over the lazy queue rig of :mod:`tests.test_vop_lazy` (card memory and rings as BufferMemory, a DMA the test
settles by hand). What is checked: chains a drain gives back stay taken and staged and come back first, in
order, before anything new; kicks are not re-enabled over them; a reset releases them; a chunk of chains
shares one staging piece, free once its last chain is; what goes through BAR0 is copied, and its staging
freed, when the batch completes, while its used entries still wait for the drain's end.
"""

from __future__ import annotations

from micdrv.vop.copy import CopyEngine, CopyPolicy
from tests.test_vop_lazy import BUF, NUM, _Rig


def test_chains_given_back_stay_taken_and_come_back_first_in_order():
    r = _Rig()
    q = r.q
    chains = q.pop_many(6)
    q.abandon(chains[4:])                           # a drain stopped after 4
    assert q.vring.in_flight == 6                   # still taken from the ring (not used)
    assert q.status()["kept"] == 2
    q.complete_many(r.fill(chains[:4], 1))
    again = q.pop_many(8)
    assert again == chains[4:]                      # the same chains, staged as they were, and nothing new
    q.abandon(again[1:])
    assert q.pop_many(8) == chains[5:]
    fresh = q.pop_many(NUM)
    assert len(fresh) == NUM - 6 and not {c.head for c in fresh} & {c.head for c in chains}


def test_kicks_stay_off_while_chains_are_kept():
    r = _Rig()
    q = r.q
    chains = q.pop_many(NUM)                        # the ring is empty now
    q.abandon(chains[-1:])
    assert q.enable_notify() is False               # a drain would take the kept chain, not sleep
    q.complete_many(r.fill(q.pop_many(1), 2))
    assert q.enable_notify() is True


def test_a_reset_releases_kept_chains():
    r = _Rig()
    q = r.q
    chains = q.pop_many(5)
    q.abandon(chains[2:])
    q.release_all()
    assert q.status()["kept"] == 0 and q.status()["staging"]["allocated"] == 0


def test_a_chunk_shares_one_staging_piece_freed_with_its_last_chain():
    r = _Rig()
    q = r.q
    chains = q.pop_many(4)
    ring = q.staging.ring
    assert ring.in_use == 1 and ring.allocated == 4 * BUF
    q.complete_many(r.fill(chains[:3], 3))
    for c in r.dma.submitted:
        c.settle()
    q.outgoing(1.0)
    assert ring.allocated == 4 * BUF                # the fourth still uses the piece
    assert len(r.drv.get_used_many(NUM)) == 3
    q.complete_many(r.fill(chains[3:], 4))
    for c in r.dma.submitted:
        c.settle()
    q.outgoing(1.0)
    assert ring.allocated == 0 and ring.in_use == 0
    assert r.card.read(r.bufs[3], 4) == b"\x04" * 4


def test_bar0_copies_leave_and_free_their_staging_at_completion_used_entries_at_the_drains_end():
    r = _Rig()
    q = r.q
    q.engine = CopyEngine(r.card, r.dma, CopyPolicy(h2c_dma=False))   # every piece through BAR0
    q.complete_deferred(r.fill(q.pop_many(4), 0x5A))
    assert r.card.read(r.bufs[0], 4) == b"\x5a" * 4  # on the card already
    assert q.staging.ring.allocated == 0            # and its staging free
    assert r.drv.get_used_many(NUM) == []           # but not published before the drain ends
    q.flush()
    assert [n for _t, n in r.drv.get_used_many(NUM)] == [BUF] * 4
    assert r.dma.submitted == []


def test_a_split_plan_copies_inside_card_memory_and_refuses_outside():
    import pytest
    from micdrv.memory import BufferMemory, MemoryAccessError
    card = BufferMemory(bytearray(4096), base=0x1000, name="card")
    engine = CopyEngine(card, None)                  # no DMA: every piece through BAR0
    staging = memoryview(bytearray(b"\x11" * 64 + b"\x22" * 64))
    inside = engine.split_plan([(0x1010, 8, 8, 64)])
    assert engine.write_out_split([(0, inside)], staging, 0) == []
    assert card.read(0x1010, 8) == b"\x22" * 8 and card.read(0x1008, 8) == b"\0" * 8
    assert engine.counters["h2c_bar0_bytes"] == 8 and engine.counters["h2c_unaligned_dst_bytes"] == 8
    outside = engine.split_plan([(0x1ffc, 8, 8, 0)])  # runs past the end of card memory
    with pytest.raises(MemoryAccessError):
        engine.write_out_split([(0, outside)], staging, 0)
