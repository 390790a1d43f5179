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
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

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
    an error; create parent dirs. For files written piece by piece (one JSON line per row): several can be held open
    in one ``contextlib.ExitStack`` so that an error in any leaves none of them written.

    On any error the temp file is removed, the old ``path`` (if any) is untouched, and the error re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


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
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (POSIX); best effort where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
