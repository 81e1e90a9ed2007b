"""virtio-console on a real pty: bytes both ways, and nothing lost while nobody is attached."""

from __future__ import annotations

import os
import select
import termios
import time

import pytest

from backends.console import ConsoleBackend, Pty
from micdrv.virtio import console as C
from tests.virtio_harness import WAIT, Guest


@pytest.fixture
def console(tmp_path):
    be = ConsoleBackend.open(str(tmp_path / "run" / "mic0" / "console"))
    g = Guest(be)
    yield g
    g.close()
    be.close()


def attach(g: Guest) -> int:
    """What ``micctl console`` does: open the published path."""
    return os.open(g.backend.pty.link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


def read_exactly(fd: int, n: int, timeout: float = WAIT) -> bytes:
    out = bytearray()
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"read {len(out)} of {n} bytes")
        if select.select([fd], [], [], min(left, 0.2))[0]:
            try:
                out += os.read(fd, n - len(out))
            except BlockingIOError:
                pass
    return bytes(out)


def post_rx(g: Guest, n: int = 4, size: int = C.RX_BUFFER_SIZE) -> None:
    """What the Linux driver does: fill queue 0 with 4 KiB writable buffers."""
    for _ in range(n):
        addr, view = g.alloc(size)
        g.add(C.RX_QUEUE, in_=[(addr, size)], token=view)


def send(g: Guest, data: bytes) -> None:
    addr, _ = g.alloc(len(data), data)
    g.add(C.TX_QUEUE, out=[(addr, len(data))])


def test_the_pty_is_published_raw(console, tmp_path):
    link = tmp_path / "run" / "mic0" / "console"
    assert os.readlink(link) == console.backend.path and console.backend.path.startswith("/dev/pts/")
    fd = os.open(link, os.O_RDONLY | os.O_NOCTTY)
    attrs = termios.tcgetattr(fd)
    os.close(fd)
    assert not attrs[3] & (termios.ECHO | termios.ICANON | termios.ISIG)   # lflag
    assert not attrs[1] & termios.OPOST                                    # oflag
    assert console.backend.device_features() == 0 and console.config() == bytes(12)
    assert console.backend.queue_sizes() == (128, 128)


def test_bytes_both_ways(console):
    fd = attach(console)
    try:
        post_rx(console)
        os.write(fd, b"uname -a\r")
        view, n = console.wait(C.RX_QUEUE)
        assert bytes(view[:n]) == b"uname -a\r"          # raw: the CR arrives as typed
        send(console, b"Linux mic0 5.4\r\n")
        console.wait(C.TX_QUEUE)
        assert read_exactly(fd, 16) == b"Linux mic0 5.4\r\n"
        c = console.transport.counters()
        assert (c["rx_bytes"], c["tx_bytes"], c["buffered"]) == (9, 16, 0)
    finally:
        os.close(fd)


def test_input_waits_in_the_pty_until_the_card_posts_buffers(console):
    fd = attach(console)
    try:
        os.write(fd, b"typed early")
        time.sleep(0.2)                      # nothing to put it in: it stays in the pty
        assert console.transport.counters()["rx_bytes"] == 0
        post_rx(console, 1)
        view, n = console.wait(C.RX_QUEUE)
        assert bytes(view[:n]) == b"typed early"
    finally:
        os.close(fd)


def test_output_is_not_lost_while_nobody_is_attached(console):
    blob = os.urandom(300 << 10)
    chunks = [blob[i:i + 4096] for i in range(0, len(blob), 4096)]
    for i in range(0, len(chunks), 60):
        for c in chunks[i:i + 60]:
            send(console, c)
        console.wait_many(C.TX_QUEUE, len(chunks[i:i + 60]))   # completed at once: the card never waits
    c = console.transport.counters()
    assert c["tx_bytes"] == len(blob) and c["buffered"] > 0 and c["tx_stalls"] == 0
    fd = attach(console)                                       # someone attaches later ...
    try:
        assert read_exactly(fd, len(blob)) == blob             # ... and gets all of it, in order
    finally:
        os.close(fd)


def test_past_the_buffer_limit_output_waits_in_the_ring(tmp_path):
    be = ConsoleBackend(Pty(str(tmp_path / "console")), buffer_limit=16 << 10)
    with Guest(be) as g:
        blob = os.urandom(256 << 10)
        chunks = [blob[i:i + 4096] for i in range(0, len(blob), 4096)]
        for c in chunks[:60]:
            send(g, c)
        deadline = time.monotonic() + WAIT
        while g.transport.counters()["tx_stalls"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        done = len(g.rings[C.TX_QUEUE].get_all_used())
        assert done < 60 and g.rings[C.TX_QUEUE].in_flight == 60 - done   # waiting, not dropped
        fd = os.open(be.pty.link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            got = bytearray(read_exactly(fd, 60 * 4096 // 2))  # reading lets the rest through
            for c in chunks[60:]:
                send(g, c)
            got += read_exactly(fd, len(blob) - len(got))
            assert bytes(got) == blob
            g.wait_many(C.TX_QUEUE, len(chunks) - done)
        finally:
            os.close(fd)
    be.close()


def test_closing_removes_the_link_and_the_pty(tmp_path):
    link = str(tmp_path / "c")
    be = ConsoleBackend.open(link)
    path = be.path
    assert os.path.islink(link)
    be.close()
    assert not os.path.lexists(link)
    with pytest.raises(OSError):
        os.open(path, os.O_RDWR | os.O_NOCTTY)


def test_a_console_from_its_configuration_entry(tmp_path):
    from micdrv.config import ConsoleConfig
    be = ConsoleBackend.from_config("mic3", ConsoleConfig(), run_dir=str(tmp_path))
    try:
        assert be.pty.link == str(tmp_path / "mic3" / "console") and os.readlink(be.pty.link) == be.path
        assert be.describe()["name"] == "console:mic3"
    finally:
        be.close()
    be = ConsoleBackend.from_config("mic3", ConsoleConfig(path=str(tmp_path / "elsewhere")))
    assert be.pty.link == str(tmp_path / "elsewhere")
    be.close()
