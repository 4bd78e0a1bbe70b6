"""Atomic writes: a failure while writing leaves the old file (or folder) intact and no temporary behind."""

from __future__ import annotations

import pytest

from coel_env.atomic import atomic_dir, atomic_path, atomic_write_json, atomic_write_text


def test_atomic_write_replaces_and_leaves_nothing_behind(tmp_path):
    p = tmp_path / "sub" / "a.json"
    atomic_write_json(p, {"x": 1})
    atomic_write_text(p, '{"x": 2}')
    assert p.read_text() == '{"x": 2}'
    assert sorted(f.name for f in p.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_swaps_whole_folders(tmp_path):
    d = tmp_path / "policy"
    ours = lambda p: (p / "f").exists() or (p / "g").exists()  # noqa: E731  (folders this test wrote)
    with atomic_dir(d) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(KeyboardInterrupt), atomic_dir(d, replace=ours) as tmp:
        (tmp / "f").write_text("2")
        raise KeyboardInterrupt
    assert (d / "f").read_text() == "1"
    with atomic_dir(d, replace=ours) as tmp:
        (tmp / "g").write_text("3")
    assert sorted(f.name for f in d.iterdir()) == ["g"]
    assert [f.name for f in tmp_path.iterdir()] == ["policy"]


def test_atomic_dir_never_replaces_what_it_may_not(tmp_path):
    """By default only an absent target or an empty folder is replaced; a folder of files, a file or a symlink is a
    FileExistsError before anything is written, and stays exactly as it was."""
    full = tmp_path / "run"
    full.mkdir()
    (full / "model.zip").write_bytes(b"weights")
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(full, target_is_directory=True)
    for target in (full, file, link):
        with pytest.raises(FileExistsError, match="may not be replaced"), atomic_dir(target) as tmp:
            (tmp / "f").write_text("new")
        with pytest.raises(FileExistsError), atomic_dir(target, replace=lambda p: False) as tmp:
            pass
    assert (full / "model.zip").read_bytes() == b"weights" and file.read_text() == "keep" and link.is_symlink()
    assert sorted(f.name for f in tmp_path.iterdir()) == ["link", "notes.txt", "run"]  # no temporaries left
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_dir(empty) as tmp:
        (tmp / "f").write_text("1")
    assert (empty / "f").read_text() == "1"


def test_atomic_dir_rechecks_the_target_before_the_swap(tmp_path):
    d = tmp_path / "out"
    with pytest.raises(FileExistsError), atomic_dir(d) as tmp:
        (tmp / "f").write_text("new")
        d.mkdir()
        (d / "theirs").write_text("keep")  # appeared while the new folder was written
    assert [f.name for f in d.iterdir()] == ["theirs"] and [f.name for f in tmp_path.iterdir()] == ["out"]


def test_cli_checks_refuse_bad_numbers_in_one_line():
    from coel_env.errors import ConfigError
    from experiments.cli_checks import require_int, require_positive

    assert require_int(3, "seed", minimum=0) == 3 and require_positive(0.5, "window_s") == 0.5
    for bad in (1.5, "2", True, None):
        with pytest.raises(ConfigError, match=r"^seed: .* must be an integer"):
            require_int(bad, "seed")
    with pytest.raises(ConfigError, match=r"^n_envs: 0 must be an integer >= 1$"):
        require_int(0, "n_envs", minimum=1)
    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigError, match=r"^window_s: .* must be a finite number > 0$"):
            require_positive(bad, "window_s")


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o644 and (tmp_path / "d").stat().st_mode & 0o777 == 0o755
