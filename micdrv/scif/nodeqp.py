"""The SCIF node queue pair: control messages between two nodes (spec 8.4).

A :class:`NodeQueuePair` is a :class:`~micdrv.scif.qp.QueuePair` with 64 KiB
rings carrying 44-byte ``struct scifmsg`` (spec 8.2). It is the "node
message transport" the endpoint layer (:mod:`.node`, :mod:`.endpoint`)
sends on:

* :meth:`NodeQueuePair.send_msg` writes a message into the outbound ring,
  retrying every 1 ms for up to 3 s while the ring is full, commits it and
  rings the peer's doorbell (spec 8.4 step 5);
* :meth:`NodeQueuePair.drain` is what the doorbell interrupt runs: read
  messages until the ring is empty, hand each to a handler, publish the read
  offset after each -- except after SCIF_EXIT_ACK, when the peer's QP may be
  gone (spec 8.4 step 5).

The doorbell itself is a callable supplied by the hardware layer (host: ring
card doorbell ``h2c_scif_db``; card: ring host doorbell ``c2h_scif_db``), so
this module never touches a register.

The device-page hand-shake (spec 8.4 steps 1-3, 6) is a few field writes and
reads of :class:`~micdrv.bootparam.Bootparam`, given here as
:func:`publish_qp`, :func:`peer_qp` and :func:`unpublish_qp` for the two
sides.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Callable

from ..bootparam import DB_UNSET, Bootparam
from .errors import RingError, ScifNodeDown, ScifProtocolError
from .qp import SCIF_NODE_QP_SIZE, QueuePair, ScifMemory
from .wire import SCIFMSG_SIZE, ScifMsg, Uop

log = logging.getLogger(__name__)

SEND_RETRY_INTERVAL = 0.001   # spec 8.4 step 5: retry every 1 ms ...
SEND_TIMEOUT = 3.0            # ... for up to ~3 s while the ring is full
QP_POLL_INTERVAL = 1.0        # spec 8.4 steps 1-2: poll the device page every 1 s

NUM_C2H_DOORBELLS = 4         # spec 1.3: card->host doorbells 0..3
NUM_H2C_DOORBELLS = 16        # spec 9: the card chooses among 16 doorbells


class NodeQueuePair(QueuePair):
    """The node QP with one peer node: ``send_msg`` out, ``drain`` in."""

    def __init__(self, memory: ScifMemory, *, double_publish: bool = False, name: str = "node qp",
                 ring_size: int = SCIF_NODE_QP_SIZE, send_timeout: float = SEND_TIMEOUT):
        super().__init__(memory, ring_size, double_publish=double_publish, name=name)
        self._send_lock = threading.Lock()
        self.doorbell: Callable[[], None] | None = None
        self.send_timeout = send_timeout
        self.sent = 0
        self.received = 0

    def connect(self, peer_qp_addr: int, doorbell: Callable[[], None] | None = None) -> None:
        """Map the peer's QP (spec 8.4 step 3) and remember how to ring its doorbell."""
        super().connect(peer_qp_addr)
        if doorbell is not None:
            self.doorbell = doorbell

    def send_msg(self, msg: ScifMsg) -> None:
        """``_scif_nodeqp_send``: queue one message and ring the peer's doorbell."""
        data = msg.encode()
        with self._send_lock:
            ring = self.outbound
            if ring is None:
                raise ScifNodeDown(f"{self.name}: cannot send {msg.uop.kernel_name}: the queue pair is not connected")
            deadline = time.monotonic() + self.send_timeout
            while not ring.write(data):
                if time.monotonic() > deadline:
                    raise ScifNodeDown(f"{self.name}: the peer has not drained its node queue for "
                                       f"{self.send_timeout:g} s; {msg.uop.kernel_name} not sent (spec 8.4)")
                time.sleep(SEND_RETRY_INTERVAL)
            ring.commit()
            self.sent += 1
        bell = self.doorbell
        if bell is not None:
            bell()

    def drain(self, handler: Callable[[ScifMsg], None]) -> int:
        """``scif_nodeqp_intrhandler``: hand every queued message to ``handler``; returns how many.

        A message with an unknown uop is logged and skipped (the kernel's
        ``scif_msg_unknown``). A ring pointer the peer corrupted raises
        :class:`~micdrv.scif.errors.RingError`: the caller should give the
        node up.
        """
        n = 0
        with self._lock:
            ring = self.inbound
            while not self.closed:
                data = ring.read(SCIFMSG_SIZE)
                if data is None:
                    break
                n += 1
                self.received += 1
                try:
                    msg = ScifMsg.decode(data)
                except ScifProtocolError as e:
                    log.warning("%s: dropped a message: %s", self.name, e)
                    ring.update_read_ptr()
                    continue
                handler(msg)
                # "The node queue pair is unmapped so skip the read pointer
                # update after receipt of a SCIF_EXIT_ACK."
                if msg.uop == Uop.EXIT_ACK:
                    break
                ring.update_read_ptr()
        return n


# --- the device-page hand-shake (spec 8.4 steps 1-3 and 6) ---------------------------

class Side(enum.Enum):
    """Which end of the host-card link this node is."""

    HOST = "host"
    CARD = "card"


def publish_qp(bp: Bootparam, side: Side, qp_addr: int, db: int) -> None:
    """Steps 1/2: tell the peer where my node QP is and which doorbell interrupts me."""
    if side is Side.HOST:
        if not 0 <= db < NUM_C2H_DOORBELLS:
            raise ValueError(f"c2h_scif_db {db} is not a card->host doorbell 0..{NUM_C2H_DOORBELLS - 1} (spec 1.3)")
        bp.c2h_scif_db = db
        bp.scif_host_dma_addr = qp_addr
    else:
        if not 0 <= db < NUM_H2C_DOORBELLS:
            raise ValueError(f"h2c_scif_db {db} is not a card doorbell 0..{NUM_H2C_DOORBELLS - 1} (spec 9)")
        bp.h2c_scif_db = db
        bp.scif_card_dma_addr = qp_addr


def peer_qp(bp: Bootparam, side: Side) -> tuple[int, int] | None:
    """Step 3: the peer's (node QP address, doorbell) once it has published both, else None.

    The values come from the peer: a doorbell out of range is a
    :class:`~micdrv.scif.errors.ScifProtocolError` (the address is checked
    when the QP is mapped).
    """
    if side is Side.HOST:
        addr, db, limit, field = bp.scif_card_dma_addr, bp.h2c_scif_db, NUM_H2C_DOORBELLS, "h2c_scif_db"
    else:
        addr, db, limit, field = bp.scif_host_dma_addr, bp.c2h_scif_db, NUM_C2H_DOORBELLS, "c2h_scif_db"
    if not addr or db == DB_UNSET:
        return None
    if not 0 <= db < limit:
        raise ScifProtocolError(f"bootparam.{field} = {db} is not a doorbell 0..{limit - 1}")
    return addr, db


def unpublish_qp(bp: Bootparam, side: Side) -> None:
    """Step 6: withdraw my QP from the device page before the EXIT sequence."""
    if side is Side.HOST:
        bp.c2h_scif_db = DB_UNSET
        bp.scif_host_dma_addr = 0
    else:
        bp.h2c_scif_db = DB_UNSET
        bp.scif_card_dma_addr = 0


def wait_peer_qp(bp: Bootparam, side: Side, timeout: float, interval: float = QP_POLL_INTERVAL,
                 stop: threading.Event | None = None) -> tuple[int, int] | None:
    """Poll :func:`peer_qp` every ``interval`` s (spec 8.4: 1 s) until it answers, ``timeout`` or ``stop``."""
    deadline = time.monotonic() + timeout
    while True:
        found = peer_qp(bp, side)
        if found is not None:
            return found
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if stop is not None:
            if stop.wait(min(interval, left)):
                return None
        else:
            time.sleep(min(interval, left))


__all__ = ["NodeQueuePair", "Side", "publish_qp", "peer_qp", "unpublish_qp", "wait_peer_qp", "RingError",
           "SEND_TIMEOUT", "QP_POLL_INTERVAL"]
