"""vfio-user protocol endpoint: the symmetric :class:`Connection`.

vfio-user (spec section 2) carries VFIO's device operations over one AF_UNIX
stream socket per client/server pair; :mod:`.wire` has the message format
(16-byte header, spec 2.2; command codes, spec 2.3; payloads, spec 2.5) and
this module re-exports it. Both ends talk the same way: either side may send
commands (the client almost all of them, the server DMA_READ/DMA_WRITE, spec
2.6) and each command gets exactly one reply unless it carries NO_REPLY.
:class:`Connection` is that endpoint, used by the client and the server alike.

How one connection is shared between threads:

* Sends are serialised by a lock; header, payload and fds leave in one
  ``sendmsg`` (spec 2.1).
* Exactly one thread reads the socket at a time: the *reader*. Any thread
  waiting in :meth:`Connection.call` becomes the reader when nobody else is;
  it reads one message, routes a reply to the thread waiting for that
  ``msg_id`` (replies are matched by msg_id only, spec 2.8-2) or queues an
  incoming command, gives up the role and wakes the others.
* Queued commands are dispatched one at a time, in arrival order (spec 2.6),
  to the handler callback, by whichever thread is allowed to (any thread on
  the client; only the :meth:`~Connection.serve_forever` thread on the
  server). A command read while the queue is empty and nothing is being
  dispatched skips the queue: the reader, if allowed, runs it at once.
  The reader role is free while a handler runs, so a handler may itself
  call the peer (the server's DMA_READ from inside a REGION_WRITE
  handler) and another thread may read replies meanwhile; commands that
  arrive then wait in the queue.
* :meth:`Connection.call_async` sends a command without waiting: its reply
  goes to a callback, run by whichever thread reads it (a caller waiting
  for its own reply, :meth:`~Connection.process_events` of an event loop
  that polls :meth:`~Connection.fileno`, the service thread), outside the
  lock. A connection that dies answers every pending one with the error;
  :meth:`~Connection.expire_async` times them out.
* A framing error cannot be resynchronised on a stream: it closes the
  connection with :class:`ProtocolError`. Once the connection is closed or the
  peer is gone, every pending and later call raises
  :class:`DisconnectedError` at once. Received fds that nobody takes are
  closed, so none leak.
"""

from __future__ import annotations

import collections
import errno as _errno
import logging
import os
import select
import socket
import threading
import time
from typing import Sequence

from ..errors import DisconnectedError, PciError, ProtocolError, RemoteError, ReplyTimeout, VfioUserError
from .framing import Framing
from .wire import *  # noqa: F401,F403  -- protocol is the public face of the wire format
from .wire import (DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_REPLY_TIMEOUT, FLAGS_ERROR, FLAGS_NO_REPLY,
                   FLAGS_TYPE_COMMAND, FLAGS_TYPE_MASK, FLAGS_TYPE_REPLY, MESSAGE_SLACK, CommandError, Handler,
                   HandlerResult, Message, _close_quietly, command_name)

log = logging.getLogger(__name__)

_POSTED = FLAGS_TYPE_COMMAND | FLAGS_NO_REPLY
_MAX_ABANDONED = 1024  # remembered msg_ids of timed-out calls, so a late reply is dropped, not fatal


class Connection:
    """One end of a vfio-user connection (spec 2.1), for client and server alike.

    ``handler(message)`` is called for every incoming command and returns the
    reply payload, or ``(payload, fds)``; fds sent this way stay owned by the
    handler's side (SCM_RIGHTS duplicates them). It raises
    :class:`~.wire.CommandError` (or an ``OSError``/``PciError`` with an errno)
    to answer with an ERROR reply. ``reply_timeout`` is the default time a
    :meth:`call` waits (QEMU's 5 s, spec 2.7); ``max_msg_size`` bounds every
    received message (this side's ``max_data_xfer_size`` plus room for the
    structures, spec 2.4).
    """

    def __init__(self, sock: socket.socket, handler: Handler | None = None, *, name: str = "vfio-user",
                 reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
                 max_msg_size: int = DEFAULT_MAX_DATA_XFER_SIZE + MESSAGE_SLACK, io_timeout: float | None = None):
        self.handler = handler
        self.name = name
        self.reply_timeout = reply_timeout
        # Sends, and the rest of a message whose header arrived, must finish within io_timeout.
        self._framing = Framing(sock, max_msg_size=max_msg_size,
                                io_timeout=io_timeout if io_timeout is not None else max(reply_timeout, 1.0))
        self._fd = sock.fileno()
        self._send_lock = threading.Lock()
        # One lock guards the state below; the condition over it is only for
        # sleeping. ``with self._lock`` is the C lock's own context manager (a
        # Condition's is Python code), and _sleepers lets a state change skip
        # notify_all when no thread sleeps -- both paid on every message.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sleepers = 0
        self._reader: int | None = None  # thread id of the reader
        self._waiting: set[int] = set()  # msg_ids of calls awaiting a reply
        self._replies: dict[int, Message] = {}  # routed replies not yet claimed
        self._async: dict[int, tuple] = {}  # msg_id -> (callback, deadline, step) of call_async
        self._abandoned: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._commands: collections.deque[Message] = collections.deque()
        self._dispatching = False
        self._dispatch_thread: int | None = None  # set by serve_forever: only it dispatches
        self._next_id = 0
        self._posted_id = 0x8000  # NO_REPLY ids: their own counter (see call)
        self._steps: dict[int, str] = {}  # command -> the step text of its calls, built once
        self._reply_steps: dict[int, str] = {}  # command -> the step text of our replies to it
        self._dead: VfioUserError | None = None
        self._closed = False
        self._service: threading.Thread | None = None
        self._service_stop: int | None = None

    # --- state ------------------------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    @property
    def alive(self) -> bool:
        return self._dead is None

    @property
    def error(self) -> VfioUserError | None:
        """Why the connection is dead (None while alive)."""
        return self._dead

    def _dead_error(self, step: str) -> DisconnectedError:
        d = self._dead
        if isinstance(d, DisconnectedError):
            return DisconnectedError(step, d.detail or "peer is gone", errno=d.errno)
        return DisconnectedError(step, f"connection closed: {d}")

    def _sleep_locked(self, timeout: float | None) -> None:
        self._sleepers += 1
        try:
            self._cond.wait(timeout)
        finally:
            self._sleepers -= 1

    def _wake_locked(self) -> None:
        if self._sleepers:
            self._cond.notify_all()

    def _fail(self, exc: VfioUserError) -> None:
        """Mark the connection dead (first reason wins), wake everybody, answer the pending async calls."""
        with self._lock:
            if self._dead is None:
                self._dead = exc
                log.debug("%s: connection dead: %s", self.name, exc)
                self._framing.shutdown()  # wakes a reader blocked in poll; close() closes the fd
                while self._commands:
                    self._commands.popleft().close_fds()
            self._wake_locked()
            pending = list(self._async.items())
            self._async.clear()
            for msg_id, _entry in pending:
                self._waiting.discard(msg_id)
        for _msg_id, (callback, _deadline, step) in pending:
            self._run_callback(callback, None, self._dead_error(step))

    def _send(self, msg_id: int, command: int, flags: int, error: int, payload, fds: Sequence[int], step: str) -> None:
        with self._send_lock:
            if self._dead is not None:
                raise self._dead_error(step)
            try:
                self._framing.send(msg_id, command, flags, error, payload, fds, step)
                return
            except DisconnectedError as e:
                exc = e
        self._fail(exc)
        raise exc

    def _read_once(self, timeout: float | None, step: str, wake_fd: int | None = None,
                   want: int | None = None) -> "str | Message":
        """As the reader: :meth:`_read_one`, then the whole messages one read brought with it.

        Nobody may leave the reader role while the receive buffer holds a
        whole message: a thread polling :meth:`fileno` (an event loop, the
        service thread) would not see it. So the reader goes on, without
        blocking, until the buffer holds at most the beginning of one. The
        reply to ``want`` is returned whatever comes after it.
        """
        result = self._read_one(timeout, step, wake_fd, want)
        if not self._framing.has_message():
            return result
        me = threading.get_ident()
        while True:
            if result.__class__ is Message:
                want = None  # got it: another reply with its msg_id is the peer's error
            with self._lock:
                if self._reader is not None:  # a reader, who takes what is buffered
                    return result
                self._reader = me
            try:
                got = self._read_one(0, step, None, want)
            except VfioUserError:
                if result.__class__ is Message:
                    return result  # the connection is dead now; this call got its reply first
                raise
            if got.__class__ is Message:
                result = got
            if not self._framing.has_message():
                return result

    def _read_one(self, timeout: float | None, step: str, wake_fd: int | None, want: int | None) -> "str | Message":
        """As the reader: read at most one message, route it, give up the role, dispatch if allowed.

        The reply to ``want`` (the msg_id the reading thread awaits) is not
        routed through ``_replies`` but returned: the common case of a call,
        its reply read by its own thread.

        A command that arrives while nothing is queued or being dispatched,
        read by a thread allowed to dispatch, is handled right here instead
        of going through the queue: the same order, without the hand-off
        (this is every posted doorbell write on the server).
        """
        try:
            msg = self._framing.receive(timeout, step, wake_fd)
        except VfioUserError as e:
            with self._lock:
                self._reader = None
            self._fail(e)
            raise
        except BaseException:
            with self._lock:
                self._reader = None
                self._wake_locked()
            raise
        if msg.__class__ is not Message:
            with self._lock:
                self._reader = None
                self._wake_locked()
            return msg
        err = None
        direct = False
        mine = later = None
        with self._lock:
            self._reader = None
            if msg.flags & FLAGS_TYPE_MASK == FLAGS_TYPE_REPLY:
                if msg.msg_id == want:
                    self._waiting.discard(want)
                    mine = msg
                elif self._async and msg.msg_id in self._async:
                    self._waiting.discard(msg.msg_id)
                    later = self._async.pop(msg.msg_id)
                else:
                    err = self._route_reply_locked(msg, step)
            elif (not self._dispatching and not self._commands and self._dead is None
                  and self._dispatch_thread in (None, threading.get_ident())):
                self._dispatching = direct = True
            else:
                self._commands.append(msg)
            if self._sleepers:  # _wake_locked() inline: this is every message
                self._cond.notify_all()
        if err is not None:
            self._fail(err)
            raise err
        if later is not None:
            self._answer_async(later, msg)
        if direct:
            try:
                self._run_handler(msg)
            finally:
                with self._lock:
                    self._dispatching = False
                    if self._sleepers:
                        self._cond.notify_all()
        if self._commands:  # queued by another reader meanwhile (a lock-free peek; re-checked under the lock)
            try:
                self._dispatch_pending()
            except BaseException:
                if mine is not None:
                    mine.close_fds()
                raise
        return "message" if mine is None else mine

    def _route_reply_locked(self, msg: Message, step: str) -> ProtocolError | None:
        if msg.msg_id in self._waiting and msg.msg_id not in self._replies:
            self._replies[msg.msg_id] = msg
            return None
        msg.close_fds()
        if self._abandoned.pop(msg.msg_id, "missing") is None:
            log.debug("%s: dropped late reply to msg_id %d (%s)", self.name, msg.msg_id, msg.name)
            return None
        return ProtocolError(step, f"reply with unknown msg_id {msg.msg_id} ({msg.name})")  # spec 2.7: an error

    # --- calling the peer ------------------------------------------------------------------
    def _new_id_locked(self) -> int:
        for _ in range(0x10000):
            self._next_id = (self._next_id + 1) & 0xFFFF  # msg_id is 16 bits (spec 2.2)
            i = self._next_id
            if i not in self._waiting and i not in self._replies and i not in self._abandoned:
                return i
        raise VfioUserError(f"vfio-user call on {self.name}", "65536 commands in flight")

    def call(self, command: int, payload: bytes | bytearray | memoryview = b"", fds: Sequence[int] = (), *,
             no_reply: bool = False, timeout: float | None = None, max_reply_fds: int = 0) -> Message | None:
        """Send a command; return its reply (None for ``no_reply``).

        Raises :class:`RemoteError` (with the peer's errno) on an ERROR reply,
        :class:`ReplyTimeout` after ``timeout`` (default :attr:`reply_timeout`),
        :class:`DisconnectedError` if the peer is or goes away, and
        :class:`ProtocolError` on a malformed reply or one with more than
        ``max_reply_fds`` fds. The caller owns the reply's fds.
        """
        step = self._steps.get(command)
        if step is None:
            step = self._steps[command] = f"vfio-user {command_name(command)} on {self.name}"
        if no_reply:  # a posted write, every doorbell: no reply will carry the id, so no bookkeeping
            with self._send_lock:
                if self._dead is not None:
                    raise self._dead_error(step)
                # Any id does (spec 2.2 NO_REPLY); a counter of their own, so the send lock alone guards it.
                self._posted_id = msg_id = (self._posted_id + 1) & 0xFFFF
                try:
                    self._framing.send(msg_id, command, _POSTED, 0, payload, fds, step)
                    return None
                except DisconnectedError as e:
                    exc = e
            self._fail(exc)
            raise exc
        with self._lock:
            if self._dead is not None:
                raise self._dead_error(step)
            msg_id = self._new_id_locked()
            self._waiting.add(msg_id)
        try:
            self._send(msg_id, command, FLAGS_TYPE_COMMAND, 0, payload, fds, step)
        except BaseException:
            with self._lock:
                self._waiting.discard(msg_id)
            raise
        timeout = self.reply_timeout if timeout is None else timeout
        reply = self._await(msg_id, time.monotonic() + timeout, timeout, step)
        if reply.flags & FLAGS_ERROR:
            reply.close_fds()  # spec 2.2: an ERROR reply carries only the header
            raise RemoteError(step, "the peer refused the command", errno=reply.error or None)
        if len(reply.fds) > max_reply_fds:
            n = len(reply.fds)
            reply.close_fds()
            raise ProtocolError(step, f"reply carried {n} fds, expected at most {max_reply_fds}")
        return reply

    def call_async(self, command: int, payload: bytes | bytearray | memoryview, callback, *,
                   timeout: float | None = None) -> None:
        """Send a command and return at once; ``callback(reply, error)`` gets its reply later.

        ``callback`` runs on whichever thread reads the reply (see the module
        docstring) -- so somebody must: a caller of :meth:`call`, an event
        loop calling :meth:`process_events` when :meth:`fileno` is readable,
        or the service thread. It gets ``(reply, None)``, or ``(None,
        error)``: :class:`RemoteError` for an ERROR reply,
        :class:`DisconnectedError` when the connection dies first,
        :class:`ReplyTimeout` from :meth:`expire_async` after ``timeout``
        (default :attr:`reply_timeout`), :class:`ProtocolError` for a reply
        with fds. It must not block. Raises
        :class:`DisconnectedError` at once if the connection is dead; a send
        that fails kills the connection and goes to ``callback``.
        """
        step = self._steps.get(command)
        if step is None:
            step = self._steps[command] = f"vfio-user {command_name(command)} on {self.name}"
        deadline = time.monotonic() + (self.reply_timeout if timeout is None else timeout)
        with self._lock:
            if self._dead is not None:
                raise self._dead_error(step)
            msg_id = self._new_id_locked()
            self._waiting.add(msg_id)
            self._async[msg_id] = (callback, deadline, step)
        try:
            self._send(msg_id, command, FLAGS_TYPE_COMMAND, 0, payload, (), step)
        except BaseException:
            with self._lock:
                self._waiting.discard(msg_id)
                entry = self._async.pop(msg_id, None)
            if entry is None:
                return  # _fail answered it with the error already
            raise

    def _answer_async(self, entry: tuple, reply: Message) -> None:
        callback, _deadline, step = entry
        if reply.flags & FLAGS_ERROR:
            reply.close_fds()
            self._run_callback(callback, None, RemoteError(step, "the peer refused the command",
                                                           errno=reply.error or None))
        elif reply.fds:
            n = len(reply.fds)
            reply.close_fds()
            self._run_callback(callback, None, ProtocolError(step, f"reply carried {n} fds, expected none"))
        else:
            self._run_callback(callback, reply, None)

    def _run_callback(self, callback, reply: Message | None, error: Exception | None) -> None:
        try:
            callback(reply, error)
        except Exception:
            log.exception("%s: reply callback %r failed", self.name, callback)

    @property
    def async_pending(self) -> int:
        """How many :meth:`call_async` replies have not come yet."""
        return len(self._async)

    def expire_async(self) -> int:
        """Answer the :meth:`call_async` calls past their deadline with :class:`ReplyTimeout`; how many."""
        if not self._async:
            return 0
        now = time.monotonic()
        with self._lock:
            expired = [(i, e) for i, e in self._async.items() if e[1] <= now]
            for msg_id, _e in expired:
                del self._async[msg_id]
                self._waiting.discard(msg_id)
                self._abandoned[msg_id] = None  # a late reply is dropped, not fatal
            while len(self._abandoned) > _MAX_ABANDONED:
                self._abandoned.popitem(last=False)
        for msg_id, (callback, _deadline, step) in expired:
            self._run_callback(callback, None, ReplyTimeout(step, f"no reply (msg_id {msg_id}) in time"))
        return len(expired)

    def _await(self, msg_id: int, deadline: float, timeout: float, step: str) -> Message:
        me = threading.get_ident()
        while True:
            with self._lock:
                while True:
                    reply = self._replies.pop(msg_id, None)
                    if reply is not None:
                        self._waiting.discard(msg_id)
                        return reply
                    if self._dead is not None:
                        self._waiting.discard(msg_id)
                        raise self._dead_error(step)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._waiting.discard(msg_id)
                        self._abandoned[msg_id] = None
                        while len(self._abandoned) > _MAX_ABANDONED:
                            self._abandoned.popitem(last=False)
                        raise ReplyTimeout(step, f"no reply within {timeout:.3g} s (msg_id {msg_id})")
                    if self._reader is None:
                        self._reader = me
                        break
                    self._sleep_locked(remaining)
            reply = self._read_once(remaining, step, want=msg_id)
            if reply.__class__ is Message:
                return reply

    # --- serving the peer's commands --------------------------------------------------------------
    def _dispatch_pending(self) -> None:
        """Run queued commands in arrival order, if this thread may and nobody else is."""
        me = threading.get_ident()
        with self._lock:
            if self._dispatching or not self._commands:
                return
            if self._dispatch_thread is not None and self._dispatch_thread != me:
                return
            self._dispatching = True
        try:
            while True:
                with self._lock:
                    if not self._commands or self._dead is not None:
                        return
                    msg = self._commands.popleft()
                self._run_handler(msg)
        finally:
            with self._lock:
                self._dispatching = False
                self._wake_locked()

    def _run_handler(self, msg: Message) -> None:
        error = 0
        result: HandlerResult = None
        try:
            if self.handler is None:
                raise CommandError(_errno.ENOSYS, "this end serves no commands")
            result = self.handler(msg)
        except CommandError as e:
            error = e.errno
            log.debug("%s: %s refused: %s", self.name, msg.name, e)
        except DisconnectedError:
            if self._dead is not None:
                raise
            log.exception("%s: handler of %s failed", self.name, msg.name)
            error = _errno.EIO
        except PciError as e:
            error = e.errno or _errno.EIO
            log.debug("%s: %s failed: %s", self.name, msg.name, e)
        except OSError as e:
            error = e.errno or _errno.EIO
            log.debug("%s: %s failed: %s", self.name, msg.name, e)
        except Exception:
            log.exception("%s: handler of %s failed", self.name, msg.name)
            error = _errno.EIO
        finally:
            if msg.fds:
                msg.close_fds()  # whatever the handler did not take
        if msg.flags & FLAGS_NO_REPLY:
            if error:
                log.warning("%s: NO_REPLY %s failed with errno %d", self.name, msg.name, error)
            return
        step = self._reply_steps.get(msg.command)
        if step is None:
            step = self._reply_steps[msg.command] = f"vfio-user {msg.name} from the peer of {self.name}"
        if error:
            self._send(msg.msg_id, msg.command, FLAGS_TYPE_REPLY | FLAGS_ERROR, error, b"", (), step)
            return
        fds: Sequence[int] = ()
        if isinstance(result, tuple):
            result, fds = result
        self._send(msg.msg_id, msg.command, FLAGS_TYPE_REPLY, 0, result or b"", fds, step)

    def serve_forever(self, wake_fd: int | None = None) -> None:
        """Read and dispatch until the peer goes away (or ``wake_fd`` becomes readable).

        The calling thread becomes the only one that dispatches commands (the
        server's loop). Returns normally when the connection ends; the reason
        is in :attr:`error` (a :class:`ProtocolError` for a misbehaving peer).
        """
        me = threading.get_ident()
        step = f"vfio-user serve {self.name}"
        with self._lock:
            self._dispatch_thread = me
        try:
            while True:
                if self._commands:
                    self._dispatch_pending()
                with self._lock:
                    while True:
                        if self._dead is not None:
                            return
                        if self._commands and not self._dispatching:
                            read = False
                            break
                        if self._reader is None:
                            self._reader = me
                            read = True
                            break
                        self._sleep_locked(0.5)  # another thread reads; it queues commands and notifies
                if read and self._read_once(None, step, wake_fd) == "wake":
                    return
        except VfioUserError:
            return  # recorded in self.error
        finally:
            with self._lock:
                if self._dispatch_thread == me:
                    self._dispatch_thread = None
                if self._reader == me:
                    self._reader = None
                self._wake_locked()

    def process_events(self) -> int:
        """Handle every message already arrived, without blocking; return how many.

        For an event loop that polls :meth:`fileno`: the client uses it to
        serve DMA_READ/DMA_WRITE that arrive while none of its calls is
        waiting. Raises :class:`DisconnectedError` once the peer is gone.
        """
        me = threading.get_ident()
        step = f"vfio-user events on {self.name}"
        n = 0
        while True:
            with self._lock:
                if self._dead is not None:
                    raise self._dead_error(step)
                if self._reader is not None:
                    break  # the reader in another thread handles what arrives
                self._reader = me
            if self._read_one(0, step, None, None) != "message":  # (until nothing is left: none stays buffered)
                break
            n += 1
        self._dispatch_pending()
        if self._async:
            self.expire_async()
        return n

    def start_service_thread(self) -> threading.Thread:
        """Serve the peer's commands from a daemon thread whenever no call is reading (client side)."""
        if self._service is not None:
            return self._service
        self._service_stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._service = threading.Thread(target=self._service_loop, name=f"vfio-user service {self.name}", daemon=True)
        self._service.start()
        return self._service

    def _service_loop(self) -> None:
        me = threading.get_ident()
        p = select.poll()
        p.register(self._fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        p.register(self._service_stop, select.POLLIN)
        step = f"vfio-user service {self.name}"
        while True:
            ready = p.poll(0 if self._framing.has_message() else None)  # (a reader leaves none buffered)
            if any(fd == self._service_stop for fd, _ev in ready) or self._dead is not None:
                return
            with self._lock:
                if self._reader is not None:
                    self._sleep_locked(0.05)  # a caller is reading and will take this message
                    continue
                self._reader = me
            try:
                self._read_once(0, step)
            except VfioUserError:
                return  # recorded; calls raise DisconnectedError

    # --- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the socket; pending and later calls raise DisconnectedError. Idempotent."""
        me = threading.get_ident()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._fail(DisconnectedError(self.name, "connection closed locally"))
        if self._service is not None:
            os.eventfd_write(self._service_stop, 1)
            if self._service.ident != me:
                self._service.join(2.0)
            _close_quietly(self._service_stop)
        with self._lock:
            end = time.monotonic() + 2.0
            while self._reader not in (None, me) and time.monotonic() < end:
                self._sleep_locked(0.05)  # let a reader in another thread leave the socket first
            for m in self._replies.values():
                m.close_fds()
            self._replies.clear()
            while self._commands:
                self._commands.popleft().close_fds()
        self._framing.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
