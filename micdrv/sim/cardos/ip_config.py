"""The card's network address, from the kernel command line the host wrote (spec 6.5, 3.1 step 6).

Three sources, the last one on the command line winning (as every kernel
parameter does):

* MPSS's ``ifcfg=static;address,<ip>;netmask,<mask>`` (mpssd writes
  ``ifcfg=static;address,172.31.<id+1>.1;netmask,255.255.255.0``, spec 6.5),
  optionally with ``;gateway,<ip>`` [choice: MPSS scripts knew a gateway
  field; mpssd never writes one];
* the simulator's own ``micdrv_sim.ip=<ip>/<prefix>`` (:mod:`.params`);
* with neither: ``172.31.<node>.1/24``, ``<node>`` the card's SCIF node id
  (mic0 is node 1: MPSS's ``172.31.<id+1>.1``), node 1 if the card found no
  device page.

``ifcfg=dhcp`` and anything unparsable are reported as warnings (the
kernel log shows them) and leave the default: the card has no DHCP client.

The MTU is the device's if it offers VIRTIO_NET_F_MTU, else
``micdrv_sim.mtu=``, else MPSS's 64512 (x100-host-abi.md 6.2, the host tap's
MTU too), so 64000-byte datagrams need no fragmentation.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

MPSS_MTU = 64512      # x100-host-abi.md 6.2 / backends.net.link.MPSS_MTU
ETH_MIN_MTU = 68      # RFC 791: every IPv4 host takes 68-byte datagrams
ETH_MAX_MTU = 65535 - 14 - 4   # largest frame body a 64 KiB + header receive buffer holds, VLAN tag allowed


@dataclass
class IpConfig:
    """One interface's IPv4 configuration."""

    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address | None = None
    source: str = "default"          # "ifcfg", "micdrv_sim.ip" or "default"
    warnings: list[str] = field(default_factory=list)

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return self.address.ip

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.address.network

    def as_dict(self) -> dict:
        return {"address": str(self.address), "gateway": str(self.gateway) if self.gateway else None,
                "source": self.source}


def default_address(node: int) -> ipaddress.IPv4Interface:
    """``172.31.<node>.1/24`` (node clamped to 1..254, a byte that is not the network or broadcast)."""
    return ipaddress.IPv4Interface(f"172.31.{min(max(node, 1), 254)}.1/24")


def parse_ifcfg(value: str) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Address | None]:
    """``static;address,A;netmask,M[;gateway,G]`` -> (A/M, G). Raises ValueError on anything else."""
    parts = value.split(";")
    if parts[0] != "static":
        raise ValueError(f"ifcfg={value}: only 'static' is supported (the card has no DHCP client)")
    fields: dict[str, str] = {}
    for p in parts[1:]:
        key, comma, v = p.partition(",")
        if not comma or key not in ("address", "netmask", "gateway"):
            raise ValueError(f"ifcfg: {p!r} is not address,<ip> / netmask,<mask> / gateway,<ip>")
        fields[key] = v
    if "address" not in fields:
        raise ValueError("ifcfg=static without an address")
    iface = ipaddress.IPv4Interface(f"{fields['address']}/{fields.get('netmask', '255.255.255.0')}")
    gw = ipaddress.IPv4Address(fields["gateway"]) if "gateway" in fields else None
    return iface, gw


def from_cmdline(words: list[str], node: int) -> IpConfig:
    """The configuration the command line's ``words`` give (the last address word wins), else the default."""
    cfg = IpConfig(default_address(node))
    for word in words:
        name, eq, value = word.partition("=")
        try:
            if name == "ifcfg" and eq:
                iface, gw = parse_ifcfg(value)
                cfg.address, cfg.gateway, cfg.source = iface, gw, "ifcfg"
            elif name == "micdrv_sim.ip" and eq:
                cfg.address, cfg.gateway, cfg.source = ipaddress.IPv4Interface(value), None, "micdrv_sim.ip"
        except ValueError as e:
            cfg.warnings.append(f"{word}: {e}; not used")
            continue
        if cfg.address.network.prefixlen > 30 or cfg.address.ip in (cfg.network.network_address,
                                                                    cfg.network.broadcast_address):
            cfg.warnings.append(f"{word}: {cfg.address} is not a host address of a usable network; default kept")
            cfg.address, cfg.gateway, cfg.source = default_address(node), None, "default"
    return cfg
