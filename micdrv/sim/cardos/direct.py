"""The card's direct virtio transport: rings in memory shared with host backends, eventfds for kicks and interrupts.

The card-side twin of :class:`backends.direct.DirectTransport` (the
vhost-user model, vfio-vfio-user-vhost-user.md): the card's virtio drivers
(:mod:`.virtio_bus`) run against the **real** host backends -- a tap, an
image file, a pty -- without VOP in between. Used by the drivers' tests and
benchmarks, and by anyone who wants the card OS's devices without a
device page.

:class:`DirectBus` owns

* one memfd (a :class:`~micdrv.pci.DmaArena`) that stands for card memory:
  the drivers' rings and buffers are allocated in it (addresses are offsets
  into it, the "card physical addresses" of this transport), and the host's
  :class:`~backends.direct.DirectTransport` reaches the same pages through
  its own bounds-checked :class:`~micdrv.memory.BufferMemory`;
* the host side's :class:`~backends.eventloop.EventLoop` (its own thread);
* the card side's interrupt thread: it waits on every queue's *call*
  eventfd and the devices' config eventfds and runs the drivers' callbacks
  (``vring_interrupt``, ``virtio_config_changed``), one device's failure
  never stopping the others.

:meth:`DirectBus.add` plays what a bus does when it finds a device (virtio
core ``register_virtio_device``, virtio-legacy.md 5 steps 1-2): reset,
ACKNOWLEDGE, the driver registered for the device ID
(:func:`.virtio_bus.match`), DRIVER, ``probe``; a probe that raises leaves
status FAILED. :meth:`DirectBus.remove` is a hot remove: the driver's
``remove`` (which resets the device), then the host side is closed.

Ring layout: legacy, 4096-aligned (MIC_VIRTIO_RING_ALIGN, x100-host-abi.md
5.6), one block per queue as the card's rings are; with
RING_INDIRECT_DESC acked every head gets a table of as many entries as the
ring (any chain that fits the ring fits its table) [choice].
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Callable, Sequence

from backends.backend import Backend
from backends.direct import DirectTransport, QueueSetup
from backends.eventloop import EventLoop
from micdrv.memory import BufferMemory, MemoryBase
from micdrv.pci import DmaArena
from micdrv.pci.arena import Allocation
from micdrv.virtio import DriverRing, VringLayout, vring_size
from micdrv.virtio.device import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
                                  VIRTIO_CONFIG_S_FAILED, VIRTIO_RING_F_INDIRECT_DESC, DEVICE_NAMES)

from . import virtio_bus
from .virtio_bus import QueueCallback, VirtioDevice, VirtioDriver, Virtqueue

log = logging.getLogger(__name__)

RING_ALIGN = 4096          # MIC_VIRTIO_RING_ALIGN (x100-host-abi.md 5.6)
DEFAULT_SIZE = 64 << 20    # card memory of the transport: rings, receive buffers, block requests


class _Interrupts:
    """The card's interrupt thread: eventfd -> handler, handlers never run concurrently."""

    def __init__(self, name: str):
        self._sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._stop = False
        self.fired = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        with self._lock:
            self._sel.register(fd, selectors.EVENT_READ, handler)
        os.eventfd_write(self._wake, 1)

    def unwatch(self, fd: int) -> None:
        with self._lock:
            try:
                self._sel.unregister(fd)
            except KeyError:
                pass

    def _run(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(0.5):
                if key.data is None:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    os.eventfd_read(key.fd)
                except (BlockingIOError, OSError):
                    continue
                self.fired += 1
                try:
                    key.data()
                except Exception:
                    log.exception("card interrupt handler failed")

    def close(self) -> None:
        self._stop = True
        os.eventfd_write(self._wake, 1)
        if self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self._sel.close()
        os.close(self._wake)


class _Unmapped(MemoryBase):
    """Card memory reached only by read and write, never a view: how drivers see it over VOP (CardMemory)."""

    def __init__(self, mem: BufferMemory):
        super().__init__(mem.base, mem.size, f"{mem.name}, unmapped")
        self._mem = mem

    def _read(self, addr: int, n: int) -> bytes:
        return self._mem.read(addr, n)

    def _write(self, addr: int, data) -> None:
        self._mem.write(addr, data)


class DirectDevice(VirtioDevice):
    """One device on the direct transport, as its card driver sees it."""

    def __init__(self, bus: "DirectBus", transport: DirectTransport, index: int):
        self.bus = bus
        self.transport = transport
        self.device_id = transport.device_id
        self.index = index
        self.name = f"virtio{index}"
        self.memory = bus.card_memory if bus.mapped else _Unmapped(bus.card_memory)
        self.driver: VirtioDriver | None = None
        self.acked = 0
        self.setups: list[QueueSetup] = []
        self.queues: list[Virtqueue] = []
        self._status = 0
        self._allocs: list[Allocation] = []     # ring memory, freed on reset
        self._fds: list[int] = []
        self.config_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        transport.config_call_fd = self.config_fd

    # --- VirtioDevice --------------------------------------------------------------------------
    def host_features(self) -> int:
        return self.transport.device_features

    def finalize_features(self, accepted: int) -> None:
        self.transport.set_features(accepted)
        self.acked = accepted

    def read_config(self, offset: int, length: int) -> bytes:
        return self.transport.config_read(offset, length)

    def get_status(self) -> int:
        return self._status

    def set_status(self, status: int) -> None:
        was = self._status
        self._status = status & 0xFF
        if status & VIRTIO_CONFIG_S_DRIVER_OK and not was & VIRTIO_CONFIG_S_DRIVER_OK:
            self.transport.start()

    def find_vqs(self, callbacks: Sequence[QueueCallback | None]) -> list[Virtqueue]:
        sizes = self.transport.queue_sizes
        if len(callbacks) > len(sizes):
            raise ValueError(f"{self.name}: {len(callbacks)} queues asked for, the device has {len(sizes)}")
        mem, arena = self.memory, self.bus.arena
        indirect = bool(self.acked >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        queues = []
        for i, cb in enumerate(callbacks):
            num = sizes[i]
            block = self._alloc(vring_size(num, RING_ALIGN), RING_ALIGN)
            arena.view[block.offset:block.end] = bytes(block.size)
            lay = VringLayout(num, RING_ALIGN)
            table = None
            if indirect:
                t = self._alloc(num * num * 16, 64)
                table = (mem, t.offset, num)
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._fds += [kick, call]
            setup = QueueSetup(num, block.offset + lay.desc, block.offset + lay.avail, block.offset + lay.used,
                               kick, call)
            ring = DriverRing(num, (mem, setup.desc), (mem, setup.avail), (mem, setup.used), self.acked, table,
                              name=f"{self.name} vq{i}")
            self.transport.set_queue(i, setup)
            vq = Virtqueue(i, ring, lambda fd=kick: os.eventfd_write(fd, 1))
            vq.callback = cb
            self.bus.interrupts.watch(call, vq.interrupt)
            self.setups.append(setup)
            queues.append(vq)
        self.queues = queues
        return queues

    def reset(self) -> None:
        self._status = 0
        self.transport.reset()
        for fd in self._fds:
            self.bus.interrupts.unwatch(fd)
            os.close(fd)
        self._fds = []
        for a in self._allocs:
            self.bus.arena.free(a)
        self._allocs = []
        self.queues, self.setups = [], []

    def alloc(self, size: int, align: int = 64) -> int:
        return self.bus.arena.alloc(size, max(align, 64)).offset

    def free(self, addr: int, size: int) -> None:
        self.bus.arena.free(Allocation(addr, -(-max(size, 1) // 64) * 64))

    # --- the transport's own ---------------------------------------------------------------------
    def _alloc(self, size: int, align: int) -> Allocation:
        a = self.bus.arena.alloc(size, align)
        self._allocs.append(a)
        return a

    def _config_changed(self) -> None:
        drv = self.driver
        if drv is not None:
            drv.config_changed()

    def interrupt_all(self) -> None:
        """A device interrupt for every queue, as VOP's single doorbell is (tests: a spurious interrupt)."""
        for vq in self.queues:
            vq.interrupt()

    def __repr__(self) -> str:
        return f"<DirectDevice {self.name} {DEVICE_NAMES.get(self.device_id, self.device_id)} status={self._status:#x}>"


class DirectBus:
    """Card memory in a memfd, the host's event loop, the card's interrupt thread, and the devices on them."""

    def __init__(self, size: int = DEFAULT_SIZE, loop: EventLoop | None = None,
                 printk: Callable[[str], None] | None = None, name: str = "direct", mapped: bool = True):
        self.name = name
        self.mapped = mapped      # False: drivers get no memoryviews of card memory, as over VOP
        self.arena = DmaArena(size, f"card-{name}")
        self.card_memory = BufferMemory(self.arena.view, name=f"card memory ({name})")
        # The host's own window onto the same pages: what a separate process mapping the memfd would have.
        self.host_memory = BufferMemory(self.arena.view, name=f"card memory ({name}, host view)")
        self._own_loop = loop is None
        self.loop = EventLoop(f"host-{name}").start() if loop is None else loop
        self.interrupts = _Interrupts(f"card-irq-{name}")
        self.printk = printk or (lambda text: log.info("%s", text))
        self.devices: list[DirectDevice] = []
        self._next_index = 0

    def add(self, backend: Backend | None = None, transport=None) -> DirectDevice:
        """A new device for ``backend``: the host side set up, the card's driver bound and probed.

        Or for ``transport``: a host side already made, e.g. in another
        process mapping :attr:`arena`'s memfd (anything with the
        driver-facing calls of :class:`~backends.direct.DirectTransport`).
        """
        if transport is None:
            transport = DirectTransport(backend, self.host_memory, self.loop, name=backend.name)
        dev = DirectDevice(self, transport, self._next_index)
        self._next_index += 1
        self.interrupts.watch(dev.config_fd, dev._config_changed)
        self.devices.append(dev)
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        factory = virtio_bus.match(dev.device_id)
        if factory is None:
            self.printk(f"virtio: {dev.name}: no driver for device ID {dev.device_id}")
            return dev
        dev.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        driver = factory()
        try:
            driver.probe(dev)
        except Exception as e:
            self.printk(f"virtio: {dev.name}: probe of {driver.name} failed: {type(e).__name__}: {e}")
            log.debug("probe failed", exc_info=True)
            dev.set_status(dev.get_status() | VIRTIO_CONFIG_S_FAILED)
            return dev
        if not dev.get_status() & VIRTIO_CONFIG_S_DRIVER_OK:
            dev.set_status(dev.get_status() | VIRTIO_CONFIG_S_DRIVER_OK)   # the core does it after probe
        dev.driver = driver
        return dev

    def remove(self, dev: DirectDevice) -> None:
        """Hot remove: the driver lets go of the device (and resets it), the host side closes."""
        drv, dev.driver = dev.driver, None
        if drv is not None:
            try:
                drv.remove()
            except Exception:
                log.exception("%s: driver remove failed", dev.name)
        if dev.queues:
            dev.reset()
        self.interrupts.unwatch(dev.config_fd)
        dev.transport.close()
        os.close(dev.config_fd)
        if dev in self.devices:
            self.devices.remove(dev)

    def close(self) -> None:
        """Remove every device, stop both threads, release the memory (backends stay open: the caller's)."""
        for dev in list(self.devices):
            self.remove(dev)
        self.interrupts.close()
        if self._own_loop:
            self.loop.stop()
        self.card_memory.release()
        self.host_memory.release()
        self.arena.close()

    def __enter__(self) -> "DirectBus":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
