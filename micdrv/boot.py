"""Booting an X100: the OS image, command line and ramdisk in card memory, and the device page (spec 3.1-3.3).

``load_mic_fw`` (spec 3.1) puts three things into card memory through BAR0
at the download address the card's bootstrap published in SPAD2:

========================  ===================================================
card physical address     what
========================  ===================================================
bootaddr                  the OS image, byte for byte (SPAD5 = its size)
bootaddr + image size     the command line: ``" mem=<BAR0 MiB>M"``, then
                          ``" " + cmdline`` if there is one, NUL-terminated,
                          2048 bytes at most with the NUL
2 x bootaddr              the ramdisk, if any; the image's x86 boot header
                          then records it: u32 ``ramdisk_image`` at image
                          offset 0x218 = 2 x bootaddr, u32 ``ramdisk_size``
                          at 0x21C = its size (spec 3.1 step 7)
========================  ===================================================

The loader knows nothing of the image's format beyond those two header
fields: it is "any firmware".

Unlike the kernel, which checks as it goes, this loader does every check
first -- :func:`prepare` reads the files and validates sizes and addresses
and returns a :class:`LoadPlan`; only :meth:`LoadPlan.load` writes to the
card. So a :class:`~micdrv.cosm.hwops.BootError` (missing or unreadable
file, image too large, bad download address, flash bootmode, a command line
over 2048 bytes) leaves card memory and registers untouched. Where the
kernel would silently truncate a long command line (``snprintf``) or copy a
ramdisk over the image or past card memory, this loader refuses: those are
boots that cannot work.

:class:`DevicePage` is the 4 KiB of host memory the card finds through
SPAD14/15 (spec 1.4 step 7, 3.3): allocated in the DmaArena, given to the
card at its SMPT address, with ``struct mic_bootparam`` at its start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .addr import CardPhys, Iova
from .bootparam import MIC_DP_SIZE, Bootparam
from .cosm.hwops import BootError, BootSpec
from .memory import Memory
from .pci.arena import PAGE, DmaArena
from .x100 import regs
from .x100.card import DownloadInfo
from .x100.mmio import Aperture

CMDLINE_SIZE = 2048          # spec 3.1 step 6: the command line buffer, NUL included
RAMDISK_IMAGE_OFF = 0x218    # spec 3.1 step 7: boot_params.hdr.ramdisk_image (x86 boot protocol)
RAMDISK_SIZE_OFF = 0x21C     # spec 3.1 step 7: boot_params.hdr.ramdisk_size
BOOTMODES = ("linux", "flash")  # spec 3.5: the only bootmode values sysfs accepts


class LoaderCard(Protocol):
    """What the loader needs of the card (a subset of :class:`micdrv.x100.hwops.CardOps`)."""

    aperture: Aperture

    def write_spad(self, idx: int, value: int) -> None: ...


def _read_file(step: str, path: Path, limit: int) -> bytes:
    """The whole file, or a BootError naming the step and the file (never reads more than ``limit``)."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise BootError(step, f"{path}: {e.strerror or e}") from None
    if not os.path.isfile(path):
        raise BootError(step, f"{path}: not a regular file")
    if size > limit:
        raise BootError(step, f"{path} is {size} bytes, more than the {limit} bytes of card memory it may use")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise BootError(step, f"{path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise BootError(step, f"{path} grew past {limit} bytes while it was read")
    return data


def command_line(memory_size: int, cmdline: str) -> bytes:
    """The NUL-terminated command line the host writes after the image (spec 3.1 step 6)."""
    text = f" mem={memory_size >> 20}M"
    if cmdline:
        text += f" {cmdline}"
    if "\0" in text:
        raise BootError("cmdline", "the command line contains a NUL byte")
    raw = text.encode("utf-8") + b"\0"
    if len(raw) > CMDLINE_SIZE:
        raise BootError("cmdline", f"{len(raw)} bytes with the NUL and \" mem=...M\"; the card's buffer holds "
                                   f"{CMDLINE_SIZE} (spec 3.1 step 6)")
    return raw


@dataclass(frozen=True)
class LoadPlan:
    """A validated boot: everything :meth:`load` writes, and where (spec 3.1)."""

    boot_addr: CardPhys
    apic_id: int
    image: bytes
    cmdline: bytes            # NUL-terminated
    ramdisk: bytes | None
    memory_size: int

    @property
    def image_size(self) -> int:
        return len(self.image)

    @property
    def cmdline_addr(self) -> CardPhys:
        return CardPhys(self.boot_addr + len(self.image))

    @property
    def ramdisk_addr(self) -> CardPhys:
        """2 x the boot address ("typically 64M" so the ramdisk lands at 128M, spec 3.1 step 7)."""
        return CardPhys(2 * self.boot_addr)

    def load(self, card: LoaderCard) -> None:
        """``load_mic_fw`` steps 3-7: image, SPAD5, command line, ramdisk and its two header fields."""
        aper = card.aperture
        aper.write(self.boot_addr, self.image)
        card.write_spad(regs.SPAD_FW_SIZE, len(self.image))
        aper.write(self.cmdline_addr, self.cmdline)
        if self.ramdisk is not None:
            aper.write(self.ramdisk_addr, self.ramdisk)
            mem = aper.memory()
            mem.write_u32(self.boot_addr + RAMDISK_IMAGE_OFF, self.ramdisk_addr)
            mem.write_u32(self.boot_addr + RAMDISK_SIZE_OFF, len(self.ramdisk))


def prepare(boot: BootSpec, info: DownloadInfo, memory_size: int) -> LoadPlan:
    """Read and check everything a boot will write; raises :class:`BootError` naming the step.

    ``info`` is SPAD2 as read from the card now, ``memory_size`` the BAR0
    length. Nothing is written anywhere.
    """
    if boot.bootmode not in BOOTMODES:
        raise BootError("bootmode", f"{boot.bootmode!r} is not one of {', '.join(BOOTMODES)} (spec 3.5)")
    if boot.bootmode == "flash":
        raise BootError("bootmode", "flash mode is not supported (upstream load_mic_fw returns -EINVAL, "
                                    "spec 3.1 step 5)")
    if not info.ready:
        raise BootError("download address", f"the card is not ready for a download (SPAD2 = {info.raw:#010x}, "
                                            "bit 0 clear; reset it first)")
    boot_addr = info.boot_addr
    if boot_addr > regs.MAX_BOOT_ADDR:
        raise BootError("download address", f"the card asks for the image at {boot_addr:#x}, above "
                                            f"{regs.MAX_BOOT_ADDR:#x} (spec 3.1 step 1)")
    if boot_addr >= memory_size:
        raise BootError("download address", f"{boot_addr:#x} is outside the card's {memory_size:#x} bytes "
                                            "of memory")
    image = _read_file("firmware", Path(boot.firmware), memory_size - boot_addr)
    if not image:
        raise BootError("firmware", f"{boot.firmware} is empty")
    cmdline = command_line(memory_size, boot.cmdline)
    end = boot_addr + len(image) + len(cmdline)
    if end > memory_size:
        raise BootError("cmdline", f"the command line after a {len(image)}-byte image at {boot_addr:#x} "
                                   f"runs past card memory ({memory_size:#x} bytes)")
    ramdisk = None
    if boot.ramdisk is not None:
        rd_addr = 2 * boot_addr
        if len(image) < RAMDISK_SIZE_OFF + 4:
            raise BootError("ramdisk", f"the image ({len(image)} bytes) is too short for the x86 boot header "
                                       f"fields at {RAMDISK_IMAGE_OFF:#x}/{RAMDISK_SIZE_OFF:#x} that record "
                                       "the ramdisk (spec 3.1 step 7)")
        if rd_addr < end:
            raise BootError("ramdisk", f"at 2 x the boot address ({rd_addr:#x}) it would overwrite the image "
                                       f"and command line, which end at {end:#x}")
        if rd_addr >= memory_size:
            raise BootError("ramdisk", f"2 x the boot address ({rd_addr:#x}) is outside card memory "
                                       f"({memory_size:#x} bytes)")
        ramdisk = _read_file("ramdisk", Path(boot.ramdisk), memory_size - rd_addr)
        if rd_addr + len(ramdisk) > 0xFFFFFFFF:
            raise BootError("ramdisk", "its address and size do not fit the 32-bit boot header fields")
    return LoadPlan(boot_addr, info.apic_id, image, cmdline, ramdisk, memory_size)


class DevicePage:
    """The 4 KiB device page in the DmaArena with ``struct mic_bootparam`` at offset 0 (spec 1.4 step 7, 3.3).

    ``card_addr`` is where the card reaches it (the SMPT address, spec 2.4),
    the value for SPAD14/15.
    """

    def __init__(self, arena: DmaArena, to_card):
        self.arena = arena
        self.allocation = arena.alloc(MIC_DP_SIZE, align=PAGE)
        try:
            self.iova = Iova(arena.iova(self.allocation))
            self.card_addr: CardPhys = to_card(self.iova, MIC_DP_SIZE)
            self.memory: Memory = arena.memory().window(self.iova, MIC_DP_SIZE, "device page")
            self.memory.write(self.iova, bytes(MIC_DP_SIZE))  # kzalloc (spec 1.4 step 7)
            self.bootparam = Bootparam(self.memory, self.iova)
        except BaseException:
            arena.free(self.allocation)
            raise

    def init(self, node_id: int) -> None:
        """``mic_bootparam_init`` (spec 3.3): before every boot and after every stop."""
        self.bootparam.init(node_id)

    def close(self) -> None:
        if self.allocation is not None:
            self.arena.free(self.allocation)
            self.allocation = None
