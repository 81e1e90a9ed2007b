"""Boot Debian's kernel under QEMU (TCG) and run a Python program inside it.

This is the VM test tier (see README.md beside this file). It exists so the
kernel VFIO code path (:mod:`micdrv.pci.vfio`, :mod:`micdrv.pci.bind`) is
tested against a real Linux kernel with a real vfio-pci driver and an
emulated IOMMU, on machines that have no VFIO-capable device and no KVM.

What it does, host side:

1. Resolve the kernel package ``linux-image-amd64`` depends on, fetch it and
   ``busybox-static`` with ``apt-get download`` into a cache directory and
   unpack them with ``dpkg-deb -x`` (nothing is installed on the host).
2. Build an initramfs (newc cpio, written here) with busybox, an ``/init``
   script and the kernel modules for virtio-9p and VFIO, in dependency order
   read from each module's ``.modinfo`` ELF section (the package ships no
   modules.dep).
3. Boot ``qemu-system-x86_64 -machine q35 -accel tcg`` with an emulated Intel
   IOMMU (interrupt remapping on: type1 SET_IOMMU needs it), QEMU's ``edu``
   device alone behind a PCIe root port (so it can be reset), two virtio-rng
   devices a host driver owns, the host root shared read-only over 9p and a writable
   9p share (the run directory) for results.

Guest side, ``/init`` loads the modules, mounts both shares and runs the
per-run script the host wrote into the results share. That script mounts
proc/sys/devtmpfs inside the read-only host root, then runs the program with
the host's own Python in ``chroot /host`` with the checkout on PYTHONPATH,
and writes its exit status and output into the results share before the VM
powers off. The host enforces a timeout and kills QEMU when it expires.

Run by hand::

    python -m tests.vm.harness tests/vm/guest_edu.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import shlex
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Where the edu device sits in the guest: alone on the bus behind a root port at 00:03.0.
EDU_BDF = "0000:01:00.0"
#: A virtio-rng device on the root bus, owned by virtio-pci until a test takes it.
OTHER_BDF = "0000:00:04.0"
#: Two functions of a multifunction virtio-rng, one IOMMU group between them.
PAIR_BDFS = ("0000:00:05.0", "0000:00:05.1")

#: Host-side limit on one boot, from QEMU start to its exit.
DEFAULT_TIMEOUT = 180.0

#: Modules loaded in the guest, with everything their ``depends=`` pulls in.
#: 9p over virtio for the shares; vfio-pci and the type1 IOMMU backend (vfio
#: only names type1 as a softdep, so it is listed explicitly).
ROOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "vfio_pci", "vfio_iommu_type1")

#: Kernel command line. intel_iommu=on turns the emulated VT-d on (Debian's
#: kernel leaves it off by default); there is no VFIO no-IOMMU mode in
#: Debian's kernel, so the IOMMU is what makes /dev/vfio/<group> exist.
KERNEL_CMDLINE = "console=ttyS0 intel_iommu=on panic=-1 loglevel=4 rdinit=/init"

# Markers the guest prints on the serial console (for humans reading the log
# and for the host to tell how far a failed boot got).
MARK = "MICDRV-VM:"


class VmUnavailable(RuntimeError):
    """Something the tier needs is missing on this host (qemu, apt, root, ...)."""


class VmError(RuntimeError):
    """The VM booted but did not run the program to the end; carries the console log."""

    def __init__(self, msg: str, console: str = ""):
        self.console = console
        super().__init__(f"{msg}\n--- console (last 12000 chars) ---\n{console[-12000:]}" if console else msg)


@dataclasses.dataclass
class VmRun:
    """What came back from one boot."""

    rc: int | None  # the guest program's exit status; None if it never finished
    output: str  # the guest program's stdout and stderr
    console: str  # the serial console (kernel log, /init markers) and QEMU's own stderr
    dmesg: str  # the guest kernel's whole log, taken after the program ended
    duration: float  # seconds from QEMU start to exit
    timed_out: bool
    qemu_rc: int | None
    run_dir: Path

    @property
    def finished(self) -> bool:
        return self.rc is not None

    def json_lines(self) -> list[dict]:
        """Every output line that is a JSON object (how guest programs report checks)."""
        out = []
        for line in self.output.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    out.append(obj)
        return out


def log(msg: str) -> None:
    print(f"[vm] {msg}", file=sys.stderr, flush=True)


# --- host prerequisites ---------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("MICDRV_VM_CACHE") or REPO / ".cache" / "vm")


def find_qemu() -> str:
    qemu = os.environ.get("MICDRV_VM_QEMU") or "qemu-system-x86_64"
    found = shutil.which(qemu)
    if not found:
        raise VmUnavailable(f"{qemu} not found (apt-get install qemu-system-x86)")
    return found


def _run(argv: list[str], step: str, cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise VmUnavailable(f"{step}: {argv[0]} not found (is this a Debian/Ubuntu host with apt and dpkg?)") from None
    if r.returncode != 0:
        raise VmUnavailable(f"{step}: {' '.join(argv)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def resolve_kernel_package() -> str:
    """The ``linux-image-<version>-amd64`` the ``linux-image-amd64`` metapackage depends on."""
    override = os.environ.get("MICDRV_VM_KERNEL_PKG")
    if override:
        return override
    hint = "apt has no package lists yet? run 'apt-get update' first"
    try:
        out = _run(["apt-cache", "depends", "linux-image-amd64"], "resolve the Debian kernel package")
    except VmUnavailable as e:
        raise VmUnavailable(f"{e}\n({hint})") from None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            pkg = line.split(":", 1)[1].strip().strip("<>")
            if pkg.startswith("linux-image-"):
                return pkg
    raise VmUnavailable(f"apt-cache knows no linux-image-amd64 dependency ({hint}); "
                        f"apt-cache said: {out.strip() or 'nothing'}")


def fetch_deb(pkg: str, debs: Path) -> Path:
    """``apt-get download`` one package into ``debs`` (reused when already there)."""
    debs.mkdir(parents=True, exist_ok=True)
    name = pkg.split("=")[0]
    have = sorted(debs.glob(f"{name}_*.deb"))
    if have:
        return have[-1]
    log(f"apt-get download {pkg}")
    try:
        # As root apt drops to the _apt user to download and warns when that
        # user cannot write the cache directory; it then downloads as root.
        _run(["apt-get", "download", "-q", pkg], f"download {pkg}", cwd=debs)
    except VmUnavailable as e:
        raise VmUnavailable(f"{e}\n(apt-get download needs package lists: run 'apt-get update' first)") from None
    have = sorted(debs.glob(f"{name}_*.deb"))
    if not have:
        raise VmUnavailable(f"apt-get download {pkg} left no {name}_*.deb in {debs}")
    return have[-1]


# --- kernel modules -------------------------------------------------------------

def read_ko(path: Path) -> bytes:
    """A module's ELF bytes, decompressing .ko.xz/.ko.gz/.ko.zst."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        r = subprocess.run(["zstd", "-dc"], input=data, capture_output=True)
        if r.returncode != 0:
            raise VmUnavailable(f"cannot decompress {path}: zstd: {r.stderr.decode(errors='replace').strip()}")
        return r.stdout
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize)
        return name, offset, size

    _n, stroff, _s = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in elf[offset:offset + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    info.setdefault(k, []).append(v)
            return info
    return {}


def _modname(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".gz", ".zst"):
        name = name.removesuffix(suffix)
    return name.removesuffix(".ko").replace("-", "_")


def module_closure(moddir: Path, roots: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """``roots`` and their ``depends=``, dependencies first, as (name, ELF bytes)."""
    index = {_modname(p): p for p in moddir.rglob("*.ko*")}
    loaded: dict[str, bytes] = {}
    order: list[tuple[str, bytes]] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in loaded:
            return
        if name in visiting:
            raise VmUnavailable(f"module dependency cycle through {name}")
        path = index.get(name)
        if path is None:
            builtin = moddir / "modules.builtin"
            if builtin.exists() and any(_modname(Path(l)) == name for l in builtin.read_text().split()):
                return  # built into the kernel
            raise VmUnavailable(f"kernel module {name} not found under {moddir}")
        visiting.add(name)
        elf = read_ko(path)
        for dep in ",".join(modinfo(elf).get("depends", [""])).split(","):
            if dep:
                visit(dep)
        visiting.discard(name)
        loaded[name] = elf
        order.append((name, elf))

    for r in roots:
        visit(r)
    return order


# --- the cached kernel + busybox ------------------------------------------------

@dataclasses.dataclass
class Kernel:
    version: str
    vmlinuz: Path
    initramfs: Path


def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def prepare_kernel(cache: Path | None = None) -> tuple[Path, Path, list[str]]:
    """Fetch + unpack the kernel once; keep vmlinuz and the needed modules.

    Returns (vmlinuz, module dir holding ``<name>.ko`` decompressed, load order).
    """
    cache = cache or cache_dir()
    pkg = None
    try:
        pkg = resolve_kernel_package()
    except VmUnavailable:
        # Offline re-run: any kernel already prepared will do.
        done = sorted(cache.glob("kernel-*/manifest.json"))
        if not done:
            raise
        pkg = json.loads(done[-1].read_text())["package"]
    kdir = cache / f"kernel-{pkg}"
    manifest = kdir / "manifest.json"
    want = {"package": pkg, "roots": list(ROOT_MODULES)}
    if manifest.exists():
        m = json.loads(manifest.read_text())
        if {k: m.get(k) for k in want} == want:
            return kdir / "vmlinuz", kdir / "modules", m["order"]
    deb = fetch_deb(pkg, cache / "debs")
    log(f"unpacking {deb.name}")
    with tempfile.TemporaryDirectory(dir=cache, prefix="unpack-") as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], f"unpack {deb.name}")
        boot = Path(tmp, "boot")
        vmlinuz = sorted(boot.glob("vmlinuz-*"))
        moddirs = sorted(Path(tmp, "lib", "modules").glob("*")) or sorted(Path(tmp, "usr", "lib", "modules").glob("*"))
        if not vmlinuz or not moddirs:
            raise VmUnavailable(f"{deb.name} holds no /boot/vmlinuz-* or /lib/modules/<version>")
        mods = module_closure(moddirs[-1], ROOT_MODULES)
        if kdir.exists():
            shutil.rmtree(kdir)
        (kdir / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[-1], kdir / "vmlinuz")
        for name, elf in mods:
            (kdir / "modules" / f"{name}.ko").write_bytes(elf)
        order = [n for n, _ in mods]
        manifest.write_text(json.dumps({**want, "version": moddirs[-1].name, "order": order}, indent=1))
    return kdir / "vmlinuz", kdir / "modules", order


def prepare_busybox(cache: Path | None = None) -> Path:
    cache = cache or cache_dir()
    target = cache / "busybox"
    if target.exists():
        return target
    deb = fetch_deb("busybox-static", cache / "debs")
    with tempfile.TemporaryDirectory(dir=cache, prefix="unpack-") as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], f"unpack {deb.name}")
        for cand in ("bin/busybox", "usr/bin/busybox"):
            p = Path(tmp, cand)
            if p.exists():
                shutil.copy2(p, target.with_suffix(".tmp"))
                os.replace(target.with_suffix(".tmp"), target)
                return target
    raise VmUnavailable(f"{deb.name} holds no busybox binary")


# --- initramfs ------------------------------------------------------------------

class Cpio:
    """A newc ("070701") cpio archive, the format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        nameb = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0)
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + nameb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


INIT = r"""#!/bin/busybox sh
# micdrv VM tier /init (generated by tests/vm/harness.py).
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "@MARK@ init started, kernel $(uname -r)"
fail() { echo "@MARK@ FAILED: $*"; poweroff -f; }
while read m; do
    insmod /lib/modules/$m.ko || echo "@MARK@ insmod $m failed"
done < /lib/modules/order
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /out || fail "mount of the results share"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot /host || fail "mount of the host root"
echo "@MARK@ shares mounted, running run.sh"
sh /out/run.sh
echo "@MARK@ run.sh exited $?"
sync
poweroff -f
""".replace("@MARK@", MARK)


def build_initramfs(cache: Path | None = None) -> Kernel:
    """Kernel + initramfs, built once per input set and cached."""
    cache = cache or cache_dir()
    with _lock(cache / "lock"):
        vmlinuz, moddir, order = prepare_kernel(cache)
        busybox = prepare_busybox(cache)
        h = hashlib.sha256()
        h.update(INIT.encode())
        h.update(busybox.read_bytes())
        for name in order:
            h.update(name.encode() + (moddir / f"{name}.ko").read_bytes())
        target = vmlinuz.parent / f"initramfs-{h.hexdigest()[:16]}.cpio.gz"
        if not target.exists():
            c = Cpio()
            for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "host", "out",
                      "root", "lib", "lib/modules"):
                c.dir(d)
            c.chardev("dev/console", 5, 1)
            c.chardev("dev/null", 1, 3, 0o666)
            c.file("bin/busybox", busybox.read_bytes(), 0o755)
            c.file("init", INIT.encode(), 0o755)
            for name in order:
                c.file(f"lib/modules/{name}.ko", (moddir / f"{name}.ko").read_bytes())
            c.file("lib/modules/order", "".join(n + "\n" for n in order).encode())
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(gzip.compress(c.finish(), compresslevel=6))
            os.replace(tmp, target)
            for old in vmlinuz.parent.glob("initramfs-*.cpio.gz"):
                if old != target:
                    old.unlink()
        version = json.loads((vmlinuz.parent / "manifest.json").read_text())["version"]
        return Kernel(version, vmlinuz, target)


# --- one boot ---------------------------------------------------------------------

def real_python() -> str:
    """The interpreter binary to run in the guest (not a pyenv shim or venv wrapper)."""
    return os.path.realpath(sys.executable)


def _run_script(program: Path, args: list[str], run_dir: Path, python: str, shell_bind: bool,
                guest_timeout: float) -> str:
    """The per-run script /init executes (from the results share)."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "MICDRV_VM": "1",
        "MICDRV_VM_OUT": str(run_dir),
        "MICDRV_VM_EDU": EDU_BDF,
        "MICDRV_VM_OTHER": OTHER_BDF,
        "MICDRV_VM_PAIR": ",".join(PAIR_BDFS),
        "TMPDIR": str(run_dir),
    }
    q = shlex.quote
    argv = " ".join(q(a) for a in [python, str(program), *args])
    envs = " ".join(f"{k}={q(v)}" for k, v in env.items())
    # The host root is read-only; mounting onto its directories still works.
    # /tmp gets a tmpfs unless the checkout or the run directory live there.
    tmpfs_tmp = not any(str(p).startswith("/tmp/") for p in (REPO, run_dir, python))
    lines = [
        "H=/host",
        "mount -t proc proc $H/proc",
        "mount -t sysfs sysfs $H/sys",
        "mount -t devtmpfs devtmpfs $H/dev",
        "mount -t tmpfs tmpfs $H/tmp" if tmpfs_tmp else ": keep the host /tmp visible",
        # The results share also appears at the run directory's own host path.
        f"mount --bind /out $H{q(str(run_dir))}",
    ]
    if shell_bind:  # debugging aid only: the real test binds with micdrv.pci.bind
        d = f"/sys/bus/pci/devices/{EDU_BDF}"
        lines += [f"echo vfio-pci > {d}/driver_override", f"echo {EDU_BDF} > /sys/bus/pci/drivers_probe",
                  f"echo \"{MARK} shell bind: $(readlink {d}/driver)\""]
    lines += [
        f"echo {q(f'{MARK} guest program start: {argv}')}",
        f"( timeout {int(guest_timeout)} chroot $H /usr/bin/env -i {envs} {argv}; echo $? > /out/rc.tmp ) 2>&1"
        " | tee /out/output.log",
        "dmesg > /out/dmesg.log",  # the whole kernel log (the console shows warnings only)
        "mv /out/rc.tmp /out/rc",
        f"echo \"{MARK} guest program exited $(cat /out/rc)\"",
    ]
    return "\n".join(lines) + "\n"


def _qemu_opt(value: object) -> str:
    """A value inside a QEMU option list, where a comma is written as two."""
    return str(value).replace(",", ",,")


def _prune_runs(runs: Path, keep: int = 20) -> None:
    """Failed runs are kept for diagnosis; only the newest few."""
    old = sorted(runs.glob("run-*"), key=lambda p: p.stat().st_mtime)[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)


def run_guest(program: str | os.PathLike, args: list[str] | tuple[str, ...] = (), *, timeout: float = DEFAULT_TIMEOUT,
              shell_bind: bool = False, keep: bool = False, smp: int = 1, extra_qemu: list[str] | None = None) -> VmRun:
    """Boot the VM, run ``program`` (a Python file in this checkout) in it, return what happened.

    Raises :class:`VmUnavailable` when the host cannot run the tier at all.
    A boot that fails or times out returns a :class:`VmRun` with ``rc=None``
    and the console log.
    """
    program = Path(program).resolve()
    if not program.is_file():
        raise FileNotFoundError(program)
    qemu = find_qemu()
    if os.geteuid() != 0:
        # The guest runs the program as root with the host's files; 9p with
        # security_model=none maps guest root to the calling user, so the
        # tier works only when that user can read the interpreter and checkout.
        log("not root: the guest sees the host root with this user's permissions")
    cache = cache_dir()
    t0 = time.monotonic()
    kernel = build_initramfs(cache)
    log(f"kernel {kernel.version} + initramfs ready in {time.monotonic() - t0:.1f}s")

    runs = cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    _prune_runs(runs)
    run_dir = Path(tempfile.mkdtemp(dir=runs, prefix="run-")).resolve()
    os.chmod(run_dir, 0o777)
    guest_timeout = max(10.0, timeout - 30.0)
    (run_dir / "run.sh").write_text(_run_script(program, list(args), run_dir, real_python(), shell_bind, guest_timeout))
    console_path = run_dir / "console.log"
    cmd = [
        qemu, "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "1G", "-smp", str(smp),
        "-nodefaults", "-display", "none", "-no-reboot",
        "-serial", f"file:{_qemu_opt(console_path)}",
        # The IOMMU comes first so every later PCI device sits behind it.
        "-device", "intel-iommu,intremap=on",
        # edu sits alone behind a PCIe root port: on the root bus it has no
        # reset method (no FLR, no PM, no parent bridge), so vfio-pci would not
        # offer VFIO_DEVICE_RESET; behind a port the kernel can reset its bus.
        "-device", "pcie-root-port,id=rp0,chassis=1,slot=1,addr=3.0",
        "-device", "edu,bus=rp0,addr=0.0",
        # A second device, one a kernel driver owns (virtio-pci binds it):
        # binding it to vfio-pci must unbind that driver first, and its MSI-X
        # BAR's region info carries a capability chain (MSIX_MAPPABLE).
        "-device", f"virtio-rng-pci,addr={OTHER_BDF.split(':')[2]}",
        # Two functions of one slot without ACS share an IOMMU group: with one
        # of them still on virtio-pci the group is not viable.
        "-device", f"virtio-rng-pci,addr={PAIR_BDFS[0].split(':')[2]},multifunction=on",
        "-device", f"virtio-rng-pci,addr={PAIR_BDFS[1].split(':')[2]}",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=out,path={_qemu_opt(run_dir)},security_model=none",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initramfs),
        "-append", KERNEL_CMDLINE,
        *(extra_qemu or []),
    ]
    (run_dir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
    log(f"booting: {run_dir}")
    t1 = time.monotonic()
    with open(run_dir / "qemu.stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                start_new_session=True)
        timed_out = False
        try:
            qemu_rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            qemu_rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    duration = time.monotonic() - t1

    def text(name: str) -> str:
        with contextlib.suppress(OSError):
            return (run_dir / name).read_text(errors="replace")
        return ""

    console = text("console.log")
    qerr = text("qemu.stderr")
    if qerr.strip():
        console += f"\n--- qemu stderr (exit {qemu_rc}) ---\n{qerr}"
    if timed_out:
        console += f"\n--- host: killed QEMU after {timeout:.0f}s ---\n"
    rc_text = text("rc").strip()
    rc = int(rc_text) if rc_text.lstrip("-").isdigit() else None
    result = VmRun(rc=rc, output=text("output.log"), console=console, dmesg=text("dmesg.log"),
                   duration=duration, timed_out=timed_out,
                   qemu_rc=qemu_rc, run_dir=run_dir)
    log(f"QEMU exited {qemu_rc} after {duration:.1f}s; guest program "
        f"{'exited ' + str(rc) if rc is not None else 'did not finish'}")
    if not keep and rc is not None and not timed_out:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.harness", description=__doc__.split("\n\n")[0])
    p.add_argument("program", nargs="?", help="Python file (in this checkout) to run inside the VM")
    p.add_argument("args", nargs="*", help="arguments for the program")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="host-side limit in seconds")
    p.add_argument("--shell-bind", action="store_true", help="bind edu to vfio-pci with echo before the program "
                   "(debugging; the real test binds with micdrv.pci.bind)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (console.log, output.log, run.sh)")
    p.add_argument("--console", action="store_true", help="print the whole console log afterwards")
    p.add_argument("--smp", type=int, default=1)
    p.add_argument("--prepare", action="store_true", help="only fetch the kernel and build the initramfs")
    a = p.parse_args(argv)
    try:
        if a.prepare:
            k = build_initramfs()
            print(f"kernel {k.version}: {k.vmlinuz}\ninitramfs: {k.initramfs}")
            return 0
        if not a.program:
            p.error("a program is required (or --prepare)")
        r = run_guest(a.program, a.args, timeout=a.timeout, shell_bind=a.shell_bind, keep=a.keep, smp=a.smp)
    except VmUnavailable as e:
        print(f"VM tier unavailable: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(r.output)
    if a.console or not r.finished:
        sys.stderr.write("--- console ---\n" + r.console + "\n")
    if r.run_dir.exists():
        log(f"run directory kept: {r.run_dir}")
    return r.rc if r.rc is not None else 3


if __name__ == "__main__":
    sys.exit(main())
