"""SCIF, the Symmetric Communication Interface, as much as COSM needs and a bit more (spec 8).

Layers, bottom up -- none touches a register; memory is reached through
:class:`~micdrv.memory.Memory` and doorbells are callables:

* :mod:`.wire` -- ``struct scifmsg``, uop codes, ports (spec 8.1, 8.2);
* :mod:`.ring` -- the byte ring ``struct scif_rb`` (spec 8.3);
* :mod:`.qp` -- ``struct scif_qp`` and queue-pair set-up (spec 8.3, 8.4 step 3);
* :mod:`.nodeqp` -- the node queue pair carrying node messages, and the
  device-page hand-shake (spec 8.4);
* :mod:`.node` -- a SCIF node: peers, node messages, teardown (spec 8.4);
* :mod:`.endpoint` -- endpoints: listen/accept/connect/send/recv/close (spec 8.5);
* :mod:`.epd` -- what the connection messages do to endpoints (spec 8.5);
* :mod:`.hwlink` -- the node QP with one peer over a MIC hardware device:
  probe, device-page hand-shake, interrupt work, remove (spec 8.4).

The same code runs on the host (node 0) and on the simulated card (node k+1).
"""

from .endpoint import POLLERR, POLLHUP, POLLIN, POLLOUT, Endpoint, EpState
from .hwlink import HostDoorbells, LinkDoorbells, ScifHwLink
from .errors import (RingError, ScifAddressInUse, ScifConnectionRefused, ScifConnectionReset, ScifError,
                     ScifNodeDown, ScifNotConnected, ScifProtocolError, ScifTimeout)
from .node import SCIF_NODE_ACCEPT_TIMEOUT, SCIF_NODE_ALIVE_TIMEOUT, NodeLink, ScifNode, ScifPeer
from .nodeqp import NodeQueuePair, Side, peer_qp, publish_qp, unpublish_qp, wait_peer_qp
from .qp import SCIF_ENDPT_QP_SIZE, SCIF_NODE_QP_SIZE, SCIFEP_MAGIC, LocalBuffer, QueuePair, ScifMemory
from .ring import Ring, U32Ptr
from .wire import (SCIF_COSM_BACKLOG, SCIF_COSM_LISTEN_PORT, SCIF_MGMT_NODE, SCIFMSG_SIZE, PortId, ScifMsg,
                   Uop)

__all__ = [
    "Endpoint", "EpState", "POLLIN", "POLLOUT", "POLLHUP", "POLLERR",
    "ScifError", "ScifProtocolError", "RingError", "ScifTimeout", "ScifConnectionRefused", "ScifConnectionReset",
    "ScifNotConnected", "ScifNodeDown", "ScifAddressInUse",
    "ScifNode", "ScifPeer", "NodeLink", "SCIF_NODE_ALIVE_TIMEOUT", "SCIF_NODE_ACCEPT_TIMEOUT",
    "ScifHwLink", "HostDoorbells", "LinkDoorbells",
    "NodeQueuePair", "Side", "publish_qp", "peer_qp", "unpublish_qp", "wait_peer_qp",
    "QueuePair", "ScifMemory", "LocalBuffer", "SCIF_NODE_QP_SIZE", "SCIF_ENDPT_QP_SIZE", "SCIFEP_MAGIC",
    "Ring", "U32Ptr",
    "ScifMsg", "Uop", "PortId", "SCIFMSG_SIZE", "SCIF_MGMT_NODE", "SCIF_COSM_LISTEN_PORT", "SCIF_COSM_BACKLOG",
]
