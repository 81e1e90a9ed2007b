"""The card kernel's virtio drivers: registered with the bus for one kernel, and what they share.

:func:`install` is the card kernel's ``module_init`` for its three virtio
drivers: it makes the kernel's :class:`CardDrivers` and registers a factory
per device ID with :mod:`.virtio_bus`, so whichever transport finds a
device -- VOP (spec 5.4) or the direct transport (:mod:`.direct`) --
gets a driver bound to this kernel:

====================  =========  ===============================================
device ID             driver     what the kernel gets
====================  =========  ===============================================
1 (net)               :mod:`.net`      ``eth0``, ``eth1``, ... on the IP stack
2 (block)             :mod:`.blk`      ``vda``, ``vdb``, ... (lowest free letter)
3 (console)           :mod:`.console`  ``hvc0``, ... each running a shell
====================  =========  ===============================================

The registry in :mod:`.virtio_bus` is one per process; a simulator process
runs one card, and a rebooted card's new kernel installs its own factories
over the old ones.

:class:`CardDrivers` holds what the drivers share: the IP stack (its
address from the command line, :mod:`.ip_config`), the UDP echo service on
port 7 and the benchmark sinks, the device names, the hostname. Every bound
driver is an entry of the kernel's device list (``name``, ``shutdown``,
``abandon``, ``status``) while it is bound, so the control socket's ``os``
record shows it under its name (the interface with the address also shows
the stack: address, ARP cache, counters, echo and sinks), and a power-off
shuts it down.
:meth:`CardDrivers.run` runs a shell command line for the control socket
(``{"cmd": "kernel", "action": "shell", "message": "udp sink 9000"}``).
"""

from __future__ import annotations

import threading
from typing import Protocol

from micdrv.virtio.device import VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET

from . import ip_config, virtio_bus
from .blk import BlkDriver
from .console import ConsoleDriver
from .ip import IpStack
from .ip_apps import UdpEcho, UdpSink
from .net import NetDriver
from .shell_commands import Commands


class CardKernel(Protocol):
    """What the drivers use of the card kernel (:class:`~.kernel.Kernel` has all of it)."""

    cmdline: str
    started: float

    def printk(self, text: str) -> None: ...
    def add_device(self, dev) -> None: ...
    def remove_device(self, dev) -> None: ...
    def publish(self) -> None: ...
    def dmesg(self) -> str: ...
    def time(self) -> float: ...
    def poweroff(self) -> None: ...
    def halt(self) -> None: ...
    def reboot(self) -> None: ...
    def panic(self, message: str) -> None: ...


class KernelEntry:
    """A bound driver as an entry of the kernel's device list, under its device name (eth0, vda, hvc0)."""

    def __init__(self, name: str, target):
        self.name = name
        self.target = target

    def shutdown(self) -> None:
        self.target.shutdown()

    def abandon(self) -> None:
        self.target.abandon()

    def join(self, timeout: float) -> None:
        join = getattr(self.target, "join", None)
        if join is not None:
            join(timeout)

    def status(self) -> dict:
        return self.target.status()


def _letters(i: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa: the suffixes of Linux's ``virtblk_name_format``."""
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(ord("a") + r) + out
    return out


class CardDrivers:
    """One kernel's virtio drivers and the state they share."""

    def __init__(self, kernel: CardKernel):
        self.kernel = kernel
        bp = getattr(kernel, "bootparam", None)
        self.node = bp.node_id if bp is not None else 1
        self.hostname = f"mic{max(self.node - 1, 0)}"
        image = getattr(kernel, "image", None)
        words = (image.builtin_cmdline.split() if image is not None else []) + kernel.cmdline.split()
        self.ip_config = ip_config.from_cmdline(words, self.node)
        for w in self.ip_config.warnings:
            kernel.printk(f"IPv4: {w}")
        self.stack = IpStack(self.ip_config, kernel.printk)
        self.echo: UdpEcho | None = UdpEcho(self.stack)
        self.sinks: dict[int, UdpSink] = {}
        self.netdevs: list[NetDriver] = []
        self.disks: dict[str, BlkDriver] = {}
        self.consoles: list[ConsoleDriver] = []
        self._names: dict[str, object] = {}
        self._entries: dict[int, KernelEntry] = {}
        self._lock = threading.Lock()

    # --- names -----------------------------------------------------------------------------------
    def _claim(self, fmt, owner) -> str:
        with self._lock:
            i = 0
            while fmt(i) in self._names:
                i += 1
            self._names[fmt(i)] = owner
            return fmt(i)

    def _release(self, name: str, owner) -> None:
        with self._lock:
            if self._names.get(name) is owner:
                del self._names[name]

    def claim_ifname(self, dev: NetDriver) -> str:
        return self._claim(lambda i: f"eth{i}", dev)

    def release_ifname(self, dev: NetDriver) -> None:
        self._release(dev.ifname, dev)

    def claim_disk(self, disk: BlkDriver) -> str:
        return self._claim(lambda i: f"vd{_letters(i)}", disk)

    def claim_tty(self, con: ConsoleDriver) -> str:
        return self._claim(lambda i: f"hvc{i}", con)

    # --- bound / unbound -------------------------------------------------------------------------
    def _bound(self, dev, name: str) -> None:
        entry = KernelEntry(name, dev)
        self._entries[id(dev)] = entry
        self.kernel.add_device(entry)
        self.kernel.publish()

    def _unbound(self, dev) -> None:
        entry = self._entries.pop(id(dev), None)
        if entry is not None:
            self.kernel.remove_device(entry)
            self.kernel.publish()

    def net_up(self, dev: NetDriver) -> None:
        self.netdevs.append(dev)
        self.stack.attach(dev)
        self._bound(dev, dev.ifname)

    def net_down(self, dev: NetDriver) -> None:
        self.stack.detach(dev)
        if dev in self.netdevs:
            self.netdevs.remove(dev)
        self._unbound(dev)

    def disk_up(self, disk: BlkDriver) -> None:
        self.disks[disk.disk] = disk
        self._bound(disk, disk.disk)

    def disk_down(self, disk: BlkDriver) -> None:
        if self.disks.get(disk.disk) is disk:
            del self.disks[disk.disk]
        self._release(disk.disk, disk)
        self._unbound(disk)

    def console_up(self, con: ConsoleDriver) -> None:
        self.consoles.append(con)
        self._bound(con, con.tty)

    def console_down(self, con: ConsoleDriver) -> None:
        if con in self.consoles:
            self.consoles.remove(con)
        self._release(con.tty, con)
        self._unbound(con)

    def changed(self) -> None:
        """A driver's state changed (broken, resized): republish the record."""
        self.kernel.publish()

    # --- the control socket's shell ----------------------------------------------------------------
    def run(self, line: str) -> tuple[bool, str]:
        """Run one shell command line; (succeeded, its output)."""
        lines: list[str] = []
        ok = Commands(self).execute(line, lines.append)
        return ok, "\n".join(lines) + ("\n" if lines else "")

    def status(self) -> dict:
        """The stack's part of the record (under the interface that carries the address)."""
        return {"hostname": self.hostname, "ip": self.stack.status(),
                "echo": self.echo.status() if self.echo else None,
                "sinks": {str(p): s.status() for p, s in self.sinks.items()}}


def install(kernel: CardKernel) -> CardDrivers:
    """Register the net, block and console drivers for ``kernel`` (``register_virtio_driver`` x 3)."""
    drivers = CardDrivers(kernel)
    virtio_bus.register(VIRTIO_ID_NET, lambda: NetDriver(drivers))
    virtio_bus.register(VIRTIO_ID_BLOCK, lambda: BlkDriver(drivers))
    virtio_bus.register(VIRTIO_ID_CONSOLE, lambda: ConsoleDriver(drivers))
    return drivers
