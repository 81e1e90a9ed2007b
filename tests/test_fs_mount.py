"""Mount points: mountinfo as the kernel writes it, and what may not be mounted over (micdrv.fs.mount)."""

from __future__ import annotations

import os
import subprocess

import pytest

from micdrv.fs import FuseError, FuseTree
from micdrv.fs.mount import mounts_at, normalize, parse_mountinfo, recover_stale

LINE = ("43 27 0:39 / /run/micdrv/mic\\0400 rw,nosuid,nodev,noexec,relatime shared:1 - fuse.micdrv micdrv:mic0 "
        "rw,user_id=0,group_id=0,default_permissions,allow_other")


def test_mountinfo_lines_unescape_and_keep_the_device():
    (m,) = parse_mountinfo(LINE + "\nnot a mountinfo line\n")
    assert (m.mount_id, m.mount_point, m.fstype, m.source) == (43, "/run/micdrv/mic 0", "fuse.micdrv", "micdrv:mic0")
    assert (os.major(m.dev), os.minor(m.dev)) == (0, 39)


def test_normalize_resolves_the_parent_but_not_the_mount_point(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert normalize(str(tmp_path / "link" / "mic0")) == str(tmp_path / "real" / "mic0")
    assert normalize("relative") == os.path.join(os.getcwd(), "relative")


def test_another_file_system_on_the_mount_point_is_left_alone(tmp_path):
    mnt = tmp_path / "mic0"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "micdrv-test", str(mnt)], check=True, timeout=30)
    try:
        with pytest.raises(FuseError, match="already mounted: a tmpfs file system"):
            recover_stale(str(mnt))
        with pytest.raises(FuseError, match="already mounted"):
            FuseTree(str(mnt)).start()
        assert [m.fstype for m in mounts_at(str(mnt))] == ["tmpfs"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
    assert recover_stale(str(mnt)) == 0


def test_a_mount_point_that_is_a_file_is_refused_and_nothing_is_left_mounted(tmp_path):
    (tmp_path / "mic0").write_text("x")
    with pytest.raises(FuseError, match="not a directory"):
        FuseTree(str(tmp_path / "mic0")).start()
    assert mounts_at(str(tmp_path / "mic0")) == []
