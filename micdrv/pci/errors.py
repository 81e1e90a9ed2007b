"""One error hierarchy for the PCI device layer.

Every error names the step that failed and, where the kernel or the peer gave
one, the errno, so an operator can act on the message alone (issue 2: "Errors
name the failing step and errno").
"""

from __future__ import annotations

import errno as _errno
import os


class PciError(Exception):
    """A failure reaching a PCI device through :class:`~micdrv.pci.PciDevice`.

    ``step`` says what was being done ("open group /dev/vfio/7",
    "VFIO_IOMMU_MAP_DMA", "vfio-user REGION_READ"); ``errno`` is the errno when
    there is one.
    """

    def __init__(self, step: str, detail: str = "", errno: int | None = None, fix: str | None = None):
        self.step = step
        self.errno = errno
        self.detail = detail
        self.fix = fix
        msg = f"{step} failed"
        if errno is not None:
            name = _errno.errorcode.get(errno, str(errno))
            msg += f": [{name}] {os.strerror(errno)}"
        if detail:
            msg += f": {detail}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


class VfioError(PciError):
    """A kernel VFIO step failed (an open, an ioctl, a mmap, a sysfs write)."""


class NotRootError(VfioError):
    """The step needs privileges this process does not have."""


class NoIommuGroupError(VfioError):
    """The device has no IOMMU group: the IOMMU is off or absent."""


class GroupNotViableError(VfioError):
    """Some device of the IOMMU group is bound to a host driver."""

    def __init__(self, step: str, group: int, others: list[str]):
        self.group = group
        self.others = others
        super().__init__(
            step,
            f"IOMMU group {group} is not viable; every device in it must be bound to "
            f"vfio-pci or to no driver: {', '.join(others) or '(none listed)'}",
            fix="bind each listed device with 'micctl bind' or unbind its driver",
        )


class MemlockError(VfioError):
    """Pinning DMA memory exceeded RLIMIT_MEMLOCK."""


class RegionError(PciError, IndexError):
    """A region index that the device does not have, or a region it cannot serve."""


class AccessError(PciError, ValueError):
    """A region access with a bad size, a misaligned offset or out of bounds."""


class IrqError(PciError, ValueError):
    """An IRQ index or vector range the device does not have."""


class DmaMapError(PciError, ValueError):
    """A DMA mapping that is misaligned, overlapping, or outside the valid IOVA ranges."""


class VfioUserError(PciError):
    """A vfio-user transport or protocol failure."""


class ProtocolError(VfioUserError):
    """The peer sent a message that breaks the vfio-user protocol."""


class DisconnectedError(VfioUserError, ConnectionError):
    """The peer closed the socket (or died); the connection is unusable."""


class ReplyTimeout(VfioUserError, TimeoutError):
    """No reply arrived within the reply timeout."""


class RemoteError(VfioUserError):
    """The peer answered a command with the ERROR flag and an errno."""
