import re
from pathlib import Path

import pytest

from gemma_hf.io import atomic_directory


def test_atomic_directory_commits_on_success(tmp_path):
    target = tmp_path / "run"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a.txt").write_text("x")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_overwrite(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("contents, reason", [
    ({"notes.txt": "mine"}, "not a model directory (notes.txt)"),
    ({"config.json": "{}", "model.safetensors": "w", "run.json": "{}"}, "is a gemma-hf run directory"),
    ({"config.json": "{}", "model.safetensors": "w", ".gemma-hf-run.json": "{}"}, "is a gemma-hf run directory"),
    ({"config.json": "{}"}, "not a model directory (config.json)"),
])
def test_overwrite_replaces_only_an_empty_or_a_model_directory(tmp_path, contents, reason):
    """What is not an output this package writes (the user's files, a training run) is never replaced,
    and the refusal without overwrite offers no overwrite hint."""
    target = tmp_path / "out"
    target.mkdir()
    for name, text in contents.items():
        (target / name).write_text(text)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=re.escape(reason)) as refused:
            with atomic_directory(target, overwrite=overwrite):
                pass
        assert "pass overwrite" not in str(refused.value)
    assert {p.name: p.read_text() for p in target.iterdir()} == contents
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        with atomic_directory(tmp_path / "file", overwrite=True):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, overwrite=True) as tmp:
        (tmp / "a").write_text("a")
    assert [p.name for p in empty.iterdir()] == ["a"]
