"""The virtqueue interface between a transport and a device backend.

ARCHITECTURE.md: "The virtqueue interface between vop/ and backends/ is
the seam that lets the same backends later serve other transports". A
backend sees only this: queues that hand out *chains* of host memory and
take them back with a count of bytes written. It never sees a ring
address, a BAR, a doorbell or a DMA engine.

A :class:`Chain` is

* ``readable`` -- memoryviews of the data the driver supplied, already in
  host memory;
* ``writable`` -- memoryviews of host memory the backend fills;

both byte streams whose view boundaries mean nothing (see :mod:`.iov`).
The backend fills ``writable`` from the front and reports how many bytes it
wrote; a device whose reply sits at the *end* of the chain (virtio-blk's
status byte) also sets ``chain.tail`` to the bytes it wrote at the end. The
used length the driver sees is ``written + tail``.

The views are valid only until the chain is completed or abandoned. That
is what lets a transport *stage* instead of sharing memory, as VOP must
(x100-host-abi.md 5.7): on :meth:`Virtqueue.pop_many` it DMAs the chains'
readable buffers from card memory into host bounce buffers and hands out
views of those; on :meth:`Virtqueue.complete_many` it copies the written
bytes (the first ``written`` and the last ``tail`` of the writable stream)
back to the card addresses and then publishes the used entries. Batching is
therefore first class: pop many, complete many, so one DMA batch and one
notification serve a whole drain. A transport whose buffers are host memory
(:mod:`backends.direct`) hands out zero-copy views and copies nothing.

:meth:`Virtqueue.drain` is the one drain loop every backend uses, with
notification suppression as virtio-queue and vringh do it (virtio-legacy.md
1.6): disable kicks, pop and process in batches, re-enable, and drain again
if more arrived meanwhile.

Errors: a ring the driver broke raises :class:`micdrv.virtio.VringError`
from pop/complete; the transport marks the device broken. The backend does
not catch it.
"""

from __future__ import annotations

import abc
import enum
from typing import Callable, Iterable, Sequence

from micdrv.virtio import VringError

__all__ = ["Chain", "Drained", "Virtqueue", "VringError", "DEFAULT_BATCH"]

DEFAULT_BATCH = 64  # chains per pop_many in a drain: half a 128-entry MIC ring, one DMA batch


class Chain:
    """One descriptor chain as the backend sees it: host memoryviews and their totals.

    ``head`` identifies the chain to the transport (and in logs); ``ctx`` is
    the transport's own per-chain state. ``tail`` is 0 unless the backend
    wrote at the end of the writable stream (see the module docstring).
    """

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len", "tail", "ctx")

    def __init__(self, head: int, readable: list[memoryview], writable: list[memoryview],
                 readable_len: int, writable_len: int, ctx: object = None):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.tail = 0
        self.ctx = ctx

    def __repr__(self) -> str:
        return f"<Chain head={self.head} readable={self.readable_len} writable={self.writable_len}>"


class Drained(enum.Enum):
    """Why :meth:`Virtqueue.drain` returned."""

    EMPTY = "empty"      # the queue ran empty; kicks are enabled again, wait for the next one
    STOPPED = "stopped"  # the backend said stop (its source ran dry, or its sink is full); kicks stay off
    WAITING = "waiting"  # chains were taken whose data is still on its way; the transport calls resume() once
    #                      it is in (kicks stay off meanwhile), see Virtqueue.pop_start


Process = Callable[[Chain], "int | None"]


class Virtqueue(abc.ABC):
    """One queue of a device, as a transport offers it to a backend.

    All methods are called on the owner's event-loop thread (see
    :mod:`backends.backend`). Subclasses implement the five abstract
    methods; everything else is written here once.
    """

    index: int      # queue index within the device (virtio-net: 0 receive, 1 transmit)
    size: int       # ring entries
    name: str
    # Called by drain before each chain, if set: a transport with work that must not wait for the drain to
    # end -- completions whose copies are done, an interrupt to the driver under way -- does it there, so a
    # long drain (a burst of 1 MiB block requests) does not hold the driver's interrupt back until its end.
    progress: Callable[[], None] | None = None

    # --- what a transport implements ----------------------------------------------------------

    @abc.abstractmethod
    def pop_many(self, limit: int) -> list[Chain]:
        """Up to ``limit`` available chains, in ring order; readable views already hold the driver's data."""

    @abc.abstractmethod
    def complete_many(self, done: Iterable[tuple[Chain, int]]) -> None:
        """Return chains with the bytes written to each; publishes them together, then notifies the driver
        once if it wants an interrupt."""

    @abc.abstractmethod
    def abandon(self, chains: Sequence[Chain]) -> None:
        """Give back unused the last chains popped (in pop order): the driver's buffers stay available."""

    @abc.abstractmethod
    def disable_notify(self) -> None:
        """Ask the driver not to kick this queue (advice; kicks may still come)."""

    @abc.abstractmethod
    def enable_notify(self) -> bool:
        """Ask for kicks again; True if the queue is still empty, False if chains arrived meanwhile."""

    # --- written once -------------------------------------------------------------------------

    def pop(self) -> Chain | None:
        """The next available chain, or None."""
        chains = self.pop_many(1)
        return chains[0] if chains else None

    def pop_start(self, limit: int, resume: Callable[[], None]) -> list[Chain] | None:
        """As :meth:`pop_many`, but a transport that must fetch the chains' readable data (a DMA) may return
        None instead of waiting for it: it took the chains, and calls ``resume()`` on the loop thread once
        their data is in; the next pop (``pop_start`` or :meth:`pop_many`) returns them. Meanwhile the
        loop serves everything else. Here: at once."""
        return self.pop_many(limit)

    def complete(self, chain: Chain, written: int, tail: int = 0) -> None:
        """Return one chain (``written`` bytes at the front of its writable stream, ``tail`` at the end)."""
        chain.tail = tail
        self.complete_many(((chain, written),))

    def complete_deferred(self, done: Iterable[tuple[Chain, int]]) -> None:
        """As :meth:`complete_many`, but the transport may hold the completion back -- its copies under
        way -- until a later call or :meth:`flush`; only :meth:`drain` uses it, and flushes before it
        returns. Here: at once."""
        self.complete_many(done)

    def flush(self) -> None:
        """Publish every completion :meth:`complete_deferred` held back (waiting for its copies)."""

    def drain(self, process: Process, batch: int = DEFAULT_BATCH, more: Callable[[], bool] | None = None,
              resume: Callable[[], None] | None = None) -> Drained:
        """Process chains until the queue is empty or ``process`` says stop.

        ``process(chain)`` returns the bytes it wrote at the front of the
        chain's writable stream (0 for a chain it only read), having set
        ``chain.tail`` if it wrote at the end; or None to stop: that chain
        and the rest of its batch are abandoned (left for later) and kicks
        stay disabled, because the backend itself will call drain again when
        its source or sink is ready. Each batch is completed with one
        :meth:`complete_deferred` (the transport may still be copying it
        while the next batch is processed) or, where it stops, one
        :meth:`complete_many`; nothing is held back when drain returns, except
        by a transport that publishes a lazy backend's last completions once
        their copies are done (``lazy_completion``, micdrv/vop/queue.py):
        those reach the driver a moment later, never before their data.

        ``more()``, if given, is asked before every batch but the first
        whether the backend's source still has anything (a receive queue's
        tap): False stops the drain as ``process`` returning None would, but
        before any chain is taken -- every chain taken beyond what the source
        holds is staged for nothing and given back.

        ``resume``, if given, lets the drain return :attr:`Drained.WAITING`
        instead of waiting for a batch's data (:meth:`pop_start`): the
        transport calls ``resume()`` once it is in, and the backend drains
        again (with the same arguments) from there.
        """
        self.disable_notify()
        first = True
        while True:
            if more is not None and not first and not more():
                self.flush()
                return Drained.STOPPED
            first = False
            chains = self.pop_many(batch) if resume is None else self.pop_start(batch, resume)
            if chains is None:
                self.flush()
                return Drained.WAITING
            if not chains:
                self.flush()
                if self.enable_notify():
                    return Drained.EMPTY
                self.disable_notify()
                continue
            done: list[tuple[Chain, int]] = []
            i = 0
            progress = self.progress
            try:
                for i, chain in enumerate(chains):
                    if progress is not None:
                        progress()
                    written = process(chain)
                    if written is None:
                        break
                    done.append((chain, written))
                else:
                    i = len(chains)
            except BaseException:
                # Keep the ring consistent even if a backend bug escapes: finish what was done,
                # give the rest back.
                self.complete_many(done)
                self.abandon(chains[len(done):])
                raise
            if i < len(chains):
                self.complete_many(done)
                self.abandon(chains[i:])
                return Drained.STOPPED
            # the next batch is taken (and processed) while this one's copies are under way
            self.complete_deferred(done)
