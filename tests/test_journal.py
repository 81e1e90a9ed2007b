"""The journald formatter: priority prefixes exactly when stderr is the stream $JOURNAL_STREAM names."""

import io
import logging
import os
import subprocess
import sys

import pytest

from micdrv import journal

CHILD = """
import logging
from micdrv import journal
journal.configure("debug")
log = logging.getLogger("micdrv.mic0")
log.debug("probing")
log.info("state ready")
log.warning("heartbeat late")
log.error("card crashed")
log.critical("arena lost")
try:
    raise RuntimeError("bad descriptor")
except RuntimeError:
    log.exception("ring broken")
"""


def run_child(env_for_stderr):
    """Run CHILD with stderr on a pipe; env_for_stderr(stat of that pipe) gives the extra environment."""
    r, w = os.pipe()
    st = os.fstat(w)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    env.pop("JOURNAL_STREAM", None)   # pytest itself may run under systemd
    env.update(env_for_stderr(st))
    child = subprocess.Popen([sys.executable, "-c", CHILD], stderr=w, env=env)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    assert child.wait(timeout=60) == 0
    return out.splitlines()


def test_a_daemon_whose_stderr_is_the_journal_prefixes_every_line_with_its_priority():
    lines = run_child(lambda st: {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert lines[:5] == ["<7>micdrv.mic0: probing", "<6>micdrv.mic0: state ready", "<4>micdrv.mic0: heartbeat late",
                         "<3>micdrv.mic0: card crashed", "<2>micdrv.mic0: arena lost"]
    # The traceback: every continuation line keeps the error priority.
    tb = lines[5:]
    assert tb[0] == "<3>micdrv.mic0: ring broken" and len(tb) > 3
    assert all(line.startswith("<3>") for line in tb)
    assert tb[-1] == "<3>RuntimeError: bad descriptor"


def test_a_stale_JOURNAL_STREAM_for_another_stream_gives_plain_text():
    lines = run_child(lambda st: {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not any(line.startswith("<") for line in lines)
    assert "ERROR   micdrv.mic0: card crashed" in lines[3]


def test_without_JOURNAL_STREAM_the_text_is_plain():
    lines = run_child(lambda st: {})
    assert len(lines) > 5 and not any(line.startswith("<") for line in lines)


@pytest.mark.parametrize("value", ["", "garbage", "1:x", "x:1"])
def test_malformed_JOURNAL_STREAM_is_not_the_journal(value):
    with open(os.devnull, "w") as f:
        assert not journal.stderr_is_journal(f, {"JOURNAL_STREAM": value})


def test_a_stream_without_a_file_descriptor_is_not_the_journal():
    assert not journal.stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_the_matching_file_is_the_journal(tmp_path):
    with open(tmp_path / "f", "w") as f:
        st = os.fstat(f.fileno())
        assert journal.stderr_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert isinstance(journal.formatter_for(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}),
                          journal.JournalFormatter)


@pytest.mark.parametrize("level, prio", [
    (logging.DEBUG, 7), (logging.INFO, 6), (25, 5), (logging.WARNING, 4), (35, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2), (5, 7),
])
def test_priority_of_each_level(level, prio):
    assert journal.priority(level) == prio


def test_configure_replaces_its_own_handler_instead_of_stacking():
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        a, b = io.StringIO(), io.StringIO()
        journal.configure("warning", a)
        journal.configure("info", b)
        logging.getLogger("micdrv.x").info("once")
        assert a.getvalue() == "" and b.getvalue().count("once") == 1
        assert root.level == logging.INFO
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
