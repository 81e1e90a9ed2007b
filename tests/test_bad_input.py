"""Bad input from people (issue 7): every mistake an operator can make gets one clear line and a documented
exit status, never a traceback.

micctl: 0 ok, 1 the request failed (permission denied included), 2 usage, 3 no such card or daemon,
4 a wait timed out. micdrv: 0 clean stop, 1 the card cannot be driven (not root included), 2 usage or
configuration. Commands run in-process (``main(argv)`` in a forked child, :mod:`tests.as_user`), the
ones that need a card against a real ``micdrv --simulate`` daemon. What test_config.py, test_cli.py
and test_daemon.py already check (configuration messages, doctor, bind, -b -S, unknown cards, invalid
transitions, a missing firmware file) is not repeated here. Hypothesis types at the configuration
loader, at micctl and straight at the control socket; tap name clashes are made in network namespaces
the tests create.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from micdrv import config as C
from micdrv import default_config
from micdrv.jsonlines import JsonLinesClient
from tests.as_user import NOBODY, as_user, run_main
from tests.daemon_harness import Daemon

pytestmark = pytest.mark.root


def one_line(r, code: int, *needles: str) -> str:
    """``r`` exited ``code`` with no traceback, and its last stderr line says all of ``needles``."""
    assert "Traceback" not in r.err, r.err
    assert r.code == code, (r.code, r.err)
    line = r.lines[-1]
    for n in needles:
        assert n in line, (n, r.err)
    return line


# --- micctl arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["set", "mic0"], "the following arguments are required: attr, value"),
    (["wait", "--timeout", "soon", "mic0"], "argument --timeout: 'soon' is not a number of seconds from 0 to 1e+09"),
    (["wait", "--timeout", "nan", "mic0"], "'nan' is not a number of seconds"),
    (["boot", "--wait", "--timeout", "inf", "mic0"], "'inf' is not a number of seconds"),
    (["reset", "--timeout", "-1", "mic0"], "'-1' is not a number of seconds"),
    (["wait", "--timeout", "1e300", "mic0"], "'1e300' is not a number of seconds"),
    (["blk", "add", "mic0"], "the following arguments are required: path"),
    (["status", "../../etc/passwd"], "'../../etc/passwd' is not a card name"),
    (["log", ""], "'' is not a card name"),
    (["boot", ".hidden"], "'.hidden' is not a card name"),
])
def test_micctl_usage_errors_exit_2_with_the_reason_on_the_last_line(tmp_path, argv, needle):
    one_line(run_main("micdrv.cli", ["--run-dir", str(tmp_path), *argv]), 2, needle)


def test_micctl_with_a_broken_configuration_names_file_line_and_key(tmp_path):
    cfg = tmp_path / "micdrv.toml"
    cfg.write_text('[global]\nrun_dir = "relative/run"\n')
    one_line(run_main("micdrv.cli", ["--config", str(cfg), "status"]), 2,
             f"{cfg}:2: global.run_dir: must be an absolute path")


# --- micdrv arguments and configuration ------------------------------------------------------------
def daemon(tmp_path: Path, *argv: str, config: str | None = None):
    if config is not None:
        (tmp_path / "micdrv.toml").write_text(textwrap.dedent(config))
        argv = ("--config", str(tmp_path / "micdrv.toml"), *argv)
    return run_main("micdrv.daemon", ["--run-dir", str(tmp_path / "run"), *argv])


def test_a_malformed_device_address_is_a_usage_error(tmp_path):
    one_line(daemon(tmp_path, "--device", "03:00"), 2, "--device '03:00' is not a PCI address like 0000:03:00.0")


@pytest.mark.parametrize("argv, needle", [
    (["--vfio-user", "/nonexistent/card.sock"],
     "connect to vfio-user socket /nonexistent/card.sock failed: [ENOENT] No such file or directory"),
    (["--device", "0000:7f:1f.7"], "look up PCI device 0000:7f:1f.7 failed: [ENODEV]"),
])
def test_a_card_that_is_not_there_is_one_line_and_exit_1(tmp_path, argv, needle):
    line = one_line(daemon(tmp_path, *argv), 1, needle)
    assert line.count("No such file or directory") <= 1


def test_a_card_name_the_daemon_cannot_use(tmp_path):
    one_line(daemon(tmp_path, "--simulate", "--name", "card7"), 2, "card name 'card7'", "micN")


@pytest.mark.parametrize("key", ["socket_group", "fuse_group"])
def test_a_group_that_does_not_exist_names_file_line_and_key(tmp_path, key):
    r = daemon(tmp_path, "--simulate", config=f"""
        [global]
        log_level = "info"
        {key} = "no-such-group-here"
        """)
    one_line(r, 2, f"{tmp_path}/micdrv.toml:4: global.{key}: no group 'no-such-group-here' on this host")
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_a_configuration_that_is_not_a_readable_text_file(tmp_path):
    (tmp_path / "latin1.toml").write_bytes(b'[card.mic0]\ncmdline = "caf\xe9"\n')
    for path, why in ((tmp_path, "cannot read: Is a directory"), (tmp_path / "latin1.toml", "not UTF-8 text")):
        one_line(run_main("micdrv.daemon", ["--simulate", "--config", str(path)]), 2, f"micdrv: {path}: {why}")


def test_a_syntax_error_stops_the_daemon_before_it_starts(tmp_path):
    r = daemon(tmp_path, "--simulate", config='[card.mic0]\ncmdline = "unterminated\n')
    one_line(r, 2, f"{tmp_path}/micdrv.toml:2: TOML syntax")


def test_a_run_directory_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    r = run_main("micdrv.daemon", ["--simulate", "--run-dir", str(tmp_path / "file" / "run")])
    one_line(r, 1, f"cannot make the run directory {tmp_path}/file/run: Not a directory")


def test_a_mistake_in_the_installed_default_configuration_points_at_its_line(tmp_path):
    """Uncommenting a setting of the file ``micctl install`` writes and getting it wrong: file, line, key."""
    lines = default_config.TEXT.splitlines()
    at = {line: n for n, line in enumerate(lines)}
    lines[at["#[defaults]"]] = "[defaults]"
    n = at['#bootmode = "linux"']
    lines[n] = 'bootmode = "windows"'
    path = tmp_path / "micdrv.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(path)
    assert str(e.value).startswith(f"{path}:{n + 1}: defaults.bootmode: must be one of")


# Random configurations: whatever a person types, the loader either accepts it or raises a ConfigError
# whose line is the line of the key it names -- never another exception, never a wrong line.
_KEYS = sorted({*C._GLOBAL_FIELDS, *C._CARD_FIELDS, "heartbeat", "pci", "enable", "timeout", "tap", "path",
                "bogus"})
_scalars = st.one_of(st.booleans(), st.integers(-2, 1 << 65), st.floats(allow_nan=True),
                     st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12),
                     st.sampled_from(["linux", "flash", "/abs/path", "rel/path", "0000:03:00.0", "mic0", "nogroup"]))
_values = st.recursive(_scalars, lambda v: st.lists(v, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), v,
                                                                                    max_size=3), max_leaves=6)
_tables = st.sampled_from(["global", "defaults", "card.mic0", "card.mic1", 'card."0000:03:00.0"', "card.x",
                           "card.mic0.heartbeat", "[card.mic0.net]", "[card.mic0.blk]", "nonsense"])


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v == v and abs(v) != float("inf") else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return "{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_tables, st.dictionaries(st.sampled_from(_KEYS), _values, max_size=4)), max_size=4))
def test_any_configuration_loads_or_fails_with_the_line_of_the_key_it_names(doc):
    text = "".join(f"[{t}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in kv.items()) for t, kv in doc)
    try:
        C.loads(text, "f.toml")
    except C.ConfigError as e:
        assert str(e).startswith("f.toml:") and e.message and "\n" not in str(e)
        if e.key and e.line:
            src = text.splitlines()[e.line - 1]
            last = re.split(r"[.\[]", e.key.replace('"', ""))[-1].rstrip("]")
            assert last in src or last.isdigit(), (str(e), src, text)


# --- use without root --------------------------------------------------------------------------------
def test_the_daemon_run_by_an_unprivileged_user_says_it_needs_root(tmp_path):
    for argv in (["--simulate"], ["--device", "0000:03:00.0"], ["--vfio-user", str(tmp_path / "card.sock")]):
        r = run_main("micdrv.daemon", ["--run-dir", str(tmp_path / "run"), *argv], uid=NOBODY, gid=NOBODY)
        one_line(r, 1, f"micdrv: must run as root (uid {NOBODY})")
    assert not (tmp_path / "run").exists()


# --- a card to make mistakes with --------------------------------------------------------------------
BROKEN_DEVICES = """
[global]
socket_mode = 0o660
[[card.mic3.net]]
tap = "lo"
[[card.mic3.blk]]
path = "/nonexistent/mic3.img"
"""


@pytest.fixture(scope="module")
def mic3():
    base = Path(tempfile.mkdtemp(prefix="micdrv-bad"))
    os.chmod(base, 0o755)
    d = Daemon(base / "run", "mic3", BROKEN_DEVICES)
    yield d
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log(), d.log()
    shutil.rmtree(base, ignore_errors=True)


def test_devices_that_cannot_be_opened_are_reported_and_the_card_runs_without_them(mic3):
    """A tap name another interface has (here lo) and an image that does not exist: a log line each,
    listed by micctl devices, and the daemon serves the card all the same."""
    out = mic3.ok("devices", "mic3")
    errors = [line for line in out.splitlines() if line.startswith("mic3 error: ")]
    assert len(errors) == 2, out
    assert "net device net0: tap lo: TUNSETIFF: an interface named lo exists already (the loopback interface)" \
        in errors[0]
    assert "blk device blk0: /nonexistent/mic3.img: cannot open read-write: No such file or directory" in errors[1]
    log = mic3.log()
    assert "an interface named lo exists already" in log and "/nonexistent/mic3.img: cannot open" in log
    assert mic3.status()["state"] == "ready"


# A file root cannot read either: a write-only sysfs attribute refuses every open for reading (kernfs).
# Opening it for reading and writing fails too, so nothing is ever written to it.
UNREADABLE = "/sys/bus/pci/drivers_probe"


def _sparse(path: Path, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def _boot_cases(tmp: Path, memory: int, firmware: str) -> list[tuple[list[str], str]]:
    (tmp / "dir").mkdir()
    huge = _sparse(tmp / "huge.img", memory + 4096)  # sparse: nothing is written to the host's disk
    return [
        (["--firmware", str(tmp / "dir")], f"{tmp}/dir: not a regular file"),
        (["--firmware", "/dev/zero"], "/dev/zero: not a regular file"),  # would read forever
        (["--firmware", UNREADABLE], f"{UNREADABLE}: Permission denied"),
        (["--firmware", huge], f"{huge} is {memory + 4096} bytes, more than the"),
        (["--firmware", firmware, "--ramdisk", str(tmp / "no.initrd")], f"{tmp}/no.initrd: No such file"),
        (["--firmware", firmware, "--ramdisk", huge], f"{huge} is {memory + 4096} bytes, more than the"),
    ]


def test_a_boot_with_an_unusable_image_is_refused_before_the_card_is_touched(mic3, tmp_path):
    info = json.loads(mic3.ok("info", "--json", "mic3"))[0]
    firmware = str(Path(mic3.sim_control).parent / "firmware" / "uos.img")
    before = mic3.card("counters")["counters"]["bootstrap"]
    for extra, needle in _boot_cases(tmp_path, info["memory_size"], firmware):
        r = mic3.micctl("boot", "mic3", *extra)
        assert r.returncode == 1 and "Traceback" not in r.stderr, (extra, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("micctl: mic3: boot failed: ") \
            and r.stderr.count("mic3") == 1 and needle in r.stderr, r.stderr
        assert mic3.status()["state"] == "ready"
    after = mic3.card("counters")["counters"]["bootstrap"]
    assert (after["kicks"], after["resets"]) == (before["kicks"], before["resets"])
    mic3.ok("set", "mic3", "firmware", firmware)  # a refused boot still set the attributes, as micctrl -b did
    mic3.ok("set", "mic3", "ramdisk", "")


def test_hot_adding_an_image_that_is_missing_unreadable_or_not_a_file(mic3, tmp_path):
    for path, flags, needle in ((tmp_path / "absent.img", (), "read-write: No such file or directory"),
                                (tmp_path, (), "read-write: Is a directory"),
                                (UNREADABLE, (), "read-write: Permission denied"),
                                (UNREADABLE, ("--readonly",), "read-only: Permission denied")):
        r = mic3.micctl("blk", "add", "mic3", str(path), *flags)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert f"blk-add failed: {path}: cannot open {needle}" in r.stderr
    assert json.loads(mic3.ok("blk", "list", "mic3", "--json")) == []


def test_a_second_daemon_for_a_card_is_refused_and_the_first_serves_on(mic3):
    r = run_main("micdrv.daemon", ["--simulate", "--name", "mic3", "--run-dir", str(mic3.run_dir),
                                   "--config", str(mic3.config_path)])
    line = one_line(r, 1, f"mic3: {mic3.socket}: another server is listening there: micdrv is running for mic3")
    assert r.err.strip() == line
    assert mic3.status()["state"] == "ready" and mic3.card("counters")  # its card and simulator untouched


def test_a_wait_the_daemon_cannot_do_is_refused_not_a_traceback(mic3):
    """What micctl no longer sends, another client may: the daemon checks the timeout itself."""
    with JsonLinesClient(str(mic3.socket)) as c:
        for timeout in (float("nan"), float("inf"), 1e300, -1, "5", True):
            r = c.call("wait", timeout=timeout)
            assert (r["ok"], r["errno"]) == (False, "EINVAL") and "number of seconds" in r["error"], (timeout, r)
        assert c.call("wait", timeout=0)["state"] == "ready"
    assert "Traceback" not in mic3.log()


_words = st.one_of(st.sampled_from(["mic3", "mic9", "all", "online", "ready", "blk0", "firmware", "cmdline",
                                    "bootmode", "heartbeat_enable", "log_buf_addr", "--json", "--readonly",
                                    "--serial", "--state", "--timeout", "-1", "0", "0x10", "", "-", "--", "/",
                                    "/dev/zero", "/nonexistent", "nan"]),
                   st.text(st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\0"),
                           max_size=30))
_commands = st.sampled_from([["status"], ["info"], ["wait"], ["log"], ["set", "mic3"], ["devices"],
                             ["blk", "list"], ["blk", "add", "mic3"], ["blk", "remove", "mic3"], ["-s"], ["-w"]])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=_commands, words=st.lists(_words, max_size=4))
@example(cmd=["blk", "add", "mic3"], words=["\x1e"])     # a path ending in a record separator (a line break to
@example(cmd=["set", "mic3"], words=["a\nb", "x"])       # str.splitlines) came back raw in the error line
def test_whatever_is_typed_micctl_answers_with_a_documented_status_and_no_traceback(mic3, tmp_path, cmd, words):
    """Commands that may change the card (boot, shutdown, reset, console) are left out; the rest get any
    words. A wait never waits: the last --timeout is 0."""
    tail = ["--timeout", "0"] if cmd[0] in ("wait", "-w") else []
    r = run_main("micdrv.cli", ["--run-dir", str(mic3.run_dir), *cmd, *words, *tail], cwd=str(tmp_path))
    assert r.code in (0, 1, 2, 3, 4) and "Traceback" not in r.err, (cmd, words, r)
    if r.code not in (0, 2):
        assert all(line.startswith("micctl: ") for line in r.lines), r.err


_json = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() |
                     st.text(max_size=20), lambda v: st.lists(v, max_size=3) | st.dictionaries(st.text(max_size=5), v,
                                                                                              max_size=3),
                     max_leaves=5)
_fields = st.dictionaries(st.sampled_from(["attr", "value", "states", "timeout", "name", "path", "readonly",
                                           "serial", "x"]), _json, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=st.sampled_from(["status", "info", "wait", "log", "ping", "devices", "blk-list", "console", "set",
                            "blk-remove", "no-such"]), fields=_fields)
def test_any_request_on_the_socket_is_answered_and_never_an_internal_error(mic3, cmd, fields):
    """Another client than micctl may send anything; requests that could boot the card or add a disk are
    left out, and a wait is given no time."""
    if cmd == "wait":
        fields["timeout"] = 0
    with JsonLinesClient(str(mic3.socket)) as c:
        r = c.call(cmd, **fields)
    assert isinstance(r.get("ok"), bool), r
    assert r["ok"] or (isinstance(r.get("error"), str) and not r["error"].startswith("internal error")), r


def test_micctl_as_a_user_outside_the_socket_group_is_denied_in_one_line(mic3):
    r = run_main("micdrv.cli", ["--run-dir", str(mic3.run_dir), "status", "mic3"], uid=NOBODY, gid=NOBODY)
    one_line(r, 1, f"mic3: permission denied on {mic3.socket} (root or the socket group only)")


# --- tap name clashes --------------------------------------------------------------------------------
CLONE_NEWNET = 0x40000000
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int), include/uapi/linux/if_tun.h
TUNSETOWNER = 0x400454CC    # _IOW('T', 204, int)


def _in_new_netns(fn):
    """``fn()`` in a child with a network namespace of its own (the taps and bridges it makes die with it)."""
    def run():
        if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
        return fn()
    return as_user(None, None, run)


def test_a_tap_name_that_an_interface_of_someone_else_has_is_refused_with_what_it_is():
    from pyroute2 import IPRoute

    from backends.net.tap import IFF_NO_PI, IFF_TAP, TUNSETIFF, Tap, TapError, ifreq

    def clashes():
        with IPRoute() as ip:
            ip.link("add", ifname="micbr", kind="bridge")
        held = Tap("mictap")  # another program's tap, open right now
        fd = os.open("/dev/net/tun", os.O_RDWR)  # a persistent tap of uid 1000, waiting for its VM
        ifr = ifreq()
        ifr.ifr_name = b"vmtap"
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETOWNER, 1000)
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
        os.close(fd)
        out = {}
        for name in ("lo", "micbr", "mictap", "vmtap", "fresh"):
            try:
                with Tap(name) as t:
                    out[name] = f"ok {t.name}"
            except TapError as e:
                out[name] = str(e)
        held.close()
        return out

    out = _in_new_netns(clashes)
    tail = "micdrv makes a tap of its own: give the card another tap name"
    assert out == {
        "lo": f"tap lo: TUNSETIFF: an interface named lo exists already (the loopback interface); {tail}",
        "micbr": f"tap micbr: TUNSETIFF: an interface named micbr exists already (a bridge interface); {tail}",
        "mictap": f"tap mictap: TUNSETIFF: an interface named mictap exists already (a tap of another program); "
                  f"{tail}",
        "vmtap": f"tap vmtap: TUNSETIFF: an interface named vmtap exists already (a tap made persistent by another "
                 f"program, owner uid 1000); {tail}",
        "fresh": "ok fresh",
    }


def test_a_tap_name_taken_in_the_namespace_the_tap_goes_to_is_refused_with_what_it_is():
    from pyroute2 import IPRoute

    from backends.net import NetBackend
    from backends.net.link import LinkError
    from tests.netns_harness import namespace

    name = f"mdv{os.getpid() % 100000}c"
    with namespace() as ns:
        with IPRoute(netns=ns) as ip:
            ip.link("add", ifname=name, kind="bridge")
        with pytest.raises(LinkError) as e:
            NetBackend.open("mic0", tap=name, netns=ns)
        assert str(e.value) == (f"{name}: move into network namespace {ns}: an interface named {name} exists there "
                                f"already (a bridge interface); give the card another tap name")
        with IPRoute() as ip:
            assert ip.link_lookup(ifname=name) == []  # the tap made for the move is gone again
