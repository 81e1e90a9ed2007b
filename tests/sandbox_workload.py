"""What the daemon does to the host besides driving the card, run inside micdrv@.service's limits.

tests/test_sandbox.py runs this in a network namespace of its own, with the
unit's capability bounding set, NoNewPrivileges and W^X memory applied, under
strace. It does each host-side operation the daemon needs, the way the daemon
is expected to do it:

* the FUSE tree: mount an mfusepy file system (libfuse mounts directly as
  root), read a file through it, unmount with umount2;
* the tap: TUNSETIFF on /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
  then pyroute2 sets MTU, state, an address and a bridge master;
* the console: a pty pair;
* the control socket: an AF_UNIX listener given to another group.

Prints "ok" and exits 0 when every step worked.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import stat
import struct
import sys
import tempfile
import threading
import time

import mfusepy

TUNSETIFF = 0x400454CA           # _IOW('T', 202, int)
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


class StateFs(mfusepy.Operations):
    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == "/state":
            return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": 6}
        raise mfusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "state"]

    def read(self, path, size, offset, fh):
        return b"ready\n"[offset:offset + size]


def fuse_tree(top: str) -> None:
    mnt = os.path.join(top, "mic0")
    os.mkdir(mnt)
    t = threading.Thread(target=mfusepy.FUSE, args=(StateFs(), mnt),
                         kwargs={"foreground": True, "allow_other": True, "nothreads": True}, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not os.path.ismount(mnt):
        assert time.monotonic() < deadline, "the FUSE mount never appeared"
        time.sleep(0.05)
    with open(os.path.join(mnt, "state")) as f:
        assert f.read() == "ready\n"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(mnt.encode(), 0) != 0:
        raise OSError(ctypes.get_errno(), f"umount2 {mnt}")
    t.join(timeout=60)
    assert not t.is_alive(), "the FUSE loop did not end after the unmount"


def tap_and_netlink() -> None:
    from pyroute2 import IPRoute
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"mic0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname="mic0")[0]
            ipr.link("set", index=idx, mtu=64000, state="up")
            ipr.addr("add", index=idx, address="172.31.1.254", prefixlen=24)
            ipr.link("add", ifname="micbr0", kind="bridge")
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname="micbr0")[0])
            assert ipr.get_addr(index=idx)[0].get_attr("IFA_ADDRESS") == "172.31.1.254"
        assert socket.if_nametoindex("mic0") == idx
    finally:
        os.close(fd)


def console_pty() -> None:
    master, slave = os.openpty()
    os.write(slave, b"login: ")
    assert os.read(master, 64) == b"login: "
    os.close(master)
    os.close(slave)


def control_socket(top: str) -> None:
    path = os.path.join(top, "mic0.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(path)
    s.listen()
    os.chown(path, -1, 65534)      # socket_group: a group root is not a member of (CAP_CHOWN)
    os.chmod(path, 0o660)
    assert os.stat(path).st_gid == 65534
    s.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="micdrv-sandbox-") as top:
        fuse_tree(top)
        tap_and_netlink()
        console_pty()
        control_socket(top)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
