"""Atomic file writes: every artifact (checkpoint, export, result file) is written to a temporary name in the same
folder, flushed, then renamed over the target, so a crash or Ctrl-C never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on a clean exit it is fsynced and renamed onto `path`, on an error it
    is removed and `path` stays as it was. `suffix` keeps an extension writers insist on (`np.savez`, `savefig`)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())  # what open(path, "w") would have given, not mkstemp's 0600
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj, **dump_kwargs) -> Path:
    """Serialise `obj` as JSON (indent 1 unless given) and write it to `path` atomically."""
    dump_kwargs.setdefault("indent", 1)
    return atomic_write_text(path, json.dumps(obj, **dump_kwargs))


def _replaceable(target: Path, replace: Callable[[Path], bool] | None) -> bool:
    """Whether `target` may be replaced: absent, an empty real folder, or accepted by `replace`."""
    if not os.path.lexists(target):
        return True
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return True
    return replace is not None and bool(replace(target))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on a clean exit it replaces `path` (an older folder there is
    removed only after the new one is complete), on an error it is removed and `path` stays as it was.

    An existing `path` is replaced only when it is an empty folder or `replace(path)` says so (checked before the
    folder is yielded and again just before the swap); anything else is a FileExistsError and `path` is untouched,
    so a mistyped target can never delete someone's files."""
    target = Path(path)
    if not _replaceable(target, replace):
        raise FileExistsError(f"'{target}' exists and may not be replaced (not an empty folder)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # what mkdir would have given, not mkdtemp's 0700
    old = None
    try:
        yield tmp
        if not _replaceable(target, replace):  # it changed while the new folder was being written
            raise FileExistsError(f"'{target}' exists and may not be replaced (not an empty folder)")
        if os.path.lexists(target):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
