"""JSON lines over a UNIX stream socket: the framing of every micdrv control socket.

One request object per line, one reply object per line, in order, on a
connection that stays usable after a failed request. Every reply has
``"ok"``; a failure is ``{"ok": false, "error": "...", ...}``. Requests are
objects with a ``"cmd"`` string.

:class:`JsonLinesServer` serves a socket from background threads (one per
connection, so one client's long ``wait`` never holds up another) and
hands each request to ``handler(request, peer)`` with the peer's
credentials from SO_PEERCRED, taken once at accept: the handler decides
what the peer may do. :class:`JsonLinesClient` is the other end.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # a request longer than this closes the connection


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # asm-generic/socket.h (Linux 4.13); Python lacks it
PEERGROUPS_BUF = 1024                                   # CPython's getsockopt limit: 256 gid_t


@dataclass(frozen=True)
class PeerCred:
    """``struct ucred`` of the connecting process (SO_PEERCRED) and, where the kernel tells them
    (SO_PEERGROUPS), its supplementary groups: both as they were when it connected."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None = None


class RequestError(Exception):
    """A request the handler refuses; its message is the reply's ``error``. Extra fields go in the reply."""

    def __init__(self, message: str, **fields):
        super().__init__(message)
        self.fields = fields


def peer_cred(conn: socket.socket) -> PeerCred:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return PeerCred(*struct.unpack("3i", raw), groups=peer_groups(conn))


def peer_groups(conn: socket.socket) -> tuple[int, ...] | None:
    """SO_PEERGROUPS: the peer's supplementary groups taken at connect(); None on a kernel without it, or
    for a peer in more than 256 groups (Python's getsockopt reads at most 1024 bytes)."""
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, PEERGROUPS_BUF)
    except OSError:  # ENOPROTOOPT before Linux 4.13, ERANGE for more groups than fit
        return None
    return struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])


class ServerRunning(FileExistsError):
    """The socket is live: another server answers on it."""


def remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody answers on (a crashed server's); refuse a live one
    (:class:`ServerRunning`) or anything that is not a socket (FileExistsError)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise ServerRunning(f"{path}: another server is listening there")


Handler = Callable[[dict, PeerCred], dict]


class JsonLinesServer:
    """Serve ``handler`` on the UNIX socket ``path`` (created with ``mode``, group ``gid`` if given)."""

    def __init__(self, path: str, handler: Handler, *, mode: int = 0o660, gid: int | None = None,
                 name: str = "control"):
        self.path = path
        self.handler = handler
        self.mode = mode
        self.gid = gid
        self.name = name
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # Bind under a restrictive umask so the socket is never briefly open to everyone.
            old = os.umask(0o177)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            if self.gid is not None:
                os.chown(self.path, -1, self.gid)
            os.chmod(self.path, self.mode)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name=f"{self.name} accept", daemon=True)
        self._thread.start()

    def close(self) -> None:
        os.eventfd_write(self._stop, 1)
        if self._thread is not None:
            self._thread.join(2.0)
        with self._lock:
            conns = list(self._conns)
        for t in conns:
            t.join(2.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self._stop)

    def _accept_loop(self) -> None:
        p = select.poll()
        p.register(self._sock.fileno(), select.POLLIN)
        p.register(self._stop, select.POLLIN)
        while True:
            if any(fd == self._stop for fd, _ in p.poll()):
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), name=f"{self.name} client", daemon=True)
            with self._lock:
                self._conns.add(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                peer = peer_cred(conn)
                buf = b""
                p = select.poll()
                p.register(conn.fileno(), select.POLLIN)
                p.register(self._stop, select.POLLIN)
                while True:
                    if any(fd == self._stop for fd, _ in p.poll()):
                        return
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                    if len(buf) > MAX_LINE and b"\n" not in buf:
                        return
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        if not line.strip():
                            continue
                        reply = self.handle_line(line, peer)
                        try:
                            conn.sendall(json.dumps(reply).encode() + b"\n")
                        except OSError:
                            return
        finally:
            with self._lock:
                self._conns.discard(threading.current_thread())

    def handle_line(self, line: bytes, peer: PeerCred) -> dict:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise RequestError('a request is an object with a "cmd" string')
            return {"ok": True, **self.handler(req, peer)}
        except RequestError as e:
            return {"ok": False, "error": str(e), **e.fields}
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": str(e) or type(e).__name__}
        except Exception as e:  # a request never takes the server down
            log.exception("%s: request failed", self.name)
            return {"ok": False, "error": f"internal error: {e}"}


class JsonLinesClient:
    """One connection to a :class:`JsonLinesServer`. Raises OSError if nobody listens at ``path``."""

    def __init__(self, path: str, timeout: float | None = 10.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.file = self.sock.makefile("rwb")

    def call(self, cmd: str, *, io_timeout: float | None = None, **args) -> dict:
        """Send one request and return the reply object (``ok`` true or false).

        ``io_timeout`` bounds the wait for the reply (the connection's default otherwise).
        """
        if io_timeout is not None:
            self.sock.settimeout(io_timeout)
        self.file.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        self.file.flush()
        line = self.file.readline()
        if not line:
            raise ConnectionError(f"{self.path}: the server closed the connection")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()

    def __enter__(self) -> "JsonLinesClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
