"""VERSION negotiation: the first exchange on every vfio-user connection (spec 2.4).

The client proposes ``major.minor`` and a JSON object
``{"capabilities": {...}}`` (UTF-8, *including the terminating NUL*); the
server answers with the same major, a minor no larger than proposed, and a
subset of the capabilities with its own limits. Both sides then know:

* ``max_msg_fds`` -- how many fds the *sender of that VERSION message* can
  receive in one message (default 1);
* ``max_data_xfer_size`` -- the largest ``count`` of a REGION_READ/WRITE or
  DMA_READ/WRITE that side accepts (default 1 MiB);
* ``max_dma_maps`` -- how many DMA mappings may exist at once (default 65535);
* ``pgsizes`` -- the DMA page sizes, OR-ed (default 4096);
* ``write_multiple`` -- whether REGION_WRITE_MULTI is accepted.

Like QEMU's client (spec 2.4, "What real implementations do"), unknown keys
in a reply are ignored with a warning, known keys are range-checked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from ..errors import ProtocolError
from .wire import (DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS, DEFAULT_MAX_MSG_FDS, DEFAULT_PGSIZES,
                   version_head)

log = logging.getLogger(__name__)

VERSION_MAJOR = 0  # spec 2.4: QEMU's client sends 0.0; libvfio-user is 0.1
VERSION_MINOR = 0

# Range limits a reply must respect; QEMU's client checks the same (spec 2.4).
MAX_MSG_FDS_LIMIT = 1024  # QEMU: <= 16 from a server; we accept more and use min(ours, theirs)
MAX_DATA_XFER_LIMIT = 64 << 20  # 64 MiB (spec 2.4, QEMU)
MAX_DMA_MAPS_LIMIT = 65535  # spec 2.4
PAGE = 4096  # pgsizes must be multiples of 4096 (spec 2.4, QEMU)


@dataclass(frozen=True)
class Capabilities:
    """One side's capabilities (spec 2.4); ``None`` means "not stated" (the default applies)."""

    max_msg_fds: int | None = None
    max_data_xfer_size: int | None = None
    max_dma_maps: int | None = None
    pgsizes: int | None = None
    write_multiple: bool | None = None

    # The effective values, defaults filled in (spec 2.4 table).
    @property
    def msg_fds(self) -> int:
        return DEFAULT_MAX_MSG_FDS if self.max_msg_fds is None else self.max_msg_fds

    @property
    def data_xfer_size(self) -> int:
        return DEFAULT_MAX_DATA_XFER_SIZE if self.max_data_xfer_size is None else self.max_data_xfer_size

    @property
    def dma_maps(self) -> int:
        return DEFAULT_MAX_DMA_MAPS if self.max_dma_maps is None else self.max_dma_maps

    @property
    def page_sizes(self) -> int:
        return DEFAULT_PGSIZES if self.pgsizes is None else self.pgsizes

    def to_json(self) -> dict:
        caps = {k: getattr(self, k) for k in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes",
                                                "write_multiple") if getattr(self, k) is not None}
        return {"capabilities": caps}


def encode_version(major: int, minor: int, caps: Capabilities | None) -> bytes:
    """The VERSION payload: major, minor, then the JSON with its NUL (spec 2.4)."""
    body = version_head.pack(major, minor)
    if caps is not None:
        body += json.dumps(caps.to_json(), separators=(",", ":")).encode() + b"\0"
    return body


def _int_cap(caps: dict, key: str, lo: int, hi: int, step: str) -> int | None:
    if key not in caps:
        return None
    v = caps[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProtocolError(step, f"capability {key}={v!r} outside [{lo}, {hi}]")
    return v


def decode_version(payload: bytes | bytearray, step: str) -> tuple[int, int, Capabilities]:
    """Parse a VERSION payload; range-check the capabilities it states."""
    if len(payload) < version_head.size:
        raise ProtocolError(step, f"VERSION payload of {len(payload)} bytes, need {version_head.size}")
    major, minor = version_head.unpack_from(payload)
    text = bytes(payload[version_head.size:])
    if not text:
        return major, minor, Capabilities()
    if not text.endswith(b"\0"):  # spec 2.4: the JSON includes its terminating NUL
        raise ProtocolError(step, "VERSION JSON is not NUL-terminated")
    try:
        obj = json.loads(text[:-1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(step, f"VERSION JSON does not parse: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(step, "VERSION JSON is not an object")
    caps = obj.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ProtocolError(step, "VERSION capabilities is not an object")
    known = {"max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes", "write_multiple"}
    extra = set(caps) - known
    if extra:
        log.debug("%s: ignoring capabilities %s", step, sorted(extra))
    pgsizes = _int_cap(caps, "pgsizes", PAGE, (1 << 64) - 1, step)
    if pgsizes is not None and pgsizes % PAGE:
        raise ProtocolError(step, f"pgsizes {pgsizes:#x} is not a multiple of {PAGE}")
    wm = caps.get("write_multiple")
    if wm is not None and not isinstance(wm, bool):
        raise ProtocolError(step, f"write_multiple={wm!r} is not a boolean")
    return major, minor, Capabilities(
        max_msg_fds=_int_cap(caps, "max_msg_fds", 1, MAX_MSG_FDS_LIMIT, step),
        max_data_xfer_size=_int_cap(caps, "max_data_xfer_size", 1, MAX_DATA_XFER_LIMIT, step),
        max_dma_maps=_int_cap(caps, "max_dma_maps", 1, MAX_DMA_MAPS_LIMIT, step),
        pgsizes=pgsizes,
        write_multiple=wm,
    )


def check_reply(proposed: tuple[int, int, Capabilities], reply: tuple[int, int, Capabilities], step: str) -> None:
    """The client's checks on the server's answer (spec 2.4 rules)."""
    pmaj, pmin, pcaps = proposed
    rmaj, rmin, rcaps = reply
    if rmaj != pmaj:
        raise ProtocolError(step, f"server speaks major version {rmaj}, we proposed {pmaj}")
    if rmin > pmin:
        raise ProtocolError(step, f"server answered minor version {rmin} > proposed {pmin}")
    if rcaps.write_multiple and not pcaps.write_multiple:
        raise ProtocolError(step, "server claims write_multiple, which we did not offer")
    if rcaps.pgsizes is not None and pcaps.pgsizes is not None and rcaps.pgsizes & ~pcaps.pgsizes:
        raise ProtocolError(step, f"server pgsizes {rcaps.pgsizes:#x} not a subset of ours {pcaps.pgsizes:#x}")


def negotiate(ours: Capabilities, proposed: Capabilities) -> Capabilities:
    """The server's answer: our limits, stated only for what the client proposed (a subset, spec 2.4)."""
    def both(key: str):
        return getattr(ours, key) if getattr(proposed, key) is not None else None

    pgsizes = None
    if proposed.pgsizes is not None:
        pgsizes = (proposed.pgsizes & ours.page_sizes) or None
    return Capabilities(
        max_msg_fds=both("max_msg_fds"),
        max_data_xfer_size=both("max_data_xfer_size"),
        max_dma_maps=min(ours.dma_maps, proposed.dma_maps) if proposed.max_dma_maps is not None else None,
        pgsizes=pgsizes,
        write_multiple=bool(ours.write_multiple) if proposed.write_multiple else None,
    )
