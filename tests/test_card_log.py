"""The card kernel's log: the card's ring writer, the host's BAR0 reader, hostile contents (spec 3.5, 6.5)."""

import struct

import pytest

from micdrv.cosm.klog import (MAX_LOG_BUF_LEN, START_KERNEL_MAP, CardLogError, log_text, read_log_buf,
                              system_map_symbols)
from micdrv.sim.cardos.klog import KernelLog

MEM = 1 << 20
BUF, LEN = 0x40000, 0x3F000  # __log_buf and log_buf_len, card physical


class Card:
    """Card memory both ways: the card OS's CardSide calls and the host's read_card (BAR0)."""

    def __init__(self):
        self.ram = bytearray(MEM)
        self.memory_size = MEM
        self.reads = []

    # the card's side
    def write(self, addr, data):
        self.ram[addr:addr + len(data)] = data

    def write32(self, addr, v):
        struct.pack_into("<I", self.ram, addr, v)

    # the host's side
    def read_card(self, addr, n):
        assert 0 <= addr and addr + n <= MEM, "the reader went outside card memory"
        self.reads.append((addr, n))
        return bytes(self.ram[addr:addr + n])


def va(phys):
    return phys + START_KERNEL_MAP


def test_lines_written_by_the_card_read_back_in_order_through_the_host_reader():
    card = Card()
    klog = KernelLog(card, BUF, 4096, LEN)
    for i in range(10):
        klog.printk(f"line {i}")
    raw = read_log_buf(card, va(BUF), va(LEN))
    assert len(raw) == 4096 and card.reads == [(LEN, 4), (BUF, 4096)]  # length first, then the buffer
    lines = log_text(raw).splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [f"line {i}" for i in range(10)]
    assert all(line.startswith("[") and "." in line[:14] for line in lines)


def test_a_wrapped_ring_keeps_the_newest_lines_in_order_and_drops_the_torn_one():
    card = Card()
    klog = KernelLog(card, BUF, 1024, LEN)
    for i in range(200):
        klog.printk(f"message number {i:03d}")
    text = log_text(read_log_buf(card, va(BUF), va(LEN)))
    got = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines()]
    assert got == list(range(got[0], 200)) and len(got) > 20  # contiguous, ending at the newest
    assert card.ram[BUF:BUF + 1024].count(0) == 1  # exactly one NUL: after the newest byte


def test_a_line_longer_than_printk_allows_is_cut_and_nuls_are_spaces():
    card = Card()
    klog = KernelLog(card, BUF, 8192, LEN)
    klog.printk("a\0b" + "x" * 5000)
    line = log_text(read_log_buf(card, va(BUF), va(LEN)))
    assert "a b" in line and len(line.encode()) == 1024


def test_unset_addresses_read_nothing():
    card = Card()
    assert read_log_buf(card, 0, va(LEN)) == b"" and read_log_buf(card, va(BUF), 0) == b""
    assert card.reads == []


@pytest.mark.parametrize("addr, length, size, match", [
    (BUF, LEN, None, "not a card kernel address"),                 # physical, not kernel virtual
    (va(BUF), va(MEM - 2), None, "run past card memory"),           # the length int itself outside
    (va(BUF), va(LEN), -1, "-1 bytes"),
    (va(BUF), va(LEN), MAX_LOG_BUF_LEN + 1, "0..33554432"),
    (va(MEM - 16), va(LEN), 4096, "runs past card memory"),
    (va(MEM + 4096), va(LEN), 16, "outside card memory"),
    (va(BUF), 1 << 64, None, "not a card kernel address"),
])
def test_what_a_hostile_card_or_a_wrong_system_map_gives_is_refused(addr, length, size, match):
    card = Card()
    if size is not None:
        struct.pack_into("<i", card.ram, LEN, size)
    with pytest.raises(CardLogError, match=match):
        read_log_buf(card, addr, length)
    assert all(a + n <= MEM for a, n in card.reads)


def test_a_zero_length_buffer_is_empty():
    card = Card()
    assert read_log_buf(card, va(BUF), va(LEN)) == b""


def test_log_text_of_a_buffer_without_nul_and_with_bad_utf8():
    assert log_text(b"no marker\n") == "no marker\n"
    assert log_text(b"bad \xff byte\n\0\0") == "bad \ufffd byte\n"
    assert log_text(b"") == ""


def test_system_map_symbols_as_mpssd_reads_them():
    text = ("ffffffff81000000 T _text\n"
            "garbage line\n"
            "zzzz d log_buf_len\n"                 # not hex: skipped
            "ffffffff847ff000 d log_buf_len\n"
            "ffffffff84800000 b __log_buf\n"
            "ffffffff84900000 b __log_buf\n")      # the first one counts
    assert system_map_symbols(text) == {"log_buf_len": 0xFFFFFFFF847FF000, "__log_buf": 0xFFFFFFFF84800000}
    assert system_map_symbols("") == {}
