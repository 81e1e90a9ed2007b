"""The card kernel's log, read from card memory through BAR0 (spec 3.5 ``log_buf``, 6.5).

mpssd reads two symbols from the card kernel's ``System.map`` and writes
them to sysfs (spec 6.5, 3.5): ``log_buf_addr`` = the address of
``__log_buf`` (the log text) and ``log_buf_len`` = the address of the
``int log_buf_len`` variable holding its length. Both are kernel virtual
addresses. cosm_debugfs.c ``log_buf_show`` turns them into card physical
addresses by subtracting ``__START_KERNEL_map`` ("card kernel will never be
relocated"), reads the 32-bit length at the second, then that many bytes at
the first, through the aperture -- only while the card is booting, online
or shutting down (the caller's check: COSM knows the state).

:func:`read_log_buf` does the same, but the card is not trusted: every
address and the length it reads are checked against card memory before
use, and a bad one is a :class:`CardLogError` naming it, never an access
outside BAR0.

:func:`log_text` makes the raw buffer readable. The buffer is a classic
character ring (the pre-3.5 Linux ``log_buf``): once it wraps, the oldest
text follows the newest. A card that keeps a NUL right after its newest byte
-- the simulated card OS does -- can be put back in order: text after the
last NUL is older than text before it. Without a NUL the bytes are taken as
they are.
"""

from __future__ import annotations

from typing import Protocol

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # x86-64 __START_KERNEL_map: kernel virtual = physical + this
MAX_LOG_BUF_LEN = 1 << 25                # the kernel's largest log buffer, CONFIG_LOG_BUF_SHIFT = 25


class CardLogError(ValueError):
    """log_buf_addr / log_buf_len, or what the card holds there, cannot be a log buffer."""


class CardMemoryReader(Protocol):
    """What the reader needs of a card (:class:`~micdrv.cosm.hwops.CosmHwOps` has it)."""

    @property
    def memory_size(self) -> int: ...

    def read_card(self, addr: int, length: int) -> bytes: ...


def kernel_to_phys(vaddr: int, what: str, memory_size: int, length: int) -> int:
    """Card physical address of kernel virtual ``vaddr`` (minus __START_KERNEL_map), checked to fit memory."""
    if not isinstance(vaddr, int) or not START_KERNEL_MAP <= vaddr < 1 << 64:
        raise CardLogError(f"{what} {vaddr!r} is not a card kernel address (at or above __START_KERNEL_map "
                           f"{START_KERNEL_MAP:#x})")
    phys = vaddr - START_KERNEL_MAP
    if phys + length > memory_size or phys >= memory_size:
        where = f"{length} bytes there run past" if length else "outside"
        raise CardLogError(f"{what} {vaddr:#x} is card physical {phys:#x}, {where} card memory "
                           f"({memory_size:#x} bytes)")
    return phys


def read_log_buf(card: CardMemoryReader, log_buf_addr: int, log_buf_len: int) -> bytes:
    """The raw log buffer, as ``log_buf_show`` reads it; ``b""`` when either address is unset (0)."""
    if not log_buf_addr or not log_buf_len:
        return b""
    size_at = kernel_to_phys(log_buf_len, "log_buf_len", card.memory_size, 4)
    buf_at = kernel_to_phys(log_buf_addr, "log_buf_addr", card.memory_size, 0)
    size = int.from_bytes(card.read_card(size_at, 4), "little", signed=True)  # ioread32 into an int
    if size < 0 or size > MAX_LOG_BUF_LEN:
        raise CardLogError(f"the card says its log buffer is {size} bytes (at {size_at:#x}); a kernel log "
                           f"buffer is 0..{MAX_LOG_BUF_LEN} bytes")
    if buf_at + size > card.memory_size:
        raise CardLogError(f"the card's {size}-byte log buffer at {buf_at:#x} runs past card memory "
                           f"({card.memory_size:#x} bytes)")
    return card.read_card(buf_at, size) if size else b""


def system_map_symbols(text: str, names: tuple[str, ...] = ("__log_buf", "log_buf_len")) -> dict[str, int]:
    """The addresses of ``names`` in a ``System.map`` (``<hex address> <type> <name>`` lines), as mpssd
    reads ``__log_buf`` and ``log_buf_len`` for sysfs log_buf_addr/log_buf_len (spec 6.5). Missing
    symbols are left out; malformed lines are skipped."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] in names and parts[2] not in found:
            try:
                found[parts[2]] = int(parts[0], 16)
            except ValueError:
                continue
    return found


def log_text(raw: bytes) -> str:
    """The log in order of writing, NULs dropped, decoded as UTF-8 (bad bytes replaced)."""
    end = raw.rfind(b"\0")
    if end < 0:
        ordered = raw
    else:
        older, newer = raw[end + 1:].replace(b"\0", b""), raw[:end].replace(b"\0", b"")
        if older:
            # The ring wrapped: its oldest line was cut by newer text; drop the torn piece.
            nl = older.find(b"\n")
            older = older[nl + 1:] if nl >= 0 else b""
        ordered = older + newer
    return ordered.decode("utf-8", "replace")
