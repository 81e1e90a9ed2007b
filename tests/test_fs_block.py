"""block/<disk> in a mounted tree: the card's own BlockImage seen from the host (issue 6).

The tree is mounted in this process (real FUSE, real kernel) with a provider
of real :class:`BlockImage` objects; the card's side is a :class:`BlkBackend`
driven through real rings by tests/virtio_harness.py's guest, so "one
coherent disk" is checked between the card's requests and the host's files.
Also here: the mount point's symlinks (the console's pty link) showing through.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from backends.blk import BlkBackend, BlockImage
from backends.console.pty import Pty
from micdrv.fs import FuseTree
from micdrv.fs.mount import FSTYPE, MNT_DETACH, mounts_at, umount
from micdrv.virtio import blk as B
from tests.as_user import NOBODY, as_user
from tests.test_fs import attempt
from tests.virtio_harness import Guest

MiB = 1 << 20


@pytest.fixture
def disks(tmp_path):
    """name -> BlockImage: what the card's devices would hand the tree; tests add and remove entries."""
    data = tmp_path / "data.img"
    data.write_bytes(os.urandom(2 * MiB + 100))      # a partial last sector is not part of the disk
    boot = tmp_path / "boot.img"
    boot.write_bytes(os.urandom(MiB))
    images = {"data": BlockImage(str(data)), "boot": BlockImage(str(boot), readonly=True)}
    yield images
    for img in images.values():
        img.close()


@pytest.fixture
def base():
    """A directory other users can reach (pytest's tmp_path is root's alone), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="micdrv-fs-block"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


@pytest.fixture
def tree(base, disks):
    t = FuseTree(str(base / "mic0"), block_images=lambda: dict(disks), name="mic0").start()
    yield base / "mic0"
    t.close()
    assert mounts_at(t.mount_point) == []


def file_bytes(path, offset, n) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def card_request(g: Guest, type_: int, sector: int, out: bytes = b"", in_len: int = 0) -> tuple[int, bytes]:
    """One virtio-blk request from the card: (status, data read)."""
    bufs = [g.alloc(16, struct.pack("<IIQ", type_, 0, sector))] + ([g.alloc(len(out), out)] if out else [])
    ins = [g.alloc(in_len)] if in_len else []
    st = g.alloc(1, b"\xee")
    g.add(0, [(a, len(v)) for a, v in bufs], [(a, len(v)) for a, v in ins] + [(st[0], 1)])
    g.wait(0)
    return st[1][0], b"".join(bytes(v) for _a, v in ins)


def test_the_disks_are_listed_with_their_capacity_and_modes(tree, disks):
    assert sorted(os.listdir(tree / "block")) == ["boot", "data"]
    st = os.stat(tree / "block" / "data")
    assert st.st_size == disks["data"].capacity * 512 == 2 * MiB   # capacity, not the file's odd size
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    assert stat.S_IMODE(os.stat(tree / "block" / "boot").st_mode) == 0o400
    assert os.path.getsize(tree / "block" / "boot") == MiB
    assert sorted(os.listdir(tree)) == ["block"]   # no service: no attributes


def test_host_and_card_see_one_disk(tree, disks):
    g = Guest(BlkBackend(disks["data"]))
    try:
        # The card writes sector 100; the host reads it through the tree.
        payload = os.urandom(4096)
        assert card_request(g, B.VIRTIO_BLK_T_OUT, 100, out=payload)[0] == B.VIRTIO_BLK_S_OK
        assert file_bytes(tree / "block" / "data", 100 * 512, 4096) == payload
        # The host writes through the tree; the card reads it, and the image file holds it.
        mine = os.urandom(8192)
        fd = os.open(tree / "block" / "data", os.O_WRONLY)
        try:
            assert os.pwrite(fd, mine, 7 * 512) == 8192
            os.fsync(fd)
        finally:
            os.close(fd)
        status, data = card_request(g, B.VIRTIO_BLK_T_IN, 7, in_len=8192)
        assert (status, data) == (B.VIRTIO_BLK_S_OK, mine)
        assert file_bytes(disks["data"].path, 7 * 512, 8192) == mine
    finally:
        g.close()


def test_a_whole_disk_reads_back_as_the_image_holds_it(tree, disks):
    assert (tree / "block" / "data").read_bytes() == file_bytes(disks["data"].path, 0, 2 * MiB)
    r = subprocess.run(["cmp", "-n", str(MiB), str(tree / "block" / "boot"), disks["boot"].path], timeout=60)
    assert r.returncode == 0


def test_a_read_only_disk_refuses_writes_with_EROFS(tree):
    for flags in (os.O_WRONLY, os.O_RDWR):
        with pytest.raises(OSError) as e:
            os.open(tree / "block" / "boot", flags)
        assert e.value.errno == errno.EROFS
    assert len((tree / "block" / "boot").read_bytes()) == MiB


def test_writes_stop_at_the_capacity_like_a_block_device(tree, disks):
    end = disks["data"].capacity * 512
    fd = os.open(tree / "block" / "data", os.O_WRONLY | os.O_TRUNC)   # O_TRUNC is ignored, as by a disk
    try:
        assert os.pwrite(fd, b"z" * 1024, end - 512) == 512            # cut short at the end
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"z", end)
        assert e.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as e:
            os.ftruncate(fd, 4096)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert os.path.getsize(disks["data"].path) == 2 * MiB + 100        # the file never grows
    assert file_bytes(disks["data"].path, end - 512, 512) == b"z" * 512
    assert os.pread(os.open(tree / "block" / "data", os.O_RDONLY), 4096, end) == b""


def test_disks_come_and_go_with_the_provider_and_open_files_keep_theirs(tree, disks, tmp_path):
    extra = tmp_path / "extra.img"
    extra.write_bytes(b"e" * 4096)
    disks["extra"] = BlockImage(str(extra))
    assert "extra" in os.listdir(tree / "block") and (tree / "block" / "extra").read_bytes() == b"e" * 4096
    fd = os.open(tree / "block" / "extra", os.O_RDONLY)
    try:
        removed = disks.pop("extra")
        assert "extra" not in os.listdir(tree / "block") and not (tree / "block" / "extra").exists()
        assert os.pread(fd, 8, 0) == b"e" * 8          # the open file still has its image
        removed.close()                               # ... until the device closes it
        with pytest.raises(OSError) as e:
            os.pread(fd, 8, 0)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_a_disk_is_root_s_alone(tree):
    def look():
        return {"list": attempt(lambda: len(os.listdir(tree / "block"))),
                "read": attempt(lambda: len((tree / "block" / "data").read_bytes()))}
    # fuse_group 0 here: the block directory is root's group's; a disk is root's even for the group.
    assert as_user(NOBODY, 0, look) == {"list": 2, "read": "EACCES"}
    assert as_user(NOBODY, NOBODY, look) == {"list": "EACCES", "read": "EACCES"}


# --- the mount point's symlinks --------------------------------------------------------------------------
def test_the_console_link_works_inside_the_tree_and_outlives_it(base, disks):
    mnt = base / "mic0"
    before = Pty(str(mnt / "early"))          # published before the tree covers the directory
    t = FuseTree(str(mnt), block_images=lambda: dict(disks), name="mic0").start()
    try:
        assert os.readlink(mnt / "early") == before.path
        console = Pty(str(mnt / "console"))   # the console backend's default link, made inside the tree
        assert os.readlink(mnt / "console") == console.path and os.path.islink(mnt / "console")
        assert sorted(os.listdir(mnt)) == ["block", "console", "early"]
        assert os.stat(mnt / "console").st_rdev == os.stat(console.path).st_rdev   # it leads to the pty
        before.close()                        # its link goes, through the tree
        assert sorted(os.listdir(mnt)) == ["block", "console"]
        for bad in ("block", "block/x"):
            with pytest.raises(OSError) as e:
                os.symlink("/dev/null", mnt / bad)
            assert e.value.errno in (errno.EEXIST, errno.EPERM)
        with pytest.raises(OSError) as e:
            os.unlink(mnt / "block")
        assert e.value.errno in (errno.EPERM, errno.EISDIR)
        assert as_user(NOBODY, 0, lambda: attempt(lambda: os.symlink("/x", mnt / "mine"))) == "EACCES"
    finally:
        t.close()
    assert os.readlink(mnt / "console") == console.path   # the real directory has it
    console.close()
    assert not os.path.lexists(mnt / "console")


def test_a_tree_of_a_killed_process_is_recovered(tmp_path, disks):
    mnt = tmp_path / "mic0"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            FuseTree(str(mnt), block_images=lambda: dict(disks), name="mic0").start()
            os.write(w, b"up")
            time.sleep(600)  # until killed
        finally:
            os._exit(1)
    os.close(w)
    try:
        assert os.read(r, 2) == b"up"
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        with pytest.raises(OSError) as e:
            os.listdir(mnt)
        assert e.value.errno == errno.ENOTCONN
        with FuseTree(str(mnt), block_images=lambda: dict(disks), name="mic0"):
            assert sorted(os.listdir(mnt / "block")) == ["boot", "data"]
            assert [m.fstype for m in mounts_at(str(mnt))] == [FSTYPE]
        assert mounts_at(str(mnt)) == []
    finally:
        os.close(r)
        detach_all(mnt)


def detach_all(path: Path) -> None:
    """What a failed test may have left mounted at ``path``."""
    while mounts_at(str(path)):
        umount(str(path), MNT_DETACH)


def test_a_live_tree_is_never_taken_over(tree, disks):
    from micdrv.fs import FuseError
    with pytest.raises(FuseError, match="already mounted: a live micdrv tree"):
        FuseTree(str(tree), block_images=lambda: dict(disks)).start()
    assert sorted(os.listdir(tree / "block")) == ["boot", "data"]
