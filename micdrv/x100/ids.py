"""PCI identity of X100 cards (spec 1.1)."""

from __future__ import annotations

INTEL_VENDOR_ID = 0x8086  # spec 1.1

# The fifteen device IDs the host driver treats as family X100 (spec 1.1).
X100_DEVICE_IDS = frozenset(range(0x2250, 0x225F))

# Stepping = PCI revision ID (spec 1.1); anything else prints "??".
STEPPINGS = {0x00: "A0", 0x10: "B0", 0x11: "B1", 0x20: "C0"}


def is_x100(vendor: int, device: int) -> bool:
    return vendor == INTEL_VENDOR_ID and device in X100_DEVICE_IDS


def family(vendor: int, device: int) -> str:
    """The sysfs ``family`` string (spec 1.1 / 3.5): "x100" or "Unknown"."""
    return "x100" if is_x100(vendor, device) else "Unknown"


def stepping(revision: int) -> str:
    return STEPPINGS.get(revision, "??")
