"""Network namespaces a test creates, and sockets inside them: test traffic never leaves them.

COMMON.md: traffic in tests goes only to addresses inside namespaces the
test itself created. :func:`namespace` makes one with a name unique to
this process and removes it afterwards (its interfaces go with it);
:func:`socket_in` opens a socket *inside* it from a short-lived thread that
``setns``-es first (a socket belongs to the namespace it was created in,
whatever thread uses it later).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import socket
import threading

from pyroute2 import netns

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_count = itertools.count()


@contextlib.contextmanager
def namespace(prefix: str = "mdv"):
    name = f"{prefix}{os.getpid()}-{next(_count)}"
    netns.create(name)
    try:
        # No IPv6 inside: its router solicitations and MLD reports would only be noise on test taps.
        for conf in ("all", "default"):
            sysctl_in(name, f"net/ipv6/conf/{conf}/disable_ipv6", "1")
        yield name
    finally:
        netns.remove(name)


def _in_namespace(ns: str, fn):
    """Run ``fn()`` on a fresh thread that has entered ``ns``; return its result."""
    box: list = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {ns}")
            finally:
                os.close(fd)
            box.append(fn())
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def sysctl_in(ns: str, key: str, value: str) -> None:
    """Write a net sysctl of ``ns`` (/proc/sys/net files act on the opener's namespace)."""
    def write() -> None:
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)
    _in_namespace(ns, write)


def socket_in(ns: str, family: int = socket.AF_INET, type_: int = socket.SOCK_DGRAM, proto: int = 0) -> socket.socket:
    """A socket created inside ``ns``."""
    return _in_namespace(ns, lambda: socket.socket(family, type_, proto))


def ping_from(ns: str, dst: str, ident: int, seq: int, data: bytes, timeout: float = 30.0) -> bytes:
    """One ICMP echo request from namespace ``ns`` to ``dst`` (a raw socket: the sandbox has no ping binary);
    the reply's payload (TimeoutError: none)."""
    import struct
    import time

    from tests import packets as P
    with socket_in(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
        s.settimeout(timeout)
        s.sendto(P.icmp_echo(ident, seq, data), (dst, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw, peer = s.recvfrom(65536)
            icmp = raw[(raw[0] & 0xF) * 4:]
            t, _c, _sum, rid, rseq = struct.unpack("!BBHHH", icmp[:8])
            if t == 0 and rid == ident and rseq == seq:
                assert peer[0] == dst and P.checksum(icmp) == 0   # from dst, and its checksum is right
                return icmp[8:]
    raise TimeoutError(f"no echo reply from {dst}")
