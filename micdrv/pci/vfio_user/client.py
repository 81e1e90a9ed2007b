"""The vfio-user client: a :class:`~micdrv.pci.PciDevice` whose device lives in another process.

:class:`VfioUserDevice` turns every PciDevice primitive into vfio-user
commands (spec 2.5) on one :class:`~.protocol.Connection`:

* connect, then VERSION 0.0 with our capabilities (spec 2.4), then
  DEVICE_GET_INFO with QEMU's defensive limits (spec 2.7);
* GET_REGION_INFO, re-asked with a bigger ``argsz`` when the capability
  chain did not fit (spec 2.5); an mmap-able region comes with one fd, mapped
  at ``region.offset + area.offset`` (spec 1.5, 2.5);
* REGION_READ/WRITE split into pieces of at most ``max_data_xfer_size``;
  posted writes go out NO_REPLY, one ``sendmsg`` each (spec 2.7). A posted
  write is processed before the reply to any later command (the server works
  in arrival order, spec 2.6) but is *not* ordered against accesses through
  an mmap, which never pass through the server;
* SET_IRQS with eventfds as SCM_RIGHTS, in chunks of at most the server's
  ``max_msg_fds``; a run of -1 goes with no fds, which de-assigns (spec 2.5,
  2.7);
* DMA_MAP passes the backing's memfd so the server maps the same pages
  (spec 2.6); with ``share_dma_fds=False`` no fd is passed and the server
  must come back with DMA_READ/DMA_WRITE, which this client serves against
  its own mappings, bounds-checked (EFAULT outside them).

DMA_READ/DMA_WRITE are served by whichever thread is waiting for a reply;
when no call is pending, either poll :meth:`fileno` and call
:meth:`process_events`, or :meth:`start_service_thread`. If the server goes
away every operation raises :class:`DisconnectedError`; the spec (2.6) asks a
client that reconnects to reset the device.
"""

from __future__ import annotations

import errno as _errno
import logging
import mmap as _mmap
import os
import socket
import threading
from typing import Sequence

from ..device import (REGION_MMAP, DeviceInfo, DmaBacking, DmaMapping, IrqInfo, PciDevice, RegionInfo,
                      SparseArea)
from ..errors import DisconnectedError, DmaMapError, ProtocolError, RegionError
from ..vfio_abi import (VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_TYPE_MASK,
                        decode_device_info, decode_irq_info, decode_region_info, region_info)
from .protocol import (DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS, DEFAULT_REPLY_TIMEOUT, DEVICE_GET_INFO,
                       DEVICE_GET_IRQ_INFO, DEVICE_GET_REGION_INFO, DEVICE_RESET, DEVICE_SET_IRQS, DMA_MAP,
                       DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_READ, DMA_UNMAP, DMA_WRITE, MESSAGE_SLACK,
                       REGION_READ, REGION_WRITE, REGION_WRITE_MULTI, VERSION, WRITE_MULTI_MAX_DATA,
                       WRITE_MULTI_MAX_ENTRIES, CommandError, Connection, Message, device_info, dma_map, dma_rw,
                       dma_unmap, irq_info, irq_set, region_rw, write_multi_count, write_multi_entry)
from .version import VERSION_MAJOR, VERSION_MINOR, Capabilities, check_reply, decode_version, encode_version

log = logging.getLogger(__name__)

MAX_REGIONS = 100  # QEMU's defensive limit on num_regions (spec 2.7)
MAX_IRQS = 50  # and on num_irqs (spec 2.7)
MAX_REGION_INFO = 64 << 10  # the most argsz we re-ask with; a longer chain is a broken server
CLIENT_MAX_MSG_FDS = 16  # what we can receive per message; QEMU offers 16 (spec 2.4)
_SMALL_WRITE = 8  # a register write: posted in one message without the splitting loop
_RW_SIZE = region_rw.size
_pack_rw, _unpack_rw = region_rw.pack, region_rw.unpack_from  # every register access: no attribute lookups


class VfioUserDevice(PciDevice):
    """A PCI device served over a vfio-user socket (spec section 2); ``name`` is the socket path.

    Prefer :meth:`connect`. ``sock`` is a connected AF_UNIX stream socket;
    ``timeout`` bounds every reply (QEMU's 5 s, spec 2.7);
    ``max_data_xfer_size`` is the largest transfer we accept (spec 2.4).
    """

    def __init__(self, sock: socket.socket, name: str, *, timeout: float = DEFAULT_REPLY_TIMEOUT,
                 max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE, share_dma_fds: bool = True):
        super().__init__()
        self.name = name
        self.share_dma_fds = share_dma_fds
        self._ours = Capabilities(max_msg_fds=CLIENT_MAX_MSG_FDS, max_data_xfer_size=max_data_xfer_size,
                                  max_dma_maps=DEFAULT_MAX_DMA_MAPS, pgsizes=4096, write_multiple=True)
        self._server = Capabilities()
        self._small_write = 0  # until VERSION has told us the server's max_data_xfer_size
        self._small_read = 0  # likewise: reads up to this size are one REGION_READ
        self._region_fds: dict[int, int] = {}
        self._dma_lock = threading.Lock()
        self._dma_views: dict[int, tuple[DmaMapping, _mmap.mmap | None]] = {}
        self._conn = Connection(sock, self._serve_server, name=name, reply_timeout=timeout,
                                max_msg_size=max_data_xfer_size + MESSAGE_SLACK)

    @classmethod
    def connect(cls, path: str, timeout: float = DEFAULT_REPLY_TIMEOUT, *,
                max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE, share_dma_fds: bool = True,
                service_thread: bool = False) -> "VfioUserDevice":
        """Connect to the server at ``path``, negotiate VERSION and read the device info.

        ``timeout`` bounds the connect and every reply. ``share_dma_fds=False``
        maps DMA memory without passing its fd, so the server must use
        DMA_READ/DMA_WRITE messages. ``service_thread`` starts
        :meth:`start_service_thread` (needed when the server may DMA while no
        call of ours is waiting, e.g. after posted writes, and DMA is not
        fd-shared).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            # The errno's text is in the message already; the detail only when there is no errno.
            raise DisconnectedError(f"connect to vfio-user socket {path}", "" if e.errno else str(e),
                                    errno=e.errno) from None
        dev = cls(sock, path, timeout=timeout, max_data_xfer_size=max_data_xfer_size, share_dma_fds=share_dma_fds)
        try:
            dev._negotiate()
            dev.info  # noqa: B018 -- DEVICE_GET_INFO right after VERSION, as QEMU does (spec 2.7)
        except BaseException:
            dev.close()
            raise
        if service_thread:
            dev.start_service_thread()
        return dev

    # --- connection -------------------------------------------------------------
    def _negotiate(self) -> None:
        step = f"vfio-user VERSION with {self.name}"
        proposed = (VERSION_MAJOR, VERSION_MINOR, self._ours)
        reply = self._conn.call(VERSION, encode_version(*proposed))
        answer = decode_version(reply.payload, step)
        check_reply(proposed, answer, step)
        self._server = answer[2]
        self.version = (answer[0], answer[1])
        self._small_write = min(_SMALL_WRITE, self.max_data_xfer_size)
        self._small_read = self.max_data_xfer_size

    @property
    def server_capabilities(self) -> Capabilities:
        return self._server

    @property
    def max_data_xfer_size(self) -> int:
        """The largest single REGION_READ/WRITE: the smaller of both sides' limits (spec 2.4)."""
        return min(self._ours.data_xfer_size, self._server.data_xfer_size)

    @property
    def iova_pgsize(self) -> int:
        pg = self._server.page_sizes
        return pg & -pg  # the smallest page size the server supports (spec 2.4 pgsizes)

    def fileno(self) -> int:
        return self._conn.fileno()

    def process_events(self) -> int:
        """Serve DMA_READ/DMA_WRITE and the replies to :meth:`read_async` that have arrived (and time out
        those overdue); call when :meth:`fileno` is readable."""
        return self._conn.process_events()

    @property
    def async_pending(self) -> int:
        return self._conn.async_pending

    def start_service_thread(self) -> threading.Thread:
        return self._conn.start_service_thread()

    @property
    def connection(self) -> Connection:
        return self._conn

    # --- device, regions, IRQs ---------------------------------------------------
    def _get_device_info(self) -> DeviceInfo:
        step = f"vfio-user DEVICE_GET_INFO on {self.name}"
        reply = self._conn.call(DEVICE_GET_INFO, device_info.pack(device_info.size, 0, 0, 0))
        info = decode_device_info(reply.payload)
        if info.num_regions > MAX_REGIONS or info.num_irqs > MAX_IRQS:
            raise ProtocolError(step, f"{info.num_regions} regions / {info.num_irqs} IRQ indices exceed "
                                f"the limits {MAX_REGIONS} / {MAX_IRQS}")
        return info

    def _get_region_info(self, index: int) -> RegionInfo:
        step = f"vfio-user GET_REGION_INFO {index} on {self.name}"
        argsz = region_info.size
        while True:
            reply = self._conn.call(DEVICE_GET_REGION_INFO, region_info.pack(argsz, 0, index, 0, 0, 0),
                                    max_reply_fds=1)
            fds = reply.take_fds()
            try:
                payload = reply.payload
                if len(payload) < region_info.size:
                    raise ProtocolError(step, f"reply of {len(payload)} bytes, need {region_info.size}")
                needed = region_info.unpack_from(payload)[0]
                if needed > len(payload):  # the chain did not fit: ask again with its size (spec 2.5)
                    if needed <= argsz or needed > MAX_REGION_INFO:
                        raise ProtocolError(step, f"server needs argsz {needed} after we offered {argsz}")
                    argsz = needed
                    continue
                info = decode_region_info(payload[:max(needed, region_info.size)], expected_index=index)
                if info.mmappable and not fds:
                    log.warning("%s: MMAP flag without an fd; using REGION_READ/WRITE only", step)
                    info = RegionInfo(info.index, info.flags & ~REGION_MMAP, info.size, info.offset, info.sparse,
                                      info.type)
                if info.mmappable:
                    old = self._region_fds.pop(index, None)
                    if old is not None:
                        _close(old)
                    self._region_fds[index] = fds.pop()
                return info
            finally:
                for fd in fds:
                    _close(fd)

    def _get_irq_info(self, index: int) -> IrqInfo:
        reply = self._conn.call(DEVICE_GET_IRQ_INFO, irq_info.pack(irq_info.size, 0, index, 0))
        return decode_irq_info(reply.payload, expected_index=index)

    def _region_read(self, index: int, offset: int, length: int) -> bytes:
        if length <= self._small_read:  # a register: one message, nothing to split, no text unless it fails
            p = self._conn.call(REGION_READ, _pack_rw(offset, index, length)).payload
            if len(p) == _RW_SIZE + length and _unpack_rw(p) == (offset, index, length):
                data = p[_RW_SIZE:]
                return data if data.__class__ is bytes else bytes(data)
            raise ProtocolError(f"vfio-user REGION_READ region {index} on {self.name}",
                                f"reply of {len(p)} bytes does not echo offset {offset:#x} count {length}")
        step = f"vfio-user REGION_READ region {index} on {self.name}"
        chunk = self.max_data_xfer_size
        pieces = []
        pos = 0
        while pos < length:
            n = min(length - pos, chunk)
            reply = self._conn.call(REGION_READ, region_rw.pack(offset + pos, index, n))
            p = reply.payload
            if len(p) != region_rw.size + n or region_rw.unpack_from(p) != (offset + pos, index, n):
                raise ProtocolError(step, f"reply of {len(p)} bytes does not echo offset {offset + pos:#x} count {n}")
            pieces.append(bytes(memoryview(p)[region_rw.size:]))
            pos += n
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_async(self, region: int, offset: int, size: int, callback) -> bool:
        """A sized read whose reply goes to ``callback(value, error)`` (see :meth:`PciDevice.read_async`).

        One REGION_READ sent with :meth:`~.protocol.Connection.call_async`;
        True: the reply is still to come -- whoever waits must call
        :meth:`process_events` when :meth:`fileno` is readable.
        """
        self._check_access(region, offset, size, write=False, size=size)
        if size > self._small_read:
            return super().read_async(region, offset, size, callback)
        name = self.name

        def done(reply, error, region=region, offset=offset, size=size) -> None:
            if error is not None:
                callback(None, error)
                return
            p = reply.payload
            if len(p) == _RW_SIZE + size and _unpack_rw(p) == (offset, region, size):
                callback(int.from_bytes(p[_RW_SIZE:], "little"), None)
                return
            callback(None, ProtocolError(f"vfio-user REGION_READ region {region} on {name}",
                                         f"reply of {len(p)} bytes does not echo offset {offset:#x} count {size}"))
        self._conn.call_async(REGION_READ, _pack_rw(offset, region, size), done)
        return True

    def _region_write(self, index: int, offset: int, data: bytes, posted: bool) -> None:
        if posted and len(data) <= self._small_write:  # a doorbell: one message, nothing to split
            self._conn.call(REGION_WRITE, _pack_rw(offset, index, len(data)) + data, no_reply=True)
            return
        step = f"vfio-user REGION_WRITE region {index} on {self.name}"
        chunk = self.max_data_xfer_size
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, chunk)
            payload = region_rw.pack(offset + pos, index, n) + view[pos:pos + n]
            reply = self._conn.call(REGION_WRITE, payload, no_reply=posted)
            if reply is not None:
                p = reply.payload
                if len(p) < region_rw.size or region_rw.unpack_from(p) != (offset + pos, index, n):
                    raise ProtocolError(step, f"reply does not echo offset {offset + pos:#x} count {n}")
            pos += n

    def write_multi(self, writes: Sequence[tuple[int, int, bytes]], *, posted: bool = True) -> None:
        """Several small writes ``(region, offset, data<=8 bytes)`` in REGION_WRITE_MULTI messages (spec 2.5).

        Needs the server's ``write_multiple`` capability; without it, falls
        back to one REGION_WRITE each.
        """
        self._check_open()
        for region, offset, data in writes:
            self._check_access(region, offset, len(data), write=True)
            if len(data) > WRITE_MULTI_MAX_DATA:
                raise ValueError(f"REGION_WRITE_MULTI entries carry at most {WRITE_MULTI_MAX_DATA} bytes")
        if not self._server.write_multiple:
            for region, offset, data in writes:
                self._region_write(region, offset, bytes(data), posted)
            return
        for i in range(0, len(writes), WRITE_MULTI_MAX_ENTRIES):
            batch = writes[i:i + WRITE_MULTI_MAX_ENTRIES]
            payload = write_multi_count.pack(len(batch)) + b"".join(
                write_multi_entry.pack(off, region, len(data), bytes(data)) for region, off, data in batch)
            self._conn.call(REGION_WRITE_MULTI, payload, no_reply=posted)

    def _mmap(self, info: RegionInfo, area: SparseArea) -> _mmap.mmap:
        step = f"mmap of region {info.index} area [{area.offset:#x}, +{area.size:#x}) of {self.name}"
        fd = self._region_fds.get(info.index)
        if fd is None:
            raise RegionError(step, "the server sent no fd for this region")
        off = info.offset + area.offset  # spec 1.5 / 2.5: mmap offset = region.offset + area.offset
        if off % _mmap.ALLOCATIONGRANULARITY:
            raise RegionError(step, f"mmap offset {off:#x} is not page-aligned")
        prot = _mmap.PROT_READ | (_mmap.PROT_WRITE if info.writable else 0)
        try:
            return _mmap.mmap(fd, area.size, _mmap.MAP_SHARED, prot, offset=off)
        except (OSError, ValueError) as e:
            raise RegionError(step, str(e), errno=getattr(e, "errno", None)) from None

    def _set_irqs(self, index: int, flags: int, start: int, count: int,
                  eventfds: Sequence[int] | None = None, bools: Sequence[bool] | None = None) -> None:
        def send(first: int, n: int, fds: Sequence[int] = (), data: bytes = b"") -> None:
            payload = irq_set.pack(irq_set.size + len(data), flags, index, first, n) + data
            self._conn.call(DEVICE_SET_IRQS, payload, fds)

        dtype = flags & VFIO_IRQ_SET_DATA_TYPE_MASK
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            fds = list(eventfds or ())
            if len(fds) != count:
                raise ValueError(f"{len(fds)} eventfds for {count} vectors")
            if count == 0:
                send(start, 0)
            limit = self._server.msg_fds
            i = 0
            while i < count:  # chunks of valid fds (<= max_msg_fds) or runs of -1 (spec 2.7)
                j = i
                if fds[i] < 0:
                    while j < count and fds[j] < 0:
                        j += 1
                    send(start + i, j - i)  # no fds: de-assign (spec 2.5)
                else:
                    while j < count and fds[j] >= 0 and j - i < limit:
                        j += 1
                    send(start + i, j - i, fds[i:j])
                i = j
        elif dtype == VFIO_IRQ_SET_DATA_BOOL:
            data = bytes(1 if b else 0 for b in (bools or ()))
            if len(data) != count:
                raise ValueError(f"{len(data)} booleans for {count} vectors")
            send(start, count, data=data)
        else:
            send(start, count)

    def _reset(self) -> None:
        self._conn.call(DEVICE_RESET)

    # --- DMA -------------------------------------------------------------------------
    def _dma_map(self, backing: DmaBacking, m: DmaMapping) -> None:
        step = f"vfio-user DMA_MAP of {m.size:#x} bytes at IOVA {m.iova:#x} on {self.name}"
        if len(self._dma) >= self._server.dma_maps:
            raise DmaMapError(step, f"the server allows {self._server.dma_maps} mappings", errno=_errno.ENOSPC)
        flags = (DMA_MAP_FLAG_READ if m.readable else 0) | (DMA_MAP_FLAG_WRITE if m.writable else 0)
        fd = backing.fd
        view = None
        if fd >= 0:  # our own view serves DMA_READ/DMA_WRITE for this range
            try:
                view = _mmap.mmap(fd, m.size, _mmap.MAP_SHARED, _mmap.PROT_READ | _mmap.PROT_WRITE, offset=m.offset)
            except (OSError, ValueError) as e:
                raise DmaMapError(step, f"cannot map the backing: {e}") from None
        share = self.share_dma_fds and fd >= 0
        with self._dma_lock:
            self._dma_views[m.iova] = (m, view)
        try:
            # spec 2.5: offset is the file offset inside the passed fd, 0 if none
            self._conn.call(DMA_MAP, dma_map.pack(dma_map.size, flags, m.offset if share else 0, m.iova, m.size),
                            [fd] if share else ())
        except BaseException:
            self._drop_view(m.iova)
            raise

    def _dma_unmap(self, m: DmaMapping) -> None:
        step = f"vfio-user DMA_UNMAP at IOVA {m.iova:#x} on {self.name}"
        reply = self._conn.call(DMA_UNMAP, dma_unmap.pack(dma_unmap.size, 0, m.iova, m.size))
        p = reply.payload
        if p and (len(p) < dma_unmap.size or dma_unmap.unpack_from(p)[2:] != (m.iova, m.size)):
            raise ProtocolError(step, "reply does not echo the unmapped range")  # spec 2.5: echoed 24 bytes
        self._drop_view(m.iova)

    def _drop_view(self, iova: int) -> None:
        with self._dma_lock:
            _m, view = self._dma_views.pop(iova, (None, None))
        if view is not None:
            try:
                view.close()
            except BufferError:
                pass  # a copy in flight still holds it; it unmaps when released

    def _dma_find(self, address: int, count: int, write: bool) -> memoryview:
        """The bytes of one mapping covering [address, +count) entirely, or EFAULT (caller holds the lock)."""
        for m, view in self._dma_views.values():
            if m.iova <= address and address + count <= m.iova + m.size:
                if view is None or (write and not m.writable) or (not write and not m.readable):
                    break
                off = address - m.iova
                return memoryview(view)[off:off + count]
        raise CommandError(_errno.EFAULT, f"DMA {'write' if write else 'read'} of [{address:#x}, +{count:#x}) "
                                          "is not inside one mapping")

    def _serve_server(self, msg: Message):
        """Handle a server->client command: DMA_READ and DMA_WRITE (spec 2.5, 2.6); the rest get ENOSYS."""
        if msg.fds:
            raise CommandError(_errno.EINVAL, "server commands carry no fds")  # spec 2.7
        p = msg.payload
        if msg.command not in (DMA_READ, DMA_WRITE):
            raise CommandError(_errno.ENOSYS, f"{msg.name} is not a server->client command")
        if len(p) < dma_rw.size:
            raise CommandError(_errno.EINVAL, f"{msg.name} payload of {len(p)} bytes")
        address, count = dma_rw.unpack_from(p)
        if count > self._ours.data_xfer_size:
            raise CommandError(_errno.EINVAL, f"{msg.name} of {count} bytes exceeds max_data_xfer_size")
        if msg.command == DMA_READ:
            if len(p) != dma_rw.size:
                raise CommandError(_errno.EINVAL, "DMA_READ carries no data")
            with self._dma_lock:
                src = self._dma_find(address, count, write=False)
                data = bytes(src)
                src.release()
            return dma_rw.pack(address, count) + data
        if len(p) != dma_rw.size + count:
            raise CommandError(_errno.EINVAL, f"DMA_WRITE of {count} bytes carries {len(p) - dma_rw.size}")
        with self._dma_lock:
            dst = self._dma_find(address, count, write=True)
            dst[:] = memoryview(p)[dma_rw.size:]
            dst.release()
        return dma_rw.pack(address, count)

    # --- lifetime --------------------------------------------------------------------
    def _close(self) -> None:
        self._conn.close()
        for fd in self._region_fds.values():
            _close(fd)
        self._region_fds.clear()
        for iova in list(self._dma_views):
            self._drop_view(iova)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
