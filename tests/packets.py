"""Just enough Ethernet / ARP / IPv4 / ICMP / UDP / TCP to play a card's network stack in tests.

Frames are built and parsed with struct; checksums sum 16-bit words with
``array`` so even 64 KiB payloads cost no Python loop per byte.
"""

from __future__ import annotations

import array
import ipaddress
import struct
import sys
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
VNET_HDR = struct.Struct("<BBHHHH")  # virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def _sum16(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    words = array.array("H", data)
    if sys.byteorder == "little":
        words.byteswap()
    return sum(words)


def checksum(data: bytes, start: int = 0) -> int:
    s = _sum16(data) + start
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    return _sum16(src + dst + struct.pack("!BBH", 0, proto, length))


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def icmp_echo(ident: int, seq: int, data: bytes) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    return body[:2] + struct.pack("!H", checksum(body)) + body[4:]


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, partial: bool = False) -> bytes:
    """A UDP datagram; ``partial`` leaves only the pseudo-header sum in the checksum (NEEDS_CSUM)."""
    length = 8 + len(payload)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + payload
    ps = pseudo(src, dst, IPPROTO_UDP, length)
    csum = _fold(ps) if partial else (checksum(seg, ps) or 0xFFFF)
    return seg[:6] + struct.pack("!H", csum) + seg[8:]


def tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
        window: int = 65535, mss: int | None = None, partial: bool = False) -> bytes:
    opts = struct.pack("!BBH", 2, 4, mss) if mss else b""
    off = (20 + len(opts)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, off << 4, flags, window, 0,
                      0) + opts + payload
    ps = pseudo(src, dst, IPPROTO_TCP, len(seg))
    csum = _fold(ps) if partial else checksum(seg, ps)
    return seg[:16] + struct.pack("!H", csum) + seg[18:]


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa)


@dataclass
class Frame:
    """A parsed Ethernet frame (only the fields tests look at)."""

    dst: bytes
    src: bytes
    ethertype: int
    raw: bytes
    proto: int | None = None
    ip_src: bytes = b""
    ip_dst: bytes = b""
    sport: int = 0
    dport: int = 0
    seq: int = 0
    ack: int = 0
    flags: int = 0
    window: int = 0
    payload: bytes = b""
    arp_op: int = 0
    icmp_type: int = -1
    ident: int = 0

    @classmethod
    def parse(cls, raw: bytes) -> "Frame":
        dst, src, et = raw[:6], raw[6:12], struct.unpack("!H", raw[12:14])[0]
        f = cls(dst, src, et, raw)
        if et == ETH_P_ARP:
            _, _, _, _, f.arp_op, f.src, f.ip_src, _, f.ip_dst = struct.unpack("!HHBBH6s4s6s4s", raw[14:42])
        elif et == ETH_P_IP:
            ihl = (raw[14] & 0xF) * 4
            total = struct.unpack("!H", raw[16:18])[0]
            f.proto = raw[23]
            f.ip_src, f.ip_dst = raw[26:30], raw[30:34]
            l4 = raw[14 + ihl:14 + total]
            if f.proto == IPPROTO_UDP:
                f.sport, f.dport = struct.unpack("!HH", l4[:4])
                f.payload = l4[8:]
            elif f.proto == IPPROTO_TCP:
                f.sport, f.dport, f.seq, f.ack, off, f.flags, f.window = struct.unpack("!HHIIBBH", l4[:16])
                f.payload = l4[(off >> 4) * 4:]
            elif f.proto == IPPROTO_ICMP:
                f.icmp_type = l4[0]
                f.ident, f.seq = struct.unpack("!HH", l4[4:8])
                f.payload = l4[8:]
        return f
