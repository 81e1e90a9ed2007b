"""The commented default configuration ``micctl install`` puts at /etc/micdrv/micdrv.toml.

Every key micdrv.config accepts is shown with its default (or, where the
default is "unset", an example), commented out, so the file as installed
changes nothing. The convention the tests rely on: a line starting with ``#``
followed directly by a letter or ``[`` is a setting; ``# `` (hash, space)
starts an explanation. Removing the ``#`` from every setting gives a valid
configuration (tests/test_install.py checks that, and that no key of
micdrv.config is left out).
"""

TEXT = """\
# micdrv configuration.
#
# Installed by "micctl install"; your edits are kept when it runs again (it
# writes micdrv.toml.new beside this file instead). Every setting below is
# commented out and shows its default, so this file as installed changes
# nothing. To change one, remove the "#" in front of it. Check the file with
# "micctl doctor"; a card's daemon reads it when it starts:
#     systemctl restart micdrv@0000:03:00.0.service
# Lines starting with "# " explain; lines starting with "#" and a letter or "["
# are settings.

# --- the host side, shared by every card's daemon ----------------------------
#[global]
# Control sockets are <run_dir>/<card>.sock, the FUSE trees <run_dir>/<card>.
#run_dir = "/run/micdrv"
# Mode of the control sockets, and the group that may use them (micctl).
# Default: no group change (root's group).
#socket_mode = 0o660
#socket_group = "mic"
# Relative firmware and ramdisk paths start here (the kernel's request_firmware
# search path, spec 3.1).
#firmware_dir = "/lib/firmware"
# One of "debug", "info", "warning", "error".
#log_level = "info"
# Each card's sysfs-compatible FUSE tree (state, cmdline, ..., block/<disk>;
# README "The FUSE tree"): on or off, the directory the trees are mounted in
# (<fuse_dir>/<card>; default: run_dir), and the group that may read them
# (default: socket_group; neither: root only). Only root may write.
#fuse = true
#fuse_dir = "/run/micdrv"
#fuse_group = "mic"

# --- settings every card gets unless its own section says otherwise ----------
#[defaults]
# The card's kernel and initramfs, as sysfs "firmware" and "ramdisk" (spec 3.5).
# ramdisk default: none.
#firmware = "mic/uos.img"
#ramdisk = "mic/uos.initramfs"
# Kernel command line for the card; the host puts " mem=<N>M" in front of it
# (at most 2000 bytes, spec 3.1).
#cmdline = ""
# "linux" (boot the firmware image) or "flash" (spec 3.5).
#bootmode = "linux"
# Boot the card as soon as the daemon has attached to it.
#boot_on_start = false
# After the card shuts down, reset it to ready, and boot it again if it asked
# for a restart (what mpssd did, spec 6.5). A crashed card is always left for
# the operator (micctl log, then micctl reset).
#auto_reset = true
# Seconds to wait for the card to report ready after a reset (spec 2.5).
#reset_timeout = 45
# The COSM heartbeat watchdog (spec 7.2): a card silent for timeout seconds
# is marked lost. "heartbeat = false" turns it off.
#heartbeat = { enable = true, timeout = 40 }
# Card kernel virtual addresses of __log_buf and of log_buf_len (sysfs
# log_buf_addr, log_buf_len, spec 3.5), from the card kernel's System.map;
# they let micdrv read the card's kernel log. Default: none.
#log_buf_addr = 0xffffffff81f6ee20
#log_buf_len = 0xffffffff81f6ee18
# Where the card's kernel expects _mic_vring_info after each vring (spec 5.6):
# "rounded" (Linux 5.10 and the stable kernels since 4.9.241 / 4.19.154 /
# 5.4.73) or "legacy" (v5.4-v5.9 releases before those fixes). Host and card
# must agree; the simulated card reads micdrv_sim.vring_info= on its command line.
#vring_info = "rounded"
# How VOP moves host-to-card payload (spec 5.7): "spec" -- by DMA where
# aligned, else through BAR0, from a staging copy (upstream's rules) -- or
# "h2c-direct": the backends write card memory through the BAR0 mapping
# themselves (one copy, no DMA; host CPU instead of the card's engine).
#vop_copy = "spec"

# --- one card ----------------------------------------------------------------
# A card is named micN and tied to its PCI address, or named by the address
# itself ([card."0000:04:00.0"]). Its section takes every key [defaults] does.
#[card.mic0]
#pci = "0000:03:00.0"
#cmdline = "console=hvc0"
#boot_on_start = true

# Its virtio devices (spec 6.1); repeat a table for more than one.
# A network interface backed by a tap on the host (spec 6.2). tap defaults to
# the card name; address is the host's end, e.g. mpssd's 172.31.<N+1>.254/24;
# bridge puts the tap in an existing bridge instead.
#[[card.mic0.net]]
#tap = "mic0"
#address = "172.31.1.254/24"
# The card's own address, passed on its kernel command line (MPSS:
# 172.31.<N+1>.1).
#card_address = "172.31.1.1"
#bridge = "micbr0"
# Move the tap into this existing network namespace.
#netns = "mics"
# The tap's MTU (MPSS: 64512).
#mtu = 64512
# The card's MAC; default: derived from the PCI address or card name,
# locally administered, the same on every boot.
#mac = "02:6d:69:63:00:01"

# A disk backed by an image file (spec 6.4), by its absolute path; the file must
# be readable (and, unless readonly, writable) by root through its mode bits.
#[[card.mic0.blk]]
#path = "/var/lib/micdrv/mic0.img"
#readonly = false
# The disk's serial number (virtio-blk GET_ID, at most 20 ASCII bytes);
# default: the image's file name.
#serial = "mic0-disk0"

# The card's console on a host pty (spec 6.3).
#[[card.mic0.console]]
# Where the pty's symlink goes; default <run_dir>/<card>/console.
#path = "/run/micdrv/mic0/console"
"""
