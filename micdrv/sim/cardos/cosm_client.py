"""The card's COSM client: connect to the host's port 201, heartbeat, obey (spec 7.1, 7.2; cosm_scif_client.c).

What the v5.x card kernel's client does, in order:

1. once the host node is up: ``scif_connect`` to node 0 port 201, up to
   ``connect_retries`` (10) times, ``connect_interval`` (1 s) apart; all
   failed -> an error in the log, no client (the host's COSM never sees the
   card come online);
2. register a reboot notifier: when the kernel goes down it sends
   SHUTDOWN_STATUS with how (halted 2, power off 3, restart 4; spec 7.1);
3. a thread that waits for data for ``heartbeat`` seconds (30) and, each
   time that wait ends -- timeout or messages handled -- sends a HEARTBEAT.
   SYNC_TIME sets the card's clock; SHUTDOWN starts an orderly power-off
   (``orderly_poweroff``, which runs in the kernel, not in this thread);
   anything else is logged and dropped.

The upstream client sends nothing when the kernel panics (there is no
panic notifier): the host notices only because the heartbeats stop, and
its watchdog declares the card crashed (spec 7.2). A hung card likewise
just goes quiet, with its connection still open.

[choice] Upstream keeps looping when the host closes the connection (every
heartbeat then fails); this client logs the close once and ends.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from micdrv.cosm import COSM_MSG_SIZE, CosmMsg, CosmMsgId, CosmProtocolError, MicStatus, send_msg
from micdrv.scif import POLLHUP, POLLIN, SCIF_COSM_LISTEN_PORT, ScifError

if TYPE_CHECKING:
    from micdrv.scif import Endpoint

    from .kernel import Kernel
    from .scif import CardScif

POLL_SLICE = 0.1      # how often the wait for data looks at the kernel's state (card reset, panic)
SEND_TIMEOUT = 5.0    # a heartbeat or status the host does not take within this is an error in the log


class CosmClient:
    """``cosm_client``: the card's end of COSM."""

    name = "cosm_client"

    def __init__(self, kernel: "Kernel", scif: "CardScif"):
        self.kernel = kernel
        self.scif = scif
        self.ep: "Endpoint | None" = None
        self.attempts = 0
        self.heartbeats = 0
        self.received: dict[str, int] = {}
        self.status_sent: str | None = None
        self.error: str | None = None
        self.closed_by_host = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rx = bytearray()
        self._send_lock = threading.Lock()

    # --- connection --------------------------------------------------------------------
    def probe(self) -> None:
        """Start the client thread (connect, then heartbeat); returns at once."""
        self._thread = threading.Thread(target=self._run, name="cosm_client", daemon=True)
        self._thread.start()

    def _connect(self) -> bool:
        k = self.kernel
        p = k.params
        for i in range(p.connect_retries):
            if self._stop.is_set() or not k.alive:
                return False
            self.attempts = i + 1
            try:
                self.ep = self.scif.node.connect(0, SCIF_COSM_LISTEN_PORT)
                return True
            except ScifError as e:
                k.printk(f"cosm_client: scif_connect to 0:{SCIF_COSM_LISTEN_PORT}, attempt {i + 1}: {e}")
                if self._stop.wait(p.connect_interval):
                    return False
        self.error = f"scif_connect to 0:{SCIF_COSM_LISTEN_PORT} failed {p.connect_retries} times"
        k.printk(f"cosm_client: {self.error}")
        return False

    # --- the client thread -------------------------------------------------------------
    def _run(self) -> None:
        k = self.kernel
        try:
            if not self._connect():
                k.publish()
                return
            k.register_reboot_notifier(self._reboot_event)
            k.printk(f"cosm_client: connected to the host's COSM server, port {SCIF_COSM_LISTEN_PORT}")
            k.online()
            self._loop()
        except Exception as e:  # the card OS's own bug: a kernel oops in this thread
            if k.alive and not self._stop.is_set():
                k.panic(f"cosm_client: {type(e).__name__}: {e}")

    def _loop(self) -> None:
        k, ep = self.kernel, self.ep
        while not self._stop.is_set():
            deadline = time.monotonic() + k.params.heartbeat
            mask = 0
            while not mask and not self._stop.is_set() and k.alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                mask = ep.poll(POLLIN, timeout=min(POLL_SLICE, left))
            if self._stop.is_set() or not k.alive:
                return  # stopped, or the kernel panicked or hung: not a word more
            if mask & POLLIN:
                self._recv()
            elif mask & POLLHUP:
                self.closed_by_host = True
                k.printk("cosm_client: the host closed the COSM connection")
                k.publish()
                return
            if self._stop.is_set() or not k.alive:
                return
            self._send(CosmMsg.heartbeat())
            self.heartbeats += 1
            k.publish()

    def _recv(self) -> None:
        self._rx += self.ep.recv_nowait(64 * COSM_MSG_SIZE)
        while len(self._rx) >= COSM_MSG_SIZE:
            raw, self._rx = bytes(self._rx[:COSM_MSG_SIZE]), self._rx[COSM_MSG_SIZE:]
            try:
                msg = CosmMsg.decode(raw)
            except CosmProtocolError as e:
                self.kernel.printk(f"cosm_client: {e}")
                continue
            self.received[msg.id.kernel_name] = self.received.get(msg.id.kernel_name, 0) + 1
            if msg.id is CosmMsgId.SYNC_TIME:
                self.kernel.set_time(msg.tv_sec, msg.tv_nsec)
            elif msg.id is CosmMsgId.SHUTDOWN:
                self.kernel.printk("cosm_client: shutdown requested by the host")
                self.kernel.poweroff()
            else:
                self.kernel.printk(f"cosm_client: unexpected {msg.id.kernel_name} from the host")

    def _send(self, msg: CosmMsg) -> bool:
        try:
            with self._send_lock:
                send_msg(self.ep, msg, timeout=SEND_TIMEOUT)
            return True
        except ScifError as e:
            self.kernel.printk(f"cosm_client: scif_send of {msg}: {e}")
            return False

    # --- going down --------------------------------------------------------------------
    def _reboot_event(self, status: MicStatus) -> None:
        """The reboot notifier: tell the host how this kernel is going down (spec 7.1)."""
        if self.ep is not None and self._send(CosmMsg.status(status)):
            self.status_sent = status.sysfs

    def shutdown(self) -> None:
        """Device shutdown: stop the thread, close the connection (the host then publishes the status)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(SEND_TIMEOUT * 2)
        if self.ep is not None:
            try:
                self.ep.close(timeout=self.kernel.params.scif_timeout)
            except ScifError as e:
                self.kernel.printk(f"cosm_client: scif_close: {e}")
            self.ep = None

    def abandon(self) -> None:
        """The card was reset: the thread ends without a word to anyone (see :meth:`join`)."""
        self._stop.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def status(self) -> dict:
        return {"connected": self.ep is not None and not self.closed_by_host, "attempts": self.attempts,
                "heartbeats": self.heartbeats, "received": dict(self.received), "status_sent": self.status_sent,
                "closed_by_host": self.closed_by_host, "error": self.error,
                "heartbeat_interval": self.kernel.params.heartbeat}
