"""The bound sequential blk meets here: its two copies as an ideal pipeline of two processes.

A sequential blk read through the stack costs two memory copies on the
host's CPUs: the daemon's ``preadv`` from the image's page cache into its
staging (what the ``vop`` benchmark's limit measures, into one reused
buffer), and the simulated DMA engine's ``memmove`` from staging into card
memory, in the simulator's process (on silicon the card's engine does the
second, off the host's CPUs). A write is the same two copies the other way
round. :func:`pipeline` runs just those copies with nothing else: the
file's side in this process, one 1 MiB request at a time into
:data:`SLOTS` rotating slots of a shared memfd (the card keeps 16 requests
in flight, so the stack stages 16 MiB), the engine's side in a forked
process copying each slot to or from 64 MiB of its own memory (the card's
request buffers), one byte through a pipe per slot each way (the least a
hand-over between two processes costs). ``dma=False`` hands the slots over
without the second copy: what the file side alone gets once its buffers
rotate and leave the process.

Everything the stack adds -- vrings, descriptors, Python per request,
doorbells, interrupts -- is absent, so this is an upper bound for the stack
on the same machine, measured beside the stack's own figure and its limit
(:mod:`benchmarks.vop`).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time

MiB = 1 << 20
SLOTS = 16            # staging slots: the card's STREAM_WINDOW of 1 MiB requests in flight
CARD_SLOTS = 64       # the engine side's own memory, 64 MiB: where the card's requests sit


def _address(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def pipeline(path: str, nbytes: int, write: bool, dma: bool = True, piece: int = MiB) -> float:
    """Bytes per second of ``nbytes`` moved between the file ``path`` (from offset 0) and the engine side's
    memory in ``piece``-sized requests; ``write``: memory -> file (``pwritev``), else file -> memory
    (``preadv``). The file must hold ``nbytes``."""
    count = nbytes // piece
    mfd = os.memfd_create("pipeline-staging", os.MFD_CLOEXEC)
    try:
        os.ftruncate(mfd, SLOTS * piece)
        staging = mmap.mmap(mfd, SLOTS * piece, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(mfd)
    view = memoryview(staging)
    view[:] = b"\1" * len(view)                     # first touch before the clock, as the stack's warm run
    slots = [view[i * piece:(i + 1) * piece] for i in range(SLOTS)]
    to_engine, from_file = os.pipe()                # file side -> engine side: slot numbers
    from_engine, to_file = os.pipe()                # engine side -> file side
    pid = os.fork()
    if pid == 0:                                    # the engine side: only os, mmap and ctypes from here on
        code = 1
        try:
            os.close(from_file)
            os.close(from_engine)
            card = mmap.mmap(-1, CARD_SLOTS * piece)
            card[:] = b"\2" * len(card)
            card0, stage0 = _address(card), _address(staging)
            os.write(to_file, b"r")                 # ready: the clock starts now
            i = 0
            while True:
                got = os.read(to_engine, 4096)
                if not got:
                    break
                for s in got:
                    at = card0 + (i % CARD_SLOTS) * piece
                    if dma:
                        if write:
                            ctypes.memmove(stage0 + s * piece, at, piece)
                        else:
                            ctypes.memmove(at, stage0 + s * piece, piece)
                    i += 1
                    os.write(to_file, bytes((s,)))
            code = 0
        finally:
            os._exit(code)
    os.close(to_engine)
    os.close(to_file)
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    try:
        if os.read(from_engine, 1) != b"r":
            raise RuntimeError("pipeline: the engine side did not start")
        t0 = time.perf_counter()
        if write:
            os.write(from_file, bytes(range(min(SLOTS, count))))   # the engine fills every free slot
            sent = min(SLOTS, count)
            done = 0
            while done < count:
                for s in os.read(from_engine, 4096):
                    os.pwritev(fd, [slots[s]], done * piece)
                    done += 1
                    if sent < count:
                        os.write(from_file, bytes((s,)))
                        sent += 1
        else:
            free = list(range(SLOTS))
            for i in range(count):
                while not free:
                    free.extend(os.read(from_engine, 4096))
                s = free.pop()
                os.preadv(fd, [slots[s]], i * piece)
                os.write(from_file, bytes((s,)))
            while len(free) < SLOTS:
                free.extend(os.read(from_engine, 4096))
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.close(from_file)
        os.close(from_engine)
        _pid, status = os.waitpid(pid, 0)
        for v in slots:
            v.release()
        view.release()
        staging.close()
    if status != 0:
        raise RuntimeError(f"pipeline: the engine side exited with status {status:#x}")
    return count * piece / elapsed
