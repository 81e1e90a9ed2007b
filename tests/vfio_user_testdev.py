"""A small PCI device served over vfio-user, for the vfio-user tests.

Run it in its own process (the client must not share anything with it but
the socket)::

    python -m tests.vfio_user_testdev --socket /tmp/dev.sock [--max-xfer N] [--max-msg-fds N]

It prints ``ready`` on stdout once it listens.

BAR0 (16 KiB, trapped) holds registers; accesses below 0x800 must be 1, 2, 4
or 8 bytes, naturally aligned, else the device answers EINVAL:

====== ============ =====================================================
offset name         behaviour
====== ============ =====================================================
0x00   SCRATCH      8 bytes of plain storage
0x08   IRQ          write v: raise MSI-X vector v (unless masked in the table)
0x0c   INTX         write: raise INTx
0x10   DMA_SRC      u64 IOVA
0x18   DMA_DST      u64 IOVA
0x20   DMA_LEN      u32
0x24   DMA_CMD      write 1: copy SRC->DST with dma.read/write; 2: with dma.view
0x28   DMA_STATUS   0 idle, 1 done, 2 fault
0x2c   FAULTS       DMA faults so far
0x30   COUNTER      u64, each read returns it and then increments it
0x38   DMA_MAPS     number of DMA mappings the server holds
0x3c   IRQ_ASSIGNED MSI-X vectors with an eventfd
0x40   STALL_MS     u32
0x44   STALL        read: sleeps STALL_MS milliseconds, returns 0
0x48   MSG_BYTES    u64, DMA bytes moved by DMA_READ/WRITE messages
0x50   CLIENTS      clients accepted so far
0x800  BULK         2 KiB of storage, any access size
0x2000 MSI-X table  16 entries; 0x3000 PBA
====== ============ =====================================================

BAR2 (1 MiB, 64-bit prefetchable) is memfd memory, mmap-able in two sparse
areas: [0, 256 KiB) and [512 KiB, 1 MiB).
"""

from __future__ import annotations

import argparse
import logging
import signal
import struct
import sys
import threading
import time

from micdrv.pci.device import BAR0, INTX, MSIX
from micdrv.pci.vfio_user import (CommandError, ConfigSpace, DeviceModel, DmaFault, MemoryRegion, TrappedRegion,
                                  VfioUserServer)

SCRATCH, IRQ, INTX_REG = 0x00, 0x08, 0x0C
DMA_SRC, DMA_DST, DMA_LEN, DMA_CMD, DMA_STATUS, FAULTS = 0x10, 0x18, 0x20, 0x24, 0x28, 0x2C
COUNTER, DMA_MAPS, IRQ_ASSIGNED, STALL_MS, STALL, MSG_BYTES, CLIENTS = 0x30, 0x38, 0x3C, 0x40, 0x44, 0x48, 0x50
BULK, BULK_SIZE = 0x800, 0x800
MSIX_TABLE, MSIX_PBA, VECTORS = 0x2000, 0x3000, 16
BAR0_SIZE = 0x4000
BAR2, BAR2_SIZE = 2, 1 << 20
BAR2_SPARSE = [(0, 0x40000), (0x80000, 0x80000)]
DMA_COPY, DMA_COPY_VIEW = 1, 2
STATUS_DONE, STATUS_FAULT = 1, 2


class TestDevice(DeviceModel):
    def __init__(self):
        cfg = ConfigSpace(0x1234, 0xABCD, class_code=0xFF0000, revision=1)
        cfg.add_bar(0, BAR0_SIZE)
        cfg.add_bar(BAR2, BAR2_SIZE, mem64=True, prefetchable=True)
        cfg.add_msix(VECTORS, 0, MSIX_TABLE, 0, MSIX_PBA)
        super().__init__(cfg)
        self.regs = bytearray(BAR0_SIZE)
        self.counter = 0
        self.faults = 0
        self.lock = threading.Lock()
        self.regions[BAR0] = TrappedRegion(BAR0_SIZE, self.mmio_read, self.mmio_write)
        self.regions[BAR2] = MemoryRegion(BAR2_SIZE, sparse=BAR2_SPARSE, name="testdev-bar2")
        self._init_msix()

    def _init_msix(self):
        for v in range(VECTORS):  # vector control 0: unmasked (PCI resets them masked; this device is simpler)
            struct.pack_into("<I", self.regs, MSIX_TABLE + 16 * v + 12, 0)

    # --- registers ------------------------------------------------------------------
    @staticmethod
    def _check(offset: int, size: int) -> None:
        if offset < BULK and (size not in (1, 2, 4, 8) or offset % size):
            raise CommandError(22, f"register access of {size} bytes at {offset:#x}")  # EINVAL

    def mmio_read(self, offset: int, size: int):
        self._check(offset, size)
        with self.lock:
            if offset == COUNTER:
                value = self.counter
                self.counter += 1
                return value.to_bytes(8, "little")[:size]
            if offset == DMA_MAPS:
                return len(self.dma.mappings)
            if offset == IRQ_ASSIGNED:
                return sum(self.irqs.assigned(MSIX))
            if offset == MSG_BYTES:
                return self.dma.message_bytes.to_bytes(8, "little")[:size]
            if offset == CLIENTS:
                return self.server.clients
            if offset == FAULTS:
                return self.faults
            stall = offset == STALL
        if stall:
            time.sleep(struct.unpack_from("<I", self.regs, STALL_MS)[0] / 1000)
            return 0
        return bytes(self.regs[offset:offset + size])

    def mmio_write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        with self.lock:
            self.regs[offset:offset + len(data)] = data
        if offset == IRQ:
            self._raise_msix(int.from_bytes(data, "little"))
        elif offset == INTX_REG:
            self.irqs.trigger(INTX, 0)
        elif offset == DMA_CMD:
            self._dma(int.from_bytes(data, "little"))

    def _raise_msix(self, v: int) -> None:
        if not 0 <= v < VECTORS:
            return
        ctrl = struct.unpack_from("<I", self.regs, MSIX_TABLE + 16 * v + 12)[0]
        if ctrl & 1:  # per-vector mask lives in the table: the model's job (irqs.py)
            self.regs[MSIX_PBA + v // 8] |= 1 << v % 8
            return
        self.irqs.trigger(MSIX, v)

    def _dma(self, cmd: int) -> None:
        src, dst = struct.unpack_from("<QQ", self.regs, DMA_SRC)
        length = struct.unpack_from("<I", self.regs, DMA_LEN)[0]
        try:
            if cmd == DMA_COPY:
                self.dma.write(dst, self.dma.read(src, length))
            elif cmd == DMA_COPY_VIEW:
                s = self.dma.view(src, length)
                d = self.dma.view(dst, length, write=True)
                d[:] = s
                s.release()
                d.release()
            status = STATUS_DONE
        except DmaFault:
            self.faults += 1
            status = STATUS_FAULT
        struct.pack_into("<I", self.regs, DMA_STATUS, status)

    def reset(self) -> None:
        with self.lock:
            self.regs[:] = bytes(BAR0_SIZE)
            self.counter = 0
            self._init_msix()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--max-xfer", type=int, default=64 << 10)
    ap.add_argument("--max-msg-fds", type=int, default=16)
    ap.add_argument("--reply-timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="testdev: %(levelname)s %(message)s")
    server = VfioUserServer(TestDevice(), args.socket, max_data_xfer_size=args.max_xfer,
                            max_msg_fds=args.max_msg_fds, reply_timeout=args.reply_timeout)
    server.listen()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(timeout=0))
    print("ready", flush=True)
    try:
        server.serve()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
