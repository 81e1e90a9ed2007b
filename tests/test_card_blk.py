"""The card's virtio-blk driver against the real image-file backend: what the card writes is in the file, and back.

A real card kernel (tests/card_kernel.py) with disks bound through the
direct transport to :class:`backends.blk.BlkBackend` on files in the
test's temporary directory; the shell commands and the driver's API on
the card side, the image file itself on the host side.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import threading

import pytest

from backends.blk import BlkBackend
from micdrv.sim.cardos.blk import BlkDriver, BlkError, Request
from micdrv.sim.cardos.shell_commands import fill_pattern, pattern_bytes
from micdrv.virtio import blk as B
from tests.card_kernel import BootedCard, wait_for

MiB = 1 << 20


def make_image(path, size: int, data: bytes | None = None) -> str:
    with open(path, "wb") as f:
        f.write(data if data is not None else os.urandom(size))
    return str(path)


def file_bytes(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


@pytest.fixture
def card():
    c = BootedCard()
    c.backends = []
    yield c
    c.close()
    for be in c.backends:
        be.close()


def attach(card: BootedCard, path: str, **kw) -> tuple[object, BlkDriver]:
    be = BlkBackend.open(path, **kw)
    card.backends.append(be)
    dev = card.bus.add(be)
    return dev, dev.driver


def heap_free(card: BootedCard, disk: BlkDriver) -> int:
    """Card memory free, counting what the driver keeps for its next small requests."""
    return card.bus.arena.free_bytes + sum(n for _a, n in disk._cache)


def sh(card: BootedCard, line: str) -> str:
    return card.drivers.run(line)[1]


def test_the_disk_is_described_by_its_config_and_features(card, tmp_path):
    path = make_image(tmp_path / "a.img", 3 * MiB)
    dev, disk = attach(card, path, serial="card-disk-0")
    assert disk.disk == "vda" and disk.capacity == 3 * MiB // 512 and not disk.readonly and disk.can_flush
    assert disk.seg_max == 126 and disk.blk_size == 512 and disk.max_request == MiB
    assert not dev.acked >> B.VIRTIO_BLK_F_DISCARD & 1           # offered, but nothing here would use it
    rec = card.record()["devices"]["vda"]
    assert rec["capacity"] == 6144 and rec["features"][:3] == ["SEG_MAX", "BLK_SIZE", "FLUSH"]
    assert "virtio_blk virtio0: [vda] 6144 512-byte logical blocks (3.15 MB/3.00 MiB)" in card.dmesg()
    out = sh(card, "blk list")
    assert "vda" in out and "6144" in out and "3.15 MB/3.00 MiB" in out and "card-disk-0" in out


def test_a_pattern_the_card_writes_is_in_the_image_file(card, tmp_path):
    path = make_image(tmp_path / "a.img", 2 * MiB)
    attach(card, path)
    out = sh(card, "blk write vda 100 card-pattern 16")
    assert "wrote 16 sectors at 100 of vda (8192 bytes)" in out
    got = file_bytes(path, 100 * 512, 16 * 512)
    # Sector s holds "card-pattern:<s>:" repeated (the shell's documented pattern): computed independently here.
    for i in range(16):
        unit = f"card-pattern:{100 + i}:".encode()
        assert got[i * 512:(i + 1) * 512] == (unit * 40)[:512]
    assert file_bytes(path, 99 * 512, 512) != got[:512]             # neighbours untouched
    assert "verified 16 sectors at 100 of vda: OK" in sh(card, "blk verify vda 100 card-pattern 16")
    assert "MISMATCH at sector 100, byte 0" in sh(card, "blk verify vda 100 0x00 2")     # another pattern
    assert "MISMATCH at sector 116" in sh(card, "blk verify vda 115 card-pattern 2")     # past what was written
    assert "COUNT must be at least 1" in sh(card, "blk verify vda 100 card-pattern 0")


def test_what_the_host_writes_the_card_reads(card, tmp_path):
    data = os.urandom(4 * MiB)
    path = make_image(tmp_path / "a.img", 0, data)
    _dev, disk = attach(card, path)
    out = sh(card, "blk read vda 2048 8")
    assert f"{hashlib.sha256(data[2048 * 512:2056 * 512]).hexdigest()}  vda sectors 2048+8 (4096 bytes)" in out
    assert disk.read(0, 8192) == data                              # 4 MiB: four 1 MiB requests in flight
    dump = sh(card, "blk read -x vda 1").splitlines()
    first = data[512:528]
    assert dump[0].startswith("00000200  " + " ".join(f"{b:02x}" for b in first[:8]))
    assert dump[-1] == "00000400"


def test_large_writes_split_into_requests_land_whole(card, tmp_path):
    path = make_image(tmp_path / "a.img", 0, bytes(8 * MiB))
    _dev, disk = attach(card, path)
    data = os.urandom(3 * MiB + 512)
    disk.write(777, data)
    assert file_bytes(path, 777 * 512, len(data)) == data
    assert disk.c["writes"] == 4 and disk.c["write_bytes"] == len(data)
    disk.flush()
    assert card.bus.devices[0].transport.counters()["flushes"] == 1


def test_a_read_only_disk_refuses_writes_on_both_sides(card, tmp_path):
    path = make_image(tmp_path / "ro.img", MiB)
    before = file_bytes(path, 0, MiB)
    _dev, disk = attach(card, path, readonly=True)
    assert disk.readonly
    assert "write protect is on" in card.dmesg()
    assert "read-only disk" in sh(card, "blk write vda 0 nope")
    with pytest.raises(BlkError) as e:
        disk.write(0, b"x" * 512, check=False)                     # past the driver: the device says IOERR
    assert e.value.errno == errno.EIO and "IOERR" in str(e.value)
    assert file_bytes(path, 0, MiB) == before
    assert disk.read(0, 1) == before[:512]
    assert "1" in sh(card, "blk list").splitlines()[1].split()[5]   # the RO column


def test_get_id_returns_the_serial(card, tmp_path):
    _dev, disk = attach(card, make_image(tmp_path / "a.img", MiB), serial="MIC-SERIAL-012345678")
    assert disk.get_id() == "MIC-SERIAL-012345678"                 # exactly 20 bytes: no NUL after it
    _dev2, disk2 = attach(card, make_image(tmp_path / "b.img", MiB))
    assert disk2.get_id() == "b.img"                               # the backend's default: the file name


def test_requests_beyond_the_end_fail_cleanly(card, tmp_path):
    _dev, disk = attach(card, make_image(tmp_path / "a.img", MiB))
    with pytest.raises(BlkError) as e:
        disk.read(2047, 2)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(BlkError) as e:
        disk.read(2047, 2, check=False)                            # the device's own range check
    assert e.value.errno == errno.EIO
    assert "beyond the end of the disk" in sh(card, "blk read vda 4096")
    assert disk.read(2047, 1) and disk.broken is None


def test_randread_keeps_its_requests_inside_the_disk_and_reads_what_the_seed_says(card, tmp_path):
    # 1 MiB + one sector: 256 whole 4 KiB blocks and a partial one a read must never touch (it would go
    # past the capacity, the backend would answer IOERR and the command fail): 3000 draws over 257 blocks
    # would hit it with probability 1 - (256/257)**3000 > 0.99999.
    data = os.urandom(MiB + 512)
    path = make_image(tmp_path / "a.img", 0, data)
    dev, disk = attach(card, path)
    before = dict(disk.c), dev.transport.counters()["read_requests"]
    out = sh(card, "blk randread vda 3000 32 7")
    m = re.fullmatch(r"randread vda: 3000 requests of 4096 bytes at depth 32 in ([\d.]+) s \((\d+) IOPS\)\n", out)
    assert m, out
    assert disk.c["reads"] - before[0]["reads"] == 3000 and disk.c["errors"] == 0
    assert disk.c["read_bytes"] - before[0]["read_bytes"] == 3000 * 4096
    assert dev.transport.counters()["read_requests"] - before[1] == 3000
    # -s: the data read, in request order, is the image's blocks at the seed's offsets
    rng = random.Random(11)
    blocks = [rng.randrange(256) for _ in range(500)]
    want = hashlib.sha256(b"".join(data[b * 4096:(b + 1) * 4096] for b in blocks)).hexdigest()
    out = sh(card, "blk randread -s vda 500 4 11")
    assert out.endswith(f"IOPS), sha256 {want}\n"), out
    assert want not in sh(card, "blk randread -s vda 500 4 12")
    assert "depth 1 " in sh(card, "blk randread vda 10 1")


def test_submit_reads_queues_a_batch_with_one_kick_and_gives_the_memory_back(card, tmp_path):
    data = os.urandom(MiB)
    _dev, disk = attach(card, make_image(tmp_path / "a.img", 0, data))
    heap = card.bus.arena
    free, kicks = heap.free_bytes, disk.c["kicks"]
    sectors = [8 * b for b in (5, 0, 255, 17, 5)]
    reqs = disk.submit_reads(sectors, 4096, keep=True)
    assert [r.sector for r in reqs] == sectors
    assert disk.c["kicks"] - kicks <= 1                      # one kick decision for the whole batch
    for r, s in zip(reqs, sectors):
        r.wait()
        v = disk.data_view(r)
        assert bytes(v) == data[s * 512:s * 512 + 4096]      # in place, where the device put it
        v.release()
    disk.release_many(reqs)
    disk.release_many(reqs)                                  # idempotent
    assert not disk._inflight and len(disk._cache) == 5      # kept for the next requests (blk-mq's per-tag memory)
    held = heap.free_bytes
    got = disk.submit_reads([8] * 7, 4096)                   # without keep: a bytearray each
    assert [r.wait() for r in got] == [data[4096:8192]] * 7 and free - heap.free_bytes <= 7 * 8192
    assert heap.free_bytes <= held and len(disk._cache) == 7
    with pytest.raises(ValueError):
        disk.submit_reads([0], disk.max_request + 512)
    disk.remove()
    assert heap.free_bytes > free and not disk._cache        # all back to the heap with the disk (and its ring)
    with pytest.raises(BlkError) as e:
        disk.submit_reads([0, 8], 4096)
    assert e.value.errno == errno.ENODEV


def test_randread_refuses_what_it_cannot_do(card, tmp_path):
    attach(card, make_image(tmp_path / "a.img", 2048))             # four sectors: no whole 4 KiB block
    assert "vda: 2048 bytes, smaller than one 4096-byte read" in sh(card, "blk randread vda 10")
    attach(card, make_image(tmp_path / "b.img", MiB))
    assert "QD must be 1..1024" in sh(card, "blk randread vdb 10 0")
    assert "COUNT must be at least 1" in sh(card, "blk randread vdb 0")
    assert "no such disk" in sh(card, "blk randread vdz 10")
    assert "usage: blk list" in sh(card, "blk randread vdb")
    assert "randread vdb: 10 requests" in sh(card, "blk randread vdb 10")


def test_several_disks_are_named_in_probe_order_and_reuse_freed_names(card, tmp_path):
    devs = [attach(card, make_image(tmp_path / f"{i}.img", MiB)) for i in range(3)]
    assert [d.disk for _dev, d in devs] == ["vda", "vdb", "vdc"]
    card.bus.remove(devs[0][0])
    assert "vda" not in card.record()["devices"] and "vdb" in card.record()["devices"]
    assert "virtio_blk: [vda] removed" in card.dmesg()
    _dev, again = attach(card, make_image(tmp_path / "new.img", 2 * MiB))
    assert again.disk == "vda" and again.capacity == 4096           # the lowest free name, as the driver's ida
    sh(card, "blk write vdc 0 third")
    assert file_bytes(str(tmp_path / "2.img"), 0, 6) == b"third:"


def test_hot_remove_with_requests_in_flight_finishes_or_fails_them(card, tmp_path):
    data = os.urandom(8 * MiB)
    path = make_image(tmp_path / "a.img", 0, data)
    dev, disk = attach(card, path)
    results = {"ok": 0, "errors": [], "bad": 0}
    stop = threading.Event()

    def reader(k: int) -> None:
        i = 0
        while not stop.is_set():
            s = (k * 4096 + i * 256) % 16384
            i += 1
            try:
                if disk.read(s, 256) != data[s * 512:(s + 256) * 512]:
                    results["bad"] += 1
                results["ok"] += 1
            except BlkError as e:
                results["errors"].append(e.errno)
                return

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: results["ok"] >= 8, "reads to be under way")
    card.bus.remove(dev)
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a reader hangs after the disk went away"
    assert results["bad"] == 0 and set(results["errors"]) <= {errno.ENODEV, errno.EIO}
    assert disk.dev is None and not disk._inflight and "vda" not in card.drivers.disks
    assert card.kernel.alive
    with pytest.raises(BlkError) as e:
        disk.read(0, 1)
    assert e.value.errno == errno.ENODEV


def test_a_capacity_change_reaches_the_card(card, tmp_path):
    path = make_image(tmp_path / "a.img", MiB)
    dev, disk = attach(card, path)
    be = card.backends[-1]
    assert be.resize(3 * MiB)
    wait_for(lambda: disk.capacity == 6144, "the new capacity on the card")
    # the driver reads the new capacity, then logs it
    wait_for(lambda: "vda: detected capacity change from 1048576 to 3145728" in card.dmesg(), "the capacity line")
    disk.write(6000, b"z" * 512)
    assert file_bytes(path, 6000 * 512, 512) == b"z" * 512


def test_a_small_ring_limits_segments_and_still_moves_big_requests(card, tmp_path):
    data = os.urandom(2 * MiB)
    path = make_image(tmp_path / "a.img", 0, data)
    _dev, disk = attach(card, path, queue_size=8)
    assert disk.seg_max == 6 and disk.max_request == 6 * 128 * 1024
    assert disk.read(0, 4096) == data
    disk.write(1, pattern_bytes("small-ring", 1, 2000))
    assert file_bytes(path, 512, 2000 * 512) == pattern_bytes("small-ring", 1, 2000)


def test_power_off_flushes_and_resets_the_disks(tmp_path):
    c = BootedCard()
    be = BlkBackend.open(make_image(tmp_path / "a.img", MiB))
    try:
        dev = c.bus.add(be)
        c.kernel.poweroff()
        wait_for(lambda: c.kernel.state == "poweroff", "the power-off")
        assert be.counters()["flushes"] == 1 and dev.get_status() == 0 and not dev.transport.active
        assert "vda" not in c.record()["devices"]
    finally:
        c.close()
        be.close()


def test_a_write_and_a_read_bigger_than_card_memory_wait_for_room_instead_of_failing(tmp_path):
    # 4 MiB of transport memory (rings take some): a 12 MiB write is twelve 1 MiB requests that cannot all
    # hold memory at once; the driver waits for completions to give it back, as it waits for ring room.
    c = BootedCard(bus_size=4 * MiB)
    be = BlkBackend.open(make_image(tmp_path / "a.img", 16 * MiB))
    try:
        disk = c.bus.add(be).driver
        data = os.urandom(12 * MiB)
        # The host's loop held until the card has filled its memory with requests: the write must wait.
        release = threading.Event()
        threading.Thread(target=lambda: c.bus.loop.call(release.wait, 30), daemon=True).start()
        writer = threading.Thread(target=disk.write, args=(8, data))
        writer.start()
        wait_for(lambda: disk.c["heap_waits"] > 0, "the write to wait for card memory")
        release.set()
        writer.join(30)
        assert not writer.is_alive()
        assert file_bytes(be.image.path, 8 * 512, len(data)) == data
        assert disk.read(8, len(data) // 512) == data
        assert disk.c["errors"] == 0 and not disk._inflight
        buf = bytearray(2 * MiB)
        disk.read_into(8 + 2048, memoryview(buf))                     # into the caller's buffer
        assert buf == data[MiB:3 * MiB]
    finally:
        c.close()
        be.close()


def test_read_stream_hands_each_request_over_in_order_and_gives_its_memory_back(card, tmp_path):
    data = os.urandom(5 * MiB + 3 * 512)
    path = make_image(tmp_path / "a.img", 0, data + bytes(MiB))
    _dev, disk = attach(card, path)
    seen, held = [], []
    heap = card.bus.arena

    def consume(view):
        seen.append(bytes(view))
        held.append(heap.free_bytes)
    free = heap.free_bytes
    disk.read_stream(0, len(data) // 512, consume, window=2)
    assert b"".join(seen) == data and [len(x) for x in seen] == [MiB] * 5 + [1536]
    # every request's memory came back (a small one kept by the driver for the next requests)
    assert not disk._inflight and heap.free_bytes + sum(n for _a, n in disk._cache) == free
    assert min(held) >= free - 2 * (MiB + 4096)             # two in flight at a time, no more
    h = hashlib.sha256()
    disk.read_stream(3, 4096, h.update)
    assert h.hexdigest() == hashlib.sha256(data[1536:1536 + 4096 * 512]).hexdigest()
    with pytest.raises(BlkError) as e:
        disk.read_stream(len(data) // 512, 4096, h.update)     # past the end of the disk
    assert e.value.errno == errno.EINVAL

    def fail(view):
        raise RuntimeError("consumer failed")
    with pytest.raises(RuntimeError):
        disk.read_stream(0, 8192, fail)
    assert not disk._inflight and disk.broken is None          # nothing left running on a pooled buffer


def test_read_stream_reads_in_place_and_discards_without_consumer(card, tmp_path):
    # mapped card memory (as over VOP): the consumer gets views of each request's own card memory, where the
    # device put the data -- nothing copied, no buffer of the driver's own
    data = os.urandom(3 * MiB + 512)
    path = make_image(tmp_path / "a.img", 0, data + bytes(MiB))
    dev, disk = attach(card, path)
    heap = dev.memory
    seen = []

    def consume(view):
        assert view.obj is heap.view(0, 1).obj                 # card memory itself
        seen.append(bytes(view))
    disk.read_stream(0, len(data) // 512, consume, window=3)
    assert b"".join(seen) == data and not disk._pool and not disk._inflight
    reads = disk.c["reads"]
    disk.read_stream(0, len(data) // 512)                     # no consumer: read and discarded
    assert disk.c["reads"] == reads + 4 and disk.c["read_bytes"] == 2 * len(data)
    free = heap_free(card, disk)
    with pytest.raises(BlkError) as e:                          # the device refuses the request past the end
        disk.read_stream(len(data) // 512 - 4, 8 * 2048, consume, window=4, check=False)
    assert e.value.errno == errno.EIO and heap_free(card, disk) == free and not disk._inflight
    out = sh(card, f"blk read -n vda 0 {len(data) // 512}")
    assert f"read {len(data) // 512} sectors at 0 of vda ({len(data)} bytes), discarded" in out
    out = sh(card, f"blk read vda 1 {len(data) // 512 - 1}")
    assert out.startswith(hashlib.sha256(data[512:]).hexdigest())


def test_without_views_of_card_memory_streams_copy_once_through_reused_buffers(tmp_path):
    c = BootedCard(mapped=False)
    be = BlkBackend.open(make_image(tmp_path / "a.img", 0, os.urandom(4 * MiB)))
    try:
        disk = c.bus.add(be).driver
        data = file_bytes(be.image.path, 0, 4 * MiB)
        seen = []
        disk.read_stream(0, 8192, lambda v: seen.append(bytes(v)), window=2)
        assert b"".join(seen) == data and 1 <= len(disk._pool) <= 3
        assert "wrote 3000 sectors at 5 of vda" in c.drivers.run("blk write vda 5 unmapped 3000")[1]
        assert file_bytes(be.image.path, 5 * 512, 3000 * 512) == pattern_bytes("unmapped", 5, 3000)
        assert "OK" in c.drivers.run("blk verify vda 5 unmapped 3000")[1]
    finally:
        c.close()
        be.close()


def test_write_stream_generates_each_request_in_its_card_memory(card, tmp_path):
    path = make_image(tmp_path / "a.img", 0, bytes(8 * MiB))
    dev, disk = attach(card, path)
    calls = []

    def fill(view, sector):
        calls.append((sector, len(view)))
        view[:] = pattern_bytes("stream", sector, len(view) // 512)
    disk.write_stream(3, 5000, fill, window=2)
    assert calls == [(3, MiB), (2051, MiB), (4099, 904 * 512)]
    assert file_bytes(path, 3 * 512, 5000 * 512) == pattern_bytes("stream", 3, 5000)
    assert disk.c["writes"] == 3 and not disk._inflight and not disk._pool
    out = sh(card, "blk write vda 16 0xc3 4096")                # a byte pattern: memset in place
    assert "wrote 4096 sectors at 16 of vda (2097152 bytes)" in out
    assert file_bytes(path, 16 * 512, 2 * MiB) == b"\xc3" * (2 * MiB)
    assert file_bytes(path, 15 * 512, 512) == pattern_bytes("stream", 15, 1)   # neighbours untouched
    assert "0xzz: not a byte" in sh(card, "blk write vda 0 0xzz 1") and file_bytes(path, 0, 512) == bytes(512)

    def fail(view, sector):
        if sector > 3000:
            raise RuntimeError("producer failed")
        view[:] = b"\x11" * len(view)
    with pytest.raises(RuntimeError):
        disk.write_stream(0, 8192, fail, window=4)
    assert not disk._inflight and disk.broken is None and dev.memory is not None
    assert file_bytes(path, 0, 3 * MiB)[:2 * MiB] == b"\x11" * (2 * MiB)   # what was submitted landed
    ro_dev, ro = attach(card, make_image(tmp_path / "ro.img", MiB), readonly=True)
    with pytest.raises(BlkError) as e:
        ro.write_stream(0, 1, fill)
    assert e.value.errno == errno.EROFS


def test_streams_bigger_than_card_memory_take_turns_with_their_own_requests(tmp_path):
    # 4 MiB of transport memory: a window of 16 MiB of requests cannot all hold memory; a read stream must
    # consume the requests it holds (done, not yet consumed) before it can submit more, never fail for it
    c = BootedCard(bus_size=4 * MiB)
    data = os.urandom(12 * MiB)
    be = BlkBackend.open(make_image(tmp_path / "a.img", 0, data))
    try:
        disk = c.bus.add(be).driver
        h = hashlib.sha256()
        disk.read_stream(0, len(data) // 512, h.update, window=16)
        assert h.digest() == hashlib.sha256(data).digest() and not disk._inflight
        disk.write_stream(0, len(data) // 512, lambda v, s: fill_pattern(v, "0x77", s), window=16)
        assert file_bytes(be.image.path, 0, len(data)) == b"\x77" * len(data)
        assert disk.c["errors"] == 0
    finally:
        c.close()
        be.close()


def test_requests_ended_together_are_all_done_when_the_first_waiter_wakes():
    # what the interrupt handler completes at once, a reaper woken by the first finds done too (io_getevents
    # returns every event there is): woken one by one, it reaped the first alone and resubmitted one request
    reqs = [Request(B.VIRTIO_BLK_T_IN, i, 4096, 0, 4160) for i in range(32)]
    seen = []
    t = threading.Thread(target=lambda: (reqs[0].wait(5), seen.append([r.finished for r in reqs])))
    t.start()
    Request.finish_all(reqs)
    t.join(5)
    assert seen == [[True] * 32]
    Request.finish_all(reqs)                       # idempotent: nothing released twice
    assert all(r.wait(0) is None for r in reqs)


def test_streams_refill_their_window_as_one_batch(card, tmp_path):
    # as blk-mq submits a plugged list: the requests a stream's reap made room for go on the ring together,
    # one avail.idx store and one kick decision, so the device takes them in one pop -- submitted one by
    # one, a device that drains at once saw (and was kicked for) one request at a time
    data = os.urandom(16 * MiB)
    path = make_image(tmp_path / "a.img", 0, data)
    _dev, disk = attach(card, path)
    posts = []
    real = disk._post_prepared, disk._post
    disk._post_prepared = lambda dev, p: (posts.append(len(p)), real[0](dev, p))[1]
    disk._post = lambda dev, p: (posts.append(len(p)), real[1](dev, p))[1]
    h = hashlib.sha256()
    disk.read_stream(0, len(data) // 512, h.update, window=8)
    assert h.digest() == hashlib.sha256(data).digest()
    assert posts[0] == 8 and sum(posts) == 16 and len(posts) < 16, posts
    posts.clear()
    disk.write_stream(0, len(data) // 512, lambda v, s: fill_pattern(v, "0x5a", s), window=8)
    assert file_bytes(path, 0, len(data)) == b"\x5a" * len(data)
    assert posts[0] == 8 and sum(posts) == 16 and len(posts) < 16, posts
