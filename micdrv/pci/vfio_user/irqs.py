"""Interrupts of a device model: the client's eventfds per IRQ index and vector.

VFIO numbers interrupt sources by *index* (INTx 0, MSI 1, MSI-X 2, ERR 3,
REQ 4; spec 1.3) and *vector* within it. The client hands the server one
eventfd per vector with SET_IRQS (DATA_EVENTFD + ACTION_TRIGGER, fds in
SCM_RIGHTS, spec 2.5/2.6); raising the interrupt is writing 1 to that eventfd.

The model calls :meth:`Interrupts.trigger`; the framework delivers when the
vector has an eventfd and is not masked through SET_IRQS. As with kernel
vfio-pci, assigning eventfds is what enables MSI/MSI-X vectors: the client
never has to set the enable bits in config space (the kernel hides them from
a VFIO user), so the framework does not look at them. What it leaves to the
model, because only the model knows its table: per-vector MSI-X masking
(vector control bit 0 in the MSI-X table, a BAR) and MSI mask bits in config
space -- check them (``config.msi_masked(v)``, your table) before calling
``trigger``, and set the PBA pending bit yourself if you model one.

INTx is AUTOMASKED and MASKABLE (spec 1.7): each trigger masks it; a trigger
while masked is remembered and delivered on the client's UNMASK.
"""

from __future__ import annotations

import errno as _errno
import os
import threading

from ..device import (INTX, IRQ_AUTOMASKED, IRQ_EVENTFD, IRQ_MASKABLE, IRQ_NORESIZE, MSI, MSIX)
from ..vfio_abi import (VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_TYPE_MASK,
                        VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD,
                        VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_TYPE_MASK, VFIO_PCI_NUM_IRQS)
from .protocol import CommandError


class _Index:
    def __init__(self, count: int):
        self.count = count
        self.fds = [-1] * count
        self.masked = [False] * count
        self.pending = [False] * count
        self.triggers = 0  # delivered interrupts, for statistics


class Interrupts:
    """IRQ indices and the eventfds assigned to their vectors; ``counts`` maps index -> vectors."""

    def __init__(self, counts: dict[int, int]):
        self._lock = threading.Lock()
        self._idx = {i: _Index(counts.get(i, 0)) for i in range(VFIO_PCI_NUM_IRQS)}

    @property
    def num_irqs(self) -> int:
        return len(self._idx)

    def flags(self, index: int) -> int:
        """VFIO_IRQ_INFO flags of an index (spec 1.3): INTx maskable and automasked, MSI/MSI-X NORESIZE."""
        if index == INTX:
            return IRQ_EVENTFD | IRQ_MASKABLE | IRQ_AUTOMASKED
        if index in (MSI, MSIX):
            return IRQ_EVENTFD | IRQ_NORESIZE
        return IRQ_EVENTFD

    def count(self, index: int) -> int:
        return self._idx[index].count

    def assigned(self, index: int) -> list[bool]:
        """Which vectors of ``index`` have an eventfd."""
        with self._lock:
            return [fd >= 0 for fd in self._idx[index].fds]

    def delivered(self, index: int) -> int:
        return self._idx[index].triggers

    # --- the model's side ----------------------------------------------------------
    def trigger(self, index: int, vector: int = 0) -> bool:
        """Raise ``vector`` of ``index``: write 1 to its eventfd. False if not delivered (none or masked)."""
        with self._lock:
            irq = self._idx.get(index)
            if irq is None or not 0 <= vector < irq.count:
                raise ValueError(f"IRQ index {index} has no vector {vector}")
            if irq.masked[vector]:
                irq.pending[vector] = True
                return False
            return self._fire_locked(index, irq, vector)

    def _fire_locked(self, index: int, irq: _Index, vector: int) -> bool:
        fd = irq.fds[vector]
        if fd < 0:
            return False
        if index == INTX:
            irq.masked[vector] = True  # AUTOMASKED (spec 1.7)
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the client has that many unread interrupts already
        irq.triggers += 1
        return True

    # --- SET_IRQS (spec 1.7, 2.5) ------------------------------------------------------
    def set_irqs(self, flags: int, index: int, start: int, count: int, data: bytes, fds: list[int]) -> None:
        """Apply one SET_IRQS. Takes ownership of ``fds`` (emptying the list) only on success."""
        dtype = flags & VFIO_IRQ_SET_DATA_TYPE_MASK
        action = flags & VFIO_IRQ_SET_ACTION_TYPE_MASK
        if flags & ~(VFIO_IRQ_SET_DATA_TYPE_MASK | VFIO_IRQ_SET_ACTION_TYPE_MASK) or \
                dtype not in (VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_DATA_BOOL, VFIO_IRQ_SET_DATA_EVENTFD) or \
                action not in (VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_ACTION_TRIGGER):
            raise CommandError(_errno.EINVAL, f"SET_IRQS flags {flags:#x}: need one data type and one action")
        irq = self._idx.get(index)
        if irq is None:
            raise CommandError(_errno.EINVAL, f"no IRQ index {index}")
        if start + count > irq.count or (count == 0 and start != 0):
            raise CommandError(_errno.EINVAL, f"vectors {start}+{count} beyond the {irq.count} of index {index}")
        if dtype == VFIO_IRQ_SET_DATA_BOOL and len(data) != count:
            raise CommandError(_errno.EINVAL, f"DATA_BOOL needs {count} bytes, got {len(data)}")
        if dtype != VFIO_IRQ_SET_DATA_BOOL and data:
            raise CommandError(_errno.EINVAL, "data bytes with DATA_NONE/DATA_EVENTFD")
        if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
            if action != VFIO_IRQ_SET_ACTION_TRIGGER:
                raise CommandError(_errno.ENOTSUP, "irqfd masking (eventfds with MASK/UNMASK) is not supported")
            if fds and len(fds) != count:
                raise CommandError(_errno.EINVAL, f"{len(fds)} eventfds for {count} vectors")
        elif fds:
            raise CommandError(_errno.EINVAL, "fds without DATA_EVENTFD")
        if action != VFIO_IRQ_SET_ACTION_TRIGGER and not self.flags(index) & IRQ_MASKABLE:
            raise CommandError(_errno.EINVAL, f"IRQ index {index} is not maskable")
        which = range(start, start + count)
        if dtype == VFIO_IRQ_SET_DATA_BOOL:
            which = [v for v, b in zip(which, data) if b]
        with self._lock:
            if dtype == VFIO_IRQ_SET_DATA_EVENTFD:
                new = list(fds) if fds else [-1] * count  # no fds: de-assign (spec 2.5)
                fds.clear()
                for v, fd in zip(which, new):
                    if irq.fds[v] >= 0:
                        os.close(irq.fds[v])
                    irq.fds[v] = fd
                    irq.masked[v] = irq.pending[v] = False
            elif action == VFIO_IRQ_SET_ACTION_TRIGGER:
                if dtype == VFIO_IRQ_SET_DATA_NONE and count == 0:
                    self._disable_locked(irq)  # DATA_NONE|TRIGGER, count 0: disable the index (spec 1.7)
                for v in which:
                    self._fire_locked(index, irq, v)  # loopback (spec 1.7)
            else:
                mask = action == VFIO_IRQ_SET_ACTION_MASK
                for v in which:
                    irq.masked[v] = mask
                    if not mask and irq.pending[v]:
                        irq.pending[v] = False
                        self._fire_locked(index, irq, v)

    @staticmethod
    def _disable_locked(irq: _Index) -> None:
        for v, fd in enumerate(irq.fds):
            if fd >= 0:
                os.close(fd)
            irq.fds[v] = -1
            irq.masked[v] = irq.pending[v] = False

    def close_all(self) -> None:
        """Close every eventfd (client disconnect, spec 2.6)."""
        with self._lock:
            for irq in self._idx.values():
                self._disable_locked(irq)
