"""SCIF node messages: ``struct scifmsg``, the uop codes and well-known ports (spec 8.1, 8.2).

Every control message between two SCIF nodes is one packed 44-byte
``struct scifmsg`` written into the peer's node queue pair ring (spec 8.3):

====  ====  =======================================
 off  size  field
====  ====  =======================================
   0     4  src  (``struct scif_port_id``: u16 node, u16 port)
   4     4  dst  (same)
   8     4  u32 uop
  12    32  u64 payload[4]
====  ====  =======================================

The sender does not clear fields it does not use (spec 8.2: "stack
garbage"), so a receiver must never trust ``src``/``dst`` of a message whose
uop does not define them; routing uses the queue pair a message arrived on.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

from .errors import ScifProtocolError

# spec 8.1: host = node 0 (the management node); card with mic id k = node k+1.
SCIF_MGMT_NODE = 0
MAX_SCIF_NODES = 129  # spec 8.1 "Max 129 nodes"

# spec 7.2: the host's COSM server listens on SCIF port 201 with backlog 16.
SCIF_COSM_LISTEN_PORT = 201
SCIF_COSM_BACKLOG = 16

# Port ranges from the kernel's include/linux/scif.h (not in the spec; they
# only decide which number an unbound connect gets): ports below 1024 are
# "admin" ports, ephemeral ports are handed out above SCIF_PORT_RSVD.
SCIF_ADMIN_PORT_END = 1024
SCIF_PORT_RSVD = 1088
SCIF_PORT_COUNT = 0x10000


class Uop(enum.IntEnum):
    """``msg.uop`` (spec 8.2); the kernel's names are ``SCIF_<name>``."""

    INIT = 1
    EXIT = 2
    EXIT_ACK = 3
    NODE_ADD = 4
    NODE_ADD_ACK = 5
    NODE_ADD_NACK = 6
    NODE_REMOVE = 7
    NODE_REMOVE_ACK = 8
    CNCT_REQ = 9
    CNCT_GNT = 10
    CNCT_GNTACK = 11
    CNCT_GNTNACK = 12
    CNCT_REJ = 13
    DISCNCT = 14
    DISCNT_ACK = 15
    CLIENT_SENT = 16
    CLIENT_RCVD = 17
    GET_NODE_INFO = 18
    REGISTER = 19
    REGISTER_ACK = 20
    REGISTER_NACK = 21
    UNREGISTER = 22
    UNREGISTER_ACK = 23
    UNREGISTER_NACK = 24
    ALLOC_REQ = 25
    ALLOC_GNT = 26
    ALLOC_REJ = 27
    FREE_VIRT = 28
    MUNMAP = 29
    MARK = 30
    MARK_ACK = 31
    MARK_NACK = 32
    WAIT = 33
    WAIT_ACK = 34
    WAIT_NACK = 35
    SIG_LOCAL = 36
    SIG_REMOTE = 37
    SIG_ACK = 38
    SIG_NACK = 39

    @property
    def kernel_name(self) -> str:
        return "SCIF_" + self.name


SCIF_MAX_MSG = Uop.SIG_NACK  # spec 8.2 "(max 39)"


class PortId(NamedTuple):
    """``struct scif_port_id { u16 node; u16 port; }`` (spec 8.1)."""

    node: int
    port: int

    def __str__(self) -> str:
        return f"{self.node}:{self.port}"


_SCIFMSG = struct.Struct("<HHHHI4Q")  # packed, spec 8.2
SCIFMSG_SIZE = _SCIFMSG.size
assert SCIFMSG_SIZE == 44


@dataclass(frozen=True)
class ScifMsg:
    """One ``struct scifmsg`` (spec 8.2)."""

    uop: Uop
    src: PortId = PortId(0, 0)
    dst: PortId = PortId(0, 0)
    payload: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self):
        p = tuple(self.payload) + (0,) * (4 - len(self.payload))
        if len(p) != 4:
            raise ValueError(f"a scifmsg has 4 payload words, not {len(self.payload)}")
        object.__setattr__(self, "payload", p)
        object.__setattr__(self, "src", PortId(*self.src))
        object.__setattr__(self, "dst", PortId(*self.dst))

    def encode(self) -> bytes:
        try:
            return _SCIFMSG.pack(self.src.node, self.src.port, self.dst.node, self.dst.port,
                                 int(self.uop), *self.payload)
        except struct.error as e:
            raise ValueError(f"{self}: a field does not fit its C type: {e}") from None

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "ScifMsg":
        """Parse 44 bytes; an unknown uop is a :class:`ScifProtocolError`."""
        if len(data) != SCIFMSG_SIZE:
            raise ScifProtocolError(f"a scifmsg is {SCIFMSG_SIZE} bytes, got {len(data)}")
        sn, sp, dn, dp, uop, *payload = _SCIFMSG.unpack(data)
        try:
            u = Uop(uop)
        except ValueError:
            raise ScifProtocolError(f"unknown SCIF message uop {uop} (spec 8.2: 1..{int(SCIF_MAX_MSG)})") from None
        return cls(u, PortId(sn, sp), PortId(dn, dp), tuple(payload))

    def reply(self, uop: Uop, **changes) -> "ScifMsg":
        """The kernel's habit of answering with the received message, uop changed."""
        return ScifMsg(uop, changes.get("src", self.src), changes.get("dst", self.dst),
                       changes.get("payload", self.payload))

    def __str__(self) -> str:
        pl = ":".join(f"{p:#x}" for p in self.payload)
        return f"{self.uop.kernel_name} {self.src} -> {self.dst} payload {pl}"
