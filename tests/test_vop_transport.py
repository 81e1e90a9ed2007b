"""VOP end to end over vfio-user: MicDevice's VOP host against the simulated card's VOP driver (spec 5).

The card runs ``python -m micdrv.sim`` with the small test drivers of
:mod:`tests.vop_card_drivers` (an echoing console, a block prober); the
host side is :class:`micdrv.mic.MicDevice` with the real console and block
backends. What is checked: the device page entry as spec 5.3 lays it out,
the card's scan and probe, the copy paths of spec 5.7 byte for byte (DMA
aligned, DMA widened from unaligned card addresses, BAR0 for what cannot be
DMAed), the remove / config change / reset hand-shakes, both
``_mic_vring_info`` placements and the card's magic check catching a
mismatch, and the drain and notification counters.
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import struct
import time

import pytest

from backends.blk import BlkBackend
from backends.console import ConsoleBackend
from backends.net.device import STAGING_BYTES as NET_STAGING
from backends.net.device import NetBackend
from micdrv.virtio.device import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
                                  VIRTIO_CONFIG_S_FAILED)
from micdrv.vop import layout as L
from micdrv.vop.copy import CopyPolicy
from micdrv.vop.host import STAGING_BYTES, VopOptions
from micdrv.x100 import regs
from tests.sim_harness import wait_for
from tests.vop_card_drivers import pattern
from tests.vop_harness import WAIT, Rig, VopSim, echo

LIVE = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK


@pytest.fixture(scope="module")
def vs(tmp_path_factory):
    s = VopSim(tmp_path_factory.mktemp("vop"))
    yield s
    s.close()


@pytest.fixture
def rig(vs):
    vs.configure()
    r = Rig(vs)
    yield r
    r.close()


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(4 << 20))
    return p


def raw_page(rig) -> bytes:
    page = rig.mic.device_page
    return page.memory.read(page.iova, L.MIC_DP_SIZE)


# --- device add (spec 5.3) and the card's scan (spec 5.2, 5.4) ----------------------------------------
def test_an_added_device_is_laid_out_as_spec_5_3_and_the_card_probes_it(rig, vs):
    dev, fd = rig.console()
    os.close(fd)
    raw = raw_page(rig)
    off = dev.entry.offset
    assert off == L.DEVICE_DESC_OFFSET
    typ, num_vq, flen, clen = struct.unpack_from("<bBBB", raw, off)
    assert (typ, num_vq, flen, clen) == (3, 2, 4, 12)
    ctrl = off + L.aligned_desc_size(2, 4, 12)
    c2h, h2c = struct.unpack_from("<bb", raw, ctrl + L.CTRL_C2H_VDEV_DB)
    assert c2h == dev.db and 0 <= c2h < 4
    # The host activates the device on the card's DRIVER_OK, which the card writes before it records the probe
    # as done: wait for that record.
    card = wait_for(lambda: (c := vs.card_device(off))["state"] == "probed" and c, "the card's probe to finish", WAIT)
    assert card["h2c_db"] == h2c and card["c2h_db"] == c2h
    assert card["status"] == LIVE
    for i, vr in enumerate(dev.vrings):
        addr, used, num = struct.unpack_from("<QQH", raw, off + 8 + 24 * i)
        assert addr == rig.mic.card.smpt.to_card(vr.iova, L.vring_bytes(num)) and num == 128
        assert addr >= regs.SYSTEM_WINDOW and 0 < used < rig.mic.memory_size   # the card's used ring, GDDR
        assert used == dev.used[i]
        magic = rig.mic.arena.memory().read_u32(vr.iova + L.vring_info_offset(num) + L.INFO_MAGIC)
        assert magic == 0xC0FFEE00 + 3 + i and L.vring_info_offset(num) == 5128
    assert rig.mic.device_page.bootparam.h2c_config_db == vs.vop()["config_db"]


def test_the_console_echo_is_byte_exact_through_aligned_dma_both_ways(rig):
    dev, fd = rig.console()
    try:
        rnd = random.Random(5)
        for n in (1, 63, 64, 65, 4095, 20000):
            data = rnd.randbytes(n)
            assert echo(fd, data) == data, n
    finally:
        os.close(fd)
    c = dev.engine.counters
    assert c["h2c_bar0_bytes"] == 0 and c["h2c_dma_bytes"] == c["h2c_bytes"] > 0
    assert c["c2h_bar0_bytes"] == 0 and c["c2h_dma_bytes"] >= c["c2h_bytes"] == c["h2c_bytes"]


def test_unaligned_card_buffers_take_widened_dma_in_and_bar0_out(rig, vs):
    vs.configure(rx=(16, 4096, 3), tx_offset=5)
    dev, fd = rig.console()
    try:
        data = random.Random(6).randbytes(3000)
        assert echo(fd, data) == data
    finally:
        os.close(fd)
    c = dev.engine.counters
    assert c["h2c_unaligned_dst_bytes"] == c["h2c_bar0_bytes"] == 3000 and c["h2c_dma_bytes"] == 0
    assert c["c2h_bytes"] == 3000 and c["c2h_dma_bytes"] > 3000 and c["c2h_dma_bytes"] % 64 == 0


def test_a_length_that_cannot_be_rounded_up_inside_its_descriptor_goes_through_bar0(rig, vs):
    vs.configure(rx=(16, 100, 0))
    dev, fd = rig.console()
    try:
        data = bytes(range(70))    # ALIGN(70, 64) = 128 > the 100-byte descriptor
        assert echo(fd, data) == data
    finally:
        os.close(fd)
    c = dev.engine.counters
    assert c["h2c_unaligned_len_bytes"] == 70 and c["h2c_dma_bytes"] == 0


def test_blk_data_crosses_every_copy_path_and_lands_in_the_image(rig, vs, image):
    blk = BlkBackend.open(str(image), serial="vop-test-disk")
    dev = rig.add(blk)
    # 200 KiB from a card address 13 bytes past a line, in 3 segments: len + h > 64 KiB, where upstream's
    # bounce loop put every byte after the first chunk 13 bytes off (spec 5.7).
    w = vs.driver("blk", "write", sector=8, length=200 << 10, offset=13, segments=3, seed=7)
    assert w["status"] == 0
    with open(image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(200 << 10) == pattern(7, 200 << 10)
    for offset, segments in ((0, 1), (7, 5)):
        r = vs.driver("blk", "read", sector=8, length=200 << 10, offset=offset, segments=segments)
        assert r["status"] == 0 and r["sha256"] == w["sha256"], (offset, segments)
    assert vs.driver("blk", "get_id")["id"] == "vop-test-disk"
    c = dev.engine.counters
    assert c["c2h_dma_bytes"] > c["c2h_bytes"] >= 200 << 10           # widened to the 64-byte grid
    assert c["h2c_dma_bytes"] >= 200 << 10                           # the aligned read
    assert c["h2c_unaligned_dst_bytes"] >= 200 << 10                 # the read 7 bytes past a line
    assert c["h2c_unaligned_len_bytes"] >= 4                         # the 1-byte status of each request
    assert c["c2h_bar0_bytes"] == 0


def test_h2c_direct_hands_backends_views_of_card_memory_and_moves_no_payload_by_dma(vs, image):
    # The opt-in policy: writable buffers are BAR0 views, the backend writes the card itself -- at any
    # offset, in any number of segments, and for a writable-only chain (console receive) as well.
    vs.configure(rx=(16, 4096, 3))
    r = Rig(vs, VopOptions(copy=CopyPolicy(h2c_direct=True)))
    try:
        blk = BlkBackend.open(str(image))
        dev = r.add(blk)
        w = vs.driver("blk", "write", sector=16, length=300 << 10, offset=13, segments=3, seed=9)
        assert w["status"] == 0
        for offset, segments in ((0, 1), (7, 5)):
            got = vs.driver("blk", "read", sector=16, length=300 << 10, offset=offset, segments=segments)
            assert got["status"] == 0 and got["sha256"] == w["sha256"], (offset, segments)
        bad = vs.driver("blk", "read", sector=(4 << 20) // 512, length=4096)     # past the end: IOERR
        assert bad["status"] == 1
        c = dev.engine.counters
        assert c["h2c_direct_bytes"] == c["h2c_bytes"] >= 2 * (300 << 10)
        assert c["h2c_dma_bytes"] == c["h2c_bar0_bytes"] == 0
        assert c["c2h_dma_bytes"] >= 300 << 10                 # card -> host stays DMA
        q = dev.queues[0]
        assert q.staging.ring.allocated == 0 and not q._staged
        cdev, fd = r.console()
        try:
            data = random.Random(8).randbytes(5000)
            assert echo(fd, data) == data
        finally:
            os.close(fd)
        assert cdev.engine.counters["h2c_direct_bytes"] == 5000
        for d in (cdev, dev):
            r.vop.remove(d)                # with the card's ack, before the host goes away
    finally:
        r.close()


def test_a_backend_that_asks_for_more_staging_gets_it_and_the_rest_keep_the_default(rig, vs, image, tmp_path):
    # net asks for room for whole batches of 64 KiB frames; a backend that does not ask gets VopOptions'
    assert NetBackend.staging_bytes(None, 0) == NET_STAGING == 8 << 20
    big = BlkBackend.open(str(image), serial="big-staging")
    big.staging_bytes = lambda index: 3 << 20
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 << 20))
    devs = [rig.add(big), rig.add(BlkBackend.open(str(other)))]
    assert [d.queues[0].staging.ring.size for d in devs] == [3 << 20, STAGING_BYTES]
    assert vs.driver("blk", "write", sector=0, length=256 << 10, seed=3)["status"] == 0   # the card uses it
    for d in devs:
        rig.vop.remove(d)


def test_a_request_beyond_the_disk_fails_and_the_device_carries_on(rig, vs, image):
    blk = BlkBackend.open(str(image))
    dev = rig.add(blk)
    cap = (4 << 20) // 512
    assert vs.driver("blk", "read", sector=cap - 1, length=1024)["status"] == 1   # IOERR
    assert vs.driver("blk", "write", sector=0, length=512, seed=3)["status"] == 0
    assert dev.state == "active"


# --- remove, config change, reset (spec 5.4, 5.5) -------------------------------------------------------
def test_remove_waits_for_the_card_and_the_slot_is_reused(rig, vs):
    dev, fd = rig.console()
    os.close(fd)
    off = dev.entry.offset
    rig.vop.remove(dev)
    assert dev.state == "removed"
    raw = raw_page(rig)
    assert struct.unpack_from("<b", raw, off)[0] == L.TYPE_REMOVED
    ctrl = off + L.aligned_desc_size(2, 4, 12)
    assert raw[ctrl + L.CTRL_CONFIG_CHANGE] == 0 and raw[ctrl + L.CTRL_GUEST_ACK] == 0
    card = vs.vop()
    assert vs.card_device(off) is None
    assert card["removed"][-1]["why"] == "removed by the host" and card["removed"][-1]["offset"] == off
    assert dev.counters["resets"] == 1   # the driver was live: the card reset it before acking
    again, fd = rig.console()
    os.close(fd)
    assert again.entry.offset == off
    # the host sees the device active at the card's DRIVER_OK, a moment before the card's probe returns
    wait_for(lambda: (vs.card_device(off) or {}).get("state") == "probed", "the card's probe to finish", WAIT)


def test_a_capacity_change_reaches_the_card_as_a_config_change(rig, vs, image):
    blk = BlkBackend.open(str(image))
    dev = rig.add(blk)
    assert vs.driver("blk", "capacity")["capacity"] == (4 << 20) // 512
    assert blk.resize(8 << 20)
    wait_for(lambda: vs.driver("blk", "capacity")["config_changes"] == 1, "the card's config_changed", WAIT)
    assert vs.driver("blk", "capacity")["capacity"] == (8 << 20) // 512
    wait_for(lambda: dev.counters["config_changes"] == 1 and not dev.entry.ctrl_u8(L.CTRL_CONFIG_CHANGE),
             "the host to finish the hand-shake", WAIT)
    assert vs.driver("blk", "write", sector=(6 << 20) // 512, length=4096, seed=9)["status"] == 0


def test_the_cards_reset_handshake_resets_the_device_and_it_comes_back(rig, vs):
    dev, fd = rig.console()
    os.close(fd)
    vs.switch("reset", device="console")
    wait_for(lambda: dev.counters["resets"] == 1, "the host's side of the reset", WAIT)
    assert dev.state == "added" and dev.entry.status == 0 and dev.used == [None, None]
    assert not dev.entry.ctrl_u8(L.CTRL_VDEV_RESET) and dev.entry.ctrl_u8(L.CTRL_HOST_ACK) == 1


# --- drain and notification counters (virtio-legacy.md 1.6) ----------------------------------------------
def test_a_burst_is_drained_in_one_batch_with_one_interrupt(rig, vs):
    dev, fd = rig.console()
    try:
        out = vs.driver("console", "burst", count=24, size=100)
        assert out["kicked"]
        got = b""
        while len(got) < 2400 and select.select([fd], [], [], WAIT)[0]:
            got += os.read(fd, 65536)
        assert got == b"".join(bytes([0x41 + i % 26]) * 100 for i in range(24))
    finally:
        os.close(fd)
    tx = dev.queues[1].counters
    wait_for(lambda: tx["chains"] == 24 and tx["interrupts"] + tx["interrupts_suppressed"] == tx["batches"],
             "the transmit queue to take and complete all 24", WAIT)
    # One kick for the burst; the host drains what is there per wake-up (a wake-up from an earlier doorbell
    # may catch the burst half made): at most two batches, one completion decision each.
    assert tx["batches"] <= 2 and tx["max_batch"] >= 12


def test_a_burst_of_1_mib_reads_shares_batches_past_the_staging_area_within_its_bound(vs, tmp_path):
    # Two 1 MiB requests (plus header and status slots) do not fit the 2 MiB staging area: without the
    # overflow allocations every request is a batch of its own.
    data = os.urandom(8 << 20)
    img = tmp_path / "burst.img"
    img.write_bytes(data)
    want = [hashlib.sha256(data[i << 20:(i + 1) << 20]).hexdigest() for i in range(6)]
    for overflow in (0, 8 << 20):
        vs.configure()
        r = Rig(vs, VopOptions(staging_overflow=overflow))
        try:
            dev = r.add(BlkBackend.open(str(img)))
            out = vs.driver("blk", "burst", sector=0, length=1 << 20, count=6)["requests"]
            assert [x["status"] for x in out] == [0] * 6 and [x["sha256"] for x in out] == want
            q = dev.queues[0]
            c = q.counters
            if overflow:
                # one kick for all six: the first wake-up takes what fits -- one in staging, the rest within
                # the bound (6 x (1 MiB + 128) < 2 + 8 MiB) -- unless a late wake-up split the burst
                assert c["max_batch"] >= 3 and c["overflow"] >= 2 and c["batches"] <= 3
                assert c["deferred"] >= 1          # the drain did not wait for the batch's DMA to the card
            else:
                assert c["max_batch"] == 1 and c["overflow"] == 0 and c["batches"] >= 6
            assert q.staging.own_bytes == 0 and q.staging.ring.allocated == 0      # all given back
            r.vop.remove(dev)              # with the card's ack, before the host goes away
        finally:
            r.close()


class _WatchedBlk(BlkBackend):
    """A blk backend that, during one burst, looks at the card between its requests (on the loop thread)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.armed = False
        self.seen: list[str] = []
        self.look = None

    def _request(self, chain):
        if self.armed:
            self.look(len(self.seen))
        return super()._request(chain)


def test_a_long_drain_lets_the_card_take_each_batchs_interrupt_before_it_ends(vs, tmp_path):
    # Four 1 MiB reads, one batch each (no staging overflow): before the drain works on the third, the
    # interrupt for the first batch has been sent to the card -- the doorbell's register read (spec 2.3) is
    # answered and taken in between two chains (Virtqueue.progress) and the write posted, not once the
    # drain returns.
    img = tmp_path / "burst.img"
    img.write_bytes(os.urandom(4 << 20))
    vs.configure()
    r = Rig(vs, VopOptions(staging_overflow=0))
    try:
        be = _WatchedBlk.open(str(img))
        dev = r.add(be)
        bells = r.mic.vop.doorbells

        rung = bells.rung

        def look(i):
            if i == 1:       # the first batch's ring went out; if it is still under way, its answer comes in
                if bells.rung == rung:
                    be.seen.append("not rung")
                elif bells.pending:
                    ok = wait_until(lambda: select.select([bells._fd], [], [], 0)[0])
                    be.seen.append("answered" if ok else "no answer")
                else:
                    be.seen.append("answered")    # and taken in already, before this chain
            elif i == 2:     # progress() ran before this chain: the answer was taken in and the doorbell written
                be.seen.append("rung" if not bells.pending else "still waiting")
            else:
                be.seen.append("-")
        be.look = look
        be.armed = True
        out = vs.driver("blk", "burst", sector=0, length=1 << 20, count=4)["requests"]
        be.armed = False
        assert [x["status"] for x in out] == [0] * 4
        assert dev.queues[0].counters["max_batch"] == 1           # one request per batch, as the test needs
        assert be.seen[:3] == ["-", "answered", "rung"], be.seen
        wait_for(lambda: vs.card_device(dev.entry.offset)["interrupts"] >= 1, "the card to take an interrupt", WAIT)
        r.vop.remove(dev)
    finally:
        r.close()


def wait_until(predicate, timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.001)
    return False


def test_interrupts_to_the_card_are_rung_from_the_loop_and_arrive(rig, vs):
    dev, fd = rig.console()
    try:
        for n in (1, 100, 3000):
            data = random.Random(n).randbytes(n)
            assert echo(fd, data) == data
    finally:
        os.close(fd)
    bells = rig.mic.vop.doorbells
    asked = sum(d.counters["interrupts"] for d in rig.mic.vop.devices)
    assert asked >= 1
    # Every interrupt the loop asked for was rung, or folded into a ring still to come; none is lost.
    wait_for(lambda: bells.rung + bells.coalesced == asked and not bells.pending, "the doorbells rung", WAIT)
    assert bells.rung >= 1
    wait_for(lambda: vs.card_device(dev.entry.offset)["interrupts"] >= 1, "the card to take an interrupt", WAIT)


# --- _mic_vring_info placement (spec 5.6) -------------------------------------------------------------
def test_the_legacy_placement_works_when_host_and_card_agree(vs):
    vs.configure()
    r = Rig(vs, VopOptions(vring_info=L.VRING_INFO_LEGACY), cmdline="micdrv_sim.vring_info=legacy")
    try:
        assert vs.vop()["placement"] == "legacy"
        dev, fd = r.console()
        try:
            assert echo(fd, b"legacy placement") == b"legacy placement"
        finally:
            os.close(fd)
        vr = dev.vrings[0]
        mem = r.mic.arena.memory()
        assert mem.read_u32(vr.iova + 5126 + L.INFO_MAGIC) == 0xC0FFEE03
    finally:
        r.close()


def test_a_placement_mismatch_is_caught_by_the_cards_magic_check(vs):
    vs.configure()
    r = Rig(vs, VopOptions(vring_info=L.VRING_INFO_LEGACY))   # the card looks at the rounded place
    try:
        dev = r.add(ConsoleBackend.open(), wait=False)
        wait_for(lambda: (d := vs.card_device(dev.entry.offset)) and d["state"] == "failed", "the probe to fail",
                 WAIT)
        card = vs.card_device(dev.entry.offset)
        assert "magic" in card["error"] and card["status"] & VIRTIO_CONFIG_S_FAILED
        wait_for(lambda: "probe failed (-EIO)" in vs.log(), "the card's log line", WAIT)
        wait_for(lambda: dev.counters["wakeups"] and dev.entry.status & VIRTIO_CONFIG_S_FAILED, "the FAILED status",
                 WAIT)
        assert dev.state == "added" and not dev.active
    finally:
        r.close()


# --- doorbells ---------------------------------------------------------------------------------------
def test_more_devices_than_doorbells_share_them(rig):
    devs = [rig.console() for _ in range(6)]
    try:
        assert len({d.db for d, _fd in devs}) == 4
        for i, (d, fd) in enumerate(devs):
            msg = f"device {i} on doorbell {d.db}".encode()
            assert echo(fd, msg) == msg
    finally:
        for _d, fd in devs:
            os.close(fd)
    assert len(rig.vop.status()["doorbells"]) <= 4
