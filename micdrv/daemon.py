"""micdrv: the per-card daemon.

This first version attaches to one device -- a card bound to vfio-pci
(``--device 0000:03:00.0``) or a vfio-user server (``--vfio-user PATH``) --
and reports what it found through the PciDevice interface. Booting, COSM,
VOP and the control socket build on it (issues 3-6).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .pci import BAR0, BAR4, PciDevice, PciError
from .pci.device import PCI_DEVICE_ID, PCI_REVISION_ID, PCI_VENDOR_ID
from .x100 import ids

log = logging.getLogger("micdrv")


def open_device(args) -> PciDevice:
    """The one place that picks the PciDevice implementation."""
    if args.device:
        from .pci.vfio import VfioPciDevice
        return VfioPciDevice.open(args.device)
    from .pci.vfio_user.client import VfioUserDevice
    return VfioUserDevice.connect(args.vfio_user)


def describe(dev: PciDevice) -> dict:
    vendor, device = dev.config_read(PCI_VENDOR_ID, 2), dev.config_read(PCI_DEVICE_ID, 2)
    rev = dev.config_read(PCI_REVISION_ID, 1)
    out = {"name": dev.name, "vendor": f"{vendor:#06x}", "device": f"{device:#06x}",
           "family": ids.family(vendor, device), "stepping": ids.stepping(rev), "regions": {}}
    for idx in (BAR0, BAR4):
        if idx < dev.info.num_regions:
            r = dev.region_info(idx)
            out["regions"][f"BAR{idx}"] = {"size": r.size, "mmap": r.mmappable}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sim"]:
        # ``micdrv sim --socket PATH ...``: run a simulated X100 card process.
        from .sim.__main__ import main as sim_main
        return sim_main(argv[1:])
    p = argparse.ArgumentParser(prog="micdrv", description="User-space host driver for one Xeon Phi X100 card.",
                                epilog="'micdrv sim --help' describes the simulated card.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--device", metavar="BDF", help="a card bound to vfio-pci, e.g. 0000:03:00.0")
    src.add_argument("--vfio-user", metavar="SOCKET", help="a vfio-user server socket (the simulated card)")
    p.add_argument("--probe", action="store_true", help="print what the device is, then exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="micdrv: %(message)s", stream=sys.stderr)
    try:
        with open_device(args) as dev:
            print(json.dumps(describe(dev), indent=2))
    except PciError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
