"""The host side of a card's network link, configured through pyroute2 (netlink).

What mpssd did with ``ip`` (x100-host-abi.md 6.2): bring the tap up and
give it the host address; here also its MTU, an optional bridge to join,
an optional network namespace to live in, and a stable MAC. Defaults are
MPSS's (:func:`mpss_defaults`): tap ``micN``, host ``172.31.<N+1>.254/24``,
card ``172.31.<N+1>.1``, MTU 64512.

This module is the only user of pyroute2 in micdrv. Every failure is a
:class:`LinkError` naming the interface, the namespace and the step.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import re
from dataclasses import dataclass

from pyroute2 import IPRoute, NetlinkError, netns as _netns

MPSS_MTU = 64512           # the MPSS default MTU of micN (x100-host-abi.md 6.2 [INF: MPSS scripts])
_CARD_INDEX = re.compile(r"^mic(\d+)$")


class LinkError(Exception):
    """A link configuration step that failed."""


@dataclass(frozen=True)
class NetDefaults:
    """MPSS's addressing for card ``micN``."""

    tap: str
    host: str | None  # address/prefix on the host side of the tap
    card: str | None  # the card's address (goes on the card's kernel command line, spec 6.5)


def mpss_defaults(card: str) -> NetDefaults:
    """``mic0`` -> tap mic0, host 172.31.1.254/24, card 172.31.1.1 (x100-host-abi.md 6.2 and 6.5)."""
    m = _CARD_INDEX.match(card)
    if not m or int(m.group(1)) > 253:
        raise ValueError(f"MPSS network defaults need a card named mic0..mic253, not {card!r}")
    n = int(m.group(1)) + 1
    return NetDefaults(tap=card, host=f"172.31.{n}.254/24", card=f"172.31.{n}.1")


def addresses(card: str, tap: str | None = None, address: str | None = None, card_address: str | None = None,
              bridge: str | None = None) -> NetDefaults:
    """The effective tap name, host address and card address of a net entry, MPSS defaults filling the gaps.

    The host address is None with a bridge and no explicit address; the card
    address is None when not configured and ``card`` is not ``micN``.
    """
    def default() -> NetDefaults:
        return mpss_defaults(card)

    host = address if address is not None else (None if bridge else default().host)
    card_ip = card_address or (default().card if _CARD_INDEX.match(card) else None)
    return NetDefaults(tap=tap or default().tap, host=host, card=card_ip)


def stable_mac(identity: str) -> bytes:
    """A MAC derived from ``identity`` (card name or PCI address): the same every boot, locally administered.

    First octet: bit 1 set (locally administered), bit 0 clear (unicast).
    """
    h = hashlib.sha256(f"micdrv:{identity}".encode()).digest()
    return bytes([(h[0] & 0xFC) | 0x02]) + h[1:6]


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-fA-F]{2}", p) for p in parts):
        raise ValueError(f"{text!r} is not a MAC address like 02:00:00:00:00:01")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"{text} is a multicast address")
    return mac


def _iproute(netns: str | None) -> IPRoute:
    if netns is None:
        return IPRoute()
    if netns not in _netns.listnetns():
        raise LinkError(f"network namespace {netns!r} does not exist (ip netns add {netns})")
    return IPRoute(netns=netns)


def _index(ip: IPRoute, ifname: str, where: str) -> int:
    found = ip.link_lookup(ifname=ifname)
    if not found:
        raise LinkError(f"{ifname}{where}: no such interface")
    return found[0]


def configure(ifname: str, *, netns: str | None = None, address: str | None = None, mtu: int | None = None,
              mac: bytes | None = None, bridge: str | None = None, up: bool = True) -> None:
    """Move ``ifname`` into ``netns`` (if given), then set MAC, MTU, bridge, address and state there."""
    where = f" (netns {netns})" if netns else ""
    iface = ipaddress.ip_interface(address) if address else None
    step = "look up"
    try:
        if netns is not None:
            if netns not in _netns.listnetns():
                raise LinkError(f"network namespace {netns!r} does not exist (ip netns add {netns})")
            with _iproute(None) as ip:
                idx = _index(ip, ifname, "")
                step = f"move into network namespace {netns}"
                ip.link("set", index=idx, net_ns_fd=netns)
        with _iproute(netns) as ip:
            idx = _index(ip, ifname, where)
            if mac is not None:
                step = f"set MAC {format_mac(mac)}"
                ip.link("set", index=idx, address=format_mac(mac))
            if mtu is not None:
                step = f"set MTU {mtu}"
                ip.link("set", index=idx, mtu=mtu)
            if bridge is not None:
                step = f"join bridge {bridge}"
                ip.link("set", index=idx, master=_index(ip, bridge, where))
            if iface is not None:
                step = f"add address {iface}"
                try:
                    ip.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
                except NetlinkError as e:
                    if e.code != 17:  # EEXIST: already there (a restarted daemon)
                        raise
            if up:
                step = "set up"
                ip.link("set", index=idx, state="up")
    except NetlinkError as e:
        if netns is not None and step.startswith("move") and e.code == errno.EEXIST:
            from .tap import describe_interface
            raise LinkError(f"{ifname}: {step}: an interface named {ifname} exists there already "
                            f"({describe_interface(ifname, netns)}); give the card another tap name") from None
        raise LinkError(f"{ifname}{where}: {step}: {e}") from None


def set_up(ifname: str, up: bool, netns: str | None = None) -> None:
    """Bring the link up or down."""
    with _iproute(netns) as ip:
        try:
            ip.link("set", index=_index(ip, ifname, f" (netns {netns})" if netns else ""),
                    state="up" if up else "down")
        except NetlinkError as e:
            raise LinkError(f"{ifname}: set {'up' if up else 'down'}: {e}") from None


@dataclass(frozen=True)
class LinkState:
    """What netlink says about a link (for ``micctl info`` and tests)."""

    ifname: str
    index: int
    mtu: int
    up: bool
    mac: str
    addresses: tuple[str, ...]   # address/prefix, IPv4 and IPv6
    master: str | None


def state(ifname: str, netns: str | None = None) -> LinkState:
    """The link's current MTU, flags, MAC, addresses and bridge."""
    with _iproute(netns) as ip:
        idx = _index(ip, ifname, f" (netns {netns})" if netns else "")
        link = ip.get_links(idx)[0]
        addrs = tuple(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ip.get_addr(index=idx))
        master_idx = link.get_attr("IFLA_MASTER")
        master = ip.get_links(master_idx)[0].get_attr("IFLA_IFNAME") if master_idx else None
        return LinkState(ifname, idx, link.get_attr("IFLA_MTU"), bool(link["flags"] & 1),
                         link.get_attr("IFLA_ADDRESS"), addrs, master)
