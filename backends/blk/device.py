"""The virtio-blk backend: requests from the card's queue onto a :class:`~.image.BlockImage` (virtio-legacy.md 3).

The QEMU ``contrib/vhost-user-blk`` shape: the request header from the
first 16 readable bytes, the status in the last writable byte, a switch
over IN / OUT / FLUSH / GET_ID / DISCARD / WRITE_ZEROES, UNSUPP for every
other type. Data moves with preadv/pwritev straight between the image and
the chain's views.

What the device does with a bad request (the card carries on in every
case; counters say what happened):

* range beyond capacity, data not a multiple of 512, a write to a
  read-only image, an I/O error from the file -> IOERR;
* unknown type, DISCARD/WRITE_ZEROES with unknown flags or too many
  segments -> UNSUPP;
* header shorter than 16 bytes -> IOERR (counted as malformed);
* no writable byte for the status -> the chain is returned with nothing
  written and counted as malformed. [virtio-legacy.md 6.3 calls this fatal;
  we keep the device running, as the task asks: the driver's request fails
  on its side, later requests work.]

Offered features: SEG_MAX (``seg_max`` = queue size - 2, so header + data +
status never exceed the ring, section 3.4), BLK_SIZE (512), FLUSH, RO for a
read-only image, and DISCARD + WRITE_ZEROES for a writable one. mpssd
offered only SEG_MAX (x100-host-abi.md 6.1).
"""

from __future__ import annotations

import logging
import os

from micdrv.config import BlkConfig
from micdrv.virtio import blk as B
from micdrv.virtio.device import VIRTIO_ID_BLOCK

from .. import iov
from ..backend import Backend
from ..virtqueue import Chain
from .image import BlockImage, ImageError

log = logging.getLogger(__name__)

QUEUE_SIZE = 128                  # x100-host-abi.md 6.1: 128-entry rings (MIC_VRING_ENTRIES)
MAX_DISCARD_SECTORS = 1 << 22     # 2 GiB per DISCARD / WRITE_ZEROES segment
DISCARD_SECTOR_ALIGNMENT = 8      # 4 KiB: hole punching works in pages
MAX_DISCARD_SEG = 1               # one range per request, as QEMU
_OUTHDR_UNPACK = B.OUTHDR.unpack


def default_serial(path: str) -> bytes:
    """The GET_ID string when none is configured: the image's file name, at most 20 ASCII bytes."""
    return os.path.basename(path).encode("ascii", "replace")[:B.VIRTIO_BLK_ID_BYTES]


class BlkBackend(Backend):
    """One virtio-blk device on one image (several images = several devices)."""

    device_id = VIRTIO_ID_BLOCK

    def __init__(self, image: BlockImage, name: str | None = None, serial: str | bytes | None = None,
                 queue_size: int = QUEUE_SIZE, discard: bool = True):
        super().__init__(name or f"blk:{os.path.basename(image.path)}")
        self.image = image
        if serial is None:
            self.serial = default_serial(image.path)
        else:
            self.serial = serial.encode("ascii") if isinstance(serial, str) else bytes(serial)
            if len(self.serial) > B.VIRTIO_BLK_ID_BYTES:
                raise ValueError(f"serial {self.serial!r} is longer than {B.VIRTIO_BLK_ID_BYTES} bytes")
        self.queue_size = queue_size
        self.discard = discard and not image.readonly
        self._c = dict.fromkeys(("read_requests", "read_bytes", "write_requests", "write_bytes", "flushes",
                                 "get_ids", "discards", "write_zeroes", "ioerr", "unsupp", "malformed"), 0)

    @classmethod
    def open(cls, path: str, readonly: bool = False, serial: str | None = None, name: str | None = None,
             **kw) -> "BlkBackend":
        """Open ``path`` as an image and serve it."""
        return cls(BlockImage(path, readonly), name, serial, **kw)

    @classmethod
    def from_config(cls, cfg: BlkConfig, **kw) -> "BlkBackend":
        """The device a ``[[card.<name>.blk]]`` entry describes (micdrv.config.BlkConfig)."""
        return cls.open(cfg.path, cfg.readonly, cfg.serial, **kw)

    # --- description --------------------------------------------------------------------------

    def device_features(self) -> int:
        f = (1 << B.VIRTIO_BLK_F_SEG_MAX) | (1 << B.VIRTIO_BLK_F_BLK_SIZE) | (1 << B.VIRTIO_BLK_F_FLUSH)
        if self.image.readonly:
            f |= 1 << B.VIRTIO_BLK_F_RO
        if self.discard:
            f |= (1 << B.VIRTIO_BLK_F_DISCARD) | (1 << B.VIRTIO_BLK_F_WRITE_ZEROES)
        return f

    def queue_sizes(self) -> tuple[int]:
        return (self.queue_size,)

    def config_space(self) -> bytes:
        c = B.virtio_blk_config()
        c.capacity = self.image.capacity
        c.seg_max = self.queue_size - 2
        c.blk_size = B.SECTOR_SIZE
        if self.discard:
            c.max_discard_sectors = MAX_DISCARD_SECTORS
            c.max_discard_seg = MAX_DISCARD_SEG
            c.discard_sector_alignment = DISCARD_SECTOR_ALIGNMENT
            c.max_write_zeroes_sectors = MAX_DISCARD_SECTORS
            c.max_write_zeroes_seg = MAX_DISCARD_SEG
            c.write_zeroes_may_unmap = 1
        return bytes(c)

    def describe(self) -> dict:
        return {**super().describe(), "path": self.image.path, "readonly": self.image.readonly,
                "capacity": self.image.capacity, "serial": self.serial.decode("ascii", "replace")}

    def counters(self) -> dict[str, int]:
        return dict(self._c)

    # --- capacity changes ---------------------------------------------------------------------

    def resize(self, size: int | None = None) -> bool:
        """Resize the image to ``size`` bytes (or re-read its size); tell the driver if the capacity changed."""
        before = self.image.capacity
        if size is None:
            self.image.refresh()
        else:
            self.image.resize(size)
        if self.image.capacity != before:
            self.config_changed()
            return True
        return False

    # --- requests -----------------------------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        self.queues[0].drain(self._request)

    def _request(self, chain: Chain) -> int:
        readable, writable = chain.readable, chain.writable
        # The shape Linux builds for a read (section 3.4): the 16-byte header alone, data, the status byte
        # alone last -- served with fewer calls; every other shape, and any other type, the general way.
        if (len(readable) == 1 and len(writable) >= 2 and len(readable[0]) == B.OUTHDR_SIZE
                and len(writable[-1]) == B.STATUS_SIZE):
            type_, _ioprio, sector = _OUTHDR_UNPACK(readable[0])
            if type_ == B.VIRTIO_BLK_T_IN:
                chain.tail = B.STATUS_SIZE
                n = chain.writable_len - B.STATUS_SIZE
                c = self._c
                st = B.VIRTIO_BLK_S_IOERR
                if self._in_range(sector, n):
                    try:
                        self.image.preadv(writable[:-1], sector * B.SECTOR_SIZE, n)
                        c["read_requests"] += 1
                        c["read_bytes"] += n
                        st = B.VIRTIO_BLK_S_OK
                    except (ImageError, OSError) as e:
                        log.warning("%s: request type %d at sector %d failed: %s", self.name, type_, sector, e)
                if st:
                    c["ioerr"] += 1
                    n = 0
                writable[-1][0] = st
                return n
        return self._request_any(chain)

    def _request_any(self, chain: Chain) -> int:
        c = self._c
        if chain.writable_len < B.STATUS_SIZE:
            c["malformed"] += 1
            log.warning("%s: request (head %d) has no writable status byte; returned unanswered", self.name,
                        chain.head)
            return 0
        data_in, status = iov.split_tail(chain.writable, B.STATUS_SIZE)
        chain.tail = B.STATUS_SIZE
        if chain.readable_len < B.OUTHDR_SIZE:
            c["malformed"] += 1
            status[0][0] = B.VIRTIO_BLK_S_IOERR
            return 0
        type_, _ioprio, sector = B.OUTHDR.unpack(iov.prefix(chain.readable, B.OUTHDR_SIZE))
        data_out = iov.split(chain.readable, B.OUTHDR_SIZE)[1]
        try:
            st, written = self._dispatch(type_, sector, data_out, chain.readable_len - B.OUTHDR_SIZE, data_in,
                                         chain.writable_len - B.STATUS_SIZE)
        except (ImageError, OSError) as e:
            log.warning("%s: request type %d at sector %d failed: %s", self.name, type_, sector, e)
            st, written = B.VIRTIO_BLK_S_IOERR, 0
        if st == B.VIRTIO_BLK_S_IOERR:
            c["ioerr"] += 1
        elif st == B.VIRTIO_BLK_S_UNSUPP:
            c["unsupp"] += 1
        status[0][0] = st
        return written

    def _dispatch(self, type_: int, sector: int, data_out: list, out_len: int, data_in: list,
                  in_len: int) -> tuple[int, int]:
        c = self._c
        img = self.image
        if type_ == B.VIRTIO_BLK_T_IN:
            if not self._in_range(sector, in_len):
                return B.VIRTIO_BLK_S_IOERR, 0
            img.preadv(data_in, sector * B.SECTOR_SIZE, in_len)
            c["read_requests"] += 1
            c["read_bytes"] += in_len
            return B.VIRTIO_BLK_S_OK, in_len
        if type_ == B.VIRTIO_BLK_T_OUT:
            if img.readonly or not self._in_range(sector, out_len):
                return B.VIRTIO_BLK_S_IOERR, 0
            img.pwritev(data_out, sector * B.SECTOR_SIZE, out_len)
            c["write_requests"] += 1
            c["write_bytes"] += out_len
            return B.VIRTIO_BLK_S_OK, 0
        if type_ == B.VIRTIO_BLK_T_FLUSH:
            img.flush()
            c["flushes"] += 1
            return B.VIRTIO_BLK_S_OK, 0
        if type_ == B.VIRTIO_BLK_T_GET_ID:
            n = iov.fill(data_in, self.serial.ljust(B.VIRTIO_BLK_ID_BYTES, b"\0"))
            c["get_ids"] += 1
            return B.VIRTIO_BLK_S_OK, n
        if type_ in (B.VIRTIO_BLK_T_DISCARD, B.VIRTIO_BLK_T_WRITE_ZEROES) and self.discard:
            return self._ranges(type_, data_out, out_len), 0
        return B.VIRTIO_BLK_S_UNSUPP, 0

    def _in_range(self, sector: int, length: int) -> bool:
        """Whole sectors, inside the capacity (section 3.4 device duties)."""
        return length % B.SECTOR_SIZE == 0 and sector + length // B.SECTOR_SIZE <= self.image.capacity

    def _ranges(self, type_: int, data_out: list, out_len: int) -> int:
        """DISCARD / WRITE_ZEROES: an array of ``virtio_blk_discard_write_zeroes`` (section 3.3)."""
        seg = B.DISCARD_WRITE_ZEROES.size
        if out_len == 0 or out_len % seg or out_len // seg > MAX_DISCARD_SEG:
            return B.VIRTIO_BLK_S_UNSUPP
        raw = iov.prefix(data_out, out_len)
        zeroes = type_ == B.VIRTIO_BLK_T_WRITE_ZEROES
        ranges = [B.DISCARD_WRITE_ZEROES.unpack_from(raw, i) for i in range(0, out_len, seg)]
        allowed = B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if zeroes else 0
        for sector, num, flags in ranges:
            if flags & ~allowed:
                return B.VIRTIO_BLK_S_UNSUPP
            if num > MAX_DISCARD_SECTORS or sector + num > self.image.capacity:
                return B.VIRTIO_BLK_S_IOERR
        for sector, num, flags in ranges:
            off, length = sector * B.SECTOR_SIZE, num * B.SECTOR_SIZE
            if zeroes:
                self.image.write_zeroes(off, length, unmap=bool(flags & B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
                self._c["write_zeroes"] += 1
            else:
                self.image.discard(off, length)
                self._c["discards"] += 1
        return B.VIRTIO_BLK_S_OK

    def close(self) -> None:
        self.image.close()
