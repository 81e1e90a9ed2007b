"""The card stack's pure parts: the Internet checksum, the address from the command line, names and patterns."""

from __future__ import annotations

import ipaddress
import os

import pytest

from micdrv.sim.cardos import ip_config, ip_csum
from micdrv.sim.cardos import params as params_mod
from micdrv.sim.cardos.drivers import _letters
from micdrv.sim.cardos.shell_commands import hexdump, parse_size, pattern_bytes
from tests import packets as P


@pytest.mark.parametrize("n", [1, 2, 3, 20, 21, 1001, 1500, 64000, 65507])
def test_checksums_match_the_rfc1071_reference(n):
    data = os.urandom(n)
    while not any(data):     # all-zero data is outside ip_csum's domain (ip_csum.finish says why): 1 in 256 at n=1
        data = os.urandom(n)
    assert ip_csum.checksum(data) == P.checksum(data)
    assert ip_csum.checksum(memoryview(data), 0x1234) == P.checksum(data, 0x1234)
    # A datagram carrying its own checksum sums to zero (padded to an even length first).
    even = data + b"\0" * (n & 1)
    assert ip_csum.valid(ip_csum.partial(even + ip_csum.checksum(even).to_bytes(2, "big")))
    assert not ip_csum.valid(ip_csum.partial(even + ((ip_csum.checksum(even) + 1) & 0xFFFF).to_bytes(2, "big")))


def test_pieces_sum_like_the_whole_and_the_udp_rules_hold():
    a, b = os.urandom(42), os.urandom(999)
    assert ip_csum.finish(ip_csum.partial(a) + ip_csum.partial(b)) == ip_csum.checksum(a + b)
    src, dst = P.ip4("172.31.1.1"), P.ip4("172.31.1.254")
    assert ip_csum.pseudo_header(src, dst, 17, 1007) == P.pseudo(src, dst, 17, 1007) % 0xFFFF
    assert ip_csum.udp_field(0) == 0xFFFF and ip_csum.udp_field(5) == 5
    assert ip_csum.fold(0) == 0xFFFF and ip_csum.finish(0) == 0


def test_the_address_from_mpss_ifcfg():
    cfg = ip_config.from_cmdline(["ifcfg=static;address,172.31.3.1;netmask,255.255.255.0"], node=3)
    assert cfg.address == ipaddress.IPv4Interface("172.31.3.1/24") and cfg.source == "ifcfg" and not cfg.warnings
    cfg = ip_config.from_cmdline(["ifcfg=static;address,10.0.0.5;netmask,255.255.0.0;gateway,10.0.0.1"], node=1)
    assert str(cfg.address) == "10.0.0.5/16" and str(cfg.gateway) == "10.0.0.1"


def test_the_simulators_parameter_and_the_last_word_wins():
    cfg = ip_config.from_cmdline(["ifcfg=static;address,172.31.3.1;netmask,255.255.255.0",
                                  "micdrv_sim.ip=192.168.77.9/25"], node=1)
    assert str(cfg.address) == "192.168.77.9/25" and cfg.source == "micdrv_sim.ip"
    cfg = ip_config.from_cmdline(["micdrv_sim.ip=192.168.77.9/25", "ifcfg=static;address,172.31.9.1"], node=1)
    assert str(cfg.address) == "172.31.9.1/24"          # netmask defaults to /24


def test_the_default_follows_the_node_id():
    assert str(ip_config.from_cmdline([], node=1).address) == "172.31.1.1/24"
    assert str(ip_config.from_cmdline(["console=hvc0"], node=4).address) == "172.31.4.1/24"


@pytest.mark.parametrize("word, why", [
    ("ifcfg=dhcp", "no DHCP client"),
    ("ifcfg=static;netmask,255.255.255.0", "without an address"),
    ("ifcfg=static;address,1.2.3.4;color,blue", "is not address"),
    ("ifcfg=static;address,300.1.1.1", "300"),
    ("micdrv_sim.ip=172.31.1.0/24", "not a host address"),
    ("micdrv_sim.ip=10.0.0.1/32", "not a host address"),
])
def test_bad_address_words_warn_and_keep_the_default(word, why):
    cfg = ip_config.from_cmdline([word], node=2)
    assert str(cfg.address) == "172.31.2.1/24" and cfg.source == "default"
    assert len(cfg.warnings) == 1 and why in cfg.warnings[0]


def test_the_kernel_parameters_know_ip_and_mtu():
    p = params_mod.parse("micdrv_sim.ip=10.1.2.3/8 micdrv_sim.mtu=9000")
    assert p.ip == "10.1.2.3/8" and p.mtu == 9000 and not p.warnings
    p = params_mod.parse("micdrv_sim.ip=banana micdrv_sim.mtu=10")
    assert p.ip is None and p.mtu is None and len(p.warnings) == 2


def test_disk_names_count_like_linux():
    assert [_letters(i) for i in (0, 1, 25, 26, 27, 701, 702)] == ["a", "b", "z", "aa", "ab", "zz", "aaa"]


def test_block_patterns_are_position_dependent():
    data = pattern_bytes("p", 10, 2)
    assert len(data) == 1024 and data[:6] == b"p:10:p" and data[512:518] == b"p:11:p"
    assert pattern_bytes("p", 11, 1) == data[512:]
    assert pattern_bytes("0xA5", 0, 3) == b"\xa5" * 1536
    assert parse_size("4K") == 4096 and parse_size("1M") == 1 << 20 and parse_size("0x10") == 16


def test_hexdump_like_hexdump_c():
    lines = hexdump(b"A" * 40 + b"\x00\x01", base=0x200)
    assert lines[0] == "00000200  41 41 41 41 41 41 41 41  41 41 41 41 41 41 41 41  |AAAAAAAAAAAAAAAA|"
    assert lines[1] == "*"
    assert lines[2].startswith("00000220  41 41 41 41 41 41 41 41  00 01") and lines[2].endswith("|AAAAAAAA..|")
    assert lines[-1] == "0000022a"
