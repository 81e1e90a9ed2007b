"""vfio-user framing: whole messages over a non-blocking AF_UNIX stream socket (spec 2.1, 2.2).

A sender puts header, payload and fds (SCM_RIGHTS) in one ``sendmsg``. A
receiver ``recvmsg_into``s as much as has arrived into one reused buffer,
with a control buffer that collects the fds, and takes whole messages out of
it (spec 2.1): a burst of doorbell writes is one read, a reply one ``poll``
and one read. Fds are matched to their message by where they arrived (the
kernel ends a read just after the first piece of a message that carries
fds, see :meth:`Framing._take_fds`). :class:`Framing` checks what it can
without knowing the command: the size (at least the header, at most
``max_msg_size``) and the type bits (command or reply, spec 2.2). It knows
nothing of threads, msg_ids or handlers; :class:`~.protocol.Connection`
builds those on top.

The socket is non-blocking and polled only when the buffer holds no whole
message (a socket timeout would cost a poll before every call). Once a
message has begun, the rest must follow within ``io_timeout``: the peer sent
it in one ``sendmsg``, and a stream that stalls mid-message cannot be
resynchronised.

Errors come out as :class:`ProtocolError` (the peer broke the framing) or
:class:`DisconnectedError` (the peer is gone); fds received with a message
that fails are closed.
"""

from __future__ import annotations

import array
import select
import socket
import struct
import time
from typing import Sequence

from ..errors import DisconnectedError, ProtocolError, VfioUserError
from .wire import FLAGS_TYPE_MASK, FLAGS_TYPE_REPLY, HEADER, HEADER_SIZE, MAX_RECV_FDS, Message, _close_quietly

_unpack_header_from = HEADER.unpack_from
_pack_header = HEADER.pack
_unpack_size_from = struct.Struct("<I").unpack_from  # the header's size field, at +4
_CMSG_SPACE = socket.CMSG_SPACE(MAX_RECV_FDS * array.array("i").itemsize)
_SOCKET_BUFFER = 4 << 20  # ask for big socket buffers: a full-size message should not block a sender
_POLL_IN = select.POLLIN | select.POLLHUP | select.POLLERR
_RECV_BUFFER = 64 << 10  # messages up to this size are received into one reused buffer
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
        # The receive buffer: bytes [_pos, _end) are received and not yet taken; _pending holds
        # [lo, hi, fds] for each read that brought fds, lo/hi the buffer bytes it brought.
        self._size = _RECV_BUFFER
        self._buf = bytearray(_RECV_BUFFER)
        self._view = memoryview(self._buf)
        self._pos = self._end = 0
        self._pending: list[list] = []

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
        total = HEADER_SIZE + len(payload)
        header = _pack_header(msg_id, command, total, flags, error)
        anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds))] if fds else ()
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

    # --- receiving ------------------------------------------------------------------------
    def has_message(self) -> bool:
        """True when the buffer holds a whole message (or a header :meth:`receive` will refuse at once)."""
        avail = self._end - self._pos
        if avail < HEADER_SIZE:
            return False
        size = _unpack_size_from(self._buf, self._pos + 4)[0]
        return size <= avail or size < HEADER_SIZE or size > self.max_msg_size

    def _recv(self, step: str) -> int:
        """One ``recvmsg_into`` at the end of the buffer; the byte count (0: EOF). Raises BlockingIOError.

        Fds that come with it are remembered with the bytes it brought (see :meth:`_take_fds`).
        """
        if self._pos:  # keep the message begun at the front, so the rest fits after it
            self._compact()
        end = self._end
        n, anc, mflags, _addr = self._sock.recvmsg_into([self._view[end:]], _CMSG_SPACE, _MSG_CMSG_CLOEXEC)
        self._end = end + n
        if anc:
            fds = _fds_from(anc)
            if fds:
                self._pending.append([end, end + n, fds])
        if mflags & _MSG_CTRUNC:
            raise ProtocolError(step, f"message carried more than {MAX_RECV_FDS} fds (control data truncated)")
        return n

    def _compact(self) -> None:
        pos, end = self._pos, self._end
        if pos < end:
            self._buf[:end - pos] = self._view[pos:end]
        for entry in self._pending:
            entry[0] -= pos
            entry[1] -= pos
        self._pos, self._end = 0, end - pos

    def _take_fds(self, begin: int, end: int) -> list[int]:
        """The fds of the message in buffer bytes [begin, end).

        A sender puts a message's fds on its first byte (one ``sendmsg``),
        and the kernel ends a read right after the first piece of a message
        that carries fds; so the fds of a read belong to the last message
        that began in the bytes that read brought. A peer that attaches fds
        to a later piece of a message gives them to that message or, when no
        message began in that read, to nobody: they are closed.
        """
        fds: list[int] = []
        pending = self._pending
        while pending:
            lo, hi, got = pending[0]
            if hi <= begin:
                del pending[0]
                for fd in got:
                    _close_quietly(fd)
            elif lo <= begin and end >= hi:
                del pending[0]
                fds.extend(got)
            else:
                break
        return fds

    def _drop_pending(self) -> None:
        for _lo, _hi, got in self._pending:
            for fd in got:
                _close_quietly(fd)
        self._pending.clear()

    def receive(self, timeout: float | None, step: str, wake_fd: int | None = None) -> Message | str:
        """Read one whole message; "timeout" if none began within ``timeout``, "wake" if ``wake_fd`` fired.

        Messages come out of a receive buffer that each read fills as far as
        it can: a burst of small messages costs one ``recvmsg`` and a reply
        one ``poll`` and one ``recvmsg``. A message larger than the buffer
        gets a payload buffer of its own, read into directly.
        """
        deadline = None
        fds: list[int] = []
        try:
            while True:
                pos = self._pos
                avail = self._end - pos
                if avail >= HEADER_SIZE:
                    msg_id, command, size, flags, error = _unpack_header_from(self._buf, pos)
                    if size < HEADER_SIZE or size > self.max_msg_size:
                        raise ProtocolError(step, f"message size {size} outside [{HEADER_SIZE}, {self.max_msg_size}] "
                                            f"(msg_id {msg_id}, command {command})")
                    if flags & FLAGS_TYPE_MASK > FLAGS_TYPE_REPLY:  # spec 2.2: types 0 (command) and 1 (reply) only
                        raise ProtocolError(step, f"unknown message type {flags & FLAGS_TYPE_MASK} in flags {flags:#x}")
                    if size <= avail:  # whole: the common case
                        end = pos + size
                        payload = bytes(self._view[pos + HEADER_SIZE:end])
                        if self._pending:
                            fds = self._take_fds(pos, end)
                        if end == self._end:
                            self._pos = self._end = 0
                        else:
                            self._pos = end
                        return Message(msg_id, command, flags, error, payload, fds)
                    if size > self._size:
                        return self._receive_large(msg_id, command, size, flags, error, step, deadline)
                if avail:  # a message has begun: the rest is due within io_timeout
                    if deadline is None:
                        deadline = time.monotonic() + self.io_timeout
                    try:
                        n = self._recv(step)
                    except BlockingIOError:
                        self._wait_readable(deadline)
                        continue
                    if n == 0:
                        raise DisconnectedError(step, "peer closed the connection in the middle of a message")
                    continue
                ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
                if wake_fd is None:
                    if ms == 0:
                        pass  # a look without waiting (an event loop saw the socket readable): just read
                    elif not self._poll.poll(ms):
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
                    n = self._recv(step)
                except BlockingIOError:
                    return "timeout"  # spurious readiness: nothing begun, the caller decides
                if n == 0:
                    raise DisconnectedError(step, "peer closed the connection")
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
        self._drop_pending()
        raise exc

    def _receive_large(self, msg_id: int, command: int, size: int, flags: int, error: int, step: str,
                       deadline: float | None) -> Message:
        """A message larger than the buffer: what the buffer holds of it, then the rest read into place."""
        pos, have = self._pos, self._end - self._pos
        fds = self._take_fds(pos, pos + size) if self._pending else []
        self._drop_pending()  # nothing else began in the buffer
        n = size - HEADER_SIZE
        payload = bytearray(n)
        got = have - HEADER_SIZE
        payload[:got] = self._view[pos + HEADER_SIZE:self._end]
        self._pos = self._end = 0
        view = memoryview(payload)
        try:
            while got < n:
                try:
                    k = self._sock.recv_into(view[got:])
                except BlockingIOError:
                    if deadline is None:
                        deadline = time.monotonic() + self.io_timeout
                    self._wait_readable(deadline)
                    continue
                if k == 0:
                    raise DisconnectedError(step, "peer closed the connection in the middle of a message")
                got += k
        except BaseException:
            for fd in fds:
                _close_quietly(fd)
            raise
        return Message(msg_id, command, flags, error, payload, fds)
