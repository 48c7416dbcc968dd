"""Atomic writes: a reader sees the old file or the new one, never a part; a failed write changes nothing."""

from __future__ import annotations

import os

import pytest

from fastwam.files import replacing, write_text_atomic


def test_write_text_atomic_creates_and_replaces(tmp_path):
    path = tmp_path / "results.json"
    write_text_atomic(path, "old\n")
    assert path.read_text() == "old\n"
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left behind


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "durations.json"
    path.write_text("complete\n")
    with pytest.raises(RuntimeError, match="killed"):
        with replacing(path) as tmp:
            tmp.write_text("half of the new fi")
            assert path.read_text() == "complete\n"  # the target is untouched until the block ends
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "complete\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["durations.json"]


def test_the_temporary_is_hidden_beside_the_target_and_names_the_writer(tmp_path):
    """Same directory (so os.replace never crosses file systems), hidden from globs like `*.json`, one per process."""
    with replacing(tmp_path / "latest") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name == f".latest.tmp-{os.getpid()}"
        assert list(tmp_path.glob("*.json")) == []
        tmp.write_text("step_0000010")
    assert (tmp_path / "latest").read_text() == "step_0000010"


def test_the_data_and_the_rename_are_flushed_to_disk(tmp_path, record_fsyncs):
    """The new file's bytes are synced before it takes the name, and the directory entry after."""
    synced = record_fsyncs(probe=(tmp_path / "latest").exists)
    write_text_atomic(tmp_path / "latest", "step_0000010")
    assert synced == [(str(tmp_path / f".latest.tmp-{os.getpid()}"), False), (str(tmp_path), True)]
