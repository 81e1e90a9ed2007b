"""The vop benchmark's bound (benchmarks/pipeline.py) moves the bytes it says it moves."""

import os

from benchmarks.pipeline import MiB, pipeline


def test_a_write_pipeline_leaves_the_engine_sides_bytes_in_the_file(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(os.urandom(8 * MiB))
    rate = pipeline(str(path), 8 * MiB, write=True)
    assert rate > 0
    assert path.read_bytes() == b"\2" * (8 * MiB)     # the engine side's memory, copied out slot by slot


def test_a_handover_only_write_leaves_the_staging_bytes(tmp_path):
    path = tmp_path / "image"
    path.write_bytes(os.urandom(4 * MiB))
    pipeline(str(path), 4 * MiB, write=True, dma=False)
    assert path.read_bytes() == b"\1" * (4 * MiB)     # no second copy: what staging held


def test_a_read_pipeline_reads_without_touching_the_file(tmp_path):
    path = tmp_path / "image"
    data = os.urandom(6 * MiB)
    path.write_bytes(data)
    for dma in (True, False):
        assert pipeline(str(path), 6 * MiB, write=False, dma=dma) > 0
    assert path.read_bytes() == data
