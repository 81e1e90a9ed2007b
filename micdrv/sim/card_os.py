"""The card OS the bootstrap starts, and the stub that stands in for it in this issue (spec 3.1-3.3, 9).

A card OS is any object with ``run(side)``; the bootstrap creates one per
accepted boot kick and calls ``run`` in a thread of its own with a
:class:`~.card.CardSide`, the card's hardware as card software sees it. The
OS must return from ``run`` once ``side.stopped`` is set (a card reset);
after that every ``side`` access raises :class:`~.card.CardOSStopped` and its
doorbell handlers are gone. It may also return early and live on in the
doorbell handlers it registered.

:class:`StubCardOS` does what the upstream card kernel does first
(card/mic_device.c, spec 9 "bring-up order") and records what it found:

1. the image size from SPAD5 (spec 2.2) and a SHA-256 of the image at the
   download address;
2. the command line right after the image, NUL-terminated, at most 2048
   bytes (spec 3.1 step 6; the spec leaves open how the card finds it,
   spec 10 -- SPAD5 is the only way);
3. the x86 boot header's ``ramdisk_image``/``ramdisk_size`` at image offsets
   0x218/0x21C when the image is that long (spec 3.1 step 7);
4. the device page from SPAD14/15 through the SMPT window, its magic
   0xC0FFEE00 and the rest of ``struct mic_bootparam`` (spec 3.3);
5. it takes a handler on all 16 card doorbells and counts the rings.

Post codes [choice]: "30" stub OS started, "40" device page found with the
right magic, "4E" device page unreachable or wrong magic. The record is
published for the control socket's ``os`` command (:mod:`.control`).
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from typing import TYPE_CHECKING, Protocol

from micdrv.x100 import regs

from .bus import CardFault

if TYPE_CHECKING:
    from .card import CardSide

log = logging.getLogger(__name__)

MIC_MAGIC = 0xC0FFEE00  # struct mic_bootparam.magic (spec 3.3)
DEVICE_PAGE_SIZE = 4096  # MIC_DP_SIZE (spec 3.3)
BOOTPARAM = struct.Struct("<IbBBBQQ")  # magic, h2c_config_db, node_id, h2c_scif_db, c2h_scif_db, scif_host/card_dma_addr
CMDLINE_MAX = 2048  # the host's buffer limit including the NUL (spec 3.1 step 6)
RAMDISK_IMAGE_OFF, RAMDISK_SIZE_OFF = 0x218, 0x21C  # x86 boot protocol header fields (spec 3.1 step 7)

POST_OS_STARTED = "30"
POST_DEVICE_PAGE_OK = "40"
POST_DEVICE_PAGE_BAD = "4E"


class CardOS(Protocol):
    def run(self, side: "CardSide") -> None:
        """The OS's main, in its own thread; return when ``side.stopped`` is set (or earlier)."""


class StubCardOS:
    """Reads what the host left for the card and publishes it; counts doorbells."""

    def __init__(self):
        self._lock = threading.Lock()
        self.record: dict = {}
        self._side: "CardSide | None" = None

    def run(self, side: "CardSide") -> None:
        self._side = side
        side.post(POST_OS_STARTED)
        rec: dict = {"os": "stub", "started": time.time(), "download_addr": side.download_addr,
                     "memory_size": side.memory_size, "errors": [], "doorbells": [0] * regs.NUM_CARD_DOORBELLS}
        try:
            self._read_image(side, rec)
            ok = self._read_device_page(side, rec)
        except CardFault as e:  # includes CardOSStopped: a reset came while we were reading
            rec["errors"].append(str(e))
            ok = False
        with self._lock:
            self.record = rec
        if side.stopped.is_set():
            return
        for db in range(regs.NUM_CARD_DOORBELLS):
            side.request_doorbell(db, self._doorbell)
        side.post(POST_DEVICE_PAGE_OK if ok else POST_DEVICE_PAGE_BAD)
        self._publish()
        log.info("stub card OS: image %d bytes, cmdline %r, device page %s", rec.get("image_size", 0),
                 rec.get("cmdline"), "ok" if ok else "not found")

    def _read_image(self, side: "CardSide", rec: dict) -> None:
        size = side.spad(regs.SPAD_FW_SIZE)
        rec["image_size"] = size
        start = side.download_addr
        if size <= 0 or start + size > side.memory_size:
            rec["errors"].append(f"image of {size} bytes at {start:#x} does not fit card memory")
            return
        view = side.view(start, size)
        try:
            rec["image_sha256"] = hashlib.sha256(view).hexdigest()
            if size >= RAMDISK_SIZE_OFF + 4:
                rec["ramdisk_image"], rec["ramdisk_size"] = struct.unpack_from("<II", view, RAMDISK_IMAGE_OFF)
        finally:
            view.release()
        at = start + size
        raw = side.read(at, min(CMDLINE_MAX, side.memory_size - at))
        end = raw.find(b"\0")
        if end < 0:
            rec["errors"].append(f"no NUL within {CMDLINE_MAX} bytes of the command line at {at:#x}")
            end = len(raw)
        rec["cmdline"] = raw[:end].decode("utf-8", "replace")

    def _read_device_page(self, side: "CardSide", rec: dict) -> bool:
        addr = side.spad(regs.SPAD_DPLO) | side.spad(regs.SPAD_DPHI) << 32
        rec["device_page"] = addr
        try:
            page = side.read(addr, DEVICE_PAGE_SIZE)
        except CardFault as e:
            if side.stopped.is_set():
                raise
            rec["errors"].append(f"device page unreachable: {e.detail}")
            rec["magic_ok"] = False
            return False
        magic, h2c_config_db, node_id, h2c_scif_db, c2h_scif_db, host_dma, card_dma = BOOTPARAM.unpack_from(page)
        rec["magic"] = magic
        rec["magic_ok"] = magic == MIC_MAGIC
        rec["bootparam"] = {"h2c_config_db": h2c_config_db, "node_id": node_id, "h2c_scif_db": h2c_scif_db,
                            "c2h_scif_db": c2h_scif_db, "scif_host_dma_addr": host_dma,
                            "scif_card_dma_addr": card_dma}
        if not rec["magic_ok"]:
            rec["errors"].append(f"device page magic {magic:#x}, expected {MIC_MAGIC:#x}")
        return rec["magic_ok"]

    def _doorbell(self, db: int) -> None:
        with self._lock:
            self.record["doorbells"][db] += 1
        self._publish()

    def _publish(self) -> None:
        side = self._side
        if side is None:
            return
        with self._lock:
            snapshot = {**self.record, "doorbells": list(self.record["doorbells"]), "errors": list(self.record["errors"])}
        side.publish(snapshot)
