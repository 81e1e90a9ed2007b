"""SCIF endpoints: listen/accept, connect, byte streams, close (spec 8.5).

An :class:`Endpoint` is the kernel's ``struct scif_endpt`` with the kernel
API as methods. The connection hand-shake, with ``cookie`` standing for the
kernel's endpoint pointer (we hand out random 64-bit cookies instead, and
look every echoed cookie up in a table, so a peer cannot name anything we
did not give it):

=============  =======================  =======================================
connector      message                  acceptor
=============  =======================  =======================================
QueuePair()    CNCT_REQ -->             payload[0] = connector cookie,
                                        payload[1] = connector endpoint QP;
                                        no listener / backlog full: <-- CNCT_REJ
               <-- CNCT_GNT             QueuePair.accept(); payload[0] = connector
                                        cookie, [1] = acceptor QP, [2] = acceptor cookie
qp.connect()   CNCT_GNTACK -->          payload[0] = acceptor cookie: connected
 (fails:       CNCT_GNTNACK -->)        (acceptor drops the half-open endpoint)
=============  =======================  =======================================

Data: the sender writes into the peer's 4 KiB endpoint ring, commits and
sends CLIENT_SENT (payload[0] = peer cookie); the receiver reads, publishes
its read offset and answers CLIENT_RCVD, which is what wakes a sender
waiting for space. Close: DISCNCT (payload[0] = own cookie, [1] = peer
cookie), answered by DISCNT_ACK.

Blocking calls take a ``timeout`` in seconds (None = no limit, as in the
kernel, but every wait also ends when the connection or the peer node goes
away). :meth:`Endpoint.poll` and :attr:`Endpoint.on_event` let an event loop
use endpoints without threads. The incoming side of the hand-shake (what
CNCT_REQ, CNCT_GNT, ... do to an endpoint) is in :mod:`.epd`.
"""

from __future__ import annotations

import enum
import logging
import select
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Callable

from .errors import (ScifConnectionRefused, ScifConnectionReset, ScifError, ScifNodeDown, ScifNotConnected,
                     ScifProtocolError, ScifTimeout)
from .qp import SCIF_ENDPT_QP_SIZE, QueuePair
from .wire import SCIF_COSM_BACKLOG, PortId, ScifMsg, Uop

if TYPE_CHECKING:
    from .node import ScifNode

log = logging.getLogger(__name__)

POLLIN, POLLOUT, POLLERR, POLLHUP = select.POLLIN, select.POLLOUT, select.POLLERR, select.POLLHUP


class EpState(enum.Enum):
    """``enum scif_epd_state``, with the kernel's display names; CLOSED is ours (after :meth:`Endpoint.close`)."""

    UNBOUND = "Unbound"
    BOUND = "Bound"
    LISTENING = "Listening"
    CONNECTED = "Connected"
    CONNECTING = "Connecting"
    MAPPING = "Mapping"
    CLOSING = "Closing"
    CLLISTEN = "Close Listening"
    DISCONNECTED = "Disconnected"
    ZOMBIE = "Zombie"
    CLOSED = "Closed"


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Endpoint:
    """One SCIF endpoint. Create with :meth:`ScifNode.open` (or ``listen``/``connect`` there)."""

    def __init__(self, node: "ScifNode"):
        self.node = node
        self.state = EpState.UNBOUND
        self.port: PortId | None = None        # my node:port
        self.peer: PortId | None = None        # the peer's node:port once connected
        self.conn_port: PortId | None = None   # where connect() is going
        self.remote_node: int | None = None
        self.remote_ep = 0                     # the peer's cookie
        self.qp: QueuePair | None = None
        self.gnt_pld = 0                       # the acceptor's QP address from CNCT_GNT
        self.backlog = 0
        self.conreqs: deque[tuple[int, ScifMsg]] = deque()
        self.cond = threading.Condition(node.lock)
        self.discon = threading.Event()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._rx = bytearray()  # bytes taken off the ring but not returned (a recv that timed out)
        self.on_event: Callable[["Endpoint"], None] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.cookie = node._new_cookie(self)

    # --- helpers ----------------------------------------------------------------------
    def fire_event(self) -> None:
        """Tell an event loop that :meth:`poll` may answer differently now (called without locks held)."""
        cb = self.on_event
        if cb is not None:
            try:
                cb(self)
            except Exception:
                log.exception("on_event callback of %r", self)

    def _send(self, msg: ScifMsg) -> None:
        self.node.send_msg(self.remote_node, msg)

    def _teardown_qp(self) -> None:
        qp, self.qp = self.qp, None
        if qp is not None:
            qp.close()

    # --- bind / listen / accept -----------------------------------------------------------
    def bind(self, port: int = 0) -> int:
        """``scif_bind``: take ``port`` (0 = an ephemeral one); returns the port."""
        with self.node.lock:
            if self.state is EpState.BOUND:
                raise ScifError(f"{self}: already bound")
            if self.state is not EpState.UNBOUND:
                raise ScifError(f"{self}: cannot bind in state {self.state.value}")
            pn = self.node._get_port(port)
            self.port = PortId(self.node.node_id, pn)
            self.state = EpState.BOUND
            return pn

    def listen(self, backlog: int = SCIF_COSM_BACKLOG) -> None:
        """``scif_listen``: accept up to ``backlog`` pending connection requests."""
        if backlog < 1:
            raise ValueError("backlog must be at least 1")
        with self.node.lock:
            if self.state is not EpState.BOUND:
                raise ScifError(f"{self}: listen needs a bound endpoint, not {self.state.value}")
            self.state = EpState.LISTENING
            self.backlog = backlog
            self.node.listeners[self.port.port] = self

    def accept(self, timeout: float | None = None) -> "Endpoint":
        """``scif_accept`` (SYNC): wait for a CNCT_REQ, grant it, return the connected endpoint.

        A request whose queue pair cannot be set up is rejected (CNCT_REJ)
        and raised as :class:`ScifProtocolError`; one the peer NACKs is
        dropped and the wait goes on.
        """
        deadline = _deadline(timeout)
        while True:
            with self.node.lock:
                if self.state is not EpState.LISTENING:
                    raise ScifNotConnected(f"{self}: not listening")
                self.cond.wait_for(lambda: self.conreqs or self.state is not EpState.LISTENING, _left(deadline))
                if self.state is not EpState.LISTENING:
                    raise ScifNotConnected(f"{self}: stopped listening")
                if not self.conreqs:
                    raise ScifTimeout(f"{self}: no connection request within {timeout:g} s")
                peer_node, req = self.conreqs.popleft()
            cep = self._grant(peer_node, req)
            if cep is not None:
                return cep

    def _grant(self, peer_node: int, req: ScifMsg) -> "Endpoint | None":
        node = self.node
        peer = node.peer(peer_node)
        if peer is None or not peer.alive:
            raise ScifNodeDown(f"{self}: node {peer_node} went away before its connection was accepted")
        cep = Endpoint(node)
        cep.state = EpState.CONNECTING
        cep.remote_node = peer_node
        cep.remote_ep = req.payload[0]
        cep.port = self.port
        cep.peer = PortId(peer_node, req.src.port)
        try:
            cep.qp = QueuePair.accept(peer.link.memory, SCIF_ENDPT_QP_SIZE, req.payload[1],
                                      double_publish=node.double_publish,
                                      name=f"{node.name} ep {cep.port}<-{cep.peer}")
        except Exception:  # a bad peer QP, or no memory for ours: refuse, as scif_accept does
            node._forget(cep)
            self._reject(peer_node, req)
            raise
        node._ref_port(self.port.port)
        try:
            cep._send(ScifMsg(Uop.CNCT_GNT, cep.port, cep.peer, (cep.remote_ep, cep.qp.dma_addr, cep.cookie, 0)))
            # Wait for CNCT_GNT(N)ACK in 3 s steps while the node lives (spec 8.5).
            give_up = time.monotonic() + node.alive_timeout
            with node.lock:
                while cep.state is EpState.CONNECTING:
                    if cep.cond.wait_for(lambda: cep.state is not EpState.CONNECTING,
                                         min(node.accept_step, max(0.0, give_up - time.monotonic()))):
                        break
                    if not peer.alive:
                        raise ScifNodeDown(f"{self}: node {peer_node} went away during accept")
                    if time.monotonic() >= give_up:
                        raise ScifTimeout(f"{self}: node {peer_node} never answered CNCT_GNT")
                state = cep.state
            if state is EpState.CONNECTED:
                return cep
            if state is EpState.CLOSING:  # CNCT_GNTNACK: the connector could not map our queue
                log.info("%s: node %d refused our grant (CNCT_GNTNACK)", self, peer_node)
                cep._release()
                return None
            raise ScifNodeDown(f"{self}: node {peer_node} went away during accept")
        except BaseException:
            cep._release()
            raise

    def _reject(self, peer_node: int, req: ScifMsg) -> None:
        try:
            self.node.send_msg(peer_node, ScifMsg(Uop.CNCT_REJ, req.dst, req.src,
                                                  (req.payload[0], req.payload[1], 0, 0)))
        except ScifError as e:
            log.warning("%s: CNCT_REJ to node %d: %s", self, peer_node, e)

    # --- connect ----------------------------------------------------------------------
    def connect(self, node: int, port: int, timeout: float | None = None) -> None:
        """``scif_connect`` to ``node:port``; raises ScifConnectionRefused on CNCT_REJ.

        ``timeout`` bounds the wait for CNCT_GNT/REJ (default: the node's
        alive timeout, 30 s as in the kernel).
        """
        scif = self.node
        peer = scif.peer(node)
        if peer is None or not peer.alive:
            raise ScifNodeDown(f"{self}: node {node} is not alive")
        with scif.lock:
            st = self.state
            if st in (EpState.CONNECTED, EpState.CONNECTING, EpState.MAPPING):
                raise ScifError(f"{self}: already {st.value}")
            if st in (EpState.LISTENING, EpState.CLLISTEN):
                raise ScifError(f"{self}: a listening endpoint cannot connect")
            if st not in (EpState.UNBOUND, EpState.BOUND):
                raise ScifError(f"{self}: cannot connect in state {st.value}")
        if st is EpState.UNBOUND:
            self.bind(0)
        with scif.lock:
            self.state = EpState.CONNECTING
            self.remote_node = node
            self.conn_port = PortId(node, port)
        try:
            self.qp = QueuePair(peer.link.memory, SCIF_ENDPT_QP_SIZE, double_publish=scif.double_publish,
                                name=f"{scif.name} ep {self.port}->{self.conn_port}")
            self._send(ScifMsg(Uop.CNCT_REQ, self.port, self.conn_port, (self.cookie, self.qp.dma_addr, 0, 0)))
            with scif.lock:
                self.cond.wait_for(lambda: self.state is not EpState.CONNECTING or not peer.alive,
                                   scif.alive_timeout if timeout is None else timeout)
                st = self.state
                if st is EpState.CONNECTING:
                    self.state = EpState.BOUND
                    if not peer.alive:
                        raise ScifNodeDown(f"{self}: node {node} went away during connect")
                    raise ScifTimeout(f"{self}: no answer to CNCT_REQ from {self.conn_port}")
            if st is EpState.DISCONNECTED:
                raise ScifNodeDown(f"{self}: node {node} went away during connect")
            if st is EpState.BOUND:
                raise ScifConnectionRefused(f"{self}: {self.conn_port} refused the connection (CNCT_REJ)")
            if st is not EpState.MAPPING:
                raise ScifNotConnected(f"{self}: connect ended in state {st.value}")
            try:
                self.qp.connect(self.gnt_pld)
            except ScifProtocolError:
                self._send(ScifMsg(Uop.CNCT_GNTNACK, self.port, self.conn_port, (self.remote_ep, 0, 0, 0)))
                raise
            self._send(ScifMsg(Uop.CNCT_GNTACK, self.port, self.conn_port, (self.remote_ep, 0, 0, 0)))
            with scif.lock:
                if self.state is EpState.MAPPING:
                    self.state = EpState.CONNECTED
                    self.cond.notify_all()
        except BaseException:
            with scif.lock:
                if self.state in (EpState.CONNECTING, EpState.MAPPING):
                    self.state = EpState.BOUND
            self._teardown_qp()
            raise

    # --- data -------------------------------------------------------------------------
    def send(self, data: bytes | bytearray | memoryview, timeout: float | None = None) -> int:
        """Queue all of ``data`` for the peer, waiting for ring space; returns ``len(data)``.

        Raises :class:`ScifTimeout` (its ``sent`` says how much went) or
        :class:`ScifConnectionReset` if the peer disconnects first.
        """
        return self._send_bytes(data, block=True, timeout=timeout)

    def send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as fits now; returns the byte count (maybe 0)."""
        return self._send_bytes(data, block=False, timeout=None)

    def _send_bytes(self, data, block: bool, timeout: float | None) -> int:
        mv = memoryview(data).cast("B")
        deadline = _deadline(timeout)
        sent = 0
        with self._send_lock:
            while sent < len(mv):
                with self.node.lock:
                    st, qp = self.state, self.qp
                ring = qp.outbound if (qp is not None and st is EpState.CONNECTED) else None
                if ring is None:
                    break
                space = ring.space()
                if space:
                    k = min(len(mv) - sent, space)
                    ring.write(mv[sent:sent + k])
                    ring.commit()
                    self._send(ScifMsg(Uop.CLIENT_SENT, self.port, self.peer, (self.remote_ep, 0, 0, 0)))
                    sent += k
                    self.bytes_sent += k
                    continue
                if not block:
                    break
                want = min(len(mv) - sent, ring.size - 1)
                with self.node.lock:
                    if not self.cond.wait_for(lambda: self.state is not EpState.CONNECTED or ring.space() >= want,
                                              _left(deadline)):
                        raise ScifTimeout(f"{self}: peer did not make room within {timeout:g} s", sent=sent)
            if sent < len(mv) and (block or sent == 0):
                self._raise_not_connected()
        return sent

    def recv(self, n: int, timeout: float | None = None) -> bytes:
        """Receive exactly ``n`` bytes (``SCIF_RECV_BLOCK``).

        If the peer has disconnected, returns what is left (fewer bytes);
        raises :class:`ScifConnectionReset` when nothing is left. On timeout
        nothing is lost: the bytes gathered so far stay for the next call.
        """
        return self._recv_bytes(n, block=True, timeout=timeout)

    def recv_nowait(self, n: int) -> bytes:
        """Up to ``n`` bytes that are there now (maybe ``b""``)."""
        return self._recv_bytes(n, block=False, timeout=None)

    def _recv_bytes(self, n: int, block: bool, timeout: float | None) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        deadline = _deadline(timeout)
        with self._recv_lock:
            out = self._rx[:n]
            del self._rx[:n]
            while len(out) < n:
                with self.node.lock:
                    st, qp = self.state, self.qp
                if qp is None or st not in (EpState.CONNECTED, EpState.DISCONNECTED):
                    break
                ring = qp.inbound
                avail = ring.count(n - len(out))
                if avail:
                    data = ring.read(min(n - len(out), avail))
                    out += data
                    self.bytes_received += len(data)
                    if st is EpState.CONNECTED:
                        # Only while connected: after a disconnect the read
                        # pointer is in memory the peer may have freed.
                        ring.update_read_ptr()
                        try:
                            self._send(ScifMsg(Uop.CLIENT_RCVD, self.port, self.peer, (self.remote_ep, 0, 0, 0)))
                        except ScifNodeDown:
                            pass  # the invalidation that follows ends the connection
                    continue
                if st is EpState.DISCONNECTED or not block:
                    break
                want = min(n - len(out), ring.size - 1)
                with self.node.lock:
                    if not self.cond.wait_for(lambda: self.state is not EpState.CONNECTED or ring.count(want) >= want,
                                              _left(deadline)):
                        self._rx[:0] = out
                        raise ScifTimeout(f"{self}: {len(out)} of {n} bytes within {timeout:g} s")
            if not out and n:
                self._raise_not_connected()  # returns if still connected (a non-blocking miss)
            return bytes(out)

    def _raise_not_connected(self):
        with self.node.lock:
            st = self.state
        if st is EpState.DISCONNECTED:
            raise ScifConnectionReset(f"{self}: the peer closed the connection")
        if st is EpState.CONNECTED:
            return
        raise ScifNotConnected(f"{self}: not connected ({st.value})")

    # --- poll -------------------------------------------------------------------------
    def _mask(self) -> int:
        st = self.state
        if st is EpState.LISTENING:
            return POLLIN if self.conreqs else 0
        if st in (EpState.CONNECTED, EpState.DISCONNECTED) and self.qp is not None:
            m = 0
            if self._rx or self.qp.inbound.peek_count():
                m |= POLLIN
            if st is EpState.CONNECTED and self.qp.outbound is not None and self.qp.outbound.peek_space():
                m |= POLLOUT
            if st is EpState.DISCONNECTED:
                m |= POLLHUP
            return m
        if st in (EpState.CLOSED, EpState.CLOSING, EpState.ZOMBIE, EpState.DISCONNECTED):
            return POLLHUP
        return 0

    def poll(self, events: int = POLLIN | POLLOUT, timeout: float | None = 0) -> int:
        """``scif_poll``: which of POLLIN/POLLOUT (plus POLLHUP) hold, waiting up to ``timeout``."""
        want = events | POLLHUP | POLLERR
        with self.node.lock:
            self.cond.wait_for(lambda: self._mask() & want, timeout)
            return self._mask() & want

    # --- close ------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """``scif_close``: disconnect (DISCNCT, wait for DISCNT_ACK), stop listening, free everything."""
        node = self.node
        with node.lock:
            old = self.state
            if old is EpState.CLOSED:
                return
            self.state = EpState.CLOSING
            self.cond.notify_all()
            if old is EpState.LISTENING and node.listeners.get(self.port.port) is self:
                del node.listeners[self.port.port]
            pending = list(self.conreqs)
            self.conreqs.clear()
        self.fire_event()
        if old in (EpState.CONNECTED, EpState.MAPPING, EpState.CLOSING):
            # Let blocked senders and receivers leave before the rings go.
            with self._send_lock, self._recv_lock:
                pass
            peer = node.peer(self.remote_node)
            if peer is not None and peer.alive:
                try:
                    self._send(ScifMsg(Uop.DISCNCT, self.port, self.peer, (self.cookie, self.remote_ep, 0, 0)))
                    self.discon.wait(node.alive_timeout if timeout is None else timeout)
                except ScifError as e:
                    log.warning("%s: DISCNCT: %s", self, e)
        for peer_node, req in pending:
            self._reject(peer_node, req)
        self._release()

    def _release(self) -> None:
        with self._send_lock, self._recv_lock:
            self._teardown_qp()
        with self.node.lock:
            if self.port is not None and self.state is not EpState.CLOSED:
                self.node._put_port(self.port.port)
            self.state = EpState.CLOSED
            self.cond.notify_all()
        self.node._forget(self)

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Endpoint {self.port or '-'} -> {self.peer or self.conn_port or '-'} {self.state.value}>"
