"""``python -m micdrv.sim`` (``micdrv sim``): run one simulated X100 card, or write its card OS image.

::

    python -m micdrv.sim --socket PATH [--device-id 0x2250] [--stepping C0] [--memory 8G]
                         [--ready-delay 0.2] [--download-addr 64M] [--apic-id 240]
                         [--control PATH] [--log-level info] [--import MODULE]
    python -m micdrv.sim image --output PATH [--cmdline TEXT] [--log-buf-len 128K]

The card listens on ``--socket`` (vfio-user, one client at a time) and, with
``--control``, answers the simulator's control protocol (:mod:`.control`)
there. Both sockets listen before the first log line "listening" goes to
stderr. SIGTERM and SIGINT stop it cleanly (exit status 0).

``image`` writes the simulated card OS image (:mod:`.cardos.image`) to
PATH -- the firmware file the host boots, e.g. /lib/firmware/mic/uos.img --
and ``System.map`` beside it with the ``__log_buf`` and ``log_buf_len``
symbols mpssd-style tools read (spec 6.5).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import faulthandler
import signal
import sys
from pathlib import Path

from micdrv.pci.vfio_user import VfioUserServer

from . import identity
from .bootstrap import DEFAULT_APIC_ID, DEFAULT_DOWNLOAD_ADDR, DEFAULT_READY_DELAY
from .card import DEFAULT_MEMORY, X100Card
from .cardos import image as image_mod
from .control import ControlServer

log = logging.getLogger("micdrv.sim")
STOP_DIAGNOSE = 2.0          # seconds after SIGTERM/SIGINT before a stop counts as hung and its stacks are logged

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'8G', '256M', '64MiB', '4096', '0x4000000' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(0x[0-9a-fA-F]+|\d+)\s*([KMGTkmgt]?)(?:i?B)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 8G, 256M, 0x4000000)")
    return int(m.group(1), 0) * _UNITS[m.group(2).upper()]


def parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="micdrv sim", description="A simulated Intel Xeon Phi X100 card over vfio-user.")
    p.add_argument("--socket", required=True, help="vfio-user socket path to listen on")
    p.add_argument("--device-id", type=parse_int, default=identity.DEFAULT_DEVICE_ID,
                   help="PCI device ID, one of 0x2250-0x225e (default 0x2250)")
    p.add_argument("--stepping", default=identity.DEFAULT_STEPPING,
                   help="A0, B0, B1 or C0 (PCI revision 0x00/0x10/0x11/0x20), or a revision number (default C0)")
    p.add_argument("--memory", type=parse_size, default=DEFAULT_MEMORY,
                   help="GDDR size = BAR0 size, a power of two (default 8G; sparse: untouched memory costs nothing)")
    p.add_argument("--ready-delay", type=float, default=DEFAULT_READY_DELAY,
                   help="seconds from a reset to the bootstrap's ready (default 0.2)")
    p.add_argument("--download-addr", type=parse_size, default=DEFAULT_DOWNLOAD_ADDR,
                   help="where the bootstrap wants the image, 4 KiB aligned, <= 2G (default 64M)")
    p.add_argument("--apic-id", type=parse_int, default=DEFAULT_APIC_ID,
                   help=f"APIC ID of the bootstrap CPU, 0..511 (default {DEFAULT_APIC_ID})")
    p.add_argument("--control", help="control socket path (fault hooks, counters; tests and diagnostics)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE into the card OS before it runs and call its install_in_simulator(), "
                        "e.g. virtio drivers a test brings (repeatable; also $MICDRV_SIM_IMPORT, comma separated)")
    return p


def _stepping(text: str) -> int:
    try:
        return identity.revision_of(text)
    except ValueError:
        return identity.revision_of(int(text, 0))


def build_image_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="micdrv sim image",
                                description="Write the simulated card OS image and its System.map.")
    p.add_argument("--output", "-o", required=True, help="image file to write (System.map goes beside it)")
    p.add_argument("--cmdline", default="", help="built-in kernel command line, e.g. 'micdrv_sim.heartbeat=5' "
                                                 "(the host's command line comes after it and wins)")
    p.add_argument("--log-buf-len", type=parse_size, default=image_mod.DEFAULT_LOG_BUF_LEN,
                   help="kernel log ring size, a power of two (default 128K)")
    return p


def image_main(argv: list[str]) -> int:
    parser = build_image_parser()
    args = parser.parse_args(argv)
    out = Path(args.output)
    try:
        smap = image_mod.write_files(out, builtin_cmdline=args.cmdline, log_buf_len=args.log_buf_len)
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:
        print(f"micdrv sim image: {e}", file=sys.stderr)
        return 1
    print(f"{out}: {out.stat().st_size} bytes; {smap}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["image"]:
        return image_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s micdrv.sim[%(process)d] %(levelname)s %(name)s: %(message)s")
    for name in args.imports + [m for m in os.environ.get("MICDRV_SIM_IMPORT", "").split(",") if m.strip()]:
        try:
            module = importlib.import_module(name.strip())
        except ImportError as e:
            parser.error(f"--import {name}: {e}")
        hook = getattr(module, "install_in_simulator", None)
        if hook is not None:
            hook()
    try:
        card = X100Card(device_id=args.device_id, revision=_stepping(args.stepping), memory_size=args.memory,
                        apic_id=args.apic_id, download_addr=args.download_addr, ready_delay=args.ready_delay)
    except ValueError as e:
        parser.error(str(e))
    server = VfioUserServer(card, args.socket)
    control = None
    try:
        server.listen()
        if args.control:
            control = ControlServer(card, args.control)
            control.start()

        def stop(signum, _frame):
            log.info("%s: stopping", signal.Signals(signum).name)
            # A stop that hangs says where: every thread's stack goes to the log if we are still here
            # in STOP_DIAGNOSE seconds (a clean stop takes milliseconds).
            faulthandler.dump_traceback_later(STOP_DIAGNOSE, file=sys.stderr)
            server.stop(timeout=0)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("listening on %s%s: X100 %#06x stepping %s, %d MiB GDDR", args.socket,
                 f" (control {args.control})" if control else "", args.device_id, args.stepping,
                 args.memory >> 20)
        server.serve()
    finally:
        if control is not None:
            control.close()
        server.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
