"""Two (or more) SCIF nodes in one process, wired the way a host and its cards are.

No hardware layer: memory is two kinds of ``bytearray`` and a doorbell is a
thread, but the *layout* is the real one (spec 8.3, 8.4, ARCHITECTURE.md
"Addresses"):

* host RAM (the DmaArena) at IOVA 0; card k reaches it through its SMPT
  window at ``SMPT_BASE + iova``;
* card k's GDDR at card physical 0; the host reaches it through BAR0 at the
  same offset;
* each card's device page (``struct mic_bootparam``) lives in host RAM; the
  node queue pairs are exchanged through it exactly as in spec 8.4 steps 1-3;
* a doorbell wakes a :class:`SoftIrq` thread on the other side, which drains
  the node QP (the kernel's IRQ + ordered workqueue).

Every read either side makes of the *other* side's memory is counted, so a
test can check "nobody reads across PCIe" (spec 8.3).
"""

from __future__ import annotations

import logging
import threading

from micdrv.bootparam import MIC_DP_SIZE, Bootparam
from micdrv.memory import BufferMemory, MemoryBase
from micdrv.scif import NodeQueuePair, ScifMemory, ScifNode, Side, publish_qp, wait_peer_qp

SMPT_BASE = 0x80_0000_0000  # ARCHITECTURE.md: host IOVA a is card address 0x80_0000_0000 + a (spec 2.4)
HOST_RAM = 4 << 20
CARD_RAM = 2 << 20
WAIT = 5.0  # the longest any test waits for something that should happen at once

log = logging.getLogger(__name__)


class Heap:
    """First-fit allocator over ``[start, end)``, 64-byte granules: a stand-in for the arena / the card kernel heap."""

    def __init__(self, start: int, end: int):
        self.free_list = [(start, end - start)]
        self.lock = threading.Lock()
        self.live = 0

    def alloc(self, size: int) -> int:
        size = -(-size // 64) * 64
        with self.lock:
            for i, (a, n) in enumerate(self.free_list):
                if n >= size:
                    self.free_list[i:i + 1] = [(a + size, n - size)] if n > size else []
                    self.live += 1
                    return a
        raise MemoryError(f"heap: no {size:#x} bytes")

    def free(self, addr: int, size: int) -> None:
        size = -(-size // 64) * 64
        with self.lock:
            self.live -= 1
            fl = sorted(self.free_list + [(addr, size)])
            merged = [fl[0]]
            for a, n in fl[1:]:
                pa, pn = merged[-1]
                assert pa + pn <= a, f"double free of {addr:#x}"
                if pa + pn == a:
                    merged[-1] = (pa, pn + n)
                else:
                    merged.append((a, n))
            self.free_list = merged


class CountingMemory(MemoryBase):
    """The other side's memory, as reached across PCIe: every load is counted."""

    def __init__(self, inner: BufferMemory, name: str):
        super().__init__(inner.base, inner.size, name)
        self.inner = inner
        self.reads = 0

    def _read(self, addr, n):
        self.reads += 1
        return self.inner.read(addr, n)

    def _write(self, addr, data):
        self.inner.write(addr, data)

    def read_u32(self, addr):
        self.check(addr, 4, "read")
        self.reads += 1
        return self.inner.read_u32(addr)

    def read_u64(self, addr):
        self.check(addr, 8, "read")
        self.reads += 1
        return self.inner.read_u64(addr)

    def write_u32(self, addr, v):
        self.check(addr, 4, "write")
        self.inner.write_u32(addr, v)

    def write_u64(self, addr, v):
        self.check(addr, 8, "write")
        self.inner.write_u64(addr, v)


class SoftIrq:
    """An interrupt line and its bottom half: ``ring()`` wakes a thread that runs ``handler()``."""

    def __init__(self, name: str):
        self.name = name
        self.handler = None
        self.errors: list[BaseException] = []
        self._ev = threading.Event()
        self._stop = False
        self.count = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def ring(self) -> None:
        self.count += 1
        self._ev.set()

    def _run(self) -> None:
        while True:
            self._ev.wait()
            if self._stop:
                return
            self._ev.clear()
            h = self.handler
            if h is None:
                continue
            try:
                h()
            except BaseException as e:  # a test must see it, the thread must live on
                log.exception("%s handler", self.name)
                self.errors.append(e)

    def stop(self) -> None:
        self._stop = True
        self._ev.set()
        self._thread.join(WAIT)


class Card:
    """One card: GDDR, the host's BAR0 view of it, its SMPT view of host RAM, its device page."""

    def __init__(self, system: "System", k: int):
        self.k = k
        self.node_id = k + 1
        self.ram = bytearray(CARD_RAM)
        self.gddr = BufferMemory(self.ram, 0, f"mic{k} GDDR")
        self.heap = Heap(0x10000, CARD_RAM)
        self.bar0 = CountingMemory(self.gddr, f"mic{k} BAR0")            # the host's window onto the card
        self.smpt = CountingMemory(BufferMemory(system.host_ram, SMPT_BASE), f"mic{k} SMPT window")  # card -> host
        self.dp_iova = system.host_heap.alloc(MIC_DP_SIZE)
        self.host_bp = Bootparam(system.host_mem, self.dp_iova)
        # What the host hands the card: its own memory, the card's BAR0, SMPT addresses for its buffers.
        self.host_scif_memory = ScifMemory(system.host_mem, self.bar0, system.host_heap.alloc, system.host_heap.free,
                                           to_peer=lambda a, n: SMPT_BASE + a, name=f"host->mic{k}")
        # What the card OS has: GDDR (the host sees it at the same offsets), host memory through the SMPT.
        self.card_scif_memory = ScifMemory(self.gddr, self.smpt, self.heap.alloc, self.heap.free,
                                           name=f"mic{k}->host")
        self.host_irq = SoftIrq(f"host irq mic{k}")   # card->host doorbell c2h_scif_db
        self.card_irq = SoftIrq(f"mic{k} irq")        # host->card doorbell h2c_scif_db
        self.node: ScifNode | None = None
        self.host_qp: NodeQueuePair | None = None
        self.card_qp: NodeQueuePair | None = None


class System:
    """A host (node 0) and ``ncards`` cards (nodes 1..n), not yet connected."""

    def __init__(self, ncards: int = 1, alive_timeout: float = 2.0):
        self.host_ram = bytearray(HOST_RAM)
        self.host_mem = BufferMemory(self.host_ram, 0, "host RAM")
        self.host_heap = Heap(0x10000, HOST_RAM)
        self.alive_timeout = alive_timeout
        self.host = ScifNode(0, alive_timeout=alive_timeout, accept_step=0.2, name="host")
        self.cards = [Card(self, k) for k in range(ncards)]

    def boot(self, k: int = 0, timeout: float = WAIT) -> Card:
        """Spec 8.4 steps 1-4 for card k, each side polling the device page from its own thread."""
        c = self.cards[k]
        # Host SCIF probe (step 1).
        c.host_bp.init(c.node_id)
        c.host_qp = NodeQueuePair(c.host_scif_memory, name=f"host node qp mic{k}")
        hpeer = self.host.add_peer(c.node_id, c.host_qp)
        c.host_irq.handler = hpeer.interrupt
        publish_qp(c.host_bp, Side.HOST, c.host_qp.dma_addr, db=k % 4)
        # Card OS (step 2): the device page through the SMPT, at the address SPAD14/15 would give.
        card_bp = Bootparam(c.smpt, SMPT_BASE + c.dp_iova)
        assert card_bp.valid
        c.node = ScifNode(card_bp.node_id, alive_timeout=self.alive_timeout, accept_step=0.2, double_publish=True,
                          name=f"mic{k}")
        c.card_qp = NodeQueuePair(c.card_scif_memory, double_publish=True, name=f"mic{k} node qp")
        cpeer = c.node.add_peer(0, c.card_qp)
        c.card_irq.handler = cpeer.interrupt
        publish_qp(card_bp, Side.CARD, c.card_qp.dma_addr, db=0)
        c.card_bp = card_bp

        # Step 3 on both sides: poll, map the peer QP, send SCIF_INIT.
        def host_side():
            found = wait_peer_qp(c.host_bp, Side.HOST, timeout, interval=0.005)
            assert found, "card never published its QP"
            hpeer.start(found[0], doorbell=c.card_irq.ring)

        def card_side():
            found = wait_peer_qp(card_bp, Side.CARD, timeout, interval=0.005)
            assert found, "host never published its QP"
            cpeer.start(found[0], doorbell=c.host_irq.ring)

        ts = [threading.Thread(target=f, daemon=True) for f in (host_side, card_side)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout)
        assert self.host.wait_peer(c.node_id, timeout), "host never saw the card alive"
        assert c.node.wait_peer(0, timeout), "card never saw the host alive"
        return c

    def irq_errors(self) -> list[BaseException]:
        return [e for c in self.cards for irq in (c.host_irq, c.card_irq) for e in irq.errors]

    def close(self) -> None:
        for c in self.cards:
            c.host_irq.stop()
            c.card_irq.stop()
