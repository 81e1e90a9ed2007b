"""The udev rules, matched by the real udev against every X100 ID and against devices that are not cards.

There is no X100 here, so the cards are a fake sysfs tree (uevent, vendor,
device, driver_override, the subsystem link, /sys/bus/pci/drivers_probe)
mounted over /sys in a private mount namespace, and ``udevadm test`` runs the
rules -- ours plus every rules file the udev package installs -- against it,
exactly as on a host: its matcher, its ``$kernel`` substitution, its
attribute writes (which land in the fake tree and are read back). Real
non-card PCI devices on this machine are tested against a read-only /sys in
the same kind of namespace. ``SYSTEMD_DEVICE_VERIFY_SYSFS=0`` is what lets
sd-device accept a tree that is not sysfs (systemd's own tests use it); a
tmpfs over /run keeps udevadm's database writes out of the host's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from micdrv import udev
from micdrv.x100 import ids

REPO = Path(__file__).resolve().parent.parent
BANNER = "some values may be different, or not available at a simulation run."

pytestmark = pytest.mark.root


def need_tools():
    missing = [t for t in ("udevadm", "unshare", "systemd-escape") if shutil.which(t) is None]
    assert not missing, f"{', '.join(missing)} missing: apt-get install udev systemd util-linux (.ci/install does)"
    assert os.geteuid() == 0, "udevadm test in a private mount namespace needs root"


@dataclass
class FakeDevice:
    bdf: str
    vendor: int
    device: int
    pci_class: int = 0x0B4000        # co-processor, what an X100 reports
    parent: str | None = None        # a bridge's address, for a card behind a root port

    def devpath(self) -> str:
        parts = ["/devices/pci0000:00"] + ([self.parent] if self.parent else []) + [self.bdf]
        return "/".join(parts)


def build_sysfs(root: Path, devices: list[FakeDevice]) -> None:
    """The part of sysfs udev reads for a PCI device (and its bridge), as the kernel lays it out."""
    (root / "bus/pci/drivers").mkdir(parents=True)
    (root / "bus/pci/devices").mkdir()
    (root / "bus/pci/drivers_probe").write_text("")
    bridges = {d.parent for d in devices if d.parent}
    everything = devices + [FakeDevice(b, 0x8086, 0x3C02, 0x060400) for b in sorted(bridges)]
    for d in everything:
        path = root / d.devpath().lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        (path / "uevent").write_text(
            f"PCI_CLASS={d.pci_class:X}\nPCI_ID={d.vendor:04X}:{d.device:04X}\nPCI_SUBSYS_ID=8086:2500\n"
            f"PCI_SLOT_NAME={d.bdf}\nMODALIAS=pci:v{d.vendor:08X}d{d.device:08X}sv00008086sd00002500"
            f"bc{d.pci_class >> 16:02X}sc{(d.pci_class >> 8) & 0xFF:02X}i{d.pci_class & 0xFF:02X}\n")
        for attr, value in (("vendor", d.vendor), ("device", d.device), ("subsystem_vendor", 0x8086),
                            ("subsystem_device", 0x2500)):
            (path / attr).write_text(f"{value:#06x}\n")
        (path / "class").write_text(f"{d.pci_class:#08x}\n")
        (path / "revision").write_text("0x20\n")
        (path / "driver_override").write_text("(null)\n")
        depth = d.devpath().count("/")
        os.symlink("../" * depth + "bus/pci", path / "subsystem")
        os.symlink("../../.." + d.devpath(), root / "bus/pci/devices" / d.bdf)


@dataclass
class UdevResult:
    properties: dict[str, str]
    runs: list[str]
    writes: list[tuple[str, str]]    # (sysfs path, value) written by our rules file
    log: str
    probe_written: str                # what reached /sys/bus/pci/drivers_probe


def run_udevadm(tmp_path: Path, runs: list[tuple[str, str]], fake_root: Path | None) -> list[UdevResult]:
    """``udevadm test --action=A SYSPATH`` for each (action, syspath), in one private mount namespace."""
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / udev.RULES_NAME).write_text(udev.rules())
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    lines = [
        "set -e",
        "mount -t tmpfs tmpfs /run",                      # udev's database and runtime rules: private
        "mkdir -p /run/udev/rules.d",
        f"cp {shlex.quote(str(rules / udev.RULES_NAME))} /run/udev/rules.d/",
        "if [ -d /etc/udev/rules.d ]; then mount -t tmpfs tmpfs /etc/udev/rules.d; fi",  # no local overrides
        f"mount --bind {shlex.quote(str(fake_root))} /sys" if fake_root else "mount -o remount,bind,ro /sys",
        "export SYSTEMD_DEVICE_VERIFY_SYSFS=0",
        "set +e",
    ]
    for n, (action, syspath) in enumerate(runs):
        o = shlex.quote(str(out / str(n)))
        lines.append(f"udevadm test --action={action} {shlex.quote(syspath)} >{o}.out 2>{o}.err; echo $? >{o}.rc")
        if fake_root:
            lines.append(f"cat /sys/bus/pci/drivers_probe >{o}.probe; : >/sys/bus/pci/drivers_probe")
    script = tmp_path / "run.sh"
    script.write_text("\n".join(lines) + "\n")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", str(script)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    results = []
    ours = f"/run/udev/rules.d/{udev.RULES_NAME}"
    for n, (action, syspath) in enumerate(runs):
        stdout = (out / f"{n}.out").read_text()
        stderr = (out / f"{n}.err").read_text()
        rc = (out / f"{n}.rc").read_text().strip()
        assert rc == "0", f"udevadm test {action} {syspath} exited {rc}:\n{stderr}"
        assert f"Reading rules file: {ours}" in stderr, "udevadm did not read our rules file"
        props_text = stdout.split(BANNER, 1)[1] if BANNER in stdout else stdout
        props = dict(line.split("=", 1) for line in props_text.splitlines()
                     if re.match(r"^[A-Z_][A-Z0-9_]*=", line))
        runs_ = re.findall(r"^run: '(.*)'$", stdout, re.M)
        writes = re.findall(rf"{re.escape(ours)}:\d+ ATTR '([^']*)' writing '([^']*)'", stderr)
        probe = (out / f"{n}.probe").read_text() if fake_root else ""
        results.append(UdevResult(props, runs_, writes, stderr, probe))
    return results


def card_devices() -> list[FakeDevice]:
    cards = [FakeDevice(f"0000:{0x10 + i:02x}:00.0", ids.INTEL_VENDOR_ID, dev)
             for i, dev in enumerate(sorted(ids.X100_DEVICE_IDS))]
    cards.append(FakeDevice("0000:05:00.0", ids.INTEL_VENDOR_ID, 0x2250, parent="0000:00:01.0"))
    return cards


NOT_CARDS = [
    FakeDevice("0000:30:00.0", 0x8086, 0x224F),     # just below the X100 range
    FakeDevice("0000:31:00.0", 0x8086, 0x225F),     # just above it
    FakeDevice("0000:32:00.0", 0x8086, 0x2260),
    FakeDevice("0000:33:00.0", 0x8086, 0x2262),     # Knights Landing coprocessor: not X100
    FakeDevice("0000:34:00.0", 0x1AF4, 0x2250),     # an X100 device ID under another vendor
    FakeDevice("0000:35:00.0", 0x8086, 0x0250),
]


@pytest.fixture(scope="module")
def fake_results(tmp_path_factory):
    need_tools()
    tmp = tmp_path_factory.mktemp("udev")
    devices = card_devices() + NOT_CARDS
    build_sysfs(tmp / "sys", devices)
    runs = [("add", "/sys" + d.devpath()) for d in devices]
    first = "/sys" + devices[0].devpath()
    runs += [("change", first), ("bind", first), ("remove", first)]
    results = run_udevadm(tmp, runs, tmp / "sys")
    by_add = {d.bdf: r for d, r in zip(devices, results)}
    return tmp / "sys", by_add, dict(zip(("change", "bind", "remove"), results[len(devices):]))


def test_the_committed_rules_are_the_generated_ones():
    assert (REPO / "udev" / udev.RULES_NAME).read_text() == udev.rules(), \
        "regenerate with: python -m micdrv.udev -o udev/70-micdrv.rules"


def test_the_rules_name_all_fifteen_ids_and_nothing_else():
    found = {int(x, 16) for x in udev.device_pattern().split("|")}
    assert found == set(ids.X100_DEVICE_IDS) == set(range(0x2250, 0x225F))


@pytest.mark.parametrize("card", card_devices(), ids=lambda d: f"{d.device:#06x}@{d.bdf}")
def test_udev_hands_every_x100_to_vfio_pci_and_wants_its_daemon(fake_results, card):
    sysroot, by_add, _ = fake_results
    r = by_add[card.bdf]
    assert "systemd" in r.properties["CURRENT_TAGS"].split(":")
    assert r.properties["SYSTEMD_WANTS"] == f"micdrv@{card.bdf}.service"
    assert r.properties["SYSTEMD_ALIAS"] == f"/sys/subsystem/pci/devices/{card.bdf}"
    # The writes, in udev's order, and what reached the (fake) kernel files.
    assert r.writes == [(f"/sys{card.devpath()}/driver_override", "vfio-pci"),
                        ("/sys/bus/pci/drivers_probe", card.bdf)]
    assert (sysroot / card.devpath().lstrip("/") / "driver_override").read_text() == "vfio-pci"
    assert r.probe_written == card.bdf
    assert r.runs[0] == "kmod load vfio-pci"


@pytest.mark.parametrize("dev", NOT_CARDS, ids=lambda d: f"{d.vendor:04x}:{d.device:04x}")
def test_udev_leaves_devices_that_are_not_x100_alone(fake_results, dev):
    sysroot, by_add, _ = fake_results
    r = by_add[dev.bdf]
    assert "micdrv" not in " ".join(f"{k}={v}" for k, v in r.properties.items())
    assert "systemd" not in r.properties.get("CURRENT_TAGS", "").split(":")
    assert r.writes == [] and r.probe_written == ""
    assert "kmod load vfio-pci" not in r.runs
    assert (sysroot / dev.devpath().lstrip("/") / "driver_override").read_text() == "(null)\n"


def test_later_events_keep_the_tag_and_the_wants_but_bind_nothing(fake_results):
    _, _, later = fake_results
    bdf = card_devices()[0].bdf
    for action in ("change", "bind"):
        r = later[action]
        assert "systemd" in r.properties["CURRENT_TAGS"].split(":"), action
        assert r.properties["SYSTEMD_WANTS"] == f"micdrv@{bdf}.service"
        assert r.writes == [] and r.probe_written == "" and "kmod load vfio-pci" not in r.runs, action
    # remove: the rules stop at once (the properties udevadm prints come from the add event's database entry).
    r = later["remove"]
    assert r.writes == [] and r.probe_written == "" and "kmod load vfio-pci" not in r.runs


def test_the_alias_names_the_device_unit_the_service_binds_to(fake_results):
    """systemd's own escaping of the alias udev set gives the unit micdrv@<address>.service's BindsTo= names."""
    _, by_add, _ = fake_results
    card = card_devices()[-1]                     # behind a bridge: the alias, not the sysfs path, is what counts
    alias = by_add[card.bdf].properties["SYSTEMD_ALIAS"]
    escaped = subprocess.run(["systemd-escape", "--path", "--suffix=device", alias], capture_output=True,
                             text=True, check=True).stdout.strip()
    instance = subprocess.run(["systemd-escape", card.bdf], capture_output=True, text=True,
                              check=True).stdout.strip()
    unit = (REPO / "systemd" / "micdrv@.service").read_text()
    binds = re.search(r"^BindsTo=(\S+)$", unit, re.M).group(1)
    assert binds.replace("%i", instance) == escaped == f"sys-subsystem-pci-devices-{card.bdf}.device"


def test_real_pci_devices_on_this_machine_are_not_matched(tmp_path):
    need_tools()
    real = []
    for d in sorted(Path("/sys/bus/pci/devices").iterdir()):
        vendor, device = (int((d / a).read_text(), 16) for a in ("vendor", "device"))
        if not ids.is_x100(vendor, device):
            real.append(str(d.resolve()))
    if not real:
        pytest.skip("this machine has no PCI devices")
    results = run_udevadm(tmp_path, [("add", p) for p in real], None)
    for path, r in zip(real, results):
        assert r.properties.get("DEVPATH") == path[len("/sys"):], path
        assert "SYSTEMD_WANTS" not in r.properties or "micdrv" not in r.properties["SYSTEMD_WANTS"], path
        assert r.writes == [] and "kmod load vfio-pci" not in r.runs, path


def test_the_generator_command_writes_and_checks(tmp_path):
    out = tmp_path / "r.rules"
    assert udev.main(["-o", str(out)]) == 0
    assert out.read_text() == udev.rules()
    assert udev.main(["--check", str(out)]) == 0
    out.write_text(udev.rules().replace("0x225e", "0x225f"))
    assert udev.main(["--check", str(out)]) == 1
    assert udev.main(["--check", str(tmp_path / "absent")]) == 1
