"""The card's FUSE tree: /sys/class/mic/micN as files again, and the card's disks live (issue 6; spec 3.4, 3.5).

One mount per card at ``<fuse_dir>/<card>`` (default /run/micdrv/mic0), served
by the card's daemon from after its control socket listens until it stops:

=====================  =======  ==========================================================
file                   mode     read / write
=====================  =======  ==========================================================
family, stepping       0440     "x100", "C0" ...
state                  0640     the state; write boot, reset or shutdown (else EINVAL; the
                                action's own errno, e.g. EINVAL for a boot while online);
                                poll() wakes with POLLPRI|POLLERR on a change
shutdown_status        0440     nop, crashed, halted, poweroff, restart
heartbeat_enable       0640     0 or 1
cmdline, firmware,     0640     strings; bootmode only "linux" or "flash"
ramdisk, bootmode
log_buf_addr,          0640     hexadecimal card kernel addresses
log_buf_len
post_code              0440     the card's POST code (debugfs)
log                    0440     the card kernel's log; EINVAL unless booting, online or
                                shutting_down (debugfs log_buf)
block/<disk>           0600     the card's virtio-blk disks, through the card's own image
                                (0400 read-only: a write is EROFS)
=====================  =======  ==========================================================

Files are root's, readable by ``fuse_group`` (default ``socket_group``; neither:
root only); only root may write. :mod:`.attrs` has the sysfs details,
:mod:`.tree` the operations (disks, poll, the mount point's symlinks),
:mod:`.mount` mounting, unmounting and stale mounts.

:func:`serve` is what the daemon calls; :class:`FuseTree` is the tree itself.
"""

from __future__ import annotations

import grp
import logging
from typing import Callable

from .mount import FuseError, FuseMount, normalize, recover_stale

log = logging.getLogger(__name__)

__all__ = ["FuseError", "FuseTree", "serve"]


class FuseTree:
    """A card's tree mounted at ``mount_point``: :meth:`start`, then :meth:`close`.

    ``service`` is the card's :class:`~micdrv.service.CardService` (None: no attributes);
    ``block_images`` returns the card's open disks by name each time the tree looks
    (hot add and removal show at once); ``gid`` is the group that may read.
    """

    def __init__(self, mount_point: str, service=None, *, block_images: Callable[[], dict] | None = None,
                 gid: int = 0, name: str = "micdrv"):
        from .tree import CardTree  # loads libfuse3: only when a tree is wanted
        self.operations = CardTree(service, block_images=block_images, gid=gid)
        self._mount = FuseMount(self.operations, mount_point, fsname=f"micdrv:{name}")

    @property
    def mount_point(self) -> str:
        return self._mount.mount_point

    @property
    def alive(self) -> bool:
        return self._mount.alive

    def start(self) -> "FuseTree":
        try:
            self._mount.start()
        except BaseException:
            self.operations.detach()
            raise
        return self

    def close(self) -> None:
        self.operations.detach()
        self._mount.stop()

    def __enter__(self) -> "FuseTree":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def group_id(name: str | None) -> int:
    if not name:
        return 0
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise FuseError(f"fuse_group {name!r} is no group on this host") from None


def recover(config, card) -> None:
    """Detach a dead tree a killed daemon left at the card's mount point (:func:`.mount.recover_stale`).

    The daemon calls this first thing, before it opens the card's devices: the console's pty link
    lives in the mount point's directory, which a dead mount makes unreachable (ENOTCONN). Only a
    dead ``fuse.micdrv`` mount is touched; anything else there is logged and left for :func:`serve`.
    """
    path = str(config.fuse_path(card))
    try:
        recover_stale(normalize(path))
    except (FuseError, OSError) as e:
        log.warning("%s: %s", card.name, e)


def serve(service, config, block_images: Callable[[], dict] | None = None) -> FuseTree | None:
    """The daemon's tree for ``service``'s card as configured, mounted; None (logged) if off or failed.

    The daemon runs on without the tree when it cannot be mounted (no /dev/fuse, no libfuse3,
    the mount point in use): the control socket does everything the tree does. The disks are
    ``block_images``, else those of the service's devices (``service.devices.blk_images``, the
    card's :class:`micdrv.vop.devices.CardDevices`), else none.
    """
    card = service.card
    devices = getattr(service, "devices", None)
    if block_images is None and devices is not None:
        block_images = devices.blk_images
    if not config.settings.fuse:
        log.info("%s: the FUSE tree is off (fuse = false)", card.name)
        return None
    path = str(config.fuse_path(card))
    try:
        tree = FuseTree(path, service, block_images=block_images, gid=group_id(config.fuse_group),
                        name=card.name).start()
    except (FuseError, OSError, ImportError) as e:
        log.error("%s: no FUSE tree, the daemon goes on without it: %s", card.name, e)
        return None
    log.info("%s: FUSE tree at %s", card.name, tree.mount_point)
    return tree
