"""Kernel VFIO: a real PCI device bound to vfio-pci, driven through /dev/vfio.

A short tour of VFIO (spec section 1; Documentation/driver-api/vfio.rst):

* A *container* (``/dev/vfio/vfio``) is one IOMMU address space. We check the
  API version, pick the type1 IOMMU (v2 when offered), and map DMA memory into
  it with MAP_DMA: the kernel pins the pages of a process virtual range and
  makes them reachable by the device at an IOVA.
* A *group* (``/dev/vfio/<N>``) is the smallest set of devices the IOMMU can
  isolate. It is viable only when every device in it is bound to vfio-pci (or
  to no driver); it is attached to a container before the IOMMU type is set.
* The *device* fd comes from the group. Its regions (BARs, config space, ...)
  are windows into the fd at ``region_info.offset``: pread/pwrite for trapped
  access, mmap where the region (or a sparse area of it) allows. Interrupts
  are routed to eventfds with SET_IRQS.

Every step that can fail raises a :class:`~micdrv.pci.errors.VfioError`
subclass naming the step and the errno.
"""

from __future__ import annotations

import errno
import fcntl
import mmap as _mmap
import os
import resource
import struct
from typing import Sequence

from . import bind
from . import vfio_abi as abi
from .device import DeviceInfo, DmaBacking, DmaMapping, IrqInfo, PciDevice, RegionInfo, SparseArea
from .errors import GroupNotViableError, MemlockError, NotRootError, RegionError, VfioError

VFIO_DEV = "/dev/vfio"


def _ioctl(fd: int, request: int, arg, step: str):
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES):
            raise NotRootError(step, errno=e.errno, fix="run as root") from None
        raise VfioError(step, errno=e.errno) from None


def _open(path: str, step: str, fix_enoent: str | None = None) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VfioError(step, f"{path} does not exist", errno=errno.ENOENT, fix=fix_enoent) from None
    except PermissionError as e:
        raise NotRootError(step, f"cannot open {path}", errno=e.errno,
                           fix="run as root or give this user the group's /dev/vfio node") from None
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise VfioError(step, f"{path} is already open (a second micdrv for this card, or another device of "
                                   "the same IOMMU group opened separately)",
                            errno=e.errno) from None
        raise VfioError(step, f"open {path}", errno=e.errno) from None


class Container:
    """A VFIO container: one IOMMU address space (spec 1.8 steps 1, 3, 4)."""

    def __init__(self, path: str = os.path.join(VFIO_DEV, "vfio")):
        self.fd = _open(path, "open VFIO container", fix_enoent="modprobe vfio-pci")
        try:
            version = _ioctl(self.fd, abi.VFIO_GET_API_VERSION, 0, "VFIO_GET_API_VERSION")
            if version != abi.VFIO_API_VERSION:
                raise VfioError("VFIO_GET_API_VERSION", f"kernel VFIO API {version}, expected {abi.VFIO_API_VERSION}")
            self.iommu_type: int | None = None
            for t in (abi.VFIO_TYPE1v2_IOMMU, abi.VFIO_TYPE1_IOMMU):
                if _ioctl(self.fd, abi.VFIO_CHECK_EXTENSION, t, "VFIO_CHECK_EXTENSION") > 0:
                    self.iommu_type = t
                    break
            if self.iommu_type is None:
                raise VfioError("VFIO_CHECK_EXTENSION", "the kernel offers no type1 IOMMU", errno=errno.ENODEV,
                                fix="boot with the IOMMU enabled (intel_iommu=on / amd_iommu=on)")
        except BaseException:
            os.close(self.fd)
            raise
        self.pgsizes = 4096
        self.iova_ranges: tuple[tuple[int, int], ...] = ((0, (1 << 64) - 1),)
        self._iommu_set = False

    def set_iommu(self) -> None:
        """Select the IOMMU model; only valid once a group is attached (spec 1.2)."""
        if self._iommu_set:
            return
        _ioctl(self.fd, abi.VFIO_SET_IOMMU, self.iommu_type, f"VFIO_SET_IOMMU(type {self.iommu_type})")
        self._iommu_set = True
        self._read_iommu_info()

    def _read_iommu_info(self) -> None:
        buf = bytearray(abi.iommu_type1_info.pack(abi.iommu_type1_info.size, 0, 0, 0, 0))
        _ioctl(self.fd, abi.VFIO_IOMMU_GET_INFO, buf, "VFIO_IOMMU_GET_INFO")
        need = struct.unpack_from("<I", buf)[0]
        if need > len(buf):  # capabilities did not fit: ask again with the size the kernel wants (spec 1.5)
            buf = bytearray(need)
            struct.pack_into("<I", buf, 0, need)
            _ioctl(self.fd, abi.VFIO_IOMMU_GET_INFO, buf, "VFIO_IOMMU_GET_INFO")
        pgsizes, ranges = abi.decode_iova_ranges(buf)
        flags = struct.unpack_from("<I", buf, 4)[0]
        if flags & abi.VFIO_IOMMU_INFO_PGSIZES and pgsizes:
            self.pgsizes = pgsizes & -pgsizes  # the smallest page size
        if ranges:
            self.iova_ranges = ranges

    def map_dma(self, vaddr: int, iova: int, size: int, readable: bool, writable: bool) -> None:
        flags = (abi.VFIO_DMA_MAP_FLAG_READ if readable else 0) | (abi.VFIO_DMA_MAP_FLAG_WRITE if writable else 0)
        buf = bytearray(abi.dma_map.pack(abi.dma_map.size, flags, vaddr, iova, size))
        step = f"VFIO_IOMMU_MAP_DMA({size:#x} bytes at IOVA {iova:#x})"
        try:
            fcntl.ioctl(self.fd, abi.VFIO_IOMMU_MAP_DMA, buf)
        except OSError as e:
            if e.errno == errno.ENOMEM:
                soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
                lim = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
                raise MemlockError(step, f"pinning exceeds RLIMIT_MEMLOCK ({lim})", errno=e.errno,
                                   fix="raise the memlock limit (LimitMEMLOCK=infinity in the unit, or ulimit -l)") from None
            raise VfioError(step, errno=e.errno) from None

    def unmap_dma(self, iova: int, size: int) -> None:
        buf = bytearray(abi.dma_unmap.pack(abi.dma_unmap.size, 0, iova, size))
        _ioctl(self.fd, abi.VFIO_IOMMU_UNMAP_DMA, buf, f"VFIO_IOMMU_UNMAP_DMA({size:#x} bytes at IOVA {iova:#x})")
        done = abi.dma_unmap.unpack_from(buf)[3]
        if done != size:
            raise VfioError(f"VFIO_IOMMU_UNMAP_DMA at IOVA {iova:#x}", f"kernel unmapped {done:#x} of {size:#x} bytes")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Group:
    """An IOMMU group node (spec 1.8 step 2)."""

    def __init__(self, number: int, container: Container):
        self.number = number
        path = os.path.join(VFIO_DEV, str(number))
        self.fd = _open(path, f"open VFIO group {number}", fix_enoent="bind the device to vfio-pci (micctl bind)")
        try:
            buf = bytearray(abi.group_status.pack(abi.group_status.size, 0))
            _ioctl(self.fd, abi.VFIO_GROUP_GET_STATUS, buf, f"VFIO_GROUP_GET_STATUS(group {number})")
            flags = abi.group_status.unpack_from(buf)[1]
            if not flags & abi.VFIO_GROUP_FLAGS_VIABLE:
                others = [f"{b} ({d or 'no driver'})" for b, d in bind.group_devices(number) if d != "vfio-pci"]
                raise GroupNotViableError(f"VFIO_GROUP_GET_STATUS(group {number})", number, others)
            if not flags & abi.VFIO_GROUP_FLAGS_CONTAINER_SET:
                _ioctl(self.fd, abi.VFIO_GROUP_SET_CONTAINER, bytearray(struct.pack("<i", container.fd)),
                       f"VFIO_GROUP_SET_CONTAINER(group {number})")
            container.set_iommu()
        except BaseException:
            os.close(self.fd)
            raise

    def device_fd(self, bdf: str) -> int:
        # A mutable buffer so ioctl returns the new fd, not a copy (spec 1.9).
        return _ioctl(self.fd, abi.VFIO_GROUP_GET_DEVICE_FD, bytearray(bdf.encode() + b"\0"),
                      f"VFIO_GROUP_GET_DEVICE_FD({bdf})")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VfioPciDevice(PciDevice):
    """A device bound to vfio-pci, reached through the kernel."""

    def __init__(self, bdf: str, container: Container, group: Group, fd: int):
        super().__init__()
        self.name = bdf
        self.bdf = bdf
        self._container = container
        self._group = group
        self._fd = fd

    @classmethod
    def open(cls, bdf: str) -> "VfioPciDevice":
        """Open a device already bound to vfio-pci: container, group, device fd (spec 1.8)."""
        bdf = bind.normalize_bdf(bdf)
        if not os.path.exists(os.path.join(VFIO_DEV, "vfio")) and os.geteuid() != 0:
            raise NotRootError(f"open {bdf}", "no /dev/vfio/vfio and not root", errno=errno.EPERM, fix="run as root")
        number = bind.iommu_group(bdf)
        if bind.current_driver(bdf) != "vfio-pci":
            raise VfioError(f"open {bdf}", f"device is bound to {bind.current_driver(bdf) or 'no driver'}, not vfio-pci",
                            errno=errno.ENODEV, fix=f"micctl bind {bdf}")
        container = Container()
        try:
            group = Group(number, container)
        except BaseException:
            container.close()
            raise
        try:
            fd = group.device_fd(bdf)
        except BaseException:
            group.close()
            container.close()
            raise
        return cls(bdf, container, group, fd)

    # --- PciDevice primitives ------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    def _get_device_info(self) -> DeviceInfo:
        buf = bytearray(abi.device_info.pack(abi.device_info.size, 0, 0, 0, 0, 0))
        _ioctl(self._fd, abi.VFIO_DEVICE_GET_INFO, buf, f"VFIO_DEVICE_GET_INFO({self.bdf})")
        return abi.decode_device_info(buf)

    def _get_region_info(self, index: int) -> RegionInfo:
        size = abi.region_info.size
        for _ in range(2):
            buf = bytearray(size)
            struct.pack_into("<II I", buf, 0, size, 0, index)
            step = f"VFIO_DEVICE_GET_REGION_INFO({self.bdf}, {index})"
            try:
                _ioctl(self._fd, abi.VFIO_DEVICE_GET_REGION_INFO, buf, step)
            except VfioError as e:
                # vfio-pci answers EINVAL for an index below num_regions that this
                # device does not have (VGA on a non-VGA device, an unregistered
                # device-specific index): a region it cannot serve.
                if e.errno == errno.EINVAL:
                    raise RegionError(step, "the device has no such region", errno=e.errno) from None
                raise
            need = struct.unpack_from("<I", buf)[0]
            if need <= size:
                return abi.decode_region_info(buf, index)
            size = need  # room for the capability chain (spec 1.5)
        raise VfioError(f"VFIO_DEVICE_GET_REGION_INFO({self.bdf}, {index})", "capability chain keeps growing")

    def _get_irq_info(self, index: int) -> IrqInfo:
        buf = bytearray(abi.irq_info.pack(abi.irq_info.size, 0, index, 0))
        _ioctl(self._fd, abi.VFIO_DEVICE_GET_IRQ_INFO, buf, f"VFIO_DEVICE_GET_IRQ_INFO({self.bdf}, {index})")
        return abi.decode_irq_info(buf, index)

    def _region_read(self, index: int, offset: int, length: int) -> bytes:
        base = self.region_info(index).offset
        out = bytearray()
        while len(out) < length:
            try:
                chunk = os.pread(self._fd, length - len(out), base + offset + len(out))
            except OSError as e:
                raise VfioError(f"read of region {index} at {offset + len(out):#x} of {self.bdf}", errno=e.errno) from None
            if not chunk:
                raise VfioError(f"read of region {index} at {offset + len(out):#x} of {self.bdf}", "short read",
                                errno=errno.EIO)
            out += chunk
        return bytes(out)

    def _region_write(self, index: int, offset: int, data: bytes, posted: bool) -> None:
        base = self.region_info(index).offset
        view = memoryview(data)
        done = 0
        while done < len(data):
            try:
                n = os.pwrite(self._fd, view[done:], base + offset + done)
            except OSError as e:
                raise VfioError(f"write of region {index} at {offset + done:#x} of {self.bdf}", errno=e.errno) from None
            if n <= 0:
                raise VfioError(f"write of region {index} at {offset + done:#x} of {self.bdf}", "short write",
                                errno=errno.EIO)
            done += n

    def _mmap(self, info: RegionInfo, area: SparseArea) -> _mmap.mmap:
        prot = (_mmap.PROT_READ if info.readable else 0) | (_mmap.PROT_WRITE if info.writable else 0)
        try:
            return _mmap.mmap(self._fd, area.size, _mmap.MAP_SHARED, prot, offset=info.offset + area.offset)
        except OSError as e:
            raise VfioError(f"mmap of region {info.index} area [{area.offset:#x}+{area.size:#x}] of {self.bdf}",
                            errno=e.errno) from None

    def _set_irqs(self, index: int, flags: int, start: int, count: int,
                  eventfds: Sequence[int] | None = None, bools: Sequence[bool] | None = None) -> None:
        if eventfds is not None:
            data = struct.pack(f"<{len(eventfds)}i", *eventfds)
        elif bools is not None:
            data = bytes(1 if b else 0 for b in bools)
        else:
            data = b""
        buf = bytearray(abi.irq_set.pack(abi.irq_set.size + len(data), flags, index, start, count) + data)
        _ioctl(self._fd, abi.VFIO_DEVICE_SET_IRQS, buf,
               f"VFIO_DEVICE_SET_IRQS({self.bdf}, index {index}, vectors {start}+{count}, flags {flags:#x})")

    def _reset(self) -> None:
        _ioctl(self._fd, abi.VFIO_DEVICE_RESET, 0, f"VFIO_DEVICE_RESET({self.bdf})")

    @property
    def iova_ranges(self) -> tuple[tuple[int, int], ...]:
        return self._container.iova_ranges

    @property
    def iova_pgsize(self) -> int:
        return self._container.pgsizes

    def _dma_map(self, backing: DmaBacking, m: DmaMapping) -> None:
        self._container.map_dma(backing.address + m.offset, m.iova, m.size, m.readable, m.writable)

    def _dma_unmap(self, m: DmaMapping) -> None:
        self._container.unmap_dma(m.iova, m.size)

    def _close(self) -> None:
        # Closing the device fd releases its IRQs; closing the container drops
        # every DMA mapping and unpins the pages.
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._group.close()
        self._container.close()
        self._dma.clear()
