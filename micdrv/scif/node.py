"""A SCIF node: its peers, its ports, and the node-level messages (spec 8.1, 8.4).

:class:`ScifNode` is what the kernel keeps in ``scif_info`` and
``scif_dev[]``: this node's id (0 on the host, k+1 on card k), one
:class:`ScifPeer` per peer node it has a node queue pair with, the port
table and the endpoints (:mod:`.endpoint`). It is the same class on both
sides; the host is simply the management node (id 0).

Below it is a *node message transport* per peer -- anything with
``send_msg(ScifMsg)`` and a ``memory`` (:class:`~micdrv.scif.qp.ScifMemory`
for endpoint queue pairs with that peer), in practice a
:class:`~micdrv.scif.nodeqp.NodeQueuePair`. Incoming messages are handed to
:meth:`ScifNode.dispatch` together with the peer they arrived from (the
kernel's ``scifdev``): routing never trusts ``msg.src``, which the sender
often leaves as stack garbage (spec 8.2).

Life of a peer (spec 8.4):

1. ``peer = node.add_peer(n, link)`` -- before the QP address is published,
   so nothing can arrive unannounced;
2. ``peer.start(peer_qp_addr, doorbell)`` when the peer's QP shows up in the
   device page: map it and send SCIF_INIT (step 3);
3. the peer is *alive* once both our QP is connected and its SCIF_INIT has
   arrived (step 4); only then may endpoints connect through it;
4. the doorbell interrupt calls ``peer.interrupt()`` (step 5);
5. teardown (step 6): :meth:`ScifNode.remove_peer` -- on the host NODE_REMOVE
   to the other cards then SCIF_EXIT to this one; on a card SCIF_EXIT to the
   host -- each waiting for the acknowledgement. A peer's own SCIF_EXIT is
   answered with SCIF_EXIT_ACK and leaves its node QP reset, waiting for the
   peer to set up again (the kernel's ``qp_dwork``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Callable, Protocol

from .errors import RingError, ScifAddressInUse, ScifError, ScifNodeDown, ScifProtocolError, ScifTimeout
from .qp import ScifMemory
from .wire import (MAX_SCIF_NODES, SCIF_COSM_BACKLOG, SCIF_MGMT_NODE, SCIF_PORT_COUNT, SCIF_PORT_RSVD, PortId,
                   ScifMsg, Uop)

if TYPE_CHECKING:
    from .endpoint import Endpoint

log = logging.getLogger(__name__)

# spec 8.4 step 6: a node waits 30 s for SCIF_EXIT_ACK (the kernel's
# SCIF_NODE_ALIVE_TIMEOUT, also its bound for CNCT_GNT and DISCNT_ACK).
SCIF_NODE_ALIVE_TIMEOUT = 30.0
# spec 8.5: the acceptor waits for CNCT_GNTACK in 3 s steps while the node is alive.
SCIF_NODE_ACCEPT_TIMEOUT = 3.0


CANCEL_CHECK = 0.05  # how often a wait for an acknowledgement looks at its cancel event


def _wait_unless(event: threading.Event, cancel: threading.Event | None, deadline: float) -> bool:
    """Wait for ``event`` until ``deadline``; give up early (False) once ``cancel`` is set."""
    while True:
        left = deadline - time.monotonic()
        if cancel is None:
            return event.wait(max(0.0, left))
        if event.wait(max(0.0, min(left, CANCEL_CHECK))):
            return True
        if cancel.is_set() or left <= CANCEL_CHECK:
            return event.is_set()


class NodeLink(Protocol):
    """The node message transport to one peer node (a :class:`~micdrv.scif.nodeqp.NodeQueuePair`).

    The endpoint layer needs only ``memory`` and :meth:`send_msg`; the peer
    life cycle (:class:`ScifPeer`) also calls the others.
    """

    memory: ScifMemory

    def send_msg(self, msg: ScifMsg) -> None:
        """Queue ``msg`` for the peer and ring its doorbell; raises ScifNodeDown if it cannot."""

    def connect(self, peer_qp_addr: int, doorbell: Callable[[], None] | None = None) -> None:
        """Map the peer's node QP (spec 8.4 step 3); called by :meth:`ScifPeer.start`."""

    def drain(self, handler: Callable[[ScifMsg], None]) -> int:
        """Hand every queued incoming message to ``handler``; called by :meth:`ScifPeer.interrupt`."""

    def reset(self) -> None:
        """Forget the peer, keep our QP for its return (after its SCIF_EXIT)."""

    def close(self) -> None:
        """Free our QP (the peer was removed)."""


class ScifPeer:
    """``struct scif_dev``: one peer node as this node sees it."""

    def __init__(self, node: "ScifNode", peer_node: int, link: NodeLink):
        self.node = node
        self.peer_node = peer_node
        self.link = link
        self.qp_ready = False       # our QP is connected to the peer's (spec 8.4 step 3)
        self.init_seen = False      # the peer's SCIF_INIT arrived (step 4)
        self.exiting = False        # an EXIT flow has begun: only INIT/EXIT/EXIT_ACK may be sent
        self.removing = False       # this node is removing the peer (remove_peer): its own EXIT is out
        self.exit_acked = threading.Event()
        self.removed = False

    @property
    def alive(self) -> bool:
        """The kernel's ``scifdev_alive``: registered on the peer bus."""
        return self.qp_ready and self.init_seen and not self.exiting and not self.removed

    def start(self, peer_qp_addr: int, doorbell: Callable[[], None] | None = None) -> None:
        """Spec 8.4 step 3: map the peer's node QP at ``peer_qp_addr`` and send SCIF_INIT."""
        self.link.connect(peer_qp_addr, doorbell)
        with self.node.lock:
            self.qp_ready = True
            self.exiting = False
            self.exit_acked.clear()
        self.link.send_msg(ScifMsg(Uop.INIT, PortId(self.node.node_id, 0), PortId(self.peer_node, 0)))
        self.node._peer_changed(self)

    def interrupt(self) -> int:
        """The doorbell handler: drain the node QP into :meth:`ScifNode.dispatch`. Returns messages handled."""
        try:
            return self.link.drain(lambda msg: self.node.dispatch(self.peer_node, msg))
        except RingError as e:
            log.error("node %d: node %d corrupted its queue pair, giving it up: %s",
                      self.node.node_id, self.peer_node, e)
            self.node.peer_broken(self.peer_node, f"node {self.peer_node} corrupted its queue pair: {e}")
            return 0

    def __repr__(self) -> str:
        return (f"<ScifPeer {self.node.node_id}->{self.peer_node} alive={self.alive} "
                f"qp_ready={self.qp_ready} init_seen={self.init_seen}>")


class ScifNode:
    """The SCIF instance on one node: peers, ports, endpoints, node-level messages."""

    def __init__(self, node_id: int, *, alive_timeout: float = SCIF_NODE_ALIVE_TIMEOUT,
                 accept_step: float = SCIF_NODE_ACCEPT_TIMEOUT, double_publish: bool = False, name: str = ""):
        if not 0 <= node_id < MAX_SCIF_NODES:
            raise ValueError(f"SCIF node id {node_id} outside 0..{MAX_SCIF_NODES - 1} (spec 8.1)")
        self.node_id = node_id
        self.name = name or f"scif{node_id}"
        self.alive_timeout = alive_timeout
        self.accept_step = accept_step
        self.double_publish = double_publish  # card side: the X100 erratum (spec 8.3)
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self._peers: dict[int, ScifPeer] = {}
        self._eps: dict[int, "Endpoint"] = {}
        self.listeners: dict[int, "Endpoint"] = {}
        self._ports: dict[int, int] = {}
        self._next_port = SCIF_PORT_RSVD + 1
        self._remove_acks: dict[int, int] = {}
        self.node_info: tuple[int, int] | None = None  # (maxid, total) from GET_NODE_INFO
        self.on_peer_change: Callable[[int, bool], None] | None = None
        # Called (peer node, why) when a peer broke the protocol and was given up: its owner (COSM, on the
        # host) declares that card crashed.
        self.on_peer_broken: Callable[[int, str], None] | None = None
        from . import epd  # the connection-level handlers (spec 8.5)
        self._handlers: dict[Uop, Callable[[ScifPeer, ScifMsg], None]] = {
            Uop.INIT: self._on_init,
            Uop.EXIT: self._on_exit,
            Uop.EXIT_ACK: self._on_exit_ack,
            Uop.NODE_ADD: self._on_node_add,
            Uop.NODE_REMOVE: self._on_node_remove,
            Uop.NODE_REMOVE_ACK: self._on_node_remove_ack,
            Uop.GET_NODE_INFO: self._on_get_node_info,
        }
        for uop, fn in epd.HANDLERS.items():
            self._handlers[uop] = (lambda f: lambda peer, msg: f(self, peer, msg))(fn)

    @property
    def is_mgmt(self) -> bool:
        return self.node_id == SCIF_MGMT_NODE

    # --- peers ------------------------------------------------------------------
    def add_peer(self, peer_node: int, link: NodeLink) -> ScifPeer:
        """Register the node QP ``link`` to ``peer_node`` (spec 8.4 steps 1-2)."""
        if not 0 <= peer_node < MAX_SCIF_NODES or peer_node == self.node_id:
            raise ValueError(f"{self.name}: {peer_node} is not a peer node id")
        with self.lock:
            old = self._peers.get(peer_node)
            if old is not None and not old.removed:
                raise ScifError(f"{self.name}: node {peer_node} already has a queue pair; remove it first")
            peer = ScifPeer(self, peer_node, link)
            self._peers[peer_node] = peer
            return peer

    def peer(self, peer_node: int) -> ScifPeer | None:
        with self.lock:
            return self._peers.get(peer_node)

    def alive_peers(self) -> list[int]:
        with self.lock:
            return sorted(n for n, p in self._peers.items() if p.alive)

    def wait_peer(self, peer_node: int, timeout: float) -> bool:
        """Wait until ``peer_node`` is alive (SCIF_INIT both ways); False on timeout."""
        with self.lock:
            return self._cond.wait_for(lambda: (p := self._peers.get(peer_node)) is not None and p.alive, timeout)

    def _peer_changed(self, peer: ScifPeer) -> None:
        with self.lock:
            self._cond.notify_all()
            alive = peer.alive
        cb = self.on_peer_change
        if cb is not None:
            cb(peer.peer_node, alive)

    def send_msg(self, peer_node: int, msg: ScifMsg) -> None:
        """``scif_nodeqp_send``: after the exit flow began only INIT/EXIT/EXIT_ACK leave."""
        with self.lock:
            peer = self._peers.get(peer_node)
            if peer is None or peer.removed:
                raise ScifNodeDown(f"{self.name}: no node {peer_node}")
            if msg.uop > Uop.EXIT_ACK and not peer.alive:
                raise ScifNodeDown(f"{self.name}: node {peer_node} is not alive; {msg.uop.kernel_name} not sent")
        peer.link.send_msg(msg)

    def _invalidate(self, peer_node: int) -> list["Endpoint"]:
        """``scif_invalidate_ep``: every connection through ``peer_node`` is now disconnected."""
        from .endpoint import EpState
        touched = []
        with self.lock:
            for ep in list(self._eps.values()):
                if ep.remote_node == peer_node and ep.state in (EpState.CONNECTED, EpState.MAPPING,
                                                                EpState.CONNECTING, EpState.CLOSING):
                    if ep.state is not EpState.CLOSING:
                        ep.state = EpState.DISCONNECTED
                    ep.discon.set()
                    ep.cond.notify_all()
                    touched.append(ep)
            for lep in self.listeners.values():
                kept = [(n, m) for n, m in lep.conreqs if n != peer_node]
                if len(kept) != len(lep.conreqs):
                    lep.conreqs.clear()
                    lep.conreqs.extend(kept)
            self._cond.notify_all()
        for ep in touched:
            ep.fire_event()
        return touched

    def _drop_peer(self, peer: ScifPeer, close_link: bool) -> None:
        with self.lock:
            peer.removed = True
            if self._peers.get(peer.peer_node) is peer:
                del self._peers[peer.peer_node]
        self._invalidate(peer.peer_node)
        try:
            if close_link:
                peer.link.close()
        finally:
            self._peer_changed(peer)   # even when closing touched hardware that is gone

    def _reset_peer(self, peer: ScifPeer) -> None:
        """The peer left (EXIT); keep our QP and wait for it to set up again (spec 8.4 step 6)."""
        with self.lock:
            peer.qp_ready = peer.init_seen = False
        peer.link.reset()
        self._peer_changed(peer)

    def peer_lost(self, peer_node: int, reason: str = "") -> None:
        """The peer is gone without a word (reset, crash, broken queue): drop it and its connections."""
        peer = self.peer(peer_node)
        if peer is not None:
            log.info("%s: node %d lost%s", self.name, peer_node, f": {reason}" if reason else "")
            self._drop_peer(peer, close_link=True)

    def peer_broken(self, peer_node: int, reason: str) -> None:
        """The peer broke the protocol beyond repair: drop it (:meth:`peer_lost`), then tell ``on_peer_broken``."""
        self.peer_lost(peer_node, reason)
        cb = self.on_peer_broken
        if cb is not None:
            try:
                cb(peer_node, reason)
            except Exception:
                log.exception("%s: on_peer_broken callback", self.name)

    def remove_peer(self, peer_node: int, timeout: float | None = None,
                    cancel: threading.Event | None = None) -> bool:
        """Orderly removal of ``peer_node`` (spec 8.4 step 6); True if it acknowledged.

        On the management node: NODE_REMOVE to every other alive node (each
        answers NODE_REMOVE_ACK), then SCIF_EXIT to ``peer_node`` and wait
        for SCIF_EXIT_ACK. On a card: SCIF_EXIT to the host, wait for
        SCIF_EXIT_ACK. Either way the peer is then dropped and its node QP
        freed. Withdraw the QP from the device page first
        (:func:`~micdrv.scif.nodeqp.unpublish_qp`).

        ``cancel`` set while waiting for the acknowledgement means the hardware
        under this node is gone (a card reset under the card OS): stop waiting,
        drop the peer without touching its queue pair, return False.
        """
        timeout = self.alive_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        peer = self.peer(peer_node)
        if peer is None:
            return True
        was_alive = peer.alive
        if self.is_mgmt:
            self._remove_from_others(peer_node, deadline)
        else:
            self._invalidate(peer_node)  # card-initiated: connections go first
        with self.lock:
            peer.exiting = peer.removing = True
            peer.exit_acked.clear()   # only an answer to the EXIT about to leave counts (not a stray one)
        acked = True
        if was_alive:
            try:
                peer.link.send_msg(ScifMsg(Uop.EXIT, PortId(self.node_id, 0), PortId(peer_node, 0)))
                acked = _wait_unless(peer.exit_acked, cancel, deadline)
            except ScifError as e:
                # The peer's own SCIF_EXIT may have been handled first and reset the queue pair:
                # then it has left, which is all the acknowledgement there is to wait for.
                acked = peer.exit_acked.is_set() or not peer.qp_ready
                if not acked:
                    log.warning("%s: SCIF_EXIT to node %d: %s", self.name, peer_node, e)
            except Exception as e:
                # The hardware under the link failed (the card went off the bus, its vfio-user server
                # died): no answer will come, but the peer and its connections must still go, or
                # whoever waits on them (COSM's work on its endpoint) waits forever.
                log.warning("%s: SCIF_EXIT to node %d: %s", self.name, peer_node, e)
                acked = False
        if cancel is not None and cancel.is_set():
            self._drop_peer(peer, close_link=False)
            return False
        self._drop_peer(peer, close_link=True)
        return acked

    def _remove_from_others(self, gone: int, deadline: float) -> None:
        """``scif_disconnect_node`` part 1: NODE_REMOVE to the other nodes, wait for their acks."""
        with self.lock:
            others = [p for n, p in self._peers.items() if n != gone and p.alive]
            self._remove_acks[gone] = 0
        sent = 0
        for p in others:
            try:
                p.link.send_msg(ScifMsg(Uop.NODE_REMOVE, PortId(self.node_id, 0), PortId(p.peer_node, 0),
                                        (gone, 0, 0, 0)))
                sent += 1
            except ScifError as e:
                log.warning("%s: NODE_REMOVE to node %d: %s", self.name, p.peer_node, e)
        with self.lock:
            self._cond.wait_for(lambda: self._remove_acks.get(gone, 0) >= sent, max(0.0, deadline - time.monotonic()))
            self._remove_acks.pop(gone, None)

    def shutdown(self, timeout: float | None = None) -> None:
        """Close every endpoint and remove every peer."""
        with self.lock:
            eps = list(self._eps.values())
            peers = list(self._peers)
        for ep in eps:
            try:
                ep.close(timeout=timeout)
            except ScifError:
                pass
        for n in peers:
            self.remove_peer(n, timeout=timeout)

    # --- ports and endpoint registry ---------------------------------------------
    def _new_cookie(self, ep: "Endpoint") -> int:
        """An unguessable non-zero handle the peer echoes back (the kernel sends its ep pointer)."""
        with self.lock:
            while True:
                c = secrets.randbits(64)
                if c and c not in self._eps:
                    self._eps[c] = ep
                    return c

    def _forget(self, ep: "Endpoint") -> None:
        with self.lock:
            if self._eps.get(ep.cookie) is ep:
                del self._eps[ep.cookie]

    def endpoint(self, cookie: int) -> "Endpoint | None":
        return self._eps.get(cookie)

    def endpoints(self) -> list["Endpoint"]:
        with self.lock:
            return list(self._eps.values())

    def _get_port(self, port: int) -> int:
        """Reserve ``port``, or an ephemeral port above SCIF_PORT_RSVD when 0."""
        with self.lock:
            if port:
                if not 0 < port < SCIF_PORT_COUNT:
                    raise ValueError(f"SCIF port {port} outside 1..{SCIF_PORT_COUNT - 1}")
                if port in self._ports:
                    raise ScifAddressInUse(f"{self.name}: port {port} is in use")
                self._ports[port] = 1
                return port
            span = SCIF_PORT_COUNT - SCIF_PORT_RSVD - 1
            for i in range(span):
                p = SCIF_PORT_RSVD + 1 + (self._next_port - SCIF_PORT_RSVD - 1 + i) % span
                if p not in self._ports:
                    self._ports[p] = 1
                    self._next_port = p + 1
                    return p
            raise ScifAddressInUse(f"{self.name}: no free SCIF port")

    def _ref_port(self, port: int) -> None:
        with self.lock:
            self._ports[port] = self._ports.get(port, 0) + 1

    def _put_port(self, port: int) -> None:
        with self.lock:
            n = self._ports.get(port, 0) - 1
            if n > 0:
                self._ports[port] = n
            else:
                self._ports.pop(port, None)

    # --- the endpoint API, node-level conveniences --------------------------------
    def open(self) -> "Endpoint":
        """``scif_open``: a new unbound endpoint."""
        from .endpoint import Endpoint
        return Endpoint(self)

    def listen(self, port: int, backlog: int = SCIF_COSM_BACKLOG) -> "Endpoint":
        """open + bind(port) + listen(backlog)."""
        ep = self.open()
        try:
            ep.bind(port)
            ep.listen(backlog)
        except BaseException:
            ep.close()
            raise
        return ep

    def connect(self, node: int, port: int, timeout: float | None = None) -> "Endpoint":
        """open + connect((node, port)): a connected endpoint, or an exception."""
        ep = self.open()
        try:
            ep.connect(node, port, timeout=timeout)
        except BaseException:
            ep.close(timeout=0)
            raise
        return ep

    def get_node_info(self, timeout: float | None = None) -> tuple[int, int]:
        """Card side: ask the management node for (maxid, total) (SCIF_GET_NODE_INFO)."""
        with self.lock:
            self.node_info = None
        self.send_msg(SCIF_MGMT_NODE, ScifMsg(Uop.GET_NODE_INFO, PortId(self.node_id, 0), PortId(SCIF_MGMT_NODE, 0)))
        with self.lock:
            if not self._cond.wait_for(lambda: self.node_info is not None,
                                       self.alive_timeout if timeout is None else timeout):
                raise ScifTimeout(f"{self.name}: no answer to SCIF_GET_NODE_INFO")
            return self.node_info

    # --- incoming messages ------------------------------------------------------------
    def dispatch(self, peer_node: int, msg: ScifMsg) -> None:
        """Handle one message that arrived on the node QP from ``peer_node`` (spec 8.4 step 5)."""
        with self.lock:
            peer = self._peers.get(peer_node)
        if peer is None or peer.removed:
            log.warning("%s: %s from node %d, which has no queue pair here; dropped", self.name, msg, peer_node)
            return
        handler = self._handlers.get(msg.uop)
        if handler is None:
            log.warning("%s: %s from node %d is not supported (no RMA); dropped", self.name, msg, peer_node)
            return
        try:
            handler(peer, msg)
        except ScifNodeDown as e:
            log.warning("%s: answering %s from node %d: %s", self.name, msg.uop.kernel_name, peer_node, e)
        except ScifProtocolError as e:
            log.warning("%s: %s from node %d: %s", self.name, msg.uop.kernel_name, peer_node, e)

    def _on_init(self, peer: ScifPeer, msg: ScifMsg) -> None:
        """``scif_init``: the peer's side of the node QP is ready; it becomes alive (spec 8.4 step 4)."""
        with self.lock:
            peer.init_seen = True
        self._peer_changed(peer)

    def _on_exit(self, peer: ScifPeer, msg: ScifMsg) -> None:
        """``scif_exit``: the peer is leaving; clean up, answer SCIF_EXIT_ACK, wait for it to return.

        When this node is removing the peer at the same time (both ends shut
        down at once), the two SCIF_EXITs cross: each stands for the other's
        SCIF_EXIT_ACK. Nothing is answered -- an answer would land in a queue
        pair the peer is about to free -- and our own removal goes on.
        """
        with self.lock:
            crossing = peer.removing
            peer.exiting = True
        if crossing:
            peer.exit_acked.set()
            return
        if self.is_mgmt:
            self._remove_from_others(peer.peer_node, time.monotonic() + self.alive_timeout)
        self._invalidate(peer.peer_node)
        try:
            peer.link.send_msg(ScifMsg(Uop.EXIT_ACK, PortId(self.node_id, 0), PortId(peer.peer_node, 0)))
        finally:
            self._reset_peer(peer)

    def _on_exit_ack(self, peer: ScifPeer, msg: ScifMsg) -> None:
        """The answer to our SCIF_EXIT. One that answers nothing is ignored: taken as the answer to a
        later EXIT, it would let us free the queue pair while the peer still writes into it."""
        with self.lock:
            expected = peer.removing
            if expected:
                peer.exit_acked.set()
        if not expected:
            log.warning("%s: SCIF_EXIT_ACK from node %d, which was sent no SCIF_EXIT; ignored", self.name,
                        peer.peer_node)

    def _on_node_add(self, peer: ScifPeer, msg: ScifMsg) -> None:
        """P2P between cards is not supported: refuse like a failed ``scif_nodeadd``."""
        if self.is_mgmt:
            log.warning("%s: SCIF_NODE_ADD from node %d ignored", self.name, peer.peer_node)
            return
        self.send_msg(peer.peer_node, ScifMsg(Uop.NODE_ADD_NACK, PortId(self.node_id, 0), PortId(msg.src.node, 0),
                                              msg.payload))

    def _on_node_remove(self, peer: ScifPeer, msg: ScifMsg) -> None:
        """``scif_node_remove``: forget node payload[0] and acknowledge to the management node."""
        gone = msg.payload[0]
        if self.is_mgmt or peer.peer_node != SCIF_MGMT_NODE:
            log.warning("%s: SCIF_NODE_REMOVE from node %d ignored", self.name, peer.peer_node)
            return
        other = self.peer(gone) if gone != SCIF_MGMT_NODE else None
        if other is not None:
            self._drop_peer(other, close_link=True)
        peer.link.send_msg(ScifMsg(Uop.NODE_REMOVE_ACK, PortId(self.node_id, 0), PortId(SCIF_MGMT_NODE, 0),
                                   (gone, 0, 0, 0)))

    def _on_node_remove_ack(self, peer: ScifPeer, msg: ScifMsg) -> None:
        gone = msg.payload[0]
        with self.lock:
            if gone in self._remove_acks:
                self._remove_acks[gone] += 1
                self._cond.notify_all()

    def _on_get_node_info(self, peer: ScifPeer, msg: ScifMsg) -> None:
        if self.is_mgmt:
            with self.lock:
                alive = [n for n, p in self._peers.items() if p.alive]
            maxid, total = max(alive, default=0), len(alive) + 1
            self.send_msg(peer.peer_node, ScifMsg(Uop.GET_NODE_INFO, msg.dst, msg.src,
                                                  (msg.payload[0], maxid, total, msg.payload[3])))
        else:
            with self.lock:
                self.node_info = (msg.payload[1], msg.payload[2])
                self._cond.notify_all()

    def __repr__(self) -> str:
        return f"<ScifNode {self.name} id={self.node_id} peers={sorted(self._peers)} endpoints={len(self._eps)}>"
