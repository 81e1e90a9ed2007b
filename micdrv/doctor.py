"""Host readiness checks behind ``micctl doctor``.

Each check looks at the real host (sysfs, /dev, rlimits, libraries) and, when
something is missing, says how to fix it. Nothing here changes the host.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.util
import os
import platform
import resource
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


def _memlock() -> Check:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if os.geteuid() == 0:
        return Check("memlock", True, "root: CAP_IPC_LOCK lets VFIO pin without the limit")
    if soft == resource.RLIM_INFINITY or soft >= ARENA_BYTES:
        return Check("memlock", True, f"RLIMIT_MEMLOCK {'unlimited' if soft == resource.RLIM_INFINITY else soft}")
    return Check("memlock", False, f"RLIMIT_MEMLOCK is {soft} bytes; each card pins {ARENA_BYTES} bytes",
                 "set LimitMEMLOCK=infinity (the shipped micdrv@.service does) or raise 'ulimit -l'")


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


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
