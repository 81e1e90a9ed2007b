"""The card's shell on its console: a serial line discipline and a command loop.

What a getty + ``sh`` on ``hvc0`` looks like from the host's pty
(``micctl console mic0``):

* a banner, then the prompt ``<hostname>:~# `` (``mic0:~# ``) after every
  command's output, so a script can wait for it;
* input echoed as it is typed; backspace (BS 0x08 or DEL 0x7F) erases a
  character (``\\b \\b``), Ctrl-U the line, Ctrl-C drops the line -- or
  interrupts a running ``ping`` / ``udp send`` -- and prints ``^C``;
* CR, LF, CR LF and LF CR each end one line (a serial console gets all
  four), echoed as CR LF; output lines end in CR LF (the tty's ``onlcr``);
* escape sequences (arrow keys: ESC [ ... final byte) are swallowed, other
  control characters ignored; a line is at most :data:`MAX_LINE` bytes.

Bytes arrive from the console driver's receive interrupt through
:meth:`Shell.feed` (which never blocks); the shell's own thread edits the
line, runs commands (:mod:`.shell_commands`) and writes output through the
driver, which may wait for transmit room.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Callable

from .shell_commands import Commands

if TYPE_CHECKING:
    from .drivers import CardDrivers

log = logging.getLogger(__name__)

MAX_LINE = 4096
BS, DEL, CTRL_C, CTRL_U, ESC, CR, LF = 0x08, 0x7F, 0x03, 0x15, 0x1B, 0x0D, 0x0A


class Shell:
    """One shell session on one console."""

    def __init__(self, drivers: "CardDrivers", write: Callable[[bytes], bool], tty: str):
        self.drivers = drivers
        self.commands = Commands(drivers)
        self.tty = tty
        self._write = write
        self._input: queue.Queue[bytes | None] = queue.Queue()
        self._interrupt = threading.Event()
        self._stop = threading.Event()
        self._busy = False
        self._line = bytearray()
        self._last = 0           # the previous byte: CR LF / LF CR pairs end one line
        self._esc = 0            # 0 none, 1 after ESC, 2 inside a CSI sequence
        self._thread: threading.Thread | None = None
        self.lines = 0
        self.last_command: str | None = None

    @property
    def prompt(self) -> str:
        return f"{self.drivers.hostname}:~# "

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"sh/{self.tty}", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        self._interrupt.set()
        self._input.put(None)
        t = self._thread
        if wait and t is not None and t is not threading.current_thread():
            t.join(5.0)

    def join(self, timeout: float) -> None:
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def feed(self, data: bytes) -> None:
        """Input from the console (the interrupt thread): queued; Ctrl-C interrupts a running command."""
        if self._busy and CTRL_C in data:
            self._interrupt.set()
            data = data.replace(bytes([CTRL_C]), b"")
        if data:
            self._input.put(data)

    # --- the shell's thread ------------------------------------------------------------------------
    def _out(self, text: str) -> None:
        self._write(text.replace("\n", "\r\n").encode("utf-8", "replace"))

    def _run(self) -> None:
        try:
            self._session()
        except Exception:           # the console's memory went away under us (a card reset)
            if not self._stop.is_set():
                log.exception("%s: shell failed", self.tty)

    def _session(self) -> None:
        self._out(f"\n{self.drivers.kernel.image.release} {self.drivers.hostname} {self.tty}\n\n")
        self._out(self.prompt)
        while not self._stop.is_set():
            data = self._input.get()
            if data is None:
                break
            echo = bytearray()
            for b in data:
                line = self._edit(b, echo)
                if line is not None:
                    if echo:
                        self._write(bytes(echo))
                        echo.clear()
                    self._execute(line)
                    if self._stop.is_set():
                        return
            if echo:
                self._write(bytes(echo))

    def _edit(self, b: int, echo: bytearray) -> str | None:
        """One input byte; the finished line when it ends one."""
        last, self._last = self._last, b
        if self._esc:
            if self._esc == 1:
                self._esc = 2 if b == ord("[") else 0
            elif 0x40 <= b <= 0x7E:
                self._esc = 0
            return None
        if b in (CR, LF):
            if (last, b) in ((CR, LF), (LF, CR)):
                self._last = 0          # the pair is one line end; a third byte starts anew
                return None
            echo += b"\r\n"
            line = self._line.decode("utf-8", "replace")
            self._line.clear()
            return line
        if b in (BS, DEL):
            if self._line:
                # Erase one character (UTF-8 continuation bytes go with it).
                while self._line and self._line[-1] & 0xC0 == 0x80:
                    self._line.pop()
                if self._line:
                    self._line.pop()
                echo += b"\b \b"
        elif b == CTRL_U:
            echo += b"\b \b" * len(self._line.decode("utf-8", "replace"))
            self._line.clear()
        elif b == CTRL_C:
            self._line.clear()
            echo += b"^C\r\n" + self.prompt.encode()
        elif b == ESC:
            self._esc = 1
        elif b >= 0x20 and len(self._line) < MAX_LINE:
            self._line.append(b)
            echo.append(b)
        return None

    def _execute(self, line: str) -> None:
        self.lines += 1
        if line.strip():
            self.last_command = line.strip()
            self._interrupt.clear()
            self._busy = True
            try:
                self.commands.execute(line, lambda text: self._out(text + "\n"), self._interrupt.is_set)
            except Exception as e:    # a command's bug must not kill the console
                self._out(f"sh: {type(e).__name__}: {e}\n")
            finally:
                self._busy = False
            if self._interrupt.is_set() and not self._stop.is_set():
                self._out("^C\n")
        if not self._stop.is_set():
            self._out(self.prompt)

    def status(self) -> dict:
        return {"prompt": self.prompt, "lines": self.lines, "last_command": self.last_command,
                "running": self._thread is not None and self._thread.is_alive()}
