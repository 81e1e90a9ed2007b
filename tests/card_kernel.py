"""A real card kernel for the card drivers' tests: the simulated X100 in this process, booted without a host.

:class:`BootedCard` does what the host's loader does (spec 3.1, 3.2 steps
7-10) on an in-process :class:`~micdrv.sim.card.X100Card`: the card OS
image and a command line in GDDR, SPAD5 = image size, the boot kick on
APICICR7. The card OS checks its image and runs a real
:class:`~micdrv.sim.cardos.kernel.Kernel` -- log ring in GDDR, its
parameters, its device list, power-off / reboot / panic in its own thread.
No device page is set, so the kernel finds no MIC devices ("device page
unreachable") and runs on without SCIF or COSM: exactly what the virtio
drivers need, which the test then attaches through the direct transport
(:class:`~micdrv.sim.cardos.direct.DirectBus`) to real host backends.

A card reset at :meth:`close` stops the kernel the way a host reset does.
"""

from __future__ import annotations


from micdrv.sim.card import X100Card
from micdrv.sim.cardos.direct import DirectBus
from micdrv.sim.cardos.image import build_image
from micdrv.sim.cardos.kernel import Kernel
from micdrv.x100 import regs
from tests import sim_harness

MEMORY = 256 << 20
WAIT = 20.0   # generous: a 2-core machine running several suites


def wait_for(predicate, what: str, timeout: float = WAIT, interval: float = 0.005):
    """:func:`tests.sim_harness.wait_for` with this tier's longer default."""
    return sim_harness.wait_for(predicate, what, timeout, interval)


class BootedCard:
    """An in-process simulated card running its kernel, and a direct transport for its virtio drivers."""

    def __init__(self, cmdline: str = "", bus_size: int = 64 << 20, mapped: bool = True):
        self.card = X100Card(memory_size=MEMORY, ready_delay=0.0)
        wait_for(lambda: self.card.bootstrap.state == "ready", "the bootstrap to be ready")
        image = build_image()
        spad2 = self.card.spads[regs.SPAD_DOWNLOAD_INFO]
        load, apic = spad2 & regs.DOWNLOAD_ADDR_MASK, spad2 >> 1 & 0x1FF
        self.card.bus.write(load, image)
        self.card.bus.write(load + len(image), f" mem={MEMORY >> 20}M {cmdline}".encode() + b"\0")
        rf = self.card.registers
        rf.region_write(regs.spad(regs.SPAD_FW_SIZE), len(image).to_bytes(4, "little"))
        rf.region_write(regs.apicicr(regs.BOOT_APICICR) + 4, apic.to_bytes(4, "little"))
        rf.region_write(regs.apicicr(regs.BOOT_APICICR),
                        (regs.BSP_INTERRUPT_VECTOR | regs.APICICR_SEND).to_bytes(4, "little"))
        self.kernel: Kernel = wait_for(lambda: getattr(self.card.card_os, "kernel", None), "the card kernel")
        wait_for(lambda: self.kernel.drivers is not None and self.kernel.state == "running",
                 "the kernel to install its drivers")
        self.drivers = self.kernel.drivers
        self.bus = DirectBus(bus_size, printk=self.kernel.printk, mapped=mapped)

    def record(self) -> dict:
        """What the control socket's ``os`` command shows."""
        return self.card.os_status()

    def dmesg(self) -> str:
        return self.kernel.dmesg()

    def close(self) -> None:
        try:
            self.bus.close()
        finally:
            self.card.card_reset()          # the kernel thread sees side.stopped and abandons its drivers
            wait_for(lambda: self.kernel.state == "stopped", "the kernel to stop after the reset")
            self.card.bootstrap.close()

    def __enter__(self) -> "BootedCard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
