"""micctl: the operator's command line.

For now: ``doctor`` (is this host ready for micdrv?), ``bind``/``unbind``
(hand a card to vfio-pci and back) and ``list`` (X100 cards on the PCI bus).
Boot, shutdown, reset, status and the MPSS short flags arrive with the daemon.

Errors print one line and exit non-zero; never a traceback for a user mistake.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import doctor
from .pci import PciError, bind

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _cmd_doctor(args) -> int:
    checks = doctor.run_checks()
    if args.json:
        print(json.dumps(doctor.as_dicts(checks), indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.name:<{width}}  {c.detail}")
            if not c.ok and c.fix:
                print(f"     {'':<{width}}  fix: {c.fix}")
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAIL


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="micctl", description="Control Intel Xeon Phi X100 cards driven by micdrv.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    d = sub.add_parser("doctor", help="check that this host has what micdrv needs, with a fix for each gap")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=_cmd_doctor)
    b = sub.add_parser("bind", help="bind a PCI device to vfio-pci (driver_override + reprobe)")
    b.add_argument("address", help="PCI address, e.g. 0000:03:00.0")
    b.set_defaults(func=_cmd_bind)
    u = sub.add_parser("unbind", help="give a PCI device back to its host driver")
    u.add_argument("address")
    u.set_defaults(func=_cmd_unbind)
    ls = sub.add_parser("list", help="list X100 cards on the PCI bus")
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except (PciError, ValueError) as e:
        print(f"micctl: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
