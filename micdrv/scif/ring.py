"""The SCIF byte ring, ``struct scif_rb`` (spec 8.3).

A ring is a power-of-two byte buffer with two u32 offsets, masked with
``size - 1``, compared with the Linux ``CIRC_CNT``/``CIRC_SPACE`` macros, so
one byte always stays free and ``read == write`` means empty. The buffer and
the two offsets can each live on either side of the PCIe link, which is why
:class:`Ring` takes three separate things:

* the ring memory (a :class:`~micdrv.memory.Memory` and the base address of
  the buffer in it),
* ``read_ptr`` -- where the consumer's offset lives,
* ``write_ptr`` -- where the producer's offset lives.

The writer copies a message in (wrapping), and only then *publishes* its
write offset through ``write_ptr`` (``scif_rb_commit``); the reader copies
out and then publishes its read offset through ``read_ptr``
(``scif_rb_update_read_ptr``). Both keep private ``current_*`` copies and
refresh the other side's offset only when they run out of data or space.

"Nobody reads across PCIe" (spec 8.3): in a queue pair the writer's ring
buffer and the pointer it *loads* (``read_ptr``) are in different places --
the buffer is the peer's, the read offset is written by the peer into the
writer's own memory -- and the same holds for the reader. A :class:`Ring`
loads only the pointer it consumes from the other side and only stores the
pointer it owns; :mod:`.qp` wires them so that each side loads only its own
memory.

Every offset the peer publishes is validated before use: beyond the ring,
moving backwards, or claiming more than was ever written is a
:class:`~micdrv.scif.errors.RingError`, never an access outside the ring.
"""

from __future__ import annotations

from ..memory import Memory
from .errors import RingError


def circ_cnt(head: int, tail: int, size: int) -> int:
    """``CIRC_CNT``: bytes readable between ``tail`` (read) and ``head`` (write)."""
    return (head - tail) & (size - 1)


def circ_space(head: int, tail: int, size: int) -> int:
    """``CIRC_SPACE``: bytes writable; one byte always stays free."""
    return (tail - head - 1) & (size - 1)


class U32Ptr:
    """A ``u32 *`` into some :class:`Memory`: where one ring offset lives."""

    __slots__ = ("mem", "addr", "name")

    def __init__(self, mem: Memory, addr: int, name: str = ""):
        mem.window(addr, 4)  # fail now, not at the first message
        self.mem, self.addr, self.name = mem, addr, name

    def load(self) -> int:
        return self.mem.read_u32(self.addr)

    def store(self, value: int) -> None:
        self.mem.write_u32(self.addr, value)

    def __repr__(self) -> str:
        return f"<U32Ptr {self.name} @{self.addr:#x}>"


class Ring:
    """``struct scif_rb``: one SCIF byte ring, seen from its writer or its reader.

    ``read_ptr`` may be None while a queue pair is half set up (the kernel's
    "read pointer is NULL initially"): the reader then keeps its offset and
    publishes it once :meth:`set_read_ptr` gives it a place.

    ``double_publish``: the card writes every pointer update twice before
    ringing a doorbell (X100 erratum, spec 8.3).
    """

    def __init__(self, mem: Memory, base: int, size: int, *, read_ptr: U32Ptr | None, write_ptr: U32Ptr | None,
                 read_offset: int = 0, write_offset: int = 0, double_publish: bool = False, name: str = "ring"):
        if size < 2 or size & (size - 1):
            raise ValueError(f"{name}: SCIF ring size {size:#x} is not a power of two (spec 8.3)")
        self.name = name
        self.mem = mem.window(base, size, name)  # every access is inside the ring
        self.base = base
        self.size = size
        self.mask = size - 1
        self.read_ptr = read_ptr
        self.write_ptr = write_ptr
        self.double_publish = double_publish
        self.current_read_offset = self._check_offset(read_offset, "initial read")
        self.current_write_offset = self._check_offset(write_offset, "initial write")

    # --- validation ---------------------------------------------------------------
    def _check_offset(self, off: int, what: str) -> int:
        if not 0 <= off < self.size:
            raise RingError(f"{self.name}: {what} offset {off:#x} is outside the {self.size:#x}-byte ring")
        return off

    # --- writer -------------------------------------------------------------------
    def space(self) -> int:
        """``scif_rb_space``: refresh the peer's read offset and return the free bytes."""
        if self.read_ptr is not None:
            new = self._check_offset(self.read_ptr.load(), "peer read")
            # The reader can only consume what was written: its offset may not
            # pass ours (CIRC_CNT from the old read offset bounds the move).
            old = self.current_read_offset
            if circ_cnt(new, old, self.size) > circ_cnt(self.current_write_offset, old, self.size):
                raise RingError(f"{self.name}: peer read offset {new:#x} passes the write offset "
                                f"{self.current_write_offset:#x} (was {old:#x})")
            self.current_read_offset = new
        return circ_space(self.current_write_offset, self.current_read_offset, self.size)

    def write(self, data: bytes | bytearray | memoryview) -> bool:
        """``scif_rb_write``: copy all of ``data`` in (wrapping) or nothing; not yet visible."""
        n = len(data)
        if n > self.size - 1:
            raise ValueError(f"{self.name}: a {n}-byte message can never fit a {self.size:#x}-byte ring")
        if self.space() < n:
            return False
        off = self.current_write_offset
        first = min(n, self.size - off)
        self.mem.write(self.base + off, data[:first])
        if first < n:
            self.mem.write(self.base, data[first:])
        self.current_write_offset = (off + n) & self.mask
        return True

    def commit(self) -> None:
        """``scif_rb_commit``: publish the write offset to the reader."""
        self.write_ptr.store(self.current_write_offset)
        if self.double_publish:
            self.write_ptr.store(self.current_write_offset)

    def peek_space(self) -> int:
        """Free bytes as of now, changing nothing (for poll; the writer re-checks with :meth:`space`)."""
        r = self.current_read_offset
        if self.read_ptr is not None:
            new = self.read_ptr.load()
            if 0 <= new < self.size:
                r = new
        return circ_space(self.current_write_offset, r, self.size)

    # --- reader -------------------------------------------------------------------
    def count(self, want: int = 1) -> int:
        """``scif_rb_count``: readable bytes, refreshing the writer's offset if fewer than ``want``."""
        have = circ_cnt(self.current_write_offset, self.current_read_offset, self.size)
        if have < want and self.write_ptr is not None:
            new = self._check_offset(self.write_ptr.load(), "peer write")
            now = circ_cnt(new, self.current_read_offset, self.size)
            if now < have:
                raise RingError(f"{self.name}: peer write offset {new:#x} moved back over unread data "
                                f"(read {self.current_read_offset:#x}, write was {self.current_write_offset:#x})")
            self.current_write_offset = new
            have = now
        return have

    def read(self, n: int) -> bytes | None:
        """``scif_rb_get_next``: take exactly ``n`` bytes (wrapping), or None if fewer are there."""
        if n > self.size - 1:
            raise ValueError(f"{self.name}: a {n}-byte read can never be satisfied by a {self.size:#x}-byte ring")
        if self.count(n) < n:
            return None
        off = self.current_read_offset
        first = min(n, self.size - off)
        data = self.mem.read(self.base + off, first)
        if first < n:
            data += self.mem.read(self.base, n - first)
        self.current_read_offset = (off + n) & self.mask
        return data

    def peek_count(self) -> int:
        """Readable bytes as of now, changing nothing (for poll; the reader re-checks with :meth:`count`)."""
        w = self.current_write_offset
        if self.write_ptr is not None:
            new = self.write_ptr.load()
            if 0 <= new < self.size:
                w = new
        return circ_cnt(w, self.current_read_offset, self.size)

    def update_read_ptr(self) -> None:
        """``scif_rb_update_read_ptr``: publish the read offset (kept locally until there is a place)."""
        if self.read_ptr is None:
            return
        self.read_ptr.store(self.current_read_offset)
        if self.double_publish:
            self.read_ptr.store(self.current_read_offset)

    def set_read_ptr(self, ptr: U32Ptr) -> None:
        """Point the reader at its peer-visible read offset and publish the cached one there."""
        self.read_ptr = ptr
        self.update_read_ptr()

    def __repr__(self) -> str:
        return (f"<Ring {self.name} size={self.size:#x} read={self.current_read_offset:#x} "
                f"write={self.current_write_offset:#x}>")
