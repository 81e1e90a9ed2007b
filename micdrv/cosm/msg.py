"""COSM messages, card states and shutdown statuses (spec 3.4, 7.1-7.3).

COSM (Coprocessor State Management) talks over one ordinary connected SCIF
endpoint per card, the card's client connected to the host's port 201. The
byte stream carries fixed 24-byte ``struct cosm_msg``:

====  ====  =====================================================
 off  size  field
====  ====  =====================================================
   0     8  u64 id (:class:`CosmMsgId`)
   8     8  union: u64 shutdown_status | u64 tv_sec
  16     8  u64 tv_nsec (SYNC_TIME only)
====  ====  =====================================================

The states and statuses are what users see (sysfs ``state`` and
``shutdown_status``, ``micctl status``): keep exactly these strings.

Spec 7.1 [INF]: a v5.x Linux card reports a reboot as the kernel's
SYSTEM_RESTART (5), which the host rejects as "Unexpected shutdown_status";
the simulated card should send :attr:`MicStatus.RESTART` (4).
"""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass
from typing import Protocol

COSM_MSG_SIZE = 24                # spec 7.1
COSM_HEARTBEAT_SEND_SEC = 30      # spec 7.2: the card sends a heartbeat every 30 s poll
COSM_HEARTBEAT_TIMEOUT_SEC = 40   # spec 7.2: the host's watchdog, 30 + 10 s
COSM_CONNECT_RETRIES = 10         # spec 7.2: the card client tries 10 times ...
COSM_CONNECT_RETRY_SEC = 1.0      # ... 1 s apart
COSM_RESET_POLLS = 45             # spec 2.5: up to 45 polls of "ready", 1 s apart
NSEC_PER_SEC = 1_000_000_000

_COSM_MSG = struct.Struct("<QQQ")
assert _COSM_MSG.size == COSM_MSG_SIZE


class CosmProtocolError(Exception):
    """The peer sent something that is not a valid ``struct cosm_msg``."""


class CosmMsgId(enum.IntEnum):
    """``cosm_msg.id`` (spec 7.1)."""

    SHUTDOWN = 0           # host -> card: orderly power-off
    SYNC_TIME = 1          # host -> card: host wall time
    HEARTBEAT = 2          # card -> host
    SHUTDOWN_STATUS = 3    # card -> host: how it is going down

    @property
    def kernel_name(self) -> str:
        return "COSM_MSG_" + self.name


class MicState(enum.IntEnum):
    """``enum mic_states`` (spec 3.4); :attr:`sysfs` is the string users see."""

    READY = 0
    BOOTING = 1
    ONLINE = 2
    SHUTTING_DOWN = 3
    RESETTING = 4
    RESET_FAILED = 5

    @property
    def sysfs(self) -> str:
        return _STATE_STRINGS[self]

    @classmethod
    def from_sysfs(cls, s: str) -> "MicState":
        try:
            return cls(_STATE_STRINGS.index(s))
        except ValueError:
            raise ValueError(f"unknown card state {s!r}; one of {', '.join(_STATE_STRINGS)}") from None

    def __str__(self) -> str:
        return self.sysfs


class MicStatus(enum.IntEnum):
    """``enum mic_status`` (spec 3.4): why the card went down."""

    NOP = 0
    CRASHED = 1
    HALTED = 2
    POWER_OFF = 3
    RESTART = 4

    @property
    def sysfs(self) -> str:
        return _STATUS_STRINGS[self]

    @classmethod
    def from_sysfs(cls, s: str) -> "MicStatus":
        try:
            return cls(_STATUS_STRINGS.index(s))
        except ValueError:
            raise ValueError(f"unknown shutdown status {s!r}; one of {', '.join(_STATUS_STRINGS)}") from None

    def __str__(self) -> str:
        return self.sysfs


# spec 3.4, exactly as cosm_sysfs.c prints them, indexed by the enum value.
_STATE_STRINGS = ("ready", "booting", "online", "shutting_down", "resetting", "reset_failed")
_STATUS_STRINGS = ("nop", "crashed", "halted", "poweroff", "restart")
STATE_STRINGS = _STATE_STRINGS
STATUS_STRINGS = _STATUS_STRINGS

# spec 7.3: a SHUTDOWN_STATUS outside 1..4 is "Unexpected shutdown_status".
REPORTABLE_STATUSES = (MicStatus.CRASHED, MicStatus.HALTED, MicStatus.POWER_OFF, MicStatus.RESTART)


@dataclass(frozen=True)
class CosmMsg:
    """One ``struct cosm_msg``. Build with the class methods; :meth:`decode` validates."""

    id: CosmMsgId
    shutdown_status: MicStatus | None = None
    tv_sec: int = 0
    tv_nsec: int = 0

    @classmethod
    def shutdown(cls) -> "CosmMsg":
        return cls(CosmMsgId.SHUTDOWN)

    @classmethod
    def heartbeat(cls) -> "CosmMsg":
        return cls(CosmMsgId.HEARTBEAT)

    @classmethod
    def sync_time(cls, tv_sec: int | None = None, tv_nsec: int = 0) -> "CosmMsg":
        """SYNC_TIME with the given time, or the host's wall clock now."""
        if tv_sec is None:
            now = time.time_ns()
            tv_sec, tv_nsec = divmod(now, NSEC_PER_SEC)
        return cls(CosmMsgId.SYNC_TIME, tv_sec=tv_sec, tv_nsec=tv_nsec)

    @classmethod
    def status(cls, status: MicStatus | int) -> "CosmMsg":
        """SHUTDOWN_STATUS; only crashed, halted, poweroff and restart can be reported (spec 7.3)."""
        s = _check_status(int(status))
        return cls(CosmMsgId.SHUTDOWN_STATUS, shutdown_status=s)

    @property
    def time_ns(self) -> int:
        return self.tv_sec * NSEC_PER_SEC + self.tv_nsec

    def encode(self) -> bytes:
        if self.id is CosmMsgId.SHUTDOWN_STATUS:
            word1, word2 = int(_check_status(int(self.shutdown_status))), 0
        elif self.id is CosmMsgId.SYNC_TIME:
            if not 0 <= self.tv_nsec < NSEC_PER_SEC or self.tv_sec < 0:
                raise ValueError(f"SYNC_TIME {self.tv_sec}.{self.tv_nsec:09d} is not a valid time")
            word1, word2 = self.tv_sec, self.tv_nsec
        else:
            word1 = word2 = 0
        return _COSM_MSG.pack(int(self.id), word1, word2)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> "CosmMsg":
        """Parse 24 bytes; an unknown id or an unexpected status is a :class:`CosmProtocolError`."""
        if len(data) != COSM_MSG_SIZE:
            raise CosmProtocolError(f"a cosm_msg is {COSM_MSG_SIZE} bytes, got {len(data)}")
        mid, word1, word2 = _COSM_MSG.unpack(data)
        try:
            msg_id = CosmMsgId(mid)
        except ValueError:
            raise CosmProtocolError(f"unknown COSM message id {mid} (spec 7.1: 0..3)") from None
        if msg_id is CosmMsgId.SHUTDOWN_STATUS:
            return cls(msg_id, shutdown_status=_check_status(word1))
        if msg_id is CosmMsgId.SYNC_TIME:
            if word2 >= NSEC_PER_SEC:
                raise CosmProtocolError(f"SYNC_TIME tv_nsec {word2} is not below 10^9")
            return cls(msg_id, tv_sec=word1, tv_nsec=word2)
        return cls(msg_id)  # SHUTDOWN, HEARTBEAT: the union is unused

    def __str__(self) -> str:
        if self.id is CosmMsgId.SHUTDOWN_STATUS:
            return f"{self.id.kernel_name} {self.shutdown_status.sysfs}"
        if self.id is CosmMsgId.SYNC_TIME:
            return f"{self.id.kernel_name} {self.tv_sec}.{self.tv_nsec:09d}"
        return self.id.kernel_name


def _check_status(value: int) -> MicStatus:
    if value not in REPORTABLE_STATUSES:
        raise CosmProtocolError(f"Unexpected shutdown_status {value} (spec 7.3: 1 crashed, 2 halted, "
                                f"3 poweroff, 4 restart)")
    return MicStatus(value)


class CosmStream(Protocol):
    """What COSM needs from a connected SCIF endpoint."""

    def send(self, data: bytes, timeout: float | None = None) -> int: ...

    def recv(self, n: int, timeout: float | None = None) -> bytes: ...


def send_msg(ep: CosmStream, msg: CosmMsg, timeout: float | None = None) -> None:
    """Send one message on a connected endpoint."""
    ep.send(msg.encode(), timeout=timeout)


def recv_msg(ep: CosmStream, timeout: float | None = None) -> CosmMsg:
    """Receive one whole message; a stream that ends mid-message is a :class:`CosmProtocolError`."""
    data = ep.recv(COSM_MSG_SIZE, timeout=timeout)
    if len(data) != COSM_MSG_SIZE:
        raise CosmProtocolError(f"the connection ended {len(data)} bytes into a cosm_msg")
    return CosmMsg.decode(data)
