"""The driver side of a split ring: what a guest's virtio driver does (Linux ``drivers/virtio/virtio_ring.c``).

Used by the simulated card's virtio drivers and by tests that play the
guest against a real device. :class:`DriverRing` owns the three parts of
one ring (each a memory and an address, as in :mod:`.vringh`) and:

* :meth:`~DriverRing.add` places a chain -- readable ("out") buffers, then
  writable ("in") buffers, given as ``(addr, len)`` in the driver's address
  space -- in free descriptors (or in one INDIRECT descriptor pointing at a
  per-head table when RING_INDIRECT_DESC is negotiated), puts its head in
  the avail ring and publishes ``avail.idx``;
* :meth:`~DriverRing.kick_prepare` says whether the device wants a kick
  (``used.flags`` NO_NOTIFY, or ``avail_event`` with EVENT_IDX, section 1.4);
* :meth:`~DriverRing.get_used` returns completed chains as ``(token, len)``,
  validating what the device wrote (an ``id`` that is not an outstanding head
  is "BAD_RING" in Linux, section 1.7) and freeing their descriptors;
* :meth:`~DriverRing.disable_cb` / :meth:`~DriverRing.enable_cb` suppress
  interrupts; ``enable_cb`` returns False if completions arrived meanwhile.

Barriers follow section 1.5 (see :mod:`.access`). The free list is kept in
Python, never read back from the descriptor table, so a device that
scribbles on the table cannot corrupt it.
"""

from __future__ import annotations

import functools
import struct
from typing import Any, Sequence

from ..memory import Memory
from .access import full_barrier, ring_part
from .device import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC
from .ring import (AVAIL_ALIGN, AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING, DESC, DESC_ALIGN, DESC_SIZE, USED_ALIGN,
                   USED_ELEM, USED_ELEM_SIZE, USED_FLAGS, USED_IDX, USED_RING, VRING_AVAIL_F_NO_INTERRUPT,
                   VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_USED_F_NO_NOTIFY, VringError,
                   VringLayout, avail_event_offset, avail_size, check_num, desc_table_size, used_event_offset,
                   used_size, vring_need_event)
from .vringh import RingAddress


class RingFull(Exception):
    """Not enough free descriptors for a chain (Linux -ENOSPC): wait for completions."""


_NOT_LAST = ~VRING_DESC_F_NEXT
_PAIR = struct.Struct("<QIHHQIHH")     # an indirect table of two descriptors
_tables: dict[int, struct.Struct] = {}


def _table_struct(n: int) -> struct.Struct:
    """``n`` descriptors packed back to back (an indirect table): one ``pack_into`` for the whole table."""
    st = _tables.get(n)
    if st is None:
        st = _tables[n] = struct.Struct("<" + "QIHH" * n)
    return st


class PreparedChain:
    """A chain a driver posts again and again (a receive buffer): its buffers, and its indirect table's bytes
    built once when the ring would use one (:meth:`DriverRing.prepare`)."""

    __slots__ = ("out", "in_", "table", "writable_len")

    def __init__(self, out, in_, table: bytes | None, writable_len: int):
        self.out, self.in_, self.table, self.writable_len = out, in_, table, writable_len


class DriverRing:
    """The driver side of one split ring of ``num`` entries; zeroes its parts on creation (the card does, 5.4).

    ``indirect`` is where per-head indirect tables go: ``(memory, addr,
    entries)`` reserves ``entries`` descriptors for each head at ``addr +
    head * entries * 16`` (``num * entries * 16`` bytes), used when
    RING_INDIRECT_DESC is in ``features`` and a chain has more than one
    buffer but at most ``entries``.
    """

    def __init__(self, num: int, desc: RingAddress, avail: RingAddress, used: RingAddress, features: int = 0,
                 indirect: tuple[Memory, int, int] | None = None, name: str = "vring", zero: bool = True):
        check_num(num)
        self.name = name
        self.num = num
        self._mask = num - 1
        self.event_idx = bool(features >> VIRTIO_RING_F_EVENT_IDX & 1)
        self.use_indirect = bool(features >> VIRTIO_RING_F_INDIRECT_DESC & 1) and indirect is not None
        self._desc = ring_part(*desc, desc_table_size(num), DESC_ALIGN, f"{name}: descriptor table")
        self._avail = ring_part(*avail, avail_size(num), AVAIL_ALIGN, f"{name}: avail ring")
        self._used = ring_part(*used, used_size(num), USED_ALIGN, f"{name}: used ring")
        self._used_event = used_event_offset(num)
        self._avail_event = avail_event_offset(num)
        self._indirect_parts = None
        self._indirect_entries = 0
        if indirect is not None:
            mem, addr, entries = indirect
            if entries < 1:
                raise ValueError("indirect tables need at least one entry")
            self._indirect_entries = entries
            self._indirect_parts = ring_part(mem, addr, num * entries * DESC_SIZE, DESC_ALIGN,
                                             f"{name}: indirect tables")
        if zero:
            for p in (self._desc, self._avail, self._used):
                p.zero()
        self._free = list(range(num - 1, -1, -1))  # a stack of free descriptor indices
        self._out: dict[int, tuple[Any, list[int], int]] = {}   # head -> (token, descriptors, writable length)
        self.avail_idx = 0      # next avail index to fill (shadow of avail.idx)
        self.last_used = 0      # next used index to read
        self._kicked = 0        # avail.idx at the last kick decision
        self._added = 0         # additions since then
        self._cb_disabled = False
        self._avail_flags = 0
        # The stores and loads of the hot paths as single C calls on a mapped part (the part's own
        # bounds-checked methods otherwise): a descriptor, an avail entry or idx, a used element.
        self._set_desc = self._packer(self._desc, DESC)
        # avail.idx (and its ring entries) as one 16-bit store, never struct.pack_into: that zero-fills the
        # field and then writes it byte by byte, so the device, reading concurrently from another CPU, can
        # see avail.idx 0 for a moment -- tens of thousands ahead of what it took (seen: the host broke the
        # ring once per 30-100 k blk requests). _ViewPart.set_u16 stores through an 'H' view.
        self._set_avail = self._avail.set_u16
        self._get_used_elem = self._unpacker(self._used, USED_ELEM)
        self._used_mv = getattr(self._used, "mv", None)
        self._table_mv = getattr(self._indirect_parts, "mv", None)

    @staticmethod
    def _packer(part, st: struct.Struct):
        mv = getattr(part, "mv", None)
        return functools.partial(st.pack_into, mv) if mv is not None else functools.partial(part.pack, st)

    @staticmethod
    def _unpacker(part, st: struct.Struct):
        mv = getattr(part, "mv", None)
        return functools.partial(st.unpack_from, mv) if mv is not None else functools.partial(part.unpack, st)

    @classmethod
    def legacy(cls, num: int, mem: Memory, addr: int, align: int, features: int = 0,
               indirect: tuple[Memory, int, int] | None = None, name: str = "vring") -> "DriverRing":
        """A ring in the legacy contiguous layout at ``addr`` (section 1.2)."""
        lay = VringLayout(num, align)
        return cls(num, (mem, addr + lay.desc), (mem, addr + lay.avail), (mem, addr + lay.used), features,
                   indirect, name)

    @property
    def num_free(self) -> int:
        """Free descriptors in the main table."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains added and not yet returned by the device."""
        return len(self._out)

    def add(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]] = (), token: Any = None,
            indirect: bool | None = None) -> int:
        """Make a chain available: ``out`` readable buffers, then ``in_`` writable ones; returns its head.

        ``token`` comes back from :meth:`get_used` (default: the head).
        ``indirect`` forces (True) or forbids (False) an indirect table; by
        default one is used whenever possible, as Linux does.
        """
        total = len(out) + len(in_)
        if not total:
            raise ValueError(f"{self.name}: a chain needs at least one buffer")
        writable_len = 0
        for _a, n in in_:
            writable_len += n
        want_indirect = (self.use_indirect and total > 1 and total <= self._indirect_entries
                         if indirect is None else indirect)
        if want_indirect:
            if not self.use_indirect:
                raise ValueError(f"{self.name}: indirect descriptors are not negotiated or have no table memory")
            if total > self._indirect_entries:
                raise ValueError(f"{self.name}: {total} buffers do not fit a {self._indirect_entries}-entry table")
            if not self._free:
                raise RingFull(f"{self.name}: no free descriptor")
            head = self._free.pop()
            table = self._indirect_parts
            base = head * self._indirect_entries * DESC_SIZE
            # The whole table in one store: entries chained 0 -> 1 -> ... -> last.
            args: list[int] = []
            j = 0
            for a, n in out:
                j += 1
                args += (a, n, VRING_DESC_F_NEXT, j)
            for a, n in in_:
                j += 1
                args += (a, n, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, j)
            args[-2] &= _NOT_LAST
            args[-1] = 0
            if self._table_mv is not None:
                _table_struct(total).pack_into(self._table_mv, base, *args)
            else:
                table.pack(_table_struct(total), base, *args)
            self._set_desc(head * DESC_SIZE, table.addr + base, total * DESC_SIZE, VRING_DESC_F_INDIRECT, 0)
            descs = [head]
        else:
            if total > len(self._free):
                raise RingFull(f"{self.name}: {total} descriptors needed, {len(self._free)} free")
            bufs = [(a, n, 0) for a, n in out] + [(a, n, VRING_DESC_F_WRITE) for a, n in in_]
            descs = [self._free.pop() for _ in range(total)]
            head = descs[0]
            for j, (a, n, f) in enumerate(bufs):
                last = j == total - 1
                nxt = 0 if last else descs[j + 1]
                self._set_desc(descs[j] * DESC_SIZE, a, n, f | (0 if last else VRING_DESC_F_NEXT), nxt)
        self._place(head, token, descs, writable_len)
        self._publish()
        return head

    def add_pair(self, a0: int, n0: int, a1: int, n1: int, token: Any = None) -> int:
        """:meth:`add` of two readable buffers (a transmit's header and frame), the common case made short."""
        if not (self.use_indirect and self._table_mv is not None and self._indirect_entries >= 2):
            return self.add(((a0, n0), (a1, n1)), (), token)
        free = self._free
        if not free:
            raise RingFull(f"{self.name}: no free descriptor")
        head = free.pop()
        base = head * self._indirect_entries * DESC_SIZE
        _PAIR.pack_into(self._table_mv, base, a0, n0, VRING_DESC_F_NEXT, 1, a1, n1, 0, 0)
        self._set_desc(head * DESC_SIZE, self._indirect_parts.addr + base, 2 * DESC_SIZE, VRING_DESC_F_INDIRECT, 0)
        self._out[head] = (head if token is None else token, [head], 0)
        idx = self.avail_idx
        self._set_avail(AVAIL_RING + 2 * (idx & self._mask), head)
        self.avail_idx = idx = (idx + 1) & 0xFFFF
        self._added += 1
        # Write barrier: the table, the descriptor and the ring entry before avail.idx (program order on x86).
        self._set_avail(AVAIL_IDX, idx)
        return head

    def _place(self, head: int, token: Any, descs: list[int], writable_len: int) -> None:
        """Record the chain at ``head`` as outstanding and put it in the next avail slot (not yet published)."""
        self._out[head] = (head if token is None else token, descs, writable_len)
        self._set_avail(AVAIL_RING + 2 * (self.avail_idx & self._mask), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._added += 1

    def _publish(self) -> None:
        """Make every placed chain available: one ``avail.idx`` store."""
        # Write barrier: the descriptors and the ring entries before avail.idx (program order on x86).
        self._set_avail(AVAIL_IDX, self.avail_idx)

    def prepare(self, out: Sequence[tuple[int, int]], in_: Sequence[tuple[int, int]] = ()) -> PreparedChain:
        """The chain :meth:`add` would post for ``out`` / ``in_``, for :meth:`add_prepared` to post many times."""
        bufs = [(a, n, 0) for a, n in out] + [(a, n, VRING_DESC_F_WRITE) for a, n in in_]
        total = len(bufs)
        if not total:
            raise ValueError(f"{self.name}: a chain needs at least one buffer")
        table = None
        if self.use_indirect and 1 < total <= self._indirect_entries:
            pack, last = DESC.pack, total - 1
            table = b"".join([pack(a, n, f | VRING_DESC_F_NEXT, j + 1) for j, (a, n, f) in enumerate(bufs[:last])]
                             + [pack(*bufs[last], 0)])
        return PreparedChain(list(out), list(in_), table, sum(n for _a, n in in_))

    def add_prepared(self, chain: PreparedChain, token: Any = None) -> int:
        """What :meth:`add` posts for a chain :meth:`prepare` built: the same descriptors, the table as built."""
        return self.add_prepared_many(((chain, token),))[0]

    def add_prepared_many(self, chains) -> list[int]:
        """:meth:`add_prepared` for each ``(chain, token)``, published with one ``avail.idx`` store; their heads.

        What was placed before a :class:`RingFull` is published before it is raised.
        """
        heads: list[int] = []
        free, set_desc, set_avail, parts, mv = self._free, self._set_desc, self._set_avail, self._indirect_parts, \
            self._table_mv
        entries, out, mask = self._indirect_entries, self._out, self._mask
        idx = start = self.avail_idx
        try:
            for chain, token in chains:
                table = chain.table
                if table is None:
                    self.avail_idx = idx
                    head = self.add(chain.out, chain.in_, token, indirect=False)
                    idx = self.avail_idx
                else:
                    if not free:
                        raise RingFull(f"{self.name}: no free descriptor")
                    head = free.pop()
                    base = head * entries * DESC_SIZE
                    if mv is not None:
                        mv[base:base + len(table)] = table
                    else:
                        parts.write(base, table)
                    set_desc(head * DESC_SIZE, parts.addr + base, len(table), VRING_DESC_F_INDIRECT, 0)
                    out[head] = (head if token is None else token, [head], chain.writable_len)
                    set_avail(AVAIL_RING + 2 * (idx & mask), head)
                    idx = (idx + 1) & 0xFFFF
                    self._added += 1
                heads.append(head)
        finally:
            self.avail_idx = idx
            if idx != start:
                self._publish()
        return heads

    def kick_prepare(self) -> bool:
        """After adding: does the device want a kick? (``virtqueue_kick_prepare``, section 1.4.)"""
        full_barrier()  # avail.idx store before reading used.flags / avail_event
        old, new, n = self._kicked, self.avail_idx, self._added
        self._kicked, self._added = new, 0
        if not n:
            return False
        if self.event_idx:
            return n > 0xFFFF or vring_need_event(self._used.u16(self._avail_event), new, old)
        return not self._used.u16(USED_FLAGS) & VRING_USED_F_NO_NOTIFY

    def used_pending(self) -> int:
        """Completions the device published that were not read yet (validated)."""
        used_idx = self._used.u16(USED_IDX)
        pending = (used_idx - self.last_used) & 0xFFFF
        if pending > len(self._out):
            raise VringError(f"{self.name}: used.idx {used_idx} is {pending} ahead of {self.last_used}, but only "
                             f"{len(self._out)} chains are in flight")
        return pending

    def get_used(self) -> tuple[Any, int] | None:
        """The next completed chain as ``(token, len)``, or None (``virtqueue_get_buf``)."""
        got = self.get_used_many(1)
        return got[0] if got else None

    def get_used_many(self, limit: int) -> list[tuple[Any, int]]:
        """Up to ``limit`` completed chains as ``(token, len)``, in order; ``used.idx`` read (and checked) once.

        Every element is validated as :meth:`get_used` does; a bad one raises
        :class:`VringError` (what came before it is consumed and lost with
        the ring, as Linux's BAD_RING).
        """
        n = self.used_pending()
        if n > limit:
            n = limit
        got: list[tuple[Any, int]] = []
        if not n:
            return got
        # Read barrier after seeing used.idx: program order on x86.
        outstanding, free, mask = self._out, self._free, self._mask
        track = not self._cb_disabled
        last = self.last_used
        mv = self._used_mv
        if mv is not None:      # the n elements in (at most) two C calls: up to the ring's end, then from its start
            first = last & mask
            k = min(n, self.num - first)
            at = USED_RING + USED_ELEM_SIZE * first
            elems = list(USED_ELEM.iter_unpack(mv[at:at + USED_ELEM_SIZE * k]))
            if k < n:
                elems += USED_ELEM.iter_unpack(mv[USED_RING:USED_RING + USED_ELEM_SIZE * (n - k)])
        else:
            unpack = self._get_used_elem
            elems = [unpack(USED_RING + USED_ELEM_SIZE * ((last + i) & mask)) for i in range(n)]
        try:
            for id_, length in elems:
                o = outstanding.pop(id_, None)
                if o is None:
                    slot = last & mask
                    if id_ >= self.num:
                        raise VringError(f"{self.name}: used.ring[{slot}]: id {id_} out of range 0..{self.num - 1}")
                    raise VringError(f"{self.name}: used.ring[{slot}]: id {id_} is not a head in flight")
                token, descs, writable_len = o
                if length > writable_len:
                    outstanding[id_] = o
                    slot = last & mask
                    raise VringError(f"{self.name}: used.ring[{slot}]: head {id_} returned with len {length}, but "
                                     f"its writable buffers hold {writable_len}")
                if len(descs) == 1:
                    free.append(id_)
                else:
                    free.extend(reversed(descs))
                last = (last + 1) & 0xFFFF
                if track:
                    # Linux writes used_event after every get_buf while callbacks are on (section 1.4).
                    self._avail.set_u16(self._used_event, last)
                got.append((token, length))
        finally:
            self.last_used = last
        return got

    def get_all_used(self) -> list[tuple[Any, int]]:
        out = []
        while got := self.get_used_many(self.num):
            out += got
        return out

    def disable_cb(self) -> None:
        """Ask the device not to interrupt: NO_INTERRUPT, or with EVENT_IDX a used_event just behind us.

        With EVENT_IDX, v5.4 Linux writes nothing (the next completion may
        still interrupt) and later kernels write 0; we write ``last_used - 1``,
        which the device's window reaches only after 65535 completions, so
        the advice is actually followed [INF: a choice, the spec only says
        the flag / event are advice].
        """
        if not self._cb_disabled:
            self._cb_disabled = True
            if self.event_idx:
                self._avail.set_u16(self._used_event, (self.last_used - 1) & 0xFFFF)
            else:
                self._avail_flags |= VRING_AVAIL_F_NO_INTERRUPT
                self._avail.set_u16(AVAIL_FLAGS, self._avail_flags)

    def enable_cb(self) -> bool:
        """Ask for interrupts again; True if nothing is pending (safe to wait), False if completions arrived."""
        self._cb_disabled = False
        if not self.event_idx:
            self._avail_flags &= ~VRING_AVAIL_F_NO_INTERRUPT
            self._avail.set_u16(AVAIL_FLAGS, self._avail_flags)
        self._avail.set_u16(self._used_event, self.last_used)
        full_barrier()  # the store before re-reading used.idx
        return self._used.u16(USED_IDX) == self.last_used

    def detach_unused(self) -> list[Any]:
        """Forget every chain still in flight (after a device reset); returns their tokens."""
        tokens = [token for token, _descs, _n in self._out.values()]
        for _token, descs, _n in self._out.values():
            self._free.extend(descs)
        self._out.clear()
        return tokens

    def __repr__(self) -> str:
        return (f"<DriverRing {self.name} num={self.num} avail={self.avail_idx} last_used={self.last_used} "
                f"in_flight={len(self._out)} free={len(self._free)}>")
