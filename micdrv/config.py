"""micdrv configuration: one TOML file, ``/etc/micdrv/micdrv.toml`` by default.

::

    [global]
    run_dir = "/run/micdrv"          # control sockets: <run_dir>/<card>.sock
    socket_mode = 0o660
    firmware_dir = "/lib/firmware"   # relative firmware/ramdisk paths start here (spec 3.1)
    log_level = "info"
    fuse = true                      # the sysfs-compatible FUSE tree <fuse_dir>/<card> (micdrv.fs)
    fuse_dir = "/run/micdrv"         # default: run_dir
    fuse_group = "mic"               # may read the tree; default: socket_group

    [defaults]                       # every key of a card section; applies to all cards
    firmware = "mic/uos.img"

    [card.mic0]                      # a card by name (micN) ...
    pci = "0000:03:00.0"             # ... optionally tied to its PCI address
    ramdisk = "mic/mic0.image"
    cmdline = "console=hvc0"
    bootmode = "linux"               # or "flash" (spec 3.5; upstream refuses to boot it, spec 3.1)
    boot_on_start = true
    auto_reset = true                # after a shutdown: reset to ready; after a restart: boot again
    reset_timeout = 45               # seconds of ready polling after a reset (spec 2.5)
    heartbeat = { enable = true, timeout = 40 }   # spec 7.2; or: heartbeat = false

    [[card.mic0.net]]                # device lists, filled in by the VOP work
    tap = "mic0"
    [[card.mic0.blk]]
    path = "/var/lib/micdrv/mic0.img"
    [[card.mic0.console]]

    [card."0000:04:00.0"]            # ... or a card by PCI address

Every error is a :class:`ConfigError` naming the file, the line and the
dotted key, e.g. ``/etc/micdrv/micdrv.toml:14: card.mic0.bootmode: must be
one of "linux", "flash", not "linx"``. Syntax errors come from tomllib; for
everything else the line is found by scanning the file for the key
(:func:`key_lines`).

To add a setting: add a field to the dataclass and a line to its
``_FIELDS`` table; to add a device kind: add a dataclass and an entry in
``DEVICE_KINDS``. Unknown keys are errors, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

DEFAULT_PATH = Path("/etc/micdrv/micdrv.toml")

BOOTMODES = ("linux", "flash")              # spec 3.5: the only values sysfs accepts
HEARTBEAT_TIMEOUT = 40.0                    # spec 7.2: 30 s heartbeat + 10 s slack
RESET_TIMEOUT = 45.0                        # spec 2.5: 45 polls of ready, 1 s apart
DEFAULT_FIRMWARE = "mic/uos.img"            # spec 6.6: what micctrl -b writes
CMDLINE_MAX = 2000                          # spec 3.1 step 6: 2048 bytes incl. " mem=<N>M " and NUL
LOG_LEVELS = ("debug", "info", "warning", "error")
NET_MTU = 64512                             # the MPSS MTU of micN (spec 6.2)
NET_MTU_RANGE = (68, 65521)                 # IPv4 minimum .. a tap's maximum (65535 - Ethernet header)
BLK_SERIAL_MAX = 20                         # VIRTIO_BLK_ID_BYTES (virtio-legacy.md 3.3)
VRING_INFO = ("rounded", "legacy")          # spec 5.6: the _mic_vring_info placements (micdrv.vop.layout)
VOP_COPY = ("spec", "h2c-direct")           # spec 5.7's copy rules, or host -> card payload straight into BAR0

_CARD_NAME = re.compile(r"^mic(0|[1-9][0-9]{0,2})$")
_IFNAME = re.compile(r"[^/:\s]{1,15}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_PCI_ADDR = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")


class ConfigError(Exception):
    """A configuration file that cannot be used; the message says where and why."""

    def __init__(self, path: str, line: int | None, key: str | None, message: str):
        self.path, self.line, self.key, self.message = path, line, key, message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# --- the result ------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeartbeatConfig:
    """The COSM heartbeat watchdog (spec 7.2); sysfs ``heartbeat_enable`` defaults to 1 (spec 3.5)."""

    enable: bool = True
    timeout: float = HEARTBEAT_TIMEOUT


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net device backed by a tap (spec 6.2; backends.net). None means the MPSS default."""

    tap: str | None = None           # default: the card name, as mpssd's "mic<id>"
    address: str | None = None       # host address/prefix on the tap, mpssd: 172.31.<id+1>.254/24 (none with a bridge)
    card_address: str | None = None  # the card's address (kernel command line), MPSS: 172.31.<id+1>.1
    bridge: str | None = None        # an existing bridge the tap joins
    netns: str | None = None         # an existing network namespace the tap is moved into
    mtu: int = NET_MTU               # the tap's MTU
    mac: str | None = None           # the card's MAC; default derived from the PCI address or card name


@dataclass(frozen=True)
class BlkConfig:
    """A virtio-blk device backed by an image file (spec 6.4; backends.blk)."""

    path: str = ""
    readonly: bool = False
    serial: str | None = None        # GET_ID string, at most 20 ASCII bytes; default: the image's file name


@dataclass(frozen=True)
class ConsoleConfig:
    """A virtio-console device on a pty (spec 6.3; backends.console)."""

    path: str | None = None          # where the pty's symlink goes; default <run_dir>/<card>/console


@dataclass(frozen=True)
class CardConfig:
    """Everything about one card; every field has a default."""

    name: str = ""
    pci: str | None = None
    firmware: str = DEFAULT_FIRMWARE
    ramdisk: str | None = None
    cmdline: str = ""
    bootmode: str = "linux"
    boot_on_start: bool = False
    auto_reset: bool = True           # reset after the card shuts down, boot again after a restart (mpssd, spec 6.5)
    reset_timeout: float = RESET_TIMEOUT
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    log_buf_addr: int | None = None   # spec 3.5: card kernel virtual address of __log_buf
    log_buf_len: int | None = None    # spec 3.5: ... of log_buf_len
    vring_info: str = "rounded"       # spec 5.6: where _mic_vring_info sits, "rounded" or "legacy" (card alike)
    vop_copy: str = "spec"            # spec 5.7's rules, or "h2c-direct" (micdrv.vop.copy.CopyPolicy.h2c_direct)
    net: tuple[NetConfig, ...] = ()
    blk: tuple[BlkConfig, ...] = ()
    console: tuple[ConsoleConfig, ...] = ()


@dataclass(frozen=True)
class GlobalConfig:
    run_dir: str = "/run/micdrv"
    socket_mode: int = 0o660
    socket_group: str | None = None
    firmware_dir: str = "/lib/firmware"
    log_level: str = "info"
    fuse: bool = True                 # mount the card's FUSE tree (micdrv.fs)
    fuse_dir: str | None = None       # the trees are <fuse_dir>/<card>; default: run_dir
    fuse_group: str | None = None     # the group that may read the trees; default: socket_group


@dataclass(frozen=True)
class Config:
    path: str | None = None
    settings: GlobalConfig = GlobalConfig()
    defaults: CardConfig = CardConfig()
    cards: dict[str, CardConfig] = field(default_factory=dict)
    lines: dict[tuple, int] = field(default_factory=dict, compare=False, repr=False)  # key path -> line

    def error(self, keypath: tuple, message: str) -> ConfigError:
        """A :class:`ConfigError` about ``keypath`` (("global", "socket_group")), at its line in the file."""
        return ConfigError(self.path or "<defaults>", _line_of(self.lines, keypath), _dotted(keypath), message)

    def check_host(self) -> None:
        """What only this host can tell: the groups named must exist. Raises :class:`ConfigError`."""
        for key in ("socket_group", "fuse_group"):
            name = getattr(self.settings, key)
            if name:
                try:
                    grp.getgrnam(name)
                except KeyError:
                    raise self.error(("global", key), f"no group {name!r} on this host "
                                                      f"(groupadd --system {name}, or remove the key)") from None

    def card(self, ident: str) -> CardConfig:
        """The configuration of card ``ident`` (``mic0`` or a PCI address): its section, else the defaults."""
        pci = normalize_pci(ident)
        key = pci or ident
        if key in self.cards:
            return self.cards[key]
        for c in self.cards.values():
            if pci and c.pci == pci:
                return c
        return dataclasses.replace(self.defaults, name=key, pci=pci)

    def firmware_path(self, relative: str) -> Path:
        """A firmware or ramdisk path, relative ones under ``firmware_dir`` (spec 3.1 request_firmware)."""
        p = Path(relative)
        return p if p.is_absolute() else Path(self.settings.firmware_dir) / p

    def socket_path(self, card: CardConfig) -> Path:
        return Path(self.settings.run_dir) / f"{card.name}.sock"

    def fuse_path(self, card: CardConfig) -> Path:
        """Where the card's FUSE tree is mounted: ``<fuse_dir>/<card>``, fuse_dir defaulting to run_dir."""
        return Path(self.settings.fuse_dir or self.settings.run_dir) / card.name

    @property
    def fuse_group(self) -> str | None:
        """The group that may read the FUSE trees: ``fuse_group``, else ``socket_group``."""
        return self.settings.fuse_group or self.settings.socket_group


def normalize_pci(s: str) -> str | None:
    """``0000:03:00.0`` (lower case, with domain) if ``s`` is a PCI address, else None."""
    m = _PCI_ADDR.match(s)
    if not m:
        return None
    dom, bus, dev, fn = m.groups()
    return f"{(dom or '0000').lower()}:{bus.lower()}:{dev.lower()}.{fn}"


# --- field checkers ------------------------------------------------------------------------------

class _Bad(Exception):
    """A value is wrong; the caller knows where."""


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"must be a string, not {_tname(v)}")
    return v


def _opt_str(v: Any) -> str | None:
    return _str(v) or None


def _nonempty(v: Any) -> str:
    if not _str(v):
        raise _Bad("must not be empty")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false, not {_tname(v)}")
    return v


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad(f"must be a number of seconds, not {_tname(v)}")
    if not math.isfinite(v) or v <= 0:
        raise _Bad(f"must be a number of seconds greater than 0, not {v}")
    return float(v)


def _u64(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
        raise _Bad(f"must be an integer 0..2**64-1 (hex like 0xffffffff81000000 is fine), not {v!r}")
    return v


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if _str(v) not in choices:
            raise _Bad(f"must be one of {', '.join(repr(c) for c in choices)}, not {v!r}")
        return v
    return check


def _abs_path(v: Any) -> str:
    if not _nonempty(v).startswith("/"):
        raise _Bad(f"must be an absolute path, not {v!r}")
    return v


def _mode(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
        raise _Bad(f"must be a file mode like 0o660, not {v!r}")
    return v


def _pci(v: Any) -> str:
    p = normalize_pci(_str(v))
    if p is None:
        raise _Bad(f"must be a PCI address like 0000:03:00.0, not {v!r}")
    return p


def _cmdline(v: Any) -> str:
    if "\0" in _str(v):
        raise _Bad("must not contain NUL")
    if len(v.encode()) > CMDLINE_MAX:
        raise _Bad(f"is {len(v.encode())} bytes; the card's command line buffer holds {CMDLINE_MAX} "
                   f"after the \" mem=<N>M\" the host puts first (spec 3.1)")
    return v


def _ifname(v: Any) -> str:
    """A Linux interface (or namespace) name: 1..15 bytes, no '/', ':' or whitespace."""
    if not _IFNAME.fullmatch(_nonempty(v)):
        raise _Bad(f"must be an interface name of 1..15 characters without '/', ':' or spaces, not {v!r}")
    return v


def _netns(v: Any) -> str:
    if "/" in _nonempty(v) or v in (".", "..") or any(c.isspace() for c in v):
        raise _Bad(f"must be a network namespace name (as in ip netns), not {v!r}")
    return v


def _ipv4_interface(v: Any) -> str:
    try:
        iface = ipaddress.IPv4Interface(_str(v))
    except ValueError:
        iface = None
    if iface is None or "/" not in v:
        raise _Bad(f"must be an IPv4 address with a prefix length like 172.31.1.254/24, not {v!r}")
    return v


def _ipv4(v: Any) -> str:
    try:
        ipaddress.IPv4Address(_str(v))
    except ValueError:
        raise _Bad(f"must be an IPv4 address like 172.31.1.1, not {v!r}") from None
    return v


def _mtu(v: Any) -> int:
    lo, hi = NET_MTU_RANGE
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _Bad(f"must be an MTU of {lo}..{hi} bytes, not {v!r}")
    return v


def _mac(v: Any) -> str:
    if not _MAC.fullmatch(_str(v)):
        raise _Bad(f"must be a MAC address like 02:00:00:00:00:01, not {v!r}")
    if int(v[:2], 16) & 1:
        raise _Bad(f"must be a unicast MAC address (first octet even), not {v!r}")
    return v.lower()


def _serial(v: Any) -> str:
    if not _str(v).isascii() or not v.isprintable():
        raise _Bad(f"must be printable ASCII, not {v!r}")
    if len(v) > BLK_SERIAL_MAX:
        raise _Bad(f"is {len(v)} characters; a virtio-blk ID holds {BLK_SERIAL_MAX} (virtio-legacy.md 3.3)")
    return v


def _tname(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


_GLOBAL_FIELDS: dict[str, Callable[[Any], Any]] = {
    "run_dir": _abs_path, "socket_mode": _mode, "socket_group": _opt_str, "firmware_dir": _abs_path,
    "log_level": _one_of(LOG_LEVELS), "fuse": _bool, "fuse_dir": _abs_path, "fuse_group": _opt_str,
}
_HEARTBEAT_FIELDS = {"enable": _bool, "timeout": _seconds}
_CARD_FIELDS: dict[str, Callable[[Any], Any]] = {
    "firmware": _nonempty, "ramdisk": _opt_str, "cmdline": _cmdline, "bootmode": _one_of(BOOTMODES),
    "boot_on_start": _bool, "auto_reset": _bool, "reset_timeout": _seconds, "log_buf_addr": _u64,
    "log_buf_len": _u64, "vring_info": _one_of(VRING_INFO), "vop_copy": _one_of(VOP_COPY),
}
DEVICE_KINDS: dict[str, tuple[type, dict[str, Callable[[Any], Any]], tuple[str, ...]]] = {
    # kind: (dataclass, field checkers, required keys)
    "net": (NetConfig, {"tap": _ifname, "address": _ipv4_interface, "card_address": _ipv4, "bridge": _ifname,
                        "netns": _netns, "mtu": _mtu, "mac": _mac}, ()),
    # An image path is absolute: relative to what would it be, the daemon's working directory ("/")?
    "blk": (BlkConfig, {"path": _abs_path, "readonly": _bool, "serial": _serial}, ("path",)),
    "console": (ConsoleConfig, {"path": _abs_path}, ()),
}


# --- parsing -----------------------------------------------------------------------------------

class _Parser:
    def __init__(self, text: str, path: str):
        self.path = path
        self.lines = key_lines(text)

    def error(self, keypath: tuple, message: str) -> ConfigError:
        return ConfigError(self.path, self.line_of(keypath), _dotted(keypath), message)

    def line_of(self, keypath: tuple) -> int | None:
        return _line_of(self.lines, keypath)

    def table(self, v: Any, keypath: tuple) -> dict:
        if not isinstance(v, dict):
            raise self.error(keypath, f"must be a table, not {_tname(v)}")
        return v

    def fields(self, table: dict, keypath: tuple, checkers: dict, skip: tuple = ()) -> dict:
        out = {}
        for k, v in table.items():
            if k in skip:
                continue
            check = checkers.get(k)
            if check is None:
                known = ", ".join(sorted(list(checkers) + list(skip))) or "none"
                raise self.error(keypath + (k,), f"unknown key (known here: {known})")
            try:
                out[k] = check(v)
            except _Bad as e:
                raise self.error(keypath + (k,), str(e)) from None
        return out

    def heartbeat(self, v: Any, keypath: tuple, base: HeartbeatConfig) -> HeartbeatConfig:
        if isinstance(v, bool):
            return dataclasses.replace(base, enable=v)
        return dataclasses.replace(base, **self.fields(self.table(v, keypath), keypath, _HEARTBEAT_FIELDS))

    def devices(self, kind: str, v: Any, keypath: tuple) -> tuple:
        cls, checkers, required = DEVICE_KINDS[kind]
        if not isinstance(v, list):
            raise self.error(keypath, f"must be an array of tables ([[...{kind}]]), not {_tname(v)}")
        out = []
        for i, item in enumerate(v):
            kp = keypath + (i,)
            values = self.fields(self.table(item, kp), kp, checkers)
            for r in required:
                if r not in values:
                    raise self.error(kp, f"needs {r!r}")
            out.append(cls(**values))
        return tuple(out)

    def card(self, table: dict, keypath: tuple, base: CardConfig, name: str, allow_pci: bool) -> CardConfig:
        skip = ("heartbeat", *DEVICE_KINDS) + (("pci",) if allow_pci else ())
        values: dict[str, Any] = self.fields(table, keypath, _CARD_FIELDS, skip=skip)
        if "heartbeat" in table:
            values["heartbeat"] = self.heartbeat(table["heartbeat"], keypath + ("heartbeat",), base.heartbeat)
        for kind in DEVICE_KINDS:
            if kind in table:
                values[kind] = self.devices(kind, table[kind], keypath + (kind,))
        if allow_pci and "pci" in table:
            try:
                values["pci"] = _pci(table["pci"])
            except _Bad as e:
                raise self.error(keypath + ("pci",), str(e)) from None
        return dataclasses.replace(base, name=name, **values)

    def parse(self, data: dict) -> Config:
        known = ("global", "defaults", "card")
        for k in data:
            if k not in known:
                raise self.error((k,), f"unknown key (known at the top level: {', '.join(known)})")
        settings = GlobalConfig(**self.fields(self.table(data.get("global", {}), ("global",)), ("global",),
                                              _GLOBAL_FIELDS))
        defaults = self.card(self.table(data.get("defaults", {}), ("defaults",)), ("defaults",), CardConfig(),
                             "", allow_pci=False)
        cards: dict[str, CardConfig] = {}
        by_pci: dict[str, str] = {}
        for key, section in self.table(data.get("card", {}), ("card",)).items():
            kp = ("card", key)
            pci = normalize_pci(key)
            if pci is None and not _CARD_NAME.match(key):
                raise self.error(kp, "a card is named micN (N = 0..999) or by its PCI address like 0000:03:00.0")
            name = pci or key
            if name in cards:
                raise self.error(kp, f"card {name} is configured twice")
            c = self.card(self.table(section, kp), kp, defaults, name, allow_pci=pci is None)
            if pci is not None:
                c = dataclasses.replace(c, pci=pci)
            if c.pci is not None:
                if c.pci in by_pci:
                    raise self.error(kp, f"PCI address {c.pci} is already card {by_pci[c.pci]}")
                by_pci[c.pci] = name
            cards[name] = c
        return Config(self.path, settings, defaults, cards, self.lines)


def _line_of(lines: dict[tuple, int], keypath: tuple) -> int | None:
    """The line of the key, or of the nearest enclosing one that the scanner found."""
    for n in range(len(keypath), 0, -1):
        line = lines.get(tuple(keypath[:n]))
        if line:
            return line
    # A table only ever named as part of longer headers ([card.mic0] makes "card").
    inside = [line for k, line in lines.items() if k[:len(keypath)] == keypath]
    return min(inside, default=None)


def loads(text: str, path: str = "<string>") -> Config:
    """Parse configuration text; ``path`` is only used in messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = re.search(r"\(at line (\d+), column \d+\)$", msg)
        line = int(m.group(1)) if m else (text.count("\n") + 1 if "end of document" in msg else None)
        raise ConfigError(path, line, None, f"TOML syntax: {msg}") from None
    return _Parser(text, path).parse(data)


def load(path: str | Path | None = None) -> Config:
    """Read the configuration file; with no ``path``, the default file, which may be absent (all defaults)."""
    explicit = path is not None
    p = Path(path) if explicit else DEFAULT_PATH
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(str(p), None, None, "no such file") from None
        return Config(None)
    except OSError as e:
        raise ConfigError(str(p), None, None, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), None, None, f"not UTF-8 text (byte {e.start})") from None
    return loads(text, str(p))


# --- where each key is -------------------------------------------------------------------------

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _dotted(keypath: tuple) -> str:
    parts = []
    for k in keypath:
        if isinstance(k, int):
            parts[-1] += f"[{k}]"
        elif _BARE.fullmatch(k):
            parts.append(k)
        else:
            parts.append(f'"{k}"')
    return ".".join(parts)


def _read_key(s: str, i: int) -> tuple[list[str], int] | None:
    """Parse a (dotted) key at ``s[i:]``; returns its parts and the index after it."""
    parts = []
    while True:
        while i < len(s) and s[i] in " \t":
            i += 1
        if i < len(s) and s[i] in "\"'":
            q = s[i]
            j = i + 1
            buf = []
            while j < len(s) and s[j] != q:
                if q == '"' and s[j] == "\\" and j + 1 < len(s):
                    buf.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\"}.get(s[j + 1], s[j + 1]))
                    j += 2
                    continue
                buf.append(s[j])
                j += 1
            if j >= len(s):
                return None
            parts.append("".join(buf))
            i = j + 1
        else:
            m = _BARE.match(s, i)
            if not m:
                return None
            parts.append(m.group())
            i = m.end()
        while i < len(s) and s[i] in " \t":
            i += 1
        if i < len(s) and s[i] == ".":
            i += 1
            continue
        return parts, i


def _scan_value(s: str, i: int, depth: int, in_ml: str | None) -> tuple[int, str | None]:
    """Track bracket depth and open multi-line strings over ``s[i:]`` (the rest of a line)."""
    while i < len(s):
        if in_ml:
            end = s.find(in_ml, i)
            if end < 0:
                return depth, in_ml
            i, in_ml = end + 3, None
            continue
        c = s[i]
        if c == "#":
            break
        if s.startswith('"""', i) or s.startswith("'''", i):
            in_ml = s[i:i + 3]
            i += 3
            continue
        if c in "\"'":
            j = i + 1
            while j < len(s) and s[j] != c:
                j += 2 if (c == '"' and s[j] == "\\") else 1
            i = j + 1
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return depth, in_ml


def key_lines(text: str) -> dict[tuple, int]:
    """Map every key path in TOML ``text`` to the 1-based line that defines it.

    Tables map to their header line; ``[[array]]`` entries get their index
    in the path, as in the parsed data. Keys inside inline tables or arrays
    are not listed (their enclosing key is). Best effort: used only to
    point error messages at the right line of a file tomllib already parsed.
    """
    lines: dict[tuple, int] = {}
    table: tuple = ()
    aot_count: dict[tuple, int] = {}
    depth, in_ml = 0, None
    for n, line in enumerate(text.splitlines(), 1):
        if in_ml or depth > 0:
            depth, in_ml = _scan_value(line, 0, depth, in_ml)
            continue
        s = line.lstrip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("[["):
            k = _read_key(s, 2)
            if k:
                path = tuple(k[0])
                idx = aot_count.get(path, 0)
                aot_count[path] = idx + 1
                # Deeper [[...]] under an earlier one restart their own count.
                for p in [p for p in aot_count if len(p) > len(path) and p[:len(path)] == path]:
                    del aot_count[p]
                table = path + (idx,)
                lines.setdefault(table, n)
            continue
        if s.startswith("["):
            k = _read_key(s, 1)
            if k:
                table = _under_arrays(tuple(k[0]), aot_count)
                lines.setdefault(table, n)
            continue
        k = _read_key(s, 0)
        if k is None:
            continue
        parts, i = k
        rest = s[i:]
        if not rest.startswith("="):
            continue
        lines.setdefault(table + tuple(parts), n)
        depth, in_ml = _scan_value(rest, 1, 0, None)
    return lines


def _under_arrays(path: tuple, aot_count: dict[tuple, int]) -> tuple:
    """``[a.b.c]`` after ``[[a.b]]`` names a.b[last].c: put the array indexes into the path."""
    out: tuple = ()
    for i, part in enumerate(path):
        out += (part,)
        prefix = path[:i + 1]
        if prefix in aot_count and i + 1 < len(path):
            out += (aot_count[prefix] - 1,)
    return out
