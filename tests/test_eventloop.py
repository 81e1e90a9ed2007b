"""The backends' event loop: handlers keyed by fd, parking, calls from other threads, errors contained."""

from __future__ import annotations

import os
import threading
import time

import pytest

from backends.eventloop import EVENT_READ, EventLoop, TimerFd


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def test_handlers_run_for_ready_fds_and_parked_fds_wait():
    loop = EventLoop()
    a, b = eventfd(), eventfd()
    seen = []
    loop.watch(a, EVENT_READ, lambda ev: seen.append(("a", os.eventfd_read(a))))
    loop.watch(b, 0, lambda ev: seen.append(("b", os.eventfd_read(b))))   # parked
    os.eventfd_write(a, 2)
    os.eventfd_write(b, 3)
    assert loop.run_once(0) == 1 and seen == [("a", 2)]
    assert loop.watched(b) == 0
    loop.watch(b, EVENT_READ, loop._handlers[b][1])                       # unparked: the data waited
    assert loop.run_once(0) == 1 and seen[-1] == ("b", 3)
    loop.unwatch(a)
    loop.unwatch(a)                                                        # no error the second time
    os.eventfd_write(a, 1)
    assert loop.run_once(0) == 0 and loop.watched(a) is None
    loop.stop()
    for fd in (a, b):
        os.close(fd)


def test_calls_from_other_threads_run_on_the_loop_thread_and_errors_come_back():
    with EventLoop("t").start() as loop:
        assert loop.call(threading.current_thread) is loop._thread
        with pytest.raises(ZeroDivisionError):
            loop.call(lambda: 1 / 0)
        with pytest.raises(RuntimeError, match="own thread"):
            loop.run_once(0)


def test_a_failing_handler_is_logged_and_the_loop_carries_on(caplog):
    with EventLoop("t").start() as loop:
        bad, good = eventfd(), eventfd()
        done = threading.Event()

        def boom(ev):
            os.eventfd_read(bad)
            raise ValueError("backend bug")

        loop.call(loop.watch, bad, EVENT_READ, boom)
        loop.call(loop.watch, good, EVENT_READ, lambda ev: (os.eventfd_read(good), done.set()))
        os.eventfd_write(bad, 1)
        loop.call(lambda: None)
        os.eventfd_write(good, 1)
        assert done.wait(10)
        assert "handler for fd" in caplog.text and "backend bug" in caplog.text
    os.close(bad)
    os.close(good)


def test_a_timer_fd_fires_once_in_the_loop_and_can_be_disarmed():
    loop = EventLoop()
    t = TimerFd()
    fired = []
    try:
        loop.watch(t.fd, EVENT_READ, lambda ev: (t.clear(), fired.append(ev)))
        assert loop.run_once(0) == 0                      # not armed: never readable
        t.arm(0.0001)
        assert t.armed
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            loop.run_once(0.01)
        assert fired == [EVENT_READ] and not t.armed      # one expiry, consumed by the handler
        assert loop.run_once(0.01) == 0                   # one-shot: nothing more
        t.arm(10)
        t.disarm()
        assert not t.armed and loop.run_once(0.01) == 0
    finally:
        loop.stop()
        t.close()
