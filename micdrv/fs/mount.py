"""A FUSE mount point's life: find what is mounted there, recover a crashed daemon's mount, serve, unmount.

:class:`FuseMount` runs one :class:`mfusepy.FUSE` (libfuse3's ``fuse_main_real``
and its multi-threaded loop) on a thread of its own, so the daemon's main
thread keeps its signal handling and its systemd watchdog loop.

Mount options, and why:

* ``allow_other`` -- without it the kernel lets no one but the mounting user
  (root) into the tree, so the group that may read it could not. Root may set
  it without ``user_allow_other`` in /etc/fuse.conf.
* ``default_permissions`` -- the kernel checks every access against the mode,
  owner and group the tree reports, exactly as for sysfs files; the handlers
  check the caller's uid once more before anything that changes the card.
* ``direct_io`` (libfuse3 config) -- no page cache: a read of ``state`` asks the
  daemon every time (a sysfs attribute is generated at each read), and a
  disk the card writes is never shadowed by stale cached pages.
* ``attr_timeout=0``, ``entry_timeout=0`` -- sizes and the block/ listing
  follow the daemon at once (a disk resized or hot-removed).
* ``noexec``; libfuse adds ``nosuid,nodev``. ``fsname=micdrv:<card>``,
  ``subtype=micdrv``: the mount reads ``fuse.micdrv`` in /proc/self/mountinfo,
  which is how a stale mount is known to be one of ours.

Stopping is unmounting: ``umount2`` makes the kernel end the connection, the
loop's reads of /dev/fuse fail and ``fuse_main_real`` returns. A tree still in
use (a shell cd'd into it, a file open) cannot be unmounted (EBUSY): it is
detached (``MNT_DETACH``) so the path is free at once, and its connection is
aborted through fusectl (/sys/fs/fuse/connections) where that is mounted;
otherwise it ends when the daemon exits and the kernel closes /dev/fuse.

A daemon killed with SIGKILL leaves its mount behind; every access to it then
fails with ENOTCONN. :func:`recover_stale` lazily unmounts such a
``fuse.micdrv`` mount (``umount2(MNT_DETACH)``, what ``fusermount3 -uz``
does) before the next mount. A live mount, or a mount of anything else, is
left alone and the new mount refused.

libfuse 3.14.0 prints "Ignoring invalid max threads value 4294967295" at every
mount (its fuse_main_real passes an unset max_threads); harmless: the loop
keeps its default of at most 10 worker threads.

libfuse installs its own exit handler for SIGHUP, SIGINT and SIGTERM where
their disposition is still SIG_DFL (fuse_set_signal_handlers): a process that
mounts a tree must have its own handlers for those first (the daemon does),
or a SIGHUP silently unmounts the tree.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

FSTYPE = "fuse.micdrv"
MNT_DETACH = 2                 # include/linux/fs.h umount2 flag
FUSECTL = "/sys/fs/fuse/connections"
MOUNT_TIMEOUT = 20.0           # from starting the loop to the kernel's FUSE_INIT, on a loaded machine
STOP_TIMEOUT = 10.0            # for the loop to end once the connection is gone

_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


class FuseError(Exception):
    """The tree cannot be mounted (or the mount point is in use); the message says why."""


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (proc(5))."""

    mount_id: int
    dev: int          # st_dev of files in the mount (major:minor field)
    mount_point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as ``\ooo``."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if not sep or len(f) < 5 or len(r) < 2:
            continue
        major, minor = (int(x) for x in f[2].split(":"))
        out.append(MountEntry(int(f[0]), os.makedev(major, minor), _unescape(f[4]), r[0], _unescape(r[1])))
    return out


def mounts_at(path: str) -> list[MountEntry]:
    """The mounts stacked on ``path`` (absolute, normalised), bottom first."""
    with open("/proc/self/mountinfo") as f:
        return [m for m in parse_mountinfo(f.read()) if m.mount_point == path]


def normalize(path: str) -> str:
    """An absolute path with its parent's symlinks resolved, never touching ``path`` itself (it may be stale)."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def umount(path: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(path), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount2 {path}: {os.strerror(e)}")


def is_stale(path: str) -> bool:
    """True if ``path`` is a mount point whose FUSE server is gone (every access: ENOTCONN)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def recover_stale(path: str) -> int:
    """Lazily unmount crashed micdrv mounts on ``path``; FuseError for a live mount or a foreign one.

    Returns how many stale mounts were removed.
    """
    removed = 0
    while True:
        stack = mounts_at(path)
        if not stack:
            return removed
        top = stack[-1]
        if not is_stale(path):
            what = "a live micdrv tree (is another daemon serving this card?)" if top.fstype == FSTYPE \
                else f"a {top.fstype} file system ({top.source})"
            raise FuseError(f"{path}: already mounted: {what}")
        if top.fstype != FSTYPE:
            raise FuseError(f"{path}: a dead {top.fstype} mount ({top.source}) that is not micdrv's; "
                            f"unmount it (fusermount3 -uz {path})")
        log.warning("%s: the FUSE tree of a daemon that died is still mounted (ENOTCONN); unmounting it", path)
        try:
            umount(path, MNT_DETACH)
        except OSError as e:
            raise FuseError(f"{path}: cannot unmount the stale tree: {e.strerror}") from None
        removed += 1


def abort_connection(dev: int) -> bool:
    """End a FUSE connection through fusectl, if it is mounted (its directory is the connection's dev)."""
    path = os.path.join(FUSECTL, str(os.minor(dev) | (os.major(dev) << 20)), "abort")
    try:
        with open(path, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def _fuse_class():
    """mfusepy's FUSE with read and write straight between libfuse's buffer and the file system.

    mfusepy's own read takes bytes from the file system and copies them into libfuse's buffer,
    and its write copies the buffer into bytes first. An Operations object with ``readinto(path,
    view, offset, fh)`` / ``write_view(path, view, offset, fh)`` gets a memoryview of libfuse's
    buffer instead (valid only during the call), so a disk read is one preadv into it.
    """
    import mfusepy

    class Fuse(mfusepy.FUSE):
        def read(self, path, buf, size, offset, fip):
            into = getattr(self.operations, "readinto", None)
            if into is None:
                return super().read(path, buf, size, offset, fip)
            view = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))).cast("B")
            return into(None if path is None else path.decode(self.encoding, self.errors), view, offset,
                        fip.contents.fh)

        def write(self, path, buf, size, offset, fip):
            write_view = getattr(self.operations, "write_view", None)
            if write_view is None:
                return super().write(path, buf, size, offset, fip)
            view = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))).cast("B")
            return write_view(None if path is None else path.decode(self.encoding, self.errors), view, offset,
                              fip.contents.fh)

    return Fuse


class FuseMount:
    """``operations`` (an mfusepy Operations) served at ``mount_point`` on a thread until :meth:`stop`."""

    def __init__(self, operations, mount_point: str, fsname: str):
        self.operations = operations
        self.mount_point = normalize(mount_point)
        self.fsname = fsname
        self.created = False           # we made the directory: remove it at stop
        self.dev: int | None = None
        self._dir_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._mounted = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        """Recover a stale mount, make the directory if needed, mount and wait for the kernel's FUSE_INIT."""
        recover_stale(self.mount_point)
        try:
            os.mkdir(self.mount_point, 0o755)
            self.created = True
        except FileExistsError:
            if not os.path.isdir(self.mount_point):
                raise FuseError(f"{self.mount_point}: exists and is not a directory") from None
        except OSError as e:
            raise FuseError(f"{self.mount_point}: cannot make the mount point: {e.strerror}") from None
        self.operations.on_mount = self._mounted.set  # called from the file system's init (FUSE_INIT)
        # The directory under the mount, for the tree's pass-through symlinks (micdrv.fs.tree).
        self._dir_fd = os.open(self.mount_point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.operations.mount_dir_fd = self._dir_fd

        def serve():
            try:
                _fuse_class()(self.operations, self.mount_point, foreground=True, allow_other=True,
                             default_permissions=True, direct_io=True, noexec=True, attr_timeout=0,
                             entry_timeout=0, fsname=self.fsname, subtype="micdrv")
            except BaseException as e:  # the mount failed, or the loop ended with an error
                self._error = e
            finally:
                self._mounted.set()

        self._thread = threading.Thread(target=serve, name=f"fuse {self.mount_point}", daemon=True)
        self._thread.start()
        self._mounted.wait(MOUNT_TIMEOUT)
        stack = mounts_at(self.mount_point)
        if not self._thread.is_alive() or not stack or stack[-1].fstype != FSTYPE:
            self.stop()
            why = f": {self._error}" if self._error else " (see libfuse's message above)"
            raise FuseError(f"{self.mount_point}: mounting the FUSE tree failed{why}")
        self.dev = stack[-1].dev

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Unmount (detach if busy), wait for the loop to end, remove the directory if we made it."""
        wait = STOP_TIMEOUT
        if self._thread is not None and self.dev is not None and self._ours_on_top():
            try:
                umount(self.mount_point)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    log.error("%s: %s", self.mount_point, e.strerror)
                else:
                    log.warning("%s: the tree is in use; detaching it", self.mount_point)
                    try:
                        umount(self.mount_point, MNT_DETACH)
                    except OSError as e2:
                        log.error("%s: %s", self.mount_point, e2.strerror)
                    if not abort_connection(self.dev):
                        # The loop serves the open files until they close or this process exits.
                        log.warning("%s: no fusectl at %s to end the detached tree's connection: its open "
                                    "files fail once the daemon exits", self.mount_point, FUSECTL)
                        wait = 0
        if self._thread is not None:
            self._thread.join(wait)
            if not self._thread.is_alive() and self._dir_fd is not None:
                os.close(self._dir_fd)
                self._dir_fd = None
            elif wait:
                log.warning("%s: the FUSE loop is still running", self.mount_point)
        if self.created:
            try:
                os.rmdir(self.mount_point)
                self.created = False
            except OSError as e:
                log.info("%s: mount point left in place: %s", self.mount_point, e.strerror)

    def _ours_on_top(self) -> bool:
        stack = mounts_at(self.mount_point)
        return bool(stack) and stack[-1].dev == self.dev
