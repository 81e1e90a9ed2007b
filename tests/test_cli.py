"""micctl as an operator meets it: real host checks, clear errors, no tracebacks."""

import json
import subprocess
import sys

CHECK_NAMES = {"iommu", "vfio-pci", "/dev/vfio", "memlock", "/dev/net/tun", "fuse", "cards",
               "unit", "udev rules", "config", "micdrv on PATH"}


def micctl(*args):
    return subprocess.run([sys.executable, "-m", "micdrv.cli", *args], capture_output=True, text=True, timeout=60)


def test_doctor_reports_every_check_with_a_fix_for_each_failure():
    r = micctl("doctor", "--json")
    checks = json.loads(r.stdout)
    assert {c["name"] for c in checks} == CHECK_NAMES
    for c in checks:
        assert c["ok"] or c["fix"], f"{c['name']} failed without a fix"
    assert r.returncode == (0 if all(c["ok"] for c in checks) else 1)


def test_doctor_human_output_names_each_check():
    r = micctl("doctor")
    for name in CHECK_NAMES:
        assert name in r.stdout
    assert "Traceback" not in r.stderr


def test_bind_of_a_malformed_address_is_a_clear_error():
    r = micctl("bind", "not-a-bdf")
    assert r.returncode == 1
    assert "is not a PCI address" in r.stderr and "Traceback" not in r.stderr


def test_bind_of_an_absent_device_names_the_step():
    r = micctl("bind", "0000:7f:1f.7")
    assert r.returncode == 1
    assert "look up PCI device 0000:7f:1f.7 failed" in r.stderr and "ENODEV" in r.stderr


def test_no_command_prints_usage_and_exits_2():
    r = micctl()
    assert r.returncode == 2 and "usage" in r.stderr
