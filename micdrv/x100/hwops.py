"""The hardware operations the protocol layers use, as ``typing.Protocol``\\ s.

In the kernel, COSM, VOP and SCIF never touch X100 registers: they call
small ops tables (``mic_hw_ops``, ``cosm_hw_ops``, ``vop_hw_ops``,
``scif_hw_ops``, ``mic_smpt_ops``, the dmaengine API). These Protocols are
those tables for micdrv; :class:`micdrv.x100.card.X100` implements
:class:`CardOps`, :class:`InterruptOps` and (with its ``smpt``) :class:`SmptOps`,
and :class:`micdrv.x100.dma.DmaEngine` implements :class:`DmaOps`. A protocol
layer takes the narrowest of them it needs, so a test can hand it a fake.

Address types (``micdrv.addr``): the card is given :data:`CardPhys`
addresses only; host memory is named by its :data:`Iova` in the DmaArena and
converted by :meth:`SmptOps.to_card`.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

from ..addr import CardPhys, Iova
from .card import DownloadInfo
from .dma import DmaCompletion
from .interrupts import IntrType
from .mmio import Aperture


@runtime_checkable
class CardOps(Protocol):
    """Identity, scratch pads, reset/ready and boot kicks: what COSM and the boot loader use."""

    @property
    def family(self) -> str: ...  # "x100" (spec 1.1)

    @property
    def stepping(self) -> str: ...  # "A0", "B0", "B1", "C0" or "??"

    aperture: Aperture  # BAR0: card physical X = offset X

    def reset(self, delay: float | None = None) -> None:
        """SPAD2 = 0, RGCR |= 1, then pause (spec 2.5). Called by COSM on reset and before a boot."""

    def ready(self) -> bool:
        """SPAD2 bit 0: the bootstrap is ready for a download."""

    def wait_ready(self, timeout: float = 45.0, interval: float = 1.0) -> DownloadInfo:
        """Poll :meth:`ready`; raises :class:`~micdrv.x100.errors.CardNotReady` on timeout."""

    def download_info(self) -> DownloadInfo:
        """SPAD2 parsed: ready, APIC ID, boot address (spec 2.2)."""

    def post_code(self) -> str:
        """The two post code characters (spec 2.1)."""

    def read_spad(self, idx: int) -> int: ...

    def write_spad(self, idx: int, value: int) -> None: ...

    def write_dp_address(self, addr: CardPhys) -> None:
        """SPAD14/15 = the device page's card address (spec 1.4 step 7, 3.2 step 9)."""

    def restore_state(self) -> None:
        """Rewrite the SMPT, restore MXAR, enable interrupts: before every boot (spec 3.2 step 8)."""

    def send_firmware_intr(self, apic_id: int) -> None:
        """Start the card OS: APICICR7 high = APIC ID, low = 229 | bit 13 (spec 3.2 step 10)."""


@runtime_checkable
class InterruptOps(Protocol):
    """Doorbells both ways and interrupt routing: what VOP and SCIF use (spec 1.3, 2.3)."""

    def next_db(self) -> int:
        """A card->host doorbell (0..3) for a new consumer, round robin, never reset."""

    def send_intr(self, db: int) -> None:
        """Ring host->card doorbell ``db`` (0..15)."""

    def request_irq(self, kind: IntrType, src: int, callback: Callable[[], None], name: str = "") -> int:
        """Call ``callback()`` from the interrupt dispatcher when the source fires; returns a cookie."""

    def request_doorbell(self, db: int, callback: Callable[[], None], name: str = "") -> int:
        """:meth:`request_irq` for card->host doorbell ``db``."""

    def free_irq(self, cookie: int) -> None: ...

    def claim_irq(self, cookie: int) -> int | None:
        """MSI-X: the cookie's vector eventfd, now the caller's to wait on (None: shared vector, MSI/INTx)."""

    def dispatch_irq(self, fd: int) -> int:
        """Handle a claimed vector's readable eventfd on the caller's thread (ack, workarounds, callback)."""

    def ack_interrupt(self) -> int:
        """MSI/INTx ack: read SICR0 and write it back. The dispatcher already does this."""

    def intr_workarounds(self) -> None:
        """A0: MSIXPBACR = 1; B0+: re-arm. The dispatcher already does this after every interrupt."""


@runtime_checkable
class SmptOps(Protocol):
    """Host memory as the card sees it (spec 2.4)."""

    def to_card(self, iova: Iova, size: int = 1) -> CardPhys:
        """THE Iova -> CardPhys conversion (identity layout: 0x80_0000_0000 + iova)."""

    def map(self, iova: Iova, size: int) -> CardPhys:
        """``mic_map``: reference the entries covering the range; returns its card address."""

    def unmap(self, card_addr: CardPhys, size: int) -> None:
        """``mic_unmap``: drop those references."""

    def init(self) -> None: ...

    def restore(self) -> None: ...

    def read_back(self) -> list[int]: ...


@runtime_checkable
class DmaOps(Protocol):
    """The DMA engine as VOP and SCIF use it (host channels 0-3, spec 4)."""

    def memcpy(self, dst: CardPhys, src: CardPhys, length: int, *, channels: Sequence[int] | None = None,
               interrupt: bool = False, callback: Callable[[DmaCompletion], None] | None = None) -> DmaCompletion:
        """Copy between card physical addresses (64-byte aligned); returns the completion."""

    def memcpy_batch(self, copies: Sequence[tuple[int, int, int]], *, channels: Sequence[int] | None = None,
                     interrupt: bool = False,
                     callback: Callable[[DmaCompletion], None] | None = None) -> DmaCompletion:
        """Many ``(dst, src, length)`` copies, one doorbell and one STATUS per channel used."""

    def copy_to_card(self, dst: CardPhys, src: Iova, length: int, **kw) -> DmaCompletion: ...

    def copy_from_card(self, dst: Iova, src: CardPhys, length: int, **kw) -> DmaCompletion: ...

    def write_value(self, dst: CardPhys, value: int, *, channel: int = 0, interrupt: bool = False) -> DmaCompletion:
        """Store a u64 with a STATUS descriptor (a fence or a flag for the other side)."""

    def poll(self) -> int:
        """Retire completed work on every channel (for event loops without interrupts)."""

    def reinit(self, ch: int) -> None:
        """Recover a channel after a :class:`~micdrv.x100.errors.DmaChannelError`."""
