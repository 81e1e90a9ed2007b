"""micctl: the operator's command line.

Cards are driven by their daemons (``micdrv``, one per card); micctl talks to
them over their control sockets ``<run_dir>/<card>.sock`` (:mod:`micdrv.service`).

::

    micctl status [CARD ...] [--json]      state and shutdown status     (micctrl -s)
    micctl boot [CARD ...] [--wait]        boot                          (micctrl -b)
    micctl shutdown [CARD ...] [--wait]    orderly shutdown              (micctrl -S)
    micctl reset [CARD ...] [--wait]       reset to ready                (micctrl -r)
    micctl reboot [CARD ...] [--wait]      shutdown, then boot again     (micctrl -R)
    micctl wait [CARD ...] [--timeout S]   until online or ready         (micctrl -w)
    micctl log CARD                        the card kernel's log
    micctl info [CARD ...] [--json]        attributes and hardware facts
    micctl set CARD ATTR VALUE             write an attribute (firmware, ramdisk, cmdline,
                                           bootmode, heartbeat_enable, log_buf_addr, log_buf_len)
    micctl console CARD                    attach to the card's console (Ctrl-] then q detaches)
    micctl devices CARD [--json]           the card's virtio devices and their counters
    micctl blk list CARD [--json]          block devices
    micctl blk add CARD PATH [--readonly] [--serial S]   serve an image file to the card, now
    micctl blk remove CARD NAME            take a block device away (the card lets go first)
    micctl doctor | install | udev-rules | unit | bind BDF | unbind BDF | list

CARD is ``micN`` (or the name a card has in the configuration), or ``all``;
no CARD means every card whose daemon is running. The MPSS short flags
``-b -S -r -R -s -w`` do what micctrl's did (``micctl -b mic0``).

Exit status: 0 success; 1 the request failed (an invalid transition such as
shutdown while ready, a boot that failed, permission denied); 2 usage; 3 no
such card or its daemon is not running; 4 a wait timed out. Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from pathlib import Path

from . import config as configmod
from . import doctor  # noqa: F401 -- list uses its checks
from .jsonlines import JsonLinesClient
from .pci import PciError, bind

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOCARD, EXIT_TIMEOUT = 0, 1, 2, 3, 4
REQUEST_TIMEOUT = 60.0  # a boot may reset and poll ready first; the daemon answers within this
SHORT_FLAGS = {"-b": "boot", "-S": "shutdown", "-r": "reset", "-R": "reboot", "-s": "status", "-w": "wait"}


MAX_TIMEOUT = 1e9  # seconds (31 years): "wait forever", and still below threading.TIMEOUT_MAX


def seconds(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more (not nan, not inf)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 <= v <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to {MAX_TIMEOUT:g}")
    return v


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


# --- finding the daemons -------------------------------------------------------------------------

def run_dir(args) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    if os.environ.get("MICDRV_RUN_DIR"):
        return Path(os.environ["MICDRV_RUN_DIR"])
    try:
        cfg = configmod.load(args.config)
    except configmod.ConfigError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    return Path(cfg.settings.run_dir)


def running_cards(rdir: Path) -> list[str]:
    return sorted((Path(p).stem for p in glob.glob(str(rdir / "*.sock"))), key=_card_order)


def _card_order(name: str):
    return (0, int(name[3:])) if name.startswith("mic") and name[3:].isdigit() else (1, name)


def select_cards(args) -> list[tuple[str, Path]]:
    rdir = run_dir(args)
    names = list(getattr(args, "cards", None) or [])
    if not names or names == ["all"]:
        found = running_cards(rdir)
        if not found:
            raise CliError(f"no card daemons are running (no sockets in {rdir}); start micdrv@<pci>.service "
                           f"or 'micdrv --simulate'", EXIT_NOCARD)
        names = found
    elif "all" in names:
        raise CliError("'all' cannot be combined with card names", EXIT_USAGE)
    for n in names:
        if not n or n.startswith(".") or "/" in n or not n.isprintable():
            raise CliError(f"{n!r} is not a card name (micN, or all)", EXIT_USAGE)
    return [(n, rdir / f"{n}.sock") for n in names]


def connect(name: str, path: Path) -> JsonLinesClient:
    try:
        return JsonLinesClient(str(path), timeout=REQUEST_TIMEOUT)
    except FileNotFoundError:
        raise CliError(f"{name}: no such card, or its daemon is not running (no {path})", EXIT_NOCARD) from None
    except ConnectionRefusedError:
        raise CliError(f"{name}: the daemon is not running ({path} refuses connections)", EXIT_NOCARD) from None
    except PermissionError:
        raise CliError(f"{name}: permission denied on {path} (root or the socket group only)") from None
    except OSError as e:
        raise CliError(f"{name}: cannot reach the daemon at {path}: {e.strerror or e}", EXIT_NOCARD) from None


def request(name: str, path: Path, cmd: str, /, io_timeout: float | None = None, **fields) -> dict:
    with connect(name, path) as c:
        try:
            reply = c.call(cmd, io_timeout=io_timeout, **fields)
        except (OSError, ConnectionError, ValueError) as e:
            raise CliError(f"{name}: the daemon did not answer {cmd!r}: {e}", EXIT_NOCARD) from None
    if not reply.get("ok"):
        code = EXIT_TIMEOUT if reply.get("errno") == "ETIMEDOUT" else EXIT_FAIL
        error = reply.get("error", "unknown error")
        for said in (f"{name}: ", f"{cmd} failed: "):  # the daemon's own prefix: not twice on one line
            error = error[len(said):] if error.startswith(said) else error
        raise CliError(f"{name}: {cmd} failed: {error}", code)
    return reply


# --- card commands -------------------------------------------------------------------------------

def _say(e: object) -> None:
    """An error as one line on stderr: characters that are not printable (a control character or a line
    separator in a path the user typed, say) are written as escapes, so no terminal or line reader sees them."""
    text = str(e)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    print(f"micctl: {text}", file=sys.stderr)


def _each(args, fn) -> int:
    """Run ``fn(name, path)`` for every selected card; report each failure, return the worst code."""
    worst = EXIT_OK
    for name, path in select_cards(args):
        try:
            fn(name, path)
        except CliError as e:
            _say(e)
            worst = max(worst, e.code)
    return worst


def _status_line(r: dict) -> str:
    line = f"{r['card']}: {r['state']}"
    if r.get("shutdown_status", "nop") != "nop":
        line += f" ({r['shutdown_status']})"
    return line


def _cmd_status(args) -> int:
    out: list[dict] = []

    def one(name, path):
        r = request(name, path, "status")
        r.pop("ok", None)
        out.append(r)
        if not args.json:
            print(_status_line(r))
    code = _each(args, one)
    if args.json:
        print(json.dumps(out, indent=2))
    return code


def _cmd_info(args) -> int:
    out: list[dict] = []

    def one(name, path):
        r = request(name, path, "info")
        r.pop("ok", None)
        out.append(r)
        if not args.json:
            print(f"{r['card']}:")
            for k, v in r.items():
                if k != "card":
                    print(f"  {k:<16} {v}")
    code = _each(args, one)
    if args.json:
        print(json.dumps(out, indent=2))
    return code


def _wait_for(name: str, path: Path, states: list[str], timeout: float) -> dict:
    return request(name, path, "wait", io_timeout=timeout + REQUEST_TIMEOUT, states=states, timeout=timeout)


def _transition(cmd: str, wait_states: list[str], success: str):
    """A state change; with ``--wait``, the first of ``wait_states`` reached must be ``success``, else exit 1."""
    def run(args) -> int:
        fields = {}
        if cmd == "boot":
            fields = {k: getattr(args, k) for k in ("firmware", "ramdisk", "cmdline") if getattr(args, k, None)}

        def one(name, path):
            r = request(name, path, cmd, **fields)
            print(f"{name}: {r['state']}")
            if args.wait:
                w = _wait_for(name, path, wait_states, args.timeout)
                print(_status_line({"card": name, **w}))
                if w.get("state") != success:
                    raise CliError(f"{name}: {cmd} ended in {w.get('state')}, not {success}")
        return _each(args, one)
    return run


def _cmd_wait(args) -> int:
    states = args.state or ["online", "ready"]

    def one(name, path):
        r = _wait_for(name, path, states, args.timeout)
        print(_status_line({"card": name, **r}))
    return _each(args, one)


def _cmd_log(args) -> int:
    args.cards = [args.card]
    (name, path), = select_cards(args)
    r = request(name, path, "log")
    sys.stdout.write(r["log"])
    if r["log"] and not r["log"].endswith("\n"):
        sys.stdout.write("\n")
    return EXIT_OK


def _cmd_set(args) -> int:
    args.cards = [args.card]
    (name, path), = select_cards(args)
    r = request(name, path, "set", attr=args.attr, value=args.value)
    print(f"{name}: {r['attr']} = {r['value']}")
    return EXIT_OK


def _one_card(args) -> tuple[str, Path]:
    args.cards = [args.card]
    (name, path), = select_cards(args)
    return name, path


def _cmd_console(args) -> int:
    from .attach import AttachError, attach
    name, path = _one_card(args)
    console = request(name, path, "console")["path"]
    try:
        attach(console, name)
    except AttachError as e:
        raise CliError(str(e)) from None
    return EXIT_OK


def _cmd_devices(args) -> int:
    name, path = _one_card(args)
    r = request(name, path, "devices")
    if args.json:
        print(json.dumps(r["devices"], indent=2))
        return EXIT_OK
    for d in r["devices"]:
        extra = f" ({d['broken']})" if d.get("broken") else ""
        print(f"{name} {d['name']:<10} {d['kind']:<8} {d['state']}{extra}")
    for e in r.get("errors", []):
        print(f"{name} error: {e}")
    return EXIT_OK


def _cmd_blk(args) -> int:
    name, path = _one_card(args)
    if args.blk_command == "add":
        r = request(name, path, "blk-add", path=os.path.abspath(args.path), readonly=args.readonly,
                    **({"serial": args.serial} if args.serial else {}))
        print(f"{name}: {r['name']} {r['path']} ({r['state']})")
    elif args.blk_command == "remove":
        request(name, path, "blk-remove", name=args.name)
        print(f"{name}: {args.name} removed")
    else:
        rows = request(name, path, "blk-list")["blk"]
        if args.json:
            print(json.dumps(rows, indent=2))
            return EXIT_OK
        for r in rows:
            print(f"{r['name']:<6} {r['state']:<9} {'ro' if r['readonly'] else 'rw'} {r['capacity'] * 512:>14} "
                  f"{r['serial']:<20} {r['path']}")
    return EXIT_OK


# --- host commands -------------------------------------------------------------------------------

# Subcommands that are whole commands of their own modules (``main(argv)``), handed their arguments as they are.
PASSTHROUGH = {
    "doctor": ("micdrv.doctor", "check that this host has what micdrv needs, with a fix for each gap"),
    "install": ("micdrv.install", "install the systemd unit, udev rules and default configuration"),
    "udev-rules": ("micdrv.udev", "print the udev rules generated from the PCI ID table"),
    "unit": ("micdrv.unit", "print the systemd unit micdrv@.service"),
}


def _passthrough(name: str, argv: list[str]) -> int:
    import importlib
    return importlib.import_module(PASSTHROUGH[name][0]).main(argv)


def _cmd_bind(args) -> int:
    group = bind.bind_to_vfio_pci(args.address)
    print(f"{bind.normalize_bdf(args.address)}: bound to vfio-pci, IOMMU group {group}")
    return EXIT_OK


def _cmd_unbind(args) -> int:
    drv = bind.unbind_from_vfio_pci(args.address)
    print(f"{bind.normalize_bdf(args.address)}: released to {drv or 'no driver'}")
    return EXIT_OK


def _cmd_list(args) -> int:
    checks = [c for c in doctor.run_checks() if c.name == "cards"]
    print(checks[0].detail)
    return EXIT_OK


# --- the parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    def common_options(parser: argparse.ArgumentParser, default) -> argparse.ArgumentParser:
        parser.add_argument("--run-dir", default=default,
                            help="where the daemons' control sockets are (default: the configuration's run_dir, "
                                 "/run/micdrv; or $MICDRV_RUN_DIR)")
        parser.add_argument("--config", default=default, help="configuration file (default /etc/micdrv/micdrv.toml)")
        return parser

    # Given before or after the command; a subcommand must not reset what the top level parsed.
    common = common_options(argparse.ArgumentParser(add_help=False), argparse.SUPPRESS)
    p = common_options(argparse.ArgumentParser(prog="micctl",
                                description="Control Intel Xeon Phi X100 cards driven by micdrv.",
                                epilog="MPSS short flags: -b boot, -S shutdown, -r reset, -R reboot, -s status, "
                                       "-w wait (e.g. 'micctl -b mic0')."), None)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def card_cmd(name, help_, func, *, wait=False, timeout=120.0):
        sp = sub.add_parser(name, help=help_, parents=[common])
        sp.add_argument("cards", nargs="*", metavar="CARD", help="micN, or all (default: every running card)")
        if wait:
            sp.add_argument("--wait", action="store_true", help="wait until the card is online or ready")
        sp.add_argument("--timeout", type=seconds, default=timeout, help=f"seconds to wait (default {timeout:g})")
        sp.set_defaults(func=func)
        return sp

    s = card_cmd("status", "state and shutdown status", _cmd_status)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    b = card_cmd("boot", "boot the card(s)", _transition("boot", ["online", "ready", "reset_failed"], "online"), wait=True)
    b.add_argument("--firmware", help="OS image, relative to the firmware directory (sets the attribute)")
    b.add_argument("--ramdisk", help="ramdisk image (sets the attribute)")
    b.add_argument("--cmdline", help="kernel command line (sets the attribute)")
    card_cmd("shutdown", "orderly shutdown; the daemon then resets the card to ready",
             _transition("shutdown", ["ready", "reset_failed"], "ready"), wait=True)
    card_cmd("reset", "reset the card(s) to ready", _transition("reset", ["ready", "reset_failed"], "ready"), wait=True)
    card_cmd("reboot", "shutdown and boot again", _transition("reboot", ["online", "reset_failed"], "online"), wait=True)
    w = card_cmd("wait", "wait until the card(s) are online or ready", _cmd_wait)
    w.add_argument("--state", action="append", help="wait for this state instead (repeatable)")
    i = card_cmd("info", "attributes and hardware facts", _cmd_info)
    i.add_argument("--json", action="store_true", help="machine-readable output")
    lg = sub.add_parser("log", help="the card kernel's log", parents=[common])
    lg.add_argument("card")
    lg.set_defaults(func=_cmd_log)
    st = sub.add_parser("set", help="write a card attribute", parents=[common])
    st.add_argument("card")
    st.add_argument("attr", help="firmware, ramdisk, cmdline, bootmode, heartbeat_enable, log_buf_addr, log_buf_len")
    st.add_argument("value")
    st.set_defaults(func=_cmd_set)
    co = sub.add_parser("console", help="attach to the card's console; Ctrl-] then q detaches", parents=[common])
    co.add_argument("card")
    co.set_defaults(func=_cmd_console)
    dv = sub.add_parser("devices", help="the card's virtio devices", parents=[common])
    dv.add_argument("card")
    dv.add_argument("--json", action="store_true", help="machine-readable output, with every counter")
    dv.set_defaults(func=_cmd_devices)
    bk = sub.add_parser("blk", help="block devices: list, add, remove (also while the card is online)",
                        parents=[common])
    bsub = bk.add_subparsers(dest="blk_command", metavar="ACTION", required=True)
    bl = bsub.add_parser("list", help="the card's block devices", parents=[common])
    bl.add_argument("card")
    bl.add_argument("--json", action="store_true")
    ba = bsub.add_parser("add", help="serve an image file to the card", parents=[common])
    ba.add_argument("card")
    ba.add_argument("path", help="raw image file (or block device)")
    ba.add_argument("--readonly", action="store_true", help="the card may only read it")
    ba.add_argument("--serial", help="the disk's ID (virtio-blk GET_ID), at most 20 ASCII characters")
    br = bsub.add_parser("remove", help="take a block device away from the card", parents=[common])
    br.add_argument("card")
    br.add_argument("name", help="as micctl blk list shows it (blk0, ...), or the image's path")
    bk.set_defaults(func=_cmd_blk)

    for name, (_module, help_) in PASSTHROUGH.items():
        sub.add_parser(name, help=help_, add_help=False)  # listed in the help; main() hands them over
    bd = sub.add_parser("bind", help="bind a PCI device to vfio-pci (driver_override + reprobe)")
    bd.add_argument("address", help="PCI address, e.g. 0000:03:00.0")
    bd.set_defaults(func=_cmd_bind)
    u = sub.add_parser("unbind", help="give a PCI device back to its host driver")
    u.add_argument("address")
    u.set_defaults(func=_cmd_unbind)
    ls = sub.add_parser("list", help="list X100 cards on the PCI bus")
    ls.set_defaults(func=_cmd_list)
    return p


def translate_short_flags(argv: list[str]) -> list[str]:
    """``micctl -b mic0`` -> ``micctl boot mic0`` (micctrl's interface, spec 6.6)."""
    out, command = [], None
    for a in argv:
        if a in SHORT_FLAGS:
            if command is not None:
                raise CliError(f"one action at a time ({command} and {SHORT_FLAGS[a]} given)", EXIT_USAGE)
            command = SHORT_FLAGS[a]
        else:
            out.append(a)
    return [command, *out] if command else argv


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(translate_short_flags(argv))
    except CliError as e:
        _say(e)
        return e.code
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except CliError as e:
        _say(e)
        return e.code
    except (PciError, ValueError) as e:
        _say(e)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
