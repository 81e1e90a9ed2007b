"""vfio-user wire format: header, command codes, flags, payload structs, Message.

vfio-user (spec section 2) carries VFIO's device operations over one AF_UNIX
stream socket per client/server pair. Every message, command or reply, is a
16-byte header (spec 2.2) followed by a command-specific payload (spec 2.5);
file descriptors (region memory, DMA memory, eventfds) ride along as
SCM_RIGHTS ancillary data (spec 2.1).

The endpoint that sends and receives these messages is
:class:`micdrv.pci.vfio_user.protocol.Connection`; ``protocol`` re-exports
everything defined here.
"""

from __future__ import annotations

import errno as _errno
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence

# --- header (spec 2.2) --------------------------------------------------------
HEADER = struct.Struct("<HHIII")  # msg_id command size flags error
HEADER_SIZE = HEADER.size  # 16

FLAGS_TYPE_MASK = 0xF  # bits 0-3: message type (spec 2.2)
FLAGS_TYPE_COMMAND = 0
FLAGS_TYPE_REPLY = 1
FLAGS_NO_REPLY = 0x10  # bit 4 (spec 2.2)
FLAGS_ERROR = 0x20  # bit 5 (spec 2.2)

# --- command codes (spec 2.3) -------------------------------------------------
VERSION = 1
DMA_MAP = 2
DMA_UNMAP = 3
DEVICE_GET_INFO = 4
DEVICE_GET_REGION_INFO = 5
DEVICE_GET_REGION_IO_FDS = 6
DEVICE_GET_IRQ_INFO = 7
DEVICE_SET_IRQS = 8
REGION_READ = 9
REGION_WRITE = 10
DMA_READ = 11  # server -> client
DMA_WRITE = 12  # server -> client
DEVICE_RESET = 13
DIRTY_PAGES = 14  # dropped from the current spec (spec 2.3); never sent
REGION_WRITE_MULTI = 15
DEVICE_FEATURE = 16
MIG_DATA_READ = 17
MIG_DATA_WRITE = 18

COMMAND_NAMES = {
    VERSION: "VERSION", DMA_MAP: "DMA_MAP", DMA_UNMAP: "DMA_UNMAP", DEVICE_GET_INFO: "DEVICE_GET_INFO",
    DEVICE_GET_REGION_INFO: "DEVICE_GET_REGION_INFO", DEVICE_GET_REGION_IO_FDS: "DEVICE_GET_REGION_IO_FDS",
    DEVICE_GET_IRQ_INFO: "DEVICE_GET_IRQ_INFO", DEVICE_SET_IRQS: "DEVICE_SET_IRQS", REGION_READ: "REGION_READ",
    REGION_WRITE: "REGION_WRITE", DMA_READ: "DMA_READ", DMA_WRITE: "DMA_WRITE", DEVICE_RESET: "DEVICE_RESET",
    DIRTY_PAGES: "DIRTY_PAGES", REGION_WRITE_MULTI: "REGION_WRITE_MULTI", DEVICE_FEATURE: "DEVICE_FEATURE",
    MIG_DATA_READ: "MIG_DATA_READ", MIG_DATA_WRITE: "MIG_DATA_WRITE",
}


def command_name(command: int) -> str:
    return COMMAND_NAMES.get(command, f"command {command}")


# --- payloads (spec 2.5; formats from its closing paragraph) -------------------
version_head = struct.Struct("<HH")  # major minor (+ NUL-terminated JSON)
dma_map = struct.Struct("<IIQQQ")  # argsz flags offset address size
dma_unmap = struct.Struct("<IIQQ")  # argsz flags address size
device_info = struct.Struct("<IIII")  # argsz flags num_regions num_irqs
irq_info = struct.Struct("<IIII")  # argsz flags index count
irq_set = struct.Struct("<IIIII")  # argsz flags index start count (+ data)
region_rw = struct.Struct("<QII")  # offset region count (+ data)
dma_rw = struct.Struct("<QQ")  # address count (+ data); spec layout, not QEMU's (spec 2.8-1)
write_multi_count = struct.Struct("<Q")  # wr_cnt
write_multi_entry = struct.Struct("<QII8s")  # offset region count data[8]

DMA_MAP_FLAG_READ = 1 << 0  # spec 2.5 DMA_MAP: bit0 readable
DMA_MAP_FLAG_WRITE = 1 << 1  # bit1 writeable
DMA_UNMAP_FLAG_GET_DIRTY_BITMAP = 1 << 0  # spec 1.3 / 2.5 (not supported here)
DMA_UNMAP_FLAG_ALL = 1 << 1  # spec 2.5: address = size = 0 unmaps everything

WRITE_MULTI_MAX_DATA = 8  # spec 2.5: count <= 8 per entry
WRITE_MULTI_MAX_ENTRIES = 200  # spec 2.5: QEMU sends <= 200 entries

# --- capability defaults (spec 2.4) ---------------------------------------------
DEFAULT_MAX_MSG_FDS = 1
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20  # 1048576
DEFAULT_MAX_DMA_MAPS = 65535
DEFAULT_PGSIZES = 4096
DEFAULT_REPLY_TIMEOUT = 5.0  # QEMU's x-msg-timeout default, 5000 ms (spec 2.7)
MESSAGE_SLACK = 4096  # room for headers/structs beyond the data in a maximal message

# The most fds any single message may legitimately carry: a SET_IRQS chunk
# (<= max_msg_fds, QEMU caps it at 16, spec 2.4). The receive control buffer is
# larger, so an over-stuffed message is seen and rejected rather than truncated.
MAX_RECV_FDS = 64


class CommandError(Exception):
    """Raised by a command handler: the command fails with ``errno`` (an ERROR reply, spec 2.2)."""

    def __init__(self, errno: int, detail: str = ""):
        self.errno = errno
        self.detail = detail
        super().__init__(f"[{_errno.errorcode.get(errno, errno)}] {detail}")


@dataclass(slots=True)
class Message:
    """One received message: header fields, payload and the fds that came with it.

    The receiver owns ``fds``: take the ones you keep with :meth:`take_fds`;
    the connection closes whatever is left.
    """

    msg_id: int
    command: int
    flags: int
    error: int
    payload: bytes | bytearray
    fds: list[int] = field(default_factory=list)

    @property
    def is_reply(self) -> bool:
        return self.flags & FLAGS_TYPE_MASK == FLAGS_TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAGS_NO_REPLY)

    @property
    def name(self) -> str:
        return command_name(self.command)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            _close_quietly(fd)


#: What a handler returns: a payload, or (payload, fds to send). Sent fds stay owned by the handler's side.
HandlerResult = bytes | bytearray | None | tuple[bytes | bytearray, Sequence[int]]
Handler = Callable[[Message], HandlerResult]


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def encode_header(msg_id: int, command: int, payload_len: int, flags: int, error: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, HEADER_SIZE + payload_len, flags, error)

