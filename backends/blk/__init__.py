"""virtio-blk on raw image files (virtio-legacy.md 3; x100-host-abi.md 6.4).

* :mod:`.image` -- :class:`BlockImage`, the image file: vectored I/O, flush,
  zeroing, and the host-side read/write API, all through one fd and one lock;
* :mod:`.device` -- :class:`BlkBackend`, the request switch on queue 0.
"""

from .device import BlkBackend
from .image import BlockImage, ImageError

__all__ = ["BlkBackend", "BlockImage", "ImageError"]
