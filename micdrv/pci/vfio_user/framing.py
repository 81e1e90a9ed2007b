"""vfio-user framing: whole messages over a non-blocking AF_UNIX stream socket (spec 2.1, 2.2).

A sender puts header, payload and fds (SCM_RIGHTS) in one ``sendmsg``; a
receiver ``recvmsg``s the 16-byte header with a control buffer that collects
the fds, then reads ``size - 16`` more bytes (spec 2.1). :class:`Framing`
does exactly that and checks what it can without knowing the command: the
size (at least the header, at most ``max_msg_size``) and the type bits
(command or reply, spec 2.2). It knows nothing of threads, msg_ids or
handlers; :class:`~.protocol.Connection` builds those on top.

The socket is non-blocking and polled only when an operation would block (a
socket timeout would cost a poll before every call). Once a message has
begun, the rest must follow within ``io_timeout``: the peer sent it in one
``sendmsg``, and a stream that stalls mid-message cannot be resynchronised.
Errors come out as :class:`ProtocolError` (the peer broke the framing) or
:class:`DisconnectedError` (the peer is gone); fds received with a message
that fails are closed.
"""

from __future__ import annotations

import array
import select
import socket
import time
from typing import Sequence

from ..errors import DisconnectedError, ProtocolError, VfioUserError
from .wire import (FLAGS_TYPE_MASK, FLAGS_TYPE_REPLY, HEADER, HEADER_SIZE, MAX_RECV_FDS, Message,
                   _close_quietly, encode_header)

_unpack_header = HEADER.unpack
_CMSG_SPACE = socket.CMSG_SPACE(MAX_RECV_FDS * array.array("i").itemsize)
_SOCKET_BUFFER = 4 << 20  # ask for big socket buffers: a full-size message should not block a sender
_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
# receive() first tries to read without polling -- in a burst the next message
# is already there, and a failed read costs what the poll would -- but polls at
# least every _EAGER_READS messages, so a wake fd is seen under a steady stream.
_EAGER_READS = 32
# Plain ints: the socket module's IntFlag members cost an enum operation per use on the hot path.
_SOL_SOCKET, _SCM_RIGHTS = int(socket.SOL_SOCKET), int(socket.SCM_RIGHTS)
_MSG_NOSIGNAL, _MSG_CTRUNC, _MSG_CMSG_CLOEXEC = (int(socket.MSG_NOSIGNAL), int(socket.MSG_CTRUNC),
                                                 int(socket.MSG_CMSG_CLOEXEC))


def _fds_from(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


class Framing:
    """Send and receive whole messages on ``sock``. One sender and one receiver at a time."""

    def __init__(self, sock: socket.socket, *, max_msg_size: int, io_timeout: float):
        self._sock = sock
        self._fd = sock.fileno()
        self.max_msg_size = max_msg_size
        self.io_timeout = io_timeout
        sock.setblocking(False)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
            except OSError:
                pass
        self._poll = select.poll()  # the receiver's
        self._poll.register(self._fd, _POLL_IN)
        self._poll_out = select.poll()  # the sender's
        self._poll_out.register(self._fd, select.POLLOUT)
        self._wake_polls: dict[int, select.poll] = {}
        self._eager = 0  # reads in a row without a poll (see _EAGER_READS)

    def fileno(self) -> int:
        return self._fd

    def shutdown(self) -> None:
        """Wake a receiver blocked in poll and make the peer see EOF; the fd stays until :meth:`close`."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self._sock.close()

    def send(self, msg_id: int, command: int, flags: int, error: int, payload, fds: Sequence[int], step: str) -> None:
        """Send one message; :class:`DisconnectedError` if the peer is gone or stopped reading."""
        header = encode_header(msg_id, command, len(payload), flags, error)
        anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else []
        total = HEADER_SIZE + len(payload)
        try:
            try:
                sent = self._sock.sendmsg([header, payload], anc, _MSG_NOSIGNAL)
            except BlockingIOError:
                sent = 0
            if sent < total:  # socket buffer full: the rest as it drains (fds went with the first byte)
                self._send_rest(memoryview(header + bytes(payload)), sent, anc)
        except TimeoutError:
            raise DisconnectedError(step, f"peer stopped reading for {self.io_timeout:.3g} s") from None
        except OSError as e:
            raise DisconnectedError(step, "send failed: peer is gone", errno=e.errno) from None

    def _send_rest(self, data: memoryview, sent: int, anc) -> None:
        deadline = time.monotonic() + self.io_timeout
        while sent < len(data):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll_out.poll(int(remaining * 1000) + 1):
                raise TimeoutError
            try:
                if sent == 0:
                    sent = self._sock.sendmsg([data], anc, _MSG_NOSIGNAL)
                else:
                    sent += self._sock.send(data[sent:], _MSG_NOSIGNAL)
            except BlockingIOError:
                pass

    def _wait_readable(self, deadline: float) -> None:
        """Mid-message: the rest was sent in the same sendmsg, so it is due within io_timeout."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._poll.poll(int(remaining * 1000) + 1):
            raise TimeoutError

    def receive(self, timeout: float | None, step: str, wake_fd: int | None = None) -> Message | str:
        """Read one whole message; "timeout" if none began within ``timeout``, "wake" if ``wake_fd`` fired."""
        head = None
        fds: list[int] = []
        deadline = None
        try:
            if self._eager < _EAGER_READS:  # a message may already be waiting: no poll for it
                try:
                    head, anc, mflags, _addr = self._sock.recvmsg(HEADER_SIZE, _CMSG_SPACE, _MSG_CMSG_CLOEXEC)
                    self._eager += 1
                except BlockingIOError:
                    pass
            if head is None:
                self._eager = 0
                ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
                if wake_fd is None:
                    if not self._poll.poll(ms):
                        return "timeout"
                else:
                    p = self._wake_polls.get(wake_fd)
                    if p is None:
                        p = self._wake_polls[wake_fd] = select.poll()
                        p.register(self._fd, _POLL_IN)
                        p.register(wake_fd, select.POLLIN)
                    ready = p.poll(ms)
                    if not ready:
                        return "timeout"
                    for fd, _ev in ready:
                        if fd == wake_fd:
                            return "wake"
                try:
                    head, anc, mflags, _addr = self._sock.recvmsg(HEADER_SIZE, _CMSG_SPACE, _MSG_CMSG_CLOEXEC)
                except BlockingIOError:
                    return "timeout"  # spurious readiness: nothing begun, the caller decides
            if anc:
                fds.extend(_fds_from(anc))
            if mflags & _MSG_CTRUNC:
                raise ProtocolError(step, f"message carried more than {MAX_RECV_FDS} fds (control data truncated)")
            if len(head) < HEADER_SIZE:  # the header itself came in pieces (or not at all: EOF)
                deadline = time.monotonic() + self.io_timeout
                head = bytearray(head)
                while len(head) < HEADER_SIZE:
                    if not head:
                        raise DisconnectedError(step, "peer closed the connection")
                    try:
                        data, anc, mflags, _addr = self._sock.recvmsg(HEADER_SIZE - len(head), _CMSG_SPACE,
                                                                      _MSG_CMSG_CLOEXEC)
                    except BlockingIOError:
                        self._wait_readable(deadline)
                        continue
                    fds.extend(_fds_from(anc))
                    if mflags & _MSG_CTRUNC:
                        raise ProtocolError(step, f"message carried more than {MAX_RECV_FDS} fds "
                                            "(control data truncated)")
                    if not data:
                        raise DisconnectedError(step, "peer closed the connection in the middle of a header")
                    head += data
            msg_id, command, size, flags, error = _unpack_header(head)
            if size < HEADER_SIZE or size > self.max_msg_size:
                raise ProtocolError(step, f"message size {size} outside [{HEADER_SIZE}, {self.max_msg_size}] "
                                    f"(msg_id {msg_id}, command {command})")
            if flags & FLAGS_TYPE_MASK > FLAGS_TYPE_REPLY:  # spec 2.2: types 0 (command) and 1 (reply) only
                raise ProtocolError(step, f"unknown message type {flags & FLAGS_TYPE_MASK} in flags {flags:#x}")
            n = size - HEADER_SIZE
            payload = bytearray(n)
            if n:
                try:
                    got = self._sock.recv_into(payload)
                except BlockingIOError:
                    got = 0
                if got < n:
                    deadline = deadline or time.monotonic() + self.io_timeout
                    view = memoryview(payload)
                    while got < n:
                        try:
                            k = self._sock.recv_into(view[got:])
                        except BlockingIOError:
                            self._wait_readable(deadline)
                            continue
                        if k == 0:
                            raise DisconnectedError(step, "peer closed the connection in the middle of a message")
                        got += k
            return Message(msg_id, command, flags, error, payload, fds)
        except TimeoutError:
            exc: VfioUserError = ProtocolError(step, f"peer stalled in the middle of a message for {self.io_timeout:.3g} s")
        except OSError as e:
            if isinstance(e, DisconnectedError):
                exc = e
            else:
                exc = DisconnectedError(step, "receive failed: peer is gone", errno=e.errno)
        except VfioUserError as e:
            exc = e
        for fd in fds:
            _close_quietly(fd)
        raise exc
