"""What COSM needs from a card: the ``cosm_hw_ops`` table (spec 3.2, 3.5, 7.3).

In the kernel, COSM (cosm_main.c) drives a card only through
``struct cosm_hw_ops`` -- reset, force_reset, post_reset, ready, start, stop,
family, stepping, aper -- and reaches the card's COSM client over SCIF port
201. :class:`CosmHwOps` is that table for micdrv; :class:`micdrv.mic.MicDevice`
implements it for an X100 (probe, boot loader, DMA engine, SCIF, VOP), and
the COSM state machine (:mod:`micdrv.cosm.host`) knows nothing else about the
hardware.

Call order, as COSM makes it (spec 3.2, 7.3):

* ``reset()`` then ``ready()`` polled (spec 2.5) -- on "reset", and before
  a boot when the card is not ready;
* ``start(boot)`` -- spec 3.2 steps 2-10: device page, DMA, SCIF, VOP,
  load_mic_fw, SMPT/MXAR restore, SPAD14/15, the APICICR7 kick. Raises
  :class:`BootError` and leaves the card stopped (nothing registered, state
  unchanged from COSM's view) when any step fails;
* ``stop(force)`` -- ``_mic_stop``: VOP, SCIF, DMA torn down, the device page
  re-initialised. Always before a reset of a card that was started. With
  ``force`` the card is presumed dead: nothing waits for it to answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..scif import ScifNode


class BootError(Exception):
    """A boot that could not be started; ``step`` names what failed (spec 3.1 errors)."""

    def __init__(self, step: str, detail: str):
        self.step, self.detail = step, detail
        super().__init__(f"{step}: {detail}")


@dataclass(frozen=True)
class BootSpec:
    """What to boot (the sysfs attributes firmware, ramdisk, cmdline, bootmode, spec 3.5)."""

    firmware: Path                 # absolute path of the OS image (spec 3.1 request_firmware)
    ramdisk: Path | None = None    # absolute path, copied to 2 x the boot address (spec 3.1 step 7)
    cmdline: str = ""              # appended after " mem=<MiB>M" (spec 3.1 step 6)
    bootmode: str = "linux"        # "linux" or "flash"; flash is refused as upstream does (spec 3.1 step 5)


@runtime_checkable
class CosmHwOps(Protocol):
    """``struct cosm_hw_ops`` plus the two things COSM reaches through the card: SCIF and the aperture."""

    name: str       # "mic0": the card's name for logs and the control socket
    node_id: int    # the card's SCIF node: mic id + 1 (spec 8.1)

    @property
    def family(self) -> str:
        """"x100" (spec 1.1)."""

    @property
    def stepping(self) -> str:
        """"A0", "B0", "B1", "C0" or "??" (spec 1.1)."""

    @property
    def scif(self) -> "ScifNode":
        """This host's SCIF node 0; COSM listens on port 201 through it (spec 7.2)."""

    @property
    def memory_size(self) -> int:
        """BAR0 length: the card's memory (spec 1.2)."""

    def reset(self) -> None:
        """``_mic_reset``: SPAD2 = 0, RGCR |= 1, then the silicon's reset pause (spec 2.5)."""

    def ready(self) -> bool:
        """SPAD2 bit 0: the bootstrap is ready for a download (spec 2.5)."""

    def start(self, boot: BootSpec) -> None:
        """Spec 3.2 steps 2-10; raises :class:`BootError` with the card left stopped."""

    def stop(self, force: bool = False) -> None:
        """``_mic_stop``: VOP, SCIF, DMA torn down, device page re-initialised. Idempotent."""

    def post_code(self) -> str:
        """The two post-code characters (spec 2.1)."""

    def read_card(self, addr: int, length: int) -> bytes:
        """Card memory through BAR0 (card physical ``addr``); for the card log (spec 3.5 log_buf)."""
