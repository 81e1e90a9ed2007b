"""The DMA engine driver for host channels 0-3 (spec 4): copies, completions, spreading.

:class:`DmaEngine` owns the four host :class:`~micdrv.x100.dma_channel.DmaChannel`\\ s
of one card. A copy names card physical addresses on both sides -- GDDR
offsets for card memory, system-window addresses for host memory -- or, with
:meth:`DmaEngine.copy_to_card` / :meth:`DmaEngine.copy_from_card`, an IOVA
in the DmaArena for the host side, converted by
:meth:`~micdrv.x100.smpt.Smpt.to_card` (the one Iova -> CardPhys conversion).
Host-to-host copies are refused: the engine cannot do them (spec 4.1).

A copy is cut into at most four contiguous parts of near-equal size, one per
channel (parts smaller than ``spread_min`` are not worth a channel of their
own), and each part into MEMCPY descriptors of at most 512 KiB (spec 4.1).
Source, destination and length must be multiples of 64 bytes (spec 4.1).

Every request returns a :class:`DmaCompletion`, a
:class:`concurrent.futures.Future` whose result is the byte count.
Completion is found by *polling* the channels' status words in host memory;
``result()`` and ``wait()`` poll in the calling thread -- spinning for
``spin`` seconds if the copy is at most ``spin_bytes``, then sleeping with
back-off at a fine timer slack -- and check DCHERR every
``check_interval`` so a channel error ends the wait with a
:class:`~micdrv.x100.errors.DmaChannelError`. With ``interrupt=True`` the
last STATUS descriptor also raises the channel interrupt; when the card's
interrupts are dispatched (MSI-X only: MSI/INTx never call DMA callbacks,
spec 1.3) the completion finishes, and its done-callbacks run, from the
dispatcher without anyone polling. An event loop without interrupts calls
:meth:`DmaEngine.poll`.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import threading
import time
from concurrent.futures._base import FINISHED as _FINISHED, PENDING as _PENDING  # Future's states
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from ..addr import CardPhys, Iova
from . import dma_desc, regs
from .dma_channel import DmaChannel
from .errors import DmaChannelError, DmaError, DmaTimeout
from .interrupts import IntrType, IrqMode

if TYPE_CHECKING:
    from .card import X100

# 4096 descriptors (64 KiB) per ring rather than the kernel's 131068 (2 MiB):
# 4096 x 512 KiB is 2 GiB in flight per channel, more than any arena holds,
# and four full rings would pin 8 MiB -- the whole default RLIMIT_MEMLOCK under
# kernel VFIO -- for nothing. DRAR_HI carries the size (spec 4.2).
DEFAULT_RING_SIZE = 4096
# A part smaller than this stays with its neighbours on one channel: each
# channel costs a doorbell and a completion of its own, which pays only when
# the part is long enough to hide them. Measured with benchmarks/dma.py on the
# simulated card on a 2-core machine, where no more than two copies can run at
# once: 16 MiB as two 8 MiB parts ran at 1.1-1.2 x memcpy, as four 4 MiB parts
# at 0.7-1.05; 1 MiB in two parts ran no faster than on one channel (0.34-0.55
# against 0.51-0.66). Streams of copies still use all four channels (each
# request starts on the next one). On a card, whose channels are separate
# engines, a smaller value may pay.
SPREAD_MIN = 8 * 1024 * 1024
# A waiter for a copy of at most SPIN_BYTES spins on the status words for SPIN
# seconds; after that, and for larger copies from the start, it sleeps with
# back-off (MIN_PAUSE doubling to MAX_PAUSE). Spinning is the latency path;
# sleeping leaves the CPU to whoever does the copy (the simulated card, on a
# small machine). The spin itself yields the CPU between looks (sched_yield(2)):
# on 2 cores a spinner that never yields was a third of the daemon's samples
# while the simulator's threads could be waiting for a CPU to do the copy.
# While it sleeps the thread's timer slack is FINE_SLACK_NS: Linux lets a sleep
# overrun by the slack, 50 us by default (prctl(2) PR_SET_TIMERSLACK), which
# would turn a 10 us pause into 60.
SPIN = 0.0002
SPIN_BYTES = 256 * 1024
MIN_PAUSE = 0.00001
MAX_PAUSE = 0.0001
FINE_SLACK_NS = 1000
CHECK_INTERVAL = 0.005  # seconds between DCHERR reads while waiting
SUBMIT_TIMEOUT = 10.0  # longest wait for ring space
_COND_INIT = threading.Lock()  # makes a DmaCompletion's Condition exactly once
_LEN_SHIFT = regs.DESC_LEN_SHIFT  # MEMCPY: qw0 = src | len / 64 << 46, qw1 = 1 << 60 | dst (spec 4.3)
_MEMCPY_QW1 = regs.DESC_MEMCPY << regs.DESC_TYPE_SHIFT


_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)
_sched_yield = os.sched_yield


def timer_slack(ns: int) -> int:
    """Set the calling thread's timer slack to ``ns`` nanoseconds (prctl(2)); returns the previous value."""
    old = _libc.prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0)
    _libc.prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0)
    return old


class DmaCompletion(concurrent.futures.Future):
    """The completion of one DMA request: a Future whose result is the number of bytes moved.

    ``result(timeout)``, ``exception(timeout)`` and :meth:`wait` poll the
    channels involved while they wait; a request cannot be cancelled.

    The Future's Condition is made on first use (:attr:`_condition`): a copy
    whose completion is polled -- every copy the VOP path makes -- settles
    and is read without one (:meth:`_settle`, :meth:`result`). Whatever needs
    the Condition (``concurrent.futures.wait``, done-callbacks) makes it, and
    from then on the Future's own code runs unchanged.
    """

    def __init__(self, engine: "DmaEngine", channels: Sequence[DmaChannel], nbytes: int, parts: int):
        # Future.__init__'s fields, but no Condition yet (see the class docstring)
        self._cond: threading.Condition | None = None
        self._state = _PENDING
        self._result = None
        self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []
        self._engine = engine
        self.channels = channels
        self.nbytes = nbytes
        self._remaining = parts
        self._plock = threading.Lock() if parts > 1 else None  # parts settle from different channels
        self.interrupt = False  # whether its last STATUS raises the channel interrupt (set by _submit)
        self.settled = False  # set once the outcome is in: a lock-free done() for the polling loop

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _COND_INIT:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    def _settle(self, result, exc: BaseException | None) -> None:
        """Record the outcome; the first one wins."""
        if self._cond is None:
            with _COND_INIT:
                if self._cond is None:  # nobody waits and no callbacks: both would have made the Condition
                    if self._state == _PENDING:
                        self._result, self._exception = result, exc
                        self._state = _FINISHED
                    self.settled = True
                    return
        try:
            if exc is None:
                self.set_result(result)
            else:
                self.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # already failed by another part's channel error
        self.settled = True

    def cancel(self) -> bool:
        return False  # DMA cannot be recalled once the descriptors are queued

    def done(self) -> bool:
        return self._state == _FINISHED  # never cancelled, so finished is done

    def _part_done(self) -> None:
        lock = self._plock
        if lock is not None:
            with lock:
                self._remaining -= 1
                if self._remaining:
                    return
        self._settle(self.nbytes, None)

    def _fail(self, exc: BaseException) -> None:
        self._settle(None, exc)

    def wait(self, timeout: float | None = None) -> None:
        """Poll until done (or raise :class:`DmaTimeout`); does not raise the request's own error."""
        if not self.settled:
            self._engine._wait(self, timeout)

    def result(self, timeout: float | None = None):
        if not self.settled:
            self._engine._wait(self, timeout)
        if self._state == _FINISHED and self._exception is None:
            return self._result
        return super().result(0)

    def exception(self, timeout: float | None = None):
        if not self.settled:
            self._engine._wait(self, timeout)
        if self._state == _FINISHED:
            return self._exception
        return super().exception(0)


class DmaEngine:
    """Host DMA channels 0-3 of ``card``.

    :meth:`start` once the card is reset and ready and its state restored
    (a card reset clears the channel registers: :meth:`stop` before it,
    :meth:`start` again after). :meth:`close` before closing the card.
    """

    def __init__(self, card: "X100", *, ring_size: int = DEFAULT_RING_SIZE,
                 channels: Iterable[int] = regs.DMA_HOST_CHANNELS, interrupts: bool = True,
                 spin: float = SPIN, spin_bytes: int = SPIN_BYTES, check_interval: float = CHECK_INTERVAL,
                 spread_min: int = SPREAD_MIN):
        self.card = card
        self.spin = spin
        self.spin_bytes = spin_bytes
        self.check_interval = check_interval
        self.spread_min = spread_min
        self.use_interrupts = interrupts
        self._dcr_lock = threading.Lock()
        self.channels: dict[int, DmaChannel] = {}
        try:
            for ch in channels:
                self.channels[ch] = DmaChannel(card.regs, card.arena, card.smpt, ch, ring_size, self._dcr_lock)
        except BaseException:
            self.close()
            raise
        self._all = list(self.channels.values())
        self._rr = 0
        self._cookies: list[int] = []
        self._card_mem = card.aperture.size
        self._host_lo = card.smpt.to_card(card.arena.iova_base, card.arena.size)
        self._host_hi = self._host_lo + card.arena.size
        # card memory below the system window and the arena above it: what _where tells them apart by
        self._windows_apart = self._card_mem <= regs.SYSTEM_WINDOW <= self._host_lo

    # --- lifetime --------------------------------------------------------------------------
    def start(self) -> None:
        """Set up every channel (spec 4.4) and request the channel interrupts (offsets 8 + ch)."""
        for c in self._all:
            c.setup()
        if self.use_interrupts and not self._cookies:
            for c in self._all:
                self._cookies.append(self.card.request_irq(IntrType.DMA, c.ch, c.on_interrupt, f"dma{c.ch}"))

    @property
    def interrupt_completion(self) -> bool:
        """Whether ``interrupt=True`` requests can finish without polling (MSI-X mode only, spec 1.3)."""
        return bool(self._cookies) and self.card.interrupts.mode is IrqMode.MSIX

    def stop(self) -> None:
        """Free the interrupts and disable the channels; work still pending fails."""
        # Each cookie is freed once, even when freeing one fails (a card gone from the bus fails the MXAR
        # write after the callback is forgotten): a second stop() from close() then finds nothing to free.
        cookies, self._cookies = self._cookies, []
        error = None
        for cookie in cookies:
            try:
                self.card.free_irq(cookie)
            except Exception as e:
                error = error or e
        for c in self._all:
            try:
                c.shutdown()
            except Exception as e:
                error = error or e
        if error is not None:
            raise error

    def close(self) -> None:
        """:meth:`stop`, then free the rings in host memory -- those even when the card cannot be reached."""
        try:
            if not self.card.dev.closed:
                self.stop()
        finally:
            for c in self.channels.values():
                c.close()
            self.channels = {}
            self._all = []

    def __enter__(self) -> "DmaEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reinit(self, ch: int) -> None:
        """Recover channel ``ch`` after a :class:`~micdrv.x100.errors.DmaChannelError`."""
        self.channels[ch].reinit()

    # --- requests --------------------------------------------------------------------------
    def _where(self, addr: int, length: int, what: str) -> bool:
        """True for host memory; raises when [addr, +length) is neither card memory nor the arena."""
        if addr < regs.SYSTEM_WINDOW:
            if addr < 0 or addr + length > self._card_mem:
                raise DmaError(f"DMA {what} [{addr:#x}, +{length:#x})",
                               f"outside card memory (BAR0 is {self._card_mem:#x} bytes)")
            return False
        if not (self._host_lo <= addr and addr + length <= self._host_hi):
            raise DmaError(f"DMA {what} [{addr:#x}, +{length:#x})",
                           "host address outside the DmaArena's SMPT window (nothing else is mapped for the card)")
        return True

    def _pick(self, channels: Sequence[int] | None) -> list[DmaChannel]:
        if channels is None:
            chans = self._all
        else:
            try:
                chans = [self.channels[c] for c in channels]
            except KeyError as e:
                raise DmaError("DMA request", f"channel {e.args[0]} is not one of {sorted(self.channels)}") from None
        if not chans:
            raise DmaError("DMA request", "no channels")
        return chans

    def memcpy(self, dst: CardPhys | int, src: CardPhys | int, length: int, *,
               channels: Sequence[int] | None = None, interrupt: bool = False,
               callback: Callable[[DmaCompletion], None] | None = None) -> DmaCompletion:
        """Copy ``length`` bytes between card physical addresses; returns the completion.

        ``channels`` limits the channels used (default all); ``interrupt``
        ends each part with the interrupting STATUS pair; ``callback`` is
        added as a done-callback.
        """
        if length <= 0 or (dst | src | length) & (dma_desc.ALIGN - 1):
            raise DmaError(f"DMA copy of {length:#x} bytes {src:#x} -> {dst:#x}",
                           "source, destination and length must be positive multiples of 64 (spec 4.1)")
        if self._where(dst, length, "destination") & self._where(src, length, "source"):
            raise DmaError(f"DMA copy {src:#x} -> {dst:#x}", "host to host: the engine cannot do it (spec 4.1)")
        chans = self._all if channels is None else self._pick(channels)
        start = self._rr % len(chans)
        self._rr = start + 1
        if length < 2 * self.spread_min or len(chans) == 1:
            # one channel: the MEMCPY descriptors straight from the arithmetic (the latency path)
            ch = chans[start]
            step = dma_desc.MAX_XFER
            if length <= step:
                descs: list[tuple[int, int]] = [(src | (length >> 6) << _LEN_SHIFT, _MEMCPY_QW1 | dst)]
            else:
                descs = [(src + o | (min(step, length - o) >> 6) << _LEN_SHIFT, _MEMCPY_QW1 | dst + o)
                         for o in range(0, length, step)]
            if len(descs) <= ch.max_batch:
                c = DmaCompletion(self, (ch,), length, 1)
                if callback is not None:
                    c.add_done_callback(callback)
                self._submit(c, ((ch, descs, length),), interrupt)
                return c
        parts = dma_desc.spread(length, len(chans), self.spread_min)
        plan = []  # (channel, descriptors, bytes): one submission each
        for k, (off, size) in enumerate(parts):
            ch = chans[(start + k) % len(chans)]
            pieces = dma_desc.split(size)
            step = ch.max_batch
            for i in range(0, len(pieces), step):
                batch = pieces[i:i + step]
                plan.append((ch, [dma_desc.memcpy_desc(dst + off + o, src + off + o, n) for o, n in batch],
                             sum(n for _o, n in batch)))
        used = tuple(dict.fromkeys(ch for ch, _d, _n in plan))
        c = DmaCompletion(self, used, length, len(plan))
        if callback is not None:
            c.add_done_callback(callback)
        self._submit(c, plan, interrupt)
        return c

    def memcpy_batch(self, copies: Sequence[tuple[int, int, int]], *, channels: Sequence[int] | None = None,
                     interrupt: bool = False,
                     callback: Callable[[DmaCompletion], None] | None = None) -> DmaCompletion:
        """Several ``(dst, src, length)`` copies (card physical, as :meth:`memcpy`) with one completion.

        The batch goes to as many channels as its bytes are worth by the
        rule :meth:`memcpy` follows -- one per ``spread_min``, at least one,
        so anything under twice ``spread_min`` takes one channel -- each
        getting its share of the copies (whole copies, each to the channel
        with the fewest bytes so far) as one submission: one DHPR write and
        one STATUS for many copies, as the kernel's ``issue_pending`` after
        several ``tx_submit`` calls. This is the path for a ring's worth of
        small buffers (a VOP descriptor chain), where every further channel
        would only add a doorbell and a completion to wait for.
        """
        if not copies:
            raise DmaError("DMA batch", "no copies")
        chans = self._all if channels is None else self._pick(channels)
        start = self._rr % len(chans)
        self._rr = start + 1
        total = 0
        step = dma_desc.MAX_XFER
        # card memory is [0, card_mem), the arena's window [host_lo, host_hi): a copy from one into the other
        # passes _where's checks as they stand, anything else is looked at by _where itself
        card_mem, host_lo, host_hi = self._card_mem, self._host_lo, self._host_hi
        fast = self._windows_apart
        for dst, src, length in copies:
            if length <= 0 or (dst | src | length) & (dma_desc.ALIGN - 1):
                raise DmaError(f"DMA copy of {length:#x} bytes {src:#x} -> {dst:#x}",
                               "source, destination and length must be positive multiples of 64 (spec 4.1)")
            if not (fast and ((0 <= src and src + length <= card_mem and host_lo <= dst and dst + length <= host_hi)
                              or (0 <= dst and dst + length <= card_mem and host_lo <= src
                                  and src + length <= host_hi))):
                if self._where(dst, length, "destination") & self._where(src, length, "source"):
                    raise DmaError(f"DMA copy {src:#x} -> {dst:#x}",
                                   "host to host: the engine cannot do it (spec 4.1)")
            total += length
        order = (chans[start:] + chans[:start])[:max(1, min(len(chans), total // max(self.spread_min, 1)))]
        if len(order) == 1:
            # one channel (everything under twice spread_min): the descriptors in one list, as below
            ch = order[0]
            one: list[tuple[int, int]] = []
            for dst, src, length in copies:
                if length <= step:
                    one.append((src | (length >> 6) << _LEN_SHIFT, _MEMCPY_QW1 | dst))
                else:
                    one.extend((src + o | (min(step, length - o) >> 6) << _LEN_SHIFT, _MEMCPY_QW1 | dst + o)
                               for o in range(0, length, step))
            if len(one) <= ch.max_batch:
                c = DmaCompletion(self, (ch,), total, 1)
                if callback is not None:
                    c.add_done_callback(callback)
                self._submit(c, ((ch, one, total),), interrupt)
                return c
        load = {ch: 0 for ch in order}
        descs: dict[DmaChannel, list[tuple[int, int, int]]] = {ch: [] for ch in order}  # (qw0, qw1, bytes)
        for dst, src, length in copies:
            ch = order[0] if len(order) == 1 else min(order, key=load.__getitem__)
            load[ch] += length
            # MEMCPY descriptors straight from the arithmetic, as memcpy() does: _where bounded both
            # addresses, so they fit the descriptor fields (spec 4.3)
            if length <= step:
                descs[ch].append((src | (length >> 6) << _LEN_SHIFT, _MEMCPY_QW1 | dst, length))
            else:
                descs[ch].extend((src + o | (min(step, length - o) >> 6) << _LEN_SHIFT, _MEMCPY_QW1 | dst + o,
                                  min(step, length - o)) for o in range(0, length, step))
        plan = []
        for ch in order:
            d = descs[ch]
            for i in range(0, len(d), ch.max_batch):
                piece = d[i:i + ch.max_batch]
                plan.append((ch, [(q0, q1) for q0, q1, _n in piece], sum(n for _q0, _q1, n in piece)))
        c = DmaCompletion(self, tuple(dict.fromkeys(ch for ch, _d, _n in plan)), total, len(plan))
        if callback is not None:
            c.add_done_callback(callback)
        self._submit(c, plan, interrupt)
        return c

    def copy_to_card(self, dst: CardPhys | int, src: Iova | int, length: int, **kw) -> DmaCompletion:
        """Host -> card: ``length`` bytes from arena IOVA ``src`` to card address ``dst``."""
        return self.memcpy(dst, self.card.smpt.to_card(src, length), length, **kw)

    def copy_from_card(self, dst: Iova | int, src: CardPhys | int, length: int, **kw) -> DmaCompletion:
        """Card -> host: ``length`` bytes from card address ``src`` to arena IOVA ``dst``."""
        return self.memcpy(self.card.smpt.to_card(dst, length), src, length, **kw)

    def write_value(self, dst: CardPhys | int, value: int, *, channel: int = 0,
                    interrupt: bool = False) -> DmaCompletion:
        """Store a u64 at ``dst`` with a STATUS descriptor (``device_prep_dma_imm_data``, spec 4.4)."""
        self._where(dst, 8, "destination")
        return self.submit_descriptors(channel, [dma_desc.status_desc(dst, value)], interrupt=interrupt)

    def submit_descriptors(self, channel: int, descs: list[tuple[int, int]], *,
                           interrupt: bool = False) -> DmaCompletion:
        """Queue raw (qw0, qw1) descriptors on one channel, closed by the channel's STATUS.

        Nothing is checked: this is for callers that build their own
        descriptors, and for tests that need a bad one.
        """
        ch = self._pick([channel])[0]
        c = DmaCompletion(self, (ch,), 0, 1)
        self._submit(c, [(ch, list(descs), 0)], interrupt)
        return c

    def _submit(self, c: DmaCompletion, plan, interrupt: bool) -> None:
        c.interrupt = interrupt
        try:
            for ch, batch, nbytes in plan:
                if ch.try_submit(batch, c, interrupt, nbytes):
                    continue
                deadline = time.monotonic() + SUBMIT_TIMEOUT
                while not ch.try_submit(batch, c, interrupt, nbytes):
                    ch.poll()
                    err = ch.check()
                    if err is not None:
                        raise err.again()
                    if time.monotonic() > deadline:
                        raise DmaTimeout(f"DMA channel {ch.ch}", f"no ring space for {len(batch) + 2} "
                                         f"descriptors within {SUBMIT_TIMEOUT:g} s")
                    time.sleep(0.0001)
        except DmaError as e:
            c._fail(e)  # parts already queued complete into a failed request; the error shows at result()

    # --- completion --------------------------------------------------------------------------
    def poll(self) -> int:
        """Retire whatever has completed on every channel; returns how many submissions finished."""
        return sum(c.poll() for c in self._all)

    def check(self) -> list[DmaChannelError]:
        """Read DCHERR of every busy channel; returns the channel errors found."""
        return [e for c in self._all if c.busy and (e := c.check()) is not None]

    def _wait(self, c: DmaCompletion, timeout: float | None) -> None:
        chans = c.channels
        t0 = time.monotonic()
        deadline = None if timeout is None else t0 + timeout
        # Spin only for a copy that should be done soon: a waiter spinning through a long one
        # takes the CPU the card -- the simulator, on a small machine -- needs to do it.
        spin_end = t0 + (self.spin if c.nbytes <= self.spin_bytes else 0.0)
        next_check = t0 + self.check_interval
        pause = 0.0
        slack = None
        try:
            while True:
                for ch in chans:
                    ch.poll()
                if c.settled:
                    return
                t = time.monotonic()
                if t >= next_check:
                    for ch in chans:
                        ch.check()
                    if c.settled:
                        return
                    next_check = t + self.check_interval
                if deadline is not None and t >= deadline:
                    raise DmaTimeout(f"wait for DMA of {c.nbytes:#x} bytes on channel(s) "
                                     f"{', '.join(str(ch.ch) for ch in chans)}", f"not complete after {timeout:g} s")
                if t < spin_end:
                    # spinning yields the CPU (and the GIL) between looks, as cpu_relax() would let a sibling
                    # hyperthread run: on a small machine the runnable thread may be the one doing the copy
                    # (the simulated card), or a thread of ours with an interrupt to send
                    _sched_yield()
                else:
                    if slack is None:
                        slack = timer_slack(FINE_SLACK_NS)
                    pause = min(pause * 2 or MIN_PAUSE, MAX_PAUSE)
                    if c.interrupt and self.interrupt_completion:   # else only polling can end it: sleep
                        concurrent.futures.wait([c], pause)
                    else:
                        time.sleep(pause)
        finally:
            if slack is not None:
                timer_slack(slack)

    # --- numbers for the daemon ----------------------------------------------------------------
    def stats(self) -> dict[int, dict[str, int]]:
        return {c.ch: {"submitted": c.submitted, "descriptors": c.descriptors, "bytes": c.bytes,
                       "interrupts": c.interrupts, "pending": len(c._pending)} for c in self._all}
