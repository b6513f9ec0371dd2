"""fdpipe/files.py's writer: a file appears whole under its name or not at all (run files, checkpoints, stores)."""

from __future__ import annotations

import errno

import pytest

from fdpipe.files import replacing, write_atomic


def test_a_write_the_disk_refuses_keeps_the_old_file_leaves_no_temporary_and_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b"old")
    with pytest.raises(OSError) as e:
        with replacing(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")  # a failed write() names no file
    assert e.value.filename == str(path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_an_interrupted_write_keeps_the_old_file_and_a_clean_one_replaces_it(tmp_path):
    path = tmp_path / "student.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == [path.name]
