"""scripts.atomic_files: the one temp-sibling + os.replace helper every result writer goes through."""

import json
import os

import pytest

from scripts.atomic_files import atomic_path, temp_sibling, write_json_atomic


def test_temp_sibling_is_hidden_next_to_path_and_keeps_the_extensions(tmp_path):
    tmp = temp_sibling(tmp_path / "case.nii.gz")
    assert os.path.dirname(tmp) == str(tmp_path)
    assert os.path.basename(tmp).startswith(".case.nii.gz.") and tmp.endswith(".tmp.nii.gz")
    assert temp_sibling(tmp_path / "round_3").endswith(".tmp")
    assert temp_sibling(tmp_path / "a.png") != temp_sibling(tmp_path / "a.png")  # unique: concurrent writers


def test_file_replaces_old_content_only_on_success(tmp_path):
    path = tmp_path / "sub" / "out.csv"
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("first")
        assert not path.exists()  # nothing visible until the block ends
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError, match="crash"), atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash")
    assert path.read_text() == "first"
    assert os.listdir(path.parent) == ["out.csv"]  # the temp was removed


def test_folder_replaces_an_existing_folder_and_a_failed_one_leaves_no_trace(tmp_path):
    target = tmp_path / "report"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_path(target) as tmp:
        os.mkdir(tmp)
        with open(os.path.join(tmp, "index.html"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(target)) == ["index.html"]
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        os.mkdir(tmp)
        raise ValueError
    assert sorted(os.listdir(tmp_path)) == ["report"]
    # replace_folder=False: an existing folder is kept and os.replace's error reaches the caller, temp removed
    with pytest.raises(OSError), atomic_path(target, replace_folder=False) as tmp:
        os.mkdir(tmp)
        open(os.path.join(tmp, "x"), "w").close()
    assert sorted(os.listdir(target)) == ["index.html"] and sorted(os.listdir(tmp_path)) == ["report"]


def test_write_json_atomic_round_trips_and_stringifies(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1, "p": tmp_path})
    assert json.loads(path.read_text()) == {"a": 1, "p": str(tmp_path)}
    assert os.listdir(tmp_path) == ["summary.json"]
