"""virtio-blk on image files, driven through real rings by a guest (tests/virtio_harness.py).

Every request is checked against the image file itself; bad requests get
the status the spec asks for and the device keeps serving.
"""

from __future__ import annotations

import os
import struct
import threading

import pytest

from backends.blk import BlkBackend, BlockImage, ImageError
from micdrv.virtio import blk as B
from micdrv.virtio.device import VIRTIO_RING_F_INDIRECT_DESC
from tests.virtio_harness import Guest

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(4 * MiB))
    return path


@pytest.fixture
def guest(image):
    g = Guest(BlkBackend.open(str(image), serial="card-disk-0"))
    yield g
    g.close()
    g.backend.close()


def request(g: Guest, type_: int, sector: int = 0, out: bytes | list[bytes] = b"", in_len: int | list[int] = 0,
            status: bool = True, header: bytes | None = None, **kw) -> tuple[int | None, int, bytes]:
    """One request: (status byte, used.len, bytes read into the data buffers)."""
    hdr = struct.pack("<IIQ", type_, 0, sector) if header is None else header
    outs = [hdr] + ([out] if isinstance(out, bytes) else list(out))
    out_bufs = [g.alloc(len(b), b) for b in outs if b]
    in_lens = [in_len] if isinstance(in_len, int) else list(in_len)
    in_bufs = [g.alloc(n) for n in in_lens if n]
    st = g.alloc(1, b"\xee") if status else None
    g.add(0, [(a, len(v)) for a, v in out_bufs], [(a, len(v)) for a, v in in_bufs] + ([(st[0], 1)] if st else []),
          **kw)
    _token, used_len = g.wait(0)
    data = b"".join(bytes(v) for _a, v in in_bufs)
    return (st[1][0] if st else None), used_len, data


def file_bytes(path, offset, n):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


# --- what the device offers ----------------------------------------------------------------------

def test_config_space_features_and_queue(guest, image):
    cfg = B.virtio_blk_config.from_buffer_copy(guest.config())
    assert cfg.capacity == 4 * MiB // 512 and cfg.seg_max == 126 and cfg.blk_size == 512
    assert cfg.max_discard_seg == 1 and cfg.write_zeroes_may_unmap == 1
    f = guest.backend.device_features()
    for bit in (B.VIRTIO_BLK_F_SEG_MAX, B.VIRTIO_BLK_F_BLK_SIZE, B.VIRTIO_BLK_F_FLUSH, B.VIRTIO_BLK_F_DISCARD,
                B.VIRTIO_BLK_F_WRITE_ZEROES):
        assert f >> bit & 1
    assert not f >> B.VIRTIO_BLK_F_RO & 1
    assert guest.backend.queue_sizes() == (128,)


def test_a_partial_last_sector_is_not_exposed(tmp_path):
    p = tmp_path / "odd.img"
    p.write_bytes(bytes(1000))
    with BlockImage(str(p)) as img:
        assert img.capacity == 1
        with pytest.raises(ImageError, match="outside the image"):
            img.write(512, b"x")
    assert p.stat().st_size == 1000


# --- reads, writes, flush, get_id ------------------------------------------------------------------

def test_writes_land_in_the_file_and_reads_come_from_it(guest, image):
    data = [os.urandom(4096), os.urandom(512), os.urandom(65536)]
    st, used, _ = request(guest, B.VIRTIO_BLK_T_OUT, sector=10, out=data)
    assert (st, used) == (B.VIRTIO_BLK_S_OK, 1)
    assert file_bytes(image, 10 * 512, 70144) == b"".join(data)
    st, used, got = request(guest, B.VIRTIO_BLK_T_IN, sector=10, in_len=[512, 69632])
    assert (st, used) == (B.VIRTIO_BLK_S_OK, 70144 + 1) and got == b"".join(data)
    st, _, got = request(guest, B.VIRTIO_BLK_T_IN, sector=8191, in_len=512)   # the last sector
    assert st == B.VIRTIO_BLK_S_OK and got == file_bytes(image, 8191 * 512, 512)
    c = guest.transport.counters()
    assert (c["write_requests"], c["write_bytes"], c["read_requests"], c["read_bytes"]) == (1, 70144, 2, 70656)


def test_a_request_of_seg_max_segments_through_an_indirect_table(image):
    be = BlkBackend.open(str(image))
    with Guest(be, indirect_entries=128) as g:
        assert g.features >> VIRTIO_RING_F_INDIRECT_DESC & 1
        segs = [os.urandom(512) for _ in range(126)]
        st, _, _ = request(g, B.VIRTIO_BLK_T_OUT, sector=100, out=segs)
        assert st == B.VIRTIO_BLK_S_OK and g.rings[0].num_free == 128
        st, _, got = request(g, B.VIRTIO_BLK_T_IN, sector=100, in_len=[512] * 126)
        assert st == B.VIRTIO_BLK_S_OK and got == b"".join(segs) == file_bytes(image, 100 * 512, 126 * 512)
    be.close()


def test_flush_and_get_id(guest):
    st, used, _ = request(guest, B.VIRTIO_BLK_T_FLUSH)
    assert (st, used) == (B.VIRTIO_BLK_S_OK, 1)
    st, used, ident = request(guest, B.VIRTIO_BLK_T_GET_ID, in_len=20)
    assert (st, used) == (B.VIRTIO_BLK_S_OK, 21) and ident == b"card-disk-0".ljust(20, b"\0")
    assert guest.transport.counters()["flushes"] == 1


def test_a_20_byte_serial_has_no_terminator_and_the_default_is_the_file_name(tmp_path):
    p = tmp_path / "a-rather-long-image-name.img"
    p.write_bytes(bytes(4096))
    for serial, want in (("S" * 20, b"S" * 20), (None, b"a-rather-long-image-")):
        be = BlkBackend.open(str(p), serial=serial)
        with Guest(be) as g:
            assert request(g, B.VIRTIO_BLK_T_GET_ID, in_len=20)[2] == want
        be.close()
    with pytest.raises(ValueError, match="longer than 20"):
        BlkBackend.open(str(p), serial="x" * 21)


# --- read-only images ------------------------------------------------------------------------------

def test_a_read_only_image_refuses_writes(image):
    before = image.read_bytes()
    be = BlkBackend.open(str(image), readonly=True)
    with Guest(be) as g:
        f = be.device_features()
        assert f >> B.VIRTIO_BLK_F_RO & 1 and not f >> B.VIRTIO_BLK_F_DISCARD & 1
        assert request(g, B.VIRTIO_BLK_T_OUT, sector=0, out=b"x" * 512)[0] == B.VIRTIO_BLK_S_IOERR
        assert request(g, B.VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 0, 8, 0))[0] == \
            B.VIRTIO_BLK_S_UNSUPP
        st, _, got = request(g, B.VIRTIO_BLK_T_IN, sector=0, in_len=512)
        assert st == B.VIRTIO_BLK_S_OK and got == before[:512]
        with pytest.raises(ImageError, match="read-only"):
            be.image.write(0, b"y")
    be.close()
    assert image.read_bytes() == before


# --- bad requests: the right status, and the device carries on -----------------------------------

@pytest.mark.parametrize("kind,args,status", [
    ("read past the end", dict(type_=B.VIRTIO_BLK_T_IN, sector=8191, in_len=1024), B.VIRTIO_BLK_S_IOERR),
    ("read at a huge sector", dict(type_=B.VIRTIO_BLK_T_IN, sector=2**63, in_len=512), B.VIRTIO_BLK_S_IOERR),
    ("write past the end", dict(type_=B.VIRTIO_BLK_T_OUT, sector=8192, out=b"z" * 512), B.VIRTIO_BLK_S_IOERR),
    ("partial sector", dict(type_=B.VIRTIO_BLK_T_IN, sector=0, in_len=100), B.VIRTIO_BLK_S_IOERR),
    ("SCSI command", dict(type_=B.VIRTIO_BLK_T_SCSI_CMD), B.VIRTIO_BLK_S_UNSUPP),
    ("unknown type", dict(type_=99), B.VIRTIO_BLK_S_UNSUPP),
    ("barrier flag", dict(type_=B.VIRTIO_BLK_T_BARRIER | B.VIRTIO_BLK_T_OUT, out=b"z" * 512), B.VIRTIO_BLK_S_UNSUPP),
    ("discard with flags", dict(type_=B.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 8, 1)),
     B.VIRTIO_BLK_S_UNSUPP),
    ("two discard ranges", dict(type_=B.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 0, 8, 0) * 2),
     B.VIRTIO_BLK_S_UNSUPP),
    ("discard past the end", dict(type_=B.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 8190, 8, 0)),
     B.VIRTIO_BLK_S_IOERR),
    ("header too short", dict(type_=0, header=b"\0" * 8, in_len=512), B.VIRTIO_BLK_S_IOERR),
])
def test_a_bad_request_gets_its_status_and_later_requests_work(guest, image, kind, args, status):
    before = image.read_bytes()
    st, used, _ = request(guest, **args)
    assert st == status, kind
    assert used == 1
    assert image.read_bytes() == before
    st, _, got = request(guest, B.VIRTIO_BLK_T_IN, sector=3, in_len=512)
    assert st == B.VIRTIO_BLK_S_OK and got == before[3 * 512:4 * 512]
    assert guest.transport.broken is None


def test_a_request_without_a_status_byte_is_returned_unanswered(guest, image):
    st, used, _ = request(guest, B.VIRTIO_BLK_T_OUT, sector=0, out=b"q" * 512, status=False)
    assert (st, used) == (None, 0)
    assert guest.transport.counters()["malformed"] == 1
    assert file_bytes(image, 0, 512) != b"q" * 512
    assert request(guest, B.VIRTIO_BLK_T_FLUSH)[0] == B.VIRTIO_BLK_S_OK


# --- discard and write zeroes ----------------------------------------------------------------------

def test_write_zeroes_and_discard(guest, image):
    request(guest, B.VIRTIO_BLK_T_OUT, sector=64, out=b"\xab" * 16384)
    st, _, _ = request(guest, B.VIRTIO_BLK_T_WRITE_ZEROES, out=struct.pack("<QII", 64, 8, 0))
    assert st == B.VIRTIO_BLK_S_OK and file_bytes(image, 64 * 512, 4096) == bytes(4096)
    st, _, _ = request(guest, B.VIRTIO_BLK_T_WRITE_ZEROES,
                       out=struct.pack("<QII", 72, 8, B.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
    assert st == B.VIRTIO_BLK_S_OK and file_bytes(image, 72 * 512, 4096) == bytes(4096)
    assert file_bytes(image, 80 * 512, 512) == b"\xab" * 512  # only the ranges asked for
    st, _, _ = request(guest, B.VIRTIO_BLK_T_DISCARD, out=struct.pack("<QII", 80, 8, 0))
    assert st == B.VIRTIO_BLK_S_OK
    assert os.path.getsize(image) == 4 * MiB
    c = guest.transport.counters()
    assert (c["write_zeroes"], c["discards"]) == (2, 1)


# --- the host-side API: the same file, the same locks ---------------------------------------------

def test_the_host_side_api_and_the_driver_see_each_other(guest, image):
    img = guest.backend.image
    img.write(5 * 512, b"from the host".ljust(512, b"."))
    st, _, got = request(guest, B.VIRTIO_BLK_T_IN, sector=5, in_len=512)
    assert st == B.VIRTIO_BLK_S_OK and got.startswith(b"from the host")
    request(guest, B.VIRTIO_BLK_T_OUT, sector=6, out=b"from the card".ljust(512, b"!"))
    assert img.read(6 * 512, 13) == b"from the card"
    buf = bytearray(512)
    assert img.readinto(6 * 512, buf) == 512 and buf.startswith(b"from the card")
    img.flush()


def test_host_io_runs_concurrently_with_the_queue_path(guest, image):
    img = guest.backend.image
    stop = threading.Event()
    errors = []

    def host_writer():
        i = 0
        try:
            while not stop.is_set():
                img.write(1 * MiB, bytes([i & 0xFF]) * 65536)
                assert len(set(img.read(1 * MiB, 65536))) == 1  # never half of another write
                i += 1
        except Exception as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=host_writer)
    t.start()
    try:
        for i in range(20):
            blob = bytes([i]) * 32768
            assert request(guest, B.VIRTIO_BLK_T_OUT, sector=16, out=blob)[0] == B.VIRTIO_BLK_S_OK
            assert request(guest, B.VIRTIO_BLK_T_IN, sector=16, in_len=32768)[2] == blob
    finally:
        stop.set()
        t.join(20)
    assert not errors and not t.is_alive()


def test_a_resize_reaches_the_driver_as_a_config_change(guest, image):
    be = guest.backend
    assert request(guest, B.VIRTIO_BLK_T_IN, sector=8192, in_len=512)[0] == B.VIRTIO_BLK_S_IOERR
    assert be.resize(8 * MiB) is True
    assert os.eventfd_read(guest.config_fd) == 1
    assert B.virtio_blk_config.from_buffer_copy(guest.config()).capacity == 8 * MiB // 512
    st, _, got = request(guest, B.VIRTIO_BLK_T_IN, sector=8192, in_len=512)
    assert st == B.VIRTIO_BLK_S_OK and got == bytes(512)
    assert be.resize() is False  # re-reading an unchanged size says nothing


# --- life cycle ---------------------------------------------------------------------------------------

def test_an_image_is_locked_and_closable_while_idle(image):
    be = BlkBackend.open(str(image))
    with pytest.raises(ImageError, match="in use"):
        BlockImage(str(image))
    g = Guest(be)
    try:
        assert request(g, B.VIRTIO_BLK_T_IN, in_len=512)[0] == B.VIRTIO_BLK_S_OK
        be.close()                       # idle: nothing in flight
        assert request(g, B.VIRTIO_BLK_T_IN, in_len=512)[0] == B.VIRTIO_BLK_S_IOERR
        assert g.transport.broken is None
        with pytest.raises(ImageError, match="closed"):
            be.image.read(0, 1)
        BlockImage(str(image)).close()   # the lock went with it
    finally:
        g.close()


def test_several_images_per_card(tmp_path):
    guests = []
    try:
        for i in range(3):
            p = tmp_path / f"disk{i}.img"
            p.write_bytes(bytes([i]) * MiB)
            guests.append(Guest(BlkBackend.open(str(p))))
        for i, g in enumerate(guests):
            assert request(g, B.VIRTIO_BLK_T_IN, sector=7, in_len=512)[2] == bytes([i]) * 512
    finally:
        for g in guests:
            g.close()
            g.backend.close()


def test_an_image_that_cannot_be_opened(tmp_path):
    with pytest.raises(ImageError, match="cannot open read-write"):
        BlockImage(str(tmp_path / "missing.img"))
    with pytest.raises(ImageError, match="not a regular file or block device"):
        BlockImage("/dev/null", readonly=True)
    with pytest.raises(ImageError, match="Is a directory"):
        BlockImage(str(tmp_path))


def test_a_backend_from_its_configuration_entry(image):
    from micdrv.config import BlkConfig
    be = BlkBackend.from_config(BlkConfig(path=str(image), readonly=True, serial="iso"))
    try:
        assert be.image.readonly and be.serial == b"iso" and be.device_features() >> B.VIRTIO_BLK_F_RO & 1
        assert be.describe() == {"name": "blk:disk.img", "device_id": 2, "path": str(image), "readonly": True,
                                 "capacity": 8192, "serial": "iso"}
    finally:
        be.close()
