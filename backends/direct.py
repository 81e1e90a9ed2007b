"""The direct transport: a device whose driver's buffers are in host memory we can map.

The vhost-user model (vfio-vfio-user-vhost-user.md): the driver shares
its memory (here one :class:`~micdrv.memory.Memory`, typically a memfd both
processes map), tells the device where each ring's desc / avail / used
parts are, and gives it a *kick* eventfd per queue (driver -> device) and a
*call* eventfd per queue (device -> driver interrupt). The device side is a
:class:`~micdrv.virtio.Vringh` per queue and zero-copy views of the shared
memory: nothing is copied between driver and backend.

This is the transport the backends' tests and benchmarks use, with
:class:`~micdrv.virtio.DriverRing` on the other end, in the same process or
another; VOP (staging through DMA) is the other implementation of the same
:class:`~backends.virtqueue.Virtqueue` interface.

A ring error (:class:`~micdrv.virtio.VringError`) in any handler marks the
device *broken*: the error is logged and kept in :attr:`DirectTransport.broken`,
the backend is reset and nothing more is processed until the driver resets
the device (:meth:`DirectTransport.reset`), as a legacy device must
(virtio-legacy.md 6.2/6.3 "fatal").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

from micdrv.memory import Memory
from micdrv.virtio import VringError, Vringh
from micdrv.virtio.device import RING_FEATURES

from .backend import Backend
from .eventloop import EVENT_READ, DeviceFds, EventLoop, Handler
from .virtqueue import Chain, Virtqueue

log = logging.getLogger(__name__)


class DirectQueue(Virtqueue):
    """A virtqueue over a :class:`Vringh` whose buffers are views of a mapped :class:`Memory`."""

    def __init__(self, index: int, vring: Vringh, memory: Memory, call_fd: int | None, name: str = ""):
        self.index = index
        self.size = vring.num
        self.name = name or vring.name
        if vring.buffers is not memory:
            raise ValueError("the ring must validate buffers against the memory the views are taken from")
        self.vring = vring
        self.memory = memory
        self._base = memory.base
        self._mv = memory.view(memory.base, memory.size)
        self.call_fd = call_fd
        self.interrupts = 0
        self.chains = 0

    def pop_many(self, limit: int) -> list[Chain]:
        # Slicing one view of the whole window: the ring already checked every buffer against this very
        # window (it is the Vringh's ``buffers``), so no second bounds check per buffer.
        mv, base = self._mv, self._base
        out = []
        for c in self.vring.pop_many(limit):
            out.append(Chain(c.head, [mv[a - base:a - base + n] for a, n in c.readable],
                             [mv[a - base:a - base + n] for a, n in c.writable], c.readable_len, c.writable_len, c))
        return out

    def complete_many(self, done: Iterable[tuple[Chain, int]]) -> None:
        used = [(chain.head, written + chain.tail) for chain, written in done]
        if not used:
            return
        self.vring.push_many(used)
        self.chains += len(used)
        if self.vring.needs_notify():
            self.interrupt()

    def abandon(self, chains: Sequence[Chain]) -> None:
        self.vring.abandon([c.ctx for c in chains])

    def disable_notify(self) -> None:
        self.vring.disable_notify()

    def enable_notify(self) -> bool:
        return self.vring.enable_notify()

    def interrupt(self) -> None:
        self.interrupts += 1
        if self.call_fd is not None:
            os.eventfd_write(self.call_fd, 1)


@dataclass
class QueueSetup:
    """What the driver tells the device about one queue (vhost-user SET_VRING_NUM/ADDR/KICK/CALL)."""

    num: int
    desc: int
    avail: int
    used: int
    kick_fd: int | None = None
    call_fd: int | None = None


class DirectTransport:
    """One virtio device served over shared memory; the driver side drives it with the methods below.

    Call order, as a driver would: read :attr:`device_features` and
    :meth:`config_read`, :meth:`set_features`, :meth:`set_queue` for each
    queue, :meth:`start` (DRIVER_OK). :meth:`reset` returns to the
    beginning; :meth:`close` ends it. Any thread may call these: whatever
    touches the backend or the rings runs on the loop thread
    (:meth:`EventLoop.call`).
    """

    def __init__(self, backend: Backend, memory: Memory, loop: EventLoop, ring_features: int = RING_FEATURES,
                 config_call_fd: int | None = None, name: str | None = None):
        if memory.view(memory.base, 0) is None:
            raise ValueError("the direct transport needs memory it can map (Memory.view)")
        self.backend = backend
        self.memory = memory
        self.loop = loop
        self.name = name or backend.name
        self.device_id = backend.device_id
        self.queue_sizes = tuple(backend.queue_sizes())
        self.device_features = backend.device_features() | ring_features
        self.config_call_fd = config_call_fd
        self.acked = 0
        self.queues: list[DirectQueue] = []
        self.broken: str | None = None
        self.active = False
        self.config_changes = 0
        self._setup: dict[int, QueueSetup] = {}
        self._fds = DeviceFds(loop, self._guarded)
        backend.set_config_listener(self._config_changed)

    # --- what the driver calls ----------------------------------------------------------------

    def config_read(self, offset: int = 0, n: int | None = None) -> bytes:
        space = self.loop.call(self.backend.config_space)
        return space[offset:] if n is None else space[offset:offset + n]

    def config_write(self, offset: int, data: bytes) -> None:
        self.loop.call(self.backend.config_write, offset, bytes(data))

    def set_features(self, acked: int) -> None:
        if acked & ~self.device_features:
            raise ValueError(f"{self.name}: acked features {acked:#x} include bits not offered "
                             f"({acked & ~self.device_features:#x})")
        self.acked = acked

    def set_queue(self, index: int, setup: QueueSetup) -> None:
        if not 0 <= index < len(self.queue_sizes):
            raise ValueError(f"{self.name}: queue {index} does not exist (the device has {len(self.queue_sizes)})")
        if setup.num > self.queue_sizes[index]:
            raise ValueError(f"{self.name}: queue {index} of {setup.num} entries, at most {self.queue_sizes[index]}")
        self._setup[index] = setup

    def start(self) -> None:
        """DRIVER_OK: build the rings, activate the backend, listen for kicks."""
        self.loop.call(self._start)

    def reset(self) -> None:
        """The driver reset the device: back to the beginning, no longer broken."""
        self.loop.call(self._reset)

    def close(self) -> None:
        self.loop.call(self._reset)
        self.backend.set_config_listener(None)

    def counters(self) -> dict[str, int]:
        out = {f"queue{q.index}_chains": q.chains for q in self.queues}
        out.update({f"queue{q.index}_interrupts": q.interrupts for q in self.queues})
        out["config_changes"] = self.config_changes
        out.update(self.loop.call(self.backend.counters))
        return out

    # --- on the loop thread -------------------------------------------------------------------

    def _start(self) -> None:
        if self.active:
            raise RuntimeError(f"{self.name}: already started")
        missing = [i for i in range(len(self.queue_sizes)) if i not in self._setup]
        if missing:
            raise ValueError(f"{self.name}: queues {missing} were not set up")
        queues = []
        for i in range(len(self.queue_sizes)):
            s = self._setup[i]
            m = self.memory
            vr = Vringh(s.num, (m, s.desc), (m, s.avail), (m, s.used), m, self.acked, f"{self.name} queue {i}")
            queues.append(DirectQueue(i, vr, m, s.call_fd))
        self.queues = queues
        self.active = True
        self.backend.activate(self.acked, queues, self._fds)
        for i in range(len(queues)):
            kick = self._setup[i].kick_fd
            if kick is not None:
                self._fds.watch(kick, EVENT_READ, lambda _ev, i=i, kick=kick: self._kicked(i, kick))

    def _kicked(self, index: int, kick_fd: int) -> None:
        try:
            os.eventfd_read(kick_fd)
        except BlockingIOError:
            return
        self.backend.queue_notify(index)

    def kick(self, index: int) -> None:
        """Run the backend for queue ``index`` as a kick would, on the loop thread (for in-process drivers)."""
        self.loop.call(self._guarded(lambda _ev: self.backend.queue_notify(index)), 0)

    def _guarded(self, handler: Handler) -> Handler:
        def run(events: int) -> None:
            if self.broken is not None or not self.active:
                return
            try:
                handler(events)
            except VringError as e:
                self._break(str(e))
        return run

    def _break(self, message: str) -> None:
        log.error("%s: device broken: %s", self.name, message)
        self.broken = message
        self._deactivate()

    def _deactivate(self) -> None:
        self._fds.unwatch_all()
        if self.active:
            self.active = False
            try:
                self.backend.reset()
            except Exception:
                log.exception("%s: backend reset failed", self.name)

    def _reset(self) -> None:
        self._deactivate()
        self.queues = []
        self._setup = {}
        self.acked = 0
        self.broken = None

    def _config_changed(self) -> None:
        self.config_changes += 1
        if self.config_call_fd is not None:
            os.eventfd_write(self.config_call_fd, 1)
