"""The card's virtio-console driver: hvc0, with the card's shell on it (virtio-legacy.md 4; x100-host-abi.md 6.3).

Linux v5.x ``drivers/char/virtio_console.c`` without MULTIPORT (section
4.2, what mpssd offers): queue 0 receives host input, queue 1 transmits
console output; port 0 is a console at once, no control messages.

* **Features**: SIZE (cols/rows, read on a config change) when offered, the
  ring features; never MULTIPORT (one port is all the card needs, and
  mpssd never offered it) nor EMERG_WRITE (not in the driver's table).
* **Receive**: the ring is filled with 4096-byte single writable buffers
  (PAGE_SIZE, as the driver); each used buffer's ``len`` bytes are copied
  out and the buffer re-posted at once, then the bytes go to the shell
  (:mod:`.shell`), whose thread does the rest -- the interrupt thread never
  waits for output.
* **Transmit**: one readable descriptor per piece of output (up to 4096
  bytes), from a pool of :data:`TX_SLOTS` buffers. Linux spins until the
  device returns each buffer; here a writer waits only when all slots are
  out, and gives up after :data:`TX_WAIT` seconds (output dropped and
  counted) -- a host that stops serving the console cannot hang the card.
* **A buggy host** (a used id not in flight, a length beyond a buffer):
  BAD_RING, the device is marked broken and FAILED, the shell stops; the
  card OS carries on.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING

from micdrv.virtio import RingFull, VringError
from micdrv.virtio import console as C
from micdrv.virtio.device import (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_ID_CONSOLE,
                                  VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, feature_names)

from .shell import Shell
from .virtio_bus import VirtioDevice, VirtioDriver, Virtqueue

if TYPE_CHECKING:
    from .drivers import CardDrivers

BUF = C.RX_BUFFER_SIZE     # 4096 (section 4.2)
TX_SLOTS = 16
TX_WAIT = 5.0
WANTED = (1 << C.VIRTIO_CONSOLE_F_SIZE) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)


class ConsoleDriver(VirtioDriver):
    """One virtio-console device as ``hvcN``, running a shell."""

    device_id = VIRTIO_ID_CONSOLE
    name = "virtio_console"

    def __init__(self, drivers: "CardDrivers"):
        self.drivers = drivers
        self.kernel = drivers.kernel
        self.tty = "hvc?"
        self.dev: VirtioDevice | None = None
        self.features = 0
        self.size: tuple[int, int] | None = None    # (cols, rows) once the host sent them
        self.broken: str | None = None
        self.shell: Shell | None = None
        self.rx: Virtqueue | None = None
        self.tx: Virtqueue | None = None
        self._rx_base = self._tx_base = 0
        self._tx_free: list[int] = []
        self._rx_lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._tx_room = threading.Event()
        self.c = dict.fromkeys(("rx_bytes", "rx_buffers", "tx_bytes", "tx_buffers", "tx_dropped", "tx_waits"), 0)

    def probe(self, dev: VirtioDevice) -> None:
        acked = dev.host_features() & WANTED
        dev.finalize_features(acked)
        self.dev, self.features = dev, acked
        self.rx, self.tx = dev.find_vqs([self._rx_interrupt, self._tx_interrupt])
        self.tx.ring.disable_cb()
        num = self.rx.num
        self._rx_base = dev.alloc(num * BUF, 4096)
        self._tx_base = dev.alloc(TX_SLOTS * BUF, 4096)
        self._tx_free = list(range(TX_SLOTS - 1, -1, -1))
        self.tty = self.drivers.claim_tty(self)
        dev.set_status(dev.get_status() | VIRTIO_CONFIG_S_DRIVER_OK)
        with self._rx_lock:
            for i in range(num):
                self.rx.ring.add((), [(self._rx_base + i * BUF, BUF)], i)
            self.rx.kick()
        self.kernel.printk(f"virtio_console {dev.name}: {self.tty}: console, {num} receive buffers, features "
                           f"{' '.join(feature_names(acked, C.FEATURE_NAMES)) or 'none'}")
        self.shell = Shell(self.drivers, self.write, self.tty)
        self.drivers.console_up(self)
        self.shell.start()

    # --- receive (interrupt thread) ----------------------------------------------------------------
    def _rx_interrupt(self, vq: Virtqueue) -> None:
        chunks = []
        with self._rx_lock:
            if self.broken is not None or self.dev is None:
                return
            mem = self.dev.memory
            try:
                for i, n in vq.ring.get_all_used():
                    chunks.append(mem.read(self._rx_base + i * BUF, n))
                    vq.ring.add((), [(self._rx_base + i * BUF, BUF)], i)
                if chunks:
                    vq.kick()
            except (VringError, RingFull) as e:
                self._break(str(e))
                return
            except Exception as e:    # card memory unreachable (a card reset) or a bug
                self._break(f"receive: {type(e).__name__}: {e}")
                return
        data = b"".join(chunks)
        if data:
            self.c["rx_bytes"] += len(data)
            self.c["rx_buffers"] += len(chunks)
            shell = self.shell
            if shell is not None:
                shell.feed(data)

    def _tx_interrupt(self, vq: Virtqueue) -> None:
        self._tx_room.set()

    # --- transmit -----------------------------------------------------------------------------------
    def write(self, data: bytes) -> bool:
        """Console output; False if (part of) it was dropped (device broken or not serving)."""
        mv = memoryview(data)
        for off in range(0, len(mv), BUF):
            piece = mv[off:off + BUF]
            with self._tx_lock:
                if self.broken is not None or self.dev is None:
                    self.c["tx_dropped"] += len(mv) - off
                    return False
                slot = self._tx_slot()
                if slot is None:
                    self.c["tx_dropped"] += len(mv) - off
                    return False
                addr = self._tx_base + slot * BUF
                self.dev.memory.write(addr, piece)
                try:
                    self.tx.ring.add([(addr, len(piece))], (), slot)
                except (VringError, RingFull) as e:
                    self._tx_free.append(slot)
                    self._break(f"transmit: {e}")
                    return False
                self.tx.kick()
                self.c["tx_bytes"] += len(piece)
                self.c["tx_buffers"] += 1
        return True

    def _reap(self) -> None:
        try:
            for slot, _n in self.tx.ring.get_all_used():
                self._tx_free.append(slot)
        except VringError as e:
            self._break(f"transmit completions: {e}")

    def _tx_slot(self) -> int | None:
        if not self._tx_free:
            self._reap()
        if self._tx_free:
            return self._tx_free.pop()
        self.c["tx_waits"] += 1
        ring = self.tx.ring
        deadline = time.monotonic() + TX_WAIT
        while self.broken is None and self.dev is not None and time.monotonic() < deadline:
            self._tx_room.clear()
            if ring.enable_cb():
                self._tx_lock.release()
                try:
                    self._tx_room.wait(0.2)
                finally:
                    self._tx_lock.acquire()
            self._reap()
            if self._tx_free:
                break
        if self.broken is None and self.dev is not None:
            ring.disable_cb()
        return self._tx_free.pop() if self._tx_free else None

    # --- broken, config, removal --------------------------------------------------------------------
    def _break(self, why: str) -> None:
        if self.broken is not None:
            return
        self.broken = why
        self.kernel.printk(f"virtio_console {self.dev.name}: {self.tty}: BAD_RING: {why}; device marked broken")
        try:
            self.dev.set_status(self.dev.get_status() | VIRTIO_CONFIG_S_FAILED)
        except Exception:
            pass
        self._tx_room.set()
        if self.shell is not None:
            self.shell.stop(wait=False)
        self.drivers.changed()

    def config_changed(self) -> None:
        dev = self.dev
        if dev is not None and self.features >> C.VIRTIO_CONSOLE_F_SIZE & 1:
            self.size = struct.unpack("<HH", dev.read_config(0, 4))

    def remove(self) -> None:
        shell, self.shell = self.shell, None
        if shell is not None:
            shell.stop()
        with self._rx_lock, self._tx_lock:
            dev, self.dev = self.dev, None
            self._tx_room.set()
            if dev is not None:
                dev.reset()
                dev.free(self._rx_base, self.rx.num * BUF)
                dev.free(self._tx_base, TX_SLOTS * BUF)
        self.kernel.printk(f"virtio_console: {self.tty} removed")
        self.drivers.console_down(self)

    def shutdown(self) -> None:
        if self.dev is not None:
            self.remove()

    def abandon(self) -> None:
        shell = self.shell
        if shell is not None:
            shell.stop(wait=False)
        self._tx_room.set()

    def join(self, timeout: float) -> None:
        shell = self.shell
        if shell is not None:
            shell.join(timeout)

    def status(self) -> dict:
        return {"driver": self.name, "device": self.dev.name if self.dev else None, "tty": self.tty,
                "features": feature_names(self.features, C.FEATURE_NAMES), "size": self.size,
                "broken": self.broken, "shell": self.shell.status() if self.shell else None, "counters": dict(self.c)}
