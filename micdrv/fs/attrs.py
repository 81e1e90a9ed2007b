"""The sysfs attributes of ``/sys/class/mic/micN`` as files (spec 3.5, cosm_sysfs.c), plus post_code and log.

What each attribute means, and the validation of a write, is the service's
(:meth:`micdrv.service.CardService.attribute`, ``set_attribute``,
``state_action``, ``card_log``); this module adds only what sysfs itself does
around a ``show``/``store``:

* a read returns the value and a newline (``sprintf(buf, "%s\\n", ...)``);
  ``log`` is the card kernel's log as it is (debugfs ``log_buf``);
* a write is one ``store`` of at most one page (kernfs truncates a longer
  write to PAGE_SIZE and reports that much written), whatever its offset;
  one trailing newline is stripped (``sysfs_streq``, and the stores'
  ``if (buf[count - 1] == '\\n')``); a write of nothing stores nothing;
* every attribute reports st_size 4096 as sysfs does (debugfs ``log``: 0);
  reads are direct, so the size never limits them.

Deliberate differences: a write that is not UTF-8 or holds a NUL byte is
refused (EINVAL) rather than cut at the NUL as strncpy would;
``heartbeat_enable`` takes 0 or 1 (the service's rule; the kernel's kstrtoint
took any integer and treated nonzero as on).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from ..cosm.host import CosmError
from ..jsonlines import RequestError

PAGE_SIZE = 4096  # kernfs: a store sees at most one page; sysfs files report this size


@dataclass(frozen=True)
class Attribute:
    name: str
    writable: bool
    notify: bool = False     # sysfs_notify on every change (poll wakes with POLLPRI|POLLERR): state only
    size: int = PAGE_SIZE


ATTRIBUTES: dict[str, Attribute] = {a.name: a for a in (
    Attribute("family", False),
    Attribute("stepping", False),
    Attribute("state", True, notify=True),
    Attribute("shutdown_status", False),
    Attribute("heartbeat_enable", True),
    Attribute("cmdline", True),
    Attribute("firmware", True),
    Attribute("ramdisk", True),
    Attribute("bootmode", True),
    Attribute("log_buf_addr", True),
    Attribute("log_buf_len", True),
    Attribute("post_code", False),   # debugfs mic_host/micN/post_code
    Attribute("log", False, size=0),  # debugfs COSM log_buf
)}


def error_number(e: Exception) -> int:
    """The errno a service error stands for (CosmError carries it; RequestError names it)."""
    if isinstance(e, CosmError):
        return e.errno
    if isinstance(e, RequestError):
        return getattr(errno, str(e.fields.get("errno")), errno.EIO)
    return errno.EIO


def show(service, attr: Attribute) -> bytes:
    """What a read of ``attr`` returns; OSError with the service's errno when it cannot be read."""
    try:
        text = service.attribute(attr.name)
    except (CosmError, RequestError) as e:
        raise OSError(error_number(e), str(e)) from None
    return text.encode("utf-8", "surrogateescape") if attr.name == "log" else f"{text}\n".encode()


def store(service, attr: Attribute, data: bytes) -> int:
    """One write to ``attr`` (a sysfs ``store``); how many bytes it took, or OSError with the errno."""
    if not attr.writable:
        raise OSError(errno.EACCES, f"{attr.name} is read-only")
    data = bytes(data[:PAGE_SIZE])
    if not data:
        return 0
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise OSError(errno.EINVAL, f"{attr.name}: a write must be UTF-8 text") from None
    if "\0" in text:
        raise OSError(errno.EINVAL, f"{attr.name}: a write must not hold a NUL byte")
    if text.endswith("\n"):
        text = text[:-1]
    try:
        if attr.name == "state":
            service.state_action(text)
        else:
            service.set_attribute(attr.name, text)
    except (CosmError, RequestError) as e:
        raise OSError(error_number(e), str(e)) from None
    return len(data)
