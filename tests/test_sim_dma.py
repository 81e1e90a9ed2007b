"""The simulated card's DMA engine (spec 4), driven like a host driver would through PciDevice.

Rings live in the host arena and are reached through the SMPT (spec 4.1,
4.2); copies in both directions are checked byte for byte; STATUS
descriptors, DSTAT, channel errors for every class of bad descriptor and the
recovery by reinitialising the channel (CHOICES C21-C28 in micdrv/sim).
"""

from __future__ import annotations

import os
import random
import struct
import time

import pytest

from micdrv.sim.dma_engine import INLINE_BYTES, INLINE_DESCRIPTORS
from micdrv.x100 import regs
from tests.sim_harness import (DMA_ERR_ADDRESS, DMA_ERR_ALIGN, DMA_ERR_DHPR, DMA_ERR_HOST_TO_HOST, DMA_ERR_LENGTH,
                               DMA_ERR_RING, DMA_ERR_TYPE, IOVA_BASE, MEMORY, Host, fired, memcpy_desc,
                               module_sim, status_desc, wait_for)

CARD_BUF = 128 << 20  # card memory the tests copy to and from (the image area is below)
HOST_CHANNELS = range(4)


@pytest.fixture(scope="module")
def sim():
    yield from module_sim()


@pytest.fixture
def host(sim):
    h = Host(sim.connect(), sim.control)
    h.reset_ready()
    h.smpt_identity()
    yield h
    h.close()


def host_addr(host: Host, off: int) -> int:
    return host.card_addr(off)


# --- copies --------------------------------------------------------------------------------------
def test_copies_both_ways_on_four_channels_with_random_sizes_and_offsets(host):
    rnd = random.Random(4)
    src_area = host.arena.alloc(6 << 20, align=4096).offset
    dst_area = host.arena.alloc(6 << 20, align=4096).offset
    host.arena.view[src_area:src_area + (6 << 20)] = os.urandom(6 << 20)
    host.gddr[CARD_BUF:CARD_BUF + (6 << 20)] = os.urandom(6 << 20)
    for ch in HOST_CHANNELS:
        host.setup_channel(ch)
    to_card, to_host = [], []
    card_cursor, host_cursor = CARD_BUF + (8 << 20), dst_area
    for i in range(32):
        length = rnd.choice([64, 128, 4096, rnd.randrange(1, 8192) * 64, regs.DMA_HOST_MAX_XFER])
        if i % 2 == 0:  # host -> card
            src = src_area + rnd.randrange(0, ((6 << 20) - length) // 64) * 64
            card_cursor += rnd.randrange(0, 64) * 64
            to_card.append((card_cursor, src, length))
            card_cursor += length
        else:  # card -> host
            src = CARD_BUF + rnd.randrange(0, ((6 << 20) - length) // 64) * 64
            host_cursor += rnd.randrange(0, 16) * 64
            if host_cursor + length > dst_area + (6 << 20):
                host_cursor = dst_area
            to_host.append((host_cursor, src, length))
            host_cursor += length
    descs: dict[int, list] = {ch: [] for ch in HOST_CHANNELS}
    for i, (dst, src, n) in enumerate(to_card):
        descs[i % 4].append(memcpy_desc(dst, host_addr(host, src), n))
    for i, (dst, src, n) in enumerate(to_host):
        descs[(i + 2) % 4].append(memcpy_desc(host_addr(host, dst), src, n))
    for ch in HOST_CHANNELS:  # all four run at once
        host.submit(ch, descs[ch])
    for ch in HOST_CHANNELS:
        host.wait_idle(ch)
    for dst, src, n in to_card:
        assert host.gddr[dst:dst + n] == host.arena.view[src:src + n], (dst, src, n)
    for dst, src, n in to_host:
        assert host.arena.view[dst:dst + n] == host.gddr[src:src + n], (dst, src, n)
    moved = sum(n for _d, _s, n in to_card + to_host)
    chans = host.control.counters()["dma"]["channels"]
    assert sum(c["bytes"] for c in chans[:4]) >= moved


def test_card_to_card_copy(host):
    host.gddr[CARD_BUF:CARD_BUF + 8192] = os.urandom(8192)
    host.setup_channel(1)
    host.submit(1, [memcpy_desc(CARD_BUF + (1 << 20), CARD_BUF, 8192)])
    host.wait_idle(1)
    assert host.gddr[CARD_BUF + (1 << 20):CARD_BUF + (1 << 20) + 8192] == host.gddr[CARD_BUF:CARD_BUF + 8192]


def test_card_owned_channel_with_a_ring_in_card_memory_takes_1mib_minus_64(host):
    ch, ring = 5, CARD_BUF + (32 << 20)  # channels 4-7 are the card's after reset (C26)
    assert not host.rd(regs.DCR) & regs.dcr_owner_bit(ch)
    n = regs.DMA_CARD_MAX_XFER
    host.gddr[CARD_BUF:CARD_BUF + n] = os.urandom(n)
    struct.pack_into("<QQ", host.gddr, ring, *memcpy_desc(CARD_BUF + (4 << 20), CARD_BUF, n))
    host.wr(regs.dma_reg(ch, regs.DRAR_LO), ring & 0xFFFFFFFF)
    host.wr(regs.dma_reg(ch, regs.DRAR_HI), 8 << regs.DRAR_HI_SIZE_SHIFT | ring >> 32)  # bits 3:0 = addr 35:32
    host.wr(regs.DCR, host.rd(regs.DCR) | regs.dcr_enable_bit(ch))
    host.wr(regs.dma_reg(ch, regs.DHPR), 1)
    wait_for(lambda: host.dma(ch, regs.DTPR) == 1 or host.dma(ch, regs.DCHERR), "the card channel")
    assert host.dma(ch, regs.DCHERR) == 0
    assert host.gddr[CARD_BUF + (4 << 20):CARD_BUF + (4 << 20) + n] == host.gddr[CARD_BUF:CARD_BUF + n]


# --- STATUS descriptors, DSTAT, interrupts --------------------------------------------------------
def test_status_descriptor_stores_its_value_and_raises_the_channel_interrupt_routed_by_mxar(host):
    host.enable_msix()
    status = host.arena.alloc(64).offset
    for ch, vector in ((0, 4), (3, 7)):
        host.route(vector, regs.INTR_DMA_START + ch)
    host.enable_sources(0xFF00)
    for ch, vector in ((0, 4), (3, 7)):
        host.setup_channel(ch)
        head = host.submit(ch, [status_desc(host_addr(host, status), 0x1111 * (ch + 1)),
                                status_desc(host_addr(host, status + 8), 0xFEEDFACE_00000000 | ch, interrupt=True)])
        assert fired(host.fds[vector], 5.0) == 1
        assert host.dma(ch, regs.DSTAT) & regs.DSTAT_COUNT_MASK == head == 2  # done before the interrupt
        assert struct.unpack_from("<QQ", host.arena.view, status) == (0x1111 * (ch + 1), 0xFEEDFACE_00000000 | ch)
        assert host.pending() == []
        assert host.rd(regs.SICR0) == 0  # auto-cleared


def test_a_status_interrupt_masked_in_dcar_sets_no_cause(host):
    host.enable_msix()
    status = host.arena.alloc(64).offset
    host.route(2, regs.INTR_DMA_START + 1)
    host.enable_sources(0xFF00, auto_clear=False)
    host.setup_channel(1)
    host.wr(regs.dma_reg(1, regs.DCAR), regs.DCAR_IM1)
    host.submit(1, [status_desc(host_addr(host, status), 77, interrupt=True)])
    host.wait_idle(1)
    assert struct.unpack_from("<Q", host.arena.view, status)[0] == 77
    assert host.pending() == [] and host.rd(regs.SICR0) == 0


def test_a_small_batch_is_done_by_the_time_the_dhpr_write_is_flushed(host):
    status = host.arena.alloc(64).offset
    host.setup_channel(0)
    before = host.control.counters()["dma"]["channels"][0]["inline_batches"]
    head = host.submit(0, [memcpy_desc(CARD_BUF, host_addr(host, status), 64), status_desc(host_addr(host, status), 8)])
    assert host.dma(0, regs.DTPR) == head  # the read queued behind the DHPR write sees it done
    assert host.control.counters()["dma"]["channels"][0]["inline_batches"] == before + 1


def test_a_batch_over_the_inline_limits_is_left_to_the_channel_thread(host):
    src = host.arena.alloc(INLINE_BYTES, align=4096).offset
    host.arena.view[src:src + INLINE_BYTES] = os.urandom(INLINE_BYTES)
    status = host.arena.alloc(64).offset
    host.setup_channel(3, size=2 * INLINE_DESCRIPTORS + 16)  # room for a batch over the descriptor limit
    before = host.control.counters()["dma"]["channels"][3]["inline_batches"]
    half = 512 << 10
    limit = [memcpy_desc(CARD_BUF + k * half, host_addr(host, src + k * half), half)
             for k in range(INLINE_BYTES // half)]
    host.submit(3, limit + [status_desc(host_addr(host, status), 1)])  # INLINE_BYTES: inline
    host.wait_idle(3)
    assert host.control.counters()["dma"]["channels"][3]["inline_batches"] == before + 1
    host.submit(3, limit + [memcpy_desc(CARD_BUF, host_addr(host, src), 64), status_desc(host_addr(host, status), 2)])
    host.wait_idle(3)  # INLINE_BYTES + 64 bytes: the thread's
    many = [memcpy_desc(CARD_BUF, host_addr(host, src), 64)] * INLINE_DESCRIPTORS
    host.submit(3, many + [status_desc(host_addr(host, status), 3)])
    host.wait_idle(3)  # one descriptor over the count: the thread's too
    counters = host.control.counters()["dma"]["channels"][3]
    assert counters["inline_batches"] == before + 1 and counters["errors"] == 0
    assert struct.unpack_from("<Q", host.arena.view, status)[0] == 3
    assert bytes(host.gddr[CARD_BUF:CARD_BUF + INLINE_BYTES]) == bytes(host.arena.view[src:src + INLINE_BYTES])


def test_dstat_counts_completions_modulo_the_ring_size(host):
    status = host.arena.alloc(64).offset
    host.setup_channel(2, size=8)
    for rounds in range(3):
        host.submit(2, [status_desc(host_addr(host, status), rounds * 10 + i) for i in range(5)])
        host.wait_idle(2)
    assert host.dma(2, regs.DSTAT) == 15 % 8 == host.dma(2, regs.DTPR)
    assert struct.unpack_from("<Q", host.arena.view, status)[0] == 24


# --- bad descriptors and recovery (C21-C25) ----------------------------------------------------------
def bad_descriptors(host: Host) -> dict:
    a = host.arena.alloc(4096).offset
    win = host_addr(host, a)
    outside = regs.SYSTEM_WINDOW + IOVA_BASE + (16 << 20)  # just past the arena
    return {
        "type 0": ((0, 0), DMA_ERR_TYPE),
        "type 3": ((0, 3 << regs.DESC_TYPE_SHIFT | CARD_BUF), DMA_ERR_TYPE),
        "misaligned source": (memcpy_desc(CARD_BUF, win + 32, 64), DMA_ERR_ALIGN),
        "misaligned destination": (memcpy_desc(CARD_BUF + 8, win, 64), DMA_ERR_ALIGN),
        "misaligned status": (status_desc(win + 4, 1), DMA_ERR_ALIGN),
        "zero length": (memcpy_desc(CARD_BUF, win, 0), DMA_ERR_LENGTH),
        "over 512 KiB on a host channel": (memcpy_desc(CARD_BUF, CARD_BUF + (2 << 20), (512 << 10) + 64),
                                           DMA_ERR_LENGTH),
        "past card memory": (memcpy_desc(MEMORY - 64, win, 128), DMA_ERR_ADDRESS),
        "no memory at the address": (memcpy_desc(0x40_0000_0000, win, 64), DMA_ERR_ADDRESS),
        "register window": (memcpy_desc(regs.CARD_MMIO_BASE, win, 64), DMA_ERR_ADDRESS),
        "SMPT fault": (memcpy_desc(CARD_BUF, outside, 64), DMA_ERR_ADDRESS),
        "status SMPT fault": (status_desc(outside, 1), DMA_ERR_ADDRESS),
        "stray high destination bits": (memcpy_desc(1 << 50 | CARD_BUF, win, 64), DMA_ERR_ADDRESS),
        "host to host": (memcpy_desc(win + 1024, win, 64), DMA_ERR_HOST_TO_HOST),
    }


CASES = ["type 0", "type 3", "misaligned source", "misaligned destination", "misaligned status", "zero length",
         "over 512 KiB on a host channel", "past card memory", "no memory at the address", "register window",
         "SMPT fault", "status SMPT fault", "stray high destination bits", "host to host"]


def reinit(host: Host, ch: int, size: int = 64) -> None:
    """Recovery (C22): disable, clear DCHERR (write-1-to-clear), rewrite DRAR, enable."""
    host.wr(regs.DCR, host.rd(regs.DCR) & ~regs.dcr_enable_bit(ch))
    host.wr(regs.dma_reg(ch, regs.DCHERR), host.dma(ch, regs.DCHERR))
    host.setup_channel(ch, size)


@pytest.mark.parametrize("case", CASES)
def test_a_bad_descriptor_stops_the_channel_with_dcherr_until_reinitialised(host, case):
    ch = 2
    desc, bits = bad_descriptors(host)[case]
    status = host.arena.alloc(64).offset
    host.setup_channel(ch)
    errs = host.control.counters()["interrupts"]["raised"][regs.INTR_ERR_START]
    host.submit(ch, [status_desc(host_addr(host, status), 1), desc, status_desc(host_addr(host, status + 8), 3)])
    assert host.wait_error(ch) == bits
    assert host.dma(ch, regs.DTPR) == 1  # stopped at the bad descriptor
    assert host.dma(ch, regs.DSTAT) == regs.DSTAT_QUIESCED | 1
    assert struct.unpack_from("<QQ", host.arena.view, status) == (1, 0)  # the one after it never ran
    c = host.control.counters()
    assert c["interrupts"]["raised"][regs.INTR_ERR_START] == errs + 1  # unmasked errors raise source 30
    assert "descriptor 1" in c["dma"]["channels"][ch]["last_error"]
    reinit(host, ch)
    host.submit(ch, [status_desc(host_addr(host, status + 8), 4)])
    host.wait_idle(ch)
    assert struct.unpack_from("<Q", host.arena.view, status + 8)[0] == 4


def test_a_ring_outside_the_arena_is_a_ring_fault(host):
    ch = 0
    host.setup_channel(ch)
    host.wr(regs.DCR, host.rd(regs.DCR) & ~regs.dcr_enable_bit(ch))
    outside = regs.SYSTEM_WINDOW + IOVA_BASE + (32 << 20)
    host.wr(regs.dma_reg(ch, regs.DRAR_LO), outside & 0xFFFFFFFF)
    host.wr(regs.dma_reg(ch, regs.DRAR_HI), 64 << 4 | regs.DRAR_HI_SYSMEM | (outside >> 32) & 3)
    host.wr(regs.DCR, host.rd(regs.DCR) | regs.dcr_enable_bit(ch))
    host.wr(regs.dma_reg(ch, regs.DHPR), 1)
    assert host.wait_error(ch) == DMA_ERR_RING
    reinit(host, ch)
    host.submit(ch, [status_desc(host_addr(host, host.arena.alloc(64).offset), 1)])
    host.wait_idle(ch)


def test_dhpr_written_twice_with_one_value_or_past_the_ring_is_a_dhpr_fault(host):
    ch = 3
    status = host.arena.alloc(64).offset
    host.setup_channel(ch, size=16)
    head = host.submit(ch, [status_desc(host_addr(host, status), 1)])
    host.wait_idle(ch)
    host.wr(regs.dma_reg(ch, regs.DHPR), head)  # the same value again (spec 4.4)
    assert host.wait_error(ch) == DMA_ERR_DHPR
    reinit(host, ch, size=16)
    host.wr(regs.dma_reg(ch, regs.DHPR), 16)
    assert host.wait_error(ch) == DMA_ERR_DHPR


def test_disabling_the_channel_clears_dcherr_as_upstream_setup_expects(host):
    ch = 1
    host.setup_channel(ch)
    host.submit(ch, [(0, 0)])
    assert host.wait_error(ch) == DMA_ERR_TYPE
    host.setup_channel(ch)  # mic_dma_chan_setup: disable ... enable, never writes DCHERR
    host.submit(ch, [status_desc(host_addr(host, host.arena.alloc(64).offset), 1)])
    host.wait_idle(ch)


def test_an_error_on_one_channel_leaves_the_others_running(host):
    status = host.arena.alloc(64).offset
    host.setup_channel(0)
    host.setup_channel(1)
    host.submit(0, [(0, 0)])
    host.submit(1, [status_desc(host_addr(host, status), 5)])
    assert host.wait_error(0) == DMA_ERR_TYPE
    host.wait_idle(1)
    assert struct.unpack_from("<Q", host.arena.view, status)[0] == 5


def test_card_reset_stops_and_clears_the_channels(host):
    host.setup_channel(0)
    host.submit(0, [(0, 0)])
    host.wait_error(0)
    host.reset_ready()
    assert host.rd(regs.DCR) == 0x55
    for reg in (regs.DCHERR, regs.DRAR_LO, regs.DRAR_HI, regs.DHPR, regs.DTPR):
        assert host.dma(0, reg) == 0
    assert host.dma(0, regs.DSTAT) == regs.DSTAT_QUIESCED


# --- fault hook and responsiveness --------------------------------------------------------------------
def test_a_stalled_channel_consumes_nothing_until_released(host):
    status = host.arena.alloc(64).offset
    host.setup_channel(1)
    host.flush()
    host.control("stall", channel=1, stalled=True)
    host.submit(1, [status_desc(host_addr(host, status), 9)])
    time.sleep(0.2)
    assert host.dma(1, regs.DTPR) == 0 and struct.unpack_from("<Q", host.arena.view, status)[0] == 0
    assert host.control.counters()["dma"]["channels"][1]["stalled"]
    host.control("stall", channel=1, stalled=False)
    host.wait_idle(1)
    assert struct.unpack_from("<Q", host.arena.view, status)[0] == 9


def test_registers_answer_while_a_channel_copies(host):
    host.setup_channel(0)
    src = host.arena.alloc(512 << 10).offset
    descs = [memcpy_desc(CARD_BUF + (i % 64) * (512 << 10), host_addr(host, src), 512 << 10) for i in range(60)]
    host.submit(0, descs)
    slowest = 0.0
    for _ in range(20):
        t0 = time.monotonic()
        host.spad(0)
        slowest = max(slowest, time.monotonic() - t0)
    host.wait_idle(0)
    assert slowest < 0.1


# --- copies without the GIL against unmaps (micdrv/sim/bus.py copy_view) ----------------------------
def _mappings_named(name: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{name} " in line + " ")


def _bus_over_one_dma_map(name: str, size: int):
    """An in-process CardBus: 64 MiB of GDDR, SMPT entry 0 onto a DmaSpace with one memfd map at IOVA 0."""
    import mmap
    import threading

    from micdrv.pci.vfio_user import DmaSpace
    from micdrv.sim.bus import CardBus
    from micdrv.sim.registers import RegisterFile
    from micdrv.sim.smpt import Smpt

    gddr = memoryview(mmap.mmap(-1, 64 << 20))
    dma = DmaSpace()
    smpt = Smpt()
    smpt.entries[0] = regs.smpt_value(0)
    bus = CardBus(gddr, RegisterFile(threading.RLock()), smpt, lambda: dma)

    def new_fd(fill: int) -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        os.pwrite(fd, bytes([fill]) * size, 0)
        return fd

    def new_map(fd: int) -> None:
        try:
            dma.map(0, size, 0, 3, fd)
        finally:
            os.close(fd)
    return bus, dma, gddr, new_fd, new_map


def test_an_unmap_racing_copies_without_the_gil_never_pulls_the_pages_from_under_them(caplog):
    import logging
    import threading

    from micdrv.sim.bus import GIL_FREE_COPY, CardFault

    caplog.set_level(logging.ERROR, "micdrv.sim.bus")  # the faults are expected
    size = 8 << 20
    name = f"dma-unmap-race-{os.getpid()}"
    bus, dma, gddr, new_fd, new_map = _bus_over_one_dma_map(name, size)
    host = regs.SYSTEM_WINDOW  # SMPT entry 0, IOVA 0
    assert size > GIL_FREE_COPY
    new_map(new_fd(1))
    stop = threading.Event()
    done = {"h2c": 0, "c2h": 0, "faults": 0}
    failures: list[str] = []

    def copier() -> None:
        while not stop.is_set():
            try:
                bus.copy(0, host, size)  # host -> card, the GIL released
            except CardFault:
                done["faults"] += 1
                time.sleep(0.0005)  # no mapping just now: let the unmapping thread go on
                continue
            first = gddr[0]
            if gddr[:size] != bytes([first]) * size:  # all of it from one mapping, whole
                failures.append(f"torn copy starting with {first}")
            done["h2c"] += 1
            try:
                bus.copy(host, 0, size)  # card -> host, into whatever mapping is there
                done["c2h"] += 1
            except CardFault:
                done["faults"] += 1

    t = threading.Thread(target=copier)
    t.start()
    try:
        deadline = time.monotonic() + 1.5
        generation = unmaps = 0
        while time.monotonic() < deadline or done["h2c"] < 20 or not done["faults"]:
            generation = generation % 250 + 1
            fd = new_fd(generation)
            dma.unmap(0, size)  # as a DMA_UNMAP from the client would, while a copy may be running
            unmaps += 1
            new_map(fd)
            time.sleep(0.002)
            assert time.monotonic() < deadline + 10, done
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive() and not failures, failures
    assert unmaps > 20
    dma.unmap_all()
    assert _mappings_named(name) == 0  # every unmapped mapping went once its last copy was done


def test_a_copy_in_flight_finishes_from_the_pages_it_started_on():
    import threading

    from micdrv.sim.bus import copy_view

    size = 48 << 20
    name = f"dma-in-flight-{os.getpid()}"
    _bus, dma, gddr, new_fd, new_map = _bus_over_one_dma_map(name, size)
    new_map(new_fd(0x5A))
    started = threading.Event()
    src = dma.view(0, size)

    def copy() -> None:
        started.set()
        copy_view(gddr[:size], src)  # ~ milliseconds without the GIL

    t = threading.Thread(target=copy)
    t.start()
    started.wait()
    dma.unmap(0, size)  # the mapping is gone for the model at once ...
    assert dma.mappings == []
    t.join(10)
    assert gddr[:size] == b"\x5a" * size  # ... but the copy read valid pages to the end
    assert _mappings_named(name) == 1  # the view still holds them
    src.release()
    assert _mappings_named(name) == 0


def test_copy_view_takes_any_source_a_slice_assignment_takes():
    from micdrv.sim.bus import GIL_FREE_COPY, copy_view

    data = os.urandom(4 * GIL_FREE_COPY)
    dst = bytearray(4 * GIL_FREE_COPY)
    copy_view(memoryview(dst), memoryview(data))  # bytes: read-only, copied holding the GIL
    assert dst == data
    copy_view(memoryview(dst), memoryview(bytearray(data[::-1])))  # writable: without the GIL
    assert dst == data[::-1]
    copy_view(memoryview(dst)[:2 * GIL_FREE_COPY], memoryview(bytearray(data))[::2])  # strided: the plain copy
    assert dst[:2 * GIL_FREE_COPY] == data[::2]
    with pytest.raises(ValueError):
        copy_view(memoryview(dst), memoryview(data)[1:])  # sizes differ: refused, as a slice assignment is
