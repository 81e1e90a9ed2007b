"""A hostile card: the card OS writing whatever it likes where the host reads it (issue 7; tests only).

Everything the host reads from a card comes through a handful of places:
the device page (the card's fields of ``struct mic_bootparam`` and of each
VOP entry, spec 3.3, 5.1), the vrings the host allocated (descriptors and
avail, spec 5.6), the card->host doorbells (spec 2.3), the SCIF node queue
pair (its ring bytes and the write offset the card publishes, spec 8.3) and
the COSM byte stream on top of SCIF (spec 7.1). :class:`HostileCard` lets a
test put arbitrary bytes in each of them, as a buggy or malicious card OS
could, and nothing else: every write goes through the card's own bus, as
card software's would (an address the card cannot reach faults on the card,
not on the host).

Reached through the simulator's control socket
(``{"cmd": "hostile", "op": ..., ...}``, :mod:`micdrv.sim.control`). Ops,
``data`` always hex:

==================  ==========================================================================
``page_read``       ``offset``, ``length``: bytes of the device page (``data``)
``page_write``      ``offset``, ``data``: written into the device page; then the doorbell
                    of ``kick`` (a VOP device name or index) is rung if given
``vring_write``     ``device``, ``queue``, ``offset``, ``data``: into that queue's vring (the
                    descriptor table and avail ring the host allocated, at
                    ``vqconfig.address + offset``); then its doorbell is rung (``kick``,
                    default true)
``kick``            ``device``, ``count``: ring that device's c2h doorbell ``count`` times
``doorbell``        ``db`` (0..3), ``count``: ring host doorbell ``db`` ``count`` times
``scratch``         ``size``: card memory from the kernel heap for a test to point descriptors
                    at (``addr``), so the host's writes land in memory the card OS does not use
``scif_send``       ``messages``: raw 44-byte messages (any uop, ports, payload) into the
                    host's node queue pair ring, committed, the host's doorbell rung
``scif_write_ptr``  ``value``: the card's write offset of the host's inbound ring, published
                    as is (a corrupted ring pointer), the doorbell rung
``cosm_send``       ``data``: raw bytes on the card's COSM connection to port 201
==================  ==========================================================================

Every op is logged in the card's kernel log ("hostile: ..."), so a card
log shows what the card was made to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from micdrv.bootparam import MIC_DP_SIZE
from micdrv.scif.wire import SCIFMSG_SIZE
from micdrv.vop import layout as L
from micdrv.x100 import regs

if TYPE_CHECKING:
    from .kernel import Kernel

MAX_COUNT = 100_000      # doorbell rings per op
MAX_BYTES = 1 << 20      # bytes per write or scratch allocation


def _hex(args: dict, key: str = "data") -> bytes:
    v = args.get(key)
    if not isinstance(v, str):
        raise ValueError(f'"{key}" must be a hex string')
    raw = bytes.fromhex(v)
    if len(raw) > MAX_BYTES:
        raise ValueError(f'"{key}": at most {MAX_BYTES} bytes')
    return raw


def _int(args: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
    v = args.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f'"{key}" must be an integer in {lo}..{hi}')
    return v


class HostileCard:
    """The hostile ops of one running card OS (see the module docstring)."""

    def __init__(self, kernel: "Kernel"):
        self.kernel = kernel

    def control(self, op: str = "", **args) -> dict:
        fn = getattr(self, f"_op_{op}", None)
        if fn is None:
            ops = sorted(n[4:] for n in dir(self) if n.startswith("_op_"))
            raise ValueError(f"unknown hostile op {op!r}; one of {', '.join(ops)}")
        return fn(args) or {}

    def _log(self, text: str) -> None:
        self.kernel.printk(f"hostile: {text}")

    # --- VOP ----------------------------------------------------------------------------------
    def _vop(self):
        vop = self.kernel.vop
        if vop is None:
            raise ValueError("the card OS has no VOP driver (no device page)")
        return vop

    def _op_page_read(self, args: dict) -> dict:
        vop = self._vop()
        off = _int(args, "offset", 0, MIC_DP_SIZE - 1)
        n = _int(args, "length", 1, MIC_DP_SIZE - off)
        return {"data": vop.page.read(vop.dp + off, n).hex()}

    def _op_page_write(self, args: dict) -> dict:
        vop = self._vop()
        off = _int(args, "offset", 0, MIC_DP_SIZE - 1)
        data = _hex(args)
        if off + len(data) > MIC_DP_SIZE:
            raise ValueError(f"{len(data)} bytes at offset {off} run past the {MIC_DP_SIZE}-byte device page")
        vop.page.write(vop.dp + off, data)
        self._log(f"device page [{off}, +{len(data)}) = {data.hex()}")
        if args.get("kick") is not None:
            vop.find_device(args["kick"]).ring_host()
        return {}

    def _op_vring_write(self, args: dict) -> dict:
        vop = self._vop()
        dev = vop.find_device(args.get("device"))
        q = _int(args, "queue", 0, dev.entry.shape.num_vq - 1, 0)
        num = dev.entry.vq_num(q)
        size = L.vring_bytes(min(max(num, 1), L.MIC_MAX_VRING_ENTRIES))
        off = _int(args, "offset", 0, size - 1)
        data = _hex(args)
        if off + len(data) > size:
            raise ValueError(f"{len(data)} bytes at offset {off} run past the {size}-byte vring")
        vop.smpt.write(dev.entry.vq_address(q) + off, data)
        self._log(f"{dev.name} vring {q} [{off}, +{len(data)}) = {data[:64].hex()}{'...' if len(data) > 64 else ''}")
        if args.get("kick", True):
            dev.ring_host()
        return {}

    def _op_kick(self, args: dict) -> dict:
        dev = self._vop().find_device(args.get("device"))
        n = _int(args, "count", 1, MAX_COUNT, 1)
        for _ in range(n):
            dev.ring_host()
        return {"rung": n}

    # --- doorbells, memory ----------------------------------------------------------------------
    def _op_doorbell(self, args: dict) -> dict:
        db = _int(args, "db", 0, regs.SDBIC_COUNT - 1)
        n = _int(args, "count", 1, MAX_COUNT, 1)
        for _ in range(n):
            self.kernel.side.send_host_doorbell(db)
        self._log(f"host doorbell {db} rung {n} times")
        return {"rung": n}

    def _op_scratch(self, args: dict) -> dict:
        n = _int(args, "size", 64, MAX_BYTES)
        return {"addr": self.kernel.heap.alloc(n, L.PAGE_SIZE), "size": n}

    # --- SCIF, COSM -------------------------------------------------------------------------------
    def _link(self):
        scif = self.kernel.scif
        qp = scif.link.qp if scif is not None else None
        if qp is None or qp.outbound is None:
            raise ValueError("the card's SCIF node queue pair is not connected to the host")
        return qp

    def _op_scif_send(self, args: dict) -> dict:
        qp = self._link()
        msgs = args.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, str) for m in msgs):
            raise ValueError('"messages" must be a list of hex strings')
        raw = [bytes.fromhex(m) for m in msgs]
        if any(len(m) != SCIFMSG_SIZE for m in raw):
            raise ValueError(f"every message is {SCIFMSG_SIZE} bytes (spec 8.2)")
        with qp._send_lock:
            for m in raw:
                if not qp.outbound.write(m):
                    raise ValueError("the host's node queue is full")
            qp.outbound.commit()
        self._log(f"{len(raw)} raw SCIF message(s) to the host")
        qp.doorbell()
        return {"sent": len(raw)}

    def _op_scif_write_ptr(self, args: dict) -> dict:
        qp = self._link()
        value = _int(args, "value", 0, 0xFFFFFFFF)
        with qp._send_lock:
            qp.outbound.write_ptr.store(value)
        self._log(f"SCIF write offset of the host's node queue set to {value:#x}")
        qp.doorbell()
        return {}

    def _op_cosm_send(self, args: dict) -> dict:
        cosm = self.kernel.cosm
        ep = cosm.ep if cosm is not None else None
        if ep is None:
            raise ValueError("the card's COSM client is not connected")
        data = _hex(args)
        with cosm._send_lock:
            ep.send(data, timeout=5.0)
        self._log(f"{len(data)} raw bytes on the COSM connection: {data[:48].hex()}")
        return {"sent": len(data)}
