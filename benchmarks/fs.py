"""Sequential throughput of a disk through the FUSE tree (block/<disk>), beside the same I/O on its image file.

Run from the repository root, as root (it mounts a tree in a temporary directory)::

    python -m benchmarks.fs [--size-mib 256] [--rounds 2]

A :class:`~micdrv.fs.FuseTree` serves one :class:`~backends.blk.BlockImage`
(a sparse file in the temporary directory's file system), as the daemon
serves the card's disks. Figures: sequential read and write of the whole
disk in 1 MiB pread/pwrite calls from a page-aligned buffer, through the
tree; limit: the same calls on the image file directly (what the tree's
preadv/pwritev into libfuse's buffer cost on top of the kernel's FUSE
round trip). Figure and limit alternate over ``--rounds``, best kept. The
last lines are one JSON object per figure: ``{"figure", "value", "unit",
"limit", "ratio"}``, ratio = value / limit.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import tempfile
import time

from backends.blk import BlockImage
from micdrv.fs import FuseTree

MiB = 1 << 20
CHUNK = MiB


def sequential(path: str, size: int, write: bool, buf: mmap.mmap) -> float:
    """MB/s of ``size`` bytes in CHUNK calls at increasing offsets."""
    fd = os.open(path, os.O_WRONLY if write else os.O_RDONLY)
    try:
        view = memoryview(buf)
        t0 = time.perf_counter()
        for off in range(0, size, CHUNK):
            n = os.pwrite(fd, view, off) if write else os.preadv(fd, [view], off)
            if n != CHUNK:
                raise RuntimeError(f"{path}: {n} bytes at {off:#x}")
        if write:
            os.fsync(fd)
        return size / (time.perf_counter() - t0) / 1e6
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-mib", type=int, default=256, help="disk size (default 256)")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of figure and limit (best kept)")
    args = ap.parse_args(argv)
    size = args.size_mib * MiB
    d = tempfile.mkdtemp(prefix="micdrv-bench-fs")
    try:
        path = os.path.join(d, "disk.img")
        with open(path, "wb") as f:
            f.truncate(size)
        image = BlockImage(path)
        buf = mmap.mmap(-1, CHUNK)   # page-aligned, as a block tool's O_DIRECT buffer would be
        buf.write(os.urandom(CHUNK))
        results = []
        with FuseTree(os.path.join(d, "mic0"), block_images=lambda: {"disk": image}):
            disk = os.path.join(d, "mic0", "block", "disk")
            for write in (False, True):
                best = {"tree": 0.0, "file": 0.0}
                for _ in range(args.rounds):
                    best["tree"] = max(best["tree"], sequential(disk, size, write, buf))
                    best["file"] = max(best["file"], sequential(path, size, write, buf))
                what = "write" if write else "read"
                print(f"block/<disk> sequential {what:5s}  {best['tree']:8.0f} MB/s   image file "
                      f"{best['file']:8.0f} MB/s")
                results.append({"figure": f"fuse_block_seq_{what}_1MiB", "value": round(best["tree"], 1),
                                "unit": "MB/s", "limit": round(best["file"], 1),
                                "ratio": round(best["tree"] / best["file"], 3)})
        image.close()
        for r in results:
            print(json.dumps(r))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
