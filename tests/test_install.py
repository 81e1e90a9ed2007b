"""micctl install into a DESTDIR, the installed unit checked by systemd's own tools, doctor on the result."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from micdrv import config, default_config, doctor, install, udev, unit

REPO = Path(__file__).resolve().parent.parent
SETTING = re.compile(r"(?m)^#(?=[\[a-z])")       # a commented-out setting (default_config.py's convention)


def run_install(*args, env=None):
    cmd = [sys.executable, "-m", "micdrv.install", *args]
    e = dict(os.environ, PYTHONPATH=str(REPO))
    e.pop("DESTDIR", None)
    e.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=e)


def fake_micdrv(root: Path, path="/usr/bin/micdrv") -> str:
    exe = root / path.lstrip("/")
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return path


# --- the files ------------------------------------------------------------------------------------

def test_install_into_a_destdir_writes_every_file(tmp_path):
    r = run_install("--destdir", str(tmp_path), "--micdrv", "/usr/bin/micdrv")
    assert r.returncode == 0, r.stderr
    unit_file = tmp_path / "etc/systemd/system/micdrv@.service"
    rules_file = tmp_path / "etc/udev/rules.d/70-micdrv.rules"
    config_file = tmp_path / "etc/micdrv/micdrv.toml"
    assert unit_file.read_text() == unit.render("/usr/bin/micdrv")
    assert rules_file.read_text() == udev.rules() == (REPO / "udev/70-micdrv.rules").read_text()
    assert config_file.read_text() == default_config.TEXT
    for f in (unit_file, rules_file, config_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
        assert f"installed {f}" in r.stdout.splitlines()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == \
        ["70-micdrv.rules", "micdrv.toml", "micdrv@.service"], "stray files (temporaries?) left behind"
    # A destdir is a package build: the live system is not touched.
    assert "systemd:" not in r.stdout and "udev:" not in r.stdout


def test_DESTDIR_in_the_environment_is_the_destdir(tmp_path):
    r = run_install("--micdrv", "/usr/bin/micdrv", env={"DESTDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "etc/systemd/system/micdrv@.service").is_file()


def test_package_layout_options(tmp_path):
    r = run_install("--destdir", str(tmp_path), "--micdrv", "/usr/bin/micdrv", "--unit-dir", "/usr/lib/systemd/system",
                    "--rules-dir", "/usr/lib/udev/rules.d")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "usr/lib/systemd/system/micdrv@.service").is_file()
    assert (tmp_path / "usr/lib/udev/rules.d/70-micdrv.rules").is_file()


def test_installing_again_changes_nothing(tmp_path):
    install.install(str(tmp_path), micdrv="/usr/bin/micdrv")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    actions = install.install(str(tmp_path), micdrv="/usr/bin/micdrv")
    assert [a.what for a in actions] == ["unchanged"] * 3
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()} == before


def test_an_edited_configuration_is_never_overwritten(tmp_path):
    install.install(str(tmp_path), micdrv="/usr/bin/micdrv")
    cfg = tmp_path / "etc/micdrv/micdrv.toml"
    mine = '[card.mic0]\npci = "0000:03:00.0"\nboot_on_start = true\n'
    cfg.write_text(mine)
    actions = install.install(str(tmp_path), micdrv="/usr/bin/micdrv")
    assert cfg.read_text() == mine
    assert (tmp_path / "etc/micdrv/micdrv.toml.new").read_text() == default_config.TEXT
    assert [(Path(a.path).name, a.what) for a in actions[2:]] == [("micdrv.toml", "kept"),
                                                                   ("micdrv.toml.new", "new-default")]
    assert "has your changes" in str(actions[2])


def test_a_stale_unit_or_rules_file_is_replaced(tmp_path):
    install.install(str(tmp_path), micdrv="/usr/bin/micdrv")
    rules = tmp_path / "etc/udev/rules.d/70-micdrv.rules"
    rules.write_text(udev.rules().replace("0x225e", ""))
    actions = install.install(str(tmp_path), micdrv="/opt/micdrv/bin/micdrv")
    assert [a.what for a in actions] == ["updated", "updated", "unchanged"]
    assert rules.read_text() == udev.rules()
    assert "ExecStart=/opt/micdrv/bin/micdrv --device %I" in \
        (tmp_path / "etc/systemd/system/micdrv@.service").read_text()


def test_install_finds_this_environments_micdrv(tmp_path):
    exe = install.find_micdrv()
    assert os.path.isabs(exe) and os.access(exe, os.X_OK) and os.path.basename(exe) == "micdrv"
    install.install(str(tmp_path))
    assert f"ExecStart={exe} --device %I" in (tmp_path / "etc/systemd/system/micdrv@.service").read_text()


@pytest.mark.parametrize("args, message", [
    (["--micdrv", "bin/micdrv"], "absolute path"),
    (["--micdrv", "/usr/bin/mic drv"], "spaces"),
    (["--unit-dir", "lib/systemd"], "must be an absolute path"),
])
def test_bad_install_arguments_are_one_line_errors(tmp_path, args, message):
    r = run_install("--destdir", str(tmp_path), *args)
    assert r.returncode in (1, 2) and message in r.stderr and "Traceback" not in r.stderr


def test_installing_to_the_live_system_needs_a_real_micdrv():
    with pytest.raises(install.InstallError, match="not an executable"):
        install.install(None, micdrv="/nonexistent/micdrv")


def test_an_unwritable_destination_says_what_to_do(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    code = ("import os, sys; from micdrv import install; os.setgid(65534); os.setuid(65534)\n"
            "try:\n    install.install(sys.argv[1], micdrv='/usr/bin/micdrv')\n"
            "except install.InstallError as e:\n    print(e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ro)], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 3, r.stderr
    assert "cannot write" in r.stdout and "--destdir" in r.stdout


def test_activate_skips_what_is_not_running(tmp_path):
    # Neither systemd nor udevd runs on this machine (or in the private /run given here): both are skipped.
    lines = install.activate(run_dir=str(tmp_path))
    assert lines == ["systemd: not running here; skipped daemon-reload (start micdrv by hand)",
                     "udev: udevd not running here; skipped reloading the rules"]


# --- the unit, through systemd's tools -------------------------------------------------------------

def need(tool):
    assert shutil.which(tool), f"{tool} missing: apt-get install systemd (.ci/install does)"


def verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=120)


def test_the_installed_unit_passes_systemd_analyze_verify(tmp_path):
    need("systemd-analyze")
    install.install(str(tmp_path))          # ExecStart= this environment's micdrv, which verify checks exists
    r = verify(tmp_path / "etc/systemd/system/micdrv@.service")
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@pytest.mark.parametrize("change", [
    ("LimitMEMLOCK=256M", "LimitMEMLOCK=256Q"),
    ("DevicePolicy=closed", "DevicePolicy=shut"),
    ("ExecStart=", "ExecStart=/nonexistent/micdrv #"),
])
def test_verify_would_catch_a_broken_unit(tmp_path, change):
    """The check above can fail: the same unit with one bad line draws a diagnostic."""
    need("systemd-analyze")
    text = unit.render(install.find_micdrv())
    assert change[0] in text
    bad = tmp_path / "micdrv@.service"
    bad.write_text(text.replace(change[0], change[1], 1))
    r = verify(bad)
    assert r.stderr.strip(), f"verify accepted {change[1]!r}"


def security(path: Path) -> tuple[subprocess.CompletedProcess, dict[str, dict]]:
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--json=short", str(path)],
                       capture_output=True, text=True, timeout=120)
    return r, {item["name"]: item for item in json.loads(r.stdout)}


def test_systemd_rates_the_sandbox_and_it_holds_what_the_unit_claims(tmp_path):
    need("systemd-analyze")
    path = tmp_path / "micdrv@.service"
    path.write_text(unit.render(install.find_micdrv()))
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=45", str(path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-400:]
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout).group(1))
    assert exposure <= 4.5
    _, items = security(path)
    held = {n for n, i in items.items() if i["exposure"] in (None, 0, 0.0) or i.get("set") is True}
    for claim in ("NoNewPrivileges=", "CapabilityBoundingSet=~CAP_SYS_RAWIO", "CapabilityBoundingSet=~CAP_IPC_LOCK",
                  "CapabilityBoundingSet=~CAP_SYS_MODULE", "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)",
                  "RestrictAddressFamilies=~AF_(INET|INET6)", "RestrictAddressFamilies=~AF_PACKET",
                  "MemoryDenyWriteExecute=", "SystemCallArchitectures=", "RestrictNamespaces=~user",
                  "LockPersonality=", "RestrictSUIDSGID=", "ProtectClock=", "SystemCallFilter=~@raw-io",
                  "SystemCallFilter=~@module", "SystemCallFilter=~@debug"):
        assert claim in held, f"{claim}: {items[claim]}"
    # The settings left out on purpose: no mount namespace, so the FUSE tree reaches the host.
    for absent in ("ProtectSystem=", "PrivateTmp=", "PrivateMounts=", "ProtectHome="):
        assert absent not in held


def test_the_committed_unit_is_the_rendered_one():
    assert (REPO / "systemd" / unit.UNIT_NAME).read_text() == unit.render(), \
        "regenerate with: python -m micdrv.unit -o systemd/micdrv@.service"


def test_the_memlock_limit_covers_the_arena_with_headroom():
    text = unit.render()
    limit = int(re.search(r"^LimitMEMLOCK=(\d+)M$", text, re.M).group(1)) << 20
    assert limit == unit.MEMLOCK_BYTES >= 2 * doctor.ARENA_BYTES


def test_the_unit_never_asks_for_a_mount_namespace():
    # Every setting systemd implements with a mount namespace (exec_needs_mount_namespace, systemd.exec(5)).
    text = unit.render()
    settings = {line.split("=", 1)[0] for line in text.splitlines() if re.match(r"^[A-Z]\w*=", line)}
    namespaced = {"ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "ReadWritePaths",
                  "ReadOnlyPaths", "InaccessiblePaths", "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem",
                  "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
                  "ProtectProc", "ProcSubset", "MountFlags", "RootDirectory", "RootImage", "PrivateIPC",
                  "PrivateNetwork", "NetworkNamespacePath"}
    assert settings & namespaced == set()


MDWE_CHILD = """
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:         # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3)
    sys.exit(77)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("W+X memory was not refused: MDWE is not in force")
except OSError:
    pass
CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
arr = (ctypes.c_int * 4)(3, 1, 4, 2)
libc.qsort(arr, 4, ctypes.sizeof(ctypes.c_int), CMP(lambda a, b: a[0] - b[0]))
assert list(arr) == [1, 2, 3, 4]
import mfusepy
print("ok")
"""


def test_ctypes_callbacks_work_without_writable_executable_memory():
    """What MemoryDenyWriteExecute=yes rests on: mfusepy's ctypes callbacks under the kernel's own W^X."""
    r = subprocess.run([sys.executable, "-c", MDWE_CHILD], capture_output=True, text=True, timeout=60)
    if r.returncode == 77:
        pytest.skip("kernel without PR_SET_MDWE (before 6.3)")
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


# --- the default configuration --------------------------------------------------------------------

def test_the_default_configuration_as_installed_changes_nothing():
    cfg = config.loads(default_config.TEXT)
    assert dataclasses.replace(cfg, path=None) == config.Config()


def test_every_setting_in_the_default_configuration_is_valid_when_uncommented(tmp_path):
    path = tmp_path / "micdrv.toml"
    path.write_text(SETTING.sub("", default_config.TEXT))
    cfg = config.load(path)
    c = cfg.card("mic0")
    assert c.pci == "0000:03:00.0" and c.net and c.blk and c.console
    assert cfg.card("0000:03:00.0") == c


def documented_keys() -> set[str]:
    """Dotted keys of the uncommented default configuration, array indexes left out."""
    lines = config.key_lines(SETTING.sub("", default_config.TEXT))
    return {".".join(p for p in k if not isinstance(p, int)) for k in lines}


def test_every_key_of_the_configuration_reference_is_documented():
    keys = documented_keys()
    expected = {f"global.{k}" for k in config._GLOBAL_FIELDS}
    expected |= {f"defaults.{k}" for k in config._CARD_FIELDS} | {"defaults.heartbeat"}
    expected |= {f"card.mic0.{kind}.{k}" for kind, (_cls, fields, _req) in config.DEVICE_KINDS.items() for k in fields}
    expected |= {f"card.mic0.{kind}" for kind in config.DEVICE_KINDS} | {"card.mic0.pci"}
    missing = expected - keys
    assert not missing, f"add these to micdrv/default_config.py: {sorted(missing)}"
    text = default_config.TEXT
    for k in config._HEARTBEAT_FIELDS:
        assert re.search(rf"^#heartbeat = {{.*\b{k} = ", text, re.M), k


# --- doctor on an installation ------------------------------------------------------------------------

def test_doctor_on_a_complete_installation(tmp_path):
    exe = fake_micdrv(tmp_path)
    install.install(str(tmp_path), micdrv=exe)
    checks = doctor.install_checks(str(tmp_path), env_path="/usr/local/bin:/usr/bin")
    assert [(c.name, c.ok) for c in checks] == [("unit", True), ("ExecStart", True), ("udev rules", True),
                                                ("config", True), ("micdrv on PATH", True)]
    assert "cards: none configured" in checks[3].detail


def test_doctor_without_an_installation_gives_a_fix_for_each_gap(tmp_path):
    checks = doctor.install_checks(str(tmp_path), env_path="/usr/bin")
    assert [(c.name, c.ok) for c in checks] == [("unit", False), ("udev rules", False), ("config", False),
                                                ("micdrv on PATH", False)]
    assert all(c.fix for c in checks)
    assert checks[0].fix == checks[1].fix == "micctl install"


def test_doctor_names_the_line_of_a_broken_configuration(tmp_path):
    install.install(str(tmp_path), micdrv=fake_micdrv(tmp_path))
    (tmp_path / "etc/micdrv/micdrv.toml").write_text('[card.mic0]\npci = "0000:03:00.0"\nbootmode = "linx"\n')
    c = {c.name: c for c in doctor.install_checks(str(tmp_path), env_path="/usr/bin")}["config"]
    assert not c.ok and ":3: card.mic0.bootmode" in c.detail and c.fix.endswith("at line 3")


def test_doctor_spots_stale_rules_an_edited_unit_and_a_missing_executable(tmp_path):
    install.install(str(tmp_path), micdrv="/usr/bin/micdrv")       # no executable there under this root
    (tmp_path / "etc/udev/rules.d/70-micdrv.rules").write_text(udev.rules().replace("|0x225e", ""))
    unit_file = tmp_path / "etc/systemd/system/micdrv@.service"
    unit_file.write_text(unit_file.read_text().replace("WatchdogSec=30s", "WatchdogSec=0"))
    checks = {c.name: c for c in doctor.install_checks(str(tmp_path), env_path="/usr/bin")}
    assert not checks["udev rules"].ok and "out of date" in checks["udev rules"].detail
    assert not checks["unit"].ok and "drop-in" in checks["unit"].detail
    assert not checks["ExecStart"].ok and "/usr/bin/micdrv" in checks["ExecStart"].detail


def test_doctor_finds_units_and_rules_where_a_package_puts_them(tmp_path):
    install.install(str(tmp_path), install.Layout("/usr/lib/systemd/system", "/usr/lib/udev/rules.d"),
                    micdrv=fake_micdrv(tmp_path))
    checks = {c.name: c for c in doctor.install_checks(str(tmp_path), env_path="/usr/bin")}
    assert checks["unit"].ok and "/usr/lib/systemd/system/" in checks["unit"].detail
    assert checks["udev rules"].ok and "/usr/lib/udev/rules.d/" in checks["udev rules"].detail


def test_doctor_command_checks_a_root_and_says_so_in_json(tmp_path):
    install.install(str(tmp_path), micdrv=fake_micdrv(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH="/usr/bin:/bin")
    r = subprocess.run([sys.executable, "-m", "micdrv.doctor", "--root", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=60, env=env)
    checks = json.loads(r.stdout)
    assert r.returncode == 0 and {c["name"] for c in checks} == {"unit", "ExecStart", "udev rules", "config",
                                                                   "micdrv on PATH"}
    r = subprocess.run([sys.executable, "-m", "micdrv.doctor", "--root", str(tmp_path / "empty")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and "fix: micctl install" in r.stdout and "Traceback" not in r.stderr


def test_doctor_on_this_host_runs_host_and_installation_checks():
    r = subprocess.run([sys.executable, "-m", "micdrv.doctor", "--json"], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    names = [c["name"] for c in json.loads(r.stdout)]
    assert names[:7] == ["iommu", "vfio-pci", "/dev/vfio", "memlock", "/dev/net/tun", "fuse", "cards"]
    assert names[7:] and "udev rules" in names


def test_memlock_check_without_CAP_IPC_LOCK_compares_the_limit_with_the_arena():
    need("capsh")
    code = "from micdrv import doctor; c = doctor._memlock(); print(c.ok, c.detail)"
    r = subprocess.run(["capsh", "--drop=cap_ipc_lock", "--", "-c", f"ulimit -l 1024 && exec {sys.executable} -c '{code}'"],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.stdout.startswith("False RLIMIT_MEMLOCK is 1048576 bytes"), r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.stdout.startswith("True CAP_IPC_LOCK"), r.stdout + r.stderr      # root outside the unit
    # The unit's limit is enough without the capability (raising a limit here may not be allowed).
    assert doctor.memlock_check(unit.MEMLOCK_BYTES, ipc_lock=False).ok
    assert not doctor.memlock_check(doctor.ARENA_BYTES - 4096, ipc_lock=False).ok
