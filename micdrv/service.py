"""One card's daemon: COSM over the card, what mpssd used to do, and the control socket.

:class:`CardService` wires a :class:`~micdrv.cosm.hwops.CosmHwOps` card (a
:class:`micdrv.mic.MicDevice` on a real or simulated X100) to

* a :class:`~micdrv.cosm.host.CosmDevice` with the card's configuration as
  its sysfs attributes, and the :class:`~micdrv.cosm.host.CosmServer` on
  SCIF port 201;
* the **mpssd policy** (spec 6.5), which the kernel left to user space: when
  the card goes shutting_down, wait up to 60 s for its shutdown status, then
  reset it to ready; if the status was restart, boot it again. Deliberate
  difference: a card declared *crashed* (heartbeat watchdog, or its own
  panic report, or a card that broke the COSM or SCIF protocol:
  :meth:`~micdrv.cosm.host.CosmDevice.card_broken`) is left in shutting_down/crashed for the operator, so its
  log can still be read (the log is readable only while booting, online or
  shutting_down, spec 3.5) -- ``micctl reset`` then ``micctl boot``. With
  ``auto_reset = false`` no reset happens automatically at all;
* the **started record** ``<run_dir>/<card>.started`` (:class:`StartedRecord`):
  written before every boot kick, removed when the card is ready again, so a
  daemon started after one that was killed knows to reset the card;
* the **control socket** ``<run_dir>/<card>.sock`` (mode from the
  configuration, 0660 by default), speaking JSON lines (:mod:`micdrv.jsonlines`).

Control protocol (one request per line; every reply has ``"ok"``; failures
carry ``"error"`` and ``"errno"``, the errno name the sysfs write would have
returned):

====================================================  ===============================================
request                                               reply (besides ``"ok": true``)
====================================================  ===============================================
``{"cmd": "status"}``                                 ``card``, ``state``, ``shutdown_status``,
                                                      ``post_code``, ``heartbeat_enable``, ...
``{"cmd": "info"}``                                   ``status`` plus the attributes (family,
                                                      stepping, firmware, ramdisk, cmdline,
                                                      bootmode, log_buf_addr, log_buf_len), the
                                                      daemon's pid and the card's hardware facts
``{"cmd": "boot", ["firmware", "ramdisk",             ``state`` (booting); the attributes given are
"cmdline", "bootmode"]}``                             set first, as micctrl -b writes them
``{"cmd": "shutdown"}``                               ``state`` (shutting_down)
``{"cmd": "reset"}``                                  ``state`` (resetting)
``{"cmd": "reboot"}``                                 ``state``: shutdown and boot again once ready
``{"cmd": "wait", "states": [...], "timeout": s}``    ``state`` once it is one of ``states``
                                                      (default online or ready); ``errno``
                                                      ETIMEDOUT otherwise
``{"cmd": "set", "attr": name, "value": v}``          the attribute's new value (firmware, ramdisk,
                                                      cmdline, bootmode, heartbeat_enable,
                                                      log_buf_addr, log_buf_len)
``{"cmd": "log"}``                                    ``log``: the card kernel's log (spec 3.5)
``{"cmd": "devices"}``, ``"blk-add"``,                the card's virtio devices and block hot-plug
``"blk-remove"``, ``"blk-list"``, ``"console"``       (:mod:`micdrv.vop.devices`)
====================================================  ===============================================

The sysfs attributes themselves (spec 3.5) -- reading one (:meth:`CardService.attribute`),
setting one with its validation (:meth:`~CardService.set_attribute`), a write to ``state``
(:meth:`~CardService.state_action`) and the card log (:meth:`~CardService.card_log`) -- are
methods of the service, so the control socket and the FUSE tree (:mod:`micdrv.fs`) share one
definition of what each attribute means.

Who may ask (SO_PEERCRED, SO_PEERGROUPS: the peer's uid, gid and groups when
it connected): root may do everything; members of the configured
``socket_group`` (its primary or a supplementary group) may use the
read-only commands ``status``, ``info``, ``wait``, ``log``, ``ping``,
``devices``, ``blk-list`` and ``console``; anyone else is refused (EACCES).
The socket's mode and group are the first line of defence, this check the
second.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import threading
from pathlib import Path
from typing import Callable

from .config import BOOTMODES, CMDLINE_MAX, CardConfig, Config
from .cosm.host import Attributes, CosmDevice, CosmError, CosmServer
from .cosm.hwops import CosmHwOps
from .cosm.klog import CardLogError, log_text, read_log_buf, system_map_symbols
from .cosm.msg import MicState, MicStatus
from .jsonlines import JsonLinesServer, PeerCred, RequestError

log = logging.getLogger(__name__)

SHUTDOWN_STATUS_WAIT = 60.0   # mpssd waits up to 60 s for shutdown_status (spec 6.5)
DEFAULT_WAIT = 120.0          # micctl wait's default (mpssd waits up to 120 s for ready, spec 6.5)
MAX_WAIT = 1e9                # longer is "forever"; a nan, inf or 1e300 would make Condition.wait raise
READ_ONLY = frozenset({"status", "info", "wait", "log", "ping"})
WAIT_STATES = (MicState.ONLINE, MicState.READY)


class StartedRecord:
    """``<run_dir>/<card>.started``: this card was booted by the daemon whose pid it holds.

    Written just before every boot kick, removed whenever the card is back to ready (a reset, the
    daemon's own stop). A record a daemon left behind therefore means it died with the card started:
    the card may run an OS whose devices, rings and SCIF queues were in the dead daemon's memory, so
    the next daemon resets the card before it maps anything for it (README "Running a card").
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> dict | None:
        """What a record says (``pid``), or None when there is none."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            return {"pid": None, "error": e.strerror}
        pid = text.strip()
        return {"pid": int(pid) if pid.isdigit() else None}

    def write(self) -> None:
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(f"{os.getpid()}\n")
            os.replace(tmp, self.path)
        except OSError as e:   # a boot is not refused for it; a restart after a crash then cannot know
            log.error("%s: cannot record that the card is started: %s", self.path, e)

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("%s: cannot remove the started record: %s", self.path, e)


def started_record(config: Config, card: CardConfig) -> StartedRecord:
    return StartedRecord(Path(config.settings.run_dir) / f"{card.name}.started")


def _errno_error(err: int, message: str) -> RequestError:
    return RequestError(message, errno=errno.errorcode.get(err, str(err)))


def _from_cosm(e: CosmError) -> RequestError:
    return RequestError(str(e), errno=e.code)


def parse_bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip() in ("0", "1"):
        return v.strip() == "1"
    raise _errno_error(errno.EINVAL, f"heartbeat_enable takes 0 or 1, not {v!r}")


def parse_hex(v, what: str) -> int:
    try:
        n = v if isinstance(v, int) and not isinstance(v, bool) else int(str(v).strip(), 16)
    except ValueError:
        raise _errno_error(errno.EINVAL, f"{what} takes a hexadecimal address, not {v!r}") from None
    if not 0 <= n < 1 << 64:
        raise _errno_error(errno.EINVAL, f"{what} {v!r} does not fit 64 bits")
    return n


class CardService:
    """The daemon for one card. :meth:`start` it, then :meth:`close` it (which resets a started card)."""

    def __init__(self, hw: CosmHwOps, card: CardConfig, config: Config, *,
                 hardware_info: Callable[[], dict] | None = None,
                 read_log: Callable[[CosmDevice], str] | None = None,
                 reset_interval: float | None = None, devices=None, reset_at_start: bool = False):
        self.hw = hw
        self.started = started_record(config, card)
        self.reset_at_start = reset_at_start   # the daemon reset the card at probe: COSM polls it to ready
        self.devices = devices   # micdrv.vop.devices.CardDevices: the card's virtio devices, or None
        self.card = card
        self.config = config
        self.hardware_info = hardware_info or (lambda: {})
        self.read_log = read_log or self._read_card_log
        attrs = Attributes(firmware=card.firmware or "", ramdisk=card.ramdisk or "", cmdline=card.cmdline,
                           bootmode=card.bootmode, log_buf_addr=card.log_buf_addr or 0,
                           log_buf_len=card.log_buf_len or 0, heartbeat_enable=card.heartbeat.enable)
        kw = {}
        if reset_interval is not None:
            kw["reset_interval"] = reset_interval
        polls = max(1, round(card.reset_timeout / (reset_interval or 1.0)))
        self.cosm = CosmDevice(hw, attributes=attrs, heartbeat_timeout=card.heartbeat.timeout, reset_polls=polls,
                               resolve=config.firmware_path, before_start=self.started.write, **kw)
        self.socket_path = str(config.socket_path(card))
        self._server: CosmServer | None = None
        self._control: JsonLinesServer | None = None
        self._policy_lock = threading.Lock()
        self._policy_busy = False
        self._boot_when_ready = False
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self.allowed_gid = self._group_id(config.settings.socket_group)
        self._commands: dict[str, Callable[[dict], dict]] = {
            "ping": lambda req: {"pid": os.getpid()},
            "status": self._status, "info": self._info, "boot": self._boot, "shutdown": self._shutdown,
            "reset": self._reset, "reboot": self._reboot, "wait": self._wait, "set": self._set, "log": self._log,
        }
        self._read_only = READ_ONLY
        if devices is not None:
            from .vop.devices import READ_ONLY_COMMANDS
            self._commands.update(devices.commands())
            self._read_only = READ_ONLY | READ_ONLY_COMMANDS

    @staticmethod
    def _group_id(name: str | None) -> int | None:
        if not name:
            return None
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            raise ValueError(f"socket_group {name!r} is no group on this host") from None

    # --- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._server = CosmServer(self.hw.scif, {self.hw.node_id: self.cosm})
        self.hw.scif.on_peer_broken = self._scif_broken
        self.cosm.subscribe(self._on_ready)
        self.cosm.subscribe(self._on_change)
        if self.devices is not None:
            self.cosm.subscribe(self.devices.on_state)   # devices added once the card is booting (spec 6.1)
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        self._control = JsonLinesServer(self.socket_path, self.handle, mode=self.config.settings.socket_mode,
                                        gid=self.allowed_gid, name=f"{self.card.name} control")
        self._control.start()
        log.info("%s: control socket %s", self.card.name, self.socket_path)
        if self.reset_at_start:
            self.cosm.await_ready()
        if self.card.boot_on_start:
            self._spawn(self._boot_on_start, "boot on start")

    def close(self) -> None:
        """Stop serving and stop the card (``cosm_driver_remove``: a started card is reset)."""
        self._closing.set()
        if self._control is not None:
            self._control.close()
            self._control = None
        self.cosm.close()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.devices is not None:
            self.devices.close()   # the card is stopped: its VOP devices are gone, their tap, pty, images go
        for t in self._threads:
            t.join(5.0)

    def _spawn(self, fn: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=fn, name=f"{self.card.name} {name}", daemon=True)
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _boot_on_start(self) -> None:
        # After a reset at start, the boot waits for its outcome (ready, or reset_failed: then it fails).
        self.cosm.wait_for(lambda d: d.state is not MicState.RESETTING or self._closing.is_set(), None)
        try:
            self.cosm.start()
        except CosmError as e:
            log.error("%s: boot on start: %s", self.card.name, e)

    def _scif_broken(self, node: int, why: str) -> None:
        """The card broke SCIF (its node was given up): COSM declares it crashed, off the SCIF worker."""
        if node == self.hw.node_id and not self._closing.is_set():
            self._spawn(lambda: self.cosm.card_broken(f"SCIF: {why}"), "card broken")

    def _on_ready(self, dev: CosmDevice) -> None:
        if dev.state is MicState.READY:
            self.started.clear()

    # --- the mpssd policy (spec 6.5) -------------------------------------------------------------
    def _on_change(self, dev: CosmDevice) -> None:
        if self._closing.is_set():
            return
        if dev.state is MicState.SHUTTING_DOWN:
            with self._policy_lock:
                if self._policy_busy:
                    return
                self._policy_busy = True
            self._spawn(self._handle_shutdown, "shutdown policy")
        elif dev.state is MicState.READY and self._boot_when_ready:
            self._boot_when_ready = False
            self._spawn(self._boot_again, "boot again")

    def _handle_shutdown(self) -> None:
        try:
            dev = self.cosm
            dev.wait_for(lambda d: d.shutdown_status is not MicStatus.NOP or d.state is not MicState.SHUTTING_DOWN,
                         SHUTDOWN_STATUS_WAIT)
            if dev.state is not MicState.SHUTTING_DOWN or self._closing.is_set():
                return
            status = dev.shutdown_status
            if status is MicStatus.CRASHED:
                log.error("%s: the card crashed; left for the operator (micctl log, then micctl reset)",
                          self.card.name)
                self._boot_when_ready = False
                return
            if not self.card.auto_reset:
                log.info("%s: the card is down (%s); auto_reset is off", self.card.name, status.sysfs)
                return
            if status is MicStatus.RESTART:
                self._boot_when_ready = True
            log.info("%s: the card is down (%s): resetting it", self.card.name, status.sysfs or "no status")
            try:
                dev.reset()
            except CosmError as e:
                log.error("%s: reset after shutdown: %s", self.card.name, e)
        finally:
            with self._policy_lock:
                self._policy_busy = False

    def _boot_again(self) -> None:
        try:
            self.cosm.start()
        except CosmError as e:
            log.error("%s: boot after restart: %s", self.card.name, e)

    # --- the control socket --------------------------------------------------------------------
    def _may(self, peer: PeerCred, cmd: str) -> bool:
        if peer.uid == 0:
            return True
        if cmd not in self._read_only or self.allowed_gid is None:
            return False
        if peer.gid == self.allowed_gid:
            return True
        # The groups the peer had when it connected (SO_PEERGROUPS); /proc only on kernels before 4.13,
        # where the pid may meanwhile be another process's.
        groups = peer.groups if peer.groups is not None else _supplementary_groups(peer.pid)
        return self.allowed_gid in groups

    def handle(self, req: dict, peer: PeerCred) -> dict:
        cmd = req["cmd"]
        fn = self._commands.get(cmd)
        if fn is None:
            raise RequestError(f"unknown command {cmd!r}; one of {', '.join(sorted(self._commands))}",
                               errno="EINVAL")
        if not self._may(peer, cmd):
            raise _errno_error(errno.EACCES, f"{cmd}: permission denied (uid {peer.uid}); "
                                             f"{'root only' if cmd not in self._read_only else 'root or socket_group'}")
        try:
            return fn(req)
        except CosmError as e:
            raise _from_cosm(e) from None

    def _status(self, req: dict) -> dict:
        return {**self.cosm.snapshot(), "post_code": self.post_code()}

    def _info(self, req: dict) -> dict:
        attrs = ("family", "stepping", "firmware", "ramdisk", "cmdline", "bootmode", "log_buf_addr", "log_buf_len")
        return {**self._status(req), **{name: self.attribute(name) for name in attrs},
                "node_id": self.hw.node_id, "memory_size": self.hw.memory_size, "pid": os.getpid(),
                "socket": self.socket_path, "pci": self.card.pci, **self.hardware_info()}

    def _boot(self, req: dict) -> dict:
        for attr in ("firmware", "ramdisk", "cmdline", "bootmode"):
            if attr in req:
                self._set({"attr": attr, "value": req[attr]})
        self.state_action("boot")
        return {"state": self.cosm.state.sysfs}

    def _shutdown(self, req: dict) -> dict:
        self.state_action("shutdown")
        return {"state": self.cosm.state.sysfs}

    def _reset(self, req: dict) -> dict:
        self.state_action("reset")
        return {"state": self.cosm.state.sysfs}

    def _reboot(self, req: dict) -> dict:
        """Shutdown and boot again: from online via the card's orderly power-off, from ready at once."""
        dev = self.cosm
        state = dev.state
        if state is MicState.READY:
            dev.start()
        elif state is MicState.ONLINE:
            self._boot_when_ready = True
            dev.shutdown()
        elif state in (MicState.SHUTTING_DOWN, MicState.BOOTING, MicState.RESET_FAILED):
            self._boot_when_ready = True
            dev.reset()
        else:
            raise _errno_error(errno.EBUSY, f"{self.card.name}: cannot reboot while {state.sysfs}")
        return {"state": dev.state.sysfs}

    def _wait(self, req: dict) -> dict:
        names = req.get("states", [s.sysfs for s in WAIT_STATES])
        if not isinstance(names, list) or not names:
            raise _errno_error(errno.EINVAL, '"states" must be a list of state names')
        try:
            states = tuple(MicState.from_sysfs(n) for n in names)
        except (ValueError, TypeError) as e:
            raise _errno_error(errno.EINVAL, str(e)) from None
        timeout = req.get("timeout", DEFAULT_WAIT)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 <= timeout <= MAX_WAIT:
            raise _errno_error(errno.EINVAL, f'"timeout" must be a number of seconds from 0 to {MAX_WAIT:g}')
        if not self.cosm.wait_states(states, timeout):
            raise RequestError(f"{self.card.name}: still {self.cosm.state.sysfs} after {timeout:g} s "
                               f"(waiting for {' or '.join(names)})", errno="ETIMEDOUT",
                               state=self.cosm.state.sysfs)
        return {"state": self.cosm.state.sysfs, "shutdown_status": self.cosm.shutdown_status.sysfs}

    def _set(self, req: dict) -> dict:
        attr, value = req.get("attr"), req.get("value")
        if attr in ("firmware", "ramdisk", "cmdline") and isinstance(value, str):
            value = value.rstrip("\n")  # every trailing newline: what the socket has always done
        elif attr == "bootmode":
            value = str(value).rstrip("\n")
        return {"attr": attr, "value": self.set_attribute(attr, value)}

    def _log(self, req: dict) -> dict:
        return {"log": self.card_log()}

    # --- the sysfs attributes (spec 3.5), shared by the control socket and the FUSE tree --------
    def attribute(self, name: str) -> str:
        """The text of sysfs attribute ``name`` without the newline sysfs adds; RequestError if none.

        ``log`` is the card kernel's log (:meth:`card_log`), ``post_code`` the card's POST code.
        """
        a = self.cosm.attrs
        if name == "family":
            return self.hw.family
        if name == "stepping":
            return self.hw.stepping
        if name == "state":
            return self.cosm.state.sysfs
        if name == "shutdown_status":
            return self.cosm.shutdown_status.sysfs
        if name == "heartbeat_enable":
            return str(int(a.heartbeat_enable))
        if name in ("firmware", "ramdisk", "cmdline", "bootmode"):
            return getattr(a, name)
        if name in ("log_buf_addr", "log_buf_len"):
            return f"{getattr(a, name):x}"
        if name == "post_code":
            return self.post_code()
        if name == "log":
            return self.card_log()
        raise _errno_error(errno.ENOENT, f"no attribute {name!r}")

    def post_code(self) -> str:
        """The card's POST code (debugfs ``post_code``), "??" when it cannot be read."""
        try:
            return self.hw.post_code()
        except Exception as e:
            log.debug("post code: %s", e)
            return "??"

    def state_action(self, word: str) -> None:
        """A write to sysfs ``state`` (cosm_sysfs.c ``state_store``): boot, reset or shutdown, else EINVAL.

        Raises :class:`CosmError` with the errno the write returns (spec 7.3).
        """
        if word == "boot":
            self.cosm.start()
        elif word == "reset":
            self._boot_when_ready = False
            self.cosm.reset()
        elif word == "shutdown":
            self.cosm.shutdown()
        else:
            raise CosmError(errno.EINVAL, f"{self.card.name}: state takes boot, reset or shutdown, not {word!r}")

    def set_attribute(self, attr: str, value) -> str | int:
        """Set one writable attribute with its validation (spec 3.5); the value as it now reads.

        ``value`` is taken as given: callers strip the newline of a write as their interface does.
        Raises RequestError with ``errno`` EINVAL for a value the attribute refuses.
        """
        a = self.cosm.attrs
        if attr in ("firmware", "ramdisk", "cmdline"):
            if not isinstance(value, str):
                raise _errno_error(errno.EINVAL, f"{attr} takes a string")
            if attr == "cmdline" and len(value.encode()) > CMDLINE_MAX:
                raise _errno_error(errno.EINVAL, f"cmdline longer than {CMDLINE_MAX} bytes (spec 3.1 step 6)")
            setattr(a, attr, value)
        elif attr == "bootmode":
            value = str(value)
            if value not in BOOTMODES:
                raise _errno_error(errno.EINVAL, f"bootmode is {' or '.join(BOOTMODES)}, not {value!r} (spec 3.5)")
            a.bootmode = value
        elif attr == "heartbeat_enable":
            value = parse_bool(value)
            self.cosm.set_heartbeat_enable(value)
            value = int(value)
        elif attr in ("log_buf_addr", "log_buf_len"):
            setattr(a, attr, parse_hex(value, attr))
            value = f"{getattr(a, attr):x}"
        else:
            raise _errno_error(errno.EINVAL, f"no attribute {attr!r} (firmware, ramdisk, cmdline, bootmode, "
                                             f"heartbeat_enable, log_buf_addr, log_buf_len)")
        return value

    def card_log(self) -> str:
        """The card kernel's log (debugfs ``log_buf``), readable while booting, online or shutting_down."""
        if self.cosm.state not in (MicState.BOOTING, MicState.ONLINE, MicState.SHUTTING_DOWN):
            raise _errno_error(errno.EINVAL, f"{self.card.name}: the card log is readable while booting, online "
                                             f"or shutting_down, not {self.cosm.state.sysfs} (spec 3.5)")
        try:
            return self.read_log(self.cosm)
        except CardLogError as e:
            raise _errno_error(errno.EIO, f"{self.card.name}: cannot read the card log: {e}") from None

    def _read_card_log(self, dev: CosmDevice) -> str:
        """``log_buf_show`` (spec 3.5): the card kernel's log through BAR0, from log_buf_addr/log_buf_len.

        Unset addresses come from the ``System.map`` beside the firmware image, as mpssd found them in
        /lib/firmware/mic/System.map (spec 6.5).
        """
        a = dev.attrs
        if not (a.log_buf_addr and a.log_buf_len):
            smap = Path(self.config.firmware_path(a.firmware)).parent / "System.map" if a.firmware else None
            try:
                syms = system_map_symbols(smap.read_text()) if smap else {}
            except OSError:
                syms = {}
            if "__log_buf" not in syms or "log_buf_len" not in syms:
                raise _errno_error(errno.ENOENT, f"{self.card.name}: log_buf_addr/log_buf_len are not set and "
                                                 f"no System.map beside the firmware names them")
            a.log_buf_addr, a.log_buf_len = syms["__log_buf"], syms["log_buf_len"]
        return log_text(read_log_buf(self.hw, a.log_buf_addr, a.log_buf_len))


def _supplementary_groups(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()
