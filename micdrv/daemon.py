"""micdrv: the daemon for one card.

::

    micdrv --device 0000:03:00.0     a card bound to vfio-pci (kernel VFIO)
    micdrv --vfio-user PATH          a device model behind a vfio-user socket
    micdrv --simulate                start a simulated X100 (``micdrv sim``) and drive it
    micdrv sim ...                   run only the simulated card (see ``micdrv sim --help``)

Options: ``--config PATH`` (default /etc/micdrv/micdrv.toml), ``--name micN``
(default: the configured card with that PCI address, else mic0), ``--run-dir``
(overrides the configuration's), ``--boot`` (boot the card once up, as
``boot_on_start``), ``--probe`` (print what the device is and exit).

The daemon probes the card (:class:`micdrv.mic.MicDevice`), serves its
control socket ``<run_dir>/<card>.sock`` (:mod:`micdrv.service`) and its
FUSE tree ``<fuse_dir>/<card>`` (:mod:`micdrv.fs`), and runs
until SIGTERM, SIGINT or SIGHUP; on the way out it stops and resets a started card,
as the kernel did when its driver was removed. A card that a killed daemon had started
(``<run_dir>/<card>.started``, :class:`micdrv.service.StartedRecord`) is reset
before anything is mapped for it: the daemon never reattaches. Logs go to stderr (journald).
Exit status: 0 after a clean stop, 1 when the card cannot be driven (or the
daemon is not run as root), 2 for a usage or configuration error. Each
error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path

from . import config as configmod
from .pci import BAR0, BAR4, PciDevice, PciError
from .pci.device import PCI_DEVICE_ID, PCI_REVISION_ID, PCI_VENDOR_ID
from .x100 import X100Error, ids
from .x100.card import SILICON_RESET_DELAY

log = logging.getLogger("micdrv")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
# --simulate: the simulated card is ready a fraction of a second after a reset, so neither the
# silicon's 1 s pause nor 1 s between ready polls (spec 2.5) is needed.
SIMULATED_RESET_DELAY = 0.05
SIMULATED_RESET_INTERVAL = 0.05


def describe(dev: PciDevice) -> dict:
    vendor, device = dev.config_read(PCI_VENDOR_ID, 2), dev.config_read(PCI_DEVICE_ID, 2)
    rev = dev.config_read(PCI_REVISION_ID, 1)
    out = {"name": dev.name, "vendor": f"{vendor:#06x}", "device": f"{device:#06x}",
           "family": ids.family(vendor, device), "stepping": ids.stepping(rev), "regions": {}}
    for idx in (BAR0, BAR4):
        if idx < dev.info.num_regions:
            r = dev.region_info(idx)
            out["regions"][f"BAR{idx}"] = {"size": r.size, "mmap": r.mmappable}
    return out


def mic_id(name: str) -> int:
    """``micN`` -> N: the card's COSM id; its SCIF node is N + 1 (spec 8.1)."""
    m = re.fullmatch(r"mic(\d+)", name)
    if not m or int(m.group(1)) > 254:
        raise ValueError(f"card name {name!r}: the daemon needs a name micN, N = 0..254 (SCIF node N + 1 <= 255)")
    return int(m.group(1))


def card_name(args, cfg: configmod.Config) -> str:
    if args.name:
        return args.name
    if args.device:
        pci = configmod.normalize_pci(args.device)
        for c in cfg.cards.values():
            if c.pci == pci and c.name.startswith("mic"):
                return c.name
    return "mic0"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="micdrv", description="User-space host driver for one Xeon Phi X100 card.",
                                epilog="'micdrv sim --help' describes the simulated card.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--device", metavar="BDF", help="a card bound to vfio-pci, e.g. 0000:03:00.0")
    src.add_argument("--vfio-user", metavar="SOCKET", help="a vfio-user server socket (a simulated card)")
    src.add_argument("--simulate", action="store_true", help="start a simulated X100 card and drive it")
    p.add_argument("--config", help=f"configuration file (default {configmod.DEFAULT_PATH})")
    p.add_argument("--name", help="the card's name, micN (default: from the configuration, else mic0)")
    p.add_argument("--run-dir", help="directory for the control socket (default: the configuration's run_dir)")
    p.add_argument("--boot", action="store_true", help="boot the card once the daemon is up (boot_on_start)")
    p.add_argument("--no-devices", action="store_true",
                   help="with --simulate: no default devices when the configuration lists none")
    p.add_argument("--probe", action="store_true", help="print what the device is, then exit")
    p.add_argument("--log-level", choices=configmod.LOG_LEVELS, help="default: the configuration's log_level")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sim"]:
        from .sim.__main__ import main as sim_main
        return sim_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.device and configmod.normalize_pci(args.device) is None:
        print(f"micdrv: --device {args.device!r} is not a PCI address like 0000:03:00.0", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0:
        # Everything the daemon does needs root: VFIO, the arena pinned against RLIMIT_MEMLOCK, taps and
        # netlink, the FUSE mount with allow_other, the control socket in /run/micdrv.
        print(f"micdrv: must run as root (uid {os.geteuid()}): it drives the card through VFIO and makes taps "
              f"and a FUSE mount; start it as micdrv@<pci>.service or with sudo", file=sys.stderr)
        return EXIT_FAIL
    try:
        cfg = configmod.load(args.config)
        cfg.check_host()
        if args.run_dir:
            cfg = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings,
                                                                       run_dir=os.path.abspath(args.run_dir)))
        name = card_name(args, cfg)
        card = cfg.card(name)
        if args.boot:
            card = dataclasses.replace(card, boot_on_start=True)
        mic_id(card.name)
    except (configmod.ConfigError, ValueError) as e:
        print(f"micdrv: {e}", file=sys.stderr)
        return EXIT_USAGE
    from . import journal
    journal.configure(args.log_level or cfg.settings.log_level)
    if args.probe:
        return _probe(args, cfg, card)
    from .sdnotify import Notifier
    notifier = Notifier.from_environ()  # before any child (the simulator) could inherit $NOTIFY_SOCKET
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A hang-up stops the daemon cleanly too; left at SIG_DFL, libfuse would take SIGHUP over and a
    # hang-up would silently unmount the FUSE tree (micdrv/fs/mount.py).
    signal.signal(signal.SIGHUP, on_signal)
    try:
        return run_card(args, cfg, card, stop, notifier)
    finally:
        notifier.close()


@contextlib.contextmanager
def open_device(args, cfg: configmod.Config, card: configmod.CardConfig):
    """The one place that picks the PciDevice implementation; yields (device, simulator process or None)."""
    sim = None
    try:
        if args.device:
            from .pci.vfio import VfioPciDevice
            dev = VfioPciDevice.open(args.device)
        else:
            from .pci.vfio_user.client import VfioUserDevice
            path = args.vfio_user
            if args.simulate:
                from .sim.process import SimulatedCardProcess
                sim = SimulatedCardProcess(Path(cfg.settings.run_dir) / f"{card.name}.sim")
                path = sim.socket
                log.info("simulated card: vfio-user %s, control %s", sim.socket, sim.control)
            dev = VfioUserDevice.connect(path)
        try:
            yield dev, sim
        finally:
            dev.close()
    finally:
        if sim is not None:
            sim.stop()


def run_card(args, cfg: configmod.Config, card: configmod.CardConfig, stop: threading.Event,
             notifier=None) -> int:
    """Drive the card until ``stop`` is set: probe, serve, then stop and reset it.

    systemd (``Type=notify``) hears READY once the control socket listens,
    STATUS on every state change, WATCHDOG every half watchdog interval from
    this loop, and STOPPING on the way out.
    """
    from . import fs
    from .doctor import ARENA_BYTES
    from .mic import MicDevice
    from .sdnotify import Notifier
    from .service import CardService, started_record
    from .vop.devices import CardDevices
    from .vop.host import VopOptions
    from .vop.copy import CopyPolicy
    from .vop.layout import VringInfoPlacement
    notifier = notifier or Notifier(None)
    try:
        try:
            os.makedirs(cfg.settings.run_dir, exist_ok=True)
        except OSError as e:
            log.error("cannot make the run directory %s: %s", cfg.settings.run_dir, e.strerror or e)
            return EXIT_FAIL
        # A second daemon for a card is refused before it touches anything of the first (with --simulate,
        # the simulator's sockets beside the control socket).
        from .jsonlines import ServerRunning, remove_stale_socket
        try:
            remove_stale_socket(str(cfg.socket_path(card)))
        except ServerRunning as e:
            log.error("%s: %s: micdrv is running for %s already", card.name, e, card.name)
            return EXIT_FAIL
        with open_device(args, cfg, card) as (dev, sim):
            reset_delay, reset_interval = SILICON_RESET_DELAY, None
            if sim is not None:
                card = _simulated_firmware(cfg, card, sim)
                if not args.no_devices:
                    card = _simulated_devices(card, sim)
                reset_delay, reset_interval = SIMULATED_RESET_DELAY, SIMULATED_RESET_INTERVAL
            left = started_record(cfg, card).read()
            if left is not None:
                log.warning("%s: a daemon (pid %s) died with the card started; resetting the card: its OS's "
                            "devices, rings and SCIF queues were in that process's memory", card.name,
                            left["pid"] if left["pid"] is not None else "?")
            hw = MicDevice.open(dev, mic_id=mic_id(card.name), arena_size=ARENA_BYTES, reset_delay=reset_delay,
                                vop=VopOptions(vring_info=VringInfoPlacement(card.vring_info),
                                               copy=CopyPolicy(h2c_direct=card.vop_copy == "h2c-direct")),
                                reset=left is not None)
            try:
                fs.recover(cfg, card)  # a killed daemon's dead tree hides the console link's directory
                devices = CardDevices.open(card, cfg, hw.vop)
                card = dataclasses.replace(card, cmdline=devices.kernel_cmdline(card.cmdline))
                service = CardService(hw, card, cfg, hardware_info=lambda: _hardware_info(dev, sim),
                                      reset_interval=reset_interval, devices=devices,
                                      reset_at_start=left is not None)
                service.cosm.subscribe(lambda d: notifier.status(f"{d.name}: {d.state.sysfs}"))
                service.start()
                tree = None
                try:
                    tree = fs.serve(service, cfg)  # the FUSE tree; None (logged) if off or it cannot mount
                    log.info("%s: %s %s stepping %s ready for commands", card.name, dev.name, hw.family,
                             hw.stepping)
                    notifier.ready(status=f"{card.name}: {service.cosm.state.sysfs}")
                    ping = notifier.watchdog_seconds / 2 if notifier.watchdog_seconds else None
                    while not stop.wait(ping):
                        notifier.watchdog()
                    notifier.stopping(status=f"{card.name}: stopping")
                finally:
                    if tree is not None:
                        tree.close()
                    service.close()
            finally:
                hw.close()
    except (PciError, X100Error, OSError) as e:
        log.error("%s", e)
        return EXIT_FAIL
    return EXIT_OK


def _simulated_firmware(cfg: configmod.Config, card: configmod.CardConfig, sim) -> configmod.CardConfig:
    """With --simulate and no firmware file at the configured path: the simulated card OS image, made now.

    It goes beside the simulator's sockets with its System.map, so ``micctl log`` finds the card log.
    """
    if cfg.firmware_path(card.firmware).is_file():
        return card
    from .sim.cardos.image import write_files
    image = Path(sim.dir) / "firmware" / "uos.img"
    image.parent.mkdir(parents=True, exist_ok=True)
    write_files(image)
    log.info("%s: no firmware at %s; booting the simulated card OS image %s", card.name,
             cfg.firmware_path(card.firmware), image)
    return dataclasses.replace(card, firmware=str(image))


SIMULATED_DISK_SIZE = 64 << 20  # the default disk of a simulated card: a sparse 64 MiB image


def _simulated_devices(card: configmod.CardConfig, sim) -> configmod.CardConfig:
    """With --simulate and no devices configured: a console, a network (MPSS defaults: tap micN,
    172.31.<N+1>.254/24 on the host, .1 on the card) and a 64 MiB disk beside the simulator's sockets."""
    if card.console or card.net or card.blk:
        return card
    disk = Path(sim.dir) / "disk.img"
    if not disk.exists():
        with open(disk, "wb") as f:
            f.truncate(SIMULATED_DISK_SIZE)
    log.info("%s: no devices configured; serving the simulated card a console, a network and the disk %s",
             card.name, disk)
    return dataclasses.replace(card, console=(configmod.ConsoleConfig(),), net=(configmod.NetConfig(),),
                               blk=(configmod.BlkConfig(path=str(disk)),))


def _hardware_info(dev: PciDevice, sim) -> dict:
    out = {"device": dev.name}
    if sim is not None:
        out["simulator_control"] = sim.control
    return out


def _probe(args, cfg, card) -> int:
    try:
        with open_device(args, cfg, card) as (dev, _sim):
            print(json.dumps(describe(dev), indent=2))
    except (PciError, OSError) as e:
        log.error("%s", e)
        return EXIT_FAIL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
