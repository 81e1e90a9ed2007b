"""The X100 register map: BAR4 offsets, bits and values (spec sections 1.3, 2 and 4.2).

Shared by the host driver and the simulated card because the spec defines
these things; every number cites its section of ../shared/spec/x100-host-abi.md.
All registers are 32-bit, little endian, accessed with 32-bit reads/writes
(spec "Conventions").
"""

from __future__ import annotations

# --- BARs (spec 1.2) -------------------------------------------------------
APERTURE_BAR = 0  # BAR0: card GDDR; BAR0 offset X = card physical address X
MMIO_BAR = 4  # BAR4: the register file
MMIO_SIZE = 0x20000  # 128 KiB: the card maps its register window with this length (spec 1.2)

SBOX_BASE = 0x10000  # "SBOX+X" = MMIO+0x10000+X (spec conventions)
# The card's own view of the same register file: card physical 0x08_007C_0000, length MMIO_SIZE,
# same offsets as BAR4 (spec 2.3 "Card-side view", spec 9 card address map).
CARD_MMIO_BASE = 0x08_007C_0000

# --- interrupt sources (spec 1.3) -------------------------------------------
# Bit numbers in SICR0/SICE0/SIAC0 and in MXAR: struct mic_intr_info {0, 8, 30; 4, 8, 1}.
INTR_DB_START, INTR_DB_COUNT = 0, 4  # card->host doorbells 0..3
INTR_DMA_START, INTR_DMA_COUNT = 8, 8  # DMA channels 0..7 (host uses 0..3)
INTR_ERR_START, INTR_ERR_COUNT = 30, 1  # SBOX error
NUM_INTR_SOURCES = 32  # MIC_NUM_OFFSETS
MIN_MSIX = 9  # MIC_MIN_MSIX: 3 virtio + 1 shutdown + 4 DMA + 1 SCIF (spec 1.3)

# --- absolute BAR4 offsets (spec 2.1) ---------------------------------------
SMPT_BASE = 0x13100  # SMPT00..31 at 0x13100 + 4*i
SMPT_ENTRIES = 32
RGCR = 0x14010  # bit 0 = trigger reset
RGCR_RESET = 1 << 0
SICR0 = 0x19004  # interrupt cause; write-1-to-clear
SICE0 = 0x1900C  # interrupt enable set
SICC0 = 0x19010  # interrupt enable clear
SIAC0 = 0x19014  # auto-clear enable (MSI-X only)
MXAR_BASE = 0x19044  # MXAR[entry] = 0x19044 + 4*entry: source bitmap of MSI-X entry
MXAR_COUNT = 16  # MXAR0..15 sit between 0x19044 and MSIXPBACR at 0x19084 [INF]
MSIXPBACR = 0x19084  # MSI-X pending-bit-array clear (A0 writes 1 after each interrupt)
DMA_CHAN_BASE = 0x1A000  # channel registers at 0x1A000 + 0x40*ch (spec 4.2)
DMA_CHAN_STRIDE = 0x40
DCR = 0x1A280  # DMA global control (spec 4.2)
APICICR_BASE = 0x1A9D0  # APICICR0..7 at 0x1A9D0 + 8*n, 64-bit: low dword +0, high +4
APICICR_COUNT = 8
SPAD_BASE = 0x1AB20  # SPAD0..15 at 0x1AB20 + 4*i
SPAD_COUNT = 16
RDMASR_BASE = 0x1B180  # host->card "RDMA status" doorbells 8..15 at 0x1B180 + 4*n
RDMASR_COUNT = 8
SDBIC_BASE = 0x1CC90  # card->host doorbell request SDBIC0..3 at 0x1CC90 + 4*n
SDBIC_COUNT = 4
SDBIC_DBREQ = 0x80000000  # the card writes this to ring (spec 2.3)
POSTCODE = 0x0242C  # not SBOX-relative: low byte and next byte are two ASCII chars


def smpt(i: int) -> int:
    return SMPT_BASE + 4 * i


def mxar(entry: int) -> int:
    return MXAR_BASE + 4 * entry


def spad(i: int) -> int:
    return SPAD_BASE + 4 * i


def apicicr(n: int) -> int:
    return APICICR_BASE + 8 * n


def rdmasr(n: int) -> int:
    return RDMASR_BASE + 4 * n


def sdbic(n: int) -> int:
    return SDBIC_BASE + 4 * n


# --- interrupt enable values (spec 2.3) -------------------------------------
INTR_ENABLE_MASK = 0x0000FF0F  # doorbell bits 3:0, DMA bits 15:8

# --- host->card doorbells (spec 2.3) -----------------------------------------
NUM_SBOX_IRQ = 8  # MIC_X100_NUM_SBOX_IRQ: db < 8 via APICICR, db >= 8 via RDMASR
NUM_CARD_DOORBELLS = 16
APICICR_SEND = 1 << 13  # "send" bit in the APICICR low dword

# --- scratch pads (spec 2.2) ---------------------------------------------------
SPAD_DOWNLOAD_INFO = 2  # card bootstrap: bit 0 ready, bits 9:1 APIC ID, bits 31:12 boot address
SPAD_FW_SIZE = 5
SPAD_DPLO = 14  # device page card address, low 32 bits
SPAD_DPHI = 15  # high 32 bits
DOWNLOAD_READY = 1 << 0
DOWNLOAD_APIC_SHIFT, DOWNLOAD_APIC_MASK = 1, 0x1FF  # bits 9:1
DOWNLOAD_ADDR_MASK = 0xFFFFF000  # bits 31:12
MAX_BOOT_ADDR = 0x80000000  # host rejects a download address above 2^31 (spec 3.1)

# --- bootstrap kick (spec 3.2 step 10) -------------------------------------------
BSP_INTERRUPT_VECTOR = 229  # MIC_X100_BSP_INTERRUPT_VECTOR
BOOT_APICICR = 7  # the bootstrap is IPI'd through APICICR7

# --- SMPT (spec 2.4) --------------------------------------------------------------
SMPT_PAGE_SHIFT = 34  # 16 GiB pages
SMPT_PAGE_SIZE = 1 << SMPT_PAGE_SHIFT
SYSTEM_WINDOW = 0x80_0000_0000  # card addresses from here translate through the SMPT
SYSTEM_WINDOW_END = SYSTEM_WINDOW + SMPT_ENTRIES * SMPT_PAGE_SIZE  # 512 GiB window, exclusive end
SMPT_NO_SNOOP = 1 << 0


def smpt_value(host_page_addr: int, no_snoop: bool = False) -> int:
    """Register value for host bus page address A: ((A >> 34) << 2) | no_snoop, 32 bits (spec 2.4)."""
    return (((host_page_addr >> SMPT_PAGE_SHIFT) << 2) | (SMPT_NO_SNOOP if no_snoop else 0)) & 0xFFFFFFFF


def smpt_host_page(value: int) -> int:
    """Inverse of :func:`smpt_value`: the host bus address of the page an entry points at."""
    return (value >> 2) << SMPT_PAGE_SHIFT


# --- DMA channel registers (spec 4.2) ----------------------------------------------
DMA_NUM_CHANNELS = 8  # host 0..3, card 4..7 (spec 4.1)
DMA_HOST_CHANNELS = range(0, 4)
DMA_CARD_CHANNELS = range(4, 8)
DCAR = 0x00  # bit 24 IM0 (card-owned mask), bit 25 IM1 (host-owned mask); 1 = masked
DCAR_IM0 = 1 << 24
DCAR_IM1 = 1 << 25
DHPR = 0x04  # head: software writes "valid up to here"
DTPR = 0x08  # tail, advanced by hardware
DRAR_LO = 0x14
DRAR_HI = 0x18
DSTAT = 0x20  # bits 16:0 completion count (hardware tail); 31:28 status
DSTAT_COUNT_MASK = 0x1FFFF
DSTAT_QUIESCED = 0x20000000
DCHERR = 0x2C  # non-zero = channel error
DCHERRMSK = 0x30

# DRAR_HI layout (spec 4.2)
DRAR_HI_SIZE_SHIFT, DRAR_HI_SIZE_MASK = 4, 0x1FFFF  # bits 20:4 ring size in descriptors
DRAR_HI_SYSMEM = 1 << 26  # host-owned: ring in system memory
DRAR_HI_SMPT_SHIFT, DRAR_HI_SMPT_MASK = 21, 0x1F  # bits 25:21 SMPT entry index
DRAR_HI_SYS_ADDR_MASK = 0x3  # bits 1:0 = ring address bits 33:32 (host-owned)
DRAR_HI_CARD_ADDR_MASK = 0xF  # bits 3:0 = ring address bits 35:32 (card-owned)


def dma_reg(ch: int, reg: int) -> int:
    return DMA_CHAN_BASE + DMA_CHAN_STRIDE * ch + reg


# DCR: follow the code, not the header comment: bit 2n = owner (0 card, 1 host), bit 2n+1 = enable (spec 4.2)
def dcr_owner_bit(ch: int) -> int:
    return 1 << (2 * ch)


def dcr_enable_bit(ch: int) -> int:
    return 1 << (2 * ch + 1)


# --- descriptors (spec 4.3) ----------------------------------------------------------
DMA_DESC_SIZE = 16
DMA_RING_SIZE = 128 * 1024 - 4  # MIC_DMA_DESC_RX_SIZE = 131068 descriptors
DMA_ALIGN = 64  # copy_align = 6
DMA_HOST_MAX_XFER = 512 * 1024  # per memcpy descriptor, host channels
DMA_CARD_MAX_XFER = 1024 * 1024 - 64
DESC_TYPE_SHIFT = 60  # qw1 bits 63:60
DESC_MEMCPY = 1
DESC_STATUS = 2
DESC_STATUS_INTR = 1 << 59  # STATUS: raise the channel interrupt
DESC_ADDR_MASK = (1 << 46) - 1  # qw0 bits 45:0 source; destination in qw1 low bits [INF width]
DESC_LEN_SHIFT = 46  # qw0 bits 59:46 = length / 64
DESC_LEN_MASK = (1 << 14) - 1
