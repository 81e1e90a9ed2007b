"""SCIF, the Symmetric Communication Interface, as much as COSM needs and a bit more (spec 8).

Layers, bottom up -- none touches a register; memory is reached through
:class:`~micdrv.memory.Memory` and doorbells are callables:

* :mod:`.wire` -- ``struct scifmsg``, uop codes, ports (spec 8.1, 8.2);
* :mod:`.ring` -- the byte ring ``struct scif_rb`` (spec 8.3);
* :mod:`.qp` -- ``struct scif_qp`` and queue-pair set-up (spec 8.3, 8.4 step 3).

The same code runs on the host (node 0) and on the simulated card (node k+1).
"""

from .errors import (RingError, ScifAddressInUse, ScifConnectionRefused, ScifConnectionReset, ScifError,
                     ScifNodeDown, ScifNotConnected, ScifProtocolError, ScifTimeout)
from .qp import SCIF_ENDPT_QP_SIZE, SCIF_NODE_QP_SIZE, SCIFEP_MAGIC, LocalBuffer, QueuePair, ScifMemory
from .ring import Ring, U32Ptr
from .wire import (SCIF_COSM_BACKLOG, SCIF_COSM_LISTEN_PORT, SCIF_MGMT_NODE, SCIFMSG_SIZE, PortId, ScifMsg,
                   Uop)
