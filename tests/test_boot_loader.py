"""The boot loader on its own: what load_mic_fw writes where, and every refusal (spec 3.1, 3.3)."""

import struct

import pytest

from micdrv.boot import CMDLINE_SIZE, DevicePage, command_line, prepare
from micdrv.bootparam import MIC_MAGIC
from micdrv.cosm.hwops import BootError, BootSpec
from micdrv.memory import BufferMemory
from micdrv.pci import DmaArena
from micdrv.x100 import regs
from micdrv.x100.card import DownloadInfo

MEM = 16 << 20
BOOT = 4 << 20


def spad2(addr: int = BOOT, apic: int = 240, ready: bool = True) -> DownloadInfo:
    return DownloadInfo(addr | apic << 1 | int(ready))


class FakeAperture:
    def __init__(self):
        self.buf = bytearray(MEM)
        self.mem = BufferMemory(self.buf)
        self.writes = 0

    def write(self, addr, data):
        self.writes += 1
        self.mem.write(addr, data)

    def memory(self):
        return self.mem


class FakeCard:
    def __init__(self):
        self.aperture = FakeAperture()
        self.spads = {}

    def write_spad(self, i, v):
        self.spads[i] = v


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "uos.img"
    p.write_bytes(bytes(range(256)) * 8)  # 2 KiB, long enough for the 0x218/0x21C fields
    return p


def test_image_cmdline_spad5_and_ramdisk_land_where_spec_3_1_says(image, tmp_path):
    rd = tmp_path / "rd"
    rd.write_bytes(b"R" * 5000)
    plan = prepare(BootSpec(image, ramdisk=rd, cmdline="console=hvc0"), spad2(), MEM)
    card = FakeCard()
    plan.load(card)
    buf, n = card.aperture.buf, len(image.read_bytes())
    img = bytearray(image.read_bytes())
    struct.pack_into("<II", img, 0x218, 2 * BOOT, 5000)  # the host patches the image's boot header
    assert buf[BOOT:BOOT + n] == img
    assert card.spads == {regs.SPAD_FW_SIZE: n}
    assert buf[BOOT + n:BOOT + n + 22] == b" mem=16M console=hvc0\0"
    assert buf[2 * BOOT:2 * BOOT + 5000] == b"R" * 5000
    assert (plan.apic_id, plan.cmdline_addr, plan.ramdisk_addr) == (240, BOOT + n, 2 * BOOT)


def test_without_a_cmdline_only_mem_is_written():
    assert command_line(8 << 30, "") == b" mem=8192M\0"


def test_the_cmdline_may_fill_the_2048_byte_buffer_but_no_more():
    fits = "x" * (CMDLINE_SIZE - len(" mem=16M ") - 1)
    assert len(command_line(MEM, fits)) == CMDLINE_SIZE
    with pytest.raises(BootError, match="cmdline"):
        command_line(MEM, fits + "x")
    with pytest.raises(BootError, match="NUL"):
        command_line(MEM, "a\0b")


@pytest.mark.parametrize("make, step, match", [
    (lambda t, img: (BootSpec(img), spad2(ready=False)), "download address", "not ready"),
    (lambda t, img: (BootSpec(img), spad2(0x8000_1000)), "download address", "above 0x80000000"),
    (lambda t, img: (BootSpec(img), spad2(MEM)), "download address", "outside"),
    (lambda t, img: (BootSpec(t / "none"), spad2()), "firmware", "No such file"),
    (lambda t, img: (BootSpec(t), spad2()), "firmware", "not a regular file"),
    (lambda t, img: (BootSpec(img, bootmode="flash"), spad2()), "bootmode", "flash mode is not supported"),
    (lambda t, img: (BootSpec(img, bootmode="windows"), spad2()), "bootmode", "not one of linux, flash"),
    (lambda t, img: (BootSpec(img, ramdisk=t / "none"), spad2()), "ramdisk", "No such file"),
    (lambda t, img: (BootSpec(img, ramdisk=img), spad2(MEM // 2)), "ramdisk", "outside card memory"),
])
def test_bad_boots_are_refused_before_anything_is_written(tmp_path, image, make, step, match):
    spec, info = make(tmp_path, image)
    with pytest.raises(BootError, match=match) as e:
        prepare(spec, info, MEM)
    assert e.value.step == step and str(e.value).startswith(step)


def test_an_image_too_large_for_card_memory(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(MEM - BOOT + 1)
    with pytest.raises(BootError, match="firmware: .* more than the 12582912 bytes"):
        prepare(BootSpec(big), spad2(), MEM)
    with open(big, "r+b") as f:
        f.truncate(MEM - BOOT - 5)  # fits, but its 10-byte command line does not
    with pytest.raises(BootError, match="cmdline: .* runs past card memory"):
        prepare(BootSpec(big), spad2(), MEM)


def test_a_ramdisk_that_would_overwrite_the_image_or_needs_a_header_the_image_lacks(tmp_path, image):
    short = tmp_path / "short"
    short.write_bytes(b"k" * 0x100)
    with pytest.raises(BootError, match="too short for the x86 boot header"):
        prepare(BootSpec(short, ramdisk=image), spad2(), MEM)
    long = tmp_path / "long"
    long.write_bytes(b"k" * 0x1800)
    with pytest.raises(BootError, match="overwrite the image"):
        prepare(BootSpec(long, ramdisk=image), spad2(0x1000), MEM)  # 2 x 4 KiB is inside the image


def test_the_device_page_is_a_zeroed_arena_page_with_the_bootparam_and_its_smpt_address():
    class Dev:
        closed = False

        def dma_map(self, *a):
            pass

        def dma_unmap(self, *a):
            pass

    with DmaArena(1 << 20) as arena:
        arena.map(Dev(), 0x2000_0000)
        junk = arena.alloc(4096, align=4096)
        arena.buf(junk)[:] = b"\xEE" * 4096
        arena.free(junk)
        dp = DevicePage(arena, lambda iova, size: regs.SYSTEM_WINDOW + iova)
        assert dp.iova % 4096 == 0 and dp.card_addr == regs.SYSTEM_WINDOW + dp.iova
        page = arena.slice(dp.iova - arena.iova_base, 4096)
        assert bytes(page) == bytes(4096)  # kzalloc
        dp.init(node_id=3)
        assert struct.unpack_from("<IbBBBQQ", page) == (MIC_MAGIC, -1, 3, 0xFF, 0xFF, 0, 0)
        free = arena.free_bytes
        dp.close()
        assert arena.free_bytes == free + 4096
