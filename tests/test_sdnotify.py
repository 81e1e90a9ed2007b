"""sd_notify against a real datagram socket bound by the test, as systemd binds its own."""

import os
import shutil
import socket
import struct
import subprocess
import sys
import uuid

import pytest

from micdrv import sdnotify
from micdrv.sdnotify import Notifier, NotifySocketError

CRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


class Manager:
    """The service manager's end: a datagram socket with SO_PASSCRED, like systemd's /run/systemd/notify."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(30)

    def receive(self) -> tuple[dict[str, str], int]:
        """One datagram as its assignments, and the sender's PID from SCM_CREDENTIALS."""
        data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(CRED.size))
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = CRED.unpack(payload[:CRED.size])[0]
        lines = data.decode().split("\n")
        return dict(line.split("=", 1) for line in lines), pid

    def close(self):
        self.sock.close()


@pytest.fixture
def abstract_manager():
    name = f"micdrv-test-{uuid.uuid4().hex}"
    m = Manager(b"\0" + name.encode())
    yield m, "@" + name
    m.close()


@pytest.fixture
def path_manager(tmp_path):
    path = str(tmp_path / "notify")
    m = Manager(path)
    yield m, path
    m.close()


def test_ready_with_status_reaches_an_abstract_socket_from_this_pid(abstract_manager):
    manager, value = abstract_manager
    with Notifier.from_environ({"NOTIFY_SOCKET": value}) as n:
        assert n.enabled
        assert n.ready(status="ready")
    fields, pid = manager.receive()
    assert fields == {"READY": "1", "STATUS": "ready"}
    assert pid == os.getpid()


def test_status_watchdog_and_stopping_reach_a_path_socket(path_manager):
    manager, value = path_manager
    n = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert n.status("booting") and n.watchdog() and n.stopping("shutting_down")
    assert manager.receive()[0] == {"STATUS": "booting"}
    assert manager.receive()[0] == {"WATCHDOG": "1"}
    assert manager.receive()[0] == {"STOPPING": "1", "STATUS": "shutting_down"}
    n.close()


def test_a_newline_in_a_status_cannot_forge_an_assignment(abstract_manager):
    manager, value = abstract_manager
    n = Notifier.from_environ({"NOTIFY_SOCKET": value})
    n.status("card says\nREADY=1")
    fields, _ = manager.receive()
    assert fields == {"STATUS": "card says READY=1"}
    n.close()


def test_the_daemon_process_itself_is_the_sender_that_NotifyAccess_main_accepts(abstract_manager):
    manager, value = abstract_manager
    code = "from micdrv.sdnotify import Notifier; import sys; sys.exit(0 if Notifier.from_environ().ready('up') else 1)"
    env = dict(os.environ, NOTIFY_SOCKET=value, PYTHONPATH=os.getcwd())
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    assert child.wait(timeout=60) == 0
    fields, pid = manager.receive()
    assert fields == {"READY": "1", "STATUS": "up"}
    assert pid == child.pid


@pytest.mark.skipif(shutil.which("systemd-notify") is None, reason="systemd-notify is installed by .ci/install")
def test_datagrams_are_the_ones_systemd_notify_sends(abstract_manager):
    manager, value = abstract_manager
    env = dict(os.environ, NOTIFY_SOCKET=value)
    subprocess.run(["systemd-notify", "--no-block", "--ready", "--status=online"], env=env, timeout=60, check=True)
    theirs, _ = manager.receive()
    Notifier.from_environ({"NOTIFY_SOCKET": value}).ready("online")
    ours, _ = manager.receive()
    assert ours == theirs == {"READY": "1", "STATUS": "online"}


def test_without_NOTIFY_SOCKET_every_call_is_a_no_op():
    n = Notifier.from_environ({})
    assert not n.enabled
    assert not n.ready("x") and not n.status("x") and not n.watchdog() and not n.stopping()
    assert n.watchdog_seconds is None


def test_from_environ_removes_the_variables_children_must_not_inherit(abstract_manager):
    _, value = abstract_manager
    env = {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    n = Notifier.from_environ(env)
    assert env == {"PATH": "/bin"}
    assert n.enabled and n.watchdog_seconds == 30.0
    env2 = {"NOTIFY_SOCKET": value}
    Notifier.from_environ(env2, unset=False)
    assert env2 == {"NOTIFY_SOCKET": value}


def test_a_manager_that_went_away_is_a_false_return_not_an_exception(tmp_path):
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    n.close()


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_a_NOTIFY_SOCKET_this_client_cannot_use_is_a_clear_error(value):
    with pytest.raises(NotifySocketError, match="NOTIFY_SOCKET"):
        Notifier.from_environ({"NOTIFY_SOCKET": value})


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),   # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "me"}, None),
    ({}, None),
])
def test_watchdog_interval_follows_sd_watchdog_enabled(env, expected):
    assert sdnotify.watchdog_interval(env, pid=4242) == expected


def test_socket_address_maps_at_to_the_abstract_namespace():
    assert sdnotify.socket_address("@x/y") == b"\0x/y"
    assert sdnotify.socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_a_full_manager_queue_drops_the_ping_instead_of_stalling(tmp_path, monkeypatch):
    # A receiver that never reads: the kernel queue fills, the send times out, the call returns False.
    monkeypatch.setattr(sdnotify, "SEND_TIMEOUT", 0.05)
    m = Manager(str(tmp_path / "notify"))
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    assert n.notify(STATUS="first") is True
    sent = 1
    while n.notify(STATUS="x" * 4000):
        sent += 1
        assert sent < 100_000, "the kernel never pushed back"
    assert m.receive()[0] == {"STATUS": "first"}    # what was queued is intact
    n.close()
    m.close()
