"""The host's COSM: one card's state machine, its heartbeat watchdog and the SCIF server (spec 3.4, 7).

This is cosm_main.c and cosm_scif_server.c over :class:`~micdrv.cosm.hwops.CosmHwOps`:

=================  ====================================================================
:class:`CosmDevice`  ``struct cosm_device``: state, shutdown status, the boot attributes
                   (firmware, ramdisk, cmdline, bootmode, log_buf_addr, log_buf_len,
                   heartbeat_enable), start / shutdown / reset / stop and the per-card
                   SCIF work (``cosm_scif_work``)
:class:`CosmServer`  the listening endpoint on SCIF port 201 and its accept thread
                   (``cosm_scif_server``), handing each connection to the device of
                   node ``n`` = card ``n - 1``
=================  ====================================================================

State transitions (spec 7.3), exactly as the kernel makes them:

* ``start`` (sysfs "boot"): only from ready; if SPAD2 says not ready, reset and
  poll first (that may end in reset_failed, and the start fails). ``hw.start``;
  then booting (bootmode linux) or online (anything else).
* the card's COSM client connects: booting/online -> online, the watchdog takes
  ``heartbeat_enable``, SYNC_TIME is sent once.
* ``shutdown``: only from online with a connected endpoint; SHUTDOWN sent,
  watchdog off, shutting_down.
* SHUTDOWN_STATUS (crashed, halted, poweroff, restart) from the card: stored,
  watchdog off, shutting_down; the stored status is published when the card's
  endpoint closes (it is sent while the card is still going down).
* no message for ``heartbeat_timeout`` seconds with the watchdog on: crashed,
  published at once, shutting_down.
* ``reset``: from any state but ready; resetting at once, then in the
  background ``stop``: ``hw.stop`` unless the card was ready or reset_failed
  before, ``hw.reset`` + ready polling (45 x 1 s by default) -> ready or
  reset_failed, shutdown status back to nop.
* ``await_ready``: the daemon reset the card itself before COSM took it over
  (a card a killed daemon left started): ready -> resetting, then the same
  ready polling, without another reset.

What the kernel left to mpssd (reset after a shutdown, boot again after a
restart) is the service's policy (:mod:`micdrv.service`), not here.

Every state change calls the listeners registered with :meth:`CosmDevice.subscribe`
(the control socket's waiters, systemd STATUS, FUSE poll), without locks held.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time
from typing import Callable

from ..scif import POLLHUP, POLLIN, Endpoint, ScifError, ScifTimeout
from ..scif.wire import SCIF_COSM_BACKLOG, SCIF_COSM_LISTEN_PORT
from .hwops import BootError, BootSpec, CosmHwOps
from .msg import (COSM_HEARTBEAT_TIMEOUT_SEC, COSM_MSG_SIZE, COSM_RESET_POLLS, CosmMsg, CosmMsgId,
                  CosmProtocolError, MicState, MicStatus)

log = logging.getLogger(__name__)

RESET_POLL_INTERVAL = 1.0   # cosm_hw_reset: msleep(1000) between ready checks (spec 2.5)
SEND_TIMEOUT = 5.0          # a blocking scif_send of 24 bytes that takes longer means the card is gone
ACCEPT_STEP = 0.5           # how often the accept thread looks up from scif_accept to see if it should stop


class CosmError(Exception):
    """A COSM request refused; ``errno`` is what the sysfs write would have returned (spec 7.3)."""

    def __init__(self, err: int, message: str):
        self.errno = err
        self.code = errno.errorcode.get(err, str(err))
        super().__init__(message)


@dataclasses.dataclass
class Attributes:
    """The writable sysfs attributes of ``/sys/class/mic/micN`` (spec 3.5), as COSM keeps them."""

    firmware: str = ""
    ramdisk: str = ""
    cmdline: str = ""
    bootmode: str = "linux"
    log_buf_addr: int = 0
    log_buf_len: int = 0
    heartbeat_enable: bool = True


Listener = Callable[["CosmDevice"], None]


class CosmDevice:
    """One card's COSM state (``struct cosm_device``)."""

    def __init__(self, hw: CosmHwOps, *, attributes: Attributes | None = None,
                 heartbeat_timeout: float = COSM_HEARTBEAT_TIMEOUT_SEC,
                 reset_polls: int = COSM_RESET_POLLS, reset_interval: float = RESET_POLL_INTERVAL,
                 resolve: Callable[[str], "object"] | None = None,
                 before_start: Callable[[], None] | None = None):
        self.hw = hw
        self._before_start = before_start        # called just before every hw.start (the boot kick)
        self.name = hw.name
        self.attrs = attributes or Attributes()
        self.heartbeat_timeout = heartbeat_timeout
        self.reset_polls = reset_polls
        self.reset_interval = reset_interval
        # firmware/ramdisk are relative to the firmware search path (spec 3.1 request_firmware).
        self._resolve = resolve
        self.mutex = threading.RLock()            # cosm_mutex
        self._cond = threading.Condition(threading.Lock())  # state waiters
        self.state = MicState.READY              # zeroed struct after probe (spec 3.4)
        self.prev_state = MicState.READY
        self.shutdown_status = MicStatus.NOP
        self._shutdown_status_int = MicStatus.NOP
        self.heartbeat_watchdog_enable = False
        self.epd: Endpoint | None = None
        self._work: threading.Thread | None = None
        self._reset_work: threading.Thread | None = None
        self._listeners: list[Listener] = []
        self.last_heartbeat: float | None = None
        self.heartbeats = 0
        self.generation = 0                       # bumped on every state change
        self.broken: str | None = None            # why the card was declared crashed for breaking a protocol
        self.closed = False

    # --- notification --------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(device)`` after every state or status change; returns an unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _changed(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()
        for fn in list(self._listeners):
            try:
                fn(self)
            except Exception:
                log.exception("%s: state listener failed", self.name)

    def _set_state(self, state: MicState) -> None:
        """``cosm_set_state`` (with cosm_mutex held, or from the one thread that owns the change)."""
        if state == self.state:
            return
        log.info("%s: %s -> %s", self.name, self.state.sysfs, state.sysfs)
        self.state = state
        self._changed()

    def _set_shutdown_status(self, status: MicStatus) -> None:
        if status == self.shutdown_status:
            return
        log.info("%s: shutdown_status %s", self.name, status.sysfs)
        self.shutdown_status = status
        self._changed()

    def wait_for(self, predicate: Callable[["CosmDevice"], bool], timeout: float | None) -> bool:
        """Block until ``predicate(self)`` holds (checked after every change) or ``timeout`` passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_states(self, states: tuple[MicState, ...], timeout: float | None) -> bool:
        return self.wait_for(lambda d: d.state in states, timeout)

    # --- the boot attributes (spec 3.5) ----------------------------------------------------------
    def boot_spec(self) -> BootSpec:
        """What ``start`` boots, from the attributes; paths resolved against the firmware directory."""
        if not self.attrs.firmware:
            raise CosmError(errno.EINVAL, f"{self.name}: no firmware set (spec 3.5 'firmware')")
        resolve = self._resolve or (lambda p: p)
        return BootSpec(firmware=resolve(self.attrs.firmware),
                        ramdisk=resolve(self.attrs.ramdisk) if self.attrs.ramdisk else None,
                        cmdline=self.attrs.cmdline, bootmode=self.attrs.bootmode)

    def set_heartbeat_enable(self, enable: bool) -> None:
        """sysfs ``heartbeat_enable``: takes effect at once if the card is online (spec 3.5)."""
        with self.mutex:
            self.attrs.heartbeat_enable = bool(enable)
            if self.state is MicState.ONLINE:
                self.heartbeat_watchdog_enable = bool(enable)
        self._changed()

    # --- hw reset (cosm_hw_reset) -------------------------------------------------------------------
    def _hw_reset(self, force: bool, reset: bool = True) -> None:
        """Reset (unless ``reset`` is false: done already), then poll ready up to ``reset_polls`` times:
        ready or reset_failed (spec 2.5)."""
        try:
            if reset:
                self.hw.reset()
            for i in range(self.reset_polls):
                if self.hw.ready():
                    self._set_state(MicState.READY)
                    return
                if i + 1 < self.reset_polls:
                    time.sleep(self.reset_interval)
        except Exception as e:  # the card (or the link to it) is gone: that is a failed reset
            log.error("%s: reset: %s", self.name, e)
        log.error("%s: not ready after %d polls %g s apart (post code %r)", self.name, self.reset_polls,
                  self.reset_interval, self._post_code())
        self._set_state(MicState.RESET_FAILED)

    def _post_code(self) -> str:
        try:
            return self.hw.post_code()
        except Exception:
            return "??"

    # --- start (sysfs "boot") ------------------------------------------------------------------
    def start(self, boot: BootSpec | None = None) -> None:
        """``cosm_start``: boot the card. Raises :class:`CosmError` (state unchanged) on failure."""
        with self.mutex:
            if self.closed:
                raise CosmError(errno.ENODEV, f"{self.name}: the device is going away")
            if not self.attrs.bootmode:
                raise CosmError(errno.EINVAL, f"{self.name}: bootmode not set")
            spec = boot or self.boot_spec()
            while True:
                if self.state is not MicState.READY:
                    raise CosmError(errno.EINVAL, f"{self.name}: cannot boot in state {self.state.sysfs} "
                                                  f"(the card must be ready)")
                if self.hw.ready():
                    break
                log.info("%s: not ready for a download, resetting first", self.name)
                self._hw_reset(False)
            try:
                if self._before_start is not None:
                    self._before_start()
                self.hw.start(spec)
            except BootError as e:
                raise CosmError(errno.EINVAL if e.step != "firmware" else errno.ENOENT,
                                f"{self.name}: boot failed: {e}") from e
            self.heartbeat_watchdog_enable = False
            self._shutdown_status_int = MicStatus.NOP
            self._set_state(MicState.BOOTING if spec.bootmode == "linux" else MicState.ONLINE)

    # --- shutdown ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """``cosm_shutdown``: ask the card's OS to power off (spec 7.3)."""
        with self.mutex:
            if self.state is not MicState.ONLINE:
                raise CosmError(errno.EINVAL, f"{self.name}: cannot shut down in state {self.state.sysfs} "
                                              f"(the card must be online)")
            if self.epd is None:
                raise CosmError(errno.ENOTCONN, f"{self.name}: the card's COSM client is not connected")
            try:
                self.epd.send(CosmMsg.shutdown().encode(), timeout=SEND_TIMEOUT)
            except ScifError as e:
                raise CosmError(errno.EIO, f"{self.name}: sending SHUTDOWN failed: {e}") from e
            self.heartbeat_watchdog_enable = False
            self._set_state(MicState.SHUTTING_DOWN)

    # --- reset and stop ------------------------------------------------------------------------
    def reset(self) -> None:
        """``cosm_reset``: resetting now, the reset itself in the background (spec 7.3)."""
        with self.mutex:
            if self.state is MicState.READY:
                raise CosmError(errno.EINVAL, f"{self.name}: the card is ready already")
            if self.state is MicState.RESETTING:
                return
            self.prev_state = self.state
            self.broken = None
            self._set_state(MicState.RESETTING)
            self._reset_work = threading.Thread(target=self.stop, args=(False,), name=f"{self.name} reset",
                                                daemon=True)
            self._reset_work.start()

    def await_ready(self) -> None:
        """The card was reset before COSM took it over: resetting now, ready polling in the background."""
        with self.mutex:
            if self.state is not MicState.READY:
                raise CosmError(errno.EINVAL, f"{self.name}: await_ready is for a card just probed")
            self.prev_state = MicState.READY
            self._set_state(MicState.RESETTING)

            def poll() -> None:
                with self.mutex:
                    self._hw_reset(False, reset=False)
            self._reset_work = threading.Thread(target=poll, name=f"{self.name} reset", daemon=True)
            self._reset_work.start()

    def stop(self, force: bool = False) -> None:
        """``cosm_stop``: stop the card if it was started, reset it, wait for ready."""
        with self.mutex:
            if self.state is not MicState.READY or force:
                state = self.prev_state if self.state is MicState.RESETTING else self.state
                call_hw_ops = state not in (MicState.RESET_FAILED, MicState.READY)
                if self.state is not MicState.RESETTING:
                    self.prev_state = self.state
                    self._set_state(MicState.RESETTING)
                self.heartbeat_watchdog_enable = False
                # A crashed card never answers the SCIF exit hand-shake: don't wait for it.
                dead = force or self.shutdown_status is MicStatus.CRASHED
                if call_hw_ops:
                    try:
                        self.hw.stop(dead)
                    except Exception:
                        log.exception("%s: stop", self.name)
                self._hw_reset(force)
                self._shutdown_status_int = MicStatus.NOP
                self._set_shutdown_status(MicStatus.NOP)
            work = self._work
        if work is not None and work is not threading.current_thread():
            work.join()  # flush_work(&cdev->scif_work)

    def wait_reset_done(self, timeout: float | None = None) -> None:
        t = self._reset_work
        if t is not None:
            t.join(timeout)

    # --- the card's connection (cosm_scif_work) --------------------------------------------------------
    def connection(self, ep: Endpoint) -> None:
        """The COSM server accepted ``ep`` from this card: run ``cosm_scif_work`` on a thread of its own."""
        old = self._work
        if old is not None and old.is_alive():
            # The card's client reconnected (spec 7.2: reloaded cosm_client) while the old work runs:
            # the old endpoint is dead to the card; let its work see HUP first.
            old.join(SEND_TIMEOUT)
        t = threading.Thread(target=self._scif_work, args=(ep,), name=f"{self.name} cosm", daemon=True)
        self._work = t
        t.start()

    def _set_online(self, ep: Endpoint) -> bool:
        if self.state in (MicState.BOOTING, MicState.ONLINE):
            self.heartbeat_watchdog_enable = self.attrs.heartbeat_enable
            self.epd = ep
            self.last_heartbeat = time.monotonic()
            if self.state is MicState.BOOTING:
                self._set_state(MicState.ONLINE)
            try:
                ep.send(CosmMsg.sync_time().encode(), timeout=SEND_TIMEOUT)
            except ScifError as e:
                log.error("%s: SYNC_TIME: %s", self.name, e)
            return True
        log.warning("%s: not going online in state %s", self.name, self.state.sysfs)
        return False

    def _scif_work(self, ep: Endpoint) -> None:
        with self.mutex:
            if not self._set_online(ep):
                ep.close(timeout=0)
                return
        while True:
            try:
                revents = ep.poll(POLLIN, timeout=self.heartbeat_timeout)
            except ScifError as e:
                log.error("%s: scif_poll: %s", self.name, e)
                revents = POLLHUP
            with self.mutex:
                if revents & POLLIN and not self._recv(ep):
                    self._close_epd(ep)
                    return
                if revents & POLLHUP:
                    self._close_epd(ep)
                    return
                if not revents and self.heartbeat_watchdog_enable:
                    self._set_crashed()

    def _recv(self, ep: Endpoint) -> bool:
        """``cosm_scif_recv``: every whole message that is there now; False if the card broke the protocol.

        Upstream logs a bad message and reads on. Here a message that is no
        ``cosm_msg`` (an unknown id, a shutdown status outside 1..4), one only
        the host sends (SHUTDOWN, SYNC_TIME) or a message cut short means the
        card's COSM client is broken or hostile -- and the stream's framing
        can no longer be trusted -- so the card is declared crashed
        (:meth:`card_broken`) and nothing more is read from it.
        """
        while True:
            try:
                data = ep.recv_nowait(COSM_MSG_SIZE)
                if data and len(data) < COSM_MSG_SIZE:  # the rest of a message is on its way
                    data += ep.recv(COSM_MSG_SIZE - len(data), timeout=SEND_TIMEOUT)
            except ScifTimeout:
                self.card_broken(f"it sent part of a cosm_msg and stopped for {SEND_TIMEOUT:g} s")
                return False
            except ScifError:
                return True  # HUP is seen by the poll
            if not data:
                return True
            try:
                msg = CosmMsg.decode(data)
            except CosmProtocolError as e:
                self.card_broken(f"bad COSM message: {e} ({data.hex()})")
                return False
            self.last_heartbeat = time.monotonic()
            if msg.id is CosmMsgId.SHUTDOWN_STATUS:
                self._shutdown_status_received(msg.shutdown_status)
            elif msg.id is CosmMsgId.HEARTBEAT:
                self.heartbeats += 1  # only unblocks the poll (cosm_scif_recv)
            else:
                self.card_broken(f"unexpected COSM message {msg} (only the host sends it, spec 7.1)")
                return False

    def card_broken(self, why: str) -> None:
        """The card broke the COSM or SCIF protocol: declared crashed, as the watchdog would (one log line).

        It is left in shutting_down/crashed for the operator (``micctl log``,
        then ``micctl reset``); :attr:`broken` says why until the reset.
        A card that is not booting or online (being reset, already down) is
        not declared anything more.
        """
        with self.mutex:
            if self.state not in (MicState.BOOTING, MicState.ONLINE) or self.broken is not None:
                log.warning("%s: the card broke a protocol while %s: %s", self.name, self.state.sysfs, why)
                return
            log.error("%s: the card broke the protocol, declared crashed: %s", self.name, why)
            self.broken = why
            self._shutdown_status_int = MicStatus.CRASHED
            self.heartbeat_watchdog_enable = False
            self._set_state(MicState.SHUTTING_DOWN)
            self._update_status()

    def _shutdown_status_received(self, status: MicStatus) -> None:
        """``cosm_shutdown_status_int``: remember it, watchdog off, shutting_down."""
        log.info("%s: the card reports %s", self.name, status.sysfs)
        self._shutdown_status_int = status
        self.heartbeat_watchdog_enable = False
        if self.state is not MicState.SHUTTING_DOWN:
            self._set_state(MicState.SHUTTING_DOWN)

    def _update_status(self) -> None:
        """``cosm_update_mic_status``: publish the stored status."""
        if self._shutdown_status_int is not MicStatus.NOP:
            self._set_shutdown_status(self._shutdown_status_int)
            self._shutdown_status_int = MicStatus.NOP

    def _set_crashed(self) -> None:
        log.error("%s: no heartbeat for %g s: node alive timeout", self.name, self.heartbeat_timeout)
        self._shutdown_status_received(MicStatus.CRASHED)
        self._update_status()

    def _close_epd(self, ep: Endpoint) -> None:
        """``cosm_scif_close``: publish the status, close the endpoint."""
        self._update_status()
        if self.epd is ep:
            self.epd = None
        try:
            ep.close(timeout=0)
        except ScifError:
            pass

    # --- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """``cosm_driver_remove``: stop (and reset) the card if it was started."""
        with self.mutex:
            self.closed = True
        self.wait_reset_done()
        self.stop(False)

    def snapshot(self) -> dict:
        """State, status and attributes as plain data (the control socket's ``status``/``info``)."""
        return {"card": self.name, "state": self.state.sysfs, "shutdown_status": self.shutdown_status.sysfs,
                "heartbeat_enable": int(self.attrs.heartbeat_enable), "heartbeats": self.heartbeats,
                "connected": self.epd is not None, "broken": self.broken}


class CosmServer:
    """The COSM server: SCIF port 201 on the host node, an accept thread (``cosm_scif_server``)."""

    def __init__(self, node, devices: dict[int, CosmDevice]):
        self.node = node
        self.devices = devices  # SCIF node id -> device: COSM id == node - 1 (spec 7.2)
        self.listen_epd = node.listen(SCIF_COSM_LISTEN_PORT, SCIF_COSM_BACKLOG)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cosm server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                ep = self.listen_epd.accept(timeout=ACCEPT_STEP)
            except ScifTimeout:
                continue
            except ScifError as e:
                if self._stop.is_set():
                    return
                log.error("cosm server: accept: %s", e)
                time.sleep(ACCEPT_STEP)
                continue
            dev = self.devices.get(ep.peer.node)
            if dev is None:
                log.warning("cosm server: connection from node %d, which is no card of ours", ep.peer.node)
                ep.close(timeout=0)
                continue
            dev.connection(ep)

    def close(self) -> None:
        self._stop.set()
        try:
            self.listen_epd.close(timeout=0)
        except ScifError:
            pass
        self._thread.join(ACCEPT_STEP * 4)
