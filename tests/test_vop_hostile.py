"""A hostile card: every bad descriptor, address, index and doorbell breaks only its own device (spec 5; STYLE).

The simulated card's VOP driver has test switches that write what no sane
driver would (:meth:`micdrv.sim.cardos.vop.CardVop.control`). For each, the
host must mark that one device broken -- logged once, its backend parked,
nothing touched outside the arena or BAR0 -- while another device on the
same card keeps working, and a reset of the device by the card makes it
usable again.
"""

from __future__ import annotations

import logging
import os

import pytest

from backends.blk import BlkBackend
from tests.sim_harness import wait_for
from tests.vop_harness import WAIT, Rig, VopSim, echo


@pytest.fixture(scope="module")
def vs(tmp_path_factory):
    s = VopSim(tmp_path_factory.mktemp("vop-hostile"))
    yield s
    s.close()


@pytest.fixture
def rig(vs, tmp_path):
    vs.configure()
    r = Rig(vs)
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    r.blk = r.add(BlkBackend.open(str(img)))
    r.con, r.fd = r.console()
    yield r
    os.close(r.fd)
    r.close()


def assert_blk_still_works(vs, rig) -> None:
    w = vs.driver("blk", "write", sector=1, length=8192, seed=11, offset=5)
    assert w["status"] == 0
    assert vs.driver("blk", "read", sector=1, length=8192)["sha256"] == w["sha256"]
    assert rig.blk.state == "active"


def broken(dev) -> str:
    wait_for(lambda: dev.broken, f"{dev.name} to be marked broken", WAIT)
    return dev.broken


@pytest.mark.parametrize("kind, message", [
    ("addr", "outside the driver memory"),
    ("len", "outside the driver memory"),
    ("wrap", "wraps around"),
    ("host", "outside the driver memory"),        # a host address: the card's buffers are card memory only
    ("next", "next"),
    ("head", "out of range"),
    ("avail", "ahead of"),
    ("huge", "more than the"),
])
def test_a_bad_ring_breaks_that_device_only(vs, rig, caplog, kind, message):
    caplog.set_level(logging.ERROR, "micdrv.vop.device")
    vs.switch("bad_desc", device="console", queue=1, kind=kind)
    why = broken(rig.con)
    assert message in why, why
    assert rig.con.state == "broken" and not rig.con.active
    assert rig.con.backend.queues == ()                 # parked: the backend has no queues
    errors = [r for r in caplog.records if "device broken" in r.getMessage()]
    assert len(errors) == 1
    vs.switch("storm", device="console", count=50)       # more doorbells: nothing more is logged or done
    assert_blk_still_works(vs, rig)
    assert len([r for r in caplog.records if "device broken" in r.getMessage()]) == 1


def test_a_used_ring_outside_card_memory_breaks_the_device(vs, rig):
    vs.switch("used_address", device="console", queue=0, address=rig.mic.memory_size - 100)
    assert "used_address" in broken(rig.con)
    assert not rig.con.entry.ctrl_u8(12)     # the flag is cleared anyway: the card does not sit out its poll
    assert_blk_still_works(vs, rig)


def test_a_misaligned_used_ring_breaks_the_device(vs, rig):
    vs.switch("used_address", device="console", queue=1, address=0x100002)
    assert "aligned" in broken(rig.con)


def test_a_doorbell_out_of_range_breaks_the_device_when_the_host_rings_it(vs, rig):
    vs.switch("h2c_db", device="console", db=77)
    os.write(rig.fd, b"x")          # the host completes a receive chain and rings h2c_vdev_db
    assert "h2c_vdev_db 77" in broken(rig.con)
    assert_blk_still_works(vs, rig)


def test_a_doorbell_storm_is_absorbed_and_every_device_keeps_working(vs, rig):
    before = rig.con.counters["wakeups"]
    vs.switch("storm", device="console", count=3000)
    assert echo(rig.fd, b"still here") == b"still here"
    assert_blk_still_works(vs, rig)
    assert rig.con.state == "active" and rig.blk.state == "active"
    assert rig.con.counters["wakeups"] > before
    # Interrupts coalesce in the eventfds: far fewer wake-ups than rings.
    assert rig.con.counters["wakeups"] - before < 3000


def test_a_broken_device_works_again_after_the_card_resets_it(vs, rig):
    vs.switch("bad_desc", device="console", queue=1, kind="addr")
    broken(rig.con)
    vs.switch("reset", device="console")
    wait_for(lambda: rig.con.broken is None, "the reset to clear the break", WAIT)
    assert rig.con.state == "added" and rig.con.counters["resets"] == 1
    rig.vop.remove(rig.con)                        # and it is removed cleanly
    again, fd = rig.console()
    try:
        assert echo(fd, b"new console") == b"new console"
    finally:
        os.close(fd)
