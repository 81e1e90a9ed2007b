"""The virtio-console backend: a card's hvc0 on a host pty (virtio-legacy.md 4; x100-host-abi.md 6.3).

Two queues, no MULTIPORT, no features, a zero config space (what mpssd
offers): queue 0 carries host input to the card (pty master readable ->
the chain's writable views, readv), queue 1 the card's output (the chain's
readable views -> pty master, writev).

Nothing is lost when nobody is attached. The Linux driver *spins* until
each output chain comes back (section 4.2), so output chains are completed
at once: what the pty does not take (its own buffer holds a few tens of
KiB while no one reads) is copied into a bounded host buffer
(``buffer_limit`` bytes, default 1 MiB) and written when the pty drains.
Only past that limit are output chains left in the ring (the card then
waits) until the pty takes bytes again. Input works the same way round:
with no receive buffers posted, the pty is not read, so keystrokes wait in
the pty until the card posts buffers.
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque

from micdrv.config import ConsoleConfig
from micdrv.virtio import console as C
from micdrv.virtio.device import VIRTIO_ID_CONSOLE

from ..backend import Backend
from ..eventloop import EVENT_READ, EVENT_WRITE
from ..virtqueue import Chain, Drained
from .pty import Pty

log = logging.getLogger(__name__)

QUEUE_SIZE = 128              # x100-host-abi.md 6.1
BUFFER_LIMIT = 1 << 20        # card output held for a pty nobody reads, before output chains wait in the ring


class ConsoleBackend(Backend):
    """One virtio-console device on one pty."""

    device_id = VIRTIO_ID_CONSOLE

    def __init__(self, pty: Pty, name: str = "console", buffer_limit: int = BUFFER_LIMIT,
                 queue_size: int = QUEUE_SIZE):
        super().__init__(name)
        self.pty = pty
        self.buffer_limit = buffer_limit
        self.queue_size = queue_size
        self._out: deque[bytes] = deque()   # card output the pty has not taken yet, in order
        self._out_len = 0
        self._rx_parked = False             # no receive buffers: stop reading the pty
        self._tx_stalled = False            # buffer full: output chains wait in the ring
        self._c = dict.fromkeys(("rx_bytes", "rx_chains", "tx_bytes", "tx_chains", "tx_stalls", "errors"), 0)

    @classmethod
    def open(cls, link: str | None = None, name: str = "console", **kw) -> "ConsoleBackend":
        """A new pty (its path published at ``link``) and a console on it."""
        return cls(Pty(link), name, **kw)

    @classmethod
    def from_config(cls, card: str, cfg: ConsoleConfig, run_dir: str = "/run/micdrv", **kw) -> "ConsoleBackend":
        """The device a ``[[card.<name>.console]]`` entry describes; the link defaults to <run_dir>/<card>/console."""
        return cls.open(cfg.path or os.path.join(run_dir, card, "console"), name=f"console:{card}", **kw)

    # --- description --------------------------------------------------------------------------

    def device_features(self) -> int:
        return 0

    def queue_sizes(self) -> tuple[int, int]:
        return (self.queue_size, self.queue_size)

    def config_space(self) -> bytes:
        return bytes(C.virtio_console_config())

    def describe(self) -> dict:
        return {**super().describe(), "pty": self.pty.path, "link": self.pty.link}

    def counters(self) -> dict[str, int]:
        return {**self._c, "buffered": self._out_len}

    @property
    def path(self) -> str:
        """The pty slave to attach to."""
        return self.pty.path

    # --- life cycle ---------------------------------------------------------------------------

    def activate(self, features, queues, loop) -> None:
        super().activate(features, queues, loop)
        self._rx_parked = self._tx_stalled = False
        self._watch()

    def reset(self) -> None:
        if self.loop is not None:
            self.loop.unwatch(self.pty.master)
        super().reset()
        # Output already taken from the card stays buffered for whoever attaches.

    def close(self) -> None:
        self.pty.close()

    def _watch(self) -> None:
        events = (0 if self._rx_parked else EVENT_READ) | (EVENT_WRITE if self._out else 0)
        self.loop.watch(self.pty.master, events, self._on_pty)

    # --- events -------------------------------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        if index == C.RX_QUEUE:
            self._rx_parked = False
            self._receive()
        elif index == C.TX_QUEUE:
            self._transmit()
        self._watch()

    def _on_pty(self, events: int) -> None:
        if events & EVENT_WRITE:
            self._flush()
            if self._tx_stalled and self._out_len < self.buffer_limit:
                self._tx_stalled = False
                self._transmit()
        if events & EVENT_READ:
            self._receive()
        self._watch()

    # --- host -> card (queue 0) ---------------------------------------------------------------

    def _receive(self) -> None:
        if self.queues[C.RX_QUEUE].drain(self._rx) is Drained.EMPTY:
            self._rx_parked = True  # no buffers: leave input in the pty until the card posts some

    def _rx(self, chain: Chain) -> int | None:
        if not chain.writable_len:
            self._c["errors"] += 1  # a receive chain with nothing to fill: give it back answered
            return 0
        try:
            n = os.readv(self.pty.master, chain.writable)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno != errno.EIO:
                self._c["errors"] += 1
                log.warning("%s: pty read failed: %s", self.name, e)
            return None
        if n == 0:
            return None
        self._c["rx_bytes"] += n
        self._c["rx_chains"] += 1
        return n

    # --- card -> host (queue 1) ---------------------------------------------------------------

    def _transmit(self) -> None:
        if self.queues[C.TX_QUEUE].drain(self._tx) is Drained.STOPPED:
            self._tx_stalled = True
            self._c["tx_stalls"] += 1

    def _tx(self, chain: Chain) -> int | None:
        n = chain.readable_len
        if self._out:
            if self._out_len + n > self.buffer_limit:
                return None  # leave it in the ring; the card waits for the pty to drain
            self._buffer(chain.readable, 0)
        else:
            try:
                wrote = os.writev(self.pty.master, chain.readable) if n else 0
            except BlockingIOError:
                wrote = 0
            except OSError as e:
                self._c["errors"] += 1
                log.warning("%s: pty write failed: %s", self.name, e)
                wrote = 0
            if wrote < n:
                self._buffer(chain.readable, wrote)
        self._c["tx_bytes"] += n
        self._c["tx_chains"] += 1
        return 0

    def _buffer(self, views: list[memoryview], skip: int) -> None:
        """Keep a copy of ``views`` after the first ``skip`` bytes (the views die with the chain)."""
        for v in views:
            if skip >= len(v):
                skip -= len(v)
                continue
            data = bytes(v[skip:])
            skip = 0
            self._out.append(data)
            self._out_len += len(data)

    def _flush(self) -> None:
        while self._out:
            try:
                wrote = os.writev(self.pty.master, list(self._out)[:64])
            except BlockingIOError:
                return
            except OSError as e:
                self._c["errors"] += 1
                log.warning("%s: pty write failed: %s", self.name, e)
                return
            self._out_len -= wrote
            while wrote:
                head = self._out[0]
                if wrote >= len(head):
                    self._out.popleft()
                    wrote -= len(head)
                else:
                    self._out[0] = head[wrote:]
                    wrote = 0
