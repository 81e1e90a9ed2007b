"""The host end of a card's console: a pty whose slave path is published as a symlink.

mpssd used posix_openpt/grantpt/unlockpt and logged the pts name
(x100-host-abi.md 6.3). :class:`Pty` does the same with ``os.openpty``
(the same semantics: a master fd we keep, a /dev/pts/N slave anyone may
open), puts the slave in raw mode (bytes pass untouched: no echo, no
CR/LF translation, no signals), and publishes the slave's path as a
symlink at a configurable place (e.g. ``/run/micdrv/mic0/console``) where
``micctl console`` finds it.

We keep a slave fd open ourselves for the pty's whole life: a pty whose
slave is closed by everyone hangs up (reads on the master fail with EIO and
what was written is thrown away), and a card writes to its console whether
or not anyone is attached.
"""

from __future__ import annotations

import os
import tty


class Pty:
    """A raw-mode pty: ``master`` for the backend, :attr:`path` for whoever attaches."""

    def __init__(self, link: str | None = None):
        self.master, self._slave = os.openpty()  # both close-on-exec (PEP 446)
        try:
            tty.setraw(self._slave)
            os.set_blocking(self.master, False)
            self.path = os.ttyname(self._slave)
            self.link: str | None = None
            if link:
                self.publish(link)
        except BaseException:
            os.close(self.master)
            os.close(self._slave)
            raise

    def publish(self, link: str) -> None:
        """Point the symlink ``link`` at the slave (atomically replacing what was there)."""
        d = os.path.dirname(link)
        if d:
            os.makedirs(d, mode=0o755, exist_ok=True)
        tmp = f"{link}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(self.path, tmp)
        os.replace(tmp, link)
        self.link = link

    def fileno(self) -> int:
        return self.master

    def close(self) -> None:
        """Remove the symlink if it is still ours, close both ends; idempotent."""
        if self.link:
            try:
                if os.readlink(self.link) == self.path:
                    os.unlink(self.link)
            except OSError:
                pass
            self.link = None
        for fd in (self.master, self._slave):
            if fd >= 0:
                os.close(fd)
        self.master = self._slave = -1

    def __enter__(self) -> "Pty":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
