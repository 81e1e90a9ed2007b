"""The event loop that runs backends: a stop eventfd registered first, handlers keyed by fd.

STYLE.md (Cloud Hypervisor): one event-loop shape for every device. A
backend never owns a thread; it exposes its fds (tap, pty, timers) by
calling :meth:`EventLoop.watch` with a handler, and the transport
registers its own fds (kick eventfds, doorbell interrupts) in the same
loop, so every call into a backend comes from the loop's one thread and
backends need no locks for their queue paths.

Other threads hand work to the loop with :meth:`EventLoop.call`, which runs
a function on the loop thread and returns its result (or raises its
exception) -- how a transport sets a device up or resets it while the loop
runs.

A handler that raises is logged and the loop carries on: one broken
device never stops the others.

:class:`TimerFd` is a one-shot timer with nanosecond resolution as an fd to
watch (``timerfd_create(2)``): how a transport waits, without blocking the
loop, for work it has to poll for (a DMA batch whose completion is a status
word in memory) -- the loop serves every other fd meanwhile. ``select``'s own
timeout is in milliseconds, far too coarse for that.
"""

from __future__ import annotations

import ctypes
import logging
import os
import selectors
import threading
from collections import deque
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

Handler = Callable[[int], None]  # called with the ready events (EVENT_READ | EVENT_WRITE)


class FdWatcher(Protocol):
    """What a backend may do with the owner's loop."""

    def watch(self, fd: int, events: int, handler: Handler) -> None:
        """Call ``handler(ready_events)`` when ``fd`` is ready for ``events``; a second call changes them.

        ``events == 0`` keeps the handler but stops waiting (the fd is
        parked), e.g. while a receive queue has no buffers.
        """

    def unwatch(self, fd: int) -> None:
        """Forget ``fd`` (no error if it was not watched)."""


_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK, _TFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC   # <sys/timerfd.h>: the O_* values
_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class TimerFd:
    """A one-shot monotonic timer as a non-blocking fd: readable once it expired (``timerfd_create(2)``)."""

    def __init__(self):
        fd = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timerfd_create: {os.strerror(e)}")
        self.fd = fd
        self._spec = _Itimerspec()
        self._ref = ctypes.byref(self._spec)
        # it_value's two fields as one 'q' view: set with two item stores (ctypes field access costs more than
        # the syscall)
        self._value = memoryview(self._spec).cast("B").cast("q")[2:4]
        self.armed = False

    def arm(self, seconds: float) -> None:
        """Expire ``seconds`` from now (at least 1 ns: 0 would disarm); replaces an earlier arm."""
        ns = int(seconds * 1e9)
        v = self._value
        if ns < 1_000_000_000:
            v[0] = 0
            v[1] = ns if ns > 0 else 1
        else:
            v[0], v[1] = divmod(ns, 1_000_000_000)
        if _libc.timerfd_settime(self.fd, 0, self._ref, None) < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timerfd_settime: {os.strerror(e)}")
        self.armed = True

    def disarm(self) -> None:
        v = self._spec.it_value
        v.tv_sec = v.tv_nsec = 0
        _libc.timerfd_settime(self.fd, 0, self._ref, None)
        self.armed = False
        self.clear()

    def clear(self) -> None:
        """Consume an expiry (the fd is readable until then)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DeviceFds:
    """The owner's loop as one device's backend sees it (a :class:`FdWatcher`): every fd it watches is
    remembered, so a transport can drop them all at reset, and every handler runs under ``guard`` (the
    transport's: a broken ring marks the device broken instead of escaping into the loop)."""

    def __init__(self, loop: FdWatcher, guard: Callable[[Handler], Handler]):
        self._loop = loop
        self._guard = guard
        self.fds: set[int] = set()

    def watch(self, fd: int, events: int, handler: Handler) -> None:
        self.fds.add(fd)
        self._loop.watch(fd, events, self._guard(handler))

    def unwatch(self, fd: int) -> None:
        self.fds.discard(fd)
        self._loop.unwatch(fd)

    def unwatch_all(self) -> None:
        for fd in list(self.fds):
            self.unwatch(fd)


class EventLoop:
    """A selector loop on its own thread (or the caller's, with :meth:`run`)."""

    def __init__(self, name: str = "backends"):
        self.name = name
        self._sel = selectors.DefaultSelector()
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # The stop eventfd first, then the wake-up for calls from other threads.
        self._sel.register(self._stop, EVENT_READ, None)
        self._sel.register(self._wake, EVENT_READ, None)
        self._handlers: dict[int, tuple[int, Handler]] = {}
        self._calls: deque[Callable[[], None]] = deque()
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._closed = False

    # --- FdWatcher ----------------------------------------------------------------------------

    def watch(self, fd: int, events: int, handler: Handler) -> None:
        old = self._handlers.get(fd)
        self._handlers[fd] = (events, handler)
        if old is None:
            if events:
                self._sel.register(fd, events)
        elif old[0] != events:
            if not events:
                self._sel.unregister(fd)
            elif not old[0]:
                self._sel.register(fd, events)
            else:
                self._sel.modify(fd, events)

    def unwatch(self, fd: int) -> None:
        old = self._handlers.pop(fd, None)
        if old is not None and old[0]:
            self._sel.unregister(fd)

    def watched(self, fd: int) -> int | None:
        """The events ``fd`` is watched for (0 = parked), None if not watched."""
        h = self._handlers.get(fd)
        return None if h is None else h[0]

    # --- running ------------------------------------------------------------------------------

    def start(self) -> "EventLoop":
        """Run the loop on a new daemon thread."""
        if self._thread is not None:
            raise RuntimeError(f"event loop {self.name} already started")
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()
        self._running.wait(5)
        return self

    def run(self) -> None:
        """Dispatch until :meth:`stop`."""
        self._running.set()
        try:
            while self._dispatch(None) is not None:
                pass
        finally:
            self._running.clear()
            self._run_calls()

    def run_once(self, timeout: float | None = 0) -> int:
        """Dispatch what is ready within ``timeout`` seconds, once, on the caller's thread; handlers run.

        For an owner without a loop thread (single-threaded tools and
        benchmarks); not while the loop runs on its own thread.
        """
        if self._running.is_set():
            raise RuntimeError(f"event loop {self.name} runs on its own thread")
        return self._dispatch(timeout) or 0

    def _dispatch(self, timeout: float | None) -> int | None:
        """One select round; the number of handlers run, None when the stop eventfd fired."""
        ran = 0
        for key, ready in self._sel.select(timeout):
            fd = key.fd
            if fd == self._stop:
                return None
            if fd == self._wake:
                self._run_calls()
                continue
            h = self._handlers.get(fd)
            if h is None or not h[0] & ready:
                continue  # unwatched or parked by an earlier handler in this round
            ran += 1
            try:
                h[1](ready)
            except Exception:
                log.exception("%s: handler for fd %d failed", self.name, fd)
        return ran

    def _run_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)
        except BlockingIOError:
            pass
        while self._calls:
            self._calls.popleft()()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args, timeout: float = 30.0) -> Any:
        """Run ``fn(*args)`` on the loop thread and return its result (directly if not running or on it)."""
        if self._thread is None or self.in_loop() or not self._running.is_set():
            return fn(*args)
        done = threading.Event()
        box: list = []

        def run() -> None:
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # handed back to the caller
                box.append((False, e))
            finally:
                done.set()

        self._calls.append(run)
        os.eventfd_write(self._wake, 1)
        if not done.wait(timeout):
            raise TimeoutError(f"event loop {self.name} did not run a call within {timeout} s")
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop thread and close the selector; idempotent."""
        if self._closed:
            return
        os.eventfd_write(self._stop, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"event loop {self.name} did not stop within {timeout} s")
        self._closed = True
        self._sel.close()
        os.close(self._stop)
        os.close(self._wake)

    def __enter__(self) -> "EventLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
