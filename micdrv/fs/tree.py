"""The card's directory as FUSE operations: the sysfs attributes, block/<disk>, and the mount point's symlinks.

::

    /run/micdrv/mic0/              0750 root:<group>
        family stepping state ...  the attributes (:mod:`.attrs`): 0640 if writable, else 0440
        post_code log
        block/                     0750 root:<group>
            <disk>                 0600 (0400 read-only) root:root, st_size = capacity
        console -> /dev/pts/N      symlinks root made in the mount point (see below)

Every handler runs on one of libfuse's worker threads. Files opened keep what
they opened: a disk removed while open still reads (or fails) through its own
:class:`~backends.blk.BlockImage`, a name re-used by a new disk is a new file.

**Disks** go through the very :class:`BlockImage` the card's virtio-blk queue
uses -- one fd, one lock, so a host write never interleaves with half of a
card write and both see one disk. A write past the capacity is cut short at
it, and one starting there fails with ENOSPC, as on a block device; O_TRUNC is
ignored, as a block device ignores it. The disks are root's alone: the tree
never gives anyone access to a disk that its image file would not.

**poll** on ``state`` has sysfs semantics (kernfs_generic_poll): readable
always; POLLPRI|POLLERR once the state changed since the file was opened or
last read. The poll handle libfuse passes is kept per open file and notified
(``fuse_notify_poll``) on the next state change, then destroyed; the kernel
polls again and gets the new mask. Other files poll as always ready and get
no notification, like sysfs attributes nobody notifies.

**Symlinks** in the mount point itself show through: the directory is opened
before the mount covers it, and symlink, readlink, rename and unlink act on
it with ``*at()`` calls. The console backend's default link
``<run_dir>/<card>/console`` (spec 6.3) is such a link, so it works whether it
was made before the tree was mounted or after, and stays right once the tree
is gone. Only root may make, rename or remove one; names of the tree's own
files are refused.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import select
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable

import mfusepy

from .attrs import ATTRIBUTES, PAGE_SIZE, Attribute, show, store

log = logging.getLogger(__name__)

BLOCK_DIR = "block"
SECTOR = 512
DEFAULT_POLLMASK = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM  # include/linux/poll.h
CHANGED = select.POLLERR | select.POLLPRI   # what sysfs_notify makes poll report

# The library mfusepy loaded (libfuse3), for the two poll calls it does not wrap.
_lib = mfusepy._libfuse
_lib.fuse_notify_poll.argtypes = [ctypes.c_void_p]
_lib.fuse_notify_poll.restype = ctypes.c_int
_lib.fuse_pollhandle_destroy.argtypes = [ctypes.c_void_p]
_lib.fuse_pollhandle_destroy.restype = None

BlockImages = Callable[[], dict]   # name -> backends.blk.BlockImage


def _fail(err: int):
    raise mfusepy.FuseOSError(err)


class PollHandles:
    """libfuse poll handles waiting for a change, one per open file; no notification after :meth:`close`.

    libfuse frees its session in fuse_destroy; a notify after that writes through freed memory
    (libfuse issue 907), hence the ``alive`` flag under the lock.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._handles: dict[int, int] = {}
        self._alive = True

    def arm(self, fh: int, ph: int) -> None:
        with self._lock:
            old = self._handles.pop(fh, None)
            if old is not None:
                _lib.fuse_pollhandle_destroy(old)
            if self._alive:
                self._handles[fh] = ph
            else:
                _lib.fuse_pollhandle_destroy(ph)

    def forget(self, fh: int) -> None:
        with self._lock:
            ph = self._handles.pop(fh, None)
            if ph is not None:
                _lib.fuse_pollhandle_destroy(ph)

    def notify_all(self) -> None:
        with self._lock:
            if self._alive:
                for ph in self._handles.values():
                    _lib.fuse_notify_poll(ph)
                    _lib.fuse_pollhandle_destroy(ph)
                self._handles.clear()

    def close(self) -> None:
        with self._lock:
            self._alive = False
            for ph in self._handles.values():
                _lib.fuse_pollhandle_destroy(ph)
            self._handles.clear()


@dataclass
class _Handle:
    """One open file: an attribute (with sysfs's event counter and read snapshot) or a disk."""

    attr: Attribute | None = None
    image: object = None
    event: int = 0
    snapshot: bytes | None = None


def _caller_uid() -> int:
    return mfusepy.fuse_get_context()[0]


def _root_only() -> None:
    if _caller_uid() != 0:
        _fail(errno.EACCES)


def _writing(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY


class CardTree(mfusepy.Operations):
    """The operations of one card's tree. ``service`` None: no attributes (a tree of disks and links only)."""

    use_ns = True

    def __init__(self, service=None, *, block_images: BlockImages | None = None, gid: int = 0):
        self._service = service
        self._block_images = block_images or dict
        self._gid = gid
        self._handles: dict[int, _Handle] = {}
        self._handles_lock = threading.Lock()
        self._fh = itertools.count(1)
        self._polls = PollHandles()
        self._born = time.time_ns()
        self._state_event = 0
        self._state_mtime = self._born
        self._state_seen = service.cosm.state if service is not None else None
        self._unsubscribe = service.cosm.subscribe(self._on_change) if service is not None else None
        self._bad_names: set[str] = set()
        self._listing = threading.Lock()
        self.mount_dir_fd: int | None = None    # the mount point's own directory, for its symlinks
        self.on_mount: Callable[[], None] | None = None

    # --- state changes (sysfs_notify) ---------------------------------------------------------
    def _on_change(self, dev) -> None:
        if dev.state is self._state_seen:
            return  # a shutdown_status or heartbeat_enable change: sysfs notifies only state
        with self._handles_lock:
            self._state_seen = dev.state
            self._state_event += 1
            self._state_mtime = time.time_ns()
        self._polls.notify_all()

    def detach(self) -> None:
        """No more notifications (the mount is going away)."""
        self._polls.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # --- names ---------------------------------------------------------------------------------
    def _attributes(self) -> dict[str, Attribute]:
        return ATTRIBUTES if self._service is not None else {}

    def _reserved(self, name: str) -> bool:
        return name in self._attributes() or name == BLOCK_DIR

    def _disks(self) -> dict:
        try:
            images = self._block_images()
        except Exception:  # the devices' bug must not take the tree down: no disks this time
            log.exception("the block image provider failed")
            return {}
        out = {}
        for name, image in images.items():
            if not name or "/" in name or "\0" in name or name in (".", ".."):
                if name not in self._bad_names:
                    self._bad_names.add(name)
                    log.warning("block image name %r cannot be a file name; not shown", name)
                continue
            out[name] = image
        return out

    def _links(self) -> list[str]:
        if self.mount_dir_fd is None:
            return []
        with self._listing:  # listdir(fd) dups the fd: concurrent listings would share its offset
            names = os.listdir(self.mount_dir_fd)
        return [name for name in names if not self._reserved(name) and self._lstat_link(name) is not None]

    def _link_name(self, path: str) -> str:
        """A top-level name a link may have; ENOENT/EPERM/EEXIST otherwise."""
        name = path.lstrip("/")
        if not name or "/" in name:
            _fail(errno.EPERM if name.startswith(BLOCK_DIR + "/") else errno.ENOENT)
        if self._reserved(name):
            _fail(errno.EEXIST)
        if self.mount_dir_fd is None:
            _fail(errno.EPERM)
        return name

    def _lstat_link(self, name: str) -> os.stat_result | None:
        """The link ``name`` in the mount point's directory, or None if there is no such link."""
        try:
            st = os.lstat(name, dir_fd=self.mount_dir_fd)
        except OSError:
            return None
        return st if stat.S_ISLNK(st.st_mode) else None

    # --- attributes of files -----------------------------------------------------------------------
    def _dir(self, nlink: int) -> dict:
        return dict(st_mode=stat.S_IFDIR | 0o750, st_nlink=nlink, st_uid=0, st_gid=self._gid,
                    st_atime=self._born, st_mtime=self._born, st_ctime=self._born)

    def _attr_stat(self, a: Attribute) -> dict:
        t = self._state_mtime if a.notify else self._born
        return dict(st_mode=stat.S_IFREG | (0o640 if a.writable else 0o440), st_nlink=1, st_uid=0,
                    st_gid=self._gid, st_size=a.size, st_atime=t, st_mtime=t, st_ctime=t)

    def _disk_stat(self, image) -> dict:
        return dict(st_mode=stat.S_IFREG | (0o400 if image.readonly else 0o600), st_nlink=1, st_uid=0,
                    st_gid=0, st_size=image.capacity * SECTOR, st_blksize=SECTOR,
                    st_atime=self._born, st_mtime=self._born, st_ctime=self._born)

    def getattr(self, path: str, fh: int | None = None) -> dict:
        h = self._handles.get(fh) if fh is not None else None
        if h is not None:
            return self._attr_stat(h.attr) if h.attr is not None else self._disk_stat(h.image)
        if path == "/":
            return self._dir(3)
        name = path[1:]
        attr = self._attributes().get(name)
        if attr is not None:
            return self._attr_stat(attr)
        if name == BLOCK_DIR:
            return self._dir(2)
        if name.startswith(BLOCK_DIR + "/"):
            image = self._disks().get(name[len(BLOCK_DIR) + 1:])
            if image is not None:
                return self._disk_stat(image)
        elif "/" not in name and self.mount_dir_fd is not None and (st := self._lstat_link(name)) is not None:
            return dict(st_mode=st.st_mode, st_nlink=1, st_uid=st.st_uid, st_gid=st.st_gid, st_size=st.st_size,
                        st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        _fail(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        if path == "/":
            return [".", "..", *self._attributes(), BLOCK_DIR, *self._links()]
        if path == "/" + BLOCK_DIR:
            return [".", "..", *self._disks()]
        _fail(errno.ENOTDIR)

    # --- open files ------------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        name = path[1:]
        attr = self._attributes().get(name)
        if attr is not None:
            if _writing(flags):
                if not attr.writable:
                    _fail(errno.EACCES)  # kernfs refuses a write open of a read-only attribute, even root's
                _root_only()
            h = _Handle(attr=attr, event=self._state_event)
        elif name.startswith(BLOCK_DIR + "/"):
            image = self._disks().get(name[len(BLOCK_DIR) + 1:])
            if image is None:
                _fail(errno.ENOENT)
            _root_only()
            if _writing(flags) and image.readonly:
                _fail(errno.EROFS)
            h = _Handle(image=image)
        elif name == BLOCK_DIR:
            _fail(errno.EISDIR)
        else:
            _fail(errno.ENOENT)
        fh = next(self._fh)
        with self._handles_lock:
            self._handles[fh] = h
        return fh

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            _fail(errno.EBADF)
        return h

    def readinto(self, path: str, view: memoryview, offset: int, fh: int) -> int:
        """A read straight into libfuse's buffer (micdrv.fs.mount): a disk read is one preadv."""
        h = self._handle(fh)
        if h.attr is not None:
            if offset == 0 or h.snapshot is None:  # a seq_file: generated at the start, read on from there
                event = self._state_event
                try:
                    h.snapshot = show(self._service, h.attr)
                except OSError as e:
                    _fail(e.errno)
                h.event = event
            data = h.snapshot[offset:offset + len(view)]
            view[:len(data)] = data
            return len(data)
        n = max(0, min(len(view), h.image.capacity * SECTOR - offset))
        if n == 0:
            return 0
        try:
            return h.image.readinto(offset, view[:n])
        except Exception as e:  # ImageError: the image was closed (hot-removed); OSError from the file
            log.warning("%s: read at %#x: %s", path, offset, e)
            _fail(getattr(e, "errno", None) or errno.EIO)

    def write_view(self, path: str, view: memoryview, offset: int, fh: int) -> int:
        """A write straight from libfuse's buffer (micdrv.fs.mount)."""
        h = self._handle(fh)
        _root_only()
        if h.attr is not None:
            try:
                return store(self._service, h.attr, bytes(view[:PAGE_SIZE]))
            except OSError as e:
                log.info("%s: write %r refused: %s", path, bytes(view[:64]), e.strerror)
                _fail(e.errno)
        image = h.image
        if image.readonly:
            _fail(errno.EROFS)
        end = image.capacity * SECTOR
        if offset >= end:
            _fail(errno.ENOSPC)
        n = min(len(view), end - offset)
        try:
            return image.write(offset, view[:n])
        except Exception as e:
            log.warning("%s: write at %#x: %s", path, offset, e)
            _fail(getattr(e, "errno", None) or errno.EIO)

    # mfusepy registers an operation only if the class has it; these two exist so that it does, and
    # are what a plain mfusepy.FUSE would call (micdrv.fs.mount calls readinto and write_view).
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        buf = bytearray(size)
        return bytes(buf[:self.readinto(path, memoryview(buf), offset, fh)])

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self.write_view(path, memoryview(data), offset, fh)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        _root_only()
        h = self._handles.get(fh) if fh is not None else None
        if h is not None and h.image is not None:
            image = h.image
        else:
            name = path[1:]
            if name in self._attributes():
                return 0  # O_TRUNC on an attribute: nothing to do, as sysfs
            image = self._disks().get(name[len(BLOCK_DIR) + 1:]) if name.startswith(BLOCK_DIR + "/") else None
            if image is None:
                _fail(errno.ENOENT)
        if length != image.capacity * SECTOR:
            _fail(errno.EINVAL)  # a disk's size is its capacity; resizing is the device's business
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        h = self._handle(fh)
        if h.image is not None and not h.image.readonly:
            try:
                h.image.flush()
            except Exception as e:
                log.warning("%s: flush: %s", path, e)
                _fail(errno.EIO)
        return 0

    def release(self, path: str, fh: int) -> int:
        self._polls.forget(fh)
        with self._handles_lock:
            self._handles.pop(fh, None)
        return 0

    def poll(self, path: str, fh: int, ph, reventsp) -> int:
        h = self._handles.get(fh)
        mask = DEFAULT_POLLMASK
        if h is not None and h.attr is not None and h.attr.notify:
            if ph:
                self._polls.arm(fh, ph)  # before looking at the counter: a change in between still wakes
            if h.event != self._state_event:
                mask |= CHANGED
        elif ph:
            _lib.fuse_pollhandle_destroy(ph)
        reventsp[0] = mask
        return 0

    # --- the mount point's symlinks --------------------------------------------------------------
    def readlink(self, path: str) -> str:
        name = path[1:]
        if "/" in name or self._reserved(name) or self.mount_dir_fd is None:
            _fail(errno.EINVAL)
        return os.readlink(name, dir_fd=self.mount_dir_fd)

    def symlink(self, target: str, source: str) -> int:
        """``ln -s source target``: the link ``target`` pointing at ``source`` (mfusepy's names)."""
        _root_only()
        os.symlink(source, self._link_name(target), dir_fd=self.mount_dir_fd)
        return 0

    def rename(self, old: str, new: str) -> int:
        _root_only()
        src, dst = self._link_name(old), self._link_name(new)
        if self._lstat_link(src) is None:
            _fail(errno.ENOENT)
        try:
            if not stat.S_ISLNK(os.lstat(dst, dir_fd=self.mount_dir_fd).st_mode):
                _fail(errno.EEXIST)  # only a link may be replaced
        except FileNotFoundError:
            pass
        os.replace(src, dst, src_dir_fd=self.mount_dir_fd, dst_dir_fd=self.mount_dir_fd)
        return 0

    def unlink(self, path: str) -> int:
        _root_only()
        name = path[1:]
        if self._reserved(name) or name.startswith(BLOCK_DIR + "/"):
            _fail(errno.EPERM)
        name = self._link_name(path)
        if self._lstat_link(name) is None:
            _fail(errno.ENOENT)
        os.unlink(name, dir_fd=self.mount_dir_fd)
        return 0

    # --- life ------------------------------------------------------------------------------------
    def init(self, path: str) -> None:
        if self.on_mount is not None:
            self.on_mount()

    def destroy(self, path: str) -> None:
        self.detach()
