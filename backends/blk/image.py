"""A raw disk image: the one place its bytes are read and written, by the card's requests and by the host.

issue 6 exposes the same image through FUSE "through the same backend as
the card's I/O, so host and card see one coherent disk". So both paths go
through one :class:`BlockImage`: one file descriptor (one page cache), one
lock held across every operation (a host write never interleaves with half
of a card write), vectored I/O straight between the file and the caller's
memoryviews (preadv/pwritev, no copies).

The image is locked against other processes with ``flock`` (exclusive for
read-write, shared for read-only), as QEMU locks its images: two daemons
writing one disk would corrupt it.

Capacity is ``size // 512`` sectors (virtio-legacy.md 3.2): a trailing
partial sector is not exposed, so a write can never grow the file. [mpssd
rounds up; we refuse to expose bytes that do not exist.]
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import threading
from typing import Sequence

from micdrv.virtio.blk import SECTOR_SIZE

from .. import iov

# fallocate(2) modes (include/uapi/linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = 1 << 20  # the fallback for WRITE_ZEROES writes zeros this many bytes at a time

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError with the errno on failure (os.posix_fallocate has no mode)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class ImageError(Exception):
    """An image that cannot be opened or used, or an access outside it; the message names the image."""


class BlockImage:
    """A raw image file (or block device) opened once, shared by the queue path and the host-side API."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = str(path)
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as e:
            raise ImageError(f"{self.path}: cannot open {'read-only' if readonly else 'read-write'}: "
                             f"{e.strerror}") from None
        try:
            st = os.fstat(self._fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ImageError(f"{self.path}: not a regular file or block device")
            try:
                fcntl.flock(self._fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ImageError(f"{self.path}: in use (locked by another user of the image)") from None
            self._lock = threading.RLock()
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            os.close(self._fd)
            raise

    # --- geometry ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors (a partial last sector is not exposed)."""
        return self.size // SECTOR_SIZE

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def refresh(self) -> bool:
        """Re-read the size (the file was resized behind our back); True if it changed."""
        with self._lock:
            fd = self._checked_fd()
            size = os.lseek(fd, 0, os.SEEK_END)
            changed, self.size = size != self.size, size
            return changed

    def resize(self, size: int) -> None:
        """Truncate or extend the image file to ``size`` bytes."""
        if self.readonly:
            raise ImageError(f"{self.path}: read-only image cannot be resized")
        with self._lock:
            os.ftruncate(self._checked_fd(), size)
            self.size = size

    def _checked_fd(self) -> int:
        if self._fd < 0:
            raise ImageError(f"{self.path}: image is closed")
        return self._fd

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.capacity * SECTOR_SIZE:
            raise ImageError(f"{self.path}: [{offset:#x}, +{length:#x}) is outside the image "
                             f"({self.capacity} sectors)")

    # --- vectored I/O (the queue path and the host API) --------------------------------------

    def preadv(self, views: Sequence[memoryview], offset: int, length: int | None = None) -> int:
        """Fill ``views`` (``length`` bytes, if the caller knows) from ``offset``, all inside the image."""
        want = iov.total(views) if length is None else length
        with self._lock:
            fd = self._checked_fd()
            self._check(offset, want)
            done = 0
            while done < want:
                n = os.preadv(fd, views if not done else iov.advance(views, done), offset + done)
                if n == 0:
                    raise ImageError(f"{self.path}: end of file at {offset + done:#x} (the file shrank?)")
                done += n
        return done

    def pwritev(self, views: Sequence[memoryview], offset: int, length: int | None = None) -> int:
        """Write ``views`` (``length`` bytes, if the caller knows) at ``offset``, all inside the image."""
        if self.readonly:
            raise ImageError(f"{self.path}: read-only image")
        want = iov.total(views) if length is None else length
        with self._lock:
            fd = self._checked_fd()
            self._check(offset, want)
            done = 0
            while done < want:
                done += os.pwritev(fd, views if not done else iov.advance(views, done), offset + done)
        return done

    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""
        with self._lock:
            os.fdatasync(self._checked_fd())

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Zero a range: punch a hole (``unmap``) or zero it in place; write zeros where neither works."""
        if self.readonly:
            raise ImageError(f"{self.path}: read-only image")
        with self._lock:
            fd = self._checked_fd()
            self._check(offset, length)
            mode = FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE)
            try:
                _fallocate(fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                    raise
            zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
            done = 0
            while done < length:
                done += os.pwrite(fd, zeros[:min(len(zeros), length - done)], offset + done)

    def discard(self, offset: int, length: int) -> None:
        """Tell the file the range is unused (punch a hole); a file system that cannot is fine (advisory)."""
        if self.readonly:
            raise ImageError(f"{self.path}: read-only image")
        with self._lock:
            fd = self._checked_fd()
            self._check(offset, length)
            try:
                _fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise

    # --- the host-side API (FUSE, micctl): same file, same lock -------------------------------

    def read(self, offset: int, n: int) -> bytes:
        """``n`` bytes at ``offset`` (clipped at the end of the image, as a file read is)."""
        n = max(0, min(n, self.capacity * SECTOR_SIZE - offset))
        buf = bytearray(n)
        if n:
            self.preadv([memoryview(buf)], offset)
        return bytes(buf)

    def readinto(self, offset: int, buf) -> int:
        """Fill ``buf`` from ``offset``; the range must lie inside the image."""
        return self.preadv([memoryview(buf).cast("B")], offset)

    def write(self, offset: int, data) -> int:
        """Write ``data`` at ``offset``; the range must lie inside the image (no growing)."""
        return self.pwritev([memoryview(data).cast("B")], offset)

    def close(self) -> None:
        """Close the file (and drop the lock); idempotent. Later accesses raise :class:`ImageError`."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> "BlockImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BlockImage {self.path} {self.capacity} sectors{' ro' if self.readonly else ''}>"
