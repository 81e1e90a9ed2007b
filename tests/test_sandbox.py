"""micdrv@.service's sandbox admits what the driver does, checked without systemd as PID 1.

systemd is not the init here, so the unit cannot be started. What can be done
with the real mechanisms: run the driver's work with the unit's capability
bounding set and NoNewPrivileges (setpriv, which sets them the way systemd
does for a root service) and the kernel's W^X (PR_SET_MDWE, what
MemoryDenyWriteExecute= asks for) under strace, and compare every system
call and socket family it used with the unit's SystemCallFilter= (expanded by
``systemd-analyze syscall-filter``) and RestrictAddressFamilies=. Two
workloads: tests/sandbox_workload.py (FUSE mount, tap and netlink, pty,
control socket, in a network namespace the test makes) and the driver
against the simulated card (the x100 DMA and SCIF tests). A control test
shows the harness is not a no-op: what the sandbox forbids fails inside it.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from micdrv import unit

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.root

MDWE_EXEC = ("import ctypes, os, sys\n"
             "if ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) != 0: sys.exit('PR_SET_MDWE failed (Linux >= 6.3)')\n"
             "os.execv(sys.argv[1], sys.argv[1:])\n")


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.render().splitlines():
        m = re.match(r"^([A-Z]\w*)=(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


@functools.cache
def expand(group: str) -> frozenset[str]:
    """A system call set as systemd defines it (``systemd-analyze syscall-filter @group``), nested sets included."""
    text = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    calls: set[str] = set()
    for line in text.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= expand(item) if item.startswith("@") else {item}
    return frozenset(calls)


def allowed_syscalls() -> set[str]:
    calls: set[str] = set()
    for value in settings()["SystemCallFilter"]:
        assert not value.startswith("~"), "the filter is an allow list"
        for item in value.split():
            calls |= expand(item) if item.startswith("@") else {item}
    return calls


def bounding_set() -> str:
    caps = settings()["CapabilityBoundingSet"][0].split()
    return "-all," + ",".join("+" + c.lower().removeprefix("cap_") for c in caps)


def sandboxed(argv: list[str]) -> list[str]:
    """``argv`` with the unit's bounding set, NoNewPrivileges and W^X memory."""
    assert settings()["NoNewPrivileges"] == ["yes"] and settings()["MemoryDenyWriteExecute"] == ["yes"]
    return ["setpriv", "--no-new-privs", f"--bounding-set={bounding_set()}",
            sys.executable, "-c", MDWE_EXEC, *argv]


def traced(argv: list[str], trace: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["strace", "-f", "-qq", "-s", "0", "-o", str(trace), *argv], capture_output=True,
                          text=True, **kw)


def calls_and_families(trace: Path) -> tuple[set[str], set[str]]:
    calls, families = set(), set()
    for line in trace.read_text().splitlines():
        m = re.match(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)(?:\(| resumed>)", line)
        if m:
            calls.add(m.group(1))
        m = re.match(r"^\d+\s+socket(?:pair)?\((AF_\w+|\d+)", line)
        if m:
            families.add(m.group(1))
    return calls, families


def need_tools():
    missing = [t for t in ("strace", "setpriv", "systemd-analyze", "ip") if shutil.which(t) is None]
    assert not missing, f"{', '.join(missing)} missing (.ci/install installs them)"
    assert os.geteuid() == 0


def check_trace(trace: Path) -> None:
    calls, families = calls_and_families(trace)
    assert len(calls) > 30, "the trace caught almost nothing"
    outside = calls - allowed_syscalls()
    assert not outside, f"system calls the unit's SystemCallFilter= would refuse: {sorted(outside)}"
    allowed_families = set(settings()["RestrictAddressFamilies"][0].split())
    assert families <= allowed_families, f"socket families outside RestrictAddressFamilies=: {families}"


@pytest.fixture
def netns():
    name = f"micdrv-sb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=60)
    yield name
    subprocess.run(["ip", "netns", "del", name], timeout=60)


def test_the_host_side_work_fits_the_sandbox(tmp_path, netns):
    need_tools()
    trace = tmp_path / "trace"
    r = traced(["ip", "netns", "exec", netns, *sandboxed([sys.executable, str(REPO / "tests/sandbox_workload.py")])],
               trace, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr[-3000:]
    check_trace(trace)
    calls, families = calls_and_families(trace)
    assert {"mount", "umount2", "ioctl"} <= calls and {"AF_NETLINK", "AF_UNIX"} <= families


def test_the_driver_against_the_simulated_card_fits_the_sandbox(tmp_path):
    need_tools()
    trace = tmp_path / "trace"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=600",
            str(REPO / "tests/test_x100_dma.py"), str(REPO / "tests/test_scif.py")]
    r = traced(sandboxed(argv), trace, timeout=900, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    check_trace(trace)


CONTROL = """
import mmap, os
st = open("/proc/self/status").read()
assert "NoNewPrivs:\\t1" in st, "no_new_privs not set"
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    raise SystemExit("W+X mapping allowed")
except PermissionError:
    pass
try:
    open(os.environ["LOCKED"]).read()          # mode 000, not ours: needs CAP_DAC_OVERRIDE
    raise SystemExit("CAP_DAC_OVERRIDE still held")
except PermissionError:
    pass
os.chown(os.environ["OURS"], -1, 65534)        # CAP_CHOWN is kept
print("ok")
"""


def test_the_harness_really_applies_the_limits(tmp_path):
    need_tools()
    locked, ours = tmp_path / "locked", tmp_path / "ours"
    locked.write_text("secret")
    os.chown(locked, 65534, 65534)
    locked.chmod(0)
    ours.write_text("")
    tmp_path.chmod(0o755)
    env = dict(os.environ, LOCKED=str(locked), OURS=str(ours))
    assert subprocess.run([sys.executable, "-c", f"open({str(locked)!r}).read()"], timeout=60).returncode == 0
    r = subprocess.run(sandboxed([sys.executable, "-c", CONTROL]), capture_output=True, text=True, timeout=60, env=env)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


def test_the_filter_sets_resolve_to_what_the_driver_needs():
    need_tools()
    calls = allowed_syscalls()
    # ioctl (VFIO, tun), mmap (BARs), eventfd2 (MSI-X), memfd_create (the arena), mount/umount2 (FUSE).
    assert {"ioctl", "mmap", "eventfd2", "memfd_create", "mount", "umount2", "sendmsg", "fchown"} <= calls
    assert not {"init_module", "kexec_load", "ptrace", "iopl", "ioperm"} & calls
