"""Installing micdrv on a host: the systemd unit, the udev rules and a commented configuration.

``micctl install`` (``python -m micdrv.install``) writes three files:

==========================================  =================================================
``/etc/systemd/system/micdrv@.service``     the per-card daemon (micdrv/unit.py), ExecStart=
                                            the micdrv executable of this installation
``/etc/udev/rules.d/70-micdrv.rules``       card -> vfio-pci -> micdrv@<address>.service
                                            (micdrv/udev.py)
``/etc/micdrv/micdrv.toml``                 every setting, commented out (default_config.py)
==========================================  =================================================

``--destdir D`` (or ``$DESTDIR``) puts them under D for a package build;
``--unit-dir`` and ``--rules-dir`` move them (a package wants
/usr/lib/systemd/system and /usr/lib/udev/rules.d). Running it again is
harmless: an identical file is left alone, the unit and the rules are
replaced when they differ (they are generated, never edited), and an existing
configuration is never overwritten -- when it differs from the default, the
default goes beside it as micdrv.toml.new.

Installing to the live system (no destdir) then reloads systemd and udev and
replays the ``add`` event of every X100 already present, so the cards come up
as if just plugged in. Where systemd or udevd is not running, that step says
so and is skipped.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import default_config, udev, unit
from .x100 import ids

UNIT_DIR = "/etc/systemd/system"
RULES_DIR = "/etc/udev/rules.d"
CONFIG_PATH = "/etc/micdrv/micdrv.toml"


class InstallError(Exception):
    """The installation cannot go on; the message says what to do."""


@dataclass(frozen=True)
class Layout:
    """Where the files go on the target system (before any destdir)."""

    unit_dir: str = UNIT_DIR
    rules_dir: str = RULES_DIR
    config: str = CONFIG_PATH

    @property
    def unit(self) -> str:
        return os.path.join(self.unit_dir, unit.UNIT_NAME)

    @property
    def rules(self) -> str:
        return os.path.join(self.rules_dir, udev.RULES_NAME)


@dataclass(frozen=True)
class Action:
    path: str       # the file as written (with the destdir)
    what: str       # installed, updated, unchanged, kept, new-default

    def __str__(self) -> str:
        return {
            "installed": f"installed {self.path}",
            "updated": f"updated {self.path}",
            "unchanged": f"unchanged {self.path}",
            "kept": f"kept {self.path}: it has your changes",
            "new-default": f"wrote {self.path}: the default configuration, to compare with yours",
        }[self.what]


def find_micdrv() -> str:
    """The micdrv executable of the Python environment running this, else the one on PATH."""
    candidates = [os.path.join(sysconfig.get_path("scripts"), "micdrv"), shutil.which("micdrv")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return os.path.abspath(c)
    raise InstallError("no micdrv executable in this Python environment or on PATH: install the micdrv package "
                       "(pip install .), or name it with --micdrv PATH")


def under(destdir: str | None, path: str) -> str:
    """``path`` on the target system as seen from here."""
    return os.path.join(destdir, path.lstrip("/")) if destdir else path


def _write(path: str, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` atomically: a reader (udev, systemd) never sees half a file."""
    d = os.path.dirname(path)
    os.makedirs(d, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".micdrv-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None


def _generated(path: str, text: str) -> Action:
    old = _read(path)
    if old == text:
        return Action(path, "unchanged")
    _write(path, text)
    return Action(path, "installed" if old is None else "updated")


def _config(path: str, text: str) -> list[Action]:
    old = _read(path)
    if old is None:
        _write(path, text)
        return [Action(path, "installed")]
    if old == text:
        return [Action(path, "unchanged")]
    new = path + ".new"
    if _read(new) != text:
        _write(new, text)
    return [Action(path, "kept"), Action(new, "new-default")]


def install(destdir: str | None = None, layout: Layout = Layout(), micdrv: str | None = None) -> list[Action]:
    """Write the unit, the rules and the configuration; returns what was done to each file."""
    if micdrv is None:
        micdrv = find_micdrv()
    elif not os.path.isabs(micdrv):
        raise InstallError(f"--micdrv needs an absolute path, not {micdrv!r}")
    elif destdir is None and not os.access(micdrv, os.X_OK):
        raise InstallError(f"{micdrv} is not an executable; the unit's ExecStart= would fail")
    try:
        unit_text = unit.render(micdrv)
    except ValueError as e:
        raise InstallError(str(e)) from None
    try:
        actions = [_generated(under(destdir, layout.unit), unit_text),
                   _generated(under(destdir, layout.rules), udev.rules())]
        actions += _config(under(destdir, layout.config), default_config.TEXT)
    except PermissionError as e:
        raise InstallError(f"cannot write {e.filename}: run as root, or install into a --destdir") from None
    return actions


def _run(argv: list[str]) -> str | None:
    """Run a command; None when it worked, else what went wrong in one line."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        return f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return f"{' '.join(argv)} timed out"
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    return None


def present_cards(sysfs: str = "/sys") -> list[str]:
    """The sysfs paths of the X100 cards on the PCI bus."""
    cards = []
    for d in sorted(glob.glob(os.path.join(sysfs, "bus/pci/devices/*"))):
        try:
            vendor = int(Path(d, "vendor").read_text(), 16)
            device = int(Path(d, "device").read_text(), 16)
        except (OSError, ValueError):
            continue
        if ids.is_x100(vendor, device):
            cards.append(d)
    return cards


def activate(run_dir: str = "/run") -> list[str]:
    """Make the running system pick up new files: reload systemd and udev, replay present cards' add events.

    Returns one line per step. A system without a running systemd or udevd
    (a container, a chroot) gets the step skipped, with the reason.
    """
    out = []
    if os.path.isdir(os.path.join(run_dir, "systemd/system")):     # sd_booted(3)
        err = _run(["systemctl", "daemon-reload"])
        out.append("systemd: reloaded" if err is None else f"systemd: daemon-reload failed: {err}")
    else:
        out.append("systemd: not running here; skipped daemon-reload (start micdrv by hand)")
    if os.path.exists(os.path.join(run_dir, "udev/control")):
        err = _run(["udevadm", "control", "--reload"])
        out.append("udev: rules reloaded" if err is None else f"udev: reload failed: {err}")
        for card in present_cards():
            err = _run(["udevadm", "trigger", "--action=add", card])
            name = os.path.basename(card)
            out.append(f"udev: {name} replayed (vfio-pci, micdrv@{name}.service)" if err is None
                       else f"udev: trigger of {name} failed: {err}")
    else:
        out.append("udev: udevd not running here; skipped reloading the rules")
    return out


def main(argv: list[str] | None = None) -> int:
    """``micctl install [--destdir D] [--micdrv PATH] [--unit-dir DIR] [--rules-dir DIR] [--config FILE]``."""
    p = argparse.ArgumentParser(prog="micctl install",
                                description="Install micdrv's systemd unit, udev rules and default configuration.")
    p.add_argument("--destdir", default=os.environ.get("DESTDIR") or None,
                   help="stage everything under this directory, for a package (default: $DESTDIR, else /)")
    p.add_argument("--micdrv", help="the daemon's path on the target system (default: this installation's)")
    p.add_argument("--unit-dir", default=UNIT_DIR, help=f"systemd units (default {UNIT_DIR})")
    p.add_argument("--rules-dir", default=RULES_DIR, help=f"udev rules (default {RULES_DIR})")
    p.add_argument("--config", default=CONFIG_PATH, help=f"the configuration file (default {CONFIG_PATH})")
    args = p.parse_args(argv)
    destdir = args.destdir if args.destdir and os.path.abspath(args.destdir) != "/" else None
    layout = Layout(args.unit_dir, args.rules_dir, args.config)
    for d in (layout.unit_dir, layout.rules_dir, layout.config):
        if not os.path.isabs(d):
            print(f"micctl install: {d!r} must be an absolute path on the target system", file=sys.stderr)
            return 2
    try:
        actions = install(destdir, layout, args.micdrv)
    except (InstallError, OSError) as e:
        print(f"micctl install: {e}", file=sys.stderr)
        return 1
    for a in actions:
        print(a)
    if destdir is None:
        for line in activate():
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
