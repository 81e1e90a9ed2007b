"""The host side of the card's direct transport in a process of its own, as the daemon is to the simulator.

In the real system the card OS runs in the simulator's process and the
backends in the daemon's; two processes, two cores, no shared interpreter
lock. :class:`HostProcess` starts ``python -m benchmarks.card_host`` with
the card memory's memfd inherited; there the backend runs behind an
ordinary :class:`backends.direct.DirectTransport` on its own event loop.
:class:`RemoteTransport` is what the card's
:class:`~micdrv.sim.cardos.direct.DirectDevice` talks to instead of a
local transport: the same driver-facing calls (describe, config, features,
queue set-up with the kick and call eventfds passed as SCM_RIGHTS, start,
reset, counters), one JSON line each way over a socketpair.

Backends are described by a spec the child builds them from:
``{"kind": "net", "card": "mic0", "tap": ..., "netns": ...}`` or
``{"kind": "blk", "path": ..., "readonly": false}``.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import subprocess
import sys

from backends.direct import QueueSetup

MAX_FDS = 4


def _send(sock: socket.socket, msg: dict, fds: list[int] = ()) -> None:
    data = json.dumps(msg).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


class _Lines:
    """JSON lines (and the fds that came with them) from a stream socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf, self.fds = sock, b"", []

    def get(self) -> dict | None:
        while b"\n" not in self.buf:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, MAX_FDS)
            if not data:
                return None
            self.buf += data
            self.fds += fds
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


class RemoteTransport:
    """A :class:`~backends.direct.DirectTransport` in the host process, as the card's DirectDevice uses one."""

    def __init__(self, host: "HostProcess", spec: dict):
        self._host = host
        d = host.call("add", spec=spec)
        self.handle = d["handle"]
        self.name = d["name"]
        self.device_id = d["device_id"]
        self.queue_sizes = tuple(d["queue_sizes"])
        self.device_features = d["device_features"]
        self._config_fd: int | None = None

    @property
    def config_call_fd(self) -> int | None:
        return self._config_fd

    @config_call_fd.setter
    def config_call_fd(self, fd: int | None) -> None:
        self._config_fd = fd
        if fd is not None:
            self._host.call("config_fd", [fd], handle=self.handle)

    def config_read(self, offset: int = 0, n: int | None = None) -> bytes:
        return bytes.fromhex(self._host.call("config_read", handle=self.handle, offset=offset, n=n)["data"])

    def set_features(self, acked: int) -> None:
        self._host.call("set_features", handle=self.handle, acked=acked)

    def set_queue(self, index: int, setup: QueueSetup) -> None:
        self._host.call("set_queue", [setup.kick_fd, setup.call_fd], handle=self.handle, index=index, num=setup.num,
                        desc=setup.desc, avail=setup.avail, used=setup.used)

    def start(self) -> None:
        self._host.call("start", handle=self.handle)

    def reset(self) -> None:
        self._host.call("reset", handle=self.handle)

    def close(self) -> None:
        self._host.call("close", handle=self.handle)

    def counters(self) -> dict:
        return self._host.call("counters", handle=self.handle)["counters"]


class HostProcess:
    """``python -m benchmarks.card_host``: backends behind DirectTransports over the card memory ``memfd``."""

    def __init__(self, memfd: int, size: int):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        os.set_inheritable(memfd, True)
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.card_host", str(memfd), str(size),
                                      str(child.fileno())], pass_fds=(memfd, child.fileno()))
        child.close()
        os.set_inheritable(memfd, False)
        self.sock = parent
        self._lines = _Lines(parent)

    def call(self, op: str, fds: list[int] = (), **args) -> dict:
        _send(self.sock, {"op": op, **args}, fds)
        reply = self._lines.get()
        if reply is None:
            raise RuntimeError("the host process went away")
        if not reply.get("ok"):
            raise RuntimeError(f"host process: {op}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        try:
            _send(self.sock, {"op": "exit"})
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the child ------------------------------------------------------------------------------------

def _backend(spec: dict):
    if spec["kind"] == "net":
        from backends.net import NetBackend
        return NetBackend.open(spec.get("card", "mic0"), tap=spec.get("tap"), netns=spec.get("netns"),
                               address=spec.get("address"))
    if spec["kind"] == "blk":
        from backends.blk import BlkBackend
        return BlkBackend.open(spec["path"], readonly=spec.get("readonly", False), serial=spec.get("serial"))
    raise ValueError(f"unknown backend kind {spec['kind']!r}")


def serve(memfd: int, size: int, sock: socket.socket) -> None:
    from backends.direct import DirectTransport
    from backends.eventloop import EventLoop
    from micdrv.memory import BufferMemory
    mm = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mem = BufferMemory(mm, name="card memory (host process)")
    loop = EventLoop("host-process").start()
    devices: dict[int, tuple] = {}
    owned: dict[int, list[int]] = {}      # the eventfds each device was given, closed when it is reset
    lines = _Lines(sock)
    try:
        while (req := lines.get()) is not None:
            op = req.pop("op")
            if op == "exit":
                break
            fds, lines.fds = lines.fds, []
            try:
                reply = {}
                if op == "add":
                    be = _backend(req["spec"])
                    t = DirectTransport(be, mem, loop)
                    h = len(devices) + 1
                    devices[h] = (be, t)
                    owned[h] = []
                    reply = {"handle": h, "name": be.name, "device_id": t.device_id,
                             "queue_sizes": list(t.queue_sizes), "device_features": t.device_features}
                else:
                    h = req["handle"]
                    be, t = devices[h]
                    owned[h] += fds
                    if op == "config_fd":
                        t.config_call_fd = fds[0]
                    elif op == "config_read":
                        reply = {"data": t.config_read(req["offset"], req["n"]).hex()}
                    elif op == "set_features":
                        t.set_features(req["acked"])
                    elif op == "set_queue":
                        t.set_queue(req["index"], QueueSetup(req["num"], req["desc"], req["avail"], req["used"],
                                                             fds[0], fds[1]))
                    elif op == "start":
                        t.start()
                    elif op in ("reset", "close"):
                        t.reset() if op == "reset" else t.close()
                        keep = [t.config_call_fd] if op == "reset" else []
                        for fd in owned[h]:
                            if fd not in keep:
                                os.close(fd)
                        owned[h] = keep
                        if op == "close":
                            be.close()
                    elif op == "counters":
                        reply = {"counters": t.counters()}
                    else:
                        raise ValueError(f"unknown op {op!r}")
                _send(sock, {"ok": True, **reply})
            except Exception as e:
                _send(sock, {"ok": False, "error": f"{type(e).__name__}: {e}"})
    finally:
        loop.stop()
        mem.release()
        try:
            mm.close()
        except BufferError:
            pass   # views still held by a transport that was not closed: the process ends anyway


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), socket.socket(fileno=int(sys.argv[3])))
