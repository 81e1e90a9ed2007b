"""The card's virtio-blk driver: disks vda, vdb, ... (virtio-legacy.md 3; x100-host-abi.md 6.1, 6.4).

What Linux v5.x ``drivers/block/virtio_blk.c`` does, minus the block layer:

* **Features** (section 3.1): SEG_MAX, SIZE_MAX, RO, BLK_SIZE and FLUSH
  are acked when offered, with INDIRECT_DESC and EVENT_IDX; DISCARD,
  WRITE_ZEROES, TOPOLOGY, GEOMETRY, CONFIG_WCE and MQ are not (nothing here
  would use them). Config (section 3.2): ``capacity`` in 512-byte sectors,
  ``seg_max`` (absent or 0: one data segment per request, as the driver
  reads it), ``size_max`` (absent: segments of :data:`SEG_SIZE` [choice],
  where Linux would use the transport's DMA limit), ``blk_size``.
* **Requests** (sections 3.3, 3.4): one chain each -- the 16-byte
  ``virtio_blk_outhdr`` readable, the data segments (readable for OUT,
  writable for IN and GET_ID), the status byte writable and last. FLUSH
  carries no data, GET_ID 20 writable bytes. Header, status and data share
  one allocation of card memory per request (data 64-byte aligned).
  ``sector`` is 0 for every type but IN and OUT, as v5.x builds it. A
  request is at most :data:`MAX_REQUEST` bytes and ``seg_max`` segments;
  larger reads and writes are split (the block layer's
  ``max_hw_sectors``).
* **Completion**: on the queue's interrupt, every used chain's status byte
  is read; OK -> done, UNSUPP -> EOPNOTSUPP, anything else -> EIO. used.len
  is ignored, as Linux does (section 3.4). An IN request's data is copied
  once, from the request's card memory straight into the caller's buffer
  (``into``; else a new ``bytearray``) -- the block layer's one copy to the
  reader -- and the card memory is given back at once; or, for a request
  submitted with ``keep`` (:meth:`BlkDriver.read_stream`), not copied at
  all: the caller reads it where the device put it and gives the memory
  back (:meth:`BlkDriver.release`), as an ``O_DIRECT`` reader's buffer is
  the DMA target itself.
* **Card memory** for a request comes from the kernel heap; when the heap
  has no room, :meth:`BlkDriver.submit` waits for this disk's requests in
  flight to give some back (at most :data:`REQUEST_TIMEOUT`), as it waits
  for ring room, so one large read or write never fails for the heap's
  size; with nothing of its own in flight it fails with ENOMEM at once.
* **Disk names** are the lowest free ``vd<letter>`` in probe order, as the
  driver's ida does; a removed disk's name is reused by the next one.
* **Hot remove** (:meth:`BlkDriver.remove`): new requests fail with ENODEV
  at once; those in flight get :data:`REMOVE_WAIT` seconds to complete
  (the host is still serving them during a VOP remove), then the device is
  reset and whatever is left fails with EIO -- nobody waits forever.
* **Capacity change** (config interrupt): capacity re-read and logged
  ("detected capacity change from X to Y", as the block layer says).
* **A buggy host**: a used id that is not a request in flight, a used
  length beyond the chain, used.idx running ahead -> BAD_RING: every
  request in flight fails with EIO, the device is marked broken and FAILED;
  the card OS carries on.

The API is synchronous for the shell (:meth:`read`, :meth:`write`,
:meth:`flush`, :meth:`get_id`); :meth:`read_stream` hands each request's
data to a consumer in order (a hash, say; or nobody: ``dd of=/dev/null``)
in place, in the request's own card memory, and :meth:`write_stream` has a
producer fill each request's card memory in place (``dd if=/dev/zero``),
both keeping a window of requests in flight; :meth:`submit` and
:meth:`Request.wait` keep several requests in flight (the benchmarks' queue
depth).
"""

from __future__ import annotations

import collections
import errno
import struct
import threading
import time
from typing import TYPE_CHECKING

from micdrv.virtio import RingFull, VringError
from micdrv.virtio import blk as B
from micdrv.virtio.device import (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_ID_BLOCK,
                                  VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, feature_names)

from .virtio_bus import VirtioDevice, VirtioDriver, Virtqueue

if TYPE_CHECKING:
    from .drivers import CardDrivers

SECTOR = B.SECTOR_SIZE
SEG_SIZE = 128 << 10           # bytes per data segment without SIZE_MAX [choice]
MAX_REQUEST = 1 << 20          # bytes per request: Linux's default max_sectors_kb is 1280; a round 1 MiB [choice]
DATA_OFFSET = 64               # header at 0, status at 16, data from here (cache aligned)
REMOVE_WAIT = 5.0              # seconds in-flight requests get to finish on hot remove
REQUEST_TIMEOUT = 30.0         # the block layer's default request timeout
# Requests read_stream / write_stream keep in flight: 16 MiB of card memory at 1 MiB [choice: the VOP host
# serves batches of up to 8 MiB (its staging), 16 keep the next batch queued meanwhile]
STREAM_WINDOW = 16
CACHE_MAX = DATA_OFFSET + (64 << 10)   # requests up to this size keep their card memory for the next [choice]
# IN chains kept built per card address and read size (a cached request's memory comes back with the same
# addresses: its descriptors and indirect table are the same bytes every time, as blk-mq sets a tag's
# request up once) -- at most this many per size [choice: a few rings' worth]
CHAINS_MAX = 512

WANTED = sum(1 << b for b in (B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_SIZE_MAX, B.VIRTIO_BLK_F_RO,
                              B.VIRTIO_BLK_F_BLK_SIZE, B.VIRTIO_BLK_F_FLUSH, VIRTIO_RING_F_INDIRECT_DESC,
                              VIRTIO_RING_F_EVENT_IDX))
TYPE_NAMES = {B.VIRTIO_BLK_T_IN: "read", B.VIRTIO_BLK_T_OUT: "write", B.VIRTIO_BLK_T_FLUSH: "flush",
              B.VIRTIO_BLK_T_GET_ID: "get_id"}
_COUNTER = {B.VIRTIO_BLK_T_IN: "reads", B.VIRTIO_BLK_T_OUT: "writes", B.VIRTIO_BLK_T_FLUSH: "flushes",
            B.VIRTIO_BLK_T_GET_ID: "get_ids"}
_CFG = struct.Struct("<QII4xI")   # capacity @0, size_max @8, seg_max @12, blk_size @20 (section 3.2)


def _release_view(v: memoryview) -> None:
    """Let go of a view of card memory; one the consumer kept an export of is left to the collector."""
    try:
        v.release()
    except BufferError:
        pass


class BlkError(OSError):
    """A request that failed: ``errno`` says how (EIO, EOPNOTSUPP, ENODEV, EROFS, EINVAL)."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)


class HeapFull(BlkError):
    """No card memory for a request now (ENOMEM), from :meth:`BlkDriver.submit` told not to wait for it."""


def human_size(nbytes: int) -> str:
    """Linux's "1.05 MB/1.00 MiB" pair, as virtblk_update_capacity prints it (string_get_size)."""
    def scaled(div: int, units: tuple[str, ...]) -> str:
        v, i = float(nbytes), 0
        while v >= div and i < len(units) - 1:
            v, i = v / div, i + 1
        return f"{v:.2f} {units[i]}" if i else f"{nbytes} B"
    return (f"{scaled(1000, ('B', 'kB', 'MB', 'GB', 'TB', 'PB', 'EB'))}/"
            f"{scaled(1024, ('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'))}")


class Request:
    """One request in flight: its card memory, and how it ended.

    Completion is a lock held from submission until the request ends (:meth:`finish` releases it): a
    C-level wait and wake, where an Event is a Condition in Python on both sides -- a few microseconds
    per request at the benchmarks' queue depth.
    """

    __slots__ = ("type", "sector", "nbytes", "addr", "size", "status", "error", "data", "into", "_done",
                 "finished", "dev", "keep", "held")

    def __init__(self, type_: int, sector: int, nbytes: int, addr: int, size: int, into: memoryview | None = None,
                 dev: VirtioDevice | None = None, keep: bool = False):
        self.type, self.sector, self.nbytes, self.addr, self.size = type_, sector, nbytes, addr, size
        self.status: int | None = None
        self.error: BlkError | None = None
        self.data: bytearray | memoryview | None = None
        self.into = into              # where an IN request's data goes (None: a bytearray of its own)
        self.dev = dev                # the device whose card memory it holds
        self.keep = keep              # IN: the data stays in the request's card memory for the caller
        self.held = False             # ... and it does: completed OK, card memory not yet given back
        self.finished = False
        self._done = threading.Lock()
        self._done.acquire()

    def finish(self) -> None:
        """The request ended (its status, data or error set first); waiters wake. Idempotent."""
        if not self.finished:
            self.finished = True
            try:
                self._done.release()
            except RuntimeError:      # released meanwhile by another path (a reset racing a completion)
                pass

    @staticmethod
    def finish_all(reqs: list["Request"]) -> None:
        """:meth:`finish` for each of ``reqs``, every one marked finished before the first waiter wakes: a
        reaper woken by the first then finds the rest done too, as io_getevents returns every event the
        interrupt completed (woken one by one, it would reap the first alone and resubmit one request)."""
        ended = [r for r in reqs if not r.finished]
        for r in ended:
            r.finished = True
        for r in ended:
            try:
                r._done.release()
            except RuntimeError:      # released meanwhile by another path (a reset racing a completion)
                pass

    def wait(self, timeout: float = REQUEST_TIMEOUT) -> bytearray | memoryview | None:
        """Block until the request completed; its data (IN, GET_ID: ``into`` if given) or None; raises
        :class:`BlkError`."""
        if not self.finished:
            if not self._done.acquire(timeout=max(timeout, 0)):
                raise BlkError(errno.ETIMEDOUT, f"{TYPE_NAMES.get(self.type, self.type)} at sector "
                                                f"{self.sector}: no completion within {timeout:g} s")
            try:
                self._done.release()  # for the next waiter
            except RuntimeError:
                pass
        if self.error is not None:
            raise self.error
        return self.data


class BlkDriver(VirtioDriver):
    """One virtio-blk device as a disk (``vdX``)."""

    device_id = VIRTIO_ID_BLOCK
    name = "virtio_blk"

    def __init__(self, drivers: "CardDrivers"):
        self.drivers = drivers
        self.kernel = drivers.kernel
        self.disk = "vd?"
        self.dev: VirtioDevice | None = None
        self.vq: Virtqueue | None = None
        self.features = 0
        self.capacity = 0
        self.readonly = False
        self.can_flush = False
        self.seg_max = 1
        self.seg_size = SEG_SIZE
        self.max_request = SEG_SIZE
        self.blk_size = SECTOR
        self.broken: str | None = None
        self.removing = False
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._inflight: set[Request] = set()
        self._cache: list[tuple[int, int]] = []   # card memory (addr, size) of finished small requests
        self._chains: dict[int, dict[int, object]] = {}   # read size -> card address -> PreparedChain
        self._chains_ring = None                             # ... for this ring
        self._pool: list[bytearray] = []     # read_stream's buffers, kept for the next call (list ops are atomic)
        self.c = dict.fromkeys(("reads", "read_bytes", "writes", "write_bytes", "flushes", "get_ids", "errors",
                                "interrupts", "kicks", "ring_waits", "heap_waits"), 0)

    # --- probe ---------------------------------------------------------------------------------
    def probe(self, dev: VirtioDevice) -> None:
        acked = dev.host_features() & WANTED
        dev.finalize_features(acked)
        self.dev, self.features = dev, acked
        self._read_config()
        self.readonly = bool(acked >> B.VIRTIO_BLK_F_RO & 1)
        self.can_flush = bool(acked >> B.VIRTIO_BLK_F_FLUSH & 1)
        try:
            (self.vq,) = dev.find_vqs([self._interrupt])
        except BaseException:
            self.dev = None        # no queue: the disk was never up (a request says ENODEV, not a traceback)
            raise
        # header + data + status within the ring (section 3.4: keep seg_max <= num - 2)
        self.seg_max = max(1, min(self.seg_max, self.vq.num - 2))
        self.max_request = max(SECTOR, min(MAX_REQUEST, self.seg_max * self.seg_size) // SECTOR * SECTOR)
        self.disk = self.drivers.claim_disk(self)
        dev.set_status(dev.get_status() | VIRTIO_CONFIG_S_DRIVER_OK)
        self.kernel.printk(f"virtio_blk {dev.name}: [{self.disk}] {self.capacity} 512-byte logical blocks "
                           f"({human_size(self.capacity * SECTOR)})")
        if self.readonly:
            self.kernel.printk(f"virtio_blk {dev.name}: [{self.disk}] write protect is on")
        self.kernel.printk(f"virtio_blk {dev.name}: [{self.disk}] features "
                           f"{' '.join(feature_names(acked, B.FEATURE_NAMES))}; seg_max {self.seg_max}, "
                           f"{self.max_request // 1024} KiB per request")
        self.drivers.disk_up(self)

    def _read_config(self) -> None:
        capacity, size_max, seg_max, blk_size = _CFG.unpack(self.dev.read_config(0, _CFG.size).ljust(_CFG.size, b"\0"))
        f = self.features
        self.capacity = capacity
        self.seg_max = seg_max if f >> B.VIRTIO_BLK_F_SEG_MAX & 1 and seg_max else 1
        self.seg_size = max(SECTOR, size_max // SECTOR * SECTOR) if f >> B.VIRTIO_BLK_F_SIZE_MAX & 1 and size_max \
            else SEG_SIZE
        self.blk_size = blk_size if f >> B.VIRTIO_BLK_F_BLK_SIZE & 1 and blk_size else SECTOR

    # --- requests ----------------------------------------------------------------------------------
    def submit(self, type_: int, sector: int = 0, data: bytes | memoryview | None = None,
               nbytes: int = 0, into=None, fill=None, keep: bool = False, wait_heap: bool = True) -> Request:
        """Queue one request; returns with a :class:`Request` once it is on the ring (after waiting for ring
        or heap room, if there was none).

        IN: ``nbytes`` to read -- into the writable buffer ``into`` if given; with ``keep``, left in the
        request's card memory (:meth:`data_view`, then :meth:`release`). OUT: ``data``, or ``nbytes``
        that ``fill(view)`` writes straight into the request's card memory (nothing copied after).
        ``wait_heap=False``: with no heap room, :class:`HeapFull` at once (for a caller holding memory of
        its own that it must give back first), where otherwise the requests in flight are waited for."""
        if into is not None:
            into = memoryview(into).cast("B")
            if type_ != B.VIRTIO_BLK_T_IN or len(into) != nbytes or keep:
                raise ValueError(f"{self.disk}: 'into' is for IN requests, exactly nbytes ({nbytes}) long")
        if keep and type_ != B.VIRTIO_BLK_T_IN:
            raise ValueError(f"{self.disk}: 'keep' is for IN requests")
        if fill is not None and (type_ != B.VIRTIO_BLK_T_OUT or data is not None):
            raise ValueError(f"{self.disk}: 'fill' is for OUT requests without 'data'")
        if type_ == B.VIRTIO_BLK_T_OUT:
            if fill is None:
                nbytes = len(data)
        elif type_ == B.VIRTIO_BLK_T_GET_ID:
            nbytes = B.VIRTIO_BLK_ID_BYTES
        elif type_ != B.VIRTIO_BLK_T_IN:
            nbytes = 0
        if type_ not in (B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT):
            sector = 0
        if nbytes > self.max_request:
            raise ValueError(f"{self.disk}: {nbytes} bytes in one request, at most {self.max_request}")
        dev = self.dev
        if dev is None or self.removing:
            raise BlkError(errno.ENODEV, f"{self.disk}: the disk is gone")
        post = self._prepare(dev, type_, sector, nbytes, data, fill, into, keep, wait_heap)
        self._post(dev, [post])
        return post[0]

    def _prepare(self, dev: VirtioDevice, type_: int, sector: int, nbytes: int, data, fill, into, keep: bool,
                 wait_heap: bool) -> tuple[Request, list, list]:
        """A request's card memory (header, data) written and its chain's buffers, ready for :meth:`_post`."""
        size = DATA_OFFSET + nbytes
        addr = self._alloc(dev, size, wait_heap)
        req = Request(type_, sector, nbytes, addr, size, into, dev, keep)
        mem = dev.memory
        try:
            mem.write(addr, B.OUTHDR.pack(type_, 0, sector) + b"\xff")   # status 0xff until the device writes it
            if data is not None:
                mem.write(addr + DATA_OFFSET, data)
            elif fill is not None and nbytes:
                self._fill(mem, addr + DATA_OFFSET, nbytes, fill)
        except BaseException:
            self._give(dev, addr, size)
            raise
        segs = [(addr + DATA_OFFSET + o, min(self.seg_size, nbytes - o)) for o in range(0, nbytes, self.seg_size)]
        out, in_ = [(addr, B.OUTHDR_SIZE)], [(addr + B.OUTHDR_SIZE, B.STATUS_SIZE)]
        if type_ == B.VIRTIO_BLK_T_OUT:
            out += segs
        else:
            in_ = segs + in_
        return req, out, in_

    def submit_writes(self, sectors, nbytes: int, fill, wait_heap: bool = True) -> list[Request]:
        """OUT requests of ``nbytes`` each at ``sectors``, ``fill(view, sector)`` writing each one's data in
        its card memory, queued as one batch (one kick decision, as :meth:`submit_reads`). Returns the
        requests queued, in order: all of them, or those before one that could not be made -- no card
        memory for it, or its ``fill`` raised -- whose error is raised only when it is the first (for the
        first, no card memory waits as :meth:`submit` with ``wait_heap`` does). What was generated before
        a failing ``fill`` is written, as ``dd`` writes the blocks it read before a read error."""
        if nbytes > self.max_request or nbytes < 0:
            raise ValueError(f"{self.disk}: {nbytes} bytes in one request, at most {self.max_request}")
        dev = self.dev
        if dev is None or self.removing:
            raise BlkError(errno.ENODEV, f"{self.disk}: the disk is gone")
        posts = []
        for at in sectors:
            try:
                posts.append(self._prepare(dev, B.VIRTIO_BLK_T_OUT, at, nbytes, None,
                                           lambda v, at=at: fill(v, at), None, False, wait_heap and not posts))
            except Exception:
                if not posts:
                    raise
                break
            except BaseException:
                for req, _o, _i in posts:
                    self._give(dev, req.addr, req.size)
                raise
        return [p[0] for p in posts[:self._post(dev, posts)]]

    def submit_reads(self, sectors, nbytes: int, keep: bool = False, wait_heap: bool = True,
                     partial: bool = False) -> list[Request]:
        """IN requests of ``nbytes`` each at ``sectors``, queued as one batch: what blk-mq does for a plugged
        list (``virtio_queue_rqs``) -- every chain added under one lock round trip, then one kick decision for
        them all. Their data as :meth:`submit` gives it (a ``bytearray`` each; with ``keep`` in place, for
        :meth:`data_view` and :meth:`release_many`). Returns the requests queued, in order: all of them, or
        those before one that could not be (ring room timed out, the disk broken or removed; the error is
        raised when it is the first). No card memory for one fails the batch, none of it in flight
        (``wait_heap=False``: at once with :class:`HeapFull`, as :meth:`submit` does). With ``partial``, no
        card memory for a request after the first ends the batch there instead: those before it are
        queued and returned (blk-mq dispatching what it has tags for)."""
        if nbytes > self.max_request or nbytes < 0:
            raise ValueError(f"{self.disk}: {nbytes} bytes in one request, at most {self.max_request}")
        dev = self.dev
        if dev is None or self.removing:
            raise BlkError(errno.ENODEV, f"{self.disk}: the disk is gone")
        size, seg, mem, pack = DATA_OFFSET + nbytes, self.seg_size, dev.memory, B.OUTHDR.pack
        ring = self.vq.ring
        if self._chains_ring is not ring:         # a new ring (probe): its chains are built anew
            self._chains, self._chains_ring = {}, ring
        chains = self._chains.setdefault(nbytes, {})
        posts = []
        try:
            for sector in sectors:
                try:
                    addr = self._alloc(dev, size, wait_heap and not (partial and posts))
                except HeapFull:
                    if not (partial and posts):
                        raise
                    break
                req = Request(B.VIRTIO_BLK_T_IN, sector, nbytes, addr, size, None, dev, keep)
                chain = chains.get(addr)
                if chain is None:
                    chain = ring.prepare([(addr, B.OUTHDR_SIZE)],
                                         [(addr + DATA_OFFSET + o, min(seg, nbytes - o)) for o in range(0, nbytes, seg)]
                                         + [(addr + B.OUTHDR_SIZE, B.STATUS_SIZE)])
                    if len(chains) < CHAINS_MAX:
                        chains[addr] = chain
                posts.append((req, chain))
                mem.write(addr, pack(B.VIRTIO_BLK_T_IN, 0, sector) + b"\xff")   # status 0xff until written
        except BaseException:
            for req, _c in posts:
                self._give(dev, req.addr, req.size)
            raise
        return [p[0] for p in posts[:self._post_prepared(dev, posts)]]

    def _post_prepared(self, dev: VirtioDevice, posts: list) -> int:
        """:meth:`_post` for ``(request, PreparedChain)`` pairs: with room for all of them on a working disk,
        every chain placed by :meth:`~micdrv.virtio.driver.DriverRing.add_prepared_many` (one ``avail.idx``
        store) and one kick decision; otherwise :meth:`_post` does it, waiting for room."""
        ring = self.vq.ring
        need = 0
        for _r, chain in posts:
            need += 1 if chain.table is not None else len(chain.out) + len(chain.in_)
        with self._room:
            if self.broken is None and not self.removing and self.dev is not None and ring.num_free >= need:
                try:
                    ring.add_prepared_many([(chain, req) for req, chain in posts])
                except (VringError, RingFull) as e:
                    # some may be on the ring: failed with the ring, their memory not given back (BAD_RING)
                    self._inflight.update(req for req, _c in posts)
                    self._break(f"add: {e}")
                    raise BlkError(errno.EIO, f"{self.disk}: {e}") from None
                self._inflight.update(req for req, _c in posts)
                if self.vq.kick():
                    self.c["kicks"] += 1
                return len(posts)
        return self._post(dev, [(req, chain.out, chain.in_) for req, chain in posts])

    def _post(self, dev: VirtioDevice, posts: list) -> int:
        """Put ``(request, out, in)`` chains on the ring under one lock, waiting for room; one kick decision.
        Returns how many were added: all, or those before one that could not be (its error is raised only
        when it is the first). The card memory of every request not added is given back; the ring breaking
        fails those already added, as BAD_RING does."""
        ring = self.vq.ring
        per = [1 if ring.use_indirect and len(out) + len(in_) > 1 else len(out) + len(in_) for _r, out, in_ in posts]
        added = 0
        with self._room:
            try:
                for (req, out, in_), need in zip(posts, per):
                    while True:
                        if self.broken is not None or self.removing or self.dev is None:
                            raise BlkError(errno.EIO if self.broken else errno.ENODEV,
                                           f"{self.disk}: {self.broken or 'the disk is gone'}")
                        if ring.num_free >= need:
                            break
                        if added:             # let the device see what is queued before waiting for room
                            if self.vq.kick():
                                self.c["kicks"] += 1
                        self.c["ring_waits"] += 1
                        if not self._room.wait(REQUEST_TIMEOUT):
                            raise BlkError(errno.ETIMEDOUT, f"{self.disk}: no ring room within "
                                                            f"{REQUEST_TIMEOUT:g} s")
                    ring.add(out, in_, req)
                    self._inflight.add(req)
                    added += 1
            except (BlkError, VringError, RingFull) as e:
                for req, _o, _i in posts[added:]:
                    self._give(dev, req.addr, req.size)
                if isinstance(e, BlkError):
                    if not added:
                        raise
                    if self.vq.kick():
                        self.c["kicks"] += 1
                    return added
                self._break(f"add: {e}")
                raise BlkError(errno.EIO, f"{self.disk}: {e}") from None
            if self.vq.kick():
                self.c["kicks"] += 1
        return added

    def _fill(self, mem, addr: int, nbytes: int, fill) -> None:
        """``fill(view)`` on the card memory at ``addr`` itself; where the transport gives no view of it, on a
        buffer then copied there."""
        v = mem.view(addr, nbytes)
        if v is None:
            buf = self._take_buffer(self.max_request)
            try:
                mv = memoryview(buf)[:nbytes]
                fill(mv)
                mem.write(addr, mv)
            finally:
                self._give_buffer(buf)
            return
        try:
            fill(v)
        finally:
            _release_view(v)

    def _alloc(self, dev: VirtioDevice, size: int, wait: bool = True) -> int:
        """Card memory for a request; without room, wait for our requests in flight to give some back."""
        if self._cache:
            try:
                addr, had = self._cache.pop()
            except IndexError:            # emptied by another submitter meanwhile
                pass
            else:
                if had == size:
                    return addr
                dev.free(addr, had)
        try:
            return dev.alloc(size, 64)
        except MemoryError as e:
            self._drop_cache(dev)
            try:
                return dev.alloc(size, 64)
            except MemoryError:
                pass
            if not wait:
                raise HeapFull(errno.ENOMEM, f"{self.disk}: {e}") from None
        deadline = time.monotonic() + REQUEST_TIMEOUT
        with self._room:
            while True:
                if self.broken is not None or self.removing or self.dev is None:
                    raise BlkError(errno.EIO if self.broken else errno.ENODEV,
                                   f"{self.disk}: {self.broken or 'the disk is gone'}")
                try:
                    return dev.alloc(size, 64)
                except MemoryError as e:
                    if not self._inflight:   # nothing of ours will give memory back
                        raise BlkError(errno.ENOMEM, f"{self.disk}: {e}") from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BlkError(errno.ETIMEDOUT, f"{self.disk}: no card memory for {size} bytes within "
                                                    f"{REQUEST_TIMEOUT:g} s")
                self.c["heap_waits"] += 1
                self._room.wait(left)

    def _give(self, dev: VirtioDevice, addr: int, size: int) -> None:
        """Card memory of a request back: small ones are kept for the next requests (blk-mq allocates its
        requests' memory once per tag, not per I/O), up to a ring's worth; the rest go to the heap."""
        if size <= CACHE_MAX and dev is self.dev and not self.removing and len(self._cache) < self.vq.num:
            self._cache.append((addr, size))
        else:
            dev.free(addr, size)

    def _drop_cache(self, dev: VirtioDevice | None) -> None:
        """Every cached request buffer back to the heap."""
        while self._cache:
            try:
                addr, size = self._cache.pop()
            except IndexError:
                break
            if dev is not None:
                dev.free(addr, size)

    def _interrupt(self, vq: Virtqueue) -> None:
        """Completions (the transport's interrupt thread): status bytes read, waiters woken."""
        self.c["interrupts"] += 1
        with self._room:
            if self.broken is not None or self.dev is None:
                return
            try:
                done = vq.ring.get_all_used()
                ended: list[Request] = []
                try:
                    for req, _len in done:
                        self._complete(req, ended)
                finally:
                    Request.finish_all(ended)   # every one done before the first waiter wakes
            except VringError as e:
                self._break(str(e))
                return
            except Exception as e:    # card memory unreachable (a card reset) or a bug: fail, don't hang
                if not self.removing:
                    self._break(f"completion: {type(e).__name__}: {e}")
                return
            if done:
                self._room.notify_all()

    def _complete(self, req: Request, ended: list[Request]) -> None:
        """End ``req`` from its status byte (lock held); appended to ``ended`` for its waiters to be woken."""
        mem = self.dev.memory
        v = mem.view(req.addr + B.OUTHDR_SIZE, 1)    # a load where card memory maps (RingMemory), not a bus copy
        if v is None:
            st = mem.read(req.addr + B.OUTHDR_SIZE, 1)[0]
        else:
            st = v[0]
            v.release()
        req.status = st
        if st == B.VIRTIO_BLK_S_OK:
            if req.keep:
                req.held = True       # the caller reads it in place, then gives the memory back
            elif req.type in (B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_GET_ID):
                dst = req.into if req.into is not None else bytearray(req.nbytes)
                mem.read_into(req.addr + DATA_OFFSET, dst)
                req.data = dst
            key = _COUNTER.get(req.type)
            if key:
                self.c[key] += 1
            if req.type == B.VIRTIO_BLK_T_IN:
                self.c["read_bytes"] += req.nbytes
            elif req.type == B.VIRTIO_BLK_T_OUT:
                self.c["write_bytes"] += req.nbytes
        else:
            self.c["errors"] += 1
            what = TYPE_NAMES.get(req.type, str(req.type))
            code = errno.EOPNOTSUPP if st == B.VIRTIO_BLK_S_UNSUPP else errno.EIO
            name = {B.VIRTIO_BLK_S_IOERR: "IOERR", B.VIRTIO_BLK_S_UNSUPP: "UNSUPP"}.get(st, f"status {st:#x}")
            req.error = BlkError(code, f"{self.disk}: {what} at sector {req.sector}: {name}")
        self._finish(req, ended=ended)

    def _finish(self, req: Request, error: BlkError | None = None, ended: list[Request] | None = None) -> None:
        """``req`` is over (lock held): out of flight, its card memory back unless held; its waiters woken now,
        or -- ``ended`` given -- appended there for the caller to wake with the rest (:meth:`Request.finish_all`)."""
        if error is not None:
            req.error = error
            req.held = False
        self._inflight.discard(req)
        if not req.held:
            self._give(req.dev, req.addr, req.size)
        if ended is None:
            req.finish()
        else:
            ended.append(req)

    def data_view(self, req: Request) -> memoryview | None:
        """A completed ``keep`` request's data where the device put it (its card memory), or None where the
        transport gives no view of card memory. Valid until :meth:`release`."""
        if not req.held:
            raise ValueError(f"{self.disk}: the request holds no data")
        return req.dev.memory.view(req.addr + DATA_OFFSET, req.nbytes)

    def release(self, req: Request) -> None:
        """Give back the card memory of a completed ``keep`` request (no-op for any other). Idempotent."""
        with self._room:
            if not req.held:
                return
            req.held = False
            self._give(req.dev, req.addr, req.size)
            self._room.notify_all()

    def release_many(self, reqs) -> None:
        """:meth:`release` for each of ``reqs``, under one lock round trip; a ``keep`` request still in flight
        (its caller gives up on it) gives its card memory back itself when it completes."""
        with self._room:
            freed = False
            for req in reqs:
                if req.held:
                    req.held = False
                    self._give(req.dev, req.addr, req.size)
                    freed = True
                elif not req.finished:
                    req.keep = False
            if freed:
                self._room.notify_all()

    # --- the synchronous API ---------------------------------------------------------------------
    def _check_range(self, sector: int, count: int) -> None:
        if sector < 0 or count < 0 or sector + count > self.capacity:
            raise BlkError(errno.EINVAL, f"{self.disk}: sectors [{sector}, +{count}) beyond the end of the disk "
                                         f"({self.capacity} sectors)")

    def read(self, sector: int, count: int = 1, check: bool = True) -> bytearray:
        """``count`` sectors from ``sector``; with ``check=False`` the device, not the driver, judges the range."""
        out = bytearray(count * SECTOR)
        self.read_into(sector, out, check)
        return out

    def read_into(self, sector: int, buf, check: bool = True) -> None:
        """Fill ``buf`` (writable, whole sectors) from ``sector``: each request's data is copied once, into
        its place in ``buf``."""
        mv = memoryview(buf).cast("B")
        if len(mv) % SECTOR:
            raise BlkError(errno.EINVAL, f"{self.disk}: {len(mv)} bytes is not a whole number of sectors")
        if check:
            self._check_range(sector, len(mv) // SECTOR)
        step = self.max_request
        reqs = []
        try:
            for o in range(0, len(mv), step):
                part = mv[o:o + step]
                reqs.append(self.submit(B.VIRTIO_BLK_T_IN, sector + o // SECTOR, nbytes=len(part), into=part))
        except BaseException:
            self._wait_all(reqs, quiet=True)   # nothing left writing into the caller's buffer
            raise
        self._wait_all(reqs)

    def read_stream(self, sector: int, count: int, consume=None, window: int = STREAM_WINDOW,
                    check: bool = True) -> None:
        """Read ``count`` sectors from ``sector`` as ``dd bs=max_request iflag=direct`` with ``window``
        requests in flight would: ``consume(view)`` gets each request's data in order, in place -- a view of
        the request's own card memory, where the device's DMA put it, valid only during the call; the
        memory goes back to the heap after it. Nothing is copied (``O_DIRECT``: the reader's buffer is the
        DMA target). ``consume=None`` discards the data unread (``of=/dev/null``). Where the transport gives
        no view of card memory, each request's data is copied once into a reused buffer (a pool kept warm
        across calls). The first error stops submission; those in flight are waited for, then raised."""
        if check:
            self._check_range(sector, count)
        if count < 0:
            raise BlkError(errno.EINVAL, f"{self.disk}: {count} sectors")
        total = count * SECTOR
        window = max(1, window)
        pending: collections.deque[Request] = collections.deque()
        pos = 0
        try:
            while pos < total or pending:
                pos = self._refill(pending, window, sector, pos, total,
                                   lambda at, n, wait: self.submit_reads(at, n, keep=True, wait_heap=wait,
                                                                         partial=True))
                req = pending[0]
                req.wait()
                while True:        # reap what is done at the head of the window before refilling it
                    pending.popleft()
                    try:
                        if consume is not None:
                            self._consume(req, consume)
                    finally:
                        self.release(req)
                    if not pending or not pending[0].finished:
                        break
                    req = pending[0]
                    req.wait()     # finished: returns at once, raising a request's error as it would
        except BaseException:
            self._wait_all(list(pending), quiet=True)   # nothing left in flight on card memory we give back
            for r in pending:
                with self._room:
                    if not r.finished:    # still in flight (timed out): its completion gives the memory back
                        r.keep = False
                        continue
                self.release(r)
            raise

    def _refill(self, pending: collections.deque, window: int, sector: int, pos: int, total: int, submit) -> int:
        """A stream's window refilled as one batch (one avail.idx store, one kick decision), as blk-mq
        submits a plugged list: the device sees the whole batch at once, not one request per wake-up.
        ``submit(sectors, nbytes, wait_heap)`` queues them; the stream's new byte position is returned.
        The memory of requests done but not yet consumed comes back only once they are: with some
        pending, a full heap means reap first, not wait."""
        room = window - len(pending)
        if pos >= total or room <= 0:
            return pos
        n = min(self.max_request, total - pos)
        k = min(room, (total - pos) // n)
        try:
            reqs = submit([sector + (pos + i * n) // SECTOR for i in range(k)], n, not pending)
        except HeapFull:
            if not pending:
                raise
            return pos
        pending.extend(reqs)
        return pos + len(reqs) * n

    def _consume(self, req: Request, consume) -> None:
        v = self.data_view(req)
        if v is None:                     # no view of card memory: one copy, into a reused buffer
            buf = self._take_buffer(self.max_request)
            try:
                mv = memoryview(buf)[:req.nbytes]
                req.dev.memory.read_into(req.addr + DATA_OFFSET, mv)
                consume(mv)
            finally:
                self._give_buffer(buf)
            return
        try:
            consume(v)
        finally:
            _release_view(v)

    def write_stream(self, sector: int, count: int, fill, window: int = STREAM_WINDOW, check: bool = True) -> None:
        """Write ``count`` sectors at ``sector`` as ``dd bs=max_request oflag=direct`` from a generator with
        ``window`` requests in flight would: ``fill(view, sector)`` writes each request's data (the sectors
        from ``sector``) straight into the request's own card memory, the buffer the device's DMA reads --
        generated in place, nothing copied after. The first error stops submission; those in flight are
        waited for, then the first error is raised."""
        if check:
            if self.readonly:
                raise BlkError(errno.EROFS, f"{self.disk}: read-only disk")
            self._check_range(sector, count)
        if count < 0:
            raise BlkError(errno.EINVAL, f"{self.disk}: {count} sectors")
        total = count * SECTOR
        pending: collections.deque[Request] = collections.deque()
        pos = 0
        window = max(1, window)
        try:
            while pos < total or pending:
                pos = self._refill(pending, window, sector, pos, total,
                                   lambda at, n, wait: self.submit_writes(at, n, fill, wait_heap=wait))
                pending[0].wait()
                pending.popleft()
                while pending and pending[0].finished:   # reap what is done before refilling
                    pending.popleft().wait()
        except BaseException:
            self._wait_all(list(pending), quiet=True)
            raise

    def _take_buffer(self, size: int) -> bytearray:
        """A request-sized buffer from the pool (a new one if it is empty or the request size changed)."""
        pool = self._pool
        while pool:
            try:
                b = pool.pop()
            except IndexError:            # emptied by another reader meanwhile
                break
            if len(b) == size:
                return b
        return bytearray(size)

    def _give_buffer(self, buf: bytearray) -> None:
        if len(self._pool) < 2 * STREAM_WINDOW:
            self._pool.append(buf)

    def write(self, sector: int, data: bytes | memoryview, check: bool = True) -> None:
        """Write ``data`` (whole sectors) at ``sector``; a read-only disk refuses unless ``check=False``."""
        if len(data) % SECTOR:
            raise BlkError(errno.EINVAL, f"{self.disk}: {len(data)} bytes is not a whole number of sectors")
        if check:
            if self.readonly:
                raise BlkError(errno.EROFS, f"{self.disk}: read-only disk")
            self._check_range(sector, len(data) // SECTOR)
        mv = memoryview(data).cast("B")
        reqs = []
        try:
            for o in range(0, len(mv), self.max_request):
                reqs.append(self.submit(B.VIRTIO_BLK_T_OUT, sector + o // SECTOR, mv[o:o + self.max_request]))
        except BaseException:
            self._wait_all(reqs, quiet=True)
            raise
        self._wait_all(reqs)

    def flush(self) -> None:
        """FLUSH if the device offers it (without FLUSH there is no cache to flush, section 3.2)."""
        if self.can_flush:
            self.submit(B.VIRTIO_BLK_T_FLUSH).wait()

    def get_id(self) -> str:
        """GET_ID: the device's serial (up to 20 ASCII bytes, NUL-padded)."""
        raw = bytes(self.submit(B.VIRTIO_BLK_T_GET_ID).wait())
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    @staticmethod
    def _wait_all(reqs: list[Request], quiet: bool = False) -> None:
        """Wait for every request; raise the first error (unless ``quiet``)."""
        first_error = None
        for r in reqs:
            try:
                r.wait()
            except BlkError as e:
                first_error = first_error or e
        if first_error is not None and not quiet:
            raise first_error

    # --- a broken device, removal --------------------------------------------------------------------
    def _break(self, why: str) -> None:
        """BAD_RING (lock held): fail everything in flight; nothing more goes to the device."""
        if self.broken is not None:
            return
        self.broken = why
        self.kernel.printk(f"virtio_blk {self.dev.name}: [{self.disk}] BAD_RING: {why}; device marked broken")
        try:
            self.dev.set_status(self.dev.get_status() | VIRTIO_CONFIG_S_FAILED)
        except Exception:
            pass
        self.c["errors"] += len(self._inflight)
        for req in list(self._inflight):
            # The device may still write these buffers: they are not given back (leaked, as Linux leaks a
            # broken queue's buffers) -- only the waiters are released.
            self._inflight.discard(req)
            req.error = BlkError(errno.EIO, f"{self.disk}: device broken: {why}")
            req.finish()
        self._room.notify_all()
        self.drivers.changed()

    def remove(self) -> None:
        """Hot remove: refuse new requests, let those in flight finish (or fail them), reset, let go."""
        with self._room:
            self.removing = True
            deadline = time.monotonic() + REMOVE_WAIT
            while self._inflight and self.broken is None and time.monotonic() < deadline:
                self._room.wait(0.1)
            left = len(self._inflight)
        dev = self.dev
        if dev is not None:
            dev.reset()            # the device forgets the rest: their buffers are ours again
        with self._room:
            if left:
                self.kernel.printk(f"virtio_blk: [{self.disk}] {left} requests failed: disk removed")
            for req in list(self._inflight):
                self._finish(req, BlkError(errno.EIO, f"{self.disk}: disk removed with the request in flight"))
            if self.vq is not None:
                self.vq.ring.detach_unused()
            self._drop_cache(dev)
            self.dev = None
            self._room.notify_all()
        self.kernel.printk(f"virtio_blk: [{self.disk}] removed")
        self.drivers.disk_down(self)

    def shutdown(self) -> None:
        """Kernel power-off: flush the write cache (as sd_shutdown would), then as removed."""
        if self.dev is None:
            return
        try:
            if self.broken is None and not self.removing:
                self.flush()
        except BlkError as e:
            self.kernel.printk(f"virtio_blk: [{self.disk}] flush at shutdown failed: {e}")
        self.remove()

    def abandon(self) -> None:
        """The card was reset: release every waiter, touch nothing."""
        self.removing = True
        for req in list(self._inflight):
            req.error = BlkError(errno.ENODEV, f"{self.disk}: card reset")
            req.finish()

    def config_changed(self) -> None:
        dev = self.dev
        if dev is None:
            return
        before = self.capacity
        try:
            self._read_config()
        except Exception as e:
            self.kernel.printk(f"virtio_blk {dev.name}: [{self.disk}] reading the config space: {e}")
            return
        if self.capacity != before:
            self.kernel.printk(f"virtio_blk {dev.name}: [{self.disk}] new size: {self.capacity} 512-byte logical "
                               f"blocks ({human_size(self.capacity * SECTOR)})")
            self.kernel.printk(f"{self.disk}: detected capacity change from {before * SECTOR} to "
                               f"{self.capacity * SECTOR}")
            self.drivers.changed()

    def status(self) -> dict:
        return {"driver": self.name, "device": self.dev.name if self.dev else None, "disk": self.disk,
                "capacity": self.capacity, "readonly": self.readonly, "flush": self.can_flush,
                "seg_max": self.seg_max, "seg_size": self.seg_size, "max_request": self.max_request,
                "blk_size": self.blk_size, "features": feature_names(self.features, B.FEATURE_NAMES),
                "in_flight": len(self._inflight), "broken": self.broken, "counters": dict(self.c)}
