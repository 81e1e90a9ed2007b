"""SCIF over a MIC hardware device: the node queue pair with one peer, from probe to remove (spec 8.4).

The kernel's ``scif_probe`` / ``scif_remove`` run for every ``scif_hw_dev``
-- on the host one per card, on a card one for the host. :class:`ScifHwLink`
is that pair of functions around one :class:`~micdrv.scif.node.ScifPeer`,
the same code on both sides; only three things differ and are handed in:

* the memory (:class:`~micdrv.scif.qp.ScifMemory`: host -- the DmaArena by
  IOVA, BAR0, SMPT addresses; card -- GDDR, the SMPT window, identity);
* the device page (:class:`~micdrv.bootparam.Bootparam`: the host's own
  memory, or the card's view of it through the SMPT) and which
  :class:`~micdrv.scif.nodeqp.Side` of it this node fills in;
* the doorbells (:class:`LinkDoorbells`: host -- :class:`HostDoorbells` over
  :class:`~micdrv.x100.hwops.InterruptOps`; card -- the card OS's own).

No register is touched here. The life of a link (spec 8.4):

1. :meth:`ScifHwLink.start` -- allocate my node QP, register the peer, take a
   doorbell and request its interrupt, then publish both in the device page
   (host: ``c2h_scif_db``, ``scif_host_dma_addr``; card: ``h2c_scif_db``,
   ``scif_card_dma_addr``);
2. a worker thread -- the kernel's ordered workqueue -- polls the device
   page every ``poll_interval`` (1 s, spec 8.4 steps 1-2) for the peer's QP
   and doorbell, then maps the peer QP and sends SCIF_INIT (step 3,
   :meth:`~micdrv.scif.node.ScifPeer.start`, the doorbell being "ring the
   peer's doorbell");
3. the interrupt callback only wakes the worker (an interrupt handler never
   blocks), which drains the node QP (step 5). A SCIF_INIT that arrives
   before our own poll found the peer's QP triggers the poll at once, as the
   kernel's ``flush_delayed_work`` does (step 4);
4. :meth:`ScifHwLink.close` -- step 6: withdraw my QP from the device page,
   then the orderly EXIT flow (:meth:`~micdrv.scif.node.ScifNode.remove_peer`,
   waiting for the acknowledgement) or, with ``force``, drop the peer without
   a word (a dead card never answers); free the interrupt, stop the worker.

A peer QP that fails validation (bad magic, unreachable ring) is logged and
the link stops polling: the kernel's ``scif_qp_response`` error, after
which the node never comes up.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

from ..bootparam import Bootparam
from ..memory import MemoryAccessError
from .errors import ScifError, ScifProtocolError
from .node import ScifNode, ScifPeer
from .nodeqp import QP_POLL_INTERVAL, NodeQueuePair, Side, peer_qp, publish_qp, unpublish_qp
from .qp import ScifMemory

log = logging.getLogger(__name__)

# The worker's longest step is a send waiting for ring space (SEND_TIMEOUT, 3 s)
# inside a message handler; give it that several times over before giving up.
WORKER_JOIN_TIMEOUT = 10.0


class LinkDoorbells(Protocol):
    """The doorbells of one link, both directions."""

    def next_db(self) -> int:
        """A doorbell of mine for the peer to ring (host: ``mic_next_db``; card: least used of 16)."""

    def request(self, db: int, callback: Callable[[], None]) -> object:
        """Call ``callback()`` whenever the peer rings ``db``; returns a handle for :meth:`free`."""

    def free(self, handle: object) -> None: ...

    def ring(self, db: int) -> None:
        """Ring the peer's doorbell ``db``."""


class HostDoorbells:
    """:class:`LinkDoorbells` of the host: card->host doorbells 0-3 in, host->card 0-15 out (spec 1.3, 2.3)."""

    def __init__(self, intr, name: str = "scif"):
        self.intr = intr  # micdrv.x100.hwops.InterruptOps
        self.name = name

    def next_db(self) -> int:
        return self.intr.next_db()

    def request(self, db: int, callback: Callable[[], None]) -> object:
        return self.intr.request_doorbell(db, callback, self.name)

    def free(self, handle: object) -> None:
        self.intr.free_irq(handle)

    def ring(self, db: int) -> None:
        self.intr.send_intr(db)


class ScifHwLink:
    """The node QP between this node and ``peer_node`` over one MIC hardware device (spec 8.4)."""

    def __init__(self, node: ScifNode, peer_node: int, memory: ScifMemory, bootparam: Bootparam,
                 doorbells: LinkDoorbells, side: Side, *, poll_interval: float = QP_POLL_INTERVAL,
                 name: str = "", stopped: threading.Event | None = None):
        self.node = node
        self.peer_node = peer_node
        self.memory = memory
        self.bootparam = bootparam
        self.doorbells = doorbells
        self.side = side
        self.stopped = stopped              # set when this node's hardware went away (a card reset)
        self.poll_interval = poll_interval
        self.name = name or f"{node.name}->{peer_node}"
        self.qp: NodeQueuePair | None = None
        self.peer: ScifPeer | None = None
        self.db: int | None = None          # my doorbell, published for the peer
        self.peer_db: int | None = None     # the peer's doorbell, read from the device page
        self.error: str | None = None       # why the peer's QP was refused, if it was
        self.interrupts = 0
        self._handle: object | None = None
        self._cond = threading.Condition()
        self._pending = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- probe (spec 8.4 steps 1-2) --------------------------------------------------------
    def start(self) -> None:
        """Allocate my QP, take and request a doorbell, publish both; the worker then polls for the peer."""
        if self.qp is not None:
            raise ScifError(f"{self.name}: already started")
        qp = NodeQueuePair(self.memory, double_publish=self.node.double_publish, name=f"{self.name} node qp")
        try:
            self.peer = self.node.add_peer(self.peer_node, qp)
            self.qp = qp
            self.db = self.doorbells.next_db()
            self._handle = self.doorbells.request(self.db, self._interrupt)
            publish_qp(self.bootparam, self.side, qp.dma_addr, self.db)
        except BaseException:
            self._undo_start(qp)
            raise
        self._thread = threading.Thread(target=self._run, name=f"scif {self.name}", daemon=True)
        self._thread.start()

    def _undo_start(self, qp: NodeQueuePair) -> None:
        if self._handle is not None:
            self.doorbells.free(self._handle)
            self._handle = None
        if self.peer is not None:
            self.node.peer_lost(self.peer_node, "probe failed")  # closes the QP
        else:
            qp.close()
        self.qp = self.peer = None

    @property
    def connected(self) -> bool:
        """My QP is connected to the peer's (step 3 done)."""
        return self.peer is not None and self.peer.qp_ready

    @property
    def alive(self) -> bool:
        return self.peer is not None and self.peer.alive

    # --- the ordered workqueue ------------------------------------------------------------
    def _interrupt(self) -> None:
        """The doorbell's interrupt callback: never blocks, only hands the work to the worker."""
        with self._cond:
            self.interrupts += 1
            self._pending = True
            self._cond.notify()

    def _run(self) -> None:
        first = True
        while True:
            with self._cond:
                if not first and not self._pending and not self._stopping:
                    polling = self.error is None and not self.connected
                    self._cond.wait(self.poll_interval if polling else None)
                first = False
                if self._stopping:
                    return
                pending, self._pending = self._pending, False
            try:
                if not self.connected:
                    self._poll()
                if pending:
                    self.peer.interrupt()
                    if not self.connected and self.peer.init_seen:
                        self._poll()  # SCIF_INIT flushes the poll work (spec 8.4 step 4)
            except Exception as e:
                if self._stopping or (self.stopped is not None and self.stopped.is_set()):
                    log.debug("%s: worker stopping: %s", self.name, e)
                else:
                    log.exception("%s: node queue pair work failed", self.name)

    def _poll(self) -> None:
        """Step 3 when the peer has published its QP: map it, send SCIF_INIT."""
        if self.error is not None or self.peer is None or self.peer.removed:
            return
        try:
            found = peer_qp(self.bootparam, self.side)
            if found is None:
                return
            addr, db = found
            self.peer_db = db
            self.peer.start(addr, doorbell=lambda: self.doorbells.ring(db))
        except (ScifProtocolError, MemoryAccessError) as e:
            log.error("%s: the peer's node queue pair is refused, the node stays down: %s", self.name, e)
            self.error = str(e)
            return
        log.info("%s: connected to node %d's queue pair at %#x, its doorbell %d", self.name, self.peer_node,
                 addr, db)

    # --- remove (spec 8.4 step 6) ---------------------------------------------------------
    def close(self, force: bool = False, timeout: float | None = None,
              cancel: threading.Event | None = None) -> bool:
        """Withdraw my QP, tell the peer (unless ``force``), free the doorbell, stop the worker.

        Returns True when the peer acknowledged the exit (always True with
        ``force`` or when the peer was not up). ``cancel`` ends the wait for
        the acknowledgement early (:meth:`ScifNode.remove_peer`). Idempotent.
        """
        if self.qp is None:
            return True
        acked = True
        try:
            unpublish_qp(self.bootparam, self.side)
        except Exception as e:  # the device page may be unreachable from a card that was reset
            log.warning("%s: withdrawing the queue pair from the device page: %s", self.name, e)
        try:
            if force:
                self.node.peer_lost(self.peer_node, "forced teardown")
            else:
                acked = self.node.remove_peer(self.peer_node, timeout, cancel)
        except Exception as e:
            log.warning("%s: removing node %d: %s", self.name, self.peer_node, e)
            acked = False
        if self._handle is not None:
            try:
                self.doorbells.free(self._handle)
            except Exception as e:
                log.warning("%s: freeing doorbell %s: %s", self.name, self.db, e)
            self._handle = None
        with self._cond:
            self._stopping = True
            self._cond.notify()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(WORKER_JOIN_TIMEOUT)
            if t.is_alive():
                log.error("%s: the worker did not stop within %g s", self.name, WORKER_JOIN_TIMEOUT)
        self._thread = None
        self.qp = None
        return acked

    def abandon(self) -> None:
        """The hardware under the link is gone (a card reset under the card OS): stop the worker and
        forget the peer and its connections, touching neither memory nor doorbells."""
        if self.qp is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(WORKER_JOIN_TIMEOUT)
        self._thread = None
        if self.peer is not None and not self.peer.removed:
            self.node._drop_peer(self.peer, close_link=False)
        self._handle = None
        self.qp = None

    def status(self) -> dict:
        return {"peer_node": self.peer_node, "db": self.db, "peer_db": self.peer_db,
                "connected": self.connected, "alive": self.alive, "interrupts": self.interrupts,
                "error": self.error}

    def __repr__(self) -> str:
        return f"<ScifHwLink {self.name} db={self.db} peer_db={self.peer_db} alive={self.alive}>"
