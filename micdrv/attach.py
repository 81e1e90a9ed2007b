"""``micctl console``: the operator's terminal attached to a card's console pty (spec 6.3).

The card's hvc0 is a virtio console whose host end is a pty
(:mod:`backends.console`); its slave is published as a symlink, by default
``/run/micdrv/<card>/console``. :func:`attach` opens that slave and copies
bytes both ways between it and the terminal, which it puts in raw mode (so
Ctrl-C, arrows and line editing reach the card's shell) and restores on the
way out, whatever happens.

Detaching, like telnet's escape: **Ctrl-]** then **q** (or ``.``). Ctrl-]
twice sends one Ctrl-] to the card; Ctrl-] and any other key sends both.
The card keeps running, and its output is buffered by the daemon until
someone attaches again. Attaching also ends when the daemon goes away (the
pty hangs up) or standard input ends.
"""

from __future__ import annotations

import errno
import os
import select
import sys
import termios
import tty

ESCAPE = 0x1D          # Ctrl-]
DETACH = (ord("q"), ord("."))
BUFFER = 65536


class AttachError(Exception):
    pass


def attach(path: str, name: str = "card", stdin: int = 0, stdout: int = 1, banner: bool = True) -> str:
    """Copy between ``path`` (a pty slave) and the terminal until detached; returns why it ended."""
    try:
        pty = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise AttachError(f"{name}: cannot open the console {path}: {e.strerror}") from None
    saved = None
    try:
        if not os.isatty(pty):
            raise AttachError(f"{name}: {path} is not a terminal")
        if os.isatty(stdin):
            saved = termios.tcgetattr(stdin)
            tty.setraw(stdin)
        if banner:
            _say(stdout, f"Connected to {name} console ({os.path.realpath(path)}). "
                         f"Escape: Ctrl-] then q.\r\n")
        why = _copy(pty, stdin, stdout)
        if banner:
            _say(stdout, f"\r\n[{name} console: {why}]\r\n")
        return why
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        os.close(pty)


def _say(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])


def _copy(pty: int, stdin: int, stdout: int) -> str:
    escaped = False
    while True:
        r, _, _ = select.select([pty, stdin], [], [])
        if pty in r:
            try:
                data = os.read(pty, BUFFER)
            except OSError as e:
                if e.errno == errno.EIO:
                    return "the daemon closed the console"
                raise
            if not data:
                return "the daemon closed the console"
            _write_all(stdout, data)
        if stdin in r:
            data = os.read(stdin, BUFFER)
            if not data:
                return "end of input"
            out = bytearray()
            for b in data:
                if escaped:
                    escaped = False
                    if b in DETACH:
                        if out:
                            _write_all(pty, bytes(out))
                        return "detached"
                    out.append(ESCAPE)
                    if b != ESCAPE:
                        out.append(b)
                elif b == ESCAPE:
                    escaped = True
                else:
                    out.append(b)
            if out:
                _write_all(pty, bytes(out))


def main(argv: list[str] | None = None) -> int:   # python -m micdrv.attach PATH, for a quick manual test
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m micdrv.attach PTY", file=sys.stderr)
        return 2
    try:
        attach(args[0])
    except AttachError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
