"""A simulated X100 in a process of its own, as the daemon's ``--simulate`` and the tests start it.

:class:`SimulatedCardProcess` runs ``python -m micdrv.sim`` with its
vfio-user socket and its control socket in a private directory, waits until
both listen, and stops the process again (SIGTERM, then SIGKILL). Nothing but
the sockets joins it to whoever started it (ARCHITECTURE.md "The one rule").
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 30.0  # the simulator imports numpy-free stdlib code; 30 s covers a loaded 2-core machine
STOP_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies, even by SIGKILL (PR_SET_PDEATHSIG).

    The simulated card is the starter's private hardware; it must not outlive it as an orphan.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class SimulatorError(Exception):
    pass


class SimulatedCardProcess:
    """``micdrv sim`` in a child process; ``socket`` and ``control`` are its two socket paths."""

    def __init__(self, directory: str | Path | None = None, *args: str, log_path: str | Path | None = None):
        self._own_dir = directory is None
        self.dir = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="micdrv-sim"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.dir / "card.sock")
        self.control = str(self.dir / "control.sock")
        self.log_path = Path(log_path) if log_path else self.dir / "sim.log"
        for p in (self.socket, self.control):
            if os.path.lexists(p):
                os.unlink(p)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "micdrv.sim", "--socket", self.socket, "--control", self.control, *args],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf, close_fds=True,
                preexec_fn=_die_with_parent)
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _listening(self) -> bool:
        """The simulator listens on the vfio-user socket before it opens its control socket (micdrv.sim.cli),
        so a control socket that accepts means both are up. Probing the vfio-user socket itself would be a
        client coming and going."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(self.control)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._listening():
            if self.proc.poll() is not None:
                raise SimulatorError(f"the simulated card exited with status {self.proc.returncode}: "
                                     f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise SimulatorError(f"the simulated card did not listen within {START_TIMEOUT:g} s: "
                                     f"{self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after a grace period; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> "SimulatedCardProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
