"""The card's shell on hvc0, typed into through the console backend's pty, as ``micctl console`` would.

A real card kernel (tests/card_kernel.py) whose console is bound through
the direct transport to :class:`backends.console.ConsoleBackend`; the test
opens the pty slave and types. With a disk on an image file and eth0 on a
tap in a namespace the test creates (root), every command's output is
checked against the real thing (the file, the namespace).
"""

from __future__ import annotations

import os
import re
import select
import time

import pytest

from backends.blk import BlkBackend
from backends.console import ConsoleBackend
from backends.net import NetBackend
from tests.card_kernel import BootedCard, wait_for
from tests.netns_harness import namespace

PROMPT = b"mic0:~# "
WAIT = 20.0


class Term:
    """The host end of the card's console: the pty slave."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        self.seen = b""

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def expect(self, token: bytes, timeout: float = WAIT) -> bytes:
        """Everything up to and including ``token``."""
        deadline = time.monotonic() + timeout
        while token not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {token!r} on the console; got {self.seen[-500:]!r}")
            if select.select([self.fd], [], [], min(left, 0.2))[0]:
                self.seen += os.read(self.fd, 65536)
        i = self.seen.index(token) + len(token)
        out, self.seen = self.seen[:i], self.seen[i:]
        return out

    def command(self, line: str, timeout: float = WAIT) -> str:
        """Type ``line`` and Enter; the output between the echoed line and the next prompt."""
        self.send(line.encode() + b"\r")
        raw = self.expect(PROMPT, timeout)
        echo = line.encode() + b"\r\n"
        assert raw.startswith(echo), raw
        return raw[len(echo):-len(PROMPT)].decode()

    def close(self) -> None:
        os.close(self.fd)


class ConsoleCard:
    def __init__(self, cmdline: str = ""):
        self.c = BootedCard(cmdline)
        self.backends = [ConsoleBackend.open()]
        self.console = self.c.bus.add(self.backends[0])
        self.term = Term(self.backends[0].path)
        banner = self.term.expect(PROMPT).decode()
        assert "micdrv-sim-cardos 1.0 mic0 hvc0" in banner

    def close(self) -> None:
        self.term.close()
        try:
            self.c.close()
        finally:
            for be in self.backends:
                be.close()


@pytest.fixture(scope="module")
def ns():
    with namespace("mdc") as name:
        yield name


@pytest.fixture(scope="module")
def full(ns, tmp_path_factory):
    """A card with hvc0, vda on an image and eth0 on a tap in the namespace."""
    c = ConsoleCard()
    img = tmp_path_factory.mktemp("card") / "disk.img"
    img.write_bytes(bytes(1 << 20))
    disk = BlkBackend.open(str(img), serial="console-disk")
    net = NetBackend.open("mic0", tap=f"mdc{os.getpid() % 100000}c", netns=ns)
    c.backends += [disk, net]
    c.c.bus.add(disk)
    c.c.bus.add(net)
    c.image = str(img)
    yield c
    c.close()


pytestmark = pytest.mark.root


def test_help_lists_every_command(full):
    out = full.term.command("help")
    for cmd in ("help", "uname", "uptime", "ip", "ping HOST", "blk list", "blk read", "blk write", "blk verify",
                "blk randread", "udp send", "udp sink", "dmesg", "poweroff", "reboot", "panic"):
        assert f"  {cmd}" in out, cmd
    assert out.endswith("\r\n") and "\n" not in out.replace("\r\n", "")   # CR LF line ends only


def test_uname_and_uptime(full):
    assert full.term.command("uname") == "micdrv-sim-cardos\r\n"
    assert full.term.command("uname -a") == "micdrv-sim-cardos mic0 1.0 #1 SMP k1om\r\n"
    assert re.fullmatch(r" \d\d:\d\d:\d\d up \d+ min,  load average: 0\.00, 0\.00, 0\.00\r\n",
                        full.term.command("uptime"))
    assert "usage: uname [-a]" in full.term.command("uname -x")


def test_ip_shows_the_address_mac_and_counters(full):
    eth0 = full.c.drivers.netdevs[0]
    out = full.term.command("ip")
    mac = ":".join(f"{b:02x}" for b in eth0.mac)
    assert "2: eth0: <BROADCAST,UP,LOWER_UP> mtu 64512" in out and f"link/ether {mac}" in out
    assert "inet 172.31.1.1/24 brd 172.31.1.255 scope global eth0" in out and "RX: bytes packets dropped" in out


def test_ping_from_the_console(full):
    out = full.term.command("ping 172.31.1.254 -c 2 -i 0.1")
    assert out.count("64 bytes from 172.31.1.254: icmp_seq=") == 2
    assert "2 packets transmitted, 2 received, 0% packet loss" in out
    assert "172.31.1.254 dev eth0 lladdr " in full.term.command("ip neigh")


def test_udp_commands_on_the_console(full):
    assert full.term.command("udp sink 9200") == "udp sink on port 9200\r\n"
    out = full.term.command("udp send 172.31.1.254 9 10000 1000")
    assert out.startswith("sent 10 datagrams, 10000 bytes in ") and out.endswith(", 0 dropped\r\n")
    out = full.term.command("udp stat")
    assert "echo port 7: " in out and "sink port 9200: 0 datagrams, 0 bytes" in out
    assert "usage: udp send HOST PORT BYTES SIZE" in full.term.command("udp send")


def test_ctrl_c_interrupts_a_ping(full):
    full.term.send(b"ping 172.31.1.254 -c 1000 -i 0.2\r")
    full.term.expect(b"icmp_seq=1 ")
    full.term.send(b"\x03")
    out = full.term.expect(PROMPT).decode()
    assert "packets transmitted" in out and out.endswith("^C\r\nmic0:~# ")
    assert "1000 packets transmitted" not in out


def test_blk_list_write_verify_and_read(full):
    out = full.term.command("blk list")
    assert re.search(r"vda\s+2048\s+1\.05 MB/1\.00 MiB\s+0\s+1\s+console-disk", out), out
    assert full.term.command("blk write vda 8 console 4") == "wrote 4 sectors at 8 of vda (2048 bytes)\r\n"
    with open(full.image, "rb") as f:
        f.seek(8 * 512)
        assert f.read(17) == b"console:8:console"
    assert full.term.command("blk verify vda 8 console 4") == "verified 4 sectors at 8 of vda: OK\r\n"
    assert "MISMATCH at sector 12" in full.term.command("blk verify vda 8 console 5")
    out = full.term.command("blk read -x vda 8")
    assert out.startswith("00001000  63 6f 6e 73 6f 6c 65 3a  38 3a 63 6f 6e 73 6f 6c  |console:8:consol|")
    assert "no such disk" in full.term.command("blk read vdz 0")
    assert full.term.command("blk flush vda") == "flushed vda\r\n"
    assert full.backends[1].counters()["flushes"] == 1


def test_dmesg_shows_the_kernel_log(full):
    out = full.term.command("dmesg")
    assert "micdrv-sim-cardos 1.0 (image format 1)" in out
    assert "virtio_console virtio0: hvc0: console" in out and "[vda] 2048 512-byte logical blocks" in out
    assert "IPv4: eth0: 172.31.1.1/24" in out
    assert re.search(r"^\[ *\d+\.\d{6}\] ", out, re.M)


def test_line_editing_like_a_serial_console(full):
    t = full.term
    t.send(b"echo helx\x7fo\r")                      # DEL erases one character
    assert t.expect(PROMPT) == b"echo helx\b \bo\r\nhelo\r\nmic0:~# "
    t.send(b"echo a\bb\n")                          # BS too; LF alone ends a line
    assert t.expect(PROMPT) == b"echo a\b \bb\r\nb\r\nmic0:~# "
    t.send(b"echo one\r\necho two\n\recho three\r")  # CR LF and LF CR are one line end each
    out = t.expect(PROMPT) + t.expect(PROMPT) + t.expect(PROMPT)
    assert out.count(b"mic0:~# ") == 3 and b"\r\none\r\n" in out and b"\r\ntwo\r\n" in out
    t.send(b"\r")                                   # an empty line: just a prompt
    assert t.expect(PROMPT) == b"\r\nmic0:~# "
    t.send(b"gibberish\x15echo \x1b[Aok\r")          # Ctrl-U kills the line, an arrow key is swallowed
    assert t.expect(PROMPT).endswith(b"\r\nok\r\nmic0:~# ")
    t.send(b"half a line\x03")                      # Ctrl-C drops it
    assert t.expect(PROMPT).endswith(b"half a line^C\r\nmic0:~# ")
    assert "command not found" in t.command("nosuchcommand")


def test_the_control_socket_runs_shell_commands_too(full):
    r = full.c.card.os_control("shell", message="udp sink 9100")
    assert r["succeeded"] and r["output"] == "udp sink on port 9100\n"
    r = full.c.card.os_control("shell", message="udp sink 9100 stop")
    assert "sink port 9100: 0 datagrams" in r["output"]
    r = full.c.card.os_control("shell", message="blk verify vda 0 0x00")
    assert r["succeeded"]


# --- going down (a fresh card each) -----------------------------------------------------------------

@pytest.mark.parametrize("command, state, message", [
    ("poweroff", "poweroff", "reboot: Power down"),
    ("reboot", "restart", "reboot: Restarting system"),
    ("halt", "halted", "reboot: System halted"),
])
def test_poweroff_reboot_and_halt_go_through_the_kernel(command, state, message):
    c = ConsoleCard()
    try:
        c.term.send(command.encode() + b"\r")
        assert b"The system is going down" in c.term.expect(b"NOW!")
        wait_for(lambda: c.c.kernel.state == state, f"the kernel state {state}")
        assert message in c.c.dmesg()
        assert c.console.get_status() == 0                      # the console was shut down: reset
    finally:
        c.close()


def test_panic_stops_the_kernel_dead():
    c = ConsoleCard()
    try:
        c.term.send(b"panic the disk is on fire\r")
        wait_for(lambda: c.c.kernel.frozen == "panic", "the panic")
        # the kernel freezes, then prints: wait for the line rather than read the log once
        wait_for(lambda: "Kernel panic - not syncing: the disk is on fire" in c.c.dmesg(), "the panic line")
        assert c.c.record()["panic"] == "the disk is on fire"
    finally:
        c.close()
