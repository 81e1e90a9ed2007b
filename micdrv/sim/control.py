"""The simulator's control socket: fault hooks and counters for tests and diagnostics (never the driver).

A UNIX stream socket speaking JSON lines: one request object per line, one
reply object per line, in order. Every reply has ``"ok"``; a failed request
gets ``{"ok": false, "error": "..."}`` and the connection stays usable.
Several clients may be connected at once. Numbers are plain JSON integers.

================================================ ===================================================
request                                           reply (besides ``"ok": true``)
================================================ ===================================================
``{"cmd": "ping"}``                               ``"pid"``
``{"cmd": "status"}``                             ``"status"``: state (resetting/ready/running/hung),
                                                  post_code, spad2, device_id, revision,
                                                  memory_size, apic_id, download_addr, ready_delay,
                                                  os_starts, threads
``{"cmd": "counters"}``                           ``"counters"``: bus (faults, recent), interrupts
                                                  (raised per source, msix per vector, msi, intx,
                                                  dropped, pba, mode, sicr/sice/siac), doorbells
                                                  (host_rung per SDBIC, rung per card doorbell,
                                                  unhandled, handlers), bootstrap (state, resets,
                                                  resets_failed, kicks, kicks_ignored,
                                                  last_ignored), dma (dcr, channels[8]: enabled,
                                                  owner, stalled, dhpr, dtpr, dcherr, error_names,
                                                  errors, last_error, descriptors, bytes,
                                                  inline_batches), registers (unmapped_reads/writes)
``{"cmd": "os"}``                                 ``"record"``: the card OS's record now (or what it
                                                  last published), or null
``{"cmd": "kernel", "action": A,                  a test switch of the running card OS: ``panic``
  "message": text}``                              (with ``message``), ``hang``, ``poweroff``,
                                                  ``halt``, ``reboot``; ``"state"``: the kernel's
``{"cmd": "vop", "switch": S, "device": D,       a test switch of the card's VOP driver
  ...}``                                          (micdrv.sim.cardos.vop): ``storm``, ``bad_desc``,
                                                  ``used_address``, ``h2c_db``, ``driver``, ``rescan``
``{"cmd": "hostile", "op": O, ...}``              the card OS turned hostile (micdrv.sim.cardos.hostile):
                                                  ``page_read``, ``page_write``, ``vring_write``,
                                                  ``kick``, ``doorbell``, ``scratch``,
                                                  ``scif_send``, ``scif_write_ptr``, ``cosm_send``
``{"cmd": "ring", "db": 0..3}``                   the card rings host doorbell db (an SDBIC write
                                                  through the card's register window)
``{"cmd": "stall", "channel": 0..7,               stall (true) or release (false) a DMA channel
  "stalled": true|false}``
``{"cmd": "fail_next_reset"}``                    the next reset never becomes ready
``{"cmd": "drop_interrupt", "source": 0..31,      the next ``count`` (default 1) messages of that
  "count": n}``                                   interrupt source are lost
``{"cmd": "card_read", "addr": A, "length": n}``  ``"data"``: hex; a card-side access as card
                                                  software would make it (faults: ok false,
                                                  ``"fault": true``)
``{"cmd": "card_write", "addr": A, "data": hex}`` likewise
================================================ ===================================================
"""

from __future__ import annotations

import logging
import os

from micdrv.jsonlines import JsonLinesServer, PeerCred, RequestError
from micdrv.x100 import regs

from .bus import CardFault
from .card import X100Card

log = logging.getLogger(__name__)

MAX_CARD_ACCESS = 1 << 20  # bytes per card_read / card_write


class ControlServer:
    """Serve the control protocol for ``card`` on ``path`` (JSON lines, :mod:`micdrv.jsonlines`)."""

    def __init__(self, card: X100Card, path: str):
        self.card = card
        self.path = path
        self._commands = {
            "ping": self._ping, "status": self._status, "counters": self._counters, "os": self._os,
            "kernel": self._kernel, "vop": self._vop, "hostile": self._hostile,
            "ring": self._ring, "stall": self._stall, "fail_next_reset": self._fail_next_reset,
            "drop_interrupt": self._drop_interrupt, "card_read": self._card_read, "card_write": self._card_write,
        }
        # Owner only: the fault hooks make the card misbehave, and the daemon that started the card is root.
        self._server = JsonLinesServer(path, self._handle, mode=0o600, name="sim control")

    def start(self) -> None:
        self._server.start()

    def close(self) -> None:
        self._server.close()

    def handle_line(self, line: bytes) -> dict:
        """One request line, answered as the socket would (for tests without a socket)."""
        return self._server.handle_line(line, PeerCred(os.getpid(), os.getuid(), os.getgid()))

    def _handle(self, req: dict, peer: PeerCred) -> dict:
        fn = self._commands.get(req["cmd"])
        if fn is None:
            raise RequestError(f"unknown command {req['cmd']!r}; one of {', '.join(self._commands)}")
        try:
            return fn(req)
        except CardFault as e:
            raise RequestError(str(e), fault=True) from None

    # --- commands ------------------------------------------------------------------------------
    @staticmethod
    def _int(req: dict, key: str, lo: int, hi: int, default: int | None = None) -> int:
        value = req.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise RequestError(f'"{key}" must be an integer in {lo}..{hi}')
        return value

    def _ping(self, req: dict) -> dict:
        return {"pid": os.getpid()}

    def _status(self, req: dict) -> dict:
        return {"status": self.card.status()}

    def _counters(self, req: dict) -> dict:
        return {"counters": self.card.counters()}

    def _os(self, req: dict) -> dict:
        return {"record": self.card.os_status()}

    def _kernel(self, req: dict) -> dict:
        action, message = req.get("action"), req.get("message", "")
        if not isinstance(action, str) or not isinstance(message, str):
            raise RequestError('"action" (and "message", if given) must be strings')
        return self.card.os_control(action, **({"message": message} if message else {}))

    def _vop(self, req: dict) -> dict:
        return self._os_switch(req, "vop", "switch")

    def _hostile(self, req: dict) -> dict:
        return self._os_switch(req, "hostile", "op")

    def _os_switch(self, req: dict, action: str, key: str) -> dict:
        """A card OS switch named by ``req[key]``, the rest of ``req`` its arguments."""
        args = {k: v for k, v in req.items() if k != "cmd"}
        if not isinstance(args.get(key), str):
            raise RequestError(f'"{key}" must be a string')
        try:
            return self.card.os_control(action, **args) or {}
        except (ValueError, KeyError, TypeError, IndexError) as e:   # a switch asked for what is not there
            raise RequestError(f"{action} {key} {args[key]}: {e}") from None

    def _ring(self, req: dict) -> dict:
        db = self._int(req, "db", 0, regs.SDBIC_COUNT - 1)
        self.card.bus.write32(regs.CARD_MMIO_BASE + regs.sdbic(db), regs.SDBIC_DBREQ)
        return {}

    def _stall(self, req: dict) -> dict:
        ch = self._int(req, "channel", 0, regs.DMA_NUM_CHANNELS - 1)
        stalled = req.get("stalled", True)
        if not isinstance(stalled, bool):
            raise RequestError('"stalled" must be true or false')
        self.card.dma_engine.channels[ch].stall(stalled)
        return {}

    def _fail_next_reset(self, req: dict) -> dict:
        self.card.bootstrap.fail_next_reset()
        return {}

    def _drop_interrupt(self, req: dict) -> dict:
        source = self._int(req, "source", 0, regs.NUM_INTR_SOURCES - 1)
        count = self._int(req, "count", 0, 1 << 20, default=1)
        self.card.interrupts.drop_next(source, count)
        return {}

    def _card_read(self, req: dict) -> dict:
        addr = self._int(req, "addr", 0, (1 << 64) - 1)
        length = self._int(req, "length", 1, MAX_CARD_ACCESS)
        return {"data": self.card.bus.read(addr, length).hex()}

    def _card_write(self, req: dict) -> dict:
        addr = self._int(req, "addr", 0, (1 << 64) - 1)
        data = req.get("data")
        if not isinstance(data, str):
            raise RequestError('"data" must be a hex string')
        raw = bytes.fromhex(data)
        if not 0 < len(raw) <= MAX_CARD_ACCESS:
            raise RequestError(f"card_write of 1..{MAX_CARD_ACCESS} bytes")
        self.card.bus.write(addr, raw)
        return {}
