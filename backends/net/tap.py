"""A tap device with a virtio-net header on every frame: /dev/net/tun, the way mpssd and QEMU open it.

virtio-legacy.md 2.7 and x100-host-abi.md 6.2: open ``/dev/net/tun``,
check TUNGETFEATURES offers what we need, TUNSETIFF with ``IFF_TAP |
IFF_NO_PI | IFF_VNET_HDR``, TUNSETVNETHDRSZ 10 (``virtio_net_hdr`` without
MRG_RXBUF), TUNSETOFFLOAD with what the reader (the card) accepts. Every
read then yields ``virtio_net_hdr`` + an Ethernet frame and every write
takes the same, so a virtio-net device passes chains straight through.

Constants and structures follow ``include/uapi/linux/if_tun.h`` and
``include/uapi/linux/if.h``; ioctl numbers are computed with
:mod:`micdrv.ioctl`. The fd is non-blocking and close-on-exec.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from micdrv.ioctl import _IOR, _IOW

# --- include/uapi/linux/if_tun.h --------------------------------------------------------------

TUN_TYPE = ord("T")
TUNSETIFF = _IOW(TUN_TYPE, 202, ctypes.sizeof(ctypes.c_int))
TUNGETFEATURES = _IOR(TUN_TYPE, 207, ctypes.sizeof(ctypes.c_uint))
TUNSETOFFLOAD = _IOW(TUN_TYPE, 208, ctypes.sizeof(ctypes.c_uint))
TUNGETVNETHDRSZ = _IOR(TUN_TYPE, 215, ctypes.sizeof(ctypes.c_int))
TUNSETVNETHDRSZ = _IOW(TUN_TYPE, 216, ctypes.sizeof(ctypes.c_int))

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000  # TUNSETIFF fails with EBUSY when an interface of that name exists (tun_set_iff)

TUN_F_CSUM = 0x01      # the reader accepts partial checksums (NEEDS_CSUM)
TUN_F_TSO4 = 0x02      # ... TSOv4 frames (only with CSUM)
TUN_F_TSO6 = 0x04      # ... TSOv6 frames (only with CSUM)
TUN_F_TSO_ECN = 0x08   # ... TSO with ECN (only with TSO4 or TSO6)
TUN_F_UFO = 0x10

# x100-host-abi.md 6.2: what mpssd sets.
MPSSD_OFFLOAD = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN

# --- include/uapi/linux/if.h ------------------------------------------------------------------

IFNAMSIZ = 16


class sockaddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_char * 14)]


class ifmap(ctypes.Structure):
    _fields_ = [
        ("mem_start", ctypes.c_ulong),
        ("mem_end", ctypes.c_ulong),
        ("base_addr", ctypes.c_ushort),
        ("irq", ctypes.c_ubyte),
        ("dma", ctypes.c_ubyte),
        ("port", ctypes.c_ubyte),
    ]


class ifr_ifru(ctypes.Union):
    _fields_ = [
        ("ifru_addr", sockaddr),
        ("ifru_dstaddr", sockaddr),
        ("ifru_broadaddr", sockaddr),
        ("ifru_netmask", sockaddr),
        ("ifru_hwaddr", sockaddr),
        ("ifru_flags", ctypes.c_short),
        ("ifru_ivalue", ctypes.c_int),
        ("ifru_mtu", ctypes.c_int),
        ("ifru_map", ifmap),
        ("ifru_slave", ctypes.c_char * IFNAMSIZ),
        ("ifru_newname", ctypes.c_char * IFNAMSIZ),
        ("ifru_data", ctypes.c_void_p),
    ]


class ifreq(ctypes.Structure):
    """``struct ifreq``: 40 bytes on x86-64."""

    _fields_ = [("ifr_name", ctypes.c_char * IFNAMSIZ), ("ifr_ifru", ifr_ifru)]


VNET_HDR_SIZE = 10  # virtio_net_hdr without MRG_RXBUF (virtio-legacy.md 2.3)


class TapError(Exception):
    """A tap step that failed; the message names the step, the tap and the errno."""

    def __init__(self, step: str, name: str, err: OSError | str):
        detail = f"{errno.errorcode.get(err.errno, err.errno)} ({err.strerror})" if isinstance(err, OSError) else err
        super().__init__(f"tap {name}: {step}: {detail}")
        self.errno = err.errno if isinstance(err, OSError) else None


def check_ifname(name: str) -> str:
    """An interface name the kernel accepts: 1..15 bytes, no '/', ':' or whitespace."""
    raw = name.encode()
    if not 0 < len(raw) < IFNAMSIZ or any(c in name for c in "/: \t\n") or name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid interface name (1..{IFNAMSIZ - 1} bytes, no '/', ':' or spaces)")
    return name


def describe_interface(name: str, netns: str | None = None) -> str | None:
    """What interface ``name`` of this (or the named) network namespace is, for an error message; None if
    there is none.

    Asked over rtnetlink (IFLA_LINKINFO, and IFLA_TUN_* for a tun device), which answers for the caller's
    namespace, as TUNSETIFF does.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        with (IPRoute(netns=netns) if netns else IPRoute()) as ip:
            link = ip.link("get", ifname=name)[0]
    except NetlinkError:
        return None
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    if kind == "tun":
        data = info.get_attr("IFLA_INFO_DATA")
        tun = dict(data["attrs"]) if data else {}
        what = "a tap" if tun.get("IFLA_TUN_TYPE") == IFF_TAP else "a tun device"
        what += " of another program" if not tun.get("IFLA_TUN_PERSIST") else " made persistent by another program"
        if tun.get("IFLA_TUN_OWNER") is not None:
            what += f", owner uid {tun['IFLA_TUN_OWNER']}"
        return what
    if kind:
        return f"a {kind} interface"
    return "the loopback interface" if link["flags"] & 0x8 else "a network device"  # IFF_LOOPBACK (if.h)


class Tap:
    """An open tap: ``fd`` carries ``virtio_net_hdr`` + frame per read/write."""

    NEEDED = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR

    def __init__(self, name: str, vnet_hdr_size: int = VNET_HDR_SIZE, offload: int = MPSSD_OFFLOAD):
        check_ifname(name)
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError("open /dev/net/tun", name, e) from None
        try:
            buf = ctypes.c_uint(0)
            self._ioctl("TUNGETFEATURES", name, TUNGETFEATURES, buf)
            missing = self.NEEDED & ~buf.value
            if missing:
                raise TapError("TUNGETFEATURES", name, f"the kernel lacks flags {missing:#x} "
                                                       f"(needs IFF_TAP|IFF_NO_PI|IFF_VNET_HDR)")
            ifr = ifreq()
            ifr.ifr_name = name.encode()
            # Always a new tap: an interface that has the name already belongs to someone else (another
            # program's tap, a persistent one a VM waits for, a bridge or NIC), and is never taken over.
            ifr.ifr_ifru.ifru_flags = self.NEEDED | IFF_TUN_EXCL
            try:
                fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            except OSError as e:
                what = describe_interface(name) if e.errno == errno.EBUSY else None
                if what:
                    raise TapError("TUNSETIFF", name, f"an interface named {name} exists already ({what}); "
                                                      f"micdrv makes a tap of its own: give the card another "
                                                      f"tap name") from None
                raise TapError("TUNSETIFF", name, e) from None
            self.name = ifr.ifr_name.decode()
            self._ioctl("TUNSETVNETHDRSZ", name, TUNSETVNETHDRSZ, ctypes.c_int(vnet_hdr_size))
            self.vnet_hdr_size = vnet_hdr_size
            self.offload = -1
            self.set_offload(offload)
        except BaseException:
            os.close(self.fd)
            raise

    def _ioctl(self, step: str, name: str, request: int, arg) -> None:
        try:
            fcntl.ioctl(self.fd, request, arg)
        except OSError as e:
            raise TapError(step, name, e) from None

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: what the reader of this tap accepts (TUN_F_*). The argument is the value itself."""
        if flags != self.offload:
            self._ioctl(f"TUNSETOFFLOAD {flags:#x}", self.name, TUNSETOFFLOAD, flags)
            self.offload = flags

    def vnet_hdr_size_in_kernel(self) -> int:
        """TUNGETVNETHDRSZ: the header size the kernel uses now."""
        buf = ctypes.c_int(0)
        self._ioctl("TUNGETVNETHDRSZ", self.name, TUNGETVNETHDRSZ, buf)
        return buf.value

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        """Close the fd; the (non-persistent) tap disappears with it. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Tap {getattr(self, 'name', '?')} fd={self.fd} offload={getattr(self, 'offload', 0):#x}>"
