"""Log lines for journald: stderr with syslog priority prefixes when stderr is the journal.

A service's stderr under systemd is a stream to journald, which reads a
leading ``<N>`` on each line as that line's syslog priority (sd-daemon(3):
``<3>`` error ... ``<7>`` debug) and stamps the time, unit and PID itself.
The manager tells the service that its stderr is such a stream by setting
``$JOURNAL_STREAM`` to ``<st_dev>:<st_ino>`` of it (systemd.exec(5)); a
redirected or inherited stderr no longer matches, so the variable alone is not
enough -- the descriptor must be the one it names.

So: :func:`stderr_is_journal` compares the two, :class:`JournalFormatter`
prefixes every line (a traceback's continuation lines would otherwise be
logged at the default priority, info), and :class:`PlainFormatter` is for a
terminal or a file. :func:`configure` picks one for the root logger.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

# sd-daemon(3) / syslog(3) priorities.
SD_EMERG, SD_ALERT, SD_CRIT, SD_ERR, SD_WARNING, SD_NOTICE, SD_INFO, SD_DEBUG = range(8)


def priority(levelno: int) -> int:
    """The syslog priority of a logging level.

    A level between two standard ones takes the priority of the one below it,
    except that those between INFO and WARNING are syslog's "notice".
    """
    if levelno >= logging.CRITICAL:
        return SD_CRIT
    if levelno >= logging.ERROR:
        return SD_ERR
    if levelno >= logging.WARNING:
        return SD_WARNING
    if levelno > logging.INFO:
        return SD_NOTICE
    if levelno >= logging.INFO:
        return SD_INFO
    return SD_DEBUG


def stderr_is_journal(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> bool:
    """True when ``stream`` (default stderr) is the journal stream ``$JOURNAL_STREAM`` names."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):
        # No file descriptor (pytest's capture, a StringIO) or a malformed value: not the journal.
        return False


class JournalFormatter(logging.Formatter):
    """``<priority>`` before every line of the record; no time stamp (journald adds its own)."""

    def __init__(self, fmt: str = "%(name)s: %(message)s"):
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class PlainFormatter(logging.Formatter):
    """Time, level and logger name, for a terminal or a log file."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def formatter_for(stream: TextIO | None = None, env: Mapping[str, str] | None = None) -> logging.Formatter:
    return JournalFormatter() if stderr_is_journal(stream, env) else PlainFormatter()


def configure(level: str | int = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger's records to ``stream`` (stderr) in the form that suits it; returns the handler.

    ``level`` is a config.py ``log_level`` name ("debug", "info", "warning", "error") or a logging level.
    """
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(stream))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_micdrv_journal", False)]:
        root.removeHandler(old)
    handler._micdrv_journal = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
