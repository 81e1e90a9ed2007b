"""The simulated card OS: what the bootstrap jumps to after the boot kick (spec 3, 7, 8, 9).

A card OS is any object with ``run(side)``: the simulated card
(:class:`~micdrv.sim.card.X100Card`) creates one per accepted boot kick from
its ``os_factory`` and calls ``run`` in a thread of its own with a
:class:`~micdrv.sim.card.CardSide`, the card's hardware as card software
sees it. ``run`` must return once ``side.stopped`` is set (a card reset);
every ``side`` access then raises :class:`~micdrv.sim.card.CardOSStopped`.
``control(action, **args)``, if the OS has it, serves the control socket's
``kernel`` command.

:class:`SimCardOS` is the default. Like a real card with a real kernel, it
first looks at what the host loaded (:mod:`.image`): SPAD5 gives the image
size (spec 2.2); the image at the download address must be a card OS image
of a format version it runs, with an intact CRC. Anything else -- a
garbage image, a plain x86 kernel, a damaged file -- gets post code 3E, a
line in the simulator's log and an error in the published record, and the
card never comes up. A good image becomes a :class:`~.kernel.Kernel`, which
brings the card up (device page, DMA, SCIF, COSM client, the log ring in
GDDR) and runs until the card is reset.

Modules:

=================  =================================================================
:mod:`.image`      the image format, its generator and ``System.map``
:mod:`.params`     the kernel command line: ``micdrv_sim.*`` parameters
:mod:`.memory`     Memory over the card bus, the kernel heap
:mod:`.klog`       the kernel log ring in GDDR (``__log_buf``, ``log_buf_len``)
:mod:`.dma`        DMA channels 4-7
:mod:`.scif`       the card's SCIF node and node queue pair
:mod:`.cosm_client` the COSM client: connect, heartbeat, SYNC_TIME, SHUTDOWN
:mod:`.kernel`     bring-up order, the device list, poweroff/halt/reboot/panic/hang
=================  =================================================================
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from typing import TYPE_CHECKING, Protocol

from micdrv.x100 import regs

from ..bus import CardFault
from .image import RAMDISK_IMAGE_OFF, SETUP_HEADER_END, ImageError, parse_image
from .kernel import POST_BAD_IMAGE, POST_OS_STARTED, BootFailure, Kernel

if TYPE_CHECKING:
    from ..card import CardSide

log = logging.getLogger(__name__)

MAX_HEADERS = 256 * 512 + (1 << 20)  # what parse_image may need: setup sectors and the payload


class CardOS(Protocol):
    def run(self, side: "CardSide") -> None:
        """The OS's main, in its own thread; return when ``side.stopped`` is set (or earlier)."""


class SimCardOS:
    """The simulated card OS: check the image, then run a :class:`~.kernel.Kernel` on it."""

    def __init__(self):
        self.kernel: Kernel | None = None

    def run(self, side: "CardSide") -> None:
        side.post(POST_OS_STARTED)
        rec: dict = {"os": "micdrv-sim-cardos", "state": "starting", "started": time.time(),
                     "download_addr": side.download_addr, "memory_size": side.memory_size, "errors": []}
        try:
            image = self._read_image(side, rec)
            self.kernel = Kernel(side, image, rec)
        except (ImageError, BootFailure) as e:
            rec["state"] = "bad image"
            rec["errors"].append(str(e))
            log.error("card OS: the image at %#x cannot run: %s", side.download_addr, e)
            side.post(POST_BAD_IMAGE)
            side.publish(rec)
            return
        except CardFault as e:
            if side.stopped.is_set():
                return
            rec["state"] = "bad image"
            rec["errors"].append(str(e))
            log.error("card OS: reading the image: %s", e)
            side.post(POST_BAD_IMAGE)
            side.publish(rec)
            return
        self.kernel.main()

    @staticmethod
    def _read_image(side: "CardSide", rec: dict):
        size = side.spad(regs.SPAD_FW_SIZE)
        start = side.download_addr
        rec["image_size"] = size
        if size <= 0 or start + size > side.memory_size:
            raise ImageError(f"SPAD5 says the image is {size} bytes: it does not fit card memory at {start:#x}")
        view = side.view(start, size)
        try:
            rec["image_sha256"] = hashlib.sha256(view).hexdigest()
            if size >= RAMDISK_IMAGE_OFF + 8:
                rec["ramdisk_image"], rec["ramdisk_size"] = struct.unpack_from("<II", view, RAMDISK_IMAGE_OFF)
            if size < SETUP_HEADER_END:
                raise ImageError(f"{size} bytes: too short for an x86 setup header")
            image = parse_image(view[:min(size, MAX_HEADERS)])
        finally:
            view.release()
        rec["release"] = image.release
        return image

    def snapshot(self) -> dict | None:
        """The kernel's record as of now (None before the kernel exists or after a reset)."""
        k = self.kernel
        if k is None or k.side.stopped.is_set():
            return None
        return k.snapshot()

    def control(self, action: str, **args) -> dict:
        if self.kernel is None:
            raise ValueError("the card OS has no kernel running (bad image)")
        return self.kernel.control(action, **args)


__all__ = ["CardOS", "SimCardOS", "Kernel", "ImageError", "parse_image"]
