"""What runs on the card's IP stack: the UDP echo server, ``ping``, and the UDP source and sink for benchmarks.

* :class:`UdpEcho` -- RFC 862 on UDP port 7: every datagram goes back to
  where it came from, same payload (the reply to the frame's source MAC;
  a big one from its receive buffer, :meth:`IpStack.udp_send` with the
  payload it was given).
* :func:`ping` -- iputils' output and statistics: ICMP echo requests with a
  pattern payload, replies matched by identifier and sequence, their data
  compared with what was sent.
* :class:`UdpSink` -- counts what arrives on a port (datagrams, bytes, the
  time from first to last), for host -> card throughput.
* :func:`udp_source` -- sends N bytes as datagrams of S bytes to host:port
  as fast as the transmit ring allows (frames are kicked in batches of
  :data:`SOURCE_BATCH`; a full ring makes the sender wait for
  completions), for card -> host throughput.
"""

from __future__ import annotations

import os
import queue
import statistics
import threading
import time
from typing import Callable

from . import ip_csum
from .ip import ICMP_ECHO, ICMP_ECHO_HDR, ICMP_HLEN, IP_HLEN, IPPROTO_ICMP, IpStack, NetError, ip_bytes, ip_text

ECHO_PORT = 7            # RFC 862
SOURCE_BATCH = 16        # datagrams per kick in udp_source
PING_PATTERN = bytes(range(256))

Out = Callable[[str], None]


class UdpEcho:
    """The UDP echo service on port 7."""

    def __init__(self, stack: IpStack, port: int = ECHO_PORT):
        self.stack, self.port = stack, port
        self.datagrams = self.bytes = self.dropped = 0
        stack.udp_bind(port, self._echo)

    def _echo(self, src: bytes, sport: int, payload: memoryview, src_mac: bytes) -> None:
        try:
            ok = self.stack.udp_send(src, sport, self.port, payload, dst_mac=src_mac)
        except NetError:
            ok = False
        if ok:
            self.datagrams += 1
            self.bytes += len(payload)
        else:
            self.dropped += 1

    def close(self) -> None:
        self.stack.udp_unbind(self.port)

    def status(self) -> dict:
        return {"port": self.port, "datagrams": self.datagrams, "bytes": self.bytes, "dropped": self.dropped}


class UdpSink:
    """Counts the datagrams arriving on ``port``."""

    def __init__(self, stack: IpStack, port: int):
        self.stack, self.port = stack, port
        self.datagrams = self.bytes = 0
        self.first = self.last = None
        self._lock = threading.Lock()
        stack.udp_bind(port, self._count)

    def _count(self, src: bytes, sport: int, payload: memoryview, src_mac: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            if self.first is None:
                self.first = now
            self.last = now
            self.datagrams += 1
            self.bytes += len(payload)

    def reset(self) -> None:
        with self._lock:
            self.datagrams = self.bytes = 0
            self.first = self.last = None

    def close(self) -> None:
        self.stack.udp_unbind(self.port)

    def status(self) -> dict:
        with self._lock:
            span = (self.last - self.first) if self.first is not None else 0.0
            return {"port": self.port, "datagrams": self.datagrams, "bytes": self.bytes, "seconds": span,
                    "bytes_per_second": self.bytes / span if span > 0 else None}


def udp_source(stack: IpStack, host: str, port: int, nbytes: int, size: int,
               interrupted: Callable[[], bool] = lambda: False) -> dict:
    """Send ``nbytes`` to ``host:port`` in datagrams of ``size`` bytes (the last one shorter); the totals."""
    if not 0 < size <= 65507 or nbytes < 0:
        raise ValueError("the datagram size is 1..65507 bytes and the byte count not negative")
    dst = ip_bytes(host)
    mac = stack.resolve(stack.next_hop(dst))
    sport = stack.ephemeral_port()
    payload = (os.urandom(64) * (size // 64 + 1))[:size]
    full, rest = divmod(nbytes, size)
    sent = dropped = sent_bytes = 0
    start = time.monotonic()
    for i in range(full + (1 if rest else 0)):
        if interrupted():
            break
        data = payload if i < full else payload[:rest]
        if stack.udp_send(dst, port, sport, data, dst_mac=mac, kick=(i % SOURCE_BATCH) == SOURCE_BATCH - 1):
            sent += 1
            sent_bytes += len(data)
        else:
            dropped += 1
    stack.flush()
    seconds = time.monotonic() - start
    return {"datagrams": sent, "bytes": sent_bytes, "dropped": dropped, "seconds": seconds,
            "bytes_per_second": sent_bytes / seconds if seconds > 0 else None, "source_port": sport}


def ping(stack: IpStack, host: str, out: Out, count: int = 4, size: int = 56, interval: float = 1.0,
         deadline: float = 2.0, interrupted: Callable[[], bool] = lambda: False) -> dict:
    """iputils ``ping -c count -s size -i interval -W deadline``: lines to ``out``, the statistics returned."""
    if not 0 <= size <= 65507 - ICMP_HLEN or count < 1 or interval < 0:
        raise ValueError("ping: size 0..65499, count >= 1, interval >= 0")
    dst = ip_bytes(host)
    ident = int.from_bytes(os.urandom(2), "big")
    data = (PING_PATTERN * (size // 256 + 1))[:size]
    replies: queue.Queue = queue.Queue()

    def waiter(seq: int, payload: memoryview, ttl: int, when: float) -> None:
        replies.put((seq, bytes(payload) == data, len(payload), ttl, when))

    out(f"PING {ip_text(dst)} ({ip_text(dst)}) {size}({size + ICMP_HLEN + IP_HLEN}) bytes of data.")
    sent_at: dict[int, float] = {}
    rtts: list[float] = []
    errors = 0
    stack.echo_listen(ident, waiter)
    t0 = time.monotonic()
    try:
        for seq in range(1, count + 1):
            if interrupted():
                break
            head = ICMP_ECHO_HDR.pack(ICMP_ECHO, 0, 0, ident, seq)
            head = ICMP_ECHO_HDR.pack(ICMP_ECHO, 0, ip_csum.checksum(data, ip_csum.partial(head)), ident, seq)
            sent_at[seq] = time.monotonic()
            try:
                stack.send_ip(dst, IPPROTO_ICMP, [head, data])
            except NetError as e:
                errors += 1
                out(f"From {ip_text(stack.ip)} icmp_seq={seq} {_describe(e)}")
            wait_until = time.monotonic() + (interval if seq < count else deadline)
            while True:
                left = wait_until - time.monotonic()
                if left <= 0 or interrupted() or (seq == count and len(rtts) + errors >= count):
                    break
                try:
                    r_seq, same, n, ttl, when = replies.get(timeout=min(left, 0.1))
                except queue.Empty:
                    continue
                if r_seq not in sent_at:
                    continue
                rtt = (when - sent_at.pop(r_seq)) * 1000
                rtts.append(rtt)
                out(f"{n + ICMP_HLEN} bytes from {ip_text(dst)}: icmp_seq={r_seq} ttl={ttl} time={rtt:.3f} ms"
                    + ("" if same else " (wrong data)"))
    finally:
        stack.echo_listen(ident, None)
    transmitted = len(sent_at) + len(rtts)
    elapsed = (time.monotonic() - t0) * 1000
    lost = transmitted - len(rtts)
    out(f"--- {ip_text(dst)} ping statistics ---")
    line = f"{transmitted} packets transmitted, {len(rtts)} received"
    if errors:
        line += f", +{errors} errors"
    out(f"{line}, {100 * lost // transmitted if transmitted else 0}% packet loss, time {elapsed:.0f}ms")
    if rtts:
        mdev = statistics.pstdev(rtts)
        out(f"rtt min/avg/max/mdev = {min(rtts):.3f}/{statistics.fmean(rtts):.3f}/{max(rtts):.3f}/{mdev:.3f} ms")
    return {"transmitted": transmitted, "received": len(rtts), "errors": errors, "rtts_ms": rtts}


def _describe(e: NetError) -> str:
    text = str(e)
    if text.startswith("EHOSTUNREACH"):
        return "Destination Host Unreachable"
    if text.startswith("ENETUNREACH"):
        return "Network is unreachable"
    if text.startswith("EMSGSIZE"):
        return "Message too long"
    return text


__all__ = ["ECHO_PORT", "UdpEcho", "UdpSink", "ping", "udp_source"]
