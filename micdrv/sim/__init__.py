"""The simulated X100 card: a vfio-user server process the driver cannot tell from silicon.

ARCHITECTURE.md "The one rule": the driver reaches this card only through
:class:`~micdrv.pci.PciDevice` -- config space, BAR0/BAR4 (read, write,
mmap), MSI-X/MSI/INTx eventfds, DMA maps, reset -- over a vfio-user socket,
exactly as it reaches a card through kernel VFIO. Run it with
``python -m micdrv.sim --socket PATH`` (:mod:`.cli`). A separate control
socket (:mod:`.control`) carries fault hooks and counters for tests; the
driver never uses it.

Modules, one concept each:

============================ ==========================================================
:mod:`.identity`             PCI identity, BARs, MSI-X/MSI/INTx capabilities (spec 1)
:mod:`.registers`            the 128 KiB register file: dispatch, access sizes (spec 2.1)
:mod:`.interrupts`           SICR0/SICE0/SICC0/SIAC0, MXAR, MSI-X table/PBA, delivery
:mod:`.doorbells`            SDBIC (card->host), APICICR/RDMASR (host->card) (spec 2.3)
:mod:`.smpt`                 the System Memory Page Table (spec 2.4)
:mod:`.bus`                  the card's physical address space (spec 9)
:mod:`.bootstrap`            reset, SPAD2 ready handshake, boot kick (spec 2.5, 3.2)
:mod:`.dma_descriptors`      rings and descriptors, DCHERR bits (spec 4.2, 4.3)
:mod:`.dma_engine`           8 channels, DCR, a thread per channel (spec 4)
:mod:`.cardos`               the card OS: image format, kernel, SCIF, COSM client (spec 3, 7-9)
:mod:`.card`                 the device model wiring it all; CardSide, the card OS's API
:mod:`.control`              control socket: fault hooks, counters (sim only)
:mod:`.cli`                  the entry point
============================ ==========================================================

CHOICES
=======

The one place listing what the simulator decided where the spec
(../shared/spec/x100-host-abi.md) says [INF] or [UNK] or nothing. Each is
tested in tests/test_sim_card.py; the module named holds the code.

PCI identity (:mod:`.identity`)
  C1. Class code 0x0B4000 (processor / co-processor), subsystem IDs 0x8086 /
      the device ID. Revision = stepping (spec 1.1), default C0 = 0x20.
  C2. BAR0 = GDDR, 64-bit prefetchable, size = card memory (a power of two,
      default 8 GiB, a sparse memfd, mmap-able). BAR4 = registers, 64-bit
      non-prefetchable, 128 KiB, trapped (not mmap-able).
  C3. MSI-X with 16 vectors (one per MXAR0-15; the host asks for 9), table
      at BAR4 0x17000, PBA at BAR4 0x18000 -- offsets the register map does
      not use. MSI: 1 vector, 64-bit, no per-vector mask. INTx pin A.
  C4. MSI-X table entries come out of power-on and function reset
      *unmasked*: a VFIO user programs vectors with SET_IRQS and never writes
      the table (kernel vfio-pci does). Masking an entry (vector control bit
      0) or the function pends the message in the PBA until unmasked.

Interrupts (:mod:`.interrupts`)
  C5. Mode: MSI-X if its enable bit is set in config space or the client
      gave MSI-X vectors eventfds with SET_IRQS (what enabling means for a
      VFIO user); else MSI likewise; else INTx.
  C6. SICR0 write-1-to-clear. SICE0 write sets enable bits and sends a
      message for causes already set among them. SICC0 write clears enable
      bits and reads as SICE0. SIAC0 and MXAR0-15 plain read/write.
  C7. MSI-X: a set+enabled cause fires every vector whose MXAR has its bit;
      auto-clear (SIAC0) clears the cause when the message is sent. MSI:
      vector 0 for causes set in MXAR[0], no auto-clear. INTx: any enabled
      cause unless the command register disables INTx, one edge per new
      cause, no auto-clear.
  C8. MSIXPBACR: any write clears the whole PBA; reads 0.
  C9. Dropped interrupt (fault hook): no message, and the cause stays set
      (auto-clear only happens when a message is sent).

Registers, doorbells, reset (:mod:`.registers`, :mod:`.doorbells`, :mod:`.bootstrap`, :mod:`.card`)
  C10. Offsets nothing maps read 0 and ignore writes (counted). Accesses
       are 4 bytes, or 8 bytes aligned and split in two dwords (write: +4
       first, then +0, so APICICR's low dword triggers last); other sizes
       fail with EINVAL.
  C11. Both sides (host BAR4, card window 0x08_007C_0000) see one register
       file with one set of semantics.
  C12. SDBIC: a write with bit 31 raises source db; SDBIC reads 0.
  C13. APICICR low dword: every write with bit 13 sends one IPI; bit 13
       reads back 0 (self-clearing); the high dword is plain. RDMASR: every
       write rings card doorbell 8+n; the value reads back.
  C14. Before the card OS runs, IPIs go to the bootstrap: only APICICR7,
       vector 229, destination = the published APIC ID, in state ready
       starts the OS; anything else is ignored and counted (kicks_ignored).
       Once the OS runs, APICICR0-7 sends are card doorbells 0-7 (7
       included). Doorbells nobody handles are counted (unhandled).
  C15. RGCR: a write with bit 0 resets the card; RGCR reads 0.
  C16. A card reset clears all SPADs (not only SPAD2), SICR0/SICE0/SIAC0,
       MXAR0-15, SMPT00-31 (spec 2.4: "may be lost"; the host must restore
       them), APICICR/RDMASR, every DMA channel register, DCR (to 0x55), and
       stops the card OS. Config space and the MSI-X table/PBA survive; a
       vfio DEVICE_RESET resets those too and then the card.
  C17. Power-on is a reset: the card is "ready" after the ready delay
       (default 0.2 s) without the host doing anything. SPAD2 = 1 | APIC
       ID << 1 | download address; APIC ID default 240 (core 60 x 4, the
       last of 61 cores), download address default 64 MiB.
  C18. Post codes (two ASCII characters, low byte first): "01" reset
       started, "10" bootstrap ready, "20" kick accepted, then the card OS's
       (:data:`.cardos.kernel.POST_CODES`): "30" card OS started, "3E" image
       not recognised, "40" device page found with magic 0xC0FFEE00, "4E"
       device page unreachable or wrong magic, "50" DMA channels 4-7 up,
       "60" SCIF node QP published, "70" host node alive, "80" COSM client
       connected, "EE" kernel panic, "F2"/"F3"/"F4" halted / powered off /
       restarting. A failed reset (fault hook) stays at "01" with SPAD2 = 0
       until the next reset.

SMPT and the card bus (:mod:`.smpt`, :mod:`.bus`)
  C19. The no-snoop bit is stored and ignored. An access crossing a 16 GiB
       SMPT page is split and translated per page (a zero-copy view of such
       a range is a fault).
  C20. Card-side faults (outside GDDR, the register window used as memory,
       no memory at the address, SMPT translation outside every DMA map or
       against its permissions, a DMA map without an fd) are counted,
       logged, kept (last 64) and raised as CardFault; never fatal.

DMA engine (:mod:`.dma_descriptors`, :mod:`.dma_engine`)
  C21. DCHERR bits: 0x01 unknown type (0 included), 0x02 misaligned (MEMCPY
       addresses % 64, STATUS destination % 8), 0x04 length 0 or over the
       maximum (host-owned 512 KiB, card-owned 1 MiB - 64), 0x08 address
       fault, 0x10 host-to-host copy, 0x20 ring fault (size 0, base not
       64-byte aligned, descriptors unreadable), 0x40 DHPR fault.
  C22. The channel stops at the bad descriptor (DTPR points at it). DCHERR
       is write-1-to-clear and is also cleared when DCR disables the channel
       (upstream's setup never writes DCHERR but expects 0 after re-enable).
       Errors not masked in DCHERRMSK raise source 30 (SBOX error).
  C23. DHPR written with its current value, or >= the ring size: DHPR
       fault (spec 4.4 calls a repeated value a hardware error).
  C24. Writing DRAR_LO or DRAR_HI restarts the ring: DHPR = DTPR = 0. Ring
       sizes 1..0x1FFFF are all accepted.
  C25. DSTAT = DTPR in bits 16:0, | 0x20000000 (quiesced) while the channel
       is disabled or in error.
  C26. DCR resets to 0x55: channels 0-3 host-owned, 4-7 card-owned, all
       disabled. Bit 2n+1 enable, bit 2n owner (the code, spec 4.2).
  C27. STATUS interrupt: raised after DTPR moved past the descriptor; a
       channel interrupt masked in DCAR (IM1 host-owned, IM0 card-owned)
       sets no cause at all. Card-owned channels raise SICR0 bit 8+ch too and
       call the card OS's DMA interrupt handler.
  C28. The destination address is qw1 bits 58:0 (everything below the
       interrupt bit); stray high bits make an address fault.

Card OS (:mod:`.cardos`)
  C29. Its record (state, image size and SHA-256, command line and
       parameters, ramdisk header fields, device page address, magic,
       bootparam, heap, clock, log, each driver's status, errors) is
       published through the control socket's ``os`` command, not in card
       memory; a reset clears it.
  C30. The image format is the simulator's own (:mod:`.cardos.image`): an
       x86 boot sector and setup header ("HdrS", room for the host's
       ramdisk fields at 0x218/0x21C), then a card OS header with a magic,
       a format version, a CRC-32 and the log buffer's addresses. Anything
       else gets post code 3E and never comes up.
  C31. The kernel is never relocated: its log buffer is at the absolute
       physical address the image names, wherever the bootstrap loaded it.
       The heap (SCIF queues, DMA rings) is the largest free range of card
       memory outside the first MiB, the kernel (load address + init_size,
       image and command line), the log buffer and the ramdisk, at most
       64 MiB. A log buffer that overlaps what the host loaded stops the
       boot (3E).
  C32. A panic sends the host nothing (upstream has no panic notifier):
       "Kernel panic - not syncing" in the log, post code EE, then no
       heartbeat, no interrupt handled, connections left open. A hang is the
       same silence without the log line and post code. Power-off, halt and
       reboot report poweroff (3), halted (2) and restart (4, not the
       kernel's SYSTEM_RESTART 5, spec 7.1) before the COSM connection
       closes and SCIF exits.
"""
