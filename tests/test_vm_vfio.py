"""The VM tier: micdrv's kernel VFIO path against a real Linux kernel.

One boot (tests/vm/harness.py) of Debian's kernel under QEMU/TCG runs
tests/vm/guest_edu.py, which binds QEMU's edu device to vfio-pci with
micdrv.pci.bind and drives it with micdrv.pci.vfio; each of its checks is one
test here. The boot takes 10-20 s.

Needs root, qemu-system-x86 and apt (for ``apt-get download`` of the kernel
and busybox-static). Where those are missing the tests skip, except under CI
(``CI`` set), where a tier that cannot run is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GUEST = HERE / "vm" / "guest_edu.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


harness = _load("micdrv_vm_harness", HERE / "vm" / "harness.py")
guest = _load("micdrv_vm_guest_edu", GUEST)

pytestmark = pytest.mark.vm


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


class _Unavailable:
    def __init__(self, why: str):
        self.why = why


@pytest.fixture(scope="module")
def edu_run():
    """Boot once for the whole module; a setup problem becomes a skip (or, in CI, a failure)."""
    if os.geteuid() != 0:
        return _Unavailable("needs root (the guest reads the host's files as the QEMU process's user)")
    try:
        return harness.run_guest(GUEST, timeout=harness.DEFAULT_TIMEOUT)
    except harness.VmUnavailable as e:
        return _Unavailable(str(e))


def _run_or_stop(edu_run):
    if isinstance(edu_run, _Unavailable):
        if _in_ci():
            pytest.fail(f"VM tier cannot run: {edu_run.why}", pytrace=False)
        pytest.skip(f"VM tier unavailable: {edu_run.why}")
    return edu_run


def _boot_report(run, tail: int = 6000) -> str:
    return (f"QEMU exit {run.qemu_rc}, {run.duration:.1f}s, timed out: {run.timed_out}, "
            f"guest rc {run.rc}, run dir {run.run_dir}\n--- guest output ---\n{run.output[-tail:]}"
            f"\n--- console (last {tail} chars) ---\n{run.console[-tail:]}")


def test_guest_program_finished(edu_run):
    run = _run_or_stop(edu_run)
    if not run.finished or run.timed_out:
        pytest.fail("the guest program did not finish\n" + _boot_report(run, 20000), pytrace=False)


def test_every_check_reported(edu_run):
    run = _run_or_stop(edu_run)
    names = [r.get("check") for r in run.json_lines()]
    assert names == list(guest.CHECKS), _boot_report(run)
    assert (run.rc == 0) == all(r.get("ok") for r in run.json_lines()), "exit status disagrees with the checks"


@pytest.mark.parametrize("name", list(guest.CHECKS))
def test_check(edu_run, name):
    run = _run_or_stop(edu_run)
    results = {r.get("check"): r for r in run.json_lines()}
    if name not in results:
        pytest.fail(f"check {name} was not reported\n" + _boot_report(run), pytrace=False)
    r = results[name]
    if not r.get("ok"):
        pytest.fail(f"check {name} failed in the guest:\n{r.get('detail')}\n"
                    f"--- guest kernel log (last 3000 chars) ---\n{run.dmesg[-3000:]}", pytrace=False)
