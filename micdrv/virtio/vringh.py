"""vringh: the device (host) side of a split ring, every field the driver wrote validated (virtio-legacy.md 1, 6).

What the host does with a ring, after Linux ``drivers/vhost/vringh.c``:

1. :meth:`Vringh.pop` reads ``avail.idx``; if it moved, takes the next head
   from ``avail.ring``, walks its descriptor chain and returns a
   :class:`DescChain` -- the buffers as ``(addr, len, writable)`` in the
   *driver's* address space. The ring never touches payload: a transport
   decides how it is reached (zero-copy views of shared memory, DMA into
   staging buffers for VOP).
2. :meth:`Vringh.push` / :meth:`push_many` write used elements, then one
   store of ``used.idx`` publishes them all.
3. :meth:`Vringh.needs_notify` decides whether the driver wants an
   interrupt (``avail.flags`` NO_INTERRUPT, or ``used_event`` with
   EVENT_IDX, section 1.4); one decision per batch.
4. :meth:`Vringh.disable_notify` / :meth:`enable_notify` suppress kicks
   while draining; :meth:`enable_notify` returns False if more buffers
   arrived meanwhile, so a drain loop never sleeps on a non-empty ring
   (section 1.6).

The three parts are independent (memory, address) pairs, and
:meth:`Vringh.set_used` re-points the used ring when the MIC card moves it
into its own memory (x100-host-abi.md 5.5).

Validation (section 6.3; a failure is a :class:`~.ring.VringError` whose
message names the ring, the descriptor and the problem, and the ring is
*broken* until :meth:`reset`):

* avail.idx may run at most ``num`` ahead of the heads already taken (QEMU
  "Guest moved used index");
* every head and every ``next`` lies inside the table being walked;
* a chain has at most ``num`` descriptors (an indirect table at most its
  own ``len/16``), so a loop always ends;
* every buffer is non-empty and ``[addr, addr + len)`` lies inside the
  driver memory window (``buffers``), without 64-bit wrap-around;
* no readable buffer follows a writable one;
* INDIRECT only when negotiated, only on the head descriptor, never with
  NEXT (the spec forbids drivers that; vringh tolerated it -- we refuse,
  Linux never does it), never inside a table; the table is non-empty, a
  multiple of 16 bytes, at most ``num`` entries, inside the window, and is
  read once (the driver cannot change it while it is walked). The WRITE
  flag on an INDIRECT descriptor is ignored;
* a head is not taken again while it is in flight.

The device's own mistakes (completing a head that is not in flight, a used
length larger than the chain's writable bytes) are ``ValueError``: they are
bugs here, not the peer's.

Not validated (harmless to the host, the driver's own problem): two chains
in flight sharing descriptors or buffers; the driver rewriting a chain's
descriptors after it was taken (the walk copied what it needed, once);
``used_event`` / ``avail.flags`` values (advice only). Payload is never
touched here, so buffer *contents* are the transport's and backend's to
check.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from ..memory import Memory
from .access import full_barrier, ring_part
from .device import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from .ring import (AVAIL_ALIGN, AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING, DESC, DESC_ALIGN, DESC_SIZE, USED_ALIGN,
                   USED_ELEM, USED_ELEM_SIZE, USED_FLAGS, USED_IDX, USED_RING, VRING_AVAIL_F_NO_INTERRUPT,
                   VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY, VringError,
                   VringLayout, avail_event_offset, avail_size, check_num, desc_table_size, used_event_offset,
                   used_size, vring_need_event)

# Indirect tables remembered per ring (see Vringh._walk): two rings' worth of distinct buffers; past it the
# cache starts again [choice: a driver cycling through more tables only walks them as before].
MAX_SHAPES = 512

RingAddress = tuple[Memory, int]  # where one part of a ring lives: a memory and an address in it


class Buffer(NamedTuple):
    """One buffer of a chain, in the driver's address space."""

    addr: int
    len: int
    writable: bool


class ChainShape:
    """What walking one indirect table gave (shared by every chain whose table held the same bytes).

    ``memo`` is free for a transport to keep what it derives from the
    buffers alone (a staging layout), computed once per shape.
    """

    __slots__ = ("readable", "writable", "readable_len", "writable_len", "memo")

    def __init__(self, readable: list[tuple[int, int]], writable: list[tuple[int, int]], readable_len: int,
                 writable_len: int):
        self.readable, self.writable = readable, writable
        self.readable_len, self.writable_len = readable_len, writable_len
        self.memo = None


class DescChain:
    """A validated descriptor chain: its head, its buffers as ``(addr, len)`` pairs (readable ones first).

    The buffer lists may be shared with other chains of the same shape
    (:class:`ChainShape`, then ``shape`` is it): read them, never change them.
    """

    __slots__ = ("head", "readable", "writable", "readable_len", "writable_len", "avail_idx", "shape")

    def __init__(self, head: int, readable: list[tuple[int, int]], writable: list[tuple[int, int]],
                 readable_len: int, writable_len: int, avail_idx: int, shape: ChainShape | None = None):
        self.head = head
        self.readable = readable          # device-readable buffers, in chain order
        self.writable = writable          # device-writable buffers, in chain order (all after the readable ones)
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.avail_idx = avail_idx        # the avail index this head was taken from (for abandon)
        self.shape = shape                # the cached walk it came from (indirect chains), else None

    @property
    def buffers(self) -> list[Buffer]:
        """Every buffer as ``(addr, len, writable)``, in chain order."""
        return [Buffer(a, n, False) for a, n in self.readable] + [Buffer(a, n, True) for a, n in self.writable]

    def __repr__(self) -> str:
        return (f"<DescChain head={self.head} {len(self.readable)}r/{len(self.writable)}w "
                f"{self.readable_len}+{self.writable_len} bytes>")


class Vringh:
    """The device side of one split ring of ``num`` entries.

    ``desc``, ``avail`` and ``used`` say where each part lives; ``buffers``
    is the driver memory every buffer address and indirect table must lie
    in. ``features`` is the acked feature word: RING_EVENT_IDX and
    RING_INDIRECT_DESC change how the ring is spoken.
    """

    def __init__(self, num: int, desc: RingAddress, avail: RingAddress, used: RingAddress, buffers: Memory,
                 features: int = 0, name: str = "vring"):
        self.name = name
        try:
            check_num(num)
        except VringError as e:
            raise VringError(f"{name}: {e}") from None
        self.num = num
        self._mask = num - 1
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.indirect = bool(features >> VIRTIO_RING_F_INDIRECT_DESC & 1)
        self._desc = ring_part(*desc, desc_table_size(num), DESC_ALIGN, f"{name}: descriptor table")
        self._desc_mv = getattr(self._desc, "mv", None)
        self._avail = ring_part(*avail, avail_size(num), AVAIL_ALIGN, f"{name}: avail ring")
        self._used = ring_part(*used, used_size(num), USED_ALIGN, f"{name}: used ring")
        self._used_event = used_event_offset(num)
        self._avail_event = avail_event_offset(num)
        self.buffers = buffers
        self._buf_lo = buffers.base
        self._buf_hi = buffers.base + buffers.size
        self._buf_mv = buffers.view(buffers.base, buffers.size)   # indirect tables read straight (or None)
        self._shapes: dict[bytes, ChainShape] = {}   # indirect table bytes -> what walking them gave
        self.shape_hits = 0
        self.reset()

    @classmethod
    def legacy(cls, num: int, mem: Memory, addr: int, align: int, buffers: Memory, features: int = 0,
               name: str = "vring") -> "Vringh":
        """A ring in the legacy contiguous layout at ``addr`` (section 1.2)."""
        lay = VringLayout(num, align)
        return cls(num, (mem, addr + lay.desc), (mem, addr + lay.avail), (mem, addr + lay.used), buffers,
                   features, name)

    # --- state --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything: indices to 0, nothing in flight, not broken (the driver reset the device)."""
        self.last_avail = 0       # next avail index to take
        self.used_idx = 0         # next used index to fill
        self._signalled = 0       # used.idx at the last notification decision
        self._unsignalled = 0     # completions since then
        self._inflight: dict[int, tuple[int, int]] = {}  # head -> (writable bytes, avail index)
        self._kicks_disabled = False
        self.broken: str | None = None

    def set_used(self, used: RingAddress) -> None:
        """Move the used ring (MIC: into card memory once the card wrote ``used_address``, spec 5.5).

        The device owns the used part, so its current ``idx`` and flags are
        written into the new place.
        """
        part = ring_part(*used, used_size(self.num), USED_ALIGN, f"{self.name}: used ring")
        self._used = part
        part.set_u16(USED_IDX, self.used_idx)
        part.set_u16(USED_FLAGS, VRING_USED_F_NO_NOTIFY if self._kicks_disabled and not self.event_idx else 0)

    @property
    def in_flight(self) -> int:
        """Chains taken and not yet completed."""
        return len(self._inflight)

    def _fail(self, message: str) -> VringError:
        self.broken = f"{self.name}: {message}"
        return VringError(self.broken)

    def _check_not_broken(self) -> None:
        if self.broken is not None:
            raise VringError(f"{self.broken} (the ring is broken until the driver resets the device)")

    # --- taking chains ------------------------------------------------------------------------

    def avail_pending(self) -> int:
        """Heads the driver made available that were not taken yet (validated against ``num``)."""
        self._check_not_broken()
        avail_idx = self._avail.u16(AVAIL_IDX)
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending > self.num:
            raise self._fail(f"avail.idx {avail_idx} is {pending} ahead of the {self.last_avail} already taken, "
                             f"more than the {self.num} ring entries")
        return pending

    def pop(self) -> DescChain | None:
        """The next available chain, validated; None when the ring is empty."""
        chains = self.pop_many(1)
        return chains[0] if chains else None

    def pop_many(self, limit: int) -> list[DescChain]:
        """Up to ``limit`` available chains (fewer when the ring runs empty); avail.idx is read once."""
        n = min(limit, self.avail_pending())
        out = []
        avail, inflight, mask, num = self._avail, self._inflight, self._mask, self.num
        # The fast path of a chain whose head is an indirect descriptor (the WRITE flag ignored, nothing else
        # set) with a valid table inside the window that was walked before (Vringh._walk's shape cache): the
        # checks _indirect_table makes, then the cached walk. Anything else is walked in full.
        desc_mv, buf_mv, shapes = self._desc_mv, self._buf_mv, self._shapes
        fast = self.indirect and desc_mv is not None and buf_mv is not None
        lo, hi, table_max = self._buf_lo, self._buf_hi, num * DESC_SIZE
        unpack_from = DESC.unpack_from
        ah = getattr(avail, "words", None)   # a mapped avail ring as 16-bit words (one load per entry)
        ring0 = AVAIL_RING >> 1
        last = self.last_avail
        hits = 0
        # Read barrier (section 1.5 step 1): program order on x86.
        try:
            for _ in range(n):
                slot = last & mask
                head = ah[ring0 + slot] if ah is not None else avail.u16(AVAIL_RING + 2 * slot)
                if head >= num:
                    raise self._fail(f"avail.ring[{slot}]: head {head} out of range 0..{num - 1}")
                if head in inflight:
                    raise self._fail(f"avail.ring[{slot}]: head {head} is already in flight")
                chain = None
                if fast:
                    addr, length, flags, _nxt = unpack_from(desc_mv, head << 4)
                    if (flags & ~VRING_DESC_F_WRITE == VRING_DESC_F_INDIRECT and 0 < length <= table_max
                            and not length & 15 and lo <= addr and addr + length <= hi):
                        shape = shapes.get(bytes(buf_mv[addr - lo:addr - lo + length]))
                        if shape is not None:
                            hits += 1
                            chain = DescChain(head, shape.readable, shape.writable, shape.readable_len,
                                              shape.writable_len, last, shape)
                if chain is None:
                    chain = self._walk(head, last)
                inflight[head] = (chain.writable_len, last)
                last = (last + 1) & 0xFFFF
                out.append(chain)
        finally:
            self.last_avail = last          # the chains taken before a broken one stay taken, as before
            self.shape_hits += hits
        return out

    def abandon(self, chains: list[DescChain]) -> None:
        """Give back the most recently taken ``chains`` unused, as if never taken (vringh_abandon).

        They must be the last chains taken, in the order taken; the driver
        sees them again at the next :meth:`pop`.
        """
        if not chains:
            return
        k = len(chains)
        for j, c in enumerate(chains):
            want = (self.last_avail - k + j) & 0xFFFF
            entry = self._inflight.get(c.head)
            if entry is None or entry[1] != want or c.avail_idx != want:
                raise ValueError(f"{self.name}: abandon of head {c.head}: only the last chains taken, in order, "
                                 f"can be given back")
        for c in chains:
            del self._inflight[c.head]
        self.last_avail = (self.last_avail - k) & 0xFFFF

    def _walk(self, head: int, avail_idx: int) -> DescChain:
        # The hot loop of the device side: one unpack and a few integer tests per descriptor.
        num = self.num
        lo, hi = self._buf_lo, self._buf_hi
        src = self._desc_mv              # the table as a memoryview (or an indirect table as bytes) ...
        fetch = self._desc.unpack        # ... else read through the Memory, one descriptor at a time
        unpack_from = DESC.unpack_from
        in_table = False
        table = b""                      # the indirect table's bytes, once in one
        size = num                       # entries in the table being walked
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        readable_len = writable_len = 0
        i = head
        count = 0
        while True:
            count += 1
            if count > size:
                raise self._fail(f"chain from head {head} has more than {size} descriptors: a loop")
            if src is not None:
                addr, length, flags, nxt = unpack_from(src, i << 4)
            else:
                addr, length, flags, nxt = fetch(DESC, i << 4)
            if flags & VRING_DESC_F_INDIRECT:
                src = self._indirect_table(head, i, count, addr, length, flags, in_table)
                # The walk below depends on nothing but the table's bytes (and this ring's constants), so a
                # table seen before gives the same chain again without walking it: a driver reposting the
                # same buffers (virtio-net's receive buffers) costs one dictionary lookup.
                shape = self._shapes.get(src)
                if shape is not None:
                    self.shape_hits += 1
                    return DescChain(head, shape.readable, shape.writable, shape.readable_len, shape.writable_len,
                                     avail_idx, shape)
                table = src
                in_table = True
                size = length // DESC_SIZE
                i = count = 0
                continue
            if not length:
                raise self._fail(f"{self._where(head, in_table)} {i}: zero-length buffer")
            if addr < lo or addr + length > hi:
                self._bad_range(addr, length, f"{self._where(head, in_table)} {i}: buffer")
            if flags & VRING_DESC_F_WRITE:
                writable.append((addr, length))
                writable_len += length
            else:
                if writable_len:
                    raise self._fail(f"{self._where(head, in_table)} {i}: readable buffer after a writable one")
                readable.append((addr, length))
                readable_len += length
            if not flags & VRING_DESC_F_NEXT:
                if not in_table:
                    return DescChain(head, readable, writable, readable_len, writable_len, avail_idx)
                shape = ChainShape(readable, writable, readable_len, writable_len)
                if len(self._shapes) >= MAX_SHAPES:
                    self._shapes.clear()
                self._shapes[table] = shape
                return DescChain(head, readable, writable, readable_len, writable_len, avail_idx, shape)
            if nxt >= size:
                raise self._fail(f"{self._where(head, in_table)} {i}: next {nxt} out of range 0..{size - 1}")
            i = nxt

    @staticmethod
    def _where(head: int, in_table: bool) -> str:
        return f"indirect descriptor (head {head})" if in_table else "descriptor"

    def _indirect_table(self, head: int, i: int, count: int, addr: int, length: int, flags: int,
                        in_table: bool) -> bytes:
        """Validate an INDIRECT descriptor and read its table once (section 6.3 check 6)."""
        where = self._where(head, in_table)
        if in_table:
            raise self._fail(f"{where} {i} (table of head {head}): INDIRECT inside an indirect table")
        if not self.indirect:
            raise self._fail(f"{where} {i}: INDIRECT but VIRTIO_RING_F_INDIRECT_DESC was not negotiated")
        if count != 1:
            raise self._fail(f"{where} {i}: INDIRECT is only allowed on the head of a chain (head {head})")
        if flags & VRING_DESC_F_NEXT:
            raise self._fail(f"{where} {i}: INDIRECT together with NEXT")
        if length == 0 or length % DESC_SIZE:
            raise self._fail(f"{where} {i}: indirect table of {length} bytes is not a non-zero multiple "
                             f"of {DESC_SIZE}")
        if length // DESC_SIZE > self.num:
            raise self._fail(f"{where} {i}: indirect table of {length // DESC_SIZE} descriptors is "
                             f"longer than the ring ({self.num})")
        if addr < self._buf_lo or addr + length > self._buf_hi:
            self._bad_range(addr, length, f"{where} {i}: indirect table")
        mv = self._buf_mv
        if mv is not None:
            off = addr - self._buf_lo
            return bytes(mv[off:off + length])   # a snapshot, and a key for the shape cache
        data = self.buffers.read(addr, length)
        return data if type(data) is bytes else bytes(data)

    def _bad_range(self, addr: int, length: int, what: str) -> None:
        if addr + length > 1 << 64:
            raise self._fail(f"{what} [{addr:#x}, +{length:#x}) wraps around the 64-bit address space")
        raise self._fail(f"{what} [{addr:#x}, +{length:#x}) lies outside the driver memory "
                         f"[{self._buf_lo:#x}, {self._buf_hi:#x})")

    # --- completing chains --------------------------------------------------------------------

    def push(self, head: int, length: int) -> None:
        """Return one chain with ``length`` bytes written into its writable buffers."""
        self.push_many(((head, length),))

    def push_many(self, done: Iterable[tuple[int, int]]) -> None:
        """Return several chains: used elements first, then one ``used.idx`` store publishes them."""
        self._check_not_broken()
        if type(done) is not list:
            done = list(done)
        inflight = self._inflight
        get = inflight.get
        for head, length in done:
            entry = get(head)
            if entry is None or not 0 <= length <= entry[0]:
                if entry is None:
                    raise ValueError(f"{self.name}: completing head {head}, which is not in flight")
                raise ValueError(f"{self.name}: completing head {head} with {length} bytes written, but its "
                                 f"writable buffers hold {entry[0]}")
        if len(done) > 1 and len({head for head, _n in done}) != len(done):
            seen = set()
            for head, _n in done:
                if head in seen:
                    raise ValueError(f"{self.name}: completing head {head}, which is not in flight")
                seen.add(head)
        used = self._used
        idx = self.used_idx
        mask = self._mask
        mv = getattr(used, "mv", None)     # a mapped used ring: the entries packed straight into it
        pack_into = USED_ELEM.pack_into
        if mv is not None:
            for head, length in done:
                del inflight[head]
                pack_into(mv, USED_RING + USED_ELEM_SIZE * (idx & mask), head, length)
                idx = (idx + 1) & 0xFFFF
        else:
            for head, length in done:
                del inflight[head]
                used.pack(USED_ELEM, USED_RING + USED_ELEM_SIZE * (idx & mask), head, length)
                idx = (idx + 1) & 0xFFFF
        # Write barrier (section 1.5 step 2): program order on x86, then the one idx store.
        used.set_u16(USED_IDX, idx)
        self.used_idx = idx
        self._unsignalled += len(done)

    def needs_notify(self) -> bool:
        """Whether the driver wants an interrupt for the completions since the last decision (section 1.4)."""
        n = self._unsignalled
        if not n:
            return False
        full_barrier()  # section 1.5 step 3: used.idx store before reading flags / used_event
        old, new = self._signalled, self.used_idx
        self._signalled, self._unsignalled = new, 0
        if self.event_idx:
            if n > 0xFFFF:  # the 16-bit window is ambiguous: notify (vringh)
                return True
            return vring_need_event(self._avail.u16(self._used_event), new, old)
        return not self._avail.u16(AVAIL_FLAGS) & VRING_AVAIL_F_NO_INTERRUPT

    # --- kick suppression ---------------------------------------------------------------------

    def disable_notify(self) -> None:
        """Ask the driver not to kick (NO_NOTIFY; with EVENT_IDX nothing needs writing, section 1.6)."""
        if not self._kicks_disabled:
            self._kicks_disabled = True
            if not self.event_idx:
                self._used.set_u16(USED_FLAGS, VRING_USED_F_NO_NOTIFY)

    def enable_notify(self) -> bool:
        """Ask for kicks again; True if the ring is still empty (safe to sleep), False if more arrived."""
        self._check_not_broken()
        self._kicks_disabled = False
        if self.event_idx:
            self._used.set_u16(self._avail_event, self.last_avail)
        else:
            self._used.set_u16(USED_FLAGS, 0)
        full_barrier()  # section 1.5 step 4: before re-reading avail.idx
        return self._avail.u16(AVAIL_IDX) == self.last_avail

    def __repr__(self) -> str:
        return (f"<Vringh {self.name} num={self.num} last_avail={self.last_avail} used={self.used_idx} "
                f"in_flight={len(self._inflight)}{' BROKEN' if self.broken else ''}>")
