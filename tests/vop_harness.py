"""Harness for the VOP tests: the simulated card in its own process, MicDevice booting it, the test drivers.

:class:`VopSim` is the simulator process with :mod:`tests.vop_card_drivers`
imported into its card OS and ``$VOPTEST_CONFIG`` pointing at a file the
test writes (:meth:`VopSim.configure`) before it adds a device. :class:`Rig`
is one boot: :class:`~micdrv.mic.MicDevice` opened over vfio-user, the card
reset and started, the VOP host ready for :meth:`Rig.add`. The simulator's
control socket (never used by the driver) shows what the card's VOP driver
saw and flips its test switches. Every wait has a timeout; nothing here
measures time.
"""

from __future__ import annotations

import json
import os
import select
import tty
from pathlib import Path

from backends.console import ConsoleBackend
from micdrv.cosm.hwops import BootSpec
from micdrv.mic import MicDevice
from micdrv.sim.cardos.image import build_image
from micdrv.vop.host import VopOptions
from tests.sim_harness import SimProcess, wait_for

WAIT = 20.0   # generous: a 2-core machine running several suites


class VopSim:
    """``python -m micdrv.sim`` with the test drivers; :attr:`firmware` is a card OS image to boot."""

    def __init__(self, tmp: Path, *args: str):
        self.config_path = tmp / "voptest.json"
        self.configure()
        self.firmware = tmp / "uos.img"
        self.firmware.write_bytes(build_image())
        old = os.environ.get("VOPTEST_CONFIG")
        os.environ["VOPTEST_CONFIG"] = str(self.config_path)
        try:
            self.sim = SimProcess("--import", "tests.vop_card_drivers", *args)
        finally:
            if old is None:
                del os.environ["VOPTEST_CONFIG"]
            else:
                os.environ["VOPTEST_CONFIG"] = old
        self.control = self.sim.control

    def configure(self, rx=(16, 4096, 0), tx_offset: int = 0, ring: str = "offered") -> None:
        """How the next probed test driver places its buffers (see tests.vop_card_drivers)."""
        self.config_path.write_text(json.dumps({"rx": list(rx), "tx_offset": tx_offset, "ring": ring}))

    def record(self) -> dict | None:
        return self.control("os")["record"]

    def vop(self) -> dict:
        rec = self.record()
        assert rec is not None and "vop" in rec["devices"], rec
        return rec["devices"]["vop"]

    def card_device(self, offset: int) -> dict | None:
        return next((d for d in self.vop()["devices"] if d["offset"] == offset), None)

    def switch(self, switch: str, **args) -> dict:
        return self.control("vop", switch=switch, **args)

    def driver(self, device, op: str, **args) -> dict:
        return self.control("vop", switch="driver", device=device, op=op, **args)

    def log(self) -> str:
        return self.sim.log()

    def close(self) -> None:
        rc = self.sim.stop()
        log = self.sim.log()
        self.sim.kill()
        assert rc == 0, log
        assert "Traceback" not in log, log


class Rig:
    """One boot of the card under MicDevice, VOP started, no devices yet."""

    def __init__(self, vs: VopSim, options: VopOptions | None = None, cmdline: str = ""):
        self.vs = vs
        self.mic = MicDevice.open(vs.sim.connect(), mic_id=0, reset_delay=0.0, scif_poll_interval=0.05,
                                  scif_timeout=5.0, vop=options)
        self.backends = []
        try:
            self.mic.reset()
            wait_for(self.mic.ready, "the card to become ready", WAIT, 0.005)
            self.mic.start(BootSpec(self.vs.firmware, cmdline=cmdline))
            wait_for(lambda: (r := vs.record()) and "vop" in r["devices"] and r["devices"]["vop"]["config_db"]
                     is not None, "the card's VOP driver to publish its config doorbell", WAIT)
        except BaseException:
            self.close()
            raise

    @property
    def vop(self):
        return self.mic.vop

    def add(self, backend, name: str | None = None, wait: bool = True):
        """Add ``backend``'s device; with ``wait``, until the host has activated it."""
        self.backends.append(backend)
        dev = self.vop.add(backend, name)
        if wait:
            wait_for(lambda: dev.state == "active" or dev.broken, f"{dev.name} to become active", WAIT)
            assert dev.state == "active", dev.status()
            # The host activates at the card's DRIVER_OK, a moment before the card's probe returns; a test that
            # resets or removes the device in that moment races the probe (which sets DRIVER_OK again after it).
            off = dev.entry.offset
            wait_for(lambda: (self.vs.card_device(off) or {}).get("state") == "probed", f"the card's probe of "
                     f"{dev.name}", WAIT)
        return dev

    def console(self, **kw):
        """A console device on a fresh pty, and the test's end of that pty (raw)."""
        con = ConsoleBackend.open()
        dev = self.add(con, **kw)
        fd = os.open(con.path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        os.set_blocking(fd, False)
        return dev, fd

    def close(self) -> None:
        dev = self.mic.dev
        try:
            self.mic.close()
        finally:
            dev.close()
            for b in self.backends:
                b.close()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        select.select([], [fd], [], WAIT)
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        view = view[n:]


def read_exact(fd: int, n: int, timeout: float = WAIT) -> bytes:
    """``n`` bytes from ``fd`` (non-blocking), or what arrived when ``timeout`` ran out."""
    import time
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if not select.select([fd], [], [], min(left, 0.5))[0]:
            continue
        try:
            out += os.read(fd, n - len(out))
        except BlockingIOError:
            continue
    return bytes(out)


def echo(fd: int, data: bytes) -> bytes:
    """Write ``data`` to the console and read back as many bytes (the echo driver sends them back)."""
    got = bytearray()
    view = memoryview(data)
    import time
    deadline = time.monotonic() + WAIT
    while (view or len(got) < len(data)) and time.monotonic() < deadline:
        r, w, _ = select.select([fd], [fd] if view else [], [], 0.5)
        if w:
            try:
                view = view[os.write(fd, view[:4096]):]
            except BlockingIOError:
                pass
        if r:
            try:
                got += os.read(fd, 65536)
            except BlockingIOError:
                pass
    return bytes(got)
