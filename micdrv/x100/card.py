"""One X100 card: probe, scratch pads, doorbells, reset and ready, post code (spec 1.4, 2).

:meth:`X100.probe` follows ``mic_probe`` (spec 1.4) on a
:class:`~micdrv.pci.PciDevice`: identity (family, stepping), bus mastering,
BAR4 registers and BAR0 aperture, interrupts (MSI-X, else MSI, else INTx,
then enable), the SMPT in identity layout, and the DmaArena mapped for the
card and referenced in the SMPT. It does not reset the card (neither does
the kernel) and does not build the device page (that is booting, spec 3).

An :class:`X100` is the one implementation of the hardware-ops protocols in
:mod:`micdrv.x100.hwops`; COSM, VOP and SCIF see only those.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..addr import CardPhys
from ..pci import DmaArena, PciDevice
from ..pci.device import PCI_DEVICE_ID, PCI_REVISION_ID, PCI_VENDOR_ID
from ..pci.errors import PciError
from . import ids, regs
from .errors import CardNotReady, NotX100Error, X100Error
from .interrupts import Callback, InterruptThread, Interrupts, IntrType, IrqMode
from .mmio import Aperture, Registers
from .smpt import Smpt

log = logging.getLogger(__name__)

SILICON_RESET_DELAY = 1.0  # _mic_reset sleeps 1000 ms after RGCR (spec 2.5)
READY_TIMEOUT = 45.0  # cosm_hw_reset: up to 45 polls ...
READY_INTERVAL = 1.0  # ... 1 s apart (spec 2.5)


@dataclass(frozen=True)
class DownloadInfo:
    """SPAD2 as the card bootstrap publishes it (spec 2.2)."""

    raw: int

    @property
    def ready(self) -> bool:
        """Bit 0: ready for download."""
        return bool(self.raw & regs.DOWNLOAD_READY)

    @property
    def apic_id(self) -> int:
        """Bits 9:1: APIC ID of the bootstrap CPU (goes to APICICR7's high dword at boot)."""
        return (self.raw >> regs.DOWNLOAD_APIC_SHIFT) & regs.DOWNLOAD_APIC_MASK

    @property
    def boot_addr(self) -> CardPhys:
        """Bits 31:12: the download address in card memory (the host rejects > 2 GiB, spec 3.1)."""
        return CardPhys(self.raw & regs.DOWNLOAD_ADDR_MASK)


def post_code_text(raw: int) -> str:
    """The two ASCII characters of the post code register: bits 7:0 then 15:8 (spec 2.1)."""
    return bytes((raw & 0xFF, (raw >> 8) & 0xFF)).decode("latin-1")


def _reset(registers: Registers, delay: float) -> None:
    """``_mic_reset`` (spec 2.5): SPAD2 = 0, RGCR bit 0 set (read-modify-write), then the pause."""
    registers.write(regs.spad(regs.SPAD_DOWNLOAD_INFO), 0)
    registers.set_bits(regs.RGCR, regs.RGCR_RESET)
    time.sleep(delay)


class X100:
    """A probed X100 card. Create with :meth:`probe`; close with :meth:`close` (or ``with``)."""

    def __init__(self, dev: PciDevice, arena: DmaArena, registers: Registers, aperture: Aperture,
                 interrupts: Interrupts, smpt: Smpt, device_id: int, revision: int, *,
                 reset_delay: float = SILICON_RESET_DELAY):
        self.dev = dev
        self.arena = arena
        self.regs = registers
        self.aperture = aperture
        self.interrupts = interrupts
        self.smpt = smpt
        self.device_id = device_id
        self.revision = revision
        self.reset_delay = reset_delay
        self._db_lock = threading.Lock()
        self._next_db = 0  # mic_next_db: starts at 0 at probe, never reset (spec 1.3)
        self._arena_card: CardPhys | None = None
        self._mapped_arena = False  # True when probe mapped the arena, so close unmaps it

    @classmethod
    def probe(cls, dev: PciDevice, arena: DmaArena, *, iova_base: int = 0,
              irq_modes: tuple[IrqMode | str, ...] = (IrqMode.MSIX, IrqMode.MSI, IrqMode.INTX),
              reset_delay: float = SILICON_RESET_DELAY, reset_first: bool = False) -> "X100":
        """``mic_probe`` steps 2-6 on ``dev`` (spec 1.4), plus mapping ``arena`` for the card.

        ``arena`` is DMA-mapped at ``iova_base`` unless it is mapped already;
        it must lie below 512 GiB of IOVA so the identity SMPT reaches it.
        ``reset_delay`` is the pause after RGCR (1 s on silicon; the simulated
        card is ready much sooner). ``reset_first`` resets the card (``_mic_reset``) before anything
        else is set up -- before bus mastering, the SMPT and the arena's mapping -- for a card that may
        still run an OS started by a host driver that is gone: that OS's DMA and its pointers into the old
        driver's memory must not reach the new arena, which is mapped at the same IOVAs.
        """
        vendor = dev.config_read(PCI_VENDOR_ID, 2)
        device = dev.config_read(PCI_DEVICE_ID, 2)
        revision = dev.config_read(PCI_REVISION_ID, 1)
        if not ids.is_x100(vendor, device):
            raise NotX100Error(f"probe of {dev.name}", f"{vendor:04x}:{device:04x} is not an X100 (spec 1.1)")
        registers = Registers(dev)
        aperture = interrupts = None
        try:
            if reset_first:
                _reset(registers, reset_delay)
            dev.enable_bus_master()
            aperture = Aperture(dev)
            interrupts = Interrupts(dev, registers, revision, irq_modes)
            smpt = Smpt(registers)
            smpt.init()
            card = cls(dev, arena, registers, aperture, interrupts, smpt, device, revision, reset_delay=reset_delay)
            try:
                arena.iova_base  # noqa: B018 -- raises when the arena is not mapped yet
            except PciError:
                arena.map(dev, iova_base)
                card._mapped_arena = True
            # Nothing but the arena is ever handed to the card (ARCHITECTURE.md "Addresses").
            smpt.confine(arena.iova_base, arena.size)
            # One SMPT reference for the whole arena, as mic_map_single takes for
            # each buffer: the entries reaching it are never repurposed.
            card._arena_card = smpt.map(arena.iova_base, arena.size)
            return card
        except BaseException:
            if interrupts is not None:
                interrupts.close()
            if aperture is not None:
                aperture.release()
            registers.release()
            raise

    # --- identity (spec 1.1) ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.dev.name

    @property
    def family(self) -> str:
        return ids.family(ids.INTEL_VENDOR_ID, self.device_id)

    @property
    def stepping(self) -> str:
        return ids.stepping(self.revision)

    # --- scratch pads (spec 2.2) ----------------------------------------------------------------
    def read_spad(self, idx: int) -> int:
        if not 0 <= idx < regs.SPAD_COUNT:
            raise ValueError(f"scratch pad {idx} out of range 0..{regs.SPAD_COUNT - 1}")
        return self.regs.read(regs.spad(idx))

    def write_spad(self, idx: int, value: int) -> None:
        if not 0 <= idx < regs.SPAD_COUNT:
            raise ValueError(f"scratch pad {idx} out of range 0..{regs.SPAD_COUNT - 1}")
        self.regs.write(regs.spad(idx), value)

    def download_info(self) -> DownloadInfo:
        return DownloadInfo(self.read_spad(regs.SPAD_DOWNLOAD_INFO))

    def write_dp_address(self, addr: CardPhys | int) -> None:
        """SPAD14/15 = the device page's card address, low then high 32 bits (spec 1.4 step 7, 3.2 step 9)."""
        self.write_spad(regs.SPAD_DPLO, addr & 0xFFFFFFFF)
        self.write_spad(regs.SPAD_DPHI, (addr >> 32) & 0xFFFFFFFF)

    # --- post code (spec 2.1) ---------------------------------------------------------------------
    def post_code_raw(self) -> int:
        return self.regs.read(regs.POSTCODE)

    def post_code(self) -> str:
        return post_code_text(self.post_code_raw())

    # --- reset and ready (spec 2.5) -------------------------------------------------------------
    def reset(self, delay: float | None = None) -> None:
        """``_mic_reset``: SPAD2 = 0, RGCR |= 1, then wait ``delay`` (default :attr:`reset_delay`)."""
        _reset(self.regs, self.reset_delay if delay is None else delay)

    def ready(self) -> bool:
        """``is_fw_ready``: SPAD2 bit 0."""
        return self.download_info().ready

    def wait_ready(self, timeout: float = READY_TIMEOUT, interval: float = READY_INTERVAL) -> DownloadInfo:
        """Poll :meth:`ready` every ``interval`` s for up to ``timeout`` s (``cosm_hw_reset``).

        Raises :class:`CardNotReady` naming the last SPAD2 and post code.
        """
        deadline = time.monotonic() + timeout
        while True:
            info = self.download_info()
            if info.ready:
                return info
            left = deadline - time.monotonic()
            if left <= 0:
                raise CardNotReady(f"wait for {self.name} to become ready",
                                   f"SPAD2 bit 0 not set within {timeout:g} s after reset "
                                   f"(SPAD2={info.raw:#010x}, post code {self.post_code()!r})")
            time.sleep(min(interval, left))

    def reset_and_wait(self, timeout: float = READY_TIMEOUT, interval: float = READY_INTERVAL) -> DownloadInfo:
        """Reset, then wait for ready: what COSM does on "reset" (spec 2.5)."""
        self.reset()
        return self.wait_ready(timeout, interval)

    def restore_state(self) -> None:
        """Before every boot (spec 3.2 step 8): rewrite the SMPT, restore MXAR bits, enable interrupts."""
        self.smpt.restore()
        self.interrupts.restore()
        self.interrupts.enable()

    # --- doorbells (spec 1.3, 2.3) ------------------------------------------------------------
    def next_db(self) -> int:
        """``mic_next_db``: card->host doorbells handed out round robin over 0..3, never reset."""
        with self._db_lock:
            db = self._next_db % regs.INTR_DB_COUNT
            self._next_db += 1
            return db

    def send_intr(self, db: int) -> None:
        """Ring host->card doorbell ``db`` (0..15), ``mic_x100_send_intr`` (spec 2.3).

        db < 8: read the low dword of APICICR[db], OR in bit 13 (send), write
        it back. db >= 8: write 0 to RDMASR[db - 8].
        """
        if not 0 <= db < regs.NUM_CARD_DOORBELLS:
            raise ValueError(f"card doorbell {db} out of range 0..{regs.NUM_CARD_DOORBELLS - 1}")
        if db < regs.NUM_SBOX_IRQ:
            self.regs.set_bits(regs.apicicr(db), regs.APICICR_SEND)
        else:
            self.regs.write(regs.rdmasr(db - regs.NUM_SBOX_IRQ), 0)

    def send_intr_async(self, db: int, sending: Callable[[BaseException | None], None]) -> bool:
        """:meth:`send_intr` without waiting for the read of the read-modify-write (spec 2.3).

        ``sending(None)`` runs just before the doorbell's write is posted --
        whatever was published before it is covered by this interrupt -- or
        ``sending(error)`` when the read failed and nothing is written. For
        db < 8 over vfio-user the read is a message whose reply comes later:
        True is returned, and the caller must run :meth:`poll_async` when
        :meth:`async_fd` is readable until :meth:`async_pending` is 0; the
        callback then runs on the thread that reads the reply. False: done
        already (db >= 8 is a posted write; mapped registers read at once).
        """
        if not 0 <= db < regs.NUM_CARD_DOORBELLS:
            raise ValueError(f"card doorbell {db} out of range 0..{regs.NUM_CARD_DOORBELLS - 1}")
        if db >= regs.NUM_SBOX_IRQ:
            sending(None)
            self.regs.write(regs.rdmasr(db - regs.NUM_SBOX_IRQ), 0)
            return False
        offset = regs.apicicr(db)
        write = self.regs.write

        def read(value: int | None, error: BaseException | None) -> None:
            if error is not None:
                sending(error)
                return
            sending(None)
            try:
                write(offset, value | regs.APICICR_SEND)
            except PciError as e:  # the card went away between the read and the write
                log.warning("%s: ringing card doorbell %d: %s", self.name, db, e)
        return self.regs.read_async(offset, read)

    def async_fd(self) -> int | None:
        """The fd to wait on while :meth:`send_intr_async` answers are due; None when they never are."""
        return None if self.regs.mmapped else self.dev.fileno()

    def async_pending(self) -> int:
        return self.dev.async_pending

    def poll_async(self) -> int:
        """Take in what the card sent: answers to :meth:`send_intr_async` (their callbacks run here), overdue
        ones timed out."""
        return self.dev.process_events()

    def send_firmware_intr(self, apic_id: int) -> None:
        """Kick the bootstrap (spec 3.2 step 10): APIC ID to APICICR7's high dword, then 229 | bit 13 low."""
        self.regs.write(regs.apicicr(regs.BOOT_APICICR) + 4, apic_id)
        self.regs.write(regs.apicicr(regs.BOOT_APICICR), regs.BSP_INTERRUPT_VECTOR | regs.APICICR_SEND)

    def request_irq(self, kind: IntrType, src: int, callback: Callback, name: str = "") -> int:
        """Call ``callback()`` when source ``src`` of ``kind`` fires; returns the cookie (spec 1.3)."""
        return self.interrupts.request(kind, src, callback, name)

    def request_doorbell(self, db: int, callback: Callback, name: str = "") -> int:
        """Call ``callback()`` when the card rings host doorbell ``db`` (0..3); returns the cookie."""
        return self.interrupts.request(IntrType.DB, db, callback, name)

    def free_irq(self, cookie: int) -> None:
        self.interrupts.free(cookie)

    def claim_irq(self, cookie: int) -> int | None:
        """The eventfd of the cookie's MSI-X vector, for the caller's loop to wait on and hand to
        :meth:`dispatch_irq`; None when the vector is shared (MSI/INTx). See :meth:`Interrupts.claim`."""
        return self.interrupts.claim(cookie)

    def dispatch_irq(self, fd: int) -> int:
        """Handle a claimed vector's readable eventfd: ack, workarounds (spec 2.3), the callback."""
        return self.interrupts.dispatch(fd)

    def ack_interrupt(self) -> int:
        return self.interrupts.ack()

    def intr_workarounds(self) -> None:
        self.interrupts.workarounds()

    def interrupt_thread(self) -> InterruptThread:
        """Dispatch this card's interrupts on a thread of their own (stop it before :meth:`close`)."""
        return InterruptThread(self.interrupts, name=f"x100-irq {self.name}")

    # --- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the SMPT reference, unmap the arena if probe mapped it, close interrupts (not the device)."""
        if self._arena_card is not None:
            try:
                self.smpt.unmap(self._arena_card, self.arena.size)
            except X100Error:
                pass
            self._arena_card = None
        if self._mapped_arena:
            self._mapped_arena = False
            if not self.dev.closed:
                self.arena.unmap(self.dev)
        self.interrupts.close()
        self.aperture.release()
        self.regs.release()

    def __enter__(self) -> "X100":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
