"""CardDevices: the virtio devices one card's daemon serves -- from the configuration, and hot-plugged (spec 6.1).

What mpssd did besides the copying: open each device's host resource (the
tap, the pty, the image files), add the devices when the card reaches
"booting" -- console, then net, then block (spec 6.1) -- and serve them
until the card stops. Here:

* the host resources live as long as the daemon: a card reboot removes and
  re-adds the VOP devices (:meth:`micdrv.mic.MicDevice.stop_vop` removes
  them; :meth:`CardDevices.on_state` adds them again at the next
  "booting"), while the tap keeps its addresses, the pty its path (whoever
  is attached with ``micctl console`` stays attached) and the images stay
  open;
* a device whose resource cannot be opened is logged and left out; the
  others are served;
* block devices come and go while the card is online: :meth:`blk_add`
  opens an image and adds it at once if the card is booting or online
  (else at its next boot), :meth:`blk_remove` takes it away after the card
  let go of it (spec 5.5) and closes the image;
* the card's address reaches the card's network stack on its kernel command
  line, as MPSS passed it (spec 6.5): :meth:`kernel_cmdline`.

:meth:`blk_images` is the open images by device name, for the FUSE view
(``micdrv.fs``) that serves the same :class:`~backends.blk.BlockImage`\\ s.

Control socket commands (:meth:`commands`, merged into
:mod:`micdrv.service`): ``devices``; ``blk-add`` (``path``, ``readonly``,
``serial``); ``blk-remove`` (``name``); ``blk-list``; ``console``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

from backends.backend import Backend

from ..config import BlkConfig, CardConfig, Config
from ..cosm.msg import MicState
from ..jsonlines import RequestError
from .device import VopDevice, VopError

log = logging.getLogger(__name__)

READ_ONLY_COMMANDS = frozenset({"devices", "blk-list", "console"})
ORDER = ("console", "net", "blk")   # spec 6.1: console and net when booting, then block


@dataclass
class DeviceSlot:
    """One device this card serves: its kind, name, backend, and the VOP device while the card has it."""

    kind: str
    name: str
    backend: Backend
    config: object
    vop: VopDevice | None = None

    @property
    def attached(self) -> bool:
        return self.vop is not None and not self.vop.removed

    def status(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "state": self.vop.state if self.attached else "detached",
               "backend": self.backend.describe()}
        if self.attached:
            out["broken"] = self.vop.broken
        return out


def _netmask(host_address: str | None) -> str:
    if host_address is None:
        return "255.255.255.0"
    return str(ipaddress.ip_interface(host_address).network.netmask)


class CardDevices:
    """The devices of one card; ``vop`` is its :class:`~micdrv.vop.host.VopHost`."""

    def __init__(self, card: CardConfig, config: Config, vop, identity: str | None = None):
        self.card = card
        self.config = config
        self.vop = vop
        self.identity = identity or card.pci or card.name
        self.slots: list[DeviceSlot] = []
        self.errors: list[str] = []
        self._lock = threading.RLock()

    @classmethod
    def open(cls, card: CardConfig, config: Config, vop, identity: str | None = None) -> "CardDevices":
        """Open every configured device's host resource (console, net, blk order); failures are logged."""
        self = cls(card, config, vop, identity)
        for i, c in enumerate(card.console):
            self._open("console", f"console{i}" if i else "console", c)
        for i, c in enumerate(card.net):
            self._open("net", f"net{i}", c)
        for c in card.blk:
            self._open("blk", self._blk_name(), c)
        return self

    def _open(self, kind: str, name: str, cfg) -> DeviceSlot | None:
        try:
            backend = self._backend(kind, name, cfg)
        except Exception as e:
            msg = f"{self.card.name}: {kind} device {name}: {e}"
            log.error("%s; not served", msg)
            self.errors.append(msg)
            return None
        slot = DeviceSlot(kind, name, backend, cfg)
        with self._lock:
            self.slots.append(slot)
        log.info("%s: %s device %s: %s", self.card.name, kind, name, backend.describe())
        return slot

    def _backend(self, kind: str, name: str, cfg) -> Backend:
        if kind == "console":
            from backends.console import ConsoleBackend
            return ConsoleBackend.from_config(self.card.name, cfg, run_dir=self.config.settings.run_dir)
        if kind == "net":
            from backends.net import NetBackend
            b = NetBackend.from_config(self.card.name, cfg, identity=self.identity)
            b.name = name
            return b
        from backends.blk import BlkBackend
        return BlkBackend.from_config(cfg, name=name)

    def _blk_name(self) -> str:
        used = {s.name for s in self.slots}
        n = 0
        while f"blk{n}" in used:
            n += 1
        return f"blk{n}"

    # --- the card's kernel command line (spec 6.5) ---------------------------------------------------
    def kernel_cmdline(self, base: str) -> str:
        """``base`` plus MPSS's ``ifcfg=static;address,<card>;netmask,<mask>`` for the first net device."""
        if "ifcfg=" in base or not self.card.net:
            return base
        cfg = self.card.net[0]
        from backends.net import link
        try:
            eff = link.addresses(self.card.name, cfg.tap, cfg.address, cfg.card_address, cfg.bridge)
        except ValueError:
            return base
        if eff.card is None:
            return base
        word = f"ifcfg=static;address,{eff.card};netmask,{_netmask(eff.host)}"
        return f"{base} {word}".strip()

    # --- adding and removing with the card (spec 6.1, 5.3, 5.5) ---------------------------------------
    def on_state(self, dev) -> None:
        """COSM listener: a card that is booting (or online) gets every device it does not have yet."""
        if dev.state in (MicState.BOOTING, MicState.ONLINE):
            self.attach_all()

    def attach_all(self) -> None:
        with self._lock:
            pending = sorted((s for s in self.slots if not s.attached), key=lambda s: ORDER.index(s.kind))
            for s in pending:
                self._attach(s)

    def _attach(self, slot: DeviceSlot) -> bool:
        if not self.vop.started:
            return False
        try:
            slot.vop = self.vop.add(slot.backend, slot.name)
            return True
        except VopError as e:
            log.error("%s: adding %s: %s", self.card.name, slot.name, e)
            return False

    def blk_add(self, path: str, readonly: bool = False, serial: str | None = None) -> DeviceSlot:
        """Open an image and serve it; added now if the card is booting or online, else at its next boot."""
        with self._lock:
            for s in self.slots:
                if s.kind == "blk" and os.path.realpath(s.backend.image.path) == os.path.realpath(path):
                    raise RequestError(f"{path} is already {s.name}", errno="EEXIST")
            name = self._blk_name()
            from backends.blk import BlkBackend
            from backends.blk.image import ImageError
            try:
                backend = BlkBackend.from_config(BlkConfig(path=path, readonly=readonly, serial=serial), name=name)
            except (ImageError, ValueError, OSError) as e:
                raise RequestError(str(e), errno="EINVAL") from None
            slot = DeviceSlot("blk", name, backend, BlkConfig(path=path, readonly=readonly, serial=serial))
            self.slots.append(slot)
            self._attach(slot)
            log.info("%s: %s: %s added%s", self.card.name, name, path, "" if slot.attached else
                     " (served from the next boot)")
            return slot

    def blk_remove(self, name: str) -> None:
        """Take a block device away from the card (waits for the card to let go) and close its image."""
        with self._lock:
            slot = next((s for s in self.slots if s.kind == "blk" and
                         (s.name == name or s.backend.image.path == name)), None)
            if slot is None:
                raise RequestError(f"no block device {name!r}", errno="ENOENT")
            self.slots.remove(slot)
        if slot.attached:
            self.vop.remove(slot.vop)
        slot.backend.close()
        log.info("%s: %s removed", self.card.name, slot.name)

    def blk_images(self) -> dict:
        """The open block images by device name (``backends.blk.BlockImage``), for the FUSE view."""
        with self._lock:
            return {s.name: s.backend.image for s in self.slots if s.kind == "blk"}

    def console_path(self) -> str | None:
        with self._lock:
            for s in self.slots:
                if s.kind == "console":
                    return s.backend.pty.link or s.backend.path
        return None

    # --- what micctl shows ----------------------------------------------------------------------------
    def status(self) -> list[dict]:
        with self._lock:
            slots = list(self.slots)
        out = []
        for s in slots:
            st = s.status()
            st["counters"] = s.backend.counters()
            if s.attached:
                st["vop"] = self.vop.loop.call(s.vop.status)
            out.append(st)
        return out

    def commands(self) -> dict[str, Callable[[dict], dict]]:
        return {"devices": lambda req: {"devices": self.status(), "errors": list(self.errors),
                                        "vop": {"started": self.vop.started, "options": self.vop.options.describe()}},
                "blk-add": self._cmd_blk_add, "blk-remove": self._cmd_blk_remove,
                "blk-list": lambda req: {"blk": [self._blk_row(s) for s in list(self.slots) if s.kind == "blk"]},
                "console": self._cmd_console}

    @staticmethod
    def _blk_row(s: DeviceSlot) -> dict:
        d = s.backend.describe()
        return {"name": s.name, "path": d["path"], "readonly": d["readonly"], "serial": d["serial"],
                "capacity": d["capacity"], "state": s.vop.state if s.attached else "detached"}

    def _cmd_blk_add(self, req: dict) -> dict:
        path, readonly, serial = req.get("path"), req.get("readonly", False), req.get("serial")
        if not isinstance(path, str) or not path:
            raise RequestError('"path" must be the image file', errno="EINVAL")
        if not isinstance(readonly, bool) or (serial is not None and not isinstance(serial, str)):
            raise RequestError('"readonly" is true or false, "serial" a string', errno="EINVAL")
        slot = self.blk_add(os.path.abspath(path), readonly, serial)
        return self._blk_row(slot)

    def _cmd_blk_remove(self, req: dict) -> dict:
        name = req.get("name")
        if not isinstance(name, str):
            raise RequestError('"name" must be a block device name (micctl blk list)', errno="EINVAL")
        self.blk_remove(name)
        return {"name": name}

    def _cmd_console(self, req: dict) -> dict:
        path = self.console_path()
        if path is None:
            raise RequestError(f"{self.card.name} has no console device configured", errno="ENOENT")
        return {"path": path}

    def close(self) -> None:
        """Release every host resource (after the card stopped: the VOP devices are gone)."""
        with self._lock:
            slots, self.slots = self.slots, []
        for s in slots:
            try:
                s.backend.close()
            except Exception:
                log.exception("%s: closing %s", self.card.name, s.name)


__all__ = ["CardDevices", "DeviceSlot", "READ_ONLY_COMMANDS"]
