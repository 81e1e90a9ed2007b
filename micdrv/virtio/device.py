"""What every legacy virtio device shares: device IDs, the status byte, the transport feature bits.

virtio-legacy.md sections 1.3 (transport feature bits), 5 (device status
byte and the legacy initialisation sequence) and B (device IDs). The
device-type feature bits live with their formats in :mod:`.net`,
:mod:`.blk` and :mod:`.console`.

Feature words are plain ints with bit ``n`` = ``1 << n``. VOP carries only
32 bits (virtio-legacy.md A), so nothing from bit 32 up (VERSION_1 and the
v1-only device features) is ever offered on that transport; other
transports may carry 64.
"""

from __future__ import annotations

# --- device IDs (section B; include/uapi/linux/virtio_ids.h) ----------------------------------

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3

DEVICE_NAMES = {VIRTIO_ID_NET: "net", VIRTIO_ID_BLOCK: "blk", VIRTIO_ID_CONSOLE: "console"}

# --- device status byte (section 5) -----------------------------------------------------------

VIRTIO_CONFIG_S_ACKNOWLEDGE = 0x01  # driver noticed the device
VIRTIO_CONFIG_S_DRIVER = 0x02       # driver has a driver for it
VIRTIO_CONFIG_S_DRIVER_OK = 0x04    # driver is live
VIRTIO_CONFIG_S_FEATURES_OK = 0x08  # VERSION_1 only: never seen on a legacy device
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40  # VERSION_1 only
VIRTIO_CONFIG_S_FAILED = 0x80       # driver gave up

# --- transport feature bits (section 1.3) -----------------------------------------------------

VIRTIO_F_NOTIFY_ON_EMPTY = 24       # never acked by Linux net/blk/console: do not rely on it
VIRTIO_F_ANY_LAYOUT = 27            # "no assumptions about framing" (virtio-net lists it)
VIRTIO_RING_F_INDIRECT_DESC = 28    # descriptors may point at descriptor tables
VIRTIO_RING_F_EVENT_IDX = 29        # used_event / avail_event replace the flags (section 1.4)
VIRTIO_F_BAD_FEATURE = 30           # QEMU's "never offer" bit
VIRTIO_F_VERSION_1 = 32             # not on VOP (32-bit feature word)

TRANSPORT_FEATURE_NAMES = {
    VIRTIO_F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY", VIRTIO_F_ANY_LAYOUT: "ANY_LAYOUT",
    VIRTIO_RING_F_INDIRECT_DESC: "RING_INDIRECT_DESC", VIRTIO_RING_F_EVENT_IDX: "RING_EVENT_IDX",
    VIRTIO_F_BAD_FEATURE: "BAD_FEATURE", VIRTIO_F_VERSION_1: "VERSION_1",
}

# The ring features the code in this package implements on both sides.
RING_FEATURES = (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)


def bit(n: int) -> int:
    """The feature word with only bit ``n`` set."""
    return 1 << n


def has(word: int, n: int) -> bool:
    """Whether feature ``n`` is set in ``word``."""
    return bool(word >> n & 1)


def feature_names(word: int, device_names: dict[int, str] | None = None) -> list[str]:
    """Names of the bits set in ``word`` (device bits first, unknown ones as ``bit<n>``), for logs."""
    table = {**(device_names or {}), **TRANSPORT_FEATURE_NAMES}
    return [table.get(n, f"bit{n}") for n in range(64) if word >> n & 1]
