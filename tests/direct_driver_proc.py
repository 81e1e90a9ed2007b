"""A virtio-blk driver in its own process, for tests/test_direct_transport.py.

Run as ``python -m tests.direct_driver_proc '<json>'`` with the shared
memfd, the queue's kick and call eventfds passed as inherited fds. It maps
the memfd, attaches a :class:`~micdrv.virtio.DriverRing` to the ring the
parent laid out (the parent zeroed it), writes a pattern to the disk, reads
it back, and prints one JSON line: what it wrote and what it read.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import struct
import sys
import time

from micdrv.memory import BufferMemory
from micdrv.virtio import DriverRing
from micdrv.virtio import blk as B


def main() -> None:
    a = json.loads(sys.argv[1])
    mm = mmap.mmap(a["memfd"], a["size"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mem = BufferMemory(mm)
    ring = DriverRing(a["num"], (mem, a["desc"]), (mem, a["avail"]), (mem, a["used"]), a["features"], zero=False)
    heap = [a["heap"]]

    def alloc(n: int, data: bytes = b"") -> int:
        addr = heap[0]
        heap[0] += (n + 63) & ~63
        mem.write(addr, data.ljust(n, b"\0"))
        return addr

    def run(out: list[tuple[int, int]], in_: list[tuple[int, int]]) -> int:
        ring.add(out, in_)
        if ring.kick_prepare():
            os.eventfd_write(a["kick"], 1)
        deadline = time.monotonic() + 20
        while (u := ring.get_used()) is None:
            if time.monotonic() > deadline:
                raise SystemExit("no completion")
            if select.select([a["call"]], [], [], 0.2)[0]:
                os.eventfd_read(a["call"])
        return u[1]

    pattern = bytes(range(256)) * 32  # 8 KiB
    hdr = alloc(16, struct.pack("<IIQ", B.VIRTIO_BLK_T_OUT, 0, a["sector"]))
    data = alloc(len(pattern), pattern)
    st = alloc(1, b"\xff")
    run([(hdr, 16), (data, len(pattern))], [(st, 1)])
    write_status = mem.read(st, 1)[0]
    hdr2 = alloc(16, struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, a["sector"]))
    back = alloc(len(pattern))
    st2 = alloc(1, b"\xff")
    used = run([(hdr2, 16)], [(back, len(pattern)), (st2, 1)])
    print(json.dumps({"pid": os.getpid(), "write_status": write_status, "read_status": mem.read(st2, 1)[0],
                      "read_used": used, "read_ok": mem.read(back, len(pattern)) == pattern}), flush=True)


if __name__ == "__main__":
    main()
