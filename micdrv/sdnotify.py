"""sd_notify: tell the service manager how the daemon is doing.

systemd's notification protocol (sd_notify(3)): the manager passes the
address of a datagram socket in ``$NOTIFY_SOCKET``; the service sends it
newline-separated ``KEY=VALUE`` assignments, one datagram per message:

* ``READY=1``     start-up is complete (``Type=notify`` units stay
                  "activating" until then);
* ``STATUS=...``  one line shown by ``systemctl status`` (micdrv: the card's
                  state, spec 3.4);
* ``WATCHDOG=1``  the keep-alive ping; the manager kills and restarts the
                  service when none arrives within ``WatchdogSec=``;
* ``STOPPING=1``  shutdown has begun.

``$NOTIFY_SOCKET`` is a filesystem path (``/run/systemd/notify``) or, with a
leading ``@``, a name in the abstract socket namespace. The manager learns
the sender's PID from SCM_CREDENTIALS (it sets SO_PASSCRED on its end), which
is why the unit's ``NotifyAccess=main`` only accepts these messages from the
daemon's main process -- not from a simulator or helper it forks. The
watchdog interval comes from ``$WATCHDOG_USEC``, meant for the process named
by ``$WATCHDOG_PID`` when that is set.

No dependency on python-systemd: this is the whole client. A daemon not run
by systemd (no ``$NOTIFY_SOCKET``) gets a :class:`Notifier` whose calls do
nothing and return False, so callers never branch on "am I under systemd".
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

# A notification the manager cannot take within this long is dropped rather
# than stalling the daemon's event loop (a full queue means the manager is
# busy or gone; the next STATUS or WATCHDOG ping follows soon).
SEND_TIMEOUT = 2.0


class NotifySocketError(ValueError):
    """``$NOTIFY_SOCKET`` holds something this client cannot send to."""


def socket_address(value: str) -> str | bytes:
    """The AF_UNIX address for a ``$NOTIFY_SOCKET`` value: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    # systemd >= 254 also knows "vsock:CID:PORT"; the daemon is never run inside a VM by one.
    raise NotifySocketError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor an @abstract name")


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """``WatchdogSec=`` in seconds when the watchdog is on for this process, else None.

    sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` is the interval; ``$WATCHDOG_PID``,
    when set, names the one process it is meant for (so a child that inherited
    the environment does not ping on its parent's behalf).
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        return None
    if value <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not a process id", owner)
            return None
    return value / 1_000_000


def _one_line(text: str) -> str:
    # A newline would end the assignment and start a bogus one.
    return " ".join(str(text).splitlines())


class Notifier:
    """A connection to the service manager's notification socket (or to nothing).

    Every method returns True when the message was handed to the manager and
    False when there is no manager or it could not take the message; failures
    are logged once per errno, never raised: a daemon keeps serving its card
    whatever happens to systemd.
    """

    def __init__(self, address: str | bytes | None, watchdog_seconds: float | None = None):
        self.address = address
        # WatchdogSec= for this process, or None: ping (:meth:`watchdog`) at least twice per interval.
        self.watchdog_seconds = watchdog_seconds
        self._sock: socket.socket | None = None
        self._failed: set[int] = set()

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str] | None = None, unset: bool = True) -> "Notifier":
        """The notifier ``$NOTIFY_SOCKET`` asks for; ``unset`` removes the variables so children don't inherit them.

        The watchdog interval is read into :attr:`watchdog_seconds` before the variables go.
        """
        env = os.environ if env is None else env
        value = env.get("NOTIFY_SOCKET")
        notifier = cls(socket_address(value) if value else None, watchdog_interval(env))
        if unset:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram: ``notify(READY=1, STATUS="online")``."""
        if self.address is None or not fields:
            return False
        message = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                s.settimeout(SEND_TIMEOUT)
                self._sock = s
            self._sock.sendto(message, self.address)
        except OSError as e:
            code = e.errno or errno.ETIMEDOUT
            if code not in self._failed:
                self._failed.add(code)
                log.warning("sd_notify to %r failed: %s", self.address, e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status is not None else {}))

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status is not None else {}))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
