"""Atomic file writes shared by the whole project.

A reader (another stage, the leaderboard builder, a human with `cat`) must never see a half-written
manifest or result file, and a failed write must leave the previous version in place. So every write
goes to a temp file in the *same* directory (``os.replace`` is only atomic within one filesystem),
is flushed and fsynced, then renamed over the target. ``cache_root`` is where every cache of the project lives.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

# mkstemp creates files 0600; read the process umask once so replaced files get the usual 0666 & ~umask.
# (os.umask can only be read by setting it, so do it at import rather than on every write, where it would race.)
_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_root() -> Path:
    """``$ALIGNPIPE_CACHE`` when set (tests and shared machines point it elsewhere), else ``~/.cache/alignpipe``."""
    base = os.environ.get("ALIGNPIPE_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "alignpipe"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[TextIO]:
    """A UTF-8 text file (newlines written as given) that replaces ``path`` only when the ``with`` block ends without
    an error; create parent dirs. On any error the temp file is removed, the old ``path`` (if any) is untouched, and
    the error re-raised."""
    with atomic_open_all([path]) as (handle,):
        yield handle


class PartlyReplacedError(OSError):
    """:func:`atomic_open_all` renamed some files into place before a rename failed; ``replaced`` lists them."""

    def __init__(self, message: str, replaced: list[Path]):
        super().__init__(message)
        self.replaced = replaced


@contextlib.contextmanager
def atomic_open_all(paths: Sequence[str | os.PathLike[str]], *, binary: bool = False) -> Iterator[list[IO]]:
    """UTF-8 text files (newlines written as given; ``binary``: bytes, e.g. PNG plots), written piece by piece, that
    replace ``paths`` only when the ``with`` block ends without an error, so that files meant to be read together
    (one export's files) are all new or all old. Every file is flushed, synced and closed before the first is renamed
    into place: a full disk fails before anything is replaced. Only a rename itself failing (the target became a
    directory) can leave some files replaced; that raises :class:`PartlyReplacedError` naming them. Parent dirs are
    created."""
    paths = [Path(p) for p in paths]
    temps: list[str] = []
    handles: list[IO] = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append(tmp)
            handles.append(os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline=""))
            os.fchmod(handles[-1].fileno(), 0o666 & ~_UMASK)
        yield handles
        for handle in handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
    except BaseException:
        for handle in handles:
            with contextlib.suppress(OSError):
                handle.close()
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    replaced: list[Path] = []
    try:
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
            replaced.append(path)
    except OSError as error:
        for tmp in temps[len(replaced):]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if not replaced:
            raise
        raise PartlyReplacedError(f"{error}; already replaced: {', '.join(map(str, replaced))}", replaced) from error
    for directory in dict.fromkeys(path.parent for path in paths):
        _fsync_dir(directory)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8, bytes exactly as given) to ``path`` atomically; create parent dirs.

    On any error the temp file is removed, the old ``path`` (if any) is untouched, and the error re-raised.
    """
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (key order kept, trailing newline) atomically.

    Serialisation happens before anything touches the disk, so an unserialisable object cannot clobber
    the old file. NaN/inf are rejected (``allow_nan=False``): they are not JSON and break non-Python readers.
    """
    return atomic_write_text(path, json_text(obj))


def json_text(obj: Any) -> str:
    """``obj`` as the indented JSON text :func:`atomic_write_json` writes (NaN/inf refused)."""
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); best effort where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def why_unreadable(error: Exception) -> str:
    """What went wrong reading a file, in the user's words: a file not UTF-8 names the byte and where, as the
    command line's own one-line errors do (the codec's message spoke of a 'position' and an 'invalid start byte')."""
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start})"
    if isinstance(error, RecursionError):
        return "nested too deeply to be a record this project wrote"
    return str(error)
