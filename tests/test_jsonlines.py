"""The control sockets' framing: JSON lines, peer credentials, stale sockets (micdrv.jsonlines)."""

import json
import os
import pwd
import socket
import stat
import tempfile

import pytest

from micdrv.jsonlines import JsonLinesClient, JsonLinesServer, PeerCred, RequestError, remove_stale_socket


@pytest.fixture
def server(tmp_path):
    seen: list[tuple[dict, PeerCred]] = []

    def handler(req, peer):
        seen.append((req, peer))
        if req["cmd"] == "fail":
            raise RequestError("refused on purpose", errno="EINVAL")
        if req["cmd"] == "boom":
            raise RuntimeError("a bug in a handler")
        return {"echo": req}

    path = str(tmp_path / "ctl.sock")
    s = JsonLinesServer(path, handler, mode=0o660)
    s.start()
    s.seen = seen
    yield s
    s.close()


def raw(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(path)
    return c, c.makefile("rwb")


def test_a_request_gets_its_reply_and_the_peer_is_known(server):
    with JsonLinesClient(server.path) as c:
        r = c.call("hello", x=1)
    assert r == {"ok": True, "echo": {"cmd": "hello", "x": 1}}
    req, peer = server.seen[-1]
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())


def test_the_socket_has_the_mode_asked_for(server):
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660


def test_bad_requests_get_errors_and_the_connection_stays_usable(server):
    c, f = raw(server.path)
    with c:
        for line in (b"not json\n", b"[1, 2]\n", b'{"nocmd": 1}\n', b'{"cmd": "fail"}\n', b'{"cmd": "boom"}\n'):
            f.write(line)
            f.flush()
            reply = json.loads(f.readline())
            assert reply["ok"] is False and reply["error"], line
        f.write(b'{"cmd": "fail"}\n{"cmd": "ok"}\n')  # two requests in one write: two replies, in order
        f.flush()
        assert json.loads(f.readline())["errno"] == "EINVAL"
        assert json.loads(f.readline())["ok"] is True
    assert "internal error" in server.handle_line(b'{"cmd": "boom"}', PeerCred(1, 0, 0))["error"]


def test_an_endless_line_closes_the_connection(server):
    c, f = raw(server.path)
    with c:
        try:
            c.sendall(b"x" * (2 << 20))
            assert f.readline() == b""
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: closed all the same


def test_a_stale_socket_is_replaced_and_a_live_one_refused(tmp_path, server):
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # bound, never listened: what a crashed daemon leaves
    remove_stale_socket(stale)
    assert not os.path.exists(stale)
    with pytest.raises(FileExistsError, match="another server"):
        remove_stale_socket(server.path)
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(FileExistsError, match="not a socket"):
        remove_stale_socket(str(plain))


def test_close_removes_the_socket(tmp_path):
    path = str(tmp_path / "x.sock")
    s = JsonLinesServer(path, lambda req, peer: {})
    s.start()
    c = JsonLinesClient(path)  # an idle client does not hold up close()
    s.close()
    c.close()
    assert not os.path.exists(path)


@pytest.mark.root
def test_the_peer_credentials_are_those_of_the_connecting_process():
    nobody = pwd.getpwnam("nobody")
    seen = []
    d = tempfile.mkdtemp(prefix="jsonl")  # pytest's tmp_path is not reachable for other users
    os.chmod(d, 0o755)
    server = JsonLinesServer(os.path.join(d, "ctl.sock"), lambda req, peer: seen.append(peer) or {}, mode=0o666)
    server.start()
    try:
        _ask_as(nobody, server.path)
    finally:
        server.close()
        os.rmdir(d)
    assert (seen[-1].uid, seen[-1].gid) == (nobody.pw_uid, nobody.pw_gid)


def _ask_as(user, path):
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and asks once
        code = 1
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            code = 0 if JsonLinesClient(path).call("who")["ok"] else 1
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
