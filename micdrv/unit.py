"""The systemd unit micdrv@.service: one daemon per card, the instance is the card's PCI address.

Rendered here (``python -m micdrv.unit``) so that the two numbers it shares
with the code come from the code: the memlock limit from the arena size
(``doctor.ARENA_BYTES``) and the executable's path from the installation
(``micctl install`` renders it with the path of the micdrv it installs for;
``systemd/micdrv@.service`` is the committed rendering for /usr/bin/micdrv, a
test keeps it equal to :func:`render`).

How a card comes up: udev (``udev/70-micdrv.rules``) binds the card to
vfio-pci and wants ``micdrv@<address>.service``; the unit binds to the card's
device unit, so it is stopped when the card goes away. The reasons for each
setting are the comments in the unit itself (:data:`TEMPLATE`).

Capabilities, by what each operation needs on a current kernel:

* CAP_NET_ADMIN -- TUNSETIFF creating the tap, and pyroute2's RTM_NEWLINK /
  RTM_NEWADDR (MTU, up, address, bridge master);
* CAP_SYS_ADMIN -- mount(2) and umount2(2) of the FUSE tree (libfuse mounts
  directly when run as root; fusermount3's setuid path is closed by
  NoNewPrivileges=);
* CAP_CHOWN -- giving the control socket to ``socket_group`` (the daemon is
  root but not a member of that group).

Not needed, so not granted: CAP_IPC_LOCK (VFIO type1 -- and iommufd behind
/dev/vfio/vfio -- account pinned pages against the process's RLIMIT_MEMLOCK,
which LimitMEMLOCK= raises; the capability would only lift the limit);
CAP_SYS_RAWIO (only no-IOMMU VFIO groups demand it, and micdrv needs
MAP_DMA, which no-IOMMU mode does not have); CAP_SYS_MODULE (udev loads
vfio-pci); CAP_DAC_OVERRIDE (everything the daemon opens is root's or
world-accessible, so block images must be accessible to uid 0 through their
mode bits).

Why no file-system sandboxing (ProtectSystem=, ProtectHome=, PrivateTmp=,
PrivateDevices=, ReadWritePaths=, ProtectKernel*=, ProtectControlGroups=,
ProtectProc=): each of them runs the service in its own mount namespace whose
mounts are made slaves of the host's, and systemd.exec(5) says so plainly
(MountFlags=): "Setting this option to shared does not reestablish
propagation in that case". The daemon's FUSE tree (/run/micdrv/micN) would be
mounted where no operator can see it. What sandboxing does not need a mount
namespace is here: the capability bounding set, the device cgroup, address
families, the system call filter, W^X memory, no new privileges.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .doctor import ARENA_BYTES

UNIT_NAME = "micdrv@.service"
DEFAULT_MICDRV = "/usr/bin/micdrv"

# Pinned memory allowed per daemon: four arenas. VFIO pins the arena once per
# MAP_DMA; the headroom covers an arena re-mapped after a card reset before
# the old mapping is gone and an arena grown for more devices, while a bug
# still cannot pin unbounded host memory.
MEMLOCK_BYTES = 4 * ARENA_BYTES

TEMPLATE = """\
# micdrv: the user-space driver for one Intel Xeon Phi X100 card; the instance is its PCI address.
# Started by udev (70-micdrv.rules) when the card appears: there is nothing to enable.
# Rendered by "python -m micdrv.unit" (micdrv/unit.py says why each setting is what it is).

[Unit]
Description=micdrv: Xeon Phi X100 card at PCI %I
# The card's device unit (udev names it through SYSTEMD_ALIAS): stop when the card goes away.
BindsTo=sys-subsystem-pci-devices-%i.device
After=sys-subsystem-pci-devices-%i.device
# A daemon that keeps failing is given up after 5 starts in 5 minutes.
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=notify
# READY=1 once attached to the card, STATUS= the card's state, WATCHDOG=1 from the event loop.
NotifyAccess=main
ExecStart={micdrv} --device %I
Restart=on-failure
RestartSec=5s
WatchdogSec=30s
# Only the daemon gets SIGTERM; it stops what it started, the rest is killed at the timeout.
KillMode=mixed
TimeoutStopSec=90s
# VFIO pins the DMA arena ({arena_mib} MiB) against RLIMIT_MEMLOCK; four arenas of headroom.
LimitMEMLOCK={memlock_mib}M

# Capabilities: tap and netlink, the FUSE mount, the control socket's group.
CapabilityBoundingSet=CAP_NET_ADMIN CAP_SYS_ADMIN CAP_CHOWN
NoNewPrivileges=yes
# Devices: the VFIO container and group nodes, the tap clone device, FUSE, the console's ptys.
DevicePolicy=closed
DeviceAllow=/dev/vfio/vfio rw
DeviceAllow=char-vfio rw
DeviceAllow=/dev/net/tun rw
DeviceAllow=/dev/fuse rw
DeviceAllow=/dev/ptmx rw
DeviceAllow=char-pts rw
# Control socket, sd_notify and vfio-user over AF_UNIX; pyroute2 over netlink; no IP sockets.
RestrictAddressFamilies=AF_UNIX AF_NETLINK
SystemCallFilter=@system-service @mount
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
# ctypes callbacks (mfusepy) work without writable+executable memory: libffi falls back to a memfd.
MemoryDenyWriteExecute=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
ProtectClock=yes
ProtectHostname=yes
# No ProtectSystem=, ProtectHome=, PrivateTmp= or any other mount-namespace setting: mounts made
# inside one never reach the host, and the FUSE tree under /run/micdrv must (systemd.exec(5), MountFlags=).
# No RuntimeDirectory=: every card's daemon shares run_dir (/run/micdrv by default, configurable), and
# systemd would remove it, with the other cards' sockets and mounts in it, when one instance stops.
"""


def render(micdrv: str = DEFAULT_MICDRV) -> str:
    """The unit's text with ExecStart= running ``micdrv`` (an absolute path)."""
    if not micdrv.startswith("/"):
        raise ValueError(f"ExecStart needs an absolute path, not {micdrv!r}")
    if any(c.isspace() for c in micdrv) or "%" in micdrv:
        raise ValueError(f"{micdrv!r}: a path with spaces or '%' would need unit-file quoting; install elsewhere")
    return TEMPLATE.format(micdrv=micdrv, arena_mib=ARENA_BYTES >> 20, memlock_mib=MEMLOCK_BYTES >> 20)


def main(argv: list[str] | None = None) -> int:
    """``python -m micdrv.unit [--micdrv PATH] [--output FILE]``: print micdrv@.service."""
    p = argparse.ArgumentParser(prog="micctl unit", description="Print the systemd unit micdrv@.service.")
    p.add_argument("--micdrv", default=DEFAULT_MICDRV, help=f"the daemon's absolute path (default {DEFAULT_MICDRV})")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    args = p.parse_args(argv)
    try:
        text = render(args.micdrv)
    except ValueError as e:
        print(f"micctl unit: {e}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
