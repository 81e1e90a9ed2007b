"""Small card-side virtio drivers for the VOP transport tests, loaded into the simulator (``--import``).

Only the simulator installs them (:func:`install_in_simulator`); importing the module elsewhere (for
:func:`pattern`) registers nothing.

They replace the card OS's own console and block drivers in the test's
simulator process only, and do just enough to move chosen bytes through
the transport with chosen buffer placements, so the host's copy paths
(DMA aligned, DMA widened from an unaligned address, BAR0) are each hit on
purpose and checked byte for byte:

* :class:`EchoConsole` (type 3): posts receive buffers and sends every byte
  it receives straight back. Switch ``send`` transmits given bytes split
  over ``parts`` descriptors.
* :class:`BlkProbe` (type 2): reads and writes sectors on request (switches
  ``write`` / ``read`` / ``get_id`` / ``flush`` / ``capacity``), the data a
  seeded pseudo-random pattern, in ``segments`` descriptors starting
  ``offset`` bytes past a 64-byte boundary; ``burst`` posts ``count`` reads
  of ``length`` bytes together, with one kick.

Switches arrive through the simulator's control socket:
``{"cmd": "vop", "switch": "driver", "device": "blk", "op": "write", ...}``.

Placement is read at every probe from the JSON file ``$VOPTEST_CONFIG``
(absent: the defaults): ``{"rx": [count, size, offset], "tx_offset": n,
"ring": "offered" | "none"}`` -- receive buffers ``offset`` bytes past a
64-byte boundary, transmit buffers likewise, and which ring features
(INDIRECT_DESC, EVENT_IDX) to accept. A test writes it, then adds a device.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading

from micdrv.sim.cardos import virtio_bus
from micdrv.virtio import blk as B
from micdrv.virtio.ring import VringError
from micdrv.virtio.device import (RING_FEATURES, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
                                  VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE)

WAIT = 20.0
OK_STATUS = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def config() -> dict:
    path = os.environ.get("VOPTEST_CONFIG")
    cfg = {"rx": [16, 4096, 0], "tx_offset": 0, "ring": "offered"}
    if path and os.path.exists(path):
        with open(path) as f:
            cfg.update(json.load(f))
    return cfg


def _ring_features(offered: int) -> int:
    return 0 if config()["ring"] == "none" else offered & RING_FEATURES


def _bad_ring_is_logged(callback):
    """A queue callback that records a BAD_RING (a used entry the driver never posted: a hostile test wrote
    the ring) in ``bad_ring`` instead of raising out of the card's interrupt handler."""
    def run(self, vq) -> None:
        try:
            callback(self, vq)
        except VringError as e:
            self.bad_ring = str(e)
    return run


def _place(dev, size: int, offset: int) -> tuple[int, int]:
    """Card memory for ``size`` bytes starting ``offset`` past a 64-byte boundary: (address, allocation)."""
    base = dev.alloc(size + offset + 64, 64)
    return base + offset, base


class EchoConsole(virtio_bus.VirtioDriver):
    device_id = VIRTIO_ID_CONSOLE
    name = "test-echo-console"
    bad_ring: str | None = None

    def __init__(self):
        cfg = config()
        self.rx_count, self.rx_size, self.rx_offset = (int(x) for x in cfg["rx"])
        self.tx_offset = int(cfg["tx_offset"])
        self.lock = threading.Lock()
        self.dev = None
        self.rx = self.tx = None
        self.counters = dict.fromkeys(("rx_bytes", "rx_chains", "tx_bytes", "tx_chains", "interrupts"), 0)
        self._tx_allocs: dict[int, tuple[int, int]] = {}
        self._rx_allocs: list[tuple[int, int]] = []

    def probe(self, dev) -> None:
        self.dev = dev
        dev.finalize_features(_ring_features(dev.host_features()))
        self.rx, self.tx = dev.find_vqs([self._rx_done, self._tx_done])
        with self.lock:
            for _ in range(self.rx_count):
                addr, base = _place(dev, self.rx_size, self.rx_offset)
                self._rx_allocs.append((base, self.rx_size + self.rx_offset + 64))
                self.rx.ring.add([], [(addr, self.rx_size)], token=addr)
            self.rx.kick()
        dev.set_status(OK_STATUS)

    @_bad_ring_is_logged
    def _rx_done(self, vq) -> None:
        with self.lock:
            self.counters["interrupts"] += 1
            got = vq.ring.get_all_used()
            for addr, n in got:
                data = self.dev.memory.read(addr, n)
                self.counters["rx_bytes"] += n
                self.counters["rx_chains"] += 1
                if n:
                    self._send([data], self.tx_offset)
                vq.ring.add([], [(addr, self.rx_size)], token=addr)
            if got:
                vq.kick()
                self.tx.kick()

    def _send(self, parts: list[bytes], offset: int) -> None:
        out = []
        for p in parts:
            addr, base = _place(self.dev, len(p), offset)
            self.dev.memory.write(addr, p)
            out.append((addr, len(p)))
            self._tx_allocs[addr] = (base, len(p) + offset + 64)
        head = self.tx.ring.add(out, [], token=tuple(a for a, _n in out))
        self.counters["tx_bytes"] += sum(len(p) for p in parts)
        self.counters["tx_chains"] += 1
        return head

    @_bad_ring_is_logged
    def _tx_done(self, vq) -> None:
        with self.lock:
            for addrs, _n in vq.ring.get_all_used():
                for a in addrs:
                    base, size = self._tx_allocs.pop(a)
                    self.dev.free(base, size)

    def control(self, op: str = "stats", **args) -> dict:
        if op == "burst":
            # ``count`` chains of ``size`` bytes, made available together, then one kick
            n, size = int(args.get("count", 8)), int(args.get("size", 64))
            with self.lock:
                for i in range(n):
                    self._send([bytes([0x41 + i % 26]) * size], int(args.get("offset", 0)))
                kicked = self.tx.kick()
            return {"kicked": kicked, "kicks": self.tx.kicks}
        if op == "send":
            data = bytes.fromhex(args["data"])
            parts = max(1, int(args.get("parts", 1)))
            step = -(-len(data) // parts)
            with self.lock:
                self._send([data[i:i + step] for i in range(0, len(data), step)], int(args.get("offset", 0)))
                self.tx.kick()
            return {}
        return dict(self.counters)

    def remove(self) -> None:
        with self.lock:
            self.dev.reset()
            for base, size in self._rx_allocs:
                self.dev.free(base, size)
            for base, size in self._tx_allocs.values():
                self.dev.free(base, size)
            self._rx_allocs, self._tx_allocs = [], {}

    def status(self) -> dict:
        return dict(self.counters)


class BlkProbe(virtio_bus.VirtioDriver):
    device_id = VIRTIO_ID_BLOCK
    name = "test-blk-probe"
    bad_ring: str | None = None

    WANT = (1 << B.VIRTIO_BLK_F_SEG_MAX) | (1 << B.VIRTIO_BLK_F_BLK_SIZE) | (1 << B.VIRTIO_BLK_F_FLUSH) | \
        (1 << B.VIRTIO_BLK_F_RO)

    def __init__(self):
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)
        self.finished: dict[int, int] = {}
        self.dev = None
        self.vq = None
        self.config_changes = 0
        self.capacity = 0
        self.requests = 0

    def probe(self, dev) -> None:
        self.dev = dev
        offered = dev.host_features()
        dev.finalize_features(offered & self.WANT | _ring_features(offered))
        self.capacity = int.from_bytes(dev.read_config(0, 8), "little")
        self.vq, = dev.find_vqs([self._done])
        dev.set_status(OK_STATUS)

    @_bad_ring_is_logged
    def _done(self, vq) -> None:
        with self.lock:
            for token, n in vq.ring.get_all_used():
                self.finished[token] = n
            self.done.notify_all()

    def config_changed(self) -> None:
        self.config_changes += 1
        self.capacity = int.from_bytes(self.dev.read_config(0, 8), "little")

    def _request(self, type_: int, sector: int, out: list[tuple[int, int]], in_: list[tuple[int, int]]) -> int:
        """One request; returns the status byte."""
        dev = self.dev
        hdr, hbase = _place(dev, 16, 0)
        st, sbase = _place(dev, 1, 0)
        dev.memory.write(hdr, B.OUTHDR.pack(type_, 0, sector))
        dev.memory.write(st, b"\xff")
        with self.lock:
            self.requests += 1
            token = self.requests
            self.vq.ring.add([(hdr, 16), *out], [*in_, (st, 1)], token=token)
            self.vq.kick()
            if not self.done.wait_for(lambda: token in self.finished, WAIT):
                raise TimeoutError(f"request {token} (type {type_}) not completed within {WAIT} s")
            del self.finished[token]
        status = dev.memory.read(st, 1)[0]
        dev.free(hbase, 80)
        dev.free(sbase, 65)
        return status

    def _segments(self, length: int, segments: int, offset: int) -> tuple[list[tuple[int, int]], int, int]:
        addr, base = _place(self.dev, length, offset)
        step = -(-length // segments)
        return [(addr + i, min(step, length - i)) for i in range(0, length, step)], addr, base

    def control(self, op: str = "stats", **args) -> dict:
        dev = self.dev
        sector = int(args.get("sector", 0))
        length = int(args.get("length", 4096))
        segments = max(1, int(args.get("segments", 1)))
        offset = int(args.get("offset", 0))
        if op == "write":
            data = pattern(int(args.get("seed", 1)), length)
            segs, addr, base = self._segments(length, segments, offset)
            dev.memory.write(addr, data)
            status = self._request(B.VIRTIO_BLK_T_OUT, sector, segs, [])
            dev.free(base, length + offset + 64)
            return {"status": status, "sha256": hashlib.sha256(data).hexdigest()}
        if op == "read":
            segs, addr, base = self._segments(length, segments, offset)
            dev.memory.write(addr, b"\x5a" * length)
            status = self._request(B.VIRTIO_BLK_T_IN, sector, [], segs)
            data = dev.memory.read(addr, length)
            dev.free(base, length + offset + 64)
            out = {"status": status, "sha256": hashlib.sha256(data).hexdigest()}
            if length <= 4096:
                out["data"] = data.hex()
            return out
        if op == "burst":
            return self._burst(sector, length, int(args.get("count", 4)))
        if op == "get_id":
            buf, base = _place(dev, B.VIRTIO_BLK_ID_BYTES, 0)
            status = self._request(B.VIRTIO_BLK_T_GET_ID, 0, [], [(buf, B.VIRTIO_BLK_ID_BYTES)])
            ident = dev.memory.read(buf, B.VIRTIO_BLK_ID_BYTES)
            dev.free(base, B.VIRTIO_BLK_ID_BYTES + 64)
            return {"status": status, "id": ident.rstrip(b"\0").decode("ascii", "replace")}
        if op == "flush":
            return {"status": self._request(B.VIRTIO_BLK_T_FLUSH, 0, [], [])}
        if op == "capacity":
            return {"capacity": self.capacity, "config_changes": self.config_changes}
        return self.status()

    def _burst(self, sector: int, length: int, count: int) -> dict:
        """``count`` reads of ``length`` bytes from ``sector`` on, made available together, then one kick."""
        dev = self.dev
        reqs = []
        for i in range(count):
            hdr, hbase = _place(dev, 16, 0)
            buf, bbase = _place(dev, length + 1, 0)            # data, then the status byte
            dev.memory.write(hdr, B.OUTHDR.pack(B.VIRTIO_BLK_T_IN, 0, sector + i * length // 512))
            dev.memory.write(buf + length, b"\xff")
            reqs.append((hdr, hbase, buf, bbase))
        with self.lock:
            tokens = []
            for hdr, _hb, buf, _bb in reqs:
                self.requests += 1
                tokens.append(self.requests)
                self.vq.ring.add([(hdr, 16)], [(buf, length), (buf + length, 1)], token=self.requests)
            self.vq.kick()
            if not self.done.wait_for(lambda: all(t in self.finished for t in tokens), WAIT):
                raise TimeoutError(f"a burst of {count} reads not completed within {WAIT} s")
            for t in tokens:
                del self.finished[t]
        out = []
        for _hdr, hbase, buf, bbase in reqs:
            out.append({"status": dev.memory.read(buf + length, 1)[0],
                        "sha256": hashlib.sha256(dev.memory.read(buf, length)).hexdigest()})
            dev.free(hbase, 80)
            dev.free(bbase, length + 65)
        return {"requests": out}

    def remove(self) -> None:
        self.dev.reset()

    def status(self) -> dict:
        return {"capacity": self.capacity, "config_changes": self.config_changes, "requests": self.requests,
                "bad_ring": self.bad_ring}


def _register() -> None:
    virtio_bus.register(VIRTIO_ID_CONSOLE, EchoConsole)
    virtio_bus.register(VIRTIO_ID_BLOCK, BlkProbe)


def install_in_simulator() -> None:
    """Called by ``micdrv sim --import tests.vop_card_drivers``: these drivers instead of the card OS's own.

    The card kernel registers its drivers at every boot (:func:`micdrv.sim.cardos.drivers.install`), so
    ours go in again right after. Importing this module anywhere else changes nothing.
    """
    from micdrv.sim.cardos import drivers as card_drivers
    kernel_install = card_drivers.install

    def install(kernel):
        result = kernel_install(kernel)
        _register()
        return result
    card_drivers.install = install
    _register()
