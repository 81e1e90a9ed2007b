"""virtio-console formats: feature bits, ``struct virtio_console_config``, control messages (virtio-legacy.md 4).

Device ID 3 (section B). Without MULTIPORT (the mpssd case) there are two
queues: 0 = "input" (device -> driver, host input for the console), 1 =
"output" (driver -> device, console output). The driver fills queue 0 with
4096-byte writable buffers and *spins* until each output buffer comes back,
so a device completes queue 1 chains at once (section 4.2).
"""

from __future__ import annotations

import ctypes

# --- feature bits (section 4.1) ---------------------------------------------------------------

VIRTIO_CONSOLE_F_SIZE = 0          # cols / rows valid
VIRTIO_CONSOLE_F_MULTIPORT = 1     # max_nr_ports valid, control queues exist
VIRTIO_CONSOLE_F_EMERG_WRITE = 2   # emerg_wr register; not in the Linux driver's table (never acked)

FEATURE_NAMES = {VIRTIO_CONSOLE_F_SIZE: "SIZE", VIRTIO_CONSOLE_F_MULTIPORT: "MULTIPORT",
                 VIRTIO_CONSOLE_F_EMERG_WRITE: "EMERG_WRITE"}

# --- queues without MULTIPORT (section 4.2) ---------------------------------------------------

RX_QUEUE = 0   # "input": host -> driver
TX_QUEUE = 1   # "output": driver -> host

RX_BUFFER_SIZE = 4096  # section 4.2: what the Linux driver posts on queue 0


class virtio_console_config(ctypes.LittleEndianStructure):
    """``struct virtio_console_config`` (packed), 12 bytes."""

    _pack_ = 1
    _fields_ = [
        ("cols", ctypes.c_uint16),          # @0 SIZE
        ("rows", ctypes.c_uint16),          # @2 SIZE
        ("max_nr_ports", ctypes.c_uint32),  # @4 MULTIPORT
        ("emerg_wr", ctypes.c_uint32),      # @8 EMERG_WRITE
    ]


VIRTIO_CONSOLE_CONFIG_SIZE = ctypes.sizeof(virtio_console_config)  # 12

# --- control messages, MULTIPORT only (section 4.3) -------------------------------------------

VIRTIO_CONSOLE_DEVICE_READY = 0
VIRTIO_CONSOLE_PORT_ADD = 1
VIRTIO_CONSOLE_PORT_REMOVE = 2
VIRTIO_CONSOLE_PORT_READY = 3
VIRTIO_CONSOLE_CONSOLE_PORT = 4
VIRTIO_CONSOLE_RESIZE = 5
VIRTIO_CONSOLE_PORT_OPEN = 6
VIRTIO_CONSOLE_PORT_NAME = 7


class virtio_console_control(ctypes.LittleEndianStructure):
    """``struct virtio_console_control``, 8 bytes."""

    _pack_ = 1
    _fields_ = [
        ("id", ctypes.c_uint32),     # @0 port number
        ("event", ctypes.c_uint16),  # @4 VIRTIO_CONSOLE_*
        ("value", ctypes.c_uint16),  # @6
    ]
