"""Host readiness checks behind ``micctl doctor``.

Each check looks at the real host (sysfs, /dev, rlimits, libraries) and, when
something is missing, says how to fix it. Nothing here changes the host.

:func:`run_checks` is the host (kernel, devices, limits, libraries);
:func:`install_checks` is what ``micctl install`` puts in place -- unit, udev
rules, configuration, the executable -- under a root directory, so a package's
staging directory can be checked as well as ``/``. :func:`main` is the whole
``micctl doctor`` command.
"""

from __future__ import annotations

import argparse
import ctypes.util
import glob
import importlib.util
import json
import os
import platform
import re
import resource
import sys
from dataclasses import asdict, dataclass

from .pci import bind
from .x100 import ids

# Memory the daemon pins per card: the DmaArena (device page, rings, buffers).
# Kept in one place so doctor and the daemon agree.
ARENA_BYTES = 64 << 20


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _iommu() -> Check:
    groups = glob.glob("/sys/kernel/iommu_groups/*")
    if groups:
        return Check("iommu", True, f"{len(groups)} IOMMU groups")
    cmdline = open("/proc/cmdline").read() if os.path.exists("/proc/cmdline") else ""
    hint = "" if "iommu" in cmdline else " (the kernel command line has no intel_iommu=on / amd_iommu=on)"
    return Check("iommu", False, "no IOMMU groups: the IOMMU is off or absent" + hint,
                 "enable VT-d (or AMD-Vi) in the firmware and boot with intel_iommu=on iommu=pt")


def _module_available(name: str) -> bool:
    release = platform.release()
    base = f"/lib/modules/{release}"
    pattern = name.replace("-", "[-_]")
    if glob.glob(f"{base}/**/{pattern}.ko*", recursive=True):
        return True
    builtin = f"{base}/modules.builtin"
    if os.path.exists(builtin):
        with open(builtin) as f:
            return any(line.rstrip().split("/")[-1].replace("-", "_") == name.replace("-", "_") + ".ko" for line in f)
    return False


def _vfio_pci() -> Check:
    if os.path.isdir("/sys/bus/pci/drivers/vfio-pci"):
        return Check("vfio-pci", True, "driver loaded")
    if _module_available("vfio-pci"):
        return Check("vfio-pci", False, "module available but not loaded", "modprobe vfio-pci")
    return Check("vfio-pci", False, f"no vfio-pci module for kernel {platform.release()}",
                 "install a kernel built with CONFIG_VFIO_PCI (Debian's linux-image-amd64 has it)")


def _dev_vfio() -> Check:
    if os.path.exists("/dev/vfio/vfio"):
        nodes = sorted(os.path.basename(p) for p in glob.glob("/dev/vfio/*") if not p.endswith("/vfio"))
        return Check("/dev/vfio", True, "container present" + (f"; groups {', '.join(nodes)}" if nodes else ""))
    return Check("/dev/vfio", False, "/dev/vfio/vfio is missing", "modprobe vfio-pci")


CAP_IPC_LOCK = 14  # linux/capability.h


def _has_capability(cap: int) -> bool:
    """Whether this process holds ``cap`` in its effective set (CapEff in /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return False


def memlock_check(soft_limit: int, ipc_lock: bool) -> Check:
    """Can a process with this RLIMIT_MEMLOCK (and CAP_IPC_LOCK or not) pin one card's arena?"""
    # VFIO type1 (and iommufd behind /dev/vfio/vfio) charges pinned pages to RLIMIT_MEMLOCK unless the
    # process has CAP_IPC_LOCK. Root under micdrv@.service does not: its bounding set leaves it out.
    if ipc_lock:
        return Check("memlock", True, "CAP_IPC_LOCK: VFIO pins without the limit")
    if soft_limit == resource.RLIM_INFINITY or soft_limit >= ARENA_BYTES:
        shown = "unlimited" if soft_limit == resource.RLIM_INFINITY else soft_limit
        return Check("memlock", True, f"RLIMIT_MEMLOCK {shown}")
    return Check("memlock", False, f"RLIMIT_MEMLOCK is {soft_limit} bytes; each card pins {ARENA_BYTES} bytes",
                 "run micdrv from micdrv@.service (its LimitMEMLOCK= covers the arena) or raise 'ulimit -l'")


def _memlock() -> Check:
    return memlock_check(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0], _has_capability(CAP_IPC_LOCK))


def _tun() -> Check:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return Check("/dev/net/tun", False, "missing", "modprobe tun")
    except PermissionError:
        return Check("/dev/net/tun", False, "not openable by this user", "run micdrv as root")
    os.close(fd)
    return Check("/dev/net/tun", True, "openable")


def _fuse() -> Check:
    problems, fixes = [], []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
        fixes.append("modprobe fuse")
    if not (ctypes.util.find_library("fuse3") or ctypes.util.find_library("fuse")):
        problems.append("libfuse is not installed")
        fixes.append("apt-get install fuse3 libfuse3-3")
    if importlib.util.find_spec("mfusepy") is None and importlib.util.find_spec("fuse") is None:
        problems.append("the mfusepy Python package is missing")
        fixes.append("pip install mfusepy")
    if problems:
        return Check("fuse", False, "; ".join(problems), "; ".join(fixes))
    return Check("fuse", True, "/dev/fuse, libfuse and mfusepy present")


def _cards() -> Check:
    found = []
    for d in sorted(glob.glob("/sys/bus/pci/devices/*")):
        try:
            vendor = int(open(f"{d}/vendor").read(), 16)
            device = int(open(f"{d}/device").read(), 16)
        except OSError:
            continue
        if ids.is_x100(vendor, device):
            bdf = os.path.basename(d)
            found.append(f"{bdf} ({bind.current_driver(bdf) or 'no driver'})")
    if found:
        return Check("cards", True, "X100 cards: " + ", ".join(found))
    # No card is not a host problem: the simulated card needs none.
    return Check("cards", True, "no X100 card found (micdrv --simulate runs a simulated card)")


CHECKS = (_iommu, _vfio_pci, _dev_vfio, _memlock, _tun, _fuse, _cards)


def run_checks() -> list[Check]:
    return [c() for c in CHECKS]


# --- the installation ---------------------------------------------------------------------------

# Where systemd and udev look for what micctl install writes, most important first
# (systemd.unit(5) "System Unit Search Path", udev(7) "Rules Files").
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
RULES_DIRS = ("/etc/udev/rules.d", "/run/udev/rules.d", "/usr/local/lib/udev/rules.d", "/usr/lib/udev/rules.d",
              "/lib/udev/rules.d")
INSTALL_FIX = "micctl install"


def _find(root: str, dirs: tuple[str, ...], name: str) -> str | None:
    for d in dirs:
        p = os.path.join(root, d.lstrip("/"), name)
        if os.path.isfile(p):
            return p
    return None


def _unit_check(root: str) -> list[Check]:
    from . import unit
    path = _find(root, UNIT_DIRS, unit.UNIT_NAME)
    if path is None:
        return [Check("unit", False, f"no {unit.UNIT_NAME} in {', '.join(UNIT_DIRS)}", INSTALL_FIX)]
    text = open(path).read()
    m = re.search(r"^ExecStart=(\S+)", text, re.M)
    exe = m.group(1) if m else None
    try:
        current = exe is not None and text == unit.render(exe)
    except ValueError:
        current = False
    checks = [Check("unit", True, f"{path}") if current else
              Check("unit", False, f"{path} is not the unit this micdrv installs (an older version, or edited; "
                                   f"put local changes in a drop-in: systemctl edit micdrv@.service)", INSTALL_FIX)]
    if exe is None:
        checks.append(Check("ExecStart", False, f"{path} has no ExecStart=", INSTALL_FIX))
    elif not os.access(os.path.join(root, exe.lstrip("/")), os.X_OK):
        checks.append(Check("ExecStart", False, f"the unit runs {exe}, which is not an executable",
                            f"{INSTALL_FIX} (from the Python environment micdrv is installed in)"))
    else:
        checks.append(Check("ExecStart", True, exe))
    return checks


def _rules_check(root: str) -> Check:
    from . import udev
    path = _find(root, RULES_DIRS, udev.RULES_NAME)
    if path is None:
        return Check("udev rules", False, f"no {udev.RULES_NAME} in {', '.join(RULES_DIRS)}: cards are not "
                                          f"handed to vfio-pci and micdrv@.service is not started", INSTALL_FIX)
    if open(path).read() != udev.rules():
        return Check("udev rules", False, f"{path} differs from this micdrv's rules (its PCI IDs or bindings "
                                          f"may be out of date)", INSTALL_FIX)
    return Check("udev rules", True, path)


def _config_check(root: str, config_path: str) -> Check:
    from . import config
    path = os.path.join(root, config_path.lstrip("/"))
    if not os.path.exists(path):
        return Check("config", False, f"{path} is missing (the daemon runs on defaults without it)",
                     f"{INSTALL_FIX} (writes a commented default)")
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        return Check("config", False, str(e), f"edit {e.path}" + (f" at line {e.line}" if e.line else ""))
    cards = ", ".join(sorted(cfg.cards)) or "none configured, defaults for every card"
    return Check("config", True, f"{path} parses; cards: {cards}")


def _path_check(root: str, env_path: str | None = None) -> Check:
    dirs = [d for d in (os.environ.get("PATH", "") if env_path is None else env_path).split(os.pathsep) if d]
    for d in dirs:
        p = os.path.join(root, d.lstrip("/"), "micdrv")
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return Check("micdrv on PATH", True, p)
    return Check("micdrv on PATH", False, "no micdrv executable on PATH (" + ":".join(dirs) + ")",
                 "install the micdrv package, or add its environment's bin directory to PATH")


def install_checks(root: str = "/", config_path: str | None = None, env_path: str | None = None) -> list[Check]:
    """Is micdrv installed under ``root``: unit, its ExecStart, udev rules, configuration, micdrv on PATH."""
    from .config import DEFAULT_PATH
    return [*_unit_check(root), _rules_check(root), _config_check(root, config_path or str(DEFAULT_PATH)),
            _path_check(root, env_path)]


def print_checks(checks: list[Check], out=None) -> None:
    out = sys.stdout if out is None else out
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}", file=out)
        if not c.ok and c.fix:
            print(f"     {'':<{width}}  fix: {c.fix}", file=out)


def main(argv: list[str] | None = None) -> int:
    """``micctl doctor [--json] [--root DIR] [--install-only]``: 0 when every check passes, else 1."""
    p = argparse.ArgumentParser(prog="micctl doctor",
                                description="Check that this host has what micdrv needs, with a fix for each gap.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--root", default="/", help="check the installation under this directory, a package's DESTDIR "
                        "(the host checks are skipped: they are about this machine)")
    p.add_argument("--install-only", action="store_true", help="only the installation checks, not the host's")
    args = p.parse_args(argv)
    checks = ([] if args.install_only or args.root != "/" else run_checks()) + install_checks(args.root)
    if args.json:
        print(json.dumps(as_dicts(checks), indent=2))
    else:
        print_checks(checks)
    return 0 if all(c.ok for c in checks) else 1


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]


if __name__ == "__main__":
    sys.exit(main())
