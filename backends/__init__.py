"""Virtio device backends (net, blk, console) and the interface they are served through.

Backends see virtqueues only: never a BAR, a register or a doorbell
(ARCHITECTURE.md). The modules:

* :mod:`.virtqueue` -- chains of memoryviews, batches, the suppressing drain loop;
* :mod:`.backend` -- the backend interface: a small required core, defaults for the rest;
* :mod:`.eventloop` -- the one loop shape: stop eventfd first, handlers keyed by fd;
* :mod:`.direct` -- a transport over shared host memory (tests, benchmarks, vhost-user-like);
* :mod:`.iov` -- a chain's buffers as one byte stream;
* :mod:`.net`, :mod:`.blk`, :mod:`.console` -- the three devices.
"""
