"""The simulated card OS image format, its System.map, the command-line parameters and the card heap."""

import struct
import subprocess
import sys
import zlib

import pytest

from micdrv.cosm.klog import START_KERNEL_MAP, system_map_symbols
from micdrv.sim.cardos import params
from micdrv.sim.cardos.image import (DEFAULT_LOG_BUF_LEN, DEFAULT_PREF_ADDRESS, FORMAT_VERSION, OS_HEADER_OFF,
                                     ImageError, build_image, parse_image, system_map)
from micdrv.sim.cardos.memory import LOW_MEMORY, CardHeap, free_ranges
from tests.sim_harness import REPO


def test_the_image_looks_like_a_bzimage_where_a_host_looks():
    img = build_image()
    assert struct.unpack_from("<H", img, 0x1FE)[0] == 0xAA55 and img[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", img, 0x206)[0] == 0x020F and img[0x1F1] == 4
    assert struct.unpack_from("<II", img, 0x218) == (0, 0)  # ramdisk_image, ramdisk_size: the host's to fill
    assert struct.unpack_from("<I", img, 0x228)[0] == 0 and struct.unpack_from("<I", img, 0x238)[0] == 2047
    assert struct.unpack_from("<Q", img, 0x258)[0] == DEFAULT_PREF_ADDRESS
    assert img[OS_HEADER_OFF:OS_HEADER_OFF + 8] == b"MICDRVOS"
    assert struct.unpack_from("<I", img, 0x1F4)[0] * 16 >= len(img) - OS_HEADER_OFF  # syssize covers the payload


def test_build_and_parse_round_trip_and_the_ramdisk_patch_does_not_disturb_it():
    img = bytearray(build_image(builtin_cmdline="micdrv_sim.heartbeat=5", log_buf_len=1 << 20))
    struct.pack_into("<II", img, 0x218, 128 << 20, 4096)  # what the host does when it loads a ramdisk
    im = parse_image(img)
    assert (im.version, im.builtin_cmdline, im.log_buf_len) == (FORMAT_VERSION, "micdrv_sim.heartbeat=5", 1 << 20)
    assert im.release.startswith("micdrv-sim-cardos") and im.pref_address == DEFAULT_PREF_ADDRESS
    assert im.log_buf_addr == im.log_buf_phys + START_KERNEL_MAP


def test_system_map_names_the_log_symbols_at_their_kernel_addresses():
    im = parse_image(build_image())
    syms = system_map_symbols(system_map(im))
    assert syms == {"__log_buf": im.log_buf_phys + 0xFFFF_FFFF_8000_0000,
                    "log_buf_len": im.log_buf_len_phys + 0xFFFF_FFFF_8000_0000}
    lines = system_map(im).splitlines()
    assert lines == sorted(lines) and all(len(line.split()[0]) == 16 for line in lines)


def damaged(offset, value, fmt="<H"):
    img = bytearray(build_image())
    struct.pack_into(fmt, img, offset, value)
    return bytes(img)


@pytest.mark.parametrize("data, match", [
    (b"", "too short"),
    (bytes(0x1000), "not a kernel image"),
    (damaged(0x1FE, 0x1234), "not a kernel image"),
    (damaged(OS_HEADER_OFF, 0x1234), "no card OS header"),
    (damaged(OS_HEADER_OFF + 8, 2), "format version 2"),
    (damaged(OS_HEADER_OFF + 12, 9999, "<I"), "inconsistent sizes"),
    (damaged(OS_HEADER_OFF + 16, 0, "<I"), "CRC-32"),
    (build_image()[:OS_HEADER_OFF + 70], "cut short"),
    (build_image()[:OS_HEADER_OFF + 10], "end before the card OS header"),
])
def test_malformed_images_are_refused_with_the_reason(data, match):
    with pytest.raises(ImageError, match=match):
        parse_image(data)


def test_a_bad_log_buf_len_is_refused_even_with_a_good_crc():
    img = bytearray(build_image())
    struct.pack_into("<I", img, OS_HEADER_OFF + 20, 1000)  # not a power of two
    payload = bytearray(img[OS_HEADER_OFF:])
    struct.pack_into("<I", payload, 16, 0)
    struct.pack_into("<I", img, OS_HEADER_OFF + 16, zlib.crc32(payload))
    with pytest.raises(ImageError, match="log_buf_len 1000"):
        parse_image(img)


@pytest.mark.parametrize("kw", [{"log_buf_len": 1000}, {"log_buf_len": 1 << 26}, {"log_buf_phys": 3},
                                {"builtin_cmdline": "a\0b"}, {"log_buf_len_phys": DEFAULT_PREF_ADDRESS + (8 << 20)}])
def test_the_generator_refuses_parameters_the_card_could_not_use(kw):
    with pytest.raises(ValueError):
        build_image(**kw)


def test_micdrv_sim_image_writes_the_image_and_system_map(tmp_path):
    out = tmp_path / "uos.img"
    r = subprocess.run([sys.executable, "-m", "micdrv.sim", "image", "--output", str(out), "--cmdline",
                        "micdrv_sim.heartbeat=2", "--log-buf-len", "256K"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    im = parse_image(out.read_bytes())
    assert im.builtin_cmdline == "micdrv_sim.heartbeat=2" and im.log_buf_len == 256 << 10
    assert system_map_symbols((tmp_path / "System.map").read_text())["__log_buf"] == im.log_buf_addr
    bad = subprocess.run([sys.executable, "-m", "micdrv.sim", "image", "--output", str(out), "--log-buf-len", "1000"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "power of two" in bad.stderr


# --- the kernel command line ----------------------------------------------------------------------------
def test_defaults_are_the_specs():
    p = params.parse("")
    assert (p.heartbeat, p.connect_retries, p.connect_interval, p.scif_poll, p.scif_timeout) == (30, 10, 1, 1, 30)
    assert DEFAULT_LOG_BUF_LEN == 1 << 17


def test_the_hosts_command_line_comes_after_the_builtin_one_and_wins():
    p = params.parse("micdrv_sim.heartbeat=5 quiet",
                     " mem=8192M micdrv_sim.heartbeat=0.25 micdrv_sim.connect_retries=3")
    assert (p.heartbeat, p.connect_retries, p.mem_mib) == (0.25, 3, 8192)
    assert p.other == ["quiet"] and p.warnings == []


@pytest.mark.parametrize("word, warning", [("micdrv_sim.heartbeat=0", "not a time"),
                                           ("micdrv_sim.heartbeat=nan", "not a time"),
                                           ("micdrv_sim.heartbeat", "needs a value"),
                                           ("micdrv_sim.connect_retries=0", "not a count"),
                                           ("micdrv_sim.colour=red", "unknown parameter"),
                                           ("mem=lots", "not <n>M")])
def test_bad_parameters_are_reported_and_leave_the_default(word, warning):
    p = params.parse(word)
    assert warning in p.warnings[0] and p.heartbeat == 30 and p.connect_retries == 10 and p.mem_mib is None


# --- card memory -------------------------------------------------------------------------------------------
def test_free_ranges_leave_out_low_memory_and_what_is_used():
    used = [(64 << 20, 80 << 20), (72 << 20, 73 << 20), (128 << 20, 129 << 20), (300 << 20, 400 << 20)]
    assert free_ranges(256 << 20, used) == [(LOW_MEMORY, 64 << 20), (80 << 20, 128 << 20), (129 << 20, 256 << 20)]


def test_the_heap_aligns_reuses_and_refuses_double_frees():
    h = CardHeap(0x10_0100, 0x20_0000)
    assert h.start == 0x10_1000  # page-aligned start
    a = h.alloc(100)
    b = h.alloc(0x1000, align=0x1000)
    assert a % 64 == 0 and b % 0x1000 == 0 and a + 128 <= b
    h.free(a, 100)
    assert h.alloc(64) == a
    with pytest.raises(ValueError):
        h.free(b, 0x1000) or h.free(b, 0x1000)
    with pytest.raises(MemoryError):
        h.alloc(1 << 30)
