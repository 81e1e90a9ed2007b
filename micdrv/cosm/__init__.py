"""COSM, Coprocessor State Management (spec 3.4, 7).

* :mod:`.msg` -- ``struct cosm_msg``, the card states (ready, booting,
  online, shutting_down, resetting, reset_failed) and shutdown statuses
  (nop, crashed, halted, poweroff, restart), and send/receive over a SCIF
  endpoint.

The host state machine and heartbeat watchdog, and the card's COSM client,
build on these.
"""

from .msg import (COSM_CONNECT_RETRIES, COSM_CONNECT_RETRY_SEC, COSM_HEARTBEAT_SEND_SEC,
                  COSM_HEARTBEAT_TIMEOUT_SEC, COSM_MSG_SIZE, COSM_RESET_POLLS, REPORTABLE_STATUSES, STATE_STRINGS,
                  STATUS_STRINGS, CosmMsg, CosmMsgId, CosmProtocolError, CosmStream, MicState, MicStatus, recv_msg,
                  send_msg)

__all__ = [
    "CosmMsg", "CosmMsgId", "CosmProtocolError", "CosmStream", "MicState", "MicStatus", "recv_msg", "send_msg",
    "COSM_MSG_SIZE", "COSM_HEARTBEAT_SEND_SEC", "COSM_HEARTBEAT_TIMEOUT_SEC", "COSM_CONNECT_RETRIES",
    "COSM_CONNECT_RETRY_SEC", "COSM_RESET_POLLS", "STATE_STRINGS", "STATUS_STRINGS", "REPORTABLE_STATUSES",
]
