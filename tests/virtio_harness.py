"""A guest for backend tests: the driver side of one virtio device over the direct transport.

:class:`Guest` plays what the card's virtio driver does -- negotiate
features, lay out legacy rings in shared memory (a memfd-backed
:class:`~micdrv.pci.DmaArena`), post chains, kick, wait for interrupts,
read used entries -- against a real backend running on its own event-loop
thread through :class:`~backends.direct.DirectTransport`. Nothing is
mocked: the rings are real split rings in real shared memory, the kicks and
interrupts real eventfds.
"""

from __future__ import annotations

import os
import select
import time

from backends.backend import Backend
from backends.direct import DirectTransport, QueueSetup
from backends.eventloop import EventLoop
from micdrv.memory import BufferMemory
from micdrv.pci import DmaArena
from micdrv.virtio import DriverRing, VringLayout, vring_size

ALIGN = 4096  # MIC_VIRTIO_RING_ALIGN (x100-host-abi.md 5.6)
WAIT = 20.0   # generous: a 2-core machine running several suites


class Guest:
    """The driver side of ``backend``'s device; ``features`` masks what is acked (default: all offered)."""

    def __init__(self, backend: Backend, features: int | None = None, num: int | None = None,
                 indirect_entries: int = 0, arena_size: int = 32 << 20, start: bool = True,
                 loop: EventLoop | None = None):
        self.backend = backend
        self.arena = DmaArena(arena_size, "guest")
        self.mem = BufferMemory(self.arena.view, name="guest memory")
        self._own_loop = loop is None
        self.loop = EventLoop(f"loop-{backend.name}").start() if loop is None else loop
        self.config_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.transport = DirectTransport(backend, self.mem, self.loop, config_call_fd=self.config_fd)
        offered = self.transport.device_features
        self.features = offered if features is None else features & offered
        self.rings: list[DriverRing] = []
        self.setups: list[QueueSetup] = []
        self.kick_fds: list[int] = []
        self.call_fds: list[int] = []
        for i, qmax in enumerate(self.transport.queue_sizes):
            n = num or qmax
            block = self.arena.alloc(vring_size(n, ALIGN), ALIGN)
            lay = VringLayout(n, ALIGN)
            kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.setups.append(QueueSetup(n, block.offset + lay.desc, block.offset + lay.avail,
                                          block.offset + lay.used, kick, call))
            self.kick_fds.append(kick)
            self.call_fds.append(call)
        self._indirect = [None] * len(self.setups)
        if indirect_entries:
            for i, s in enumerate(self.setups):
                t = self.arena.alloc(s.num * indirect_entries * 16, 64)
                self._indirect[i] = (self.mem, t.offset, indirect_entries)
        self.kicks = [0] * len(self.setups)
        self._negotiate()
        if start:
            self.transport.start()

    def _negotiate(self) -> None:
        """Fresh rings (zeroed, as the card does in find_vq) and the feature/queue set-up a driver does."""
        self.transport.set_features(self.features)
        self.rings = []
        for i, s in enumerate(self.setups):
            self.rings.append(DriverRing(s.num, (self.mem, s.desc), (self.mem, s.avail), (self.mem, s.used),
                                         self.features, self._indirect[i], name=f"q{i}"))
            self.transport.set_queue(i, s)

    def reset(self) -> None:
        """Reset the device (status 0) and set it up again from scratch, as a driver does after an error."""
        self.transport.reset()
        self._negotiate()
        self.transport.start()

    # --- buffers ------------------------------------------------------------------------------

    def alloc(self, size: int, data: bytes | None = None) -> tuple[int, memoryview]:
        """A buffer in guest memory: its address and a view of it."""
        a = self.arena.alloc(max(size, 1), 64)
        view = self.arena.view[a.offset:a.offset + size]
        if data is not None:
            view[:len(data)] = data
        return a.offset, view

    # --- the ring protocol --------------------------------------------------------------------

    def add(self, q: int, out=(), in_=(), token=None, kick: bool = True, **kw) -> int:
        """Post a chain on queue ``q`` and kick if the device wants it."""
        head = self.rings[q].add(list(out), list(in_), token, **kw)
        if kick:
            self.kick(q)
        return head

    def kick(self, q: int) -> None:
        if self.rings[q].kick_prepare():
            self.kicks[q] += 1
            os.eventfd_write(self.kick_fds[q], 1)

    def wait(self, q: int, timeout: float = WAIT):
        """The next used entry of queue ``q`` as (token, len), waiting on its interrupt eventfd."""
        deadline = time.monotonic() + timeout
        ring = self.rings[q]
        while True:
            u = ring.get_used()
            if u is not None:
                return u
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {q}: no used entry within {timeout} s "
                                   f"(broken: {self.transport.broken})")
            r, _, _ = select.select([self.call_fds[q]], [], [], min(left, 0.2))
            if r:
                try:
                    os.eventfd_read(self.call_fds[q])
                except BlockingIOError:
                    pass

    def wait_many(self, q: int, n: int, timeout: float = WAIT) -> list:
        deadline = time.monotonic() + timeout
        return [self.wait(q, max(0.0, deadline - time.monotonic())) for _ in range(n)]

    def wait_broken(self, timeout: float = WAIT) -> str:
        deadline = time.monotonic() + timeout
        while self.transport.broken is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the device did not break")
            time.sleep(0.01)
        return self.transport.broken

    def config(self) -> bytes:
        return self.transport.config_read()

    def close(self) -> None:
        try:
            self.transport.close()
        finally:
            if self._own_loop:
                self.loop.stop()
            for fd in self.kick_fds + self.call_fds + [self.config_fd]:
                os.close(fd)
            self.mem.release()
            self.arena.close()

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
