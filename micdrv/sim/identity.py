"""What the simulated X100 looks like on the PCI bus: IDs, BARs, interrupt capabilities (spec 1.1-1.3).

* Vendor 0x8086 and one of the fifteen X100 device IDs, revision = stepping
  (A0 0x00, B0 0x10, B1 0x11, C0 0x20; spec 1.1).
* Class code 0x0B4000: base class 0x0B "processor", subclass 0x40
  "co-processor", the class lspci shows for Xeon Phi cards. The spec does not
  say; chosen (CHOICES in :mod:`micdrv.sim`).
* BAR0: card GDDR (the aperture, spec 1.2), 64-bit prefetchable, as large as
  card memory. BAR4: the 128 KiB register file (spec 1.2), 64-bit,
  non-prefetchable.
* MSI-X with :data:`MSIX_VECTORS` = 16 vectors (the host asks for exactly
  MIC_MIN_MSIX = 9, spec 1.3; MXAR0-15 can route to 16), its table at BAR4
  :data:`MSIX_TABLE` and PBA at BAR4 :data:`MSIX_PBA`: offsets the register
  map (spec 2.1) does not use. MSI with one vector and INTx pin A, so a host
  can fall back as ``mic_setup_interrupts`` does (spec 1.3).
"""

from __future__ import annotations

from micdrv.pci.vfio_user import ConfigSpace
from micdrv.x100 import ids, regs

#: Stepping name -> PCI revision ID (spec 1.1).
STEPPING_REVISIONS = {name: rev for rev, name in ids.STEPPINGS.items()}

DEFAULT_DEVICE_ID = 0x2250
DEFAULT_STEPPING = "C0"
CLASS_COPROCESSOR = 0x0B4000  # processor / co-processor / prog-if 0 [choice]

MSIX_VECTORS = 16  # >= regs.MIN_MSIX; one per MXAR register (regs.MXAR_COUNT)
MSIX_TABLE = 0x17000  # BAR4 offset of the MSI-X table: 16 entries x 16 bytes [choice]
MSIX_PBA = 0x18000  # BAR4 offset of the pending-bit array (one qword) [choice]
MSI_VECTORS = 1
INTX_PIN_A = 1

assert MSIX_VECTORS >= regs.MIN_MSIX and MSIX_VECTORS <= regs.MXAR_COUNT


def revision_of(stepping: str | int) -> int:
    """PCI revision ID for a stepping name ("C0") or a raw revision number."""
    if isinstance(stepping, int):
        if not 0 <= stepping <= 0xFF:
            raise ValueError(f"revision {stepping:#x} does not fit a byte")
        return stepping
    try:
        return STEPPING_REVISIONS[stepping.upper()]
    except KeyError:
        raise ValueError(f"unknown stepping {stepping!r}; one of {', '.join(STEPPING_REVISIONS)}") from None


def build_config(device_id: int, revision: int, memory_size: int) -> ConfigSpace:
    """Config space of an X100 with ``memory_size`` bytes of GDDR behind BAR0."""
    if device_id not in ids.X100_DEVICE_IDS:
        raise ValueError(f"device ID {device_id:#06x} is not one of the X100 IDs 0x2250-0x225e (spec 1.1)")
    cfg = ConfigSpace(ids.INTEL_VENDOR_ID, device_id, class_code=CLASS_COPROCESSOR, revision=revision,
                      subsystem_vendor_id=ids.INTEL_VENDOR_ID, subsystem_id=device_id, interrupt_pin=INTX_PIN_A)
    cfg.add_bar(regs.APERTURE_BAR, memory_size, mem64=True, prefetchable=True)
    cfg.add_bar(regs.MMIO_BAR, regs.MMIO_SIZE, mem64=True, prefetchable=False)
    cfg.add_msix(MSIX_VECTORS, regs.MMIO_BAR, MSIX_TABLE, regs.MMIO_BAR, MSIX_PBA)
    cfg.add_msi(MSI_VECTORS, addr64=True)
    return cfg
