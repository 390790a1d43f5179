"""Reading one split of a dataset (a local file or directory, or a Hub id) as rows, with the checks that name a
file's problem (its compression, UTF-8, CSV fields, JSON rows), and the helpers that check a row's columns and fields.
Apart from the loaders (:mod:`~alignpipe.data.scored_sources`, :mod:`~alignpipe.data.hh_rlhf`,
:mod:`~alignpipe.data.sft_sources`) because every one of them reads through it and none of it knows a dataset's layout.

Loaders that turn real preference datasets into :class:`ScoredSet` lists or :class:`PreferencePair` lists, and
SFT datasets (or the chosen side of preference data) into lists of chat conversations.

Why: the pairing code (:mod:`alignpipe.data.pairing`) only knows "a prompt with scored responses" and "a pair with
a strength". These adapters are the one place that knows each dataset's layout, so stages and recipes can swap the
synthetic task for real data without format code of their own.

Every loader goes through ``datasets.load_dataset``: a local file (JSON/JSONL, optionally ``.gz``, parquet, CSV)
is read with the matching builder (``load_dataset("json", data_files=...)``), a local directory with
``load_dataset(dir)`` (``load_from_disk`` for one written by ``Dataset.save_to_disk``), and anything else is taken as a Hugging Face Hub id. So the files under ``../shared/data``
and their Hub originals go through the same code.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import gzip
import io
import json
import logging
import lzma
import math
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from alignpipe.data.errors import DataError, DataFileNotFound, LoadReport

log = logging.getLogger(__name__)

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _builder_for(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return _BUILDERS.get(suffixes[-1]) if suffixes else None


def looks_like_path(name: str) -> bool:
    """A Hub id is ``owner/name``; anything with a data-file suffix, an absolute/relative prefix or deeper nesting
    is meant as a local path, so a typo there should say "file not found" rather than try the Hub."""
    p = Path(name)
    return (
        name.startswith(("/", ".", "~"))
        or _builder_for(p) is not None
        or name.count("/") > 1
        or "\\" in name
    )


def load_rows(name_or_path: str | Path, split: str, *, what: str, expected: str, **hub_kwargs: Any):
    """A ``datasets.Dataset`` for one split of a local file/directory or a Hub dataset; clear error if absent,
    empty or unreadable. A directory written by ``Dataset.save_to_disk`` is one dataset and is read whole
    (``split`` unused)."""
    # Deferred: importing datasets costs about a second, and the pairing code must not need it.
    from datasets import load_dataset

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        if hub_kwargs.get("data_dir"):  # a file is one tranche already: reading all of it would mislead
            raise DataError(f"{what}: data_dir {hub_kwargs['data_dir']!r} picks a folder of a dataset repository, "
                            f"and {path} is a file; give that folder's data file, or the dataset folder or Hub id")
        return _load_file(path, split, what=what, expected=expected)
    if path.is_dir() and (path / "state.json").is_file():
        # One Dataset written by ``Dataset.save_to_disk`` (load_dataset refuses those); it has no splits to pick from.
        from datasets import load_from_disk

        return load_from_disk(str(path))
    if path.is_dir():  # a local copy of a Hub dataset reads as the Hub id does, a data_dir tranche included
        try:
            return load_dataset(str(path), split=split, **hub_kwargs)
        except _read_errors() as error:
            raise DataError(f"{what}: cannot read the dataset directory {path} (split {split!r}): "
                            f"{_cause(error)}; expected data files with {expected}") from None
    from alignpipe.data.hub_datasets import check_loaded_commit, hub_dataset_id

    if isinstance(name_or_path, Path) or hub_dataset_id(name) is None:
        raise DataFileNotFound(
            f"{what}: no such file {path}; expected a local JSON/JSONL(.gz)/parquet file with {expected}, "
            "or a Hugging Face Hub dataset id"
        )
    repo_id, _, revision = name.partition("@")  # ORG/NAME@REVISION: a stage's is the commit the runner pinned
    # from the cache's files (never held in memory, as HF_DATASETS_IN_MEMORY_MAX_SIZE may ask): they say the commit
    rows = load_dataset(repo_id, split=split, revision=revision or None, keep_in_memory=False, **hub_kwargs)
    check_loaded_commit(rows, repo_id, revision, what=what)
    return rows


def _load_file(path: Path, split: str, *, what: str, expected: str):
    from datasets import load_dataset

    builder = _builder_for(path)
    if builder is None:
        raise DataError(
            f"{what}: cannot tell the format of {path}; expected a .json/.jsonl (optionally .gz), .parquet or "
            f".csv file with {expected}"
        )
    empty = DataError(f"{what}: {path} is empty (no rows); expected a file with {expected}")
    if path.stat().st_size == 0:
        raise empty
    try:  # before the datasets library: pyarrow may keep bad bytes until a row is read
        if builder != "parquet" and (problem := _compressed_unnamed(path)):
            raise _Unreadable(problem)
        if builder == "json":
            _check_utf8(path)
        # a CSV file is checked as UTF-8 in the pass that reads its header and counts its fields: one pass, not two
        options = _csv_as_text(path, what=what, expected=expected) if builder == "csv" else {}
    except _Unreadable as problem:
        raise DataError(f"{what}: cannot read {path}: {problem}; expected a {builder} file with {expected}") from None
    try:  # the file is the split; a slice of it ("train[:10%]") reads as it would from a Hub dataset
        return load_dataset(builder, data_files={split.partition("[")[0]: str(path)}, split=split, **options)
    except StopIteration:  # datasets' JSON builder on a file it finds no rows in
        raise empty from None
    except _read_errors() as error:
        if "corresponds to no data" in str(error):  # blank lines or "[]": 'Instruction "train" corresponds to no data!'
            raise empty from None
        detail = (_first_bad_json(path) if builder == "json" else None) or _cause(error)
        if "changed from" in detail:  # pyarrow's "Column(/x) changed from string to number in row N"
            detail += " (every row must give a column, and each field nested in it, the same type of value)"
        raise DataError(f"{what}: cannot read {path}: {detail}; expected a {builder} file with {expected}") from None


def _csv_as_text(path: Path, *, what: str, expected: str) -> dict[str, Any]:
    """``load_dataset("csv")`` options that read every cell as the text it holds, an empty cell as "".

    Why: a CSV cell has no type. pandas would guess one per column, so answers that are all digits became numbers
    (refused as non-text), an empty reply became null (refusing the file, where the same empty reply in JSON lines is
    skipped and counted), and a cell reading "NA" or "null" vanished. Numeric fields (``preference``) parse their
    text where they are read.

    The one pass that reads the header also checks every byte is UTF-8 (:class:`_Unreadable`, named before any
    problem with the rows, wherever it is) and every row's field count (:func:`_csv_header`)."""
    from datasets import Features, Value

    if path.suffix.lower() == ".zst":  # only the datasets library reads it; it guesses types as before
        return {}
    text = _utf8_text(path)
    try:
        header = _csv_header(_lines(text), path, what=what, expected=expected)
    except DataError:
        _drain(text)  # a byte that is not UTF-8, wherever it is, is named first (it is what to fix first)
        raise
    header = [name or f"Unnamed: {i}" for i, name in enumerate(header)]  # pandas' name for a blank header cell
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{what}: {path}'s header names column {repeated[0]!r} more than once ({header}); give each "
                        f"column its own name, with {expected}")
    return {"features": Features({name: Value("string") for name in header}), "na_filter": False}


def _csv_header(lines: Iterable[str], path: Path, *, what: str, expected: str) -> list[str]:
    """The header of a CSV file given as its lines; a DataError for a file with none, or for the first row whose
    field count is not the header's. Why: pandas would take a first extra field as the row's index and shift every
    column left, silently."""
    records = csv.reader(lines)
    with _csv_fields_of_any_size():
        try:
            header = next(records, [])
            if not header:
                raise DataError(f"{what}: {path} has no header line; expected a .csv file whose first line names its "
                                f"columns, with {expected}")
            for record in records:
                if record and len(record) != len(header):
                    raise DataError(f"{what}: {path} line {records.line_num} has {len(record)} fields and the header "
                                    f"{len(header)} ({header}); quote fields that hold commas, and give every row one "
                                    "field per column")
        except csv.Error as error:
            raise DataError(f"{what}: {path} line {records.line_num} is not CSV ({error}); expected a .csv file "
                            f"with {expected}") from None
    return header


_CSV_LIMIT = threading.Lock()  # the csv module's field size limit is one per process


@contextlib.contextmanager
def _csv_fields_of_any_size() -> Iterator[None]:
    """Lift the csv module's field size limit (128 KiB) while the check reads: a reply that long is a valid cell,
    which the datasets library reads whole, so the check must not refuse it. Checks in other threads wait, so none
    puts the old limit back under another, nor leaves the lifted one behind."""
    with _CSV_LIMIT:
        limit = csv.field_size_limit()
        csv.field_size_limit(2**31 - 1)  # the largest every platform's C long holds
        try:
            yield
        finally:
            csv.field_size_limit(limit)


def _lines(chunks: Iterable[str]) -> Iterator[str]:
    """The lines of a text given in chunks, as a file opened with ``encoding="utf-8-sig", newline=""`` gives them
    (a leading byte-order mark dropped; each line ends in "\\n", "\\r\\n" or "\\r", kept), so the CSV reader counts
    lines as it does on such a file."""
    unfinished: list[str] | None = None  # the line the last chunk ended in, in pieces; None: the text's start
    for chunk in chunks:
        if unfinished is None:
            chunk, unfinished = chunk.removeprefix("\ufeff"), []
        ends_pending = bool(unfinished) and unfinished[-1].endswith("\r")  # "\r" then this chunk: one end or two
        if "\n" not in chunk and "\r" not in chunk and not ends_pending:  # a line longer than a chunk: joined once
            unfinished.append(chunk)
            continue
        lines = io.StringIO("".join(unfinished) + chunk, newline="").readlines()
        unfinished = [lines.pop()] if lines and not lines[-1].endswith("\n") else []  # "\r" may end in the next
        yield from lines
    if unfinished and (last := "".join(unfinished)):
        yield last


def _read_errors() -> tuple[type[BaseException], ...]:
    """What the datasets library raises on a file it cannot parse (its own errors wrap the parser's)."""
    from datasets.exceptions import DatasetsError

    return DatasetsError, ValueError, OSError


def _cause(error: BaseException) -> str:
    """The parser's message under the datasets library's generic "An error occurred while generating the dataset"."""
    inner = error.__cause__ or error.__context__ or error
    return f"{type(inner).__name__}: {str(inner)[:300]}"


def _open_raw(path: Path):
    """The file's bytes, decompressed as its suffix says; None for a compression read only by datasets (.zst)."""
    suffix = path.suffix.lower()
    if suffix == ".zst":
        return None
    return _OPENERS.get(suffix, open)(path, "rb")


_MAGIC = {b"\x1f\x8b": ".gz", b"BZh": ".bz2", b"\xfd7zXZ\x00": ".xz", b"\x28\xb5\x2f\xfd": ".zst"}


def _compressed_unnamed(path: Path) -> str | None:
    """Why a compressed file whose name does not say so cannot be read, with the fix; None otherwise (the bytes
    would otherwise read as text that is not UTF-8, and the advice would be to re-encode it)."""
    if path.suffix.lower() in (*_OPENERS, ".zst"):
        return None
    with open(path, "rb") as handle:
        head = handle.read(6)
    for magic, suffix in _MAGIC.items():
        if head.startswith(magic):
            return (f"it is {suffix[1:]}-compressed but its name does not end in {suffix}; rename it to "
                    f"{path.name}{suffix} (or decompress it)")
    return None


# byte-order marks of the wide Unicode encodings, UTF-32 first (its little-endian mark starts with UTF-16's)
WIDE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
             (codecs.BOM_UTF16_BE, "utf-16"))


def _wide_encoding(head: bytes) -> str | None:
    """``utf-16`` or ``utf-32`` when ``head`` starts with that encoding's byte-order mark (as Windows tools often
    save text); None otherwise. Why: such a file is not UTF-8 from its first byte, and re-encoding it from latin1,
    the usual advice, would garble it."""
    return next((encoding for bom, encoding in WIDE_BOMS if head.startswith(bom)), None)


class _Unreadable(Exception):
    """Why a file cannot be read as UTF-8 text, with the fix; the caller makes it a DataError naming the file."""


def _check_utf8(path: Path) -> None:
    """Raise :class:`_Unreadable` naming the first line that is not UTF-8; return if all of the file is."""
    _drain(_utf8_text(path))


def _drain(chunks: Iterable[str]) -> None:
    """Read the rest of :func:`_utf8_text`'s chunks for what it raises, keeping none of them."""
    for _ in chunks:
        pass


def _utf8_text(path: Path) -> Iterator[str]:
    """The file's text, decoded in chunks (files may be large); :class:`_Unreadable` with the first line that is not
    UTF-8, and the fix, when it comes to one. Nothing for a .zst file (only the datasets library reads it)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    try:
        stream = _open_raw(path)
        if stream is None:
            return
        with stream:
            chunk = stream.read(1 << 20)
            if encoding := _wide_encoding(chunk):
                raise _Unreadable(f"it is {encoding.upper()} text (it starts with that encoding's byte-order mark), "
                                  f"not UTF-8; re-save it as UTF-8 (e.g. iconv -f {encoding} -t utf-8 {path.name} > "
                                  f"new-{path.name})")
            while chunk:
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as error:
                    line += chunk.count(b"\n", 0, max(error.start, 0))
                    byte = error.object[error.start] if error.start < len(error.object) else None
                    shown = f"byte 0x{byte:02x}" if byte is not None else "a cut-off character"
                    raise _Unreadable(f"line {line} is not UTF-8 text ({shown}); re-save the file as UTF-8 "
                                      "(e.g. iconv -f latin1 -t utf-8)") from None
                line += chunk.count(b"\n")
                yield text
                chunk = stream.read(1 << 20)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise _Unreadable(f"the file ends in the middle of a UTF-8 character (line {line}); re-save the file "
                          "as UTF-8") from None
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise _Unreadable(f"cannot decompress it ({error}); re-create the archive or give the uncompressed "
                          "file") from None


def _first_bad_json(path: Path) -> str | None:
    """The first row that is not one JSON object, with the fix (the datasets library names neither); None if the
    file parses (the problem is then elsewhere)."""
    stream = _open_raw(path)
    if stream is None:
        return None
    with stream:
        text = stream.read().decode("utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        bad = next((i for i, row in enumerate(whole) if not isinstance(row, dict)), None)
        return None if bad is None else (f"row {bad} of the JSON array is a {_json_kind(whole[bad])}, not an "
                                         "object; each row must be an object with the columns by name")
    if isinstance(whole, dict):
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            return (f"line {number} is not valid JSON ({error.msg} at column {error.colno}); each line of a JSON "
                    "Lines file must be one complete JSON object")
        if not isinstance(row, dict):
            return (f"line {number} is a JSON {_json_kind(row)}, not an object; each line must be one object with "
                    "the columns by name")
    return None


def _json_kind(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def require_columns(ds, columns: tuple[str, ...], *, what: str, source: str, expected: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{what}: {source} has no column {missing[0]!r} (columns: {ds.column_names}); expected rows with {expected}"
        )


def _field(item: Any, key: str, *, what: str, source: str, row: int, column: str, expected: str) -> Any:
    if not isinstance(item, dict) or key not in item:
        raise DataError(
            f"{what}: {source} row {row}: column {column!r} has an entry without field {key!r}; expected {expected}"
        )
    return item[key]


def _as_score(value: Any) -> float:
    """Scores that are missing or not numbers become NaN, which ``build_pairs`` drops and counts."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _finish(report: LoadReport, given: LoadReport | None) -> None:
    log.info(report.summary())
    if given is not None:
        given.__dict__.update(report.__dict__)
