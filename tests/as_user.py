"""Running code as another user: a forked child drops to a uid/gid, calls a function, reports back.

The interpreter's own library lies under /root here, which an unprivileged
user cannot read, so the child never imports anything new after it drops
its privileges: whatever the called code imports lazily is imported first
(``preload``). What a command's ``main()`` prints is caught at the file
descriptor level, so the test sees exactly what a person at a terminal would.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from typing import Callable

NOBODY = 65534  # nobody's uid, and nogroup's gid, on Debian


def _drop(uid: int | None, gid: int | None, groups: tuple[int, ...]) -> None:
    if uid is None:
        return
    os.setgroups(list(groups))
    os.setgid(gid)
    os.setuid(uid)


def as_user(uid: int, gid: int, fn: Callable[[], object], groups: tuple[int, ...] = ()):
    """``fn()`` in a child running as ``uid``:``gid`` with supplementary ``groups``; its JSON-able result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            _drop(uid, gid, groups)
            os.write(w, json.dumps(fn()).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    assert os.waitpid(pid, 0)[1] == 0, "the child failed (its traceback is on stderr)"
    return json.loads(data)


@dataclass
class Run:
    """What one ``main(argv)`` did: its exit status and everything it wrote to stdout and stderr."""

    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.err.splitlines()


def run_main(module: str, argv: list[str], *, uid: int | None = None, gid: int | None = None,
             groups: tuple[int, ...] = (), preload: tuple[str, ...] = (), cwd: str | None = None) -> Run:
    """``module.main(argv)`` in a forked child (as ``uid``:``gid`` if given), as the console script runs it.

    A child, even for root, because a daemon's ``main`` installs signal handlers. An exception that
    escapes ``main`` is printed as a traceback and exits 99, so a test that asserts no traceback fails.
    """
    main = importlib.import_module(module).main
    for name in preload:
        importlib.import_module(name)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                if cwd is not None:
                    os.chdir(cwd)
                # Under pytest sys.stdout and sys.stderr are its capture objects: write to the fds instead.
                sys.stdout = open(1, "w", closefd=False)
                sys.stderr = open(2, "w", closefd=False)
                _drop(uid, gid, groups)
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse, as under the console script
                    code = e.code if isinstance(e.code, int) else 1
                except BaseException:
                    traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code if isinstance(code, int) else 99)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return Run(os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"),
                   err.read().decode(errors="replace"))
