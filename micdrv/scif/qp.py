"""SCIF queue pairs: ``struct scif_qp`` and the set-up of its two rings (spec 8.3, 8.4 step 3, 8.5).

A queue pair joins two sides. Each side owns, in its *own* memory, a 256-byte
``struct scif_qp`` and an *inbound* ring the peer writes into. Its *outbound*
ring is the peer's inbound ring, reached across the link. The ring offsets
sit where the side that must *load* them can do so locally (spec 8.3,
"nobody reads across PCIe"):

=================  ================  =================  ==================
ring               buffer            read offset        write offset
=================  ================  =================  ==================
my inbound         my memory         peer's local_read  my local_write
my outbound        peer's memory     my local_read      peer's local_write
=================  ================  =================  ==================

so a side loads only its own ``local_write`` (how far the peer has written
into my inbound ring) and ``local_read`` (how far the peer has read my
messages), and only *stores* into the peer's QP. The same code runs on the
host (node 0; its memory is the DmaArena, the peer's is BAR0) and on a card
(its memory is GDDR, the peer's is host memory through the SMPT): the
difference is only the :class:`ScifMemory` each is given.

Set-up follows the kernel's three functions:

* :meth:`QueuePair.__init__` = ``scif_setup_qp_connect``: allocate my QP and
  inbound ring, write the fields the peer reads (magic, ``local_buf``,
  ``inbound_q.size``); the inbound read pointer is not known yet.
* :meth:`QueuePair.connect` = ``scif_setup_qp_connect_response``: given the
  peer's QP address, check its magic, map its inbound ring
  (``remote_qp.local_buf``, ``remote_qp.inbound_q.size``), set up the
  outbound ring, publish my inbound read offset into the peer's
  ``local_read`` and point my inbound reader there. Node QPs (both sides)
  and the connecting endpoint use this.
* :meth:`QueuePair.accept` = ``scif_setup_qp_accept``: the accepting endpoint
  maps the peer first, zeroes the peer's ``local_write``/``local_read`` and
  then builds its own side.

Everything read from the peer's QP is validated; a peer can make set-up fail
with :class:`~micdrv.scif.errors.ScifProtocolError`, never make us touch
memory outside the windows :meth:`ScifMemory.ioremap` hands out.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from ..memory import Memory, MemoryAccessError
from .errors import ScifProtocolError
from .ring import Ring, U32Ptr

# --- struct scif_qp (spec 8.3, x86-64) ------------------------------------------------
SCIFEP_MAGIC = 0x5C1F000000005C1F
QP_MAGIC = 0            # u64 magic
QP_OUTBOUND_Q = 8       # struct scif_rb outbound_q (40 bytes)
QP_INBOUND_Q = 48       # struct scif_rb inbound_q (40 bytes)
RB_SIZE = 24            # u32 size inside struct scif_rb: rb_base, read_ptr, write_ptr are pointers before it
QP_INBOUND_SIZE = QP_INBOUND_Q + RB_SIZE  # 72: the peer reads this
QP_LOCAL_WRITE = 128    # u32, 64-byte aligned: the peer's producer offset into my inbound ring
QP_LOCAL_READ = 192     # u32, 64-byte aligned: the peer's consumer offset of my outbound ring
QP_REMOTE_QP = 200      # the peer QP (a kernel pointer there; we store the peer's QP address)
QP_LOCAL_BUF = 208      # u64: the address the peer uses for my inbound ring
QP_LOCAL_QP = 216       # u64: the address the peer uses for this QP
QP_REMOTE_BUF = 224     # u64: the peer's local_buf
QP_STATE = 232          # u32 qp_state (P2P only; left 0 between host and card)
QP_SIZE = 256           # sizeof(struct scif_qp)
assert QP_INBOUND_SIZE == 72

SCIF_QP_ONLINE = 0xC0DE   # spec 8.3 qp_state values (P2P only)
SCIF_QP_OFFLINE = 0xDEAD

SCIF_NODE_QP_SIZE = 0x10000   # spec 8.3: node QP ring, 64 KiB
SCIF_ENDPT_QP_SIZE = 0x1000   # spec 8.3: endpoint QP ring, 4 KiB

# A peer announces its own ring size (inbound_q.size). Linux always uses the
# two sizes above; we accept any power of two in this range and refuse the
# rest, so a peer cannot make us map an absurd window. [INF] bound, our choice.
MIN_PEER_RING = 64
MAX_PEER_RING = 1 << 20


@dataclass(frozen=True)
class LocalBuffer:
    """Memory of mine the peer may reach: my address for it and the peer's (``scif_map_single``)."""

    addr: int
    size: int
    dma_addr: int


class ScifMemory:
    """How one side of a SCIF link reaches memory.

    * ``local`` -- my memory, in my addresses (host: the DmaArena by IOVA;
      card: GDDR by card physical address);
    * ``alloc(size) -> addr`` / ``free(addr, size)`` -- carve buffers out of
      ``local`` (64-byte aligned at least);
    * ``to_peer(addr, size) -> addr`` -- the address the peer uses for my
      buffer (``scif_map_single``; host: the SMPT address, spec 2.4; card:
      identity, the host sees GDDR through BAR0 at the same offset), with
      ``unmap_peer`` to drop it again;
    * ``remote`` -- the peer's memory in the addresses the peer hands out
      (``scif_ioremap``; host: BAR0 by card physical address; card: the SMPT
      window onto host memory).
    """

    def __init__(self, local: Memory, remote: Memory, alloc: Callable[[int], int],
                 free: Callable[[int, int], None], to_peer: Callable[[int, int], int] | None = None,
                 unmap_peer: Callable[[int, int], None] | None = None, name: str = ""):
        self.local = local
        self.remote = remote
        self._alloc = alloc
        self._free = free
        self._to_peer = to_peer or (lambda addr, size: addr)
        self._unmap_peer = unmap_peer
        self.name = name

    def map_single(self, size: int) -> LocalBuffer:
        """Allocate ``size`` zeroed bytes of my memory and the peer's address for them."""
        addr = self._alloc(size)
        try:
            self.local.write(addr, bytes(size))  # kzalloc
            return LocalBuffer(addr, size, self._to_peer(addr, size))
        except BaseException:
            self._free(addr, size)
            raise

    def unmap_single(self, buf: LocalBuffer) -> None:
        if self._unmap_peer is not None:
            self._unmap_peer(buf.dma_addr, buf.size)
        self._free(buf.addr, buf.size)

    def ioremap(self, dma_addr: int, size: int, what: str) -> Memory:
        """A window onto ``[dma_addr, +size)`` of the peer's memory; refused if it is not all reachable."""
        try:
            return self.remote.window(dma_addr, size, what)
        except MemoryAccessError as e:
            raise ScifProtocolError(f"{self.name}: the peer's {what} at [{dma_addr:#x}, +{size:#x}) "
                                    f"is not reachable: {e}") from None


class QueuePair:
    """My ``struct scif_qp`` with its inbound ring, and (once connected) the outbound ring."""

    def __init__(self, memory: ScifMemory, ring_size: int, *, double_publish: bool = False, name: str = "qp"):
        if ring_size < MIN_PEER_RING or ring_size & (ring_size - 1):
            raise ValueError(f"{name}: ring size {ring_size:#x} must be a power of two >= {MIN_PEER_RING}")
        self.memory = memory
        self.name = name
        self.double_publish = double_publish
        self.ring_size = ring_size
        self._lock = threading.RLock()  # connect/disconnect vs. a drain that dispatches on this thread
        self.qp_buf = memory.map_single(QP_SIZE)
        try:
            self.ring_buf = memory.map_single(ring_size)
        except BaseException:
            memory.unmap_single(self.qp_buf)
            raise
        self.local = memory.local.window(self.qp_buf.addr, QP_SIZE, f"{name} scif_qp")
        q = self.qp_buf.addr
        self.local.write_u64(q + QP_MAGIC, SCIFEP_MAGIC)
        self.local.write_u32(q + QP_INBOUND_SIZE, ring_size)
        self.local.write_u64(q + QP_LOCAL_BUF, self.ring_buf.dma_addr)
        self.local.write_u64(q + QP_LOCAL_QP, self.qp_buf.dma_addr)
        self.local_write = U32Ptr(self.local, q + QP_LOCAL_WRITE, "local_write")
        self.local_read = U32Ptr(self.local, q + QP_LOCAL_READ, "local_read")
        # scif_setup_qp_connect: "the read pointer is NULL initially".
        self.inbound = Ring(memory.local, self.ring_buf.addr, ring_size, read_ptr=None,
                            write_ptr=self.local_write, double_publish=double_publish, name=f"{name} inbound")
        self.outbound: Ring | None = None
        self.remote_qp: Memory | None = None
        self.peer_qp_addr: int | None = None
        self.closed = False

    # --- addresses ------------------------------------------------------------------
    @property
    def dma_addr(self) -> int:
        """The address the peer uses for this QP (the ``qp_offset`` sent in CNCT_REQ/GNT, the device page)."""
        return self.qp_buf.dma_addr

    @property
    def connected(self) -> bool:
        return self.outbound is not None

    # --- the peer's QP --------------------------------------------------------------
    def _map_peer(self, peer_qp_addr: int) -> tuple[Memory, Ring]:
        """Map and check the peer's QP; returns it and the outbound ring onto its inbound ring."""
        rq = self.memory.ioremap(peer_qp_addr, QP_SIZE, "scif_qp")
        magic = rq.read_u64(peer_qp_addr + QP_MAGIC)
        if magic != SCIFEP_MAGIC:
            raise ScifProtocolError(f"{self.name}: SCIFEP_MAGIC mismatch in the peer QP at {peer_qp_addr:#x}: "
                                    f"{magic:#x} (spec 8.3: {SCIFEP_MAGIC:#x})")
        remote_buf = rq.read_u64(peer_qp_addr + QP_LOCAL_BUF)
        remote_size = rq.read_u32(peer_qp_addr + QP_INBOUND_SIZE)
        if not MIN_PEER_RING <= remote_size <= MAX_PEER_RING or remote_size & (remote_size - 1):
            raise ScifProtocolError(f"{self.name}: the peer's inbound_q.size {remote_size:#x} is not a power of two "
                                    f"in [{MIN_PEER_RING:#x}, {MAX_PEER_RING:#x}]")
        ring_mem = self.memory.ioremap(remote_buf, remote_size, "inbound ring")
        # Outbound: the buffer is remote, the read offset local, the write offset remote.
        outbound = Ring(ring_mem, remote_buf, remote_size, read_ptr=self.local_read,
                        write_ptr=U32Ptr(rq, peer_qp_addr + QP_LOCAL_WRITE, "peer local_write"),
                        double_publish=self.double_publish, name=f"{self.name} outbound")
        return rq, outbound

    def _record_peer(self, rq: Memory, peer_qp_addr: int, outbound: Ring) -> None:
        q = self.qp_buf.addr
        self.local.write_u64(q + QP_REMOTE_QP, peer_qp_addr)
        self.local.write_u64(q + QP_REMOTE_BUF, outbound.base)
        self.local.write_u32(q + QP_OUTBOUND_Q + RB_SIZE, outbound.size)
        self.remote_qp, self.peer_qp_addr, self.outbound = rq, peer_qp_addr, outbound

    def connect(self, peer_qp_addr: int) -> None:
        """``scif_setup_qp_connect_response`` (spec 8.4 step 3; the connecting endpoint, spec 8.5)."""
        with self._lock:
            if self.closed:
                raise ScifProtocolError(f"{self.name}: queue pair is closed")
            rq, outbound = self._map_peer(peer_qp_addr)
            self.local_read.store(0)
            # "Because the node QP may already be processing an INIT message,
            # set the read pointer so the cached read offset isn't lost."
            self.inbound.set_read_ptr(U32Ptr(rq, peer_qp_addr + QP_LOCAL_READ, "peer local_read"))
            self._record_peer(rq, peer_qp_addr, outbound)

    @classmethod
    def accept(cls, memory: ScifMemory, ring_size: int, peer_qp_addr: int, *, double_publish: bool = False,
               name: str = "qp") -> "QueuePair":
        """``scif_setup_qp_accept``: build my side against a peer that has already set up its own (spec 8.5)."""
        self = cls(memory, ring_size, double_publish=double_publish, name=name)
        try:
            rq, outbound = self._map_peer(peer_qp_addr)
            rq.write_u32(peer_qp_addr + QP_LOCAL_WRITE, 0)
            rq.write_u32(peer_qp_addr + QP_LOCAL_READ, 0)
            self.inbound.set_read_ptr(U32Ptr(rq, peer_qp_addr + QP_LOCAL_READ, "peer local_read"))
            self._record_peer(rq, peer_qp_addr, outbound)
        except BaseException:
            self.close()
            raise
        return self

    # --- teardown -------------------------------------------------------------------
    def disconnect(self) -> None:
        """Forget the peer (``scif_cleanup_qp``): no more stores into its memory.

        My inbound ring stays readable; its offsets restart at zero for the
        next :meth:`connect` (a node QP survives its peer's EXIT, spec 8.4
        step 6).
        """
        with self._lock:
            self.outbound = None
            self.remote_qp = None
            self.peer_qp_addr = None
            self.inbound.read_ptr = None

    def reset(self) -> None:
        """:meth:`disconnect` and rewind the inbound ring, ready for the peer to set up again."""
        self.disconnect()
        with self._lock:
            if not self.closed:
                self.local_write.store(0)
                self.inbound.current_read_offset = 0
                self.inbound.current_write_offset = 0

    def close(self) -> None:
        """Free my QP and inbound ring (``scif_teardown_ep`` / ``scif_free_qp``)."""
        self.disconnect()
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.local.write_u64(self.qp_buf.addr + QP_MAGIC, 0)
            self.memory.unmap_single(self.ring_buf)
            self.memory.unmap_single(self.qp_buf)

    def __repr__(self) -> str:
        peer = f"{self.peer_qp_addr:#x}" if self.peer_qp_addr is not None else "-"
        return f"<QueuePair {self.name} qp={self.dma_addr:#x} peer={peer} ring={self.ring_size:#x}>"


def read_qp(mem: Memory, addr: int) -> dict[str, int]:
    """The fields of a ``struct scif_qp`` at ``addr`` (for debugging and tests)."""
    return {
        "magic": mem.read_u64(addr + QP_MAGIC),
        "outbound_q.size": mem.read_u32(addr + QP_OUTBOUND_Q + RB_SIZE),
        "inbound_q.size": mem.read_u32(addr + QP_INBOUND_SIZE),
        "local_write": mem.read_u32(addr + QP_LOCAL_WRITE),
        "local_read": mem.read_u32(addr + QP_LOCAL_READ),
        "remote_qp": mem.read_u64(addr + QP_REMOTE_QP),
        "local_buf": mem.read_u64(addr + QP_LOCAL_BUF),
        "local_qp": mem.read_u64(addr + QP_LOCAL_QP),
        "remote_buf": mem.read_u64(addr + QP_REMOTE_BUF),
        "qp_state": mem.read_u32(addr + QP_STATE),
    }
