"""The card's SCIF: node k+1 and its node queue pair with the host (spec 8.1, 8.4 step 2, 9).

The mirror image of the host's probe, on the same protocol code
(:class:`~micdrv.scif.hwlink.ScifHwLink`) with the card's memory and
doorbells:

* node id = ``bootparam.node_id`` (the host wrote mic id + 1, spec 3.3);
* memory: my node QP and rings in GDDR from the kernel heap, handed to the
  host at their card physical address (the host sees GDDR through BAR0 at
  the same offsets); the host's memory through the SMPT window;
* my doorbell: the least used of the 16 card doorbells (spec 2.3, 9),
  published as ``h2c_scif_db``; the host's, read from ``c2h_scif_db``, is
  rung through SDBIC (spec 2.3);
* every ring pointer is written twice (the X100 erratum, spec 8.3).

Interrupts are not delivered to a card that panicked or hung
(:meth:`Kernel.irq_handler <micdrv.sim.cardos.kernel.Kernel.irq_handler>`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from micdrv.bootparam import Bootparam
from micdrv.scif import ScifHwLink, ScifMemory, ScifNode, Side
from micdrv.x100 import regs

from .memory import CardMemory

if TYPE_CHECKING:
    from .kernel import Kernel

log = logging.getLogger(__name__)

HOST_NODE = 0


class CardLinkDoorbells:
    """:class:`~micdrv.scif.hwlink.LinkDoorbells` of the card."""

    def __init__(self, kernel: "Kernel"):
        self.kernel = kernel

    def next_db(self) -> int:
        return self.kernel.side.least_used_doorbell()

    def request(self, db: int, callback: Callable[[], None]) -> object:
        self.kernel.side.request_doorbell(db, self.kernel.irq_handler(callback))
        return db

    def free(self, handle: object) -> None:
        self.kernel.side.free_doorbell(handle)

    def ring(self, db: int) -> None:
        self.kernel.side.send_host_doorbell(db)


class CardScif:
    """The SCIF driver of the card OS."""

    name = "scif"

    def __init__(self, kernel: "Kernel", bootparam: Bootparam):
        self.kernel = kernel
        side = kernel.side
        self.node = ScifNode(bootparam.node_id, alive_timeout=kernel.params.scif_timeout, double_publish=True,
                             name=f"scif{bootparam.node_id}")
        memory = ScifMemory(CardMemory(side, 0, side.memory_size, "GDDR"),
                            CardMemory(side, regs.SYSTEM_WINDOW, regs.SYSTEM_WINDOW_END - regs.SYSTEM_WINDOW,
                                       "SMPT window"),
                            kernel.heap.alloc, kernel.heap.free, name=f"mic{bootparam.node_id - 1}->host")
        self.link = ScifHwLink(self.node, HOST_NODE, memory, bootparam, CardLinkDoorbells(kernel), Side.CARD,
                               poll_interval=kernel.params.scif_poll, name=f"{self.node.name}->scif0",
                               stopped=side.stopped)

    def probe(self) -> None:
        self.link.start()
        self.kernel.printk(f"scif: node {self.node.node_id}, doorbell {self.link.db}, node queue pair at "
                           f"{self.link.qp.dma_addr:#x}")

    def wait_host(self, timeout: float) -> bool:
        """True once the host node is alive (SCIF_INIT both ways, spec 8.4 step 4)."""
        return self.node.wait_peer(HOST_NODE, timeout)

    def shutdown(self) -> None:
        """Card-initiated exit (spec 8.4 step 6): withdraw the QP, SCIF_EXIT, wait for SCIF_EXIT_ACK."""
        stopped = self.kernel.side.stopped  # a card reset ends the wait: the host has stopped listening
        if not self.link.close(timeout=self.kernel.params.scif_timeout, cancel=stopped) and not stopped.is_set():
            self.kernel.printk("scif: the host did not acknowledge SCIF_EXIT")

    def abandon(self) -> None:
        self.link.abandon()

    def status(self) -> dict:
        return {"node_id": self.node.node_id, **self.link.status(), "host_alive": HOST_NODE in self.node.alive_peers()}
