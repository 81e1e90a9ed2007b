"""The X100 host layer's pure logic, without a card: encodings, arithmetic, routing tables.

Descriptor and DRAR encodings, SMPT values and ``mic_map`` semantics, the
splitting and spreading of copies, ring index arithmetic, and the interrupt
routing rules of spec 1.3/2.3 against an in-memory register file.
"""

from __future__ import annotations

import os
import threading
import time
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from micdrv.pci import INTX, MSI, MSIX
from micdrv.pci.device import IrqInfo
from micdrv.pci.errors import IrqError
from micdrv.x100 import dma_desc, regs
from micdrv.x100.card import DownloadInfo, post_code_text
from micdrv.x100.errors import DmaChannelError, InterruptError, SmptError
from micdrv.x100.interrupts import InterruptThread, Interrupts, IntrType, IrqMode, cookie_parts, make_cookie, source_offset
from micdrv.x100.smpt import Smpt, page_refs

GiB = 1 << 30


# --- an in-memory register file and a device with IRQ indices ---------------------------
class FakeRegisters:
    """BAR4 as a dict; records every write in order."""

    def __init__(self):
        self.values: dict[int, int] = {}
        self.writes: list[tuple[int, int]] = []
        self.reads: list[int] = []

    def read(self, off):
        self.reads.append(off)
        return self.values.get(off, 0)

    def write(self, off, value):
        self.values[off] = value
        self.writes.append((off, value))

    def write_many(self, writes):
        for off, value in writes:
            self.write(off, value)

    def set_bits(self, off, bits):
        v = self.read(off) | bits
        self.write(off, v)
        return v

    def clear_bits(self, off, bits):
        v = self.read(off) & ~bits & 0xFFFFFFFF
        self.write(off, v)
        return v


class FakeDevice:
    """Just the interrupt half of a PciDevice: IRQ counts per index, eventfds kept for triggering."""

    name = "fake"
    closed = False

    def __init__(self, counts):
        self.counts = counts
        self.info = types.SimpleNamespace(num_irqs=3)
        self.enabled: dict[int, list[int]] = {}
        self.unmasked = 0

    def irq_info(self, index):
        return IrqInfo(index, 1, self.counts.get(index, 0))

    def enable_irqs(self, index, fds, start=0):
        if self.counts.get(index, 0) < len(fds):
            raise IrqError("enable", "too many")
        self.enabled[index] = list(fds)

    def disable_irqs(self, index):
        self.enabled.pop(index, None)

    def unmask_irq(self, index=INTX, start=0, count=1):
        self.unmasked += 1

    def fire(self, index, vector=0):
        os.eventfd_write(self.enabled[index][vector], 1)
        return self.enabled[index][vector]


# --- descriptors (spec 4.3) ----------------------------------------------------------------
def test_memcpy_descriptor_matches_the_kernel_layout():
    q0, q1 = dma_desc.memcpy_desc(dst=0x4000, src=0x80_0000_1000, length=512 * 1024)
    assert q0 == 0x80_0000_1000 | (512 * 1024 // 64) << 46
    assert q1 == 1 << 60 | 0x4000
    d = dma_desc.decode(q0, q1)
    assert (d.type, d.src, d.dst, d.length) == (regs.DESC_MEMCPY, 0x80_0000_1000, 0x4000, 512 * 1024)


def test_status_descriptor_with_and_without_interrupt():
    assert dma_desc.status_desc(0x80_0000_0040, 7) == (7, 2 << 60 | 0x80_0000_0040)
    q0, q1 = dma_desc.status_desc(0x80_0000_0040, 2**64 - 1, interrupt=True)
    assert q0 == 2**64 - 1 and q1 == 2 << 60 | 1 << 59 | 0x80_0000_0040
    d = dma_desc.decode(q0, q1)
    assert d.interrupt and d.value == 2**64 - 1 and "interrupt" in str(d)


@pytest.mark.parametrize("dst,src,length", [(0, 0, 0), (0, 0, 100), (32, 0, 64), (0, 8, 64), (0, 0, 1 << 20),
                                            (0, 1 << 46, 64)])
def test_memcpy_descriptor_refuses_what_the_engine_cannot_do(dst, src, length):
    with pytest.raises(ValueError):
        dma_desc.memcpy_desc(dst, src, length)


def test_largest_memcpy_length_fits_14_bits():
    q0, _ = dma_desc.memcpy_desc(0, 0, (1 << 20) - 64)
    assert dma_desc.decode(q0, 1 << 60).length == (1 << 20) - 64


# --- DRAR (spec 4.2) -----------------------------------------------------------------------
def test_drar_for_the_kernels_full_ring_at_the_window_base():
    lo, hi = dma_desc.drar_host(0x80_0000_0000, regs.DMA_RING_SIZE)
    assert lo == 0
    assert hi == 0x1FFFC << 4 | 1 << 26  # size 131068, system memory, SMPT entry 0, addr bits 33:32 = 0


def test_drar_carries_smpt_index_and_address_bits_33_32():
    addr = 0x80_0000_0000 + 5 * (16 * GiB) + 3 * (4 * GiB) + 0x1234_5000  # entry 5, bits 33:32 = 3
    lo, hi = dma_desc.drar_host(addr, 4096)
    assert lo == 0x1234_5000
    assert (hi >> 21) & 0x1F == 5 and hi & 3 == 3 and hi & 1 << 26 and (hi >> 4) & 0x1FFFF == 4096
    assert dma_desc.drar_host_decode(lo, hi) == (addr, 4096)


@pytest.mark.parametrize("size", [0, 4, 6, 4094, regs.DMA_RING_SIZE + 4])
def test_ring_sizes_drar_cannot_carry_are_refused(size):
    with pytest.raises(ValueError):
        dma_desc.check_ring_size(size)


def test_drar_refuses_card_memory_for_a_host_ring():
    with pytest.raises(ValueError):
        dma_desc.drar_host(0x1000, 4096)


# --- ring arithmetic ----------------------------------------------------------------------------
def test_ring_keeps_one_slot_empty():
    assert dma_desc.ring_space(0, 0, 8) == 7
    assert dma_desc.ring_space(7, 0, 8) == 0
    assert dma_desc.ring_space(2, 3, 8) == 0
    assert dma_desc.ring_used(1, 6, 8) == 3
    assert dma_desc.ring_add(6, 3, 8) == 1


@given(st.integers(0, 99), st.integers(0, 99))
def test_used_plus_space_is_size_minus_one(head, tail):
    assert dma_desc.ring_used(head, tail, 100) + dma_desc.ring_space(head, tail, 100) == 99


# --- splitting and spreading --------------------------------------------------------------------
def test_split_cuts_at_512_kib():
    assert dma_desc.split(64) == [(0, 64)]
    assert dma_desc.split(1 << 20) == [(0, 1 << 19), (1 << 19, 1 << 19)]
    assert dma_desc.split((1 << 20) + 64) == [(0, 1 << 19), (1 << 19, 1 << 19), (1 << 20, 64)]


@given(st.integers(1, 1 << 18).map(lambda n: n * 64), st.integers(1, 8), st.integers(0, 1 << 20))
def test_spread_covers_the_copy_in_aligned_contiguous_parts(length, ways, min_part):
    parts = dma_desc.spread(length, ways, min_part)
    assert 1 <= len(parts) <= ways
    pos = 0
    for off, size in parts:
        assert off == pos and size > 0 and size % 64 == 0
        pos += size
    assert pos == length
    sizes = [s for _o, s in parts]
    assert max(sizes) - min(sizes) <= 64
    if len(parts) > 1:
        assert min(sizes) >= min(min_part, length) - 64 or min(sizes) >= min_part


def test_spread_keeps_small_copies_on_one_channel():
    assert dma_desc.spread(4096, 4, 128 * 1024) == [(0, 4096)]
    assert len(dma_desc.spread(16 << 20, 4, 128 * 1024)) == 4
    assert dma_desc.spread(256 * 1024, 4, 128 * 1024) == [(0, 128 * 1024), (128 * 1024, 128 * 1024)]


# --- SMPT (spec 2.4) ---------------------------------------------------------------------------------
def test_smpt_init_writes_the_identity_layout():
    r = FakeRegisters()
    Smpt(r).init()
    assert [r.values[regs.smpt(i)] for i in range(32)] == [i << 2 for i in range(32)]


def test_smpt_value_keeps_host_bits_63_34():
    assert regs.smpt_value(0xFFFF_FFFC_0000_0000) == 0xFFFF_FFFF & (0xFFFF_FFFC_0000_0000 >> 34 << 2)
    assert regs.smpt_value(16 * GiB, no_snoop=True) == 0b101


def test_to_card_is_window_base_plus_iova_under_identity():
    s = Smpt(FakeRegisters())
    s.init()
    assert s.to_card(0) == 0x80_0000_0000
    assert s.to_card(0x1234_5678, 64) == 0x80_1234_5678
    assert s.to_card(511 * GiB) == 0x80_0000_0000 + 511 * GiB
    with pytest.raises(SmptError):
        s.to_card(512 * GiB)


def test_map_shares_existing_entries_and_counts_bytes():
    r = FakeRegisters()
    s = Smpt(r)
    s.init()
    n = len(r.writes)
    a = s.map(16 * GiB - 4096, 8192)  # straddles entries 0 and 1
    assert a == 0x80_0000_0000 + 16 * GiB - 4096
    assert s.refs[0] == 4096 and s.refs[1] == 4096
    assert len(r.writes) == n  # nothing rewritten: identity entries already point there
    s.unmap(a, 8192)
    assert s.refs[:2] == [0, 0]
    with pytest.raises(SmptError):
        s.unmap(a, 8192)


def test_map_beyond_the_identity_window_rewrites_a_free_run():
    r = FakeRegisters()
    s = Smpt(r)
    s.init()
    s.map(0, 4096)  # entry 0 referenced
    far = 600 * GiB  # no identity entry points at this page
    a = s.map(far + 64, 64)
    assert a == 0x80_0000_0000 + 1 * 16 * GiB + (far + 64) % (16 * GiB)  # first unreferenced entry is 1
    assert r.values[regs.smpt(1)] == regs.smpt_value(far - far % (16 * GiB))
    assert s.to_card(far + 64) == a
    s.restore()
    assert r.values[regs.smpt(1)] == regs.smpt_value(far - far % (16 * GiB))


def test_a_run_broken_before_it_is_long_enough_fails_like_the_kernel():
    s = Smpt(FakeRegisters())
    s.init()
    s.pages[1] = 600 * GiB  # entry 0 points at page 0, entry 1 no longer at page 1
    s._reindex()
    with pytest.raises(SmptError):
        s.map(16 * GiB - 64, 128)


def test_page_refs_split_bytes_per_entry():
    assert page_refs(16 * GiB - 10, 30) == [10, 20]


# --- interrupts (spec 1.3, 2.3) ----------------------------------------------------------------------
def test_cookie_and_offsets():
    assert make_cookie(3, 9) == 3 | 9 << 16 and cookie_parts(3 | 9 << 16) == (3, 9)
    assert source_offset(IntrType.DB, 3) == 3 and source_offset(IntrType.DMA, 0) == 8
    assert source_offset(IntrType.ERR, 0) == 30
    with pytest.raises(InterruptError):
        source_offset(IntrType.DB, 4)


def _interrupts(counts, stepping=0x20, modes=(IrqMode.MSIX, IrqMode.MSI, IrqMode.INTX)):
    dev, r = FakeDevice(counts), FakeRegisters()
    return Interrupts(dev, r, stepping, modes), dev, r


def test_msix_needs_exactly_nine_vectors_and_enables_with_auto_clear():
    irq, dev, r = _interrupts({MSIX: 9, MSI: 1})
    assert irq.mode is IrqMode.MSIX and irq.num_vectors == 9 and len(dev.enabled[MSIX]) == 9
    assert r.values[regs.SICE0] == 0xFF0F and r.values[regs.SIAC0] == 0xFF0F
    irq.close()


def test_fewer_than_nine_msix_vectors_fall_back_to_msi_without_auto_clear():
    irq, dev, r = _interrupts({MSIX: 8, MSI: 1})
    assert irq.mode is IrqMode.MSI and irq.num_vectors == 1
    assert r.values[regs.SICE0] == 0xFF0F and regs.SIAC0 not in r.values
    irq.close()


def test_no_msi_falls_back_to_intx_and_none_at_all_is_an_error():
    irq, _dev, _r = _interrupts({INTX: 1})
    assert irq.mode is IrqMode.INTX
    irq.close()
    with pytest.raises(InterruptError):
        _interrupts({})


def test_each_msix_request_takes_the_first_empty_vector_and_sets_its_mxar_bit():
    irq, dev, r = _interrupts({MSIX: 9})
    calls = []
    c0 = irq.request(IntrType.DB, 0, lambda: calls.append("db0"))
    c1 = irq.request(IntrType.DMA, 2, lambda: calls.append("dma2"))
    assert cookie_parts(c0) == (0, 0) and cookie_parts(c1) == (1, 10)
    assert r.values[regs.mxar(0)] == 1 << 0 and r.values[regs.mxar(1)] == 1 << 10
    irq.free(c0)
    assert r.values[regs.mxar(0)] == 0
    c2 = irq.request(IntrType.DB, 3, lambda: calls.append("db3"))
    assert cookie_parts(c2) == (0, 3)  # vector 0 is empty again
    assert irq.dispatch(dev.fire(MSIX, 1)) == 1 and irq.dispatch(dev.fire(MSIX, 0)) == 1
    assert calls == ["dma2", "db3"]
    for k in range(7):
        irq.request(IntrType.DB, k % 4, lambda: None)
    with pytest.raises(InterruptError):
        irq.request(IntrType.DB, 0, lambda: None)
    irq.close()


def test_restore_resets_recorded_mxar_bits_after_the_card_lost_them():
    irq, _dev, r = _interrupts({MSIX: 9})
    irq.request(IntrType.DB, 1, lambda: None)
    irq.request(IntrType.DMA, 0, lambda: None)
    r.values.clear()  # a reset wiped MXAR
    irq.restore()
    assert r.values[regs.mxar(0)] == 1 << 1 and r.values[regs.mxar(1)] == 1 << 8
    irq.close()


def test_msi_handler_acks_sicr0_and_calls_only_doorbells():
    irq, dev, r = _interrupts({MSI: 1}, modes=(IrqMode.MSI,))
    calls = []
    irq.request(IntrType.DB, 2, lambda: calls.append("db2"))
    irq.request(IntrType.DB, 2, lambda: calls.append("db2'"))
    dma = irq.request(IntrType.DMA, 0, lambda: calls.append("dma0"))
    assert r.values[regs.mxar(0)] == 1 << 2 | 1 << 8  # MSI: every requester's bit in MXAR[0]
    r.values[regs.SICR0] = 1 << 2 | 1 << 8
    r.writes.clear()
    assert irq.dispatch(dev.fire(MSI)) == 2
    assert calls == ["db2", "db2'"]  # DMA callbacks are never called in MSI mode (spec 1.3)
    assert r.writes[0] == (regs.SICR0, 1 << 2 | 1 << 8)  # write-1-to-clear of what was read
    irq.free(dma)
    assert r.values[regs.mxar(0)] == 1 << 2
    irq.close()


def test_intx_programs_no_mxar_and_unmasks_after_dispatch():
    irq, dev, r = _interrupts({INTX: 1}, modes=(IrqMode.INTX,))
    hits = []
    irq.request(IntrType.DB, 0, lambda: hits.append(1))
    assert not any(off == regs.mxar(0) for off, _v in r.writes)
    r.values[regs.SICR0] = 1
    irq.dispatch(dev.fire(INTX))
    assert hits == [1] and dev.unmasked == 1
    irq.close()


@pytest.mark.parametrize("stepping,pba,rearm", [(0x00, True, False), (0x10, False, True), (0x20, False, True)])
def test_workarounds_per_stepping(stepping, pba, rearm):
    irq, dev, r = _interrupts({MSIX: 9}, stepping=stepping)
    irq.request(IntrType.DB, 0, lambda: None)
    r.writes.clear()
    irq.dispatch(dev.fire(MSIX, 0))
    offs = [off for off, _v in r.writes]
    assert (regs.MSIXPBACR in offs) == pba
    assert (regs.SICE0 in offs and regs.SIAC0 in offs) == rearm
    irq.close()


def test_the_rearm_after_an_interrupt_writes_what_enable_wrote_without_reading():
    irq, dev, r = _interrupts({MSIX: 9})
    r.values[regs.SIAC0] |= 1 << 30  # a bit the host did not set stays set
    irq.enable()
    irq.request(IntrType.DB, 0, lambda: None)
    r.reads.clear()
    r.writes.clear()
    irq.dispatch(dev.fire(MSIX, 0))
    assert r.reads == []
    assert r.writes == [(regs.SICE0, 0xFF0F), (regs.SIAC0, 0xFF0F | 1 << 30)]
    irq.close()


def test_disable_writes_enables_to_sicc0_and_clears_auto_clear():
    irq, _dev, r = _interrupts({MSIX: 9})
    irq.disable()
    assert r.values[regs.SICC0] == 0xFF0F and r.values[regs.SIAC0] == 0
    irq.close()


def test_a_claimed_msix_vector_leaves_the_interrupt_thread_until_freed():
    irq, dev, _r = _interrupts({MSIX: 9})
    calls = []
    cookie = irq.request(IntrType.DB, 1, lambda: calls.append(threading.current_thread()))
    other = irq.request(IntrType.DB, 2, lambda: calls.append("other"))
    t = InterruptThread(irq, name="test-irq")
    try:
        fd = irq.claim(cookie)
        assert fd == dev.enabled[MSIX][cookie_parts(cookie)[0]] and irq.claimed(fd)
        assert irq.claim(cookie) == fd  # idempotent
        dev.fire(MSIX, cookie_parts(cookie)[0])
        dev.fire(MSIX, cookie_parts(other)[0])
        deadline = time.monotonic() + 5
        while "other" not in calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert calls == ["other"]  # the thread left the claimed vector's eventfd alone
        assert irq.dispatch(fd) == 1 and calls[-1] is threading.current_thread()  # the claimer dispatches it
        irq.free(cookie)
        assert not irq.claimed(fd)
        cookie = irq.request(IntrType.DB, 1, lambda: calls.append("again"))  # the same vector, given back
        dev.fire(MSIX, cookie_parts(cookie)[0])
        deadline = time.monotonic() + 5
        while "again" not in calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls[-1] == "again"  # the thread watches it again
    finally:
        t.stop()
        irq.close()


def test_a_shared_vector_cannot_be_claimed():
    irq, _dev, _r = _interrupts({MSI: 1}, modes=(IrqMode.MSI,))
    assert irq.claim(irq.request(IntrType.DB, 0, lambda: None)) is None
    irq.close()
    irq, _dev, _r = _interrupts({MSIX: 9})
    with pytest.raises(InterruptError):
        irq.claim(make_cookie(0, 0))  # not requested
    irq.close()


def test_a_failing_callback_does_not_stop_dispatch():
    irq, dev, _r = _interrupts({MSIX: 9})
    irq.request(IntrType.DB, 0, lambda: 1 / 0)
    assert irq.dispatch(dev.fire(MSIX, 0)) == 1
    irq.close()


# --- SPAD2, post code, errors -----------------------------------------------------------------------
def test_download_info_fields():
    d = DownloadInfo(0x0400_0000 | 5 << 1 | 1)
    assert d.ready and d.apic_id == 5 and d.boot_addr == 0x0400_0000
    assert not DownloadInfo(0x0400_0000).ready


def test_post_code_is_two_characters_low_byte_first():
    assert post_code_text(0x3130) == "01"
    assert post_code_text(ord("F") | ord("F") << 8) == "FF"


def test_channel_error_names_channel_and_descriptor():
    e = DmaChannelError(2, 17, 0x4, "type 0 descriptor")
    assert "channel 2" in str(e) and "descriptor 17" in str(e) and "type 0" in str(e)
    assert (e.again().channel, e.again().descriptor) == (2, 17)
