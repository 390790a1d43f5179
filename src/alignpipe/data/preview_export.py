"""``alignpipe data --export DIR``: each previewed stage's rows as ``DIR/<stage>.jsonl``, one row per line, as the
stage builds them (the dataset :mod:`alignpipe.data.preview` built with the stage's own functions). A reward stage's
rows carry ``"heldout"``: true for the pairs it keeps out of training to measure its reward metrics on.

Why all or nothing: an export is read by scripts and diffed against other runs' data, so a failure (a full disk, a
row that is not JSON) must not leave one stage's file cut short or a mix of old and new files. Every file is written
and synced to a temp file first, and only when all are complete are they renamed into place
(:func:`alignpipe.io.atomic_open_all`); an existing file is replaced only with ``force``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from alignpipe.data.preview import StagePreview
from alignpipe.io import PartlyReplacedError, atomic_open_all

log = logging.getLogger("alignpipe")


class ExportError(ValueError):
    """An export that would overwrite files without ``force``, or that failed; nothing was written."""


def export_targets(names: Sequence[str], directory: Path, *, force: bool = False) -> list[Path]:
    """``<directory>/<name>.jsonl`` for every stage name; an ExportError when one exists and ``force`` is off, so a
    caller can refuse before it builds any rows."""
    targets = [directory / f"{name}.jsonl" for name in names]
    if folders := [str(path) for path in targets if path.is_dir()]:
        raise ExportError(f"--export {directory}: {', '.join(folders)} is a directory, not a file; nothing was written "
                          "(move it away, or pick another directory)")
    existing = [str(path) for path in targets if path.exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise ExportError(f"--export {directory}: {', '.join(existing)} already {verb}; nothing was written (add "
                          "--force to replace, or pick another directory)")
    return targets


def export_rows(stages: Sequence[StagePreview], directory: Path, *, force: bool = False) -> list[Path]:
    """Write ``<directory>/<stage>.jsonl`` for every stage, all or none; return the paths written."""
    targets = export_targets([stage.name for stage in stages], directory, force=force)
    try:
        with atomic_open_all(targets) as handles:  # renamed into place only after every file is written and synced
            for stage, handle in zip(stages, handles):
                flags = stage.heldout_rows
                for i, row in enumerate(stage.rows):
                    handle.write(json_line(row if flags is None else {**row, "heldout": flags[i]}))
    except PartlyReplacedError as error:
        raise ExportError(f"--export {directory}: {' '.join(str(error).split())}") from error
    except (OSError, ValueError) as error:
        raise ExportError(f"--export {directory}: {' '.join(str(error).split())}; nothing was written") from error
    for stage, path in zip(stages, targets):
        log.info("[%s] wrote %d %s to %s", stage.name, stage.size, stage.unit, path)
    return targets


def json_line(row: dict) -> str:
    """One row as a line of JSON Lines: text as UTF-8 (not \\u escapes), NaN refused (it is not JSON)."""
    return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
