"""The card OS's parameters, from the kernel command line (spec 3.1 step 6, 7.2, 8.4).

The host writes ``" mem=<MiB>M"`` and its configured command line after the
image (spec 3.1 step 6); the image may carry a built-in command line too
(:mod:`.image`). Both are parsed the way a kernel parses its command line:
words separated by blanks, ``name=value``; the host's come after the
built-in ones, so they win. Parameters of the simulated card OS are named
``micdrv_sim.<name>`` (a kernel module's ``module.param`` form):

=================================  ======  ==========================================
parameter                          default where the default comes from
=================================  ======  ==========================================
micdrv_sim.heartbeat=SECONDS       30      COSM_HEARTBEAT_SEND_SEC (spec 7.2)
micdrv_sim.connect_retries=N       10      COSM_SCIF_MAX_RETRIES (spec 7.2)
micdrv_sim.connect_interval=SEC    1       msleep(1000) between tries (spec 7.2)
micdrv_sim.scif_poll=SECONDS       1       the device-page poll (spec 8.4 steps 1-2)
micdrv_sim.scif_timeout=SECONDS    30      SCIF_NODE_ALIVE_TIMEOUT (spec 8.4 step 6)
micdrv_sim.vring_info=PLACEMENT    rounded where the VOP driver looks for
                                           ``_mic_vring_info``: ``rounded`` or
                                           ``legacy`` (spec 5.6; must match the host)
micdrv_sim.ip=ADDRESS/PREFIX       (none)  the card's IPv4 address (:mod:`.ip_config`)
micdrv_sim.mtu=BYTES               64512   eth0's MTU without VIRTIO_NET_F_MTU (spec 6.2)
=================================  ======  ==========================================

``mem=<n>M`` is read too (the memory the host says the card has). Unknown
``micdrv_sim.*`` names and values that do not parse are reported in
:attr:`CardParams.warnings` (the kernel log shows them) and leave the
default; other words belong to the rest of the kernel and are kept in
:attr:`CardParams.other`.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass, field

from micdrv.cosm import COSM_CONNECT_RETRIES, COSM_CONNECT_RETRY_SEC, COSM_HEARTBEAT_SEND_SEC
from micdrv.scif import SCIF_NODE_ALIVE_TIMEOUT
from micdrv.scif.nodeqp import QP_POLL_INTERVAL

PREFIX = "micdrv_sim."
MAX_SECONDS = 24 * 3600.0


def _seconds(text: str) -> float:
    v = float(text)
    if not math.isfinite(v) or not 0 < v <= MAX_SECONDS:
        raise ValueError(f"{text!r} is not a time in seconds (0 < t <= {MAX_SECONDS:g})")
    return v


def _count(text: str) -> int:
    v = int(text, 0)
    if not 1 <= v <= 1000:
        raise ValueError(f"{text!r} is not a count 1..1000")
    return v


def _placement(text: str) -> str:
    if text not in ("rounded", "legacy"):
        raise ValueError(f"{text!r} is not rounded or legacy")
    return text


def _ipv4_interface(text: str) -> str:
    ipaddress.IPv4Interface(text)   # ValueError if it is not ADDRESS[/PREFIX]
    return text


def _mtu(text: str) -> int:
    v = int(text, 0)
    if not 68 <= v <= 65517:
        raise ValueError(f"{text!r} is not an MTU 68..65517")
    return v


_PARAMS = {"heartbeat": _seconds, "connect_retries": _count, "connect_interval": _seconds, "scif_poll": _seconds,
           "scif_timeout": _seconds, "ip": _ipv4_interface, "mtu": _mtu, "vring_info": _placement}


@dataclass
class CardParams:
    heartbeat: float = float(COSM_HEARTBEAT_SEND_SEC)
    connect_retries: int = COSM_CONNECT_RETRIES
    connect_interval: float = COSM_CONNECT_RETRY_SEC
    scif_poll: float = QP_POLL_INTERVAL
    scif_timeout: float = SCIF_NODE_ALIVE_TIMEOUT
    vring_info: str = "rounded"
    ip: str | None = None
    mtu: int | None = None
    mem_mib: int | None = None
    other: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"heartbeat": self.heartbeat, "connect_retries": self.connect_retries,
                "connect_interval": self.connect_interval, "scif_poll": self.scif_poll,
                "scif_timeout": self.scif_timeout, "vring_info": self.vring_info, "ip": self.ip, "mtu": self.mtu,
                "mem_mib": self.mem_mib}


def parse(*cmdlines: str) -> CardParams:
    """Parse command lines in order (later words override earlier ones)."""
    p = CardParams()
    for cmdline in cmdlines:
        for word in cmdline.split():
            name, eq, value = word.partition("=")
            if name == "mem" and eq:
                if value[-1:] in ("M", "m") and value[:-1].isdigit():
                    p.mem_mib = int(value[:-1])
                else:
                    p.warnings.append(f"mem={value}: not <n>M")
            elif name.startswith(PREFIX):
                key = name[len(PREFIX):]
                conv = _PARAMS.get(key)
                if conv is None:
                    p.warnings.append(f"unknown parameter {name} ignored")
                elif not eq:
                    p.warnings.append(f"{name} needs a value")
                else:
                    try:
                        setattr(p, key, conv(value))
                    except ValueError as e:
                        p.warnings.append(f"{name}: {e}; default kept")
            else:
                p.other.append(word)
    return p
