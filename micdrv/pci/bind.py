"""PCI devices in sysfs: addresses, IOMMU groups, drivers, and binding to vfio-pci.

The binding helper is what ``micctl bind`` and the udev path use to hand a
card to vfio-pci (spec 1.11): set ``driver_override`` to vfio-pci, unbind the
current driver, ask the PCI core to probe again. It never runs a shell;
loading the module is ``modprobe`` run with an argument vector.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time

from .errors import NoIommuGroupError, NotRootError, VfioError

SYSFS = "/sys"
_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


def normalize_bdf(bdf: str) -> str:
    """'3:00.0' / '03:00.0' / '0000:03:00.0' -> '0000:03:00.0'; anything else is an error."""
    m = _BDF.match(bdf.strip())
    if not m:
        raise ValueError(f"{bdf!r} is not a PCI address like 0000:03:00.0")
    dom, bus, dev, fn = m.groups()
    return f"{(dom or '0000').lower()}:{bus.lower()}:{dev.lower()}.{fn}"


def device_dir(bdf: str, sysfs: str = SYSFS) -> str:
    path = os.path.join(sysfs, "bus/pci/devices", normalize_bdf(bdf))
    if not os.path.isdir(path):
        raise VfioError(f"look up PCI device {bdf}", "no such device in sysfs", errno=errno.ENODEV)
    return path


def current_driver(bdf: str, sysfs: str = SYSFS) -> str | None:
    link = os.path.join(device_dir(bdf, sysfs), "driver")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def iommu_group(bdf: str, sysfs: str = SYSFS) -> int:
    """The IOMMU group number of a device (basename of its iommu_group link, spec 1.8)."""
    link = os.path.join(device_dir(bdf, sysfs), "iommu_group")
    if not os.path.islink(link):
        raise NoIommuGroupError(
            f"find the IOMMU group of {bdf}", "the device has no IOMMU group (the IOMMU is off or absent)",
            errno=errno.ENODEV,
            fix="enable VT-d/AMD-Vi in firmware and boot with intel_iommu=on (or amd_iommu=on)")
    return int(os.path.basename(os.readlink(link)))


def group_devices(group: int, sysfs: str = SYSFS) -> list[tuple[str, str | None]]:
    """Every device in an IOMMU group with its current driver."""
    d = os.path.join(sysfs, "kernel/iommu_groups", str(group), "devices")
    out = []
    for bdf in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        link = os.path.join(d, bdf, "driver")
        out.append((bdf, os.path.basename(os.readlink(link)) if os.path.islink(link) else None))
    return out


def _write(path: str, value: str, step: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except PermissionError as e:
        raise NotRootError(step, f"cannot write {path}", errno=e.errno, fix="run as root") from None
    except OSError as e:
        raise VfioError(step, f"writing {value.strip()!r} to {path}", errno=e.errno) from None


def ensure_vfio_pci_loaded(sysfs: str = SYSFS) -> None:
    if os.path.isdir(os.path.join(sysfs, "bus/pci/drivers/vfio-pci")):
        return
    try:
        r = subprocess.run(["modprobe", "vfio-pci"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise VfioError("load vfio-pci", "modprobe not found", errno=errno.ENOENT,
                        fix="apt-get install kmod") from None
    if r.returncode != 0 or not os.path.isdir(os.path.join(sysfs, "bus/pci/drivers/vfio-pci")):
        raise VfioError("load vfio-pci", (r.stderr or "module did not register").strip(), errno=errno.ENOENT,
                        fix="install a kernel with CONFIG_VFIO_PCI (Debian's has it as a module)")


def bind_to_vfio_pci(bdf: str, sysfs: str = SYSFS, timeout: float = 5.0) -> int:
    """Bind ``bdf`` to vfio-pci (driver_override + unbind + drivers_probe) and return its IOMMU group.

    Idempotent: a device already on vfio-pci is left alone.
    """
    bdf = normalize_bdf(bdf)
    ddir = device_dir(bdf, sysfs)
    group = iommu_group(bdf, sysfs)
    ensure_vfio_pci_loaded(sysfs)
    drv = current_driver(bdf, sysfs)
    if drv == "vfio-pci":
        return group
    _write(os.path.join(ddir, "driver_override"), "vfio-pci\n", f"set driver_override of {bdf}")
    if drv is not None:
        _write(os.path.join(ddir, "driver", "unbind"), bdf + "\n", f"unbind {bdf} from {drv}")
    _write(os.path.join(sysfs, "bus/pci/drivers_probe"), bdf + "\n", f"probe {bdf} for vfio-pci")
    deadline = time.monotonic() + timeout
    while current_driver(bdf, sysfs) != "vfio-pci":
        if time.monotonic() > deadline:
            raise VfioError(f"bind {bdf} to vfio-pci", f"driver is {current_driver(bdf, sysfs)} after probing",
                            errno=errno.EBUSY)
        time.sleep(0.01)
    return group


def unbind_from_vfio_pci(bdf: str, sysfs: str = SYSFS) -> str | None:
    """Give the device back to the host: clear driver_override, unbind, reprobe. Returns the new driver."""
    bdf = normalize_bdf(bdf)
    ddir = device_dir(bdf, sysfs)
    _write(os.path.join(ddir, "driver_override"), "\n", f"clear driver_override of {bdf}")
    if current_driver(bdf, sysfs) == "vfio-pci":
        _write(os.path.join(ddir, "driver", "unbind"), bdf + "\n", f"unbind {bdf} from vfio-pci")
    _write(os.path.join(sysfs, "bus/pci/drivers_probe"), bdf + "\n", f"reprobe {bdf}")
    return current_driver(bdf, sysfs)
