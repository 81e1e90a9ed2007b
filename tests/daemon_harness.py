"""The daemon as an operator runs it: ``micdrv --simulate`` processes, ``micctl`` commands, a run directory.

Each :class:`Daemon` is a real ``micdrv`` process driving its own simulated
card (a ``micdrv sim`` child), with a configuration file the test writes;
:func:`micctl` runs the real command line. The simulator's control socket
(never used by the driver) flips the card OS's test switches and shows what
the card saw.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests import sim_harness

REPO = Path(__file__).resolve().parents[1]
READY_LINE = "ready for commands"   # micdrv.daemon logs it once the control socket and the tree are served
WAIT = 30.0  # the longest a daemon may take to come up or go away on a loaded machine


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def micctl(run_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "micdrv.cli", "--run-dir", str(run_dir), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env())


def control_call(path: str, cmd: str, **args) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
        f = s.makefile("rwb")
        f.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        f.flush()
        return json.loads(f.readline())
    finally:
        s.close()


def wait_for(predicate, what: str, timeout: float = WAIT, interval: float = 0.05):
    """:func:`tests.sim_harness.wait_for` with the daemon tier's longer default and a gentler poll."""
    return sim_harness.wait_for(predicate, what, timeout, interval)


class Daemon:
    """``micdrv --simulate --name <name>`` with ``config`` (TOML text), sockets under ``run_dir``."""

    def __init__(self, run_dir: Path, name: str = "mic0", config: str = "", extra: tuple[str, ...] = ()):
        self.run_dir = Path(run_dir)
        self.name = name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.run_dir.parent / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = self.run_dir.parent / f"{name}.log"
        self.socket = self.run_dir / f"{name}.sock"
        self.sim_control = str(self.run_dir / f"{name}.sim" / "control.sock")
        self._ready_lines = self.log().count(READY_LINE)   # the log file is shared by a card's daemons
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "micdrv.daemon", "--simulate", "--no-devices", "--name", name,
                 "--run-dir", str(self.run_dir), "--config", str(self.config_path), *extra],
                cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_for(self._up, f"daemon {name} to listen on {self.socket}")
        except BaseException:
            self.kill()
            raise

    def _up(self) -> bool:
        """Up: it logged that it is ready (control socket and FUSE tree served) and its socket answers --
        not merely socket files there, which a killed predecessor leaves behind."""
        if self.proc.poll() is not None:
            raise AssertionError(f"micdrv exited with {self.proc.returncode}:\n{self.log()}")
        if self.log().count(READY_LINE) <= self._ready_lines or not os.path.exists(self.sim_control):
            return False
        try:
            return control_call(str(self.socket), "ping")["pid"] == self.proc.pid
        except (OSError, ValueError, KeyError):
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def micctl(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return micctl(self.run_dir, *args, **kw)

    def ok(self, *args: str) -> str:
        r = self.micctl(*args)
        assert r.returncode == 0, f"micctl {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}"
        assert "Traceback" not in r.stderr
        return r.stdout

    def status(self) -> dict:
        return json.loads(self.ok("status", "--json", self.name))[0]

    def card(self, cmd: str, **args) -> dict:
        """A request to the simulated card's control socket (test switches, what the card OS saw)."""
        reply = control_call(self.sim_control, cmd, **args)
        assert reply["ok"], reply
        return reply

    def card_os(self) -> dict | None:
        return self.card("os")["record"]

    def started_path(self) -> Path:
        """The daemon's record that it started the card (micdrv.service.StartedRecord)."""
        return self.run_dir / f"{self.name}.started"

    # --- the process ------------------------------------------------------------------------
    def proc_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def proc_threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def proc_rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"micdrv did not stop on SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)


class AttachedDaemon(Daemon):
    """``micdrv --vfio-user SOCKET``: a daemon driving a card that lives in a process of its own.

    The card (a :class:`micdrv.sim.process.SimulatedCardProcess` the test started) outlives the
    daemon, so the daemon can be killed and started again over the same card, as a real card
    outlives its daemon. ``sim`` is that card; ``start()`` runs a new daemon process.
    """

    def __init__(self, run_dir: Path, sim, name: str = "mic0", config: str = "", extra: tuple[str, ...] = ()):
        self.run_dir = Path(run_dir)
        self.name = name
        self.sim = sim
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.run_dir.parent / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = self.run_dir.parent / f"{name}.log"
        self.socket = self.run_dir / f"{name}.sock"
        self.sim_control = sim.control
        self.extra = extra
        self.proc = None
        self.start()

    def start(self, *more: str) -> None:
        """Start a daemon; return once it is up: its control socket answers and its FUSE tree is mounted
        (it logs "ready for commands" after both)."""
        self._ready_lines = self.log().count(READY_LINE)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "micdrv.daemon", "--vfio-user", self.sim.socket, "--name", self.name,
                 "--run-dir", str(self.run_dir), "--config", str(self.config_path), *self.extra, *more],
                cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_for(self._up, f"daemon {self.name} to answer on {self.socket}")
        except BaseException:
            self.kill()
            raise
