"""One error hierarchy for SCIF.

Each error says what failed; the ones an application expects to handle also
derive from the matching built-in so ``except ConnectionRefusedError`` or
``except TimeoutError`` work on a SCIF endpoint as on a socket. ``errno`` is
what the kernel's SCIF API returned in the same situation.
"""

from __future__ import annotations

import errno as _errno


class ScifError(Exception):
    """Any SCIF failure."""

    errno: int | None = None


class ScifProtocolError(ScifError):
    """The peer broke the protocol: a bad message, a bad magic, an address or
    offset outside what it may name. The peer is not trusted; nothing outside
    our windows was touched."""

    errno = _errno.EIO


class RingError(ScifProtocolError):
    """A ring pointer the peer published is impossible (spec 8.3)."""


class ScifTimeout(ScifError, TimeoutError):
    """A blocking SCIF call ran out of time."""

    errno = _errno.ETIMEDOUT

    def __init__(self, msg: str, sent: int = 0):
        super().__init__(msg)
        self.sent = sent  # bytes queued before the timeout (send only)


class ScifConnectionRefused(ScifError, ConnectionRefusedError):
    """CNCT_REJ: nobody listens on that port, or its backlog is full (spec 8.5)."""

    errno = _errno.ECONNREFUSED


class ScifConnectionReset(ScifError, ConnectionResetError):
    """The peer closed the connection (DISCNCT) or its node went away."""

    errno = _errno.ECONNRESET


class ScifNotConnected(ScifError):
    """The endpoint is not in a state that allows this call."""

    errno = _errno.ENOTCONN


class ScifNodeDown(ScifError):
    """The peer node is not alive (no SCIF_INIT yet, removed, or its queue is stuck)."""

    errno = _errno.ENODEV


class ScifAddressInUse(ScifError):
    """The port is already bound on this node."""

    errno = _errno.EADDRINUSE
