import json
import os
import stat

import pytest

from capt_lib.utils.io import atomic_write, atomic_write_json, read_json


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_write_follows_umask(tmp_path, umask_022):
    path = atomic_write_json(tmp_path / "results.json", {"a": 1})

    # A plain open() under umask 0o022 gives 0o666 & ~0o022 = 0o644.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_write_replaces_content(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})

    assert read_json(path) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})

    def fail(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)

    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_read_json_names_invalid_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")

    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        read_json(path)
