"""The simulated X100, driven from another process only through PciDevice (vfio-user) and its control socket.

Identity, BARs and capabilities; register semantics (spec 2); interrupt
routing through MXAR to MSI-X eventfds, MSI and INTx (spec 1.3, 2.3);
doorbells both ways; reset/ready and the boot kick into the card OS, which
checks its image (spec 2.5, 3.2, 3.3); SMPT translation and card-side faults (spec 2.4, 9);
fault hooks; clean exit. DMA is in test_sim_dma.py. The choices these tests
pin down are CHOICES C1-C29 in micdrv/sim/__init__.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import struct
import time

import pytest

from micdrv.pci import BAR0, BAR4, CONFIG, INTX, MSI, MSIX, RemoteError, new_eventfd
from micdrv.pci.device import PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE
from micdrv.x100 import regs
from micdrv.sim.cardos.image import build_image
from tests.sim_harness import IOVA_BASE, MEMORY, READY_DELAY, Host, SimProcess, fired, module_sim, wait_for

DOWNLOAD_ADDR = 64 << 20
APIC_ID = 240


@pytest.fixture(scope="module")
def sim():
    yield from module_sim()


@pytest.fixture
def host(sim):
    h = Host(sim.connect(), sim.control)
    h.reset_ready()
    yield h
    h.close()


def ring(host: Host, db: int) -> None:
    """The card rings host doorbell db (an SDBIC write through its own register window), after the
    host's posted register writes have landed."""
    host.flush()
    host.control("ring", db=db)


# --- identity, BARs, capabilities (spec 1.1-1.3; C1-C3) -----------------------------------------
def test_config_space_identifies_an_x100_c0_coprocessor(host):
    dev = host.dev
    assert dev.config_read(0x00, 2) == 0x8086
    assert dev.config_read(0x02, 2) == 0x2250
    assert dev.config_read(0x08, 1) == 0x20  # C0
    assert dev.config_read(0x08, 4) >> 8 == 0x0B4000  # processor / co-processor (C1)
    assert dev.config_read(0x3D, 1) == 1  # INTx pin A


def test_bar0_is_64bit_prefetchable_gddr_and_bar4_128k_registers(host):
    dev = host.dev
    b0, b4 = dev.region_info(BAR0), dev.region_info(BAR4)
    assert b0.size == MEMORY and b0.mmappable and b0.readable and b0.writable
    assert b4.size == regs.MMIO_SIZE and not b4.mmappable
    assert dev.config_read(0x10, 4) & 0xF == 0xC  # 64-bit, prefetchable
    assert dev.config_read(0x20, 4) & 0xF == 0x4  # 64-bit, not prefetchable
    dev.config_write(0x10, 4, 0xFFFFFFFF)
    dev.config_write(0x14, 4, 0xFFFFFFFF)
    size = ~((dev.config_read(0x14, 4) << 32 | dev.config_read(0x10, 4)) & ~0xF) + 1 & (1 << 64) - 1
    assert size == MEMORY
    for i in (BAR0, BAR4):  # the other BARs are absent
        assert dev.region_info(i).size > 0
    assert all(dev.region_info(i).size == 0 for i in (1, 2, 3, 5))


def test_msix_has_16_vectors_in_bar4_and_msi_and_intx_exist(host):
    dev = host.dev
    cap = dev.find_capability(PCI_CAP_ID_MSIX)
    assert cap is not None
    assert (dev.config_read(cap + 2, 2) & 0x7FF) + 1 == 16 >= regs.MIN_MSIX
    assert dev.config_read(cap + 4, 4) == 0x17000 | 4
    assert dev.config_read(cap + 8, 4) == 0x18000 | 4
    assert dev.find_capability(PCI_CAP_ID_MSI) is not None
    assert dev.irq_info(MSIX).count == 16 and dev.irq_info(MSI).count == 1 and dev.irq_info(INTX).count == 1


def test_device_id_stepping_memory_download_address_and_apic_id_are_configurable():
    s = SimProcess("--device-id", "0x225e", "--stepping", "B1", "--download-addr", "16M", "--apic-id", "7",
                   memory=128 << 20)
    try:
        dev = s.connect()
        assert dev.config_read(0x02, 2) == 0x225E and dev.config_read(0x08, 1) == 0x11
        assert dev.region_info(BAR0).size == 128 << 20
        assert dev.read(BAR4, regs.spad(regs.SPAD_DOWNLOAD_INFO), 4) == 16 << 20 | 7 << 1 | 1
        dev.close()
        assert s.stop(signal.SIGINT) == 0
    finally:
        s.kill()


# --- registers (spec 2.1, 2.2; C10, C15) --------------------------------------------------------
def test_scratch_pads_read_back_and_unreferenced_offsets_read_zero(host):
    for i in (0, 5, 14, 15):
        host.wr(regs.spad(i), 0xA5A50000 | i)
    assert [host.spad(i) for i in (0, 5, 14, 15)] == [0xA5A50000 | i for i in (0, 5, 14, 15)]
    before = host.control.counters()["registers"]["unmapped_writes"]
    host.wr(0x100, 0xDEADBEEF)
    assert host.rd(0x100) == 0  # also flushes the write
    assert host.control.counters()["registers"]["unmapped_writes"] == before + 1
    assert host.rd(regs.RGCR) == 0  # the reset bit is self-clearing
    assert host.dma(0, 0x0C) == 0  # unreferenced DMA register (spec 10)


def test_register_accesses_must_be_dwords(host):
    with pytest.raises(RemoteError):
        host.dev.read(BAR4, regs.spad(0), 2)
    with pytest.raises(RemoteError):
        host.dev.read_bytes(BAR4, regs.spad(1), 8)  # 8 bytes, but not 8-byte aligned
    host.dev.write(BAR4, regs.spad(4), 8, 0x11111111_22222222)  # split: +4 then +0 (C10)
    assert host.spad(4) == 0x22222222 and host.spad(5) == 0x11111111
    assert host.dev.read(BAR4, regs.spad(4), 8) == 0x11111111_22222222


def test_bar0_is_card_memory_shared_with_the_card(host, sim):
    host.gddr[0x1000:0x1008] = b"cardmem!"
    assert bytes.fromhex(sim.control("card_read", addr=0x1000, length=8)["data"]) == b"cardmem!"
    sim.control("card_write", addr=0x2000, data=b"fromcard".hex())
    assert bytes(host.gddr[0x2000:0x2008]) == b"fromcard"
    assert host.dev.read_bytes(BAR0, 0x2000, 8) == b"fromcard"


def test_card_sees_the_same_register_file(host, sim):
    host.wr(regs.spad(7), 0x12345678)
    host.flush()
    addr = regs.CARD_MMIO_BASE + regs.spad(7)
    assert bytes.fromhex(sim.control("card_read", addr=addr, length=4)["data"]) == struct.pack("<I", 0x12345678)
    sim.control("card_write", addr=addr, data=struct.pack("<I", 0xCAFE).hex())
    assert host.spad(7) == 0xCAFE


# --- interrupts (spec 1.3, 2.3; C4-C9, C12) ------------------------------------------------------
def test_sicr0_is_write_1_to_clear_and_sice0_sicc0_set_and_clear(host, sim):
    ring(host, 1)
    ring(host, 3)
    assert host.rd(regs.SICR0) == 0b1010  # set even while disabled
    host.wr(regs.SICR0, 0b0010)
    assert host.rd(regs.SICR0) == 0b1000
    host.wr(regs.SICR0, host.rd(regs.SICR0))
    assert host.rd(regs.SICR0) == 0
    host.wr(regs.SICE0, regs.INTR_ENABLE_MASK)
    assert host.rd(regs.SICE0) == regs.INTR_ENABLE_MASK
    host.wr(regs.SICC0, host.rd(regs.SICE0) & 0xF)
    assert host.rd(regs.SICE0) == regs.INTR_ENABLE_MASK & ~0xF
    assert host.rd(regs.SICC0) == host.rd(regs.SICE0)
    host.wr(regs.SIAC0, 0xFF0F)
    assert host.rd(regs.SIAC0) == 0xFF0F


def test_card_doorbell_arrives_on_the_vector_mxar_routes_it_to(host, sim):
    host.enable_msix()
    for db, entry in ((0, 3), (1, 8), (2, 0), (3, 15)):
        host.route(entry, db)
    host.enable_sources(0xF)
    before = host.control.counters()["doorbells"]["host_rung"]
    for db, entry in ((0, 3), (1, 8), (2, 0), (3, 15)):
        ring(host, db)
        assert host.pending() == [entry]
        assert host.rd(regs.SICR0) == 0  # auto-cleared as the message went out
    assert host.control.counters()["doorbells"]["host_rung"] == [n + 1 for n in before]


def test_one_source_routed_to_two_vectors_fires_both(host, sim):
    host.enable_msix()
    host.route(4, 2)
    host.route(6, 2)
    host.enable_sources(0xF)
    ring(host, 2)
    assert host.pending() == [4, 6]


def test_without_auto_clear_the_cause_stays_until_acked(host, sim):
    host.enable_msix()
    host.route(1, 0)
    host.enable_sources(0xF, auto_clear=False)
    ring(host, 0)
    assert host.pending() == [1]
    assert host.rd(regs.SICR0) == 1
    host.wr(regs.SICR0, 1)
    assert host.rd(regs.SICR0) == 0


def test_a_disabled_source_does_not_fire_until_enabled(host, sim):
    host.enable_msix()
    host.route(2, 1)
    host.enable_sources(0xF)
    host.wr(regs.SICC0, 0b10)
    ring(host, 1)
    assert host.pending() == []
    assert host.rd(regs.SICR0) == 0b10
    host.wr(regs.SICE0, 0b10)  # enabling a pending cause sends it (C6)
    assert host.pending() == [2]
    assert host.rd(regs.SICR0) == 0


def test_an_unrouted_source_sends_nothing(host, sim):
    host.enable_msix()
    host.enable_sources(0xF)
    ring(host, 2)
    assert host.pending() == []
    assert host.rd(regs.SICR0) == 0b100


def test_masked_msix_vector_pends_in_the_pba_until_unmasked(host, sim):
    host.enable_msix()
    host.route(5, 0)
    host.enable_sources(0xF)
    ctrl = 0x17000 + 16 * 5 + 12
    assert host.rd(ctrl) == 0  # entries come out of reset unmasked (C4)
    host.wr(ctrl, 1)
    ring(host, 0)
    assert host.pending() == []
    assert host.rd(0x18000) == 1 << 5
    host.wr(ctrl, 0)
    assert host.pending() == [5]
    assert host.rd(0x18000) == 0
    host.wr(ctrl, 1)
    ring(host, 0)
    host.wr(regs.MSIXPBACR, 1)  # C8: clears the PBA
    assert host.rd(0x18000) == 0 and host.rd(regs.MSIXPBACR) == 0
    host.wr(ctrl, 0)
    assert host.pending() == []


def test_the_msix_function_mask_pends_every_vector_until_cleared(host, sim):
    host.enable_msix()
    host.route(9, 1)
    host.enable_sources(0xF)
    cap = host.dev.find_capability(PCI_CAP_ID_MSIX)
    ctrl = host.dev.config_read(cap + 2, 2)
    host.dev.config_write(cap + 2, 2, ctrl | 0x8000 | 0x4000)  # enable + function mask (PCI 6.8.2)
    ring(host, 1)
    assert host.pending() == [] and host.rd(0x18000) == 1 << 9
    host.dev.config_write(cap + 2, 2, ctrl | 0x8000)
    assert host.pending() == [9]
    host.dev.disable_irqs(MSIX)
    assert host.control.counters()["interrupts"]["mode"] == "msix"  # the enable bit alone selects MSI-X (C5)
    host.dev.config_write(cap + 2, 2, ctrl)
    assert host.control.counters()["interrupts"]["mode"] == "intx"


def test_msi_fires_for_sources_in_mxar0_and_intx_for_any_enabled_source(host, sim):
    fd = new_eventfd()
    try:
        host.dev.enable_irqs(MSI, [fd])
        host.enable_sources(0xF, auto_clear=False)
        ring(host, 1)
        assert not fired(fd)  # MXAR[0] does not name source 1
        host.wr(regs.SICR0, 0xF)
        host.route(0, 1)
        ring(host, 1)
        assert fired(fd) == 1 and host.rd(regs.SICR0) == 0b10  # no auto-clear with MSI
        host.wr(regs.SICR0, 0xF)
        host.dev.disable_irqs(MSI)
        assert host.control.counters()["interrupts"]["mode"] == "intx"
        host.dev.enable_irqs(INTX, [fd])
        ring(host, 3)
        assert fired(fd) == 1
        host.wr(regs.SICR0, 0xF)
        host.dev.unmask_irq(INTX)
        cmd = host.dev.config_read(PCI_COMMAND, 2)
        host.dev.config_write(PCI_COMMAND, 2, cmd | PCI_COMMAND_INTX_DISABLE)
        ring(host, 3)
        assert not fired(fd)
        host.dev.disable_irqs(INTX)
    finally:
        os.close(fd)


def test_dropped_interrupt_leaves_the_cause_set(host, sim):
    host.enable_msix()
    host.route(7, 3)
    host.enable_sources(0xF)
    sim.control("drop_interrupt", source=3)
    ring(host, 3)
    assert host.pending() == []
    assert host.rd(regs.SICR0) == 0b1000  # nothing sent, so nothing auto-cleared
    host.wr(regs.SICR0, 0b1000)
    ring(host, 3)
    assert host.pending() == [7]
    assert host.control.counters()["interrupts"]["dropped"] >= 1


# --- reset and ready (spec 2.5; C15-C18) ----------------------------------------------------------
def test_reset_clears_spad2_then_publishes_ready_apic_id_and_download_address(host):
    host.smpt_identity()
    host.route(3, 1)
    host.wr(regs.spad(9), 99)
    host.reset()
    assert host.spad(regs.SPAD_DOWNLOAD_INFO) == 0
    assert host.post_code() == "01"
    spad2 = host.wait_ready()
    assert spad2 & 1
    assert spad2 >> 1 & 0x1FF == APIC_ID
    assert spad2 & 0xFFFFF000 == DOWNLOAD_ADDR
    assert host.post_code() == "10"
    assert all(host.rd(regs.smpt(i)) == 0 for i in range(regs.SMPT_ENTRIES))  # lost over reset (C16)
    assert all(host.rd(regs.mxar(i)) == 0 for i in range(regs.MXAR_COUNT))
    assert host.spad(9) == 0
    assert host.rd(regs.DCR) == 0x55  # C26


def test_ready_takes_about_the_configured_delay(host):
    t0 = time.monotonic()
    host.reset_ready()
    assert READY_DELAY * 0.8 <= time.monotonic() - t0 < READY_DELAY + 2.0


def test_function_reset_resets_the_card_too(host):
    host.wr(regs.spad(5), 5)
    host.dev.reset()
    assert host.spad(5) == 0 and host.spad(regs.SPAD_DOWNLOAD_INFO) == 0
    host.wait_ready()


def test_fail_next_reset_never_becomes_ready_and_the_next_reset_works(host, sim):
    sim.control("fail_next_reset")
    host.reset()
    time.sleep(READY_DELAY * 6)
    assert host.spad(regs.SPAD_DOWNLOAD_INFO) == 0
    assert sim.control.status()["state"] == "hung" and host.post_code() == "01"
    host.reset_ready()
    assert sim.control.counters()["bootstrap"]["resets_failed"] >= 1


# --- boot kick and the card OS (spec 3.1-3.3; C14, C18, C29) -----------------------------------------
def load_and_kick(host: Host, image: bytes, cmdline: str, device_page_card_addr: int) -> None:
    """What _mic_start does (spec 3.1, 3.2 steps 7-10), written out."""
    spad2 = host.spad(regs.SPAD_DOWNLOAD_INFO)
    assert spad2 & 1
    boot = spad2 & regs.DOWNLOAD_ADDR_MASK
    apic = spad2 >> 1 & 0x1FF
    host.gddr[boot:boot + len(image)] = image
    cmd = f" mem={MEMORY >> 20}M {cmdline}".encode() + b"\0"
    host.gddr[boot + len(image):boot + len(image) + len(cmd)] = cmd
    host.wr(regs.spad(regs.SPAD_FW_SIZE), len(image))
    host.smpt_identity()
    host.wr(regs.spad(regs.SPAD_DPLO), device_page_card_addr & 0xFFFFFFFF)
    host.wr(regs.spad(regs.SPAD_DPHI), device_page_card_addr >> 32)
    host.wr(regs.apicicr(7) + 4, apic)
    host.wr(regs.apicicr(7), regs.BSP_INTERRUPT_VECTOR | regs.APICICR_SEND)


def card_image(ramdisk: tuple[int, int] | None = None) -> bytes:
    """The simulated card OS image, with the ramdisk fields patched as the host would (spec 3.1 step 7)."""
    img = bytearray(build_image())
    if ramdisk:
        struct.pack_into("<II", img, 0x218, *ramdisk)
    return bytes(img)


def device_page(host: Host) -> int:
    """A device page in the arena with the bootparam header (spec 3.3); returns its arena offset."""
    dp = host.arena.alloc(4096, align=4096)
    struct.pack_into("<IbBBBQQ", host.arena.view, dp.offset, 0xC0FFEE00, -1, 1, 0xFF, 0xFF, 0, 0)
    return dp.offset


def wait_os(sim, state: str | None = None) -> dict:
    return wait_for(lambda: (r := sim.control("os")["record"]) and (state is None or r["state"] == state) and r,
                    f"the card OS record{f' in state {state}' if state else ''}")


def test_boot_kick_starts_the_card_os_which_finds_image_cmdline_and_device_page(host, sim):
    image = card_image(ramdisk=(128 << 20, 0x1234))
    dp = device_page(host)
    load_and_kick(host, image, "console=hvc0 quiet", host.card_addr(dp))
    rec = wait_os(sim, "running")
    assert rec["image_size"] == len(image)
    assert rec["image_sha256"] == hashlib.sha256(image).hexdigest()
    assert rec["cmdline"] == f" mem={MEMORY >> 20}M console=hvc0 quiet"
    assert rec["params"]["mem_mib"] == MEMORY >> 20 and rec["params"]["heartbeat"] == 30  # spec 7.2 default
    assert (rec["ramdisk_image"], rec["ramdisk_size"]) == (128 << 20, 0x1234)
    assert rec["device_page"] == regs.SYSTEM_WINDOW + IOVA_BASE + dp
    assert rec["magic_ok"] and rec["magic"] == 0xC0FFEE00
    # The card's VOP driver probes before SCIF and takes the least used doorbell, 0, for its config doorbell
    # (spec 5.2); SCIF gets the next one.
    assert rec["bootparam"]["node_id"] == 1 and rec["bootparam"]["h2c_config_db"] == 0
    assert rec["devices"]["vop"]["config_db"] == 0 and rec["devices"]["vop"]["devices"] == []
    assert rec["errors"] == []
    # No host SCIF here: the card published its node QP (spec 8.4 step 2) and waits for the host's.
    wait_for(lambda: host.post_code() == "60", "post code 60")
    h2c_scif_db, card_qp = struct.unpack_from("<BxxxxxxxxxQ", host.arena.view, dp + 6)
    assert h2c_scif_db == 1 and 0 < card_qp < MEMORY  # least used doorbell first; the QP in GDDR
    assert bytes(host.gddr[card_qp:card_qp + 8]) == struct.pack("<Q", 0x5C1F000000005C1F)  # SCIFEP_MAGIC
    assert sorted(rec["devices"]) == ["mic_x100_dma", "scif", "vop"]
    assert rec["devices"]["mic_x100_dma"]["channels"] == [4, 5, 6, 7]
    assert sim.control.status()["state"] == "running"


def test_the_card_takes_dma_channels_4_to_7_with_rings_in_gddr(host, sim):
    load_and_kick(host, card_image(), "", host.card_addr(device_page(host)))
    rec = wait_os(sim, "running")
    channels = sim.control.counters()["dma"]["channels"]
    for ch in range(4, 8):
        c = channels[ch]
        assert c["enabled"] and c["owner"] == "card" and c["dcherr"] == 0, c
        ring = rec["devices"]["mic_x100_dma"]["rings"][str(ch)]
        assert host.dma(ch, regs.DRAR_LO) == ring & 0xFFFFFFFF
        assert host.dma(ch, regs.DRAR_HI) >> regs.DRAR_HI_SIZE_SHIFT & regs.DRAR_HI_SIZE_MASK == regs.DMA_RING_SIZE
    assert not any(channels[ch]["enabled"] for ch in range(4))  # the host's stay the host's


def test_a_wrong_device_page_is_reported_and_counted_as_a_card_fault(host, sim):
    faults = sim.control.counters()["bus"]["faults"]
    load_and_kick(host, card_image(), "", regs.SYSTEM_WINDOW + IOVA_BASE + (64 << 20))  # past the arena
    rec = wait_os(sim, "running")
    assert not rec["magic_ok"] and "unreachable" in rec["errors"][0]
    wait_for(lambda: host.post_code() == "4E", "post code 4E")
    assert sim.control.counters()["bus"]["faults"] == faults + 1
    assert rec["devices"] == {}


def test_a_device_page_with_the_wrong_magic_brings_up_no_mic_devices(host, sim):
    dp = device_page(host)
    struct.pack_into("<I", host.arena.view, dp, 0xDEADBEEF)
    load_and_kick(host, card_image(), "", host.card_addr(dp))
    rec = wait_os(sim, "running")
    assert not rec["magic_ok"] and rec["magic"] == 0xDEADBEEF and "magic" in rec["errors"][0]
    wait_for(lambda: host.post_code() == "4E", "post code 4E")


def bad_images() -> dict[str, tuple[bytes, str]]:
    good = build_image()
    damaged = bytearray(good)
    damaged[-3] ^= 0xFF
    newer = bytearray(good)
    struct.pack_into("<H", newer, 0xA08, 2)
    plain = bytearray(good)
    plain[0xA00:0xA08] = b"\x00" * 8  # an x86 kernel, not a card OS image
    return {"garbage": (os.urandom(0x3000), "not a kernel image"), "damaged": (bytes(damaged), "CRC-32"),
            "newer format": (bytes(newer), "version 2"), "plain x86 kernel": (bytes(plain), "cannot run")}


@pytest.mark.parametrize("kind", list(bad_images()))
def test_an_image_the_card_os_does_not_recognise_never_comes_up(host, sim, kind):
    image, why = bad_images()[kind]
    load_and_kick(host, image, "", host.card_addr(device_page(host)))
    rec = wait_os(sim, "bad image")
    assert why in rec["errors"][0] and rec["image_size"] == len(image)
    wait_for(lambda: host.post_code() == "3E", "post code 3E")
    wait_for(lambda: why in sim.log(), "the simulator's log line")
    time.sleep(0.1)
    assert host.spad(regs.SPAD_FW_SIZE) == len(image) and host.post_code() == "3E"  # and nothing more happens


def test_host_doorbells_reach_the_card_os(host, sim):
    load_and_kick(host, card_image(), "", host.card_addr(device_page(host)))
    wait_os(sim, "running")
    # VOP's config doorbell took 0 (it probes first), SCIF's is 1
    wait_for(lambda: sim.control.counters()["doorbells"]["handlers"] == [0, 1], "the VOP and SCIF doorbell handlers")
    c = sim.control.counters()["doorbells"]
    before, unhandled = c["rung"], c["unhandled"]
    for db in (1, 3, 7):  # send_intr for db < 8: read APICICR[db], OR bit 13, write back (spec 2.3)
        host.wr(regs.apicicr(db), host.rd(regs.apicicr(db)) | regs.APICICR_SEND)
        assert not host.rd(regs.apicicr(db)) & regs.APICICR_SEND  # C13
    host.wr(regs.apicicr(3), host.rd(regs.apicicr(3)) | regs.APICICR_SEND)
    for db in (8, 15):  # db >= 8: write 0 to RDMASR[db - 8]
        host.wr(regs.rdmasr(db - 8), 0)
    want = [0] * 16
    want[1], want[3], want[7], want[8], want[15] = 1, 2, 1, 1, 1
    wait_for(lambda: sim.control.counters()["doorbells"]["rung"] == [b + w for b, w in zip(before, want)],
             "the card to count the doorbells")
    wait_for(lambda: sim.control.counters()["doorbells"]["unhandled"] == unhandled + 5, "5 unhandled doorbells")
    wait_for(lambda: sim.control("os")["record"]["devices"]["scif"]["interrupts"] >= 1, "the SCIF doorbell")


def test_a_card_waiting_for_the_host_can_still_power_off(host, sim):
    dp = device_page(host)
    load_and_kick(host, card_image(), "", host.card_addr(dp))
    wait_os(sim, "running")  # no host SCIF: the card waits for the host's queue pair
    sim.control("kernel", action="poweroff")
    rec = wait_os(sim, "poweroff")
    assert rec["devices"]["scif"]["connected"] is False
    wait_for(lambda: host.post_code() == "F3", "post code F3")
    h2c_scif_db, card_qp = struct.unpack_from("<BxxxxxxxxxQ", host.arena.view, dp + 6)
    assert (h2c_scif_db, card_qp) == (0xFF, 0)  # the card withdrew its queue pair (spec 8.4 step 6)


def test_the_kernel_switches_need_a_running_card_os(host, sim):
    reply = sim.control.call("kernel", action="panic")
    assert not reply["ok"] and "no card OS is running" in reply["error"]


def test_reset_stops_the_card_os(host, sim):
    load_and_kick(host, card_image(), "", host.card_addr(device_page(host)))
    wait_os(sim, "running")
    host.reset_ready()
    assert sim.control("os")["record"] is None
    unhandled = sim.control.counters()["doorbells"]["unhandled"]
    host.wr(regs.rdmasr(0), 0)
    wait_for(lambda: sim.control.counters()["doorbells"]["unhandled"] == unhandled + 1, "an unhandled doorbell")


# --- SMPT and card-side faults (spec 2.4, 9; C19, C20) -------------------------------------------------
def test_smpt_entries_translate_card_addresses_onto_the_host_arena(host, sim):
    host.arena.view[0x3000:0x3010] = b"host arena bytes"
    host.smpt_identity()
    host.flush()
    card = regs.SYSTEM_WINDOW + IOVA_BASE + 0x3000
    assert bytes.fromhex(sim.control("card_read", addr=card, length=16)["data"]) == b"host arena bytes"
    host.wr(regs.smpt(5), regs.smpt_value(0))  # entry 5 -> host page 0 as well
    host.flush()
    alias = regs.SYSTEM_WINDOW + 5 * regs.SMPT_PAGE_SIZE + IOVA_BASE + 0x3000
    assert bytes.fromhex(sim.control("card_read", addr=alias, length=16)["data"]) == b"host arena bytes"
    sim.control("card_write", addr=alias, data=b"written by card!".hex())
    assert bytes(host.arena.view[0x3000:0x3010]) == b"written by card!"


@pytest.mark.parametrize("where", ["below the arena", "past the arena", "entry to an unmapped page", "no memory",
                                   "past GDDR", "register window as memory"])
def test_card_side_faults_are_counted_and_the_card_survives(host, sim, where):
    host.smpt_identity()
    host.wr(regs.smpt(9), regs.smpt_value(5 * regs.SMPT_PAGE_SIZE))  # a host page with nothing mapped
    addr = {"below the arena": regs.SYSTEM_WINDOW + IOVA_BASE - 4096,
            "past the arena": regs.SYSTEM_WINDOW + IOVA_BASE + (16 << 20) - 8,
            "entry to an unmapped page": regs.SYSTEM_WINDOW + 9 * regs.SMPT_PAGE_SIZE + IOVA_BASE,
            "no memory": 0x40_0000_0000, "past GDDR": MEMORY - 8,
            "register window as memory": regs.CARD_MMIO_BASE}[where]
    host.flush()
    before = sim.control.counters()["bus"]["faults"]
    reply = sim.control.call("card_read", addr=addr, length=16)
    assert not reply["ok"] and reply["fault"]
    counters = sim.control.counters()["bus"]
    assert counters["faults"] == before + 1 and f"{addr:#x}" in counters["recent"][-1]
    host.wr(regs.spad(0), 1)
    assert host.spad(0) == 1  # still answering


# --- the process ---------------------------------------------------------------------------------------
def test_bad_arguments_exit_with_usage_error(tmp_path):
    import subprocess
    import sys
    from tests.sim_harness import REPO
    r = subprocess.run([sys.executable, "-m", "micdrv.sim", "--socket", str(tmp_path / "s"), "--device-id", "0x1234"],
                       cwd=REPO, capture_output=True, timeout=20)
    assert r.returncode == 2 and b"0x1234" in r.stderr


def test_sigterm_stops_a_card_with_a_client_connected_and_dma_running():
    s = SimProcess(wait_ready=True)
    try:
        h = Host(s.connect(), s.control)
        h.smpt_identity()
        h.setup_channel(0)
        src = h.arena.alloc(512 << 10).offset
        h.submit(0, [(h.card_addr(src) | (512 << 10) // 64 << regs.DESC_LEN_SHIFT,
                      regs.DESC_MEMCPY << regs.DESC_TYPE_SHIFT | (128 << 20) + i * (512 << 10)) for i in range(40)])
        t0 = time.monotonic()
        try:
            status = s.stop()
        except subprocess.TimeoutExpired:    # the simulator logged every thread's stack after 2 s
            pytest.fail(f"the simulator did not stop:\n{s.log()[-8000:]}")
        assert status == 0
        assert time.monotonic() - t0 < 3.0, s.log()[-8000:]
        assert "Traceback" not in s.log()
        h.close()
    finally:
        s.kill()


def test_the_card_survives_a_client_that_goes_away(sim):
    dev = sim.connect()
    dev.write(BAR4, regs.spad(6), 4, 66)
    dev.close()
    dev = sim.connect()
    try:
        assert dev.read(BAR4, regs.spad(6), 4) == 66  # device state is kept (spec 2.6)
        assert dev.config_read(0, 2) == 0x8086 and CONFIG == 7
    finally:
        dev.close()
