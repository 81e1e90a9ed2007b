"""The card shell's commands: what ``help`` lists, each writing lines of text.

The same commands serve the console (:mod:`.shell`) and the simulator's
control socket (``{"cmd": "kernel", "action": "shell", "message": LINE}``,
:meth:`.drivers.CardDrivers.run`). Arguments are split like a shell does
(:func:`shlex.split`); sizes take K/M/G suffixes (powers of 1024).

Block patterns (``blk write`` / ``blk verify``): ``0xHH`` fills every byte
with HH; any other word is a text whose sectors are position-dependent --
sector ``s`` holds ``"<PATTERN>:<s>:"`` repeated and cut to 512 bytes -- so a
sector written to the wrong place, or read from it, never verifies.

Sequential block I/O works as ``dd bs=1M`` with ``O_DIRECT`` and a few
requests in flight (:meth:`~.blk.BlkDriver.read_stream`,
:meth:`~.blk.BlkDriver.write_stream`): ``blk write`` generates each
request's pattern straight into the request's card memory, the buffer the
device's DMA reads (``dd if=/dev/zero of=/dev/vda oflag=direct``); ``blk
read`` hashes each request's data where the device's DMA put it, and ``blk
read -n`` discards it unread (``dd if=/dev/vda of=/dev/null iflag=direct``).
Neither builds its whole range in one buffer (``blk verify`` and ``blk read
-x`` still do: they compare or print it).
"""

from __future__ import annotations

import collections
import ctypes
import datetime
import errno
import hashlib
import random
import shlex
import time
from typing import TYPE_CHECKING, Callable

from . import ip_apps

from .blk import SECTOR, BlkError, human_size
from .ip import NetError, ip_bytes

if TYPE_CHECKING:
    from .drivers import CardDrivers

Out = Callable[[str], None]

RANDREAD_SIZE = 4096     # bytes per ``blk randread`` request, at 4 KiB-aligned offsets (fio's bs=4k)
RANDREAD_QD = 32         # its default queue depth
RANDREAD_MAX_QD = 1024   # more than any ring holds: submit would only wait for room

USAGE = [
    ("help", "this list"),
    ("uname [-a]", "the card OS's name (and node, release, machine)"),
    ("uptime", "time since boot"),
    ("ip [addr|neigh]", "addresses, MAC, counters; the ARP cache"),
    ("ping HOST [-c N] [-s SIZE] [-i SECS] [-W SECS]", "ICMP echo"),
    ("blk list", "disks: size, read-only, flush, serial (GET_ID)"),
    ("blk read [-x|-n] DEV SECTOR [COUNT]", "sha256 of COUNT sectors (-x: hexdump, -n: discard)"),
    ("blk write DEV SECTOR PATTERN [COUNT]", "write COUNT sectors of PATTERN"),
    ("blk verify DEV SECTOR PATTERN [COUNT]", "compare COUNT sectors with PATTERN"),
    ("blk flush DEV", "FLUSH the device's write cache"),
    ("blk randread [-s] DEV COUNT [QD] [SEED]", "COUNT random 4 KiB reads, QD in flight (32); IOPS"),
    ("udp send HOST PORT BYTES SIZE", "send BYTES in datagrams of SIZE, as fast as the ring allows"),
    ("udp sink PORT [stop|reset]", "count what arrives on PORT"),
    ("udp stat", "echo (port 7) and sink counters"),
    ("echo [TEXT...]", "print TEXT"),
    ("dmesg", "the kernel log"),
    ("poweroff", "shut the card down (power off)"),
    ("halt", "shut the card down (halted)"),
    ("reboot", "shut the card down and ask the host to boot it again"),
    ("panic [MSG]", "kernel panic"),
]


class UsageError(Exception):
    """A command typed wrong; the message is the usage line."""


def parse_size(text: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    value = int(text[:-1] if mult > 1 else text, 0)
    if value < 0:
        raise ValueError(f"{text}: negative")
    return value * mult


def pattern_byte(pattern: str) -> int | None:
    """HH of a ``0xHH`` pattern; None for a text pattern."""
    if pattern.lower().startswith("0x") and len(pattern) == 4:
        try:
            return int(pattern, 16)
        except ValueError:
            raise ValueError(f"{pattern}: not a byte (0x00..0xff)") from None
    return None


def fill_pattern(view: memoryview, pattern: str, sector: int) -> None:
    """Write the pattern of the sectors from ``sector`` into ``view`` (whole sectors), in place: a byte
    pattern is one ``memset`` (the GIL released, as a read of /dev/zero is one clear_user), a text one
    sector by sector."""
    n = len(view)
    byte = pattern_byte(pattern)
    if byte is not None:
        if n:
            if view.readonly:
                raise ValueError("fill_pattern: a read-only view")
            buf = (ctypes.c_char * n).from_buffer(view)
            try:
                ctypes.memset(buf, byte, n)
            finally:
                del buf
        return
    for i, o in enumerate(range(0, n, SECTOR)):
        unit = f"{pattern}:{sector + i}:".encode()
        view[o:o + SECTOR] = (unit * (SECTOR // len(unit) + 1))[:SECTOR]


def pattern_bytes(pattern: str, sector: int, count: int) -> bytes:
    """The bytes ``blk write`` puts at ``count`` sectors from ``sector`` (see the module docstring)."""
    byte = pattern_byte(pattern)
    if byte is not None:
        return bytes([byte]) * (SECTOR * count)
    buf = bytearray(SECTOR * count)
    fill_pattern(memoryview(buf), pattern, sector)
    return bytes(buf)


def hexdump(data: bytes, base: int = 0) -> list[str]:
    """``hexdump -C``: offset, 16 bytes in hex, their printable characters; repeated lines as ``*``."""
    lines, prev, starred = [], None, False
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        if row == prev and off + 16 < len(data):
            if not starred:
                lines.append("*")
                starred = True
            continue
        prev, starred = row, False
        hx = " ".join(f"{b:02x}" for b in row[:8]) + "  " + " ".join(f"{b:02x}" for b in row[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + off:08x}  {hx:<48}  |{text}|")
    lines.append(f"{base + len(data):08x}")
    return lines


class Commands:
    """The shell's command table over the card's drivers."""

    def __init__(self, drivers: "CardDrivers"):
        self.drivers = drivers
        self.kernel = drivers.kernel
        self._table = {"help": self.help, "uname": self.uname, "uptime": self.uptime, "ip": self.ip,
                       "ping": self.ping, "blk": self.blk, "udp": self.udp, "echo": self.echo, "dmesg": self.dmesg,
                       "poweroff": self.poweroff, "halt": self.halt, "reboot": self.reboot, "panic": self.panic}

    def execute(self, line: str, out: Out, interrupted: Callable[[], bool] = lambda: False) -> bool:
        """Run one command line; False if it failed (the error is in the output)."""
        try:
            argv = shlex.split(line)
        except ValueError as e:
            out(f"sh: {e}")
            return False
        if not argv:
            return True
        fn = self._table.get(argv[0])
        if fn is None:
            out(f"sh: {argv[0]}: command not found")
            return False
        try:
            fn(argv[1:], out, interrupted)
            return True
        except UsageError as e:
            out(f"usage: {e}")
        except (BlkError, NetError, ValueError) as e:
            out(f"{argv[0]}: {e}")
        return False

    # --- system --------------------------------------------------------------------------------
    def help(self, args, out, _i) -> None:
        out("Commands:")
        for usage, what in USAGE:
            out(f"  {usage:<46} {what}")

    def uname(self, args, out, _i) -> None:
        sysname, _, release = self.kernel.image.release.partition(" ")
        if args == ["-a"]:
            out(f"{sysname} {self.drivers.hostname} {release or '?'} #1 SMP k1om")
        elif not args:
            out(sysname)
        else:
            raise UsageError("uname [-a]")

    def uptime(self, args, out, _i) -> None:
        up = int(time.time() - self.kernel.started)
        clock = datetime.datetime.fromtimestamp(self.kernel.time()).strftime("%H:%M:%S")
        days, rest = divmod(up, 86400)
        hours, rest = divmod(rest, 3600)
        span = (f"{days} day{'s' if days != 1 else ''}, " if days else "") + \
            (f"{hours}:{rest // 60:02d}" if hours else f"{rest // 60} min")
        out(f" {clock} up {span},  load average: 0.00, 0.00, 0.00")

    def dmesg(self, args, out, _i) -> None:
        for line in self.kernel.dmesg().splitlines():
            out(line)

    def echo(self, args, out, _i) -> None:
        out(" ".join(args))

    def poweroff(self, args, out, _i) -> None:
        out("The system is going down for power off NOW!")
        self.kernel.poweroff()

    def halt(self, args, out, _i) -> None:
        out("The system is going down for system halt NOW!")
        self.kernel.halt()

    def reboot(self, args, out, _i) -> None:
        out("The system is going down for reboot NOW!")
        self.kernel.reboot()

    def panic(self, args, out, _i) -> None:
        self.kernel.panic(" ".join(args) or "panic command from the shell")

    # --- network ---------------------------------------------------------------------------------
    def ip(self, args, out, _i) -> None:
        stack = self.drivers.stack
        what = args[0] if args else "addr"
        if what in ("addr", "a", "link", "l"):
            out("1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536")
            out("    inet 127.0.0.1/8 scope host lo")
            for i, dev in enumerate(self.drivers.netdevs, start=2):
                flags = "BROADCAST,UP" + (",LOWER_UP" if dev.link_up else "") + (",BROKEN" if dev.broken else "")
                out(f"{i}: {dev.ifname}: <{flags}> mtu {dev.mtu}")
                out(f"    link/ether {':'.join(f'{b:02x}' for b in dev.mac)} brd ff:ff:ff:ff:ff:ff")
                if stack.netdev is dev:
                    a = stack.config.address
                    out(f"    inet {a} brd {a.network.broadcast_address} scope global {dev.ifname}")
                c = dev.c
                out("    RX: bytes packets dropped")
                out(f"    {c['rx_bytes']:<11} {c['rx_packets']:<8} {c['rx_dropped']}")
                out("    TX: bytes packets dropped")
                out(f"    {c['tx_bytes']:<11} {c['tx_packets']:<8} {c['tx_dropped']}")
            if not self.drivers.netdevs:
                out("(no network interface)")
            else:
                out("    ip: " + (" ".join(f"{k}={v}" for k, v in stack.c.items() if v) or "no traffic"))
        elif what in ("neigh", "n"):
            for ip, mac, age in stack.arp_table():
                out(f"{ip} dev {stack.netdev.ifname if stack.netdev else '?'} lladdr {mac} age {age:.0f}s")
        else:
            raise UsageError("ip [addr|neigh]")

    def ping(self, args, out, interrupted) -> None:
        opts = {"-c": 4, "-s": 56, "-i": 1.0, "-W": 2.0}
        host = None
        it = iter(args)
        for a in it:
            if a in opts:
                try:
                    v = next(it)
                    opts[a] = float(v) if a in ("-i", "-W") else int(v, 0)
                except (StopIteration, ValueError):
                    raise UsageError("ping HOST [-c N] [-s SIZE] [-i SECS] [-W SECS]") from None
            elif host is None and not a.startswith("-"):
                host = a
            else:
                raise UsageError("ping HOST [-c N] [-s SIZE] [-i SECS] [-W SECS]")
        if host is None:
            raise UsageError("ping HOST [-c N] [-s SIZE] [-i SECS] [-W SECS]")
        try:
            ip_bytes(host)
        except ValueError:
            raise ValueError(f"{host}: Name or service not known (the card has no resolver)") from None
        ip_apps.ping(self.drivers.stack, host, out, count=opts["-c"], size=opts["-s"], interval=opts["-i"],
                     deadline=opts["-W"], interrupted=interrupted)

    def udp(self, args, out, interrupted) -> None:
        d = self.drivers
        if args[:1] == ["send"] and len(args) == 5:
            r = ip_apps.udp_source(d.stack, args[1], int(args[2]), parse_size(args[3]), parse_size(args[4]),
                                   interrupted)
            rate = r["bytes_per_second"] or 0
            out(f"sent {r['datagrams']} datagrams, {r['bytes']} bytes in {r['seconds']:.3f} s "
                f"({rate / 1e6:.1f} MB/s, {r['datagrams'] / r['seconds'] if r['seconds'] else 0:.0f} datagrams/s), "
                f"{r['dropped']} dropped")
        elif args[:1] == ["sink"] and len(args) in (2, 3):
            port = int(args[1])
            action = args[2] if len(args) == 3 else "start"
            sink = d.sinks.get(port)
            if action == "start":
                if sink is None:
                    d.sinks[port] = ip_apps.UdpSink(d.stack, port)
                    out(f"udp sink on port {port}")
                else:
                    self._sink_line(out, sink)
            elif action in ("stop", "reset") and sink is not None:
                self._sink_line(out, sink)
                if action == "stop":
                    sink.close()
                    del d.sinks[port]
                else:
                    sink.reset()
            else:
                raise UsageError("udp sink PORT [stop|reset]")
        elif args == ["stat"]:
            e = d.echo.status() if d.echo else None
            if e:
                out(f"echo port {e['port']}: {e['datagrams']} datagrams, {e['bytes']} bytes, {e['dropped']} dropped")
            for sink in d.sinks.values():
                self._sink_line(out, sink)
        else:
            raise UsageError("udp send HOST PORT BYTES SIZE | udp sink PORT [stop|reset] | udp stat")

    @staticmethod
    def _sink_line(out: Out, sink: ip_apps.UdpSink) -> None:
        s = sink.status()
        rate = f", {s['bytes_per_second'] / 1e6:.1f} MB/s" if s["bytes_per_second"] else ""
        out(f"sink port {s['port']}: {s['datagrams']} datagrams, {s['bytes']} bytes in {s['seconds']:.3f} s{rate}")

    # --- block ---------------------------------------------------------------------------------
    def _disk(self, name: str):
        disk = self.drivers.disks.get(name.removeprefix("/dev/"))
        if disk is None:
            raise ValueError(f"{name}: no such disk (blk list)")
        return disk

    @staticmethod
    def _count(text: str) -> int:
        n = parse_size(text)
        if n < 1:
            raise ValueError("COUNT must be at least 1")
        return n

    def blk(self, args, out, _i) -> None:
        sub = args[0] if args else ""
        rest = args[1:]
        if sub == "list" and not rest:
            out(f"{'NAME':<6} {'SECTORS':>12} {'SIZE':>22}  RO FLUSH SERIAL")
            for name, disk in sorted(self.drivers.disks.items()):
                try:
                    serial = disk.get_id()
                except BlkError as e:
                    serial = f"({e.strerror})"
                out(f"{name:<6} {disk.capacity:>12} {human_size(disk.capacity * SECTOR):>22}  "
                    f"{'1' if disk.readonly else '0':<2} {'1' if disk.can_flush else '0':<5} {serial}")
        elif sub == "read" and rest:
            flag = rest[0] if rest[0] in ("-x", "-n") else None
            rest = rest[1:] if flag else rest
            if len(rest) not in (2, 3):
                raise UsageError("blk read [-x|-n] DEV SECTOR [COUNT]")
            disk, sector = self._disk(rest[0]), parse_size(rest[1])
            count = self._count(rest[2]) if len(rest) == 3 else 1
            if flag == "-x":
                for line in hexdump(disk.read(sector, count), sector * SECTOR):
                    out(line)
            elif flag == "-n":
                disk.read_stream(sector, count)
                out(f"read {count} sectors at {sector} of {disk.disk} ({count * SECTOR} bytes), discarded")
            else:
                h = hashlib.sha256()
                disk.read_stream(sector, count, h.update)
                out(f"{h.hexdigest()}  {disk.disk} sectors {sector}+{count} ({count * SECTOR} bytes)")
        elif sub in ("write", "verify") and len(rest) in (3, 4):
            disk, sector, pattern = self._disk(rest[0]), parse_size(rest[1]), rest[2]
            count = self._count(rest[3]) if len(rest) == 4 else 1
            pattern_byte(pattern)         # a bad 0xHH fails here, before anything is written
            if sub == "write":
                disk.write_stream(sector, count, lambda view, at: fill_pattern(view, pattern, at))
                out(f"wrote {count} sectors at {sector} of {disk.disk} ({count * SECTOR} bytes)")
                return
            want = pattern_bytes(pattern, sector, count)
            got = disk.read(sector, count)
            if got == want:
                out(f"verified {count} sectors at {sector} of {disk.disk}: OK")
                return
            bad = next(i for i in range(len(want)) if got[i] != want[i])
            raise ValueError(f"verify: MISMATCH at sector {sector + bad // SECTOR}, byte {bad % SECTOR}")
        elif sub == "flush" and len(rest) == 1:
            disk = self._disk(rest[0])
            disk.flush()
            out(f"flushed {disk.disk}" + ("" if disk.can_flush else " (no write cache: nothing to do)"))
        elif sub == "randread" and 2 <= len(rest) - (rest[:1] == ["-s"]) <= 4:
            self._randread(rest, out, _i)
        else:
            raise UsageError("blk list | blk read [-x|-n] DEV SECTOR [COUNT] | blk write DEV SECTOR PATTERN [COUNT] "
                             "| blk verify DEV SECTOR PATTERN [COUNT] | blk flush DEV "
                             "| blk randread [-s] DEV COUNT [QD] [SEED]")

    def _randread(self, rest: list[str], out: Out, interrupted) -> None:
        """``blk randread``: COUNT reads of 4 KiB at random aligned offsets, QD of them in flight, timed here.

        Request ``i`` reads block ``random.Random(SEED).randrange(blocks)`` (the i-th draw; SEED default 0)
        of the disk's whole 4 KiB blocks -- a partial block at the end is never read. As fio's libaio engine
        with ``direct=1`` keeps its depth: the oldest request is waited for, with it every later one already
        done (io_getevents with min_nr 1), then the depth is filled again with one batch (io_submit of
        several iocbs; blk-mq queues a plugged list with one kick). The data stays where the device's DMA
        put it (``O_DIRECT``: the reader's buffer is the DMA target), nothing copied. ``-s`` adds the sha256 of the data in request order (so the host can check what was
        read; it costs the card a hash per request, hence off by default). A failed request stops
        submission; those in flight are waited for, then the first error is the command's.
        """
        digest = hashlib.sha256() if rest[0] == "-s" else None
        rest = rest[1:] if digest is not None else rest
        disk, count = self._disk(rest[0]), self._count(rest[1])
        qd = parse_size(rest[2]) if len(rest) >= 3 else RANDREAD_QD
        if not 1 <= qd <= RANDREAD_MAX_QD:
            raise ValueError(f"QD must be 1..{RANDREAD_MAX_QD}")
        rng = random.Random(int(rest[3], 0) if len(rest) == 4 else 0)
        per = RANDREAD_SIZE // SECTOR
        blocks = disk.capacity // per
        if blocks < 1:
            raise ValueError(f"{disk.disk}: {disk.capacity * SECTOR} bytes, smaller than one "
                             f"{RANDREAD_SIZE}-byte read")
        inflight: collections.deque = collections.deque()
        error: BlkError | None = None
        submitted = done = 0
        t0 = time.monotonic()
        try:
            while done < count:
                want = min(qd - len(inflight), count - submitted)
                if error is None and want > 0 and not interrupted():
                    try:
                        reqs = disk.submit_reads([rng.randrange(blocks) * per for _ in range(want)], RANDREAD_SIZE,
                                                 keep=True)
                        inflight.extend(reqs)
                        submitted += len(reqs)
                        if len(reqs) < want:
                            error = BlkError(errno.EIO, f"{disk.disk}: {want - len(reqs)} of {want} reads not "
                                                        f"queued")
                    except BlkError as e:
                        error = e
                if not inflight:
                    break
                # The oldest waited for, then it and every one after it already done, in order (io_getevents,
                # min_nr 1: the events there are once the first is in -- looked for before it is in, the
                # interrupt that ends them all would be reaped one request at a time)
                try:
                    inflight[0].wait()
                except BlkError:
                    pass                  # its error is taken below, with it
                reaped = [inflight.popleft()]
                while inflight and inflight[0].finished:
                    reaped.append(inflight.popleft())
                for req in reaped:
                    try:
                        req.wait(0)       # done already (or timed out above: ETIMEDOUT again, at once)
                        done += 1
                    except BlkError as e:
                        error = error or e
                        continue
                    if digest is not None:
                        disk._consume(req, digest.update)
                disk.release_many(reaped)
        finally:
            disk.release_many(inflight)   # left by an exception: each gives its memory back as it completes
        seconds = time.monotonic() - t0
        if error is not None:
            raise error
        out(f"randread {disk.disk}: {done} requests of {RANDREAD_SIZE} bytes at depth {qd} in {seconds:.3f} s "
            f"({done / seconds if seconds > 0 else 0:.0f} IOPS)" + (f", sha256 {digest.hexdigest()}" if digest else ""))
