"""Nothing let in (issue 7): who may use the control socket, no shell anywhere, only the arena for the card.

* The control socket decides by the peer's credentials (SO_PEERCRED and SO_PEERGROUPS), not only by its
  file mode: here the socket is 0666, so everything a non-root user is refused, the check refused.
  Real uids and gids, through forked children that drop to them.
* No command micdrv runs goes through a shell: the package's source is scanned.
* Only the DmaArena is ever mapped for the card: the SMPT and the DMA map refuse anything else.

The FUSE tree's permissions (only root writes, fuse_group reads) are checked through a real mount by a
non-root user in tests/test_fs.py and tests/test_fs_block.py.
"""

from __future__ import annotations

import ast
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from micdrv.jsonlines import JsonLinesClient
from micdrv.pci import DmaArena
from micdrv.pci.errors import DmaMapError
from micdrv.x100 import X100, SmptError, regs
from micdrv.x100.smpt import Smpt
from tests import sim_harness
from tests.as_user import NOBODY, as_user, run_main
from tests.daemon_harness import Daemon

pytestmark = pytest.mark.root

GROUP = NOBODY          # nogroup: the socket_group below
STRANGER = 4242         # a group that is not
READ_ONLY = {"status", "info", "wait", "log", "ping", "devices", "blk-list", "console"}


@pytest.fixture(scope="module")
def mic4():
    base = Path(tempfile.mkdtemp(prefix="micdrv-sec"))
    base.chmod(0o755)
    d = Daemon(base / "run", "mic4", '[global]\nsocket_group = "nogroup"\nsocket_mode = 0o666\nfuse = false\n')
    yield d
    assert d.stop() == 0, d.log()
    shutil.rmtree(base, ignore_errors=True)


def commands(d: Daemon) -> list[str]:
    """Every command the daemon knows, as it lists them when asked for one it does not."""
    with JsonLinesClient(str(d.socket)) as c:
        err = c.call("no-such-command")["error"]
    return sorted(re.search(r"one of (.*)$", err).group(1).split(", "))


def refusals(path: str, cmds: list[str]) -> dict[str, bool]:
    """For each command: was it refused with EACCES? (Allowed ones may still fail for other reasons.)"""
    with JsonLinesClient(path, timeout=30) as c:
        return {cmd: c.call(cmd, timeout=0).get("errno") == "EACCES" for cmd in cmds}


def test_the_socket_group_may_use_the_read_only_commands_and_no_other(mic4):
    cmds = commands(mic4)
    assert READ_ONLY < set(cmds) and {"boot", "shutdown", "reset", "reboot", "set", "blk-add"} < set(cmds)
    want = {cmd: cmd not in READ_ONLY for cmd in cmds}
    path = str(mic4.socket)
    assert as_user(NOBODY, GROUP, lambda: refusals(path, cmds)) == want                   # primary group
    assert as_user(NOBODY, STRANGER, lambda: refusals(path, cmds), groups=(GROUP,)) == want  # supplementary
    assert mic4.status()["state"] == "ready"  # and nothing the group asked for changed the card


def test_anyone_else_is_refused_everything_though_the_socket_mode_lets_them_connect(mic4):
    cmds = commands(mic4)
    path = str(mic4.socket)
    assert as_user(NOBODY, STRANGER, lambda: refusals(path, cmds)) == dict.fromkeys(cmds, True)
    assert as_user(4243, STRANGER, lambda: refusals(path, cmds), groups=(4244, 4245)) == dict.fromkeys(cmds, True)


def test_root_may_control_the_card(mic4):
    with JsonLinesClient(str(mic4.socket)) as c:
        assert c.call("set", attr="heartbeat_enable", value="1") == {"ok": True, "attr": "heartbeat_enable",
                                                                      "value": 1}


def test_micctl_says_in_one_line_what_a_group_member_may_not_do(mic4):
    argv = ["--run-dir", str(mic4.run_dir)]
    r = run_main("micdrv.cli", [*argv, "status", "mic4"], uid=NOBODY, gid=GROUP)
    assert (r.code, r.out, r.err) == (0, "mic4: ready\n", "")
    r = run_main("micdrv.cli", [*argv, "boot", "mic4"], uid=NOBODY, gid=GROUP)
    assert (r.code, r.err) == (1, f"micctl: mic4: boot failed: boot: permission denied (uid {NOBODY}); root only\n")
    r = run_main("micdrv.cli", [*argv, "status", "mic4"], uid=NOBODY, gid=STRANGER)
    assert (r.code, r.err) == (1, f"micctl: mic4: status failed: status: permission denied (uid {NOBODY}); "
                                  f"root or socket_group\n")


# --- no shell ------------------------------------------------------------------------------------------
PACKAGE = [Path(__file__).resolve().parents[1] / d for d in ("micdrv", "backends")]
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
               ("asyncio", "create_subprocess_shell"), ("pty", "spawn")}
SUBPROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output"}


def shell_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every place in ``source`` that could hand a command line to a shell, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = (f.value.id, f.attr) if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        where = f"{filename}:{node.lineno}"
        if name in SHELL_CALLS:
            found.append(f"{where}: {name[0]}.{name[1]}")
        if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
               for k in node.keywords):
            found.append(f"{where}: shell=")
        if name and name[0] == "subprocess" and name[1] in SUBPROCESS_CALLS and node.args:
            if not isinstance(node.args[0], (ast.List, ast.Tuple, ast.Name, ast.Starred)):
                found.append(f"{where}: subprocess.{name[1]} with a {type(node.args[0]).__name__}, not an argv")
    return found


def test_no_command_is_ever_run_through_a_shell():
    files = [p for d in PACKAGE for p in sorted(d.rglob("*.py"))]
    assert len(files) > 50
    found = [hit for p in files for hit in shell_uses(p.read_text(), str(p))]
    assert found == []


def test_the_shell_scan_finds_what_it_looks_for():
    src = ('import os, subprocess\nos.system("ls")\nsubprocess.run("ls -l", shell=True)\n'
           'subprocess.check_output(f"ip link show {x}")\nos.popen("id")\nsubprocess.run(["ls"], shell=False)\n')
    assert shell_uses(src) == ["<source>:2: os.system", "<source>:3: shell=",
                               "<source>:3: subprocess.run with a Constant, not an argv",
                               "<source>:4: subprocess.check_output with a JoinedStr, not an argv",
                               "<source>:5: os.popen"]


# --- only the arena is ever mapped for the card -------------------------------------------------------
@pytest.fixture(scope="module")
def sim():
    yield from sim_harness.module_sim()


@pytest.fixture
def card(sim):
    dev = sim.connect()
    arena = DmaArena(sim_harness.ARENA_SIZE)
    c = X100.probe(dev, arena, iova_base=sim_harness.IOVA_BASE, reset_delay=0.0)
    yield c
    c.close()
    dev.close()
    arena.close()


def test_the_smpt_hands_the_card_arena_addresses_and_refuses_every_other(card):
    base, size = card.arena.iova_base, card.arena.size
    refs = list(card.smpt.refs)
    assert card.smpt.to_card(base, size) == regs.SYSTEM_WINDOW + base
    assert card.smpt.to_card(base + size - 64, 64) == regs.SYSTEM_WINDOW + base + size - 64
    for iova, n in ((base - 4096, 4096), (base - 1, 2), (base + size - 8, 16), (base + size, 1), (0, 4096),
                    (1 << 38, 4096)):
        with pytest.raises(SmptError, match="outside the DmaArena"):
            card.smpt.to_card(iova, n)
        with pytest.raises(SmptError, match="outside the DmaArena"):
            card.smpt.map(iova, n)
    assert card.smpt.refs == refs and sum(refs) == size  # the arena's own reference, and nothing else
    assert card.smpt.read_back() == [i << 2 for i in range(regs.SMPT_ENTRIES)]  # no entry was rewritten


def test_an_smpt_not_yet_confined_follows_the_kernel_anywhere_in_the_window():
    class Registers:
        def write(self, off, value):
            pass

    s = Smpt(Registers())
    s.init()
    assert s.to_card(0, 4096) == regs.SYSTEM_WINDOW
    s.confine(1 << 32, 1 << 20)
    with pytest.raises(SmptError, match="outside the DmaArena"):
        s.to_card(0, 4096)
    assert s.to_card(1 << 32, 1 << 20) == regs.SYSTEM_WINDOW + (1 << 32)


def test_only_a_dma_arena_is_ever_dma_mapped_for_the_device(card):
    class Memfd:
        """Host memory shaped like an arena (fd, address, size) that is not one."""

        def __init__(self, arena):
            self.fd, self.address, self.size = arena.fd, arena.address, arena.size

    with pytest.raises(DmaMapError, match="Memfd is not a DmaArena: only the arena is ever mapped"):
        card.dev.dma_map(Memfd(card.arena), 0x4000_0000)
    assert [(m.iova, m.size) for m in card.dev.dma_mappings] == [(card.arena.iova_base, card.arena.size)]
