"""The simulated card OS image: what the host loads as firmware and the bootstrap "jumps" to (spec 3.1, 6.5).

The host's loader treats the image as opaque bytes, except that it patches
two u32 of the x86 boot header in place when it loads a ramdisk (spec 3.1
step 7). So the image starts like an x86 bzImage, as far as any host
touches one, and carries the simulated card OS's own header after the
setup sectors, where a bzImage has its protected-mode kernel:

================  ====  ==============================================================
offset            size  field
================  ====  ==============================================================
0x1F1             1     setup_sects = 4: the "setup" is 1 + 4 sectors of 512 bytes
0x1F4             4     syssize: bytes after the setup, in 16-byte paragraphs
0x1FE             2     boot_flag 0xAA55
0x202             4     header "HdrS"
0x206             2     boot protocol version 0x020F (2.15)
0x211             1     loadflags: LOADED_HIGH
0x214             4     code32_start = pref_address
0x218             4     ramdisk_image -- 0 in the file; the host writes 2 x bootaddr
0x21C             4     ramdisk_size -- 0 in the file; the host writes the ramdisk size
0x228             4     cmd_line_ptr = 0 (the host never writes it, spec 3.1)
0x238             4     cmdline_size = 2047 (the host's 2048-byte buffer, spec 3.1 step 6)
0x258             8     pref_address: where the image is linked to run (64 MiB)
0x260             4     init_size: card memory from the load address the kernel owns
0xA00             64    the card OS header (below), then its strings
================  ====  ==============================================================

The card OS header (little endian, at ``(1 + setup_sects) * 512``):

====  ====  ================================================================
 off  size  field
====  ====  ================================================================
   0     8  magic ``b"MICDRVOS"``
   8     2  format version (:data:`FORMAT_VERSION`; the card refuses others)
  10     2  header size (64)
  12     4  payload size: this header plus the strings
  16     4  CRC-32 of the payload, computed with this field 0
  20     4  log_buf_len: bytes of the kernel log ring
  24     8  card physical address of ``__log_buf``
  32     8  card physical address of ``int log_buf_len``
  40     2  length of the release string
  42     2  length of the built-in command line
  44    20  reserved, 0
  64        release (UTF-8), then the built-in command line (UTF-8)
====  ====  ================================================================

The kernel is never relocated (cosm_debugfs.c relies on it): its data
sit at the absolute card physical addresses in the header wherever the
image was loaded, and ``System.map`` (:func:`system_map`) gives them as
kernel virtual addresses, physical + ``__START_KERNEL_map``, which is how
mpssd and the host's log reader use them (spec 3.5, 6.5).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from micdrv.cosm.klog import START_KERNEL_MAP

SECTOR = 512
SETUP_SECTS = 4                 # the boot protocol's minimum ("0 means 4")
SETUP_SECTS_OFF = 0x1F1
SYSSIZE_OFF = 0x1F4
BOOT_FLAG_OFF, BOOT_FLAG = 0x1FE, 0xAA55
HEADER_OFF, HEADER_MAGIC = 0x202, b"HdrS"
PROTOCOL_OFF, PROTOCOL_VERSION = 0x206, 0x020F
LOADFLAGS_OFF, LOADED_HIGH = 0x211, 0x01
CODE32_START_OFF = 0x214
RAMDISK_IMAGE_OFF, RAMDISK_SIZE_OFF = 0x218, 0x21C   # spec 3.1 step 7: the two fields the host patches
CMD_LINE_PTR_OFF = 0x228
CMDLINE_SIZE_OFF, CMDLINE_SIZE = 0x238, 2047
PREF_ADDRESS_OFF = 0x258
INIT_SIZE_OFF = 0x260
SETUP_HEADER_END = 0x268

OS_MAGIC = b"MICDRVOS"
FORMAT_VERSION = 1
OS_HEADER = struct.Struct("<8sHHIIIQQHH20x")
assert OS_HEADER.size == 64
OS_HEADER_OFF = (1 + SETUP_SECTS) * SECTOR  # 0xA00
MAX_PAYLOAD = 1 << 20           # a header and two strings; anything bigger is not ours
MAX_STRING = 4096

RELEASE = "micdrv-sim-cardos 1.0"
DEFAULT_PREF_ADDRESS = 64 << 20          # the bootstrap's default download address (spec 3.1 "typically 64M")
DEFAULT_INIT_SIZE = 16 << 20
DEFAULT_LOG_BUF_LEN = 1 << 17            # CONFIG_LOG_BUF_SHIFT = 17, the x86 default
DEFAULT_LOG_BUF_PHYS = DEFAULT_PREF_ADDRESS + (8 << 20)
DEFAULT_LOG_BUF_LEN_PHYS = DEFAULT_LOG_BUF_PHYS - 4096  # the int log_buf_len, a page of its own


class ImageError(ValueError):
    """Bytes that are not a simulated card OS image (or not one this card OS can run)."""


@dataclass(frozen=True)
class CardImage:
    """What the card OS takes from its image."""

    release: str
    builtin_cmdline: str
    log_buf_phys: int
    log_buf_len: int
    log_buf_len_phys: int
    pref_address: int
    init_size: int
    version: int = FORMAT_VERSION

    @property
    def log_buf_addr(self) -> int:
        """``__log_buf`` as System.map has it (kernel virtual)."""
        return self.log_buf_phys + START_KERNEL_MAP

    @property
    def log_buf_len_addr(self) -> int:
        """``log_buf_len`` as System.map has it (kernel virtual)."""
        return self.log_buf_len_phys + START_KERNEL_MAP


def build_image(*, builtin_cmdline: str = "", log_buf_len: int = DEFAULT_LOG_BUF_LEN,
                log_buf_phys: int = DEFAULT_LOG_BUF_PHYS, log_buf_len_phys: int = DEFAULT_LOG_BUF_LEN_PHYS,
                pref_address: int = DEFAULT_PREF_ADDRESS, init_size: int = DEFAULT_INIT_SIZE,
                release: str = RELEASE) -> bytes:
    """The bytes of an image file."""
    if not 64 <= log_buf_len <= 1 << 25 or log_buf_len & (log_buf_len - 1):
        raise ValueError(f"log_buf_len {log_buf_len} must be a power of two from 64 to 32 MiB")
    if log_buf_phys % 8 or log_buf_len_phys % 4:
        raise ValueError("__log_buf must be 8-byte and log_buf_len 4-byte aligned")
    if log_buf_len_phys + 4 > log_buf_phys and log_buf_phys + log_buf_len > log_buf_len_phys:
        raise ValueError("__log_buf and log_buf_len overlap")
    rel, cmd = release.encode(), builtin_cmdline.encode()
    if len(rel) > MAX_STRING or len(cmd) > MAX_STRING or b"\0" in rel + cmd:
        raise ValueError(f"release and built-in command line: at most {MAX_STRING} bytes each, no NUL")
    payload = bytearray(OS_HEADER.pack(OS_MAGIC, FORMAT_VERSION, OS_HEADER.size, OS_HEADER.size + len(rel) + len(cmd),
                                       0, log_buf_len, log_buf_phys, log_buf_len_phys, len(rel), len(cmd)) + rel + cmd)
    struct.pack_into("<I", payload, 16, zlib.crc32(payload))
    setup = bytearray(OS_HEADER_OFF)
    setup[SETUP_SECTS_OFF] = SETUP_SECTS
    struct.pack_into("<I", setup, SYSSIZE_OFF, -(-len(payload) // 16))
    struct.pack_into("<H", setup, BOOT_FLAG_OFF, BOOT_FLAG)
    setup[HEADER_OFF:HEADER_OFF + 4] = HEADER_MAGIC
    struct.pack_into("<H", setup, PROTOCOL_OFF, PROTOCOL_VERSION)
    setup[LOADFLAGS_OFF] = LOADED_HIGH
    struct.pack_into("<I", setup, CODE32_START_OFF, pref_address & 0xFFFFFFFF)
    struct.pack_into("<I", setup, CMDLINE_SIZE_OFF, CMDLINE_SIZE)
    struct.pack_into("<Q", setup, PREF_ADDRESS_OFF, pref_address)
    struct.pack_into("<I", setup, INIT_SIZE_OFF, init_size)
    return bytes(setup + payload)


def headers_size(head: bytes) -> int:
    """How many bytes from the image start :func:`parse_image` needs, given at least the setup header."""
    if len(head) < SETUP_HEADER_END:
        raise ImageError(f"{len(head)} bytes: too short for an x86 setup header ({SETUP_HEADER_END} bytes)")
    sects = head[SETUP_SECTS_OFF] or 4
    return (1 + sects) * SECTOR + OS_HEADER.size


def parse_image(data: bytes | bytearray | memoryview) -> CardImage:
    """Check and decode an image; :class:`ImageError` says what is wrong.

    ``data`` may be the whole image or its first bytes; the payload must be
    in it. The fields the host patches (0x218, 0x21C) are not checked.
    """
    data = bytes(data[:256 * SECTOR + MAX_PAYLOAD])  # setup_sects is a u8: the payload starts by then
    off = headers_size(data) - OS_HEADER.size
    if struct.unpack_from("<H", data, BOOT_FLAG_OFF)[0] != BOOT_FLAG or data[HEADER_OFF:HEADER_OFF + 4] != HEADER_MAGIC:
        raise ImageError("no x86 boot sector signature 0xAA55 and setup header \"HdrS\": not a kernel image")
    if len(data) < off + OS_HEADER.size:
        raise ImageError(f"{len(data)} bytes end before the card OS header at {off:#x}")
    (magic, version, hdr_size, payload_size, crc, log_buf_len, log_buf_phys, log_buf_len_phys, rel_len,
     cmd_len) = OS_HEADER.unpack_from(data, off)
    if magic != OS_MAGIC:
        raise ImageError(f"no card OS header at {off:#x} (magic {magic!r}, expected {OS_MAGIC!r}): an x86 kernel "
                         "this simulated card cannot run")
    if version != FORMAT_VERSION:
        raise ImageError(f"image format version {version}; this card OS runs version {FORMAT_VERSION}")
    if hdr_size != OS_HEADER.size or payload_size != hdr_size + rel_len + cmd_len or payload_size > MAX_PAYLOAD:
        raise ImageError(f"inconsistent sizes: header {hdr_size}, payload {payload_size}, "
                         f"strings {rel_len} + {cmd_len}")
    if len(data) < off + payload_size:
        raise ImageError(f"the payload of {payload_size} bytes at {off:#x} is cut short ({len(data)} bytes)")
    payload = bytearray(data[off:off + payload_size])
    struct.pack_into("<I", payload, 16, 0)
    if zlib.crc32(payload) != crc:
        raise ImageError(f"CRC-32 mismatch over the {payload_size}-byte payload: the image is damaged")
    if not 64 <= log_buf_len <= 1 << 25 or log_buf_len & (log_buf_len - 1):
        raise ImageError(f"log_buf_len {log_buf_len} is not a power of two from 64 to 32 MiB")
    strings = data[off + hdr_size:off + payload_size]
    try:
        release, cmdline = strings[:rel_len].decode(), strings[rel_len:].decode()
    except UnicodeDecodeError as e:
        raise ImageError(f"release or built-in command line is not UTF-8: {e}") from None
    pref, init_size = struct.unpack_from("<QI", data, PREF_ADDRESS_OFF)
    return CardImage(release, cmdline, log_buf_phys, log_buf_len, log_buf_len_phys, pref, init_size, version)


def system_map(image: CardImage) -> str:
    """The ``System.map`` lines mpssd reads (spec 6.5): ``<address> <type> <symbol>``, sorted by address."""
    syms = [(image.pref_address + START_KERNEL_MAP, "T", "_text"),
            (image.log_buf_len_addr, "d", "log_buf_len"),
            (image.log_buf_addr, "b", "__log_buf")]
    return "".join(f"{addr:016x} {kind} {name}\n" for addr, kind, name in sorted(syms))


def write_files(path, *, builtin_cmdline: str = "", log_buf_len: int = DEFAULT_LOG_BUF_LEN):
    """Write the image to ``path`` and its ``System.map`` beside it, as a card's firmware directory holds them.

    Returns the System.map path. ``micdrv sim image`` and ``micdrv --simulate`` both come here.
    """
    from pathlib import Path
    out = Path(path)
    data = build_image(builtin_cmdline=builtin_cmdline, log_buf_len=log_buf_len)
    smap = out.parent / "System.map"
    out.write_bytes(data)
    smap.write_text(system_map(parse_image(data)))
    return smap
