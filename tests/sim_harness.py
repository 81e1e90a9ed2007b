"""Test harness for the simulated X100: the card in its own process, its control socket, a host.

The card runs as ``python -m micdrv.sim`` so nothing but the vfio-user
socket joins it to the test (ARCHITECTURE.md "The one rule"); fault hooks
and counters go through the sim-only control socket. :class:`Host` is a
small driver-like helper written straight against
:class:`~micdrv.pci.PciDevice` and the register map -- deliberately not the
micdrv.x100 driver, so the two check each other. Every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from micdrv.pci import BAR0, BAR4, MSIX, DmaArena, new_eventfd, read_eventfd
from micdrv.pci.vfio_user import VfioUserDevice
from micdrv.x100 import regs

REPO = Path(__file__).resolve().parents[1]
WAIT = 5.0  # the longest any single wait may take
MEMORY = 256 << 20
READY_DELAY = 0.05
IOVA_BASE = 0x1_0000_0000  # 4 GiB: rings here exercise DRAR_HI address bits 33:32
ARENA_SIZE = 16 << 20
RING_SIZE = 64  # descriptors per test ring

DMA_ERR_TYPE, DMA_ERR_ALIGN, DMA_ERR_LENGTH, DMA_ERR_ADDRESS = 0x01, 0x02, 0x04, 0x08  # micdrv.sim CHOICES C21
DMA_ERR_HOST_TO_HOST, DMA_ERR_RING, DMA_ERR_DHPR = 0x10, 0x20, 0x40


def wait_for(predicate, what: str, timeout: float = WAIT, interval: float = 0.001):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def fired(fd: int, timeout: float = 0.0) -> int:
    """The eventfd's count (consumed), waiting up to ``timeout`` for it to become non-zero."""
    if timeout and not select.select([fd], [], [], timeout)[0]:
        return 0
    return read_eventfd(fd)


class Control:
    """A client of the simulator's control socket (JSON lines)."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")

    def call(self, cmd: str, **args) -> dict:
        self.file.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        self.file.flush()
        line = self.file.readline()
        if not line:
            raise ConnectionError("the simulator closed the control socket")
        return json.loads(line)

    def __call__(self, cmd: str, **args) -> dict:
        reply = self.call(cmd, **args)
        assert reply["ok"], reply
        return reply

    def counters(self) -> dict:
        return self("counters")["counters"]

    def status(self) -> dict:
        return self("status")["status"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class SimProcess:
    """``python -m micdrv.sim`` on short socket paths; stderr goes to a log file shown on failure."""

    def __init__(self, *args: str, memory: int = MEMORY, ready_delay: float = READY_DELAY, wait_ready: bool = True):
        self.dir = tempfile.mkdtemp(prefix="sim")
        self.path = os.path.join(self.dir, "card.sock")
        self.control_path = os.path.join(self.dir, "ctl.sock")
        self.log_path = os.path.join(self.dir, "sim.log")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "micdrv.sim", "--socket", self.path, "--control", self.control_path,
                 "--memory", str(memory), "--ready-delay", str(ready_delay), "--log-level", "info", *args],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            self.control = wait_for(self._try_control, "the simulator's control socket", timeout=20)
            if wait_ready:
                wait_for(lambda: self.control.status()["state"] == "ready", "power-on ready")
        except BaseException:
            self.kill()
            raise

    def _try_control(self) -> Control | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"simulator exited with {self.proc.returncode}:\n{self.log()}")
        try:
            c = Control(self.control_path)
        except OSError:
            return None
        c("ping")
        return c

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def connect(self) -> VfioUserDevice:
        return VfioUserDevice.connect(self.path, WAIT)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the simulator and return its exit status."""
        self.proc.send_signal(sig)
        return self.proc.wait(WAIT)

    def kill(self) -> None:
        if getattr(self, "control", None) is not None:
            self.control.close()
            self.control = None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        shutil.rmtree(self.dir, ignore_errors=True)


def module_sim(*args: str, **kw):
    """A test module's simulated card (use as a module-scoped fixture): started once, then stopped with
    SIGTERM, which must end it cleanly with no traceback in its log."""
    s = SimProcess(*args, **kw)
    yield s
    rc = s.stop()
    log = s.log()
    s.kill()
    assert rc == 0, log
    assert "Traceback" not in log, log


# --- descriptors, written from spec 4.3 (not from micdrv.x100) ------------------------------
def memcpy_desc(dst: int, src: int, length: int) -> tuple[int, int]:
    return src | (length // 64) << regs.DESC_LEN_SHIFT, regs.DESC_MEMCPY << regs.DESC_TYPE_SHIFT | dst


def status_desc(dst: int, value: int, interrupt: bool = False) -> tuple[int, int]:
    return value, regs.DESC_STATUS << regs.DESC_TYPE_SHIFT | (regs.DESC_STATUS_INTR if interrupt else 0) | dst


class Host:
    """A host driving the card the way a driver would: BAR4 registers, BAR0 mmap, an arena, eventfds."""

    def __init__(self, dev: VfioUserDevice, control: Control):
        self.dev = dev
        self.control = control
        self.gddr = dev.mmap(BAR0)
        self.arena = DmaArena(ARENA_SIZE, name="sim-test-arena")
        self.arena.map(dev, IOVA_BASE)
        self.fds: list[int] = []
        self.rings: dict[int, tuple[int, int]] = {}  # channel -> (arena offset, head)

    def close(self) -> None:
        self.gddr.release()
        self.dev.close()  # the server drops our eventfds and DMA maps
        self.arena.close()
        for fd in self.fds:
            os.close(fd)

    # --- registers ---------------------------------------------------------------------------
    def rd(self, off: int) -> int:
        return self.dev.read(BAR4, off, 4)

    def wr(self, off: int, value: int) -> None:
        self.dev.write(BAR4, off, 4, value)

    def spad(self, i: int) -> int:
        return self.rd(regs.spad(i))

    def flush(self) -> None:
        """Make posted BAR4 writes land, as a PCIe read does: needed before asking the control socket,
        which is a different channel from the vfio-user socket the writes travel on."""
        self.rd(regs.SICR0)

    def post_code(self) -> str:
        v = self.rd(regs.POSTCODE)
        return chr(v & 0xFF) + chr(v >> 8 & 0xFF)

    # --- reset and ready (spec 2.5) -----------------------------------------------------------
    def reset(self) -> None:
        self.wr(regs.spad(regs.SPAD_DOWNLOAD_INFO), 0)
        self.wr(regs.RGCR, self.rd(regs.RGCR) | regs.RGCR_RESET)

    def wait_ready(self, timeout: float = WAIT) -> int:
        return wait_for(lambda: (v := self.spad(regs.SPAD_DOWNLOAD_INFO)) & regs.DOWNLOAD_READY and v,
                        "SPAD2 ready", timeout)

    def reset_ready(self) -> int:
        self.reset()
        return self.wait_ready()

    # --- interrupts ----------------------------------------------------------------------------
    def enable_msix(self, vectors: int = 16) -> list[int]:
        self.fds = [new_eventfd() for _ in range(vectors)]
        self.dev.enable_irqs(MSIX, self.fds)
        return self.fds

    def route(self, entry: int, source: int) -> None:
        self.wr(regs.mxar(entry), self.rd(regs.mxar(entry)) | 1 << source)

    def enable_sources(self, bits: int, auto_clear: bool = True) -> None:
        self.wr(regs.SICE0, bits)
        self.wr(regs.SIAC0, bits if auto_clear else 0)

    def pending(self) -> list[int]:
        """Vectors with a pending eventfd count, consumed, once our posted writes have landed."""
        self.flush()
        return [v for v, fd in enumerate(self.fds) if fired(fd)]

    # --- SMPT and addresses (spec 2.4) --------------------------------------------------------
    def smpt_identity(self) -> None:
        for i in range(regs.SMPT_ENTRIES):
            self.wr(regs.smpt(i), regs.smpt_value(i * regs.SMPT_PAGE_SIZE))

    def card_addr(self, arena_offset: int) -> int:
        """Card address of arena bytes, with the identity SMPT layout."""
        return regs.SYSTEM_WINDOW + self.arena.iova(arena_offset)

    # --- DMA channels (spec 4.4) ----------------------------------------------------------------
    def dma(self, ch: int, reg: int) -> int:
        return self.rd(regs.dma_reg(ch, reg))

    def setup_channel(self, ch: int, size: int = RING_SIZE) -> None:
        """Disable, mask, ring in the arena, unmask, enable: mic_dma_chan_setup."""
        dcr = self.rd(regs.DCR)
        self.wr(regs.DCR, dcr & ~regs.dcr_enable_bit(ch))
        self.wr(regs.dma_reg(ch, regs.DCAR), regs.DCAR_IM1)
        self.wr(regs.dma_reg(ch, regs.DCHERRMSK), 0)
        if ch not in self.rings:
            self.rings[ch] = (self.arena.alloc(size * regs.DMA_DESC_SIZE).offset, 0)
        off = self.rings[ch][0]
        addr = self.card_addr(off)
        hi = size << regs.DRAR_HI_SIZE_SHIFT | regs.DRAR_HI_SYSMEM | \
            ((addr >> regs.SMPT_PAGE_SHIFT) & regs.DRAR_HI_SMPT_MASK) << regs.DRAR_HI_SMPT_SHIFT | \
            (addr >> 32) & regs.DRAR_HI_SYS_ADDR_MASK
        self.wr(regs.dma_reg(ch, regs.DRAR_LO), addr & 0xFFFFFFFF)
        self.wr(regs.dma_reg(ch, regs.DRAR_HI), hi)
        self.rings[ch] = (off, self.dma(ch, regs.DTPR))
        self.ring_size = size
        self.wr(regs.dma_reg(ch, regs.DCAR), 0)
        self.wr(regs.DCR, self.rd(regs.DCR) | regs.dcr_enable_bit(ch))
        assert self.dma(ch, regs.DCHERR) == 0
        assert not self.dma(ch, regs.DSTAT) & regs.DSTAT_QUIESCED

    def submit(self, ch: int, descs: list[tuple[int, int]]) -> int:
        """Write descriptors at the head and publish them with one DHPR write; returns the new head."""
        off, head = self.rings[ch]
        for qw0, qw1 in descs:
            struct.pack_into("<QQ", self.arena.view, off + head * regs.DMA_DESC_SIZE, qw0, qw1)
            head = (head + 1) % self.ring_size
        self.rings[ch] = (off, head)
        self.wr(regs.dma_reg(ch, regs.DHPR), head)
        return head

    def wait_idle(self, ch: int, timeout: float = WAIT) -> None:
        head = self.rings[ch][1]
        wait_for(lambda: self.dma(ch, regs.DTPR) == head or self.dma(ch, regs.DCHERR), f"channel {ch} to drain",
                 timeout)
        assert self.dma(ch, regs.DCHERR) == 0, self.control.counters()["dma"]["channels"][ch]

    def wait_error(self, ch: int, timeout: float = WAIT) -> int:
        return wait_for(lambda: self.dma(ch, regs.DCHERR), f"an error on channel {ch}", timeout)
