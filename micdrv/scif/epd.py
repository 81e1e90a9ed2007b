"""The connection messages of spec 8.5, as the kernel's ``scif_epd.c`` handles them.

These run on the node queue pair's interrupt thread (:meth:`ScifNode.dispatch
<micdrv.scif.node.ScifNode.dispatch>`), change endpoint state under the node
lock and wake whoever waits in :mod:`.endpoint`; answers (CNCT_REJ,
DISCNT_ACK) are sent after the lock is dropped. Every cookie the peer echoes
is looked up in the node's table and must belong to an endpoint connected
(or connecting) to *that* peer node; anything else is ignored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from .endpoint import Endpoint, EpState
from .wire import PortId, ScifMsg, Uop

if TYPE_CHECKING:
    from .node import ScifNode, ScifPeer

log = logging.getLogger(__name__)


def _lookup(node: "ScifNode", peer: "ScifPeer", cookie: int, msg: ScifMsg) -> Endpoint | None:
    ep = node.endpoint(cookie)
    if ep is None or ep.remote_node != peer.peer_node:
        log.debug("%s: %s from node %d names no endpoint of ours", node.name, msg, peer.peer_node)
        return None
    return ep


def _on_cnct_req(node: "ScifNode", peer: "ScifPeer", msg: ScifMsg) -> None:
    """``scif_cnctreq``: queue it on the listener of ``dst.port``, or reject."""
    with node.lock:
        lep = node.listeners.get(msg.dst.port)
        if lep is not None and lep.state is EpState.LISTENING and len(lep.conreqs) < lep.backlog:
            lep.conreqs.append((peer.peer_node, msg))
            lep.cond.notify_all()
        else:
            lep = None
    if lep is None:
        node.send_msg(peer.peer_node, msg.reply(Uop.CNCT_REJ))
    else:
        lep.fire_event()


def _on_cnct_gnt(node: "ScifNode", peer: "ScifPeer", msg: ScifMsg) -> None:
    """``scif_cnctgnt``: the acceptor granted; the connector maps its queue next."""
    ep = _lookup(node, peer, msg.payload[0], msg)
    if ep is None:
        return
    with node.lock:
        if ep.state is EpState.CONNECTING:
            ep.peer = PortId(peer.peer_node, msg.src.port)
            ep.gnt_pld = msg.payload[1]
            ep.remote_ep = msg.payload[2]
            ep.state = EpState.MAPPING
            ep.cond.notify_all()


def _on_cnct_gntack(node: "ScifNode", peer: "ScifPeer", msg: ScifMsg) -> None:
    _answer_grant(node, peer, msg, EpState.CONNECTED)


def _on_cnct_gntnack(node: "ScifNode", peer: "ScifPeer", msg: ScifMsg) -> None:
    _answer_grant(node, peer, msg, EpState.CLOSING)


def _answer_grant(node, peer, msg, state: EpState) -> None:
    ep = _lookup(node, peer, msg.payload[0], msg)
    if ep is None:
        return
    with node.lock:
        if ep.state is EpState.CONNECTING:
            ep.state = state
            ep.cond.notify_all()


def _on_cnct_rej(node: "ScifNode", peer: "ScifPeer", msg: ScifMsg) -> None:
    """``scif_cnctrej``: back to BOUND; connect() reports ECONNREFUSED."""
    ep = _lookup(node, peer, msg.payload[0], msg)
    if ep is None:
        return
    with node.lock:
        if ep.state is EpState.CONNECTING:
            ep.state = EpState.BOUND
            ep.cond.notify_all()


def _on_discnct(node: "ScifNode", peer: "ScifPeer", msg: ScifMsg) -> None:
    """``scif_discnct``: the peer closed; what is in our inbound ring can still be read."""
    ep = _lookup(node, peer, msg.payload[1], msg)
    hit = False
    if ep is not None:
        with node.lock:
            if ep.state is EpState.CONNECTED and ep.remote_ep == msg.payload[0]:
                ep.state = EpState.DISCONNECTED
                ep.cond.notify_all()
                hit = True
    node.send_msg(peer.peer_node, msg.reply(Uop.DISCNT_ACK))
    if hit:
        ep.fire_event()


def _on_discnt_ack(node: "ScifNode", peer: "ScifPeer", msg: ScifMsg) -> None:
    ep = _lookup(node, peer, msg.payload[0], msg)
    if ep is None:
        return
    with node.lock:
        if ep.state not in (EpState.CLOSED, EpState.CLOSING):
            ep.state = EpState.DISCONNECTED
        ep.discon.set()
        ep.cond.notify_all()


def _on_client(node: "ScifNode", peer: "ScifPeer", msg: ScifMsg) -> None:
    """CLIENT_SENT / CLIENT_RCVD: data or room appeared; wake whoever waits."""
    ep = _lookup(node, peer, msg.payload[0], msg)
    if ep is None:
        return
    with node.lock:
        if ep.state is not EpState.CONNECTED:
            return
        ep.cond.notify_all()
    ep.fire_event()


HANDLERS: dict[Uop, Callable[["ScifNode", "ScifPeer", ScifMsg], None]] = {
    Uop.CNCT_REQ: _on_cnct_req,
    Uop.CNCT_GNT: _on_cnct_gnt,
    Uop.CNCT_GNTACK: _on_cnct_gntack,
    Uop.CNCT_GNTNACK: _on_cnct_gntnack,
    Uop.CNCT_REJ: _on_cnct_rej,
    Uop.DISCNCT: _on_discnct,
    Uop.DISCNT_ACK: _on_discnt_ack,
    Uop.CLIENT_SENT: _on_client,
    Uop.CLIENT_RCVD: _on_client,
}
