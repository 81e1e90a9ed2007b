"""A chain's buffers as one byte stream: lists of memoryviews, split and filled without copying.

A chain's readable (or writable) buffers are a list of memoryviews whose
boundaries mean nothing (virtio-legacy.md 2.5: "treat every chain as a
byte stream"; a staging transport may merge or split descriptors). These
helpers cut such a list at byte offsets by slicing views, so headers and
trailers are found without copying payload, and vectored syscalls
(readv/writev/preadv/pwritev) take the pieces directly.
"""

from __future__ import annotations

from typing import Sequence

Views = list[memoryview]


def total(views: Sequence[memoryview]) -> int:
    """Bytes in ``views``."""
    return sum(len(v) for v in views)


def split(views: Sequence[memoryview], offset: int) -> tuple[Views, Views]:
    """``views`` cut at byte ``offset``: (the first ``offset`` bytes, the rest); slices, no copies."""
    head: Views = []
    rest: Views = []
    left = offset
    it = iter(views)
    for v in it:
        n = len(v)
        if left >= n:
            head.append(v)
            left -= n
            if left == 0:
                break
            continue
        if left:
            head.append(v[:left])
            rest.append(v[left:])
        else:
            rest.append(v)
        left = 0
        break
    rest.extend(it)
    if left:
        raise ValueError(f"cannot split {total(views)} bytes at offset {offset}")
    return head, rest


def split_tail(views: Sequence[memoryview], n: int) -> tuple[Views, Views]:
    """``views`` cut ``n`` bytes before the end: (everything but the last ``n`` bytes, the last ``n``).

    Works from the end, so finding a trailer (virtio-blk's status byte) costs
    nothing however many views precede it.
    """
    front = list(views)
    tail: Views = []
    left = n
    while left:
        if not front:
            raise ValueError(f"cannot take the last {n} bytes of {total(views)}")
        v = front.pop()
        if len(v) <= left:
            tail.insert(0, v)
            left -= len(v)
        else:
            front.append(v[:len(v) - left])
            tail.insert(0, v[len(v) - left:])
            left = 0
    return front, tail


def prefix(views: Sequence[memoryview], n: int) -> bytes:
    """A copy of the first ``n`` bytes (for headers, which are small)."""
    if views and len(views[0]) >= n:
        return bytes(views[0][:n])
    return b"".join(bytes(v) for v in split(views, n)[0])


def fill(views: Sequence[memoryview], data: bytes | bytearray | memoryview) -> int:
    """Copy ``data`` into the start of ``views`` (as much as fits); returns the bytes copied."""
    src = memoryview(data)
    done = 0
    for v in views:
        if done >= len(src):
            break
        n = min(len(v), len(src) - done)
        v[:n] = src[done:done + n]
        done += n
    return done


def advance(views: Sequence[memoryview], n: int) -> Views:
    """The views after the first ``n`` bytes (for resuming a short vectored transfer)."""
    return split(views, n)[1]
