"""The SMPT: how the card reaches host memory (spec 2.4).

Card physical addresses from 0x80_0000_0000 (the system window, 512 GiB) are
translated by 32 System Memory Page Table entries of 16 GiB each onto host
bus addresses -- for micdrv, IOVAs of the DmaArena. Entry i holds
``((A >> 34) << 2) | no_snoop`` for the host page at A (:func:`regs.smpt_value`).

micdrv programs the kernel's identity layout at probe: entry i points at host
page i * 16 GiB, so the card reaches IOVA ``a`` at ``0x80_0000_0000 + a``
(ARCHITECTURE.md "Addresses"). The table is rewritten before every boot
because some steppings lose it across a reset (:meth:`Smpt.restore`).

:meth:`Smpt.to_card` is THE place that converts an :data:`~micdrv.addr.Iova`
into the :data:`~micdrv.addr.CardPhys` the card must use; everything that
hands the card a host address (DMA rings and status words, the device page,
vrings, SCIF queues) goes through it. :meth:`Smpt.map` / :meth:`Smpt.unmap`
are ``mic_map`` / ``mic_unmap``: the same lookup plus the kernel's per-entry
byte reference counts, and the kernel's fallback of rewriting a run of unused
entries when no entry points at the pages.

Only arena memory is ever handed to the card: once :meth:`Smpt.confine` has
been told the DmaArena's IOVA range (:meth:`micdrv.x100.card.X100.open` does
so before anything else is mapped), :meth:`~Smpt.to_card` and
:meth:`~Smpt.map` refuse every range that is not wholly inside it, whatever
the caller. The identity entries still translate the whole window (the
kernel's layout, spec 2.4); what lies behind an IOVA outside the arena is
nothing, because the arena is the only DMA mapping the IOMMU (or the
vfio-user server) has for the card.
"""

from __future__ import annotations

import threading

from ..addr import CardPhys, Iova
from . import regs
from .errors import SmptError
from .mmio import Registers

PAGE = regs.SMPT_PAGE_SIZE
NUM = regs.SMPT_ENTRIES


def page_count(iova: int, size: int) -> int:
    """How many 16 GiB pages [iova, iova + size) touches (``mic_get_smpt_ref_count``'s ``entries``)."""
    first = iova >> regs.SMPT_PAGE_SHIFT
    last = (iova + size - 1) >> regs.SMPT_PAGE_SHIFT
    return last - first + 1


def page_refs(iova: int, size: int) -> list[int]:
    """Bytes of [iova, iova + size) in each page it touches: the kernel's per-entry reference counts."""
    refs = []
    pos, end = iova, iova + size
    while pos < end:
        page_end = (pos & ~(PAGE - 1)) + PAGE
        refs.append(min(end, page_end) - pos)
        pos = page_end
    return refs


class Smpt:
    """The 32 SMPT entries of one card and the host's bookkeeping of them."""

    def __init__(self, registers: Registers):
        self._regs = registers
        self._lock = threading.Lock()
        self.pages: list[int] = [i * PAGE for i in range(NUM)]  # host page address per entry
        self.refs: list[int] = [0] * NUM  # bytes mapped through each entry (mic_smpt.c ref_count)
        self._first: dict[int, int] = {}  # host page -> first entry pointing at it (the lookup's answer)
        self._reach: tuple[int, int] | None = None  # [lo, hi): the only IOVAs the card may be given
        self._reindex()

    def confine(self, iova: Iova | int, size: int) -> None:
        """Hand the card only addresses in [iova, iova + size) from now on: the DmaArena's IOVA range."""
        if size <= 0 or iova < 0:
            raise SmptError(f"SMPT confinement to [{iova:#x}, +{size:#x})", "empty or negative range")
        with self._lock:
            self._reach = (int(iova), int(iova) + size)

    def _check_reach(self, step: str, iova: int, size: int) -> None:
        reach = self._reach
        if reach is not None and not (reach[0] <= iova and iova + size <= reach[1]):
            raise SmptError(step, f"outside the DmaArena [{reach[0]:#x}, {reach[1]:#x}): only arena memory is "
                                  f"ever mapped for the card")

    # --- programming --------------------------------------------------------------
    def init(self) -> None:
        """``mic_smpt_init``: identity layout, no references, all 32 registers written (spec 1.4 step 6)."""
        with self._lock:
            self.pages = [i * PAGE for i in range(NUM)]
            self.refs = [0] * NUM
            self._reindex()
        self.restore()

    def restore(self) -> None:
        """Rewrite all 32 registers from the table (before every boot, spec 2.4 / 3.2 step 8)."""
        with self._lock:
            values = [regs.smpt_value(p) for p in self.pages]
        for i, v in enumerate(values):
            self._regs.write(regs.smpt(i), v)

    def read_back(self) -> list[int]:
        """The 32 register values as the card holds them (debugfs ``smpt``)."""
        return [self._regs.read(regs.smpt(i)) for i in range(NUM)]

    def _reindex(self) -> None:
        first: dict[int, int] = {}
        for i, p in enumerate(self.pages):
            first.setdefault(p, i)
        self._first = first

    # --- translation --------------------------------------------------------------
    @staticmethod
    def _window_address(index: int, iova: int) -> CardPhys:
        """Card address of ``iova`` through entry ``index`` (``mic_smpt_to_pa`` + offset in the page)."""
        return CardPhys(regs.SYSTEM_WINDOW + (index << regs.SMPT_PAGE_SHIFT) + (iova & (PAGE - 1)))

    def _find_existing(self, iova: int, size: int) -> int | None:
        """First entry of a run already pointing at the pages of [iova, +size), per ``mic_smpt_op``.

        The kernel scans entries in order; a run that starts but breaks before
        it is long enough is a failure, not a reason to look further (spec 2.4).
        Returns None when no entry points at the first page (the caller may
        then take free entries); raises when a run is broken.
        """
        page = iova & ~(PAGE - 1)
        n = page_count(iova, size)
        i = self._first.get(page)
        if i is None:
            return None
        for k in range(n):
            if i + k >= NUM:
                return None  # cut off by the end of the table: the kernel goes on to free entries
            if self.pages[i + k] != page + k * PAGE:
                raise SmptError(f"SMPT lookup of [{iova:#x}, +{size:#x})",
                                f"entries from {i} point at the first pages but not all {n}")
        return i

    def to_card(self, iova: Iova | int, size: int = 1) -> CardPhys:
        """THE Iova -> CardPhys conversion: where the card reaches host IOVA ``iova``.

        With the identity layout this is ``0x80_0000_0000 + iova``. Raises
        :class:`SmptError` when no run of entries covers the range.
        """
        if size <= 0 or iova < 0:
            raise SmptError(f"SMPT lookup of [{iova:#x}, +{size:#x})", "empty or negative range")
        self._check_reach(f"SMPT lookup of [{iova:#x}, +{size:#x})", iova, size)
        with self._lock:
            i = self._find_existing(iova, size)
        if i is None:
            raise SmptError(f"SMPT lookup of [{iova:#x}, +{size:#x})",
                            "no SMPT entry points at this host page (outside the 512 GiB identity window?)")
        return self._window_address(i, iova)

    def map(self, iova: Iova | int, size: int) -> CardPhys:
        """``mic_map``: take references on entries covering the range and return its card address.

        Entries already pointing at the pages are shared; otherwise a run of
        unreferenced entries is rewritten (register writes included). Raises
        :class:`SmptError` where the kernel returns 0.
        """
        step = f"SMPT map of [{iova:#x}, +{size:#x})"
        if size <= 0 or iova < 0 or size > NUM * PAGE:
            raise SmptError(step, "empty range or larger than the 512 GiB window")
        self._check_reach(step, iova, size)
        n = page_count(iova, size)
        refs = page_refs(iova, size)
        page = iova & ~(PAGE - 1)
        writes = []
        with self._lock:
            i = self._find_existing(iova, size)
            if i is None:
                run = 0
                for j in range(NUM):
                    run = run + 1 if self.refs[j] == 0 else 0
                    if run == n:
                        i = j - n + 1
                        break
                else:
                    raise SmptError(step, f"no run of {n} unused SMPT entries")
                for k in range(n):
                    self.pages[i + k] = page + k * PAGE
                    writes.append((i + k, regs.smpt_value(page + k * PAGE)))
                self._reindex()
            for k in range(n):
                self.refs[i + k] += refs[k]
        for index, value in writes:
            self._regs.write(regs.smpt(index), value)
        return self._window_address(i, iova)

    def unmap(self, card_addr: CardPhys | int, size: int) -> None:
        """``mic_unmap``: drop the references :meth:`map` took for ``card_addr``."""
        step = f"SMPT unmap of [{card_addr:#x}, +{size:#x})"
        if not regs.SYSTEM_WINDOW <= card_addr < regs.SYSTEM_WINDOW_END or size <= 0:
            raise SmptError(step, "not a system-window address")
        index = (card_addr - regs.SYSTEM_WINDOW) >> regs.SMPT_PAGE_SHIFT
        refs = page_refs(card_addr - regs.SYSTEM_WINDOW, size)
        with self._lock:
            if index + len(refs) > NUM:
                raise SmptError(step, "runs past the last SMPT entry")
            for k, r in enumerate(refs):
                if self.refs[index + k] < r:
                    raise SmptError(step, f"entry {index + k} holds {self.refs[index + k]} bytes, unmapping {r}")
            for k, r in enumerate(refs):
                self.refs[index + k] -= r
