"""Atomic file writes: an interrupted run never leaves a half-written file under the final name, nor a
set of files that must change together (a report's CSV, JSON and masks) half old and half new."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # the temp name ends like the final one: some writers (ITK, ONNX) pick a format by suffix
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=f"-{final.name}", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _normal_mode(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def is_plain_name(name: object) -> bool:
    """One file or folder name, so that joining it to a folder stays in that folder: not empty, not
    '.' or '..', no separator. Names from manifests and command lines are checked with it."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in ("/", "\\", "\0"))
    )


def _normal_mode(path: str | os.PathLike) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # mkstemp creates 0600; the final file gets normal modes


COMMIT_JOURNAL = ".m2anet-commit.json"
"""Present in a folder only while a set of files is being renamed into place (see `atomic_files`)."""


@contextlib.contextmanager
def atomic_files(folder: str | os.PathLike, names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """Temp paths beside `folder`/NAME for a set of files that must change together.

    Every file is written under its temp name first; only if the block succeeds is the list of
    renames recorded in COMMIT_JOURNAL (one atomic write) and carried out. A failure before that
    leaves the old set untouched; a kill during the renames leaves the journal, and
    `finish_commit` (run by the next `atomic_files` in that folder, and by any reader that wants a
    whole set) completes the new set. A folder can hold other files (`--out .`), so the set is
    committed by a journal, not by renaming the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_commit(folder)
    staged: dict[str, Path] = {}
    try:
        for name in names:
            fd, tmp_name = tempfile.mkstemp(prefix=".partial-", suffix=f"-{name}", dir=folder)
            os.close(fd)
            staged[name] = Path(tmp_name)
        yield dict(staged)
        for tmp in staged.values():
            _normal_mode(tmp)
        write_json(folder / COMMIT_JOURNAL, {name: tmp.name for name, tmp in staged.items()})
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    finish_commit(folder)


def finish_commit(folder: str | os.PathLike) -> None:
    """Complete a set of renames `atomic_files` recorded but was stopped in; nothing to do without one."""
    folder = Path(folder)
    journal = folder / COMMIT_JOURNAL
    try:
        staged = json.loads(journal.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    for name, tmp in staged.items():
        if Path(name).name != name or Path(tmp).name != tmp:
            raise ValueError(f"{journal} names a file outside {folder} ({name!r}): delete the journal")
        with contextlib.suppress(FileNotFoundError):  # renamed before the interruption
            os.replace(folder / tmp, folder / name)
    journal.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
