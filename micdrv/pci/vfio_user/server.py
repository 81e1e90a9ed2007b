"""The vfio-user server: serves one :class:`~.model.DeviceModel` on a UNIX socket.

:class:`VfioUserServer` listens on a socket path, accepts one client at a
time (spec 2.1: one connection per client/device) and answers its commands
(spec 2.5) from the model:

* VERSION first (anything else before it gets EINVAL); the answer is major 0,
  minor ``min(client's, ours)`` and a subset of the client's capabilities
  carrying our limits (spec 2.4);
* DEVICE_GET_INFO, GET_REGION_INFO (with exactly one fd for an mmap-able
  region, as QEMU expects, spec 2.7; the kernel's short answer when the
  client's ``argsz`` is too small for the capability chain, spec 1.5),
  GET_IRQ_INFO, SET_IRQS (:mod:`.irqs`), REGION_READ/WRITE and
  REGION_WRITE_MULTI (:mod:`.regions`), DMA_MAP/DMA_UNMAP (:mod:`.dma`),
  DEVICE_RESET (config space to power-on values, then ``model.reset()``);
* a malformed command (wrong payload size, unknown region, bad offsets,
  unexpected fds) gets an ERROR reply with EINVAL, an unknown command ENOSYS;
  the server keeps running. A framing error drops that client.

When the client goes away, all DMA mappings are removed and all IRQ eventfds
closed, the device state is kept, and the next client is accepted (spec 2.6).

Run it with :meth:`VfioUserServer.serve` (blocking), or :meth:`start` it in
a thread and :meth:`stop` it.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import select
import socket
import stat
import threading

from ..device import CONFIG, REGION_MMAP, RegionInfo
from ..device import REGION_READ as REGION_FLAG_READ  # flag bits; REGION_READ/WRITE here are commands
from ..device import REGION_WRITE as REGION_FLAG_WRITE
from ..errors import DisconnectedError, ProtocolError
from ..vfio_abi import (VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_PCI_NUM_REGIONS,
                        VFIO_REGION_INFO_FLAG_CAPS, encode_region_info, region_info)
from .dma import DmaSpace
from .irqs import Interrupts
from .model import DeviceModel
from .protocol import (DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS, DEFAULT_REPLY_TIMEOUT, DEVICE_GET_INFO,
                       DEVICE_GET_IRQ_INFO, DEVICE_GET_REGION_INFO, DEVICE_RESET, DEVICE_SET_IRQS, DMA_MAP,
                       DMA_UNMAP, DMA_UNMAP_FLAG_ALL, DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, FLAGS_NO_REPLY, MESSAGE_SLACK,
                       REGION_READ, REGION_WRITE, REGION_WRITE_MULTI, VERSION, WRITE_MULTI_MAX_DATA,
                       WRITE_MULTI_MAX_ENTRIES, CommandError, Connection, Message, device_info, dma_map, dma_unmap,
                       irq_info, irq_set, region_rw, write_multi_count, write_multi_entry)
from .regions import ConfigRegion, Region
from .version import VERSION_MAJOR, VERSION_MINOR, Capabilities, decode_version, encode_version, negotiate

log = logging.getLogger(__name__)

SERVER_MAX_MSG_FDS = 16  # fds we accept per message (a SET_IRQS chunk); QEMU's ceiling (spec 2.4)
_RW_SIZE = region_rw.size
_unpack_rw = region_rw.unpack_from  # REGION_WRITE is every doorbell: no attribute lookups for it


class VfioUserServer:
    """Serve ``model`` on ``socket_path``; a stale socket file there is replaced.

    ``max_data_xfer_size`` is the largest REGION_READ/WRITE we accept (spec
    2.4); ``reply_timeout`` bounds our DMA_READ/WRITE calls to the client.
    """

    def __init__(self, model: DeviceModel, socket_path: str | os.PathLike, *,
                 max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE, max_msg_fds: int = SERVER_MAX_MSG_FDS,
                 max_dma_maps: int = DEFAULT_MAX_DMA_MAPS, reply_timeout: float = DEFAULT_REPLY_TIMEOUT):
        self.model = model
        self.path = os.fspath(socket_path)
        self.caps = Capabilities(max_msg_fds=max_msg_fds, max_data_xfer_size=max_data_xfer_size,
                                 max_dma_maps=max_dma_maps, pgsizes=4096, write_multiple=True)
        self.reply_timeout = reply_timeout
        self._max_xfer = self.caps.data_xfer_size
        self.irqs = Interrupts(model.irq_vector_counts())
        self.dma = DmaSpace(max_maps=max_dma_maps)
        self.regions: dict[int, Region] = dict(model.regions)
        self.regions.setdefault(CONFIG, ConfigRegion(model.config))
        self.num_regions = max(VFIO_PCI_NUM_REGIONS, max(self.regions) + 1)
        self.clients = 0  # clients accepted so far
        self.last_error: Exception | None = None  # why the last client connection ended
        self._client_caps: Capabilities | None = None
        self._conn: Connection | None = None
        self._listener: socket.socket | None = None
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop_requested = threading.Event()
        self._thread: threading.Thread | None = None
        self._handlers = {
            VERSION: self._version, DEVICE_GET_INFO: self._device_info, DEVICE_GET_REGION_INFO: self._region_info,
            DEVICE_GET_IRQ_INFO: self._irq_info, DEVICE_SET_IRQS: self._set_irqs, REGION_READ: self._region_read,
            REGION_WRITE: self._region_write, REGION_WRITE_MULTI: self._write_multi, DMA_MAP: self._dma_map,
            DMA_UNMAP: self._dma_unmap, DEVICE_RESET: self._reset,
        }
        model.attach(self)

    # --- lifetime -----------------------------------------------------------------
    def listen(self) -> None:
        """Create the listening socket (replacing a stale socket file); idempotent."""
        if self._listener is not None:
            return
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(_errno.EEXIST, "not a socket; refusing to replace it", self.path)
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            sock.listen(1)
        except BaseException:
            sock.close()
            raise
        self._listener = sock

    def serve(self) -> None:
        """Accept and serve clients, one at a time, until :meth:`stop`."""
        self.listen()
        p = select.poll()
        p.register(self._listener.fileno(), select.POLLIN)
        p.register(self._stop, select.POLLIN)
        while True:
            ready = p.poll()
            if self._stop_requested.is_set() or any(fd == self._stop for fd, _ev in ready):
                return
            try:
                sock, _addr = self._listener.accept()
            except OSError as e:
                log.warning("%s: accept failed: %s", self.path, e)
                continue
            self._serve_client(sock)

    def start(self) -> threading.Thread:
        """Listen now and serve from a daemon thread (for tests and in-process use)."""
        self.listen()
        self._thread = threading.Thread(target=self.serve, name=f"vfio-user server {self.path}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        """Make :meth:`serve` return (dropping a connected client); joins the :meth:`start` thread."""
        self._stop_requested.set()
        if self._stop >= 0:
            os.eventfd_write(self._stop, 1)  # stays readable: wakes the accept loop and the client loop
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def close(self) -> None:
        """Stop, remove the socket file and release the model's region memory."""
        self.stop()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.model.close()
        if self._stop >= 0:
            os.close(self._stop)
            self._stop = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._conn is not None

    # --- one client ---------------------------------------------------------------
    def _serve_client(self, sock: socket.socket) -> None:
        self.clients += 1
        conn = Connection(sock, self._handle, name=f"{self.path} client {self.clients}",
                          reply_timeout=self.reply_timeout, max_msg_size=self.caps.data_xfer_size + MESSAGE_SLACK)
        self._conn = conn
        self._client_caps = None
        self.dma.attach(conn)
        try:
            self.model.connected()
        except Exception:
            log.exception("%s: model.connected failed", self.path)
        try:
            conn.serve_forever(wake_fd=self._stop)
        finally:
            self.last_error = conn.error
            if conn.error is not None and not isinstance(conn.error, DisconnectedError):
                log.warning("%s: dropped the client: %s", self.path, conn.error)
            self.dma.attach(None)
            self.dma.unmap_all()  # spec 2.6: unmap everything, close eventfds, keep device state
            self.irqs.close_all()
            conn.close()
            self._conn = None
            try:
                self.model.disconnected()
            except Exception:
                log.exception("%s: model.disconnected failed", self.path)

    def _handle(self, msg: Message):
        handler = self._handlers.get(msg.command)
        if handler is None:
            raise CommandError(_errno.ENOSYS, f"{msg.name} is not served")
        if self._client_caps is None and msg.command != VERSION:
            raise CommandError(_errno.EINVAL, "VERSION must come first")  # spec 2.4
        if msg.fds and msg.command not in (DMA_MAP, DEVICE_SET_IRQS):
            raise CommandError(_errno.EINVAL, f"{msg.name} carries no fds")  # spec 2.3 fd column
        return handler(msg)

    # --- commands (spec 2.5) -------------------------------------------------------
    def _version(self, msg: Message):
        if self._client_caps is not None:
            raise CommandError(_errno.EINVAL, "VERSION was already negotiated")
        try:
            major, minor, caps = decode_version(msg.payload, f"VERSION from {self.path} client")
        except ProtocolError as e:
            raise CommandError(_errno.EINVAL, str(e)) from None
        if major != VERSION_MAJOR:
            raise CommandError(_errno.EINVAL, f"major version {major}, we speak {VERSION_MAJOR}")
        self._client_caps = caps
        self.dma.attach(self._conn, caps.data_xfer_size)
        return encode_version(VERSION_MAJOR, min(minor, VERSION_MINOR), negotiate(self.caps, caps))

    def _device_info(self, msg: Message):
        if len(msg.payload) < device_info.size or device_info.unpack_from(msg.payload)[0] < device_info.size:
            raise CommandError(_errno.EINVAL, "DEVICE_GET_INFO needs the 16-byte struct with argsz >= 16")
        flags = VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI
        return device_info.pack(device_info.size, flags, self.num_regions, self.irqs.num_irqs)

    def _region_info(self, msg: Message):
        p = msg.payload
        if len(p) < region_info.size:
            raise CommandError(_errno.EINVAL, f"GET_REGION_INFO payload of {len(p)} bytes")
        argsz, _flags, index, _cap, _size, _off = region_info.unpack_from(p)
        if argsz < region_info.size or index >= self.num_regions:
            raise CommandError(_errno.EINVAL, f"GET_REGION_INFO argsz {argsz} index {index}")
        region = self.regions.get(index)
        info = region.info(index) if region is not None else RegionInfo(index, 0, 0)  # absent: size 0 (spec 1.3)
        full = encode_region_info(info)
        if argsz < len(full):  # the chain does not fit: say how much is needed (spec 1.5, 2.5)
            reply = region_info.pack(len(full), info.flags | VFIO_REGION_INFO_FLAG_CAPS, index, 0, info.size,
                                     info.offset)
        else:
            reply = full
        if region is not None and region.flags & REGION_MMAP and region.fd is not None:
            return reply, [region.fd]  # exactly one fd (spec 2.7)
        return reply

    def _irq_info(self, msg: Message):
        if len(msg.payload) < irq_info.size:
            raise CommandError(_errno.EINVAL, f"GET_IRQ_INFO payload of {len(msg.payload)} bytes")
        argsz, _flags, index, _count = irq_info.unpack_from(msg.payload)
        if argsz < irq_info.size or index >= self.irqs.num_irqs:
            raise CommandError(_errno.EINVAL, f"GET_IRQ_INFO argsz {argsz} index {index}")
        return irq_info.pack(irq_info.size, self.irqs.flags(index), index, self.irqs.count(index))

    def _set_irqs(self, msg: Message):
        p = msg.payload
        if len(p) < irq_set.size:
            raise CommandError(_errno.EINVAL, f"SET_IRQS payload of {len(p)} bytes")
        argsz, flags, index, start, count = irq_set.unpack_from(p)
        if argsz != len(p):
            raise CommandError(_errno.EINVAL, f"SET_IRQS argsz {argsz} but {len(p)} payload bytes")
        if len(msg.fds) > self.caps.msg_fds:
            raise CommandError(_errno.EINVAL, f"{len(msg.fds)} fds, we accept {self.caps.msg_fds}")
        self.irqs.set_irqs(flags, index, start, count, bytes(p[irq_set.size:]), msg.fds)

    def _region(self, index: int, offset: int, count: int, write: bool) -> Region:
        region = self.regions.get(index)
        need = REGION_FLAG_WRITE if write else REGION_FLAG_READ
        if region is None or not region.flags & need:
            raise CommandError(_errno.EINVAL, f"region {index} is not {'writable' if write else 'readable'}")
        if count > self.caps.data_xfer_size or offset + count > region.size:
            raise CommandError(_errno.EINVAL, f"[{offset:#x}, +{count:#x}) outside region {index} "
                                              f"of {region.size:#x} bytes or above max_data_xfer_size")
        return region

    def _region_read(self, msg: Message):
        p = msg.payload
        if len(p) != region_rw.size:
            raise CommandError(_errno.EINVAL, f"REGION_READ payload of {len(p)} bytes")
        offset, index, count = _unpack_rw(p)
        region = self.regions.get(index)  # _region() inline for the common case: every register read
        if region is None or not region.flags & REGION_FLAG_READ or count > self._max_xfer or \
                offset + count > region.size:
            region = self._region(index, offset, count, False)  # raises the reason
        return bytes(p) + region.read(offset, count)  # the reply echoes the request's struct (spec 2.5)

    def _region_write(self, msg: Message):
        p = msg.payload
        if len(p) < _RW_SIZE:
            raise CommandError(_errno.EINVAL, f"REGION_WRITE payload of {len(p)} bytes")
        offset, index, count = _unpack_rw(p)
        if len(p) != _RW_SIZE + count:
            raise CommandError(_errno.EINVAL, f"REGION_WRITE count {count} with {len(p) - _RW_SIZE} data bytes")
        region = self.regions.get(index)  # _region() inline for the common case: every doorbell
        if region is None or not region.flags & REGION_FLAG_WRITE or count > self._max_xfer or \
                offset + count > region.size:
            region = self._region(index, offset, count, True)  # raises the reason
        region.write(offset, bytes(p[_RW_SIZE:]))
        if msg.flags & FLAGS_NO_REPLY:
            return None  # posted (a doorbell): no reply to build
        return bytes(p[:_RW_SIZE])  # the request's struct echoed (spec 2.5)

    def _write_multi(self, msg: Message):
        p = msg.payload
        if len(p) < write_multi_count.size:
            raise CommandError(_errno.EINVAL, "REGION_WRITE_MULTI without wr_cnt")
        n = write_multi_count.unpack_from(p)[0]
        if n > WRITE_MULTI_MAX_ENTRIES or len(p) != write_multi_count.size + n * write_multi_entry.size:
            raise CommandError(_errno.EINVAL, f"REGION_WRITE_MULTI of {n} entries in {len(p)} bytes")
        entries = [write_multi_entry.unpack_from(p, write_multi_count.size + i * write_multi_entry.size)
                   for i in range(n)]
        for offset, index, count, _data in entries:  # check all before doing any
            if count > WRITE_MULTI_MAX_DATA:
                raise CommandError(_errno.EINVAL, f"REGION_WRITE_MULTI entry of {count} bytes")
            self._region(index, offset, count, True)
        for offset, index, count, data in entries:
            self.regions[index].write(offset, data[:count])
        return write_multi_count.pack(n)

    def _dma_map(self, msg: Message):
        p = msg.payload
        if len(p) != dma_map.size or dma_map.unpack_from(p)[0] < dma_map.size or len(msg.fds) > 1:
            raise CommandError(_errno.EINVAL, f"DMA_MAP payload of {len(p)} bytes with {len(msg.fds)} fds")
        _argsz, flags, offset, address, size = dma_map.unpack(p)
        self.dma.map(address, size, offset, flags, msg.fds[0] if msg.fds else None)  # msg's fd closed after

    def _dma_unmap(self, msg: Message):
        p = msg.payload
        if len(p) < dma_unmap.size:
            raise CommandError(_errno.EINVAL, f"DMA_UNMAP payload of {len(p)} bytes")
        _argsz, flags, address, size = dma_unmap.unpack_from(p)
        if flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP:
            raise CommandError(_errno.ENOTSUP, "dirty page tracking is not supported")
        if flags & ~DMA_UNMAP_FLAG_ALL:
            raise CommandError(_errno.EINVAL, f"DMA_UNMAP flags {flags:#x}")
        if flags & DMA_UNMAP_FLAG_ALL:
            if address or size:
                raise CommandError(_errno.EINVAL, "DMA_UNMAP ALL needs address = size = 0")  # spec 2.5
            self.dma.unmap_all()
        else:
            self.dma.unmap(address, size)
        return dma_unmap.pack(dma_unmap.size, flags, address, size)  # the request echoed (spec 2.5)

    def _reset(self, msg: Message):
        self.model.config.reset()
        self.model.reset()
