"""virtio-console on a pty (virtio-legacy.md 4; x100-host-abi.md 6.3).

* :mod:`.pty` -- :class:`Pty`, a raw-mode pty with its slave path published as a symlink;
* :mod:`.device` -- :class:`ConsoleBackend`, queue 0 host -> card, queue 1 card -> host.
"""

from .device import ConsoleBackend
from .pty import Pty

__all__ = ["ConsoleBackend", "Pty"]
