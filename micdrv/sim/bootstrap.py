"""Reset, the bootstrap's ready handshake and the boot kick (spec 2.5, 3.1, 3.2, 9).

The host resets the card by writing SPAD2 = 0 and setting RGCR bit 0, then
polls SPAD2 bit 0 for up to 45 s (spec 2.5). The card's bootstrap, after
its own initialisation, publishes SPAD2 = ready (bit 0) | APIC ID << 1
(bits 9:1) | download address (bits 31:12, 4 KiB aligned, <= 2 GiB,
"typically 64 MiB"; spec 2.2, 3.1, 9) and waits. The host copies the image
to the download address, writes SPAD5 and the command line (spec 3.1) and
kicks: APIC ID to APICICR7's high dword, then ``229 | 1 << 13`` = 0x20E5 to
its low dword (spec 3.2 step 10). The bootstrap then jumps to the image:
here, it starts the card OS (:mod:`.card_os`).

States of the card as this module sees it:

=========== =====================================================================
resetting   reset in progress: SPAD2 = 0; ready after ``ready_delay`` seconds
ready       SPAD2 published; the bootstrap waits for the kick
running     the kick was accepted and the card OS started
hung        the bootstrap never became ready (the "fail next reset" fault hook)
=========== =====================================================================

Power-on is a reset: the card comes up "ready" after ``ready_delay`` without
the host doing anything (CHOICES). RGCR bit 0 reads back 0 (the reset
bit is self-clearing).

An IPI (an APICICR send) before the card OS runs goes to the bootstrap.
Only the boot kick acts -- APICICR7, vector 229, destination = the APIC ID
the bootstrap published, in state "ready". Anything else (wrong vector,
wrong APIC ID, another APICICR, the card not ready) is ignored and counted in
``kicks_ignored`` with the reason kept in ``last_ignored``.

Post codes (BAR4 0x242C: two ASCII characters, low byte first; spec 2.1, 9)
are the simulator's own [choice]: "01" reset started, "10" bootstrap ready
for download, "20" kick accepted and card OS starting; the card OS posts its
own after that (:mod:`.card_os`). A hung reset stays at "01".
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from micdrv.x100 import regs

log = logging.getLogger(__name__)

RESETTING, READY, RUNNING, HUNG = "resetting", "ready", "running", "hung"

POST_RESET = "01"
POST_READY = "10"
POST_KICKED = "20"

DEFAULT_APIC_ID = 240  # bootstrap CPU APIC ID: 4 x core 60, the last of 61 cores [choice]
DEFAULT_DOWNLOAD_ADDR = 64 << 20  # "typically 64M" (spec 3.1)
DEFAULT_READY_DELAY = 0.2


def post_code_value(code: str) -> int:
    """Two ASCII characters as the post-code register holds them: first in bits 7:0 (spec 2.1)."""
    if len(code) != 2 or not code.isascii():
        raise ValueError(f"post code {code!r} is not two ASCII characters")
    return ord(code[0]) | ord(code[1]) << 8


def post_code_text(value: int) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in (value & 0xFF, value >> 8 & 0xFF))


def download_info(apic_id: int, download_addr: int) -> int:
    """The SPAD2 value the bootstrap publishes (spec 2.2)."""
    return regs.DOWNLOAD_READY | (apic_id & regs.DOWNLOAD_APIC_MASK) << regs.DOWNLOAD_APIC_SHIFT | \
        (download_addr & regs.DOWNLOAD_ADDR_MASK)


def check_download_addr(addr: int, memory_size: int) -> None:
    if addr % 4096 or addr <= 0 or addr > regs.MAX_BOOT_ADDR or addr >= memory_size:
        raise ValueError(f"download address {addr:#x} must be 4 KiB aligned, non-zero, <= 2 GiB (spec 3.1) "
                         f"and inside card memory ({memory_size:#x} bytes)")


class Bootstrap:
    """The card's reset/ready/kick state machine; ``start_os`` is called (card lock held) on a good kick."""

    def __init__(self, lock: threading.RLock, spads: list[int], post: Callable[[str], None],
                 start_os: Callable[[], None], *, apic_id: int = DEFAULT_APIC_ID,
                 download_addr: int = DEFAULT_DOWNLOAD_ADDR, ready_delay: float = DEFAULT_READY_DELAY):
        if not 0 <= apic_id <= regs.DOWNLOAD_APIC_MASK:
            raise ValueError(f"APIC ID {apic_id} does not fit SPAD2 bits 9:1")
        if ready_delay < 0:
            raise ValueError("the ready delay cannot be negative")
        self.lock = lock
        self.spads = spads
        self._post = post
        self._start_os = start_os
        self.apic_id = apic_id
        self.download_addr = download_addr
        self.ready_delay = ready_delay
        self.state = RESETTING
        self._generation = 0
        self._timer: threading.Timer | None = None
        self._fail_next = False
        self._closed = False
        self.resets = 0
        self.resets_failed = 0
        self.kicks = 0
        self.kicks_ignored = 0
        self.last_ignored = ""

    def fail_next_reset(self) -> None:
        """Fault hook: the next reset never becomes ready."""
        with self.lock:
            self._fail_next = True

    def reset(self) -> None:
        """Start a reset (card lock held; the card has already cleared its registers)."""
        self._generation += 1
        self.resets += 1
        self._cancel_timer()
        self.spads[regs.SPAD_DOWNLOAD_INFO] = 0
        self._post(POST_RESET)
        if self._fail_next:
            self._fail_next = False
            self.resets_failed += 1
            self.state = HUNG
            log.warning("fault hook: this reset never becomes ready")
            return
        self.state = RESETTING
        if self._closed:
            return
        self._timer = threading.Timer(self.ready_delay, self._ready, args=(self._generation,))
        self._timer.daemon = True
        self._timer.name = "bootstrap ready"
        self._timer.start()

    def _ready(self, generation: int) -> None:
        with self.lock:
            if generation != self._generation or self.state != RESETTING:
                return  # another reset came first
            self.spads[regs.SPAD_DOWNLOAD_INFO] = download_info(self.apic_id, self.download_addr)
            self._post(POST_READY)
            self.state = READY
            log.info("bootstrap ready: APIC ID %d, download address %#x", self.apic_id, self.download_addr)

    def ipi(self, n: int, low: int, high: int) -> bool:
        """An APICICR send (card lock held). True if it is a card doorbell, i.e. the card OS runs."""
        if self.state == RUNNING:
            return True
        vector = low & 0xFF
        why = ""
        if n != regs.BOOT_APICICR or vector != regs.BSP_INTERRUPT_VECTOR:
            why = f"IPI on APICICR{n} vector {vector} is not the boot kick (APICICR7, vector 229)"
        elif high != self.apic_id:
            why = f"boot kick to APIC ID {high}, the bootstrap is {self.apic_id}"
        elif self.state != READY:
            why = f"boot kick while the card is {self.state}"
        if why:
            self.kicks_ignored += 1
            self.last_ignored = why
            log.warning("ignored: %s", why)
            return False
        self.kicks += 1
        self.state = RUNNING
        self._post(POST_KICKED)
        log.info("boot kick accepted: starting the card OS from %#x", self.download_addr)
        self._start_os()
        return False

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self._cancel_timer()

    def counters(self) -> dict:
        with self.lock:
            return {"state": self.state, "resets": self.resets, "resets_failed": self.resets_failed,
                    "kicks": self.kicks, "kicks_ignored": self.kicks_ignored, "last_ignored": self.last_ignored}
