"""Loaders that turn real preference datasets into :class:`ScoredSet` lists or :class:`PreferencePair` lists, and
SFT datasets (or the chosen side of preference data) into lists of chat conversations.

Why: the pairing code (:mod:`alignpipe.data.pairing`) only knows "a prompt with scored responses" and "a pair with
a strength". These adapters are the one place that knows each dataset's layout, so stages and recipes can swap the
synthetic task for real data without format code of their own.

Every loader goes through ``datasets.load_dataset``: a local file (JSON/JSONL, optionally ``.gz``, parquet, CSV)
is read with the matching builder (``load_dataset("json", data_files=...)``), a local directory with
``load_dataset(dir)`` (``load_from_disk`` for one written by ``Dataset.save_to_disk``), and anything else is taken as a Hugging Face Hub id. So the files under ``../shared/data``
and their Hub originals go through the same code.

Bad rows (empty prompts or texts, dialogues that cannot be split) are skipped and counted in a
:class:`LoadReport`, mirroring :class:`~alignpipe.data.pairing.PairingReport`: its :meth:`LoadReport.summary` is
logged at INFO, and callers that want the numbers pass ``report=LoadReport()`` and read it afterwards. Structural
problems (a missing file, a missing column or field, a line that is not UTF-8 or not JSON) raise a :class:`DataError`
with the source, the row or line, the column and the expected layout.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import gzip
import hashlib
import io
import json
import logging
import lzma
import math
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignpipe.data.pairing import PreferencePair, ScoredSet, merge_repeated_responses

log = logging.getLogger(__name__)

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
# A "Human:" turn marker where a turn could start: the reply's start, a line's start or after a sentence's end
# (spaces may precede it). Not mid-sentence, where HH replies quote it ("a real quote from Human: What is ...").
HH_HUMAN_TURN = re.compile(r"(?:^|\n|[.!?][\"'”’)]?\s)\s*Human:")

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


class DataError(ValueError):
    """A dataset problem, phrased for the person fixing the file: the file, the row or line and column, and the fix.

    A ValueError, so callers that already catch those (the CLI) keep working."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A dataset path that names no file; also a FileNotFoundError for callers that catch OS errors."""


@dataclass
class LoadReport:
    """What a loader read and what it skipped (the counterpart of ``PairingReport`` for the I/O side)."""

    source: str = ""
    rows_in: int = 0
    rows_skipped_empty: int = 0  # empty prompt (or, for HH and trl pairs, an empty chosen/rejected reply)
    responses_dropped_empty: int = 0  # scored sets: empty response texts removed from an otherwise kept row
    responses_merged_repeated: int = 0  # scored sets: a response text already in its row, merged (mean score)
    rows_skipped_malformed: int = 0  # HH: no "\n\nAssistant:" turn, or chosen and rejected disagree on the prompt
    rows_skipped_identical: int = 0  # HH and trl pairs: chosen reply == rejected reply
    rows_other_split: int = 0  # HH: valid rows that belong to the other (train/heldout) part
    items_out: int = 0  # ScoredSets or PreferencePairs returned
    examples: list[str] = field(default_factory=list)  # the first few rows that cannot give a pair, and why

    def note(self, problem: str) -> None:
        """Keep a few row-level problems, so an error about the whole file can point at rows to look at."""
        if len(self.examples) < 3:
            self.examples.append(problem)

    def summary(self) -> str:
        return (
            f"load {self.source}: {self.rows_in} rows -> {self.items_out} items; skipped {self.rows_skipped_empty} "
            f"empty, {self.rows_skipped_malformed} malformed, {self.rows_skipped_identical} identical, "
            f"{self.rows_other_split} in the other split; dropped {self.responses_dropped_empty} empty responses; "
            f"merged {self.responses_merged_repeated} repeated responses"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Scored response sets
# ---------------------------------------------------------------------------------------------------------------------


def load_scored_sets_synthetic(rows: list[dict], *, report: LoadReport | None = None) -> list[ScoredSet]:
    """ScoredSets from :func:`alignpipe.tasks.synthetic.scored_response_sets` rows (``prompt``/``responses``/``scores``).

    Unlike the real-data loaders this keeps empty responses: the gold reward is defined for them (an empty
    generation scores 0) and an empty on-policy sample is a legitimate "rejected" example.
    """
    out: list[ScoredSet] = []
    rep = LoadReport(source="synthetic scored_response_sets")
    for i, row in enumerate(rows):
        rep.rows_in += 1
        for key in ("prompt", "responses", "scores"):
            if key not in row:
                raise ValueError(f"synthetic scored set {i}: missing key {key!r}; expected prompt/responses/scores")
        try:
            out.append(ScoredSet(row["prompt"], tuple(row["responses"]), tuple(row["scores"])))
        except (TypeError, ValueError) as err:
            raise type(err)(f"synthetic scored set {i}: {err}") from None
    rep.items_out = len(out)
    _finish(rep, report)
    return out


ALPACA_EXPECTED = (
    '{"instruction": str, "reference": {"model", "text"}, "responses": [{"model", "text", "score"}, ...]} '
    "(score = P(response beats the reference))"
)


def _scored_sets(ds, entries, *, what: str, source: str, expected: str, column: str, text_key: str, score_key: str,
                 report: LoadReport | None) -> list[ScoredSet]:
    """Rows ``{"instruction", <column>: [{text_key, score_key}, ...]}`` -> ScoredSets; empty texts/prompts counted,
    a text repeated within a row merged into one response with the mean score (:func:`merge_repeated_responses`
    says why) and counted, and rows left with fewer than 2 scored responses noted (pairing skips them; an error about
    no pairs names them)."""
    rep = LoadReport(source=source)
    out: list[ScoredSet] = []
    for i, row in enumerate(ds):
        rep.rows_in += 1
        prompt = _text(row["instruction"])
        if not prompt.strip():
            rep.rows_skipped_empty += 1
            rep.note(f"row {i}: empty instruction")
            continue
        responses: list[str] = []
        scores: list[float] = []
        for entry in entries(row, i):
            text = _text(_field(entry, text_key, what=what, source=source, row=i, column=column, expected=expected))
            score = _as_score(_field(entry, score_key, what=what, source=source, row=i, column=column,
                                     expected=expected))
            if not text.strip():
                rep.responses_dropped_empty += 1
                continue
            responses.append(text)
            scores.append(score)
        responses, scores, merged = merge_repeated_responses(responses, scores)
        rep.responses_merged_repeated += merged
        _note_unpairable(rep, i, scores, score_key)
        out.append(ScoredSet(prompt, tuple(responses), tuple(scores)))
    rep.items_out = len(out)
    _finish(rep, report)
    return out


def _note_unpairable(rep: LoadReport, row: int, scores: list[float], score_key: str) -> None:
    usable = sum(math.isfinite(s) for s in scores)
    if usable < 2:
        missing = len(scores) - usable
        why = f"; {missing} {score_key!r} value(s) are NaN or not numbers" if missing else ""
        rep.note(f"row {row}: {usable} non-empty response(s) with a numeric {score_key!r} (a pair needs 2){why}")


def _entry_list(value: Any, *, what: str, source: str, row: int, column: str, expected: str) -> list:
    """A row's list of scored responses; null counts as none, anything else that is not a list is an error."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{what}: {source} row {row}: column {column!r} is a {type(value).__name__}, not a list of "
                        f"responses; expected {expected}")
    return value


def load_alpaca_eval_prefs(
    path: str | Path,
    *,
    include_reference: bool = False,
    split: str = "train",
    report: LoadReport | None = None,
) -> list[ScoredSet]:
    """AlpacaEval multi-response preferences (``prefs-8models.jsonl.gz``) as ScoredSets.

    prompt = ``instruction``, responses = ``[r["text"]]``, scores = ``[r["score"]]``. Each score is the judge's
    probability that the response beats the reference answer, i.e. exactly OSP's "win probability against an
    anchor", so pair these with ``strength="probability"``. ``include_reference=True`` appends the reference
    answer itself with score 0.5 (it ties with itself), making it a candidate in the ranking.

    Empty response texts are dropped and counted; rows with an empty instruction are skipped and counted.
    """
    what = "load_alpaca_eval_prefs"
    ds = load_rows(path, split, what=what, expected=ALPACA_EXPECTED)
    source = str(path)
    columns = ("instruction", "responses") + (("reference",) if include_reference else ())
    require_columns(ds, columns, what=what, source=source, expected=ALPACA_EXPECTED)

    def entries(row, i):
        listed = list(_entry_list(row["responses"], what=what, source=source, row=i, column="responses",
                                  expected=ALPACA_EXPECTED))
        if include_reference:
            ref = row["reference"]
            listed.append({"text": _field(ref, "text", what=what, source=source, row=i, column="reference",
                                          expected=ALPACA_EXPECTED), "score": 0.5})
        return listed

    return _scored_sets(ds, entries, what=what, source=source, expected=ALPACA_EXPECTED, column="responses",
                        text_key="text", score_key="score", report=report)


ULTRAFEEDBACK_EXPECTED = '{"instruction": str, "completions": [{"response": str, "<score_key>": float}, ...]}'


def load_ultrafeedback(
    name_or_path: str,
    split: str = "train",
    *,
    score_key: str = "overall_score",
    report: LoadReport | None = None,
) -> list[ScoredSet]:
    """UltraFeedback-shaped data (a Hub id such as ``"openbmb/UltraFeedback"`` or a local JSON/JSONL/parquet file).

    Rows ``{"instruction", "completions": [{"response", <score_key>}]}``. UltraFeedback's ``overall_score`` is a
    1–10 critique rating, not a probability: pair with ``strength="reward"`` (and a temperature on that scale) or
    ``"hard"``. Missing/non-numeric scores become NaN (dropped and counted by ``build_pairs``); empty responses
    are dropped and empty instructions skipped, both counted.
    """
    what = "load_ultrafeedback"
    expected = ULTRAFEEDBACK_EXPECTED.replace("<score_key>", score_key)
    ds = load_rows(name_or_path, split, what=what, expected=expected)
    source = str(name_or_path)
    require_columns(ds, ("instruction", "completions"), what=what, source=source, expected=expected)

    def entries(row, i):
        return _entry_list(row["completions"], what=what, source=source, row=i, column="completions",
                           expected=expected)

    return _scored_sets(ds, entries, what=what, source=source, expected=expected,
                        column="completions", text_key="response", score_key=score_key, report=report)


# ---------------------------------------------------------------------------------------------------------------------
# HH-RLHF
# ---------------------------------------------------------------------------------------------------------------------


def split_hh_dialogue(text: str) -> tuple[str, str]:
    """Split an HH-RLHF dialogue into (prompt, final assistant reply).

    The prompt is the raw dialogue up to and including the last ``"\\n\\nAssistant:"``, exactly as in the data
    (leading ``"\\n\\nHuman: "`` and all earlier turns kept); the reply is what follows, stripped of surrounding
    whitespace (HH puts a space, sometimes two, after the colon). Raises ValueError when there is no assistant turn.
    """
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        shown = text[:60] + ("…" if len(text) > 60 else "")
        raise ValueError(f"not an HH-RLHF dialogue (no {HH_ASSISTANT!r} turn): {shown!r}")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:].strip()


def hh_reply_has_human_turn(reply: str) -> bool:
    """Whether an HH reply goes on into a ``Human:`` turn: at its start, at a line's start or after a sentence.

    Why these places: HH replies also write the user's turn without the blank line of a real turn marker
    (``"Human: How do I steal..."`` as the whole reply, or ``"Well that doesn't seem like a good idea.  Human:  Why
    not?"``), which ``"\\n\\nHuman:"`` alone missed (29 rows of harmless-base-test); trained on, a policy learns to
    write the user's next turn. Mid-sentence the word is a quote (``"[Click to copy: Human: ...]"``) and stays."""
    return HH_HUMAN_TURN.search(reply) is not None


HH_HELDOUT_FRACTION = 0.2  # the share of HH conversations every stage holds out of training (the suites draw from it)


def hh_conversation_root(prompt: str) -> str:
    """The conversation an HH-RLHF prompt belongs to: its text before the first ``"\\n\\nAssistant:"`` (the opening
    human turn).

    Why: HH stores one transcript cut at several depths as separate rows, so a shorter row's prompt is a prefix of a
    longer row's, and the longer one goes on with one of the shorter row's replies. Every depth of a conversation
    shares this root, so a split keyed on it keeps the whole conversation on one side. Different conversations that
    open with the same request share it too and stay together, which a held-out split wants as well."""
    return prompt.split(HH_ASSISTANT, 1)[0]


def hh_is_heldout(prompt: str, heldout_fraction: float) -> bool:
    """Deterministic split membership from the sha256 of the prompt's conversation root
    (:func:`hh_conversation_root`): every row of one conversation, at whatever depth HH cut it, lands on the same side
    (a hash of the whole prompt put 32 of the harmless-base test file's 464 held-out pairs beside a training row of
    their own conversation), independently of row order, seeds or machines."""
    root = hh_conversation_root(prompt)
    bucket = int.from_bytes(hashlib.sha256(root.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return bucket < heldout_fraction


HH_EXPECTED = '{"chosen": str, "rejected": str}, each a whole "\\n\\nHuman: …\\n\\nAssistant: …" dialogue'


def load_hh_rlhf_pairs(
    path_or_id: str | Path,
    *,
    split: Literal["train", "heldout"],
    heldout_fraction: float = HH_HELDOUT_FRACTION,
    source_split: str = "train",
    data_dir: str | None = None,
    report: LoadReport | None = None,
) -> list[PreferencePair]:
    """HH-RLHF ``{"chosen", "rejected"}`` dialogues as hard-labelled pairs (strength 1.0) for one part of a
    deterministic train/held-out split.

    The prompt is kept as the **raw multi-turn dialogue string** ending in ``"\\n\\nAssistant:"`` (see
    :func:`split_hh_dialogue`); ``to_trl_rows`` puts it into a single user message. Why not parse the turns into
    chat messages: HH's turn markers also occur inside replies, so re-segmenting would guess, and the raw form is
    what the original RLHF work trained on. chosen/rejected are the final assistant replies.

    Only ~20% of conversations are held out (``heldout_fraction``), chosen by :func:`hh_is_heldout` on the prompt's
    conversation root, so the two parts never share a prompt, nor a conversation cut at another depth.
    ``source_split`` is the split read from the source (a local file is read as that one split); ``data_dir``
    selects a tranche of the Hub dataset, e.g. ``"harmless-base"`` of ``"Anthropic/hh-rlhf"``.

    Skipped and counted: rows whose chosen and rejected disagree on the prompt, lack an assistant turn or go on
    after it (a ``Human:`` turn in a reply, :func:`hh_reply_has_human_turn`: trained on, a policy would learn to
    write the user's next turn) (malformed), an empty reply or a prompt with no text but its turn markers (empty),
    identical replies (identical).
    """
    what = "load_hh_rlhf_pairs"
    if split not in ("train", "heldout"):
        raise ValueError(f"{what}: split must be 'train' or 'heldout', got {split!r}")
    if not (0.0 <= heldout_fraction <= 1.0):
        raise ValueError(f"{what}: heldout_fraction must be in [0, 1], got {heldout_fraction}")
    hub_kwargs = {"data_dir": data_dir} if data_dir else {}
    ds = load_rows(path_or_id, source_split, what=what, expected=HH_EXPECTED, **hub_kwargs)
    source = str(path_or_id)
    require_columns(ds, ("chosen", "rejected"), what=what, source=source, expected=HH_EXPECTED)
    want_heldout = split == "heldout"
    rep = LoadReport(source=f"{source} [{split}]")
    out: list[PreferencePair] = []
    for row in ds:
        rep.rows_in += 1
        chosen_text, rejected_text = _text(row["chosen"]), _text(row["rejected"])
        try:
            prompt, chosen = split_hh_dialogue(chosen_text)
            prompt_r, rejected = split_hh_dialogue(rejected_text)
        except ValueError:
            rep.rows_skipped_malformed += 1
            continue
        if prompt != prompt_r or hh_reply_has_human_turn(chosen) or hh_reply_has_human_turn(rejected):
            rep.rows_skipped_malformed += 1
            continue
        if not chosen or not rejected or not prompt.replace(HH_HUMAN, "").replace(HH_ASSISTANT, "").strip():
            rep.rows_skipped_empty += 1
            continue
        if chosen == rejected:
            rep.rows_skipped_identical += 1
            continue
        if hh_is_heldout(prompt, heldout_fraction) != want_heldout:
            rep.rows_other_split += 1
            continue
        out.append(PreferencePair(prompt, chosen, rejected, 1.0))
    rep.items_out = len(out)
    _finish(rep, report)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# SFT conversations: TRL's SFT formats, or the preferred side of preference data
# ---------------------------------------------------------------------------------------------------------------------

SFT_ROLES = ("system", "user", "assistant", "tool")

TRL_SFT_EXPECTED = (
    'a "messages" column of chat turns [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...], or '
    '"prompt"/"completion" columns (lists of chat turns, or strings taken as one user and one assistant turn)'
)
ULTRAFEEDBACK_SFT_EXPECTED = (
    'UltraFeedback-binarized rows with a "chosen" (or "messages") column of chat turns, e.g. '
    "HuggingFaceH4/ultrafeedback_binarized split train_sft, or raw UltraFeedback rows " + ULTRAFEEDBACK_EXPECTED
)


def _require_rows(ds, *, what: str, source: str, split: str, expected: str) -> None:
    if len(ds) == 0:
        raise DataError(f"{what}: {source} has no rows in split {split!r}; expected rows with {expected} (check "
                        "dataset.path and dataset.split)")


def _conversation(value: Any, *, what: str, source: str, row: int, column: str) -> list[dict[str, str]]:
    """``value`` as ``[{"role", "content"}, ...]`` (other keys of a turn dropped); anything else raises, naming the
    source, row and column and what to change."""
    where = f"{what}: {source} row {row}, column {column!r}"
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of chat turns, got {type(value).__name__}: "
                        f"{str(value)[:80]!r}; expected {TRL_SFT_EXPECTED}")
    turns = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") is None or "content" not in turn:
            sharegpt = isinstance(turn, dict) and "from" in turn and "value" in turn
            fix = ("ShareGPT turns: rename from -> role, value -> content, human -> user, gpt -> assistant"
                   if sharegpt else f"expected {TRL_SFT_EXPECTED}")
            raise DataError(f"{where}: a turn without role/content: {str(turn)[:80]!r}; {fix}")
        role, content = turn["role"], turn["content"]
        if role not in SFT_ROLES:
            raise DataError(f"{where}: unknown role {role!r} (chat templates know {', '.join(SFT_ROLES)}); rename it "
                            "in the data, e.g. human -> user, gpt/bot -> assistant")
        if not isinstance(content, str):
            raise DataError(f"{where}: the {role} turn's content is {type(content).__name__}, not a string; give "
                            "text content (multimodal content parts are not supported)")
        turns.append({"role": role, "content": content})
    return turns


def _with_reply(turns: list[dict[str, str]], rep: LoadReport, *, what: str, source: str, row: int, column: str,
                fix: str) -> list[dict[str, str]] | None:
    """The conversation if an assistant turn has text; None (counted as empty) if every assistant turn is blank;
    a ValueError if there is no assistant turn at all (the data is in the wrong shape, not merely noisy)."""
    replies = [t["content"] for t in turns if t["role"] == "assistant"]
    if not replies:
        roles = [t["role"] for t in turns]
        raise DataError(f"{what}: {source} row {row}, column {column!r}: no assistant turn (roles: {roles}); SFT "
                        f"trains on the assistant's replies, so every conversation needs one; {fix}")
    if not any(r.strip() for r in replies):
        rep.rows_skipped_empty += 1
        return None
    return turns


def _conversations_out(out: list, rep: LoadReport, given: LoadReport | None, *, what: str, fix: str) -> list:
    rep.items_out = len(out)
    _finish(rep, given)
    if not out:
        raise DataError(f"{what}: no usable conversation in {rep.source} ({rep.summary()}); {fix}")
    return out


def load_sft_conversations(
    name_or_path: str | Path, split: str = "train", *, report: LoadReport | None = None
) -> list[list[dict[str, str]]]:
    """Conversations from a dataset already in one of TRL's conversational SFT formats.

    A ``messages`` column is taken as is (turns reduced to role/content); ``prompt``/``completion`` rows become
    ``prompt + completion`` (a string prompt is one user turn, a string completion one assistant turn), because
    TRL's assistant-only loss needs ``messages`` (with assistant_only_loss every assistant turn is trained, also
    earlier ones in a multi-turn prompt). Rows whose assistant turns are all blank are skipped and counted; a row
    without any assistant turn, an unknown role or non-text content raises with the row and column.
    """
    what = "load_sft_conversations"
    ds = load_rows(name_or_path, split, what=what, expected=TRL_SFT_EXPECTED)
    source = str(name_or_path)
    _require_rows(ds, what=what, source=source, split=split, expected=TRL_SFT_EXPECTED)
    columns = ds.column_names
    if "messages" in columns:
        used = ["messages"]
    elif "prompt" in columns and "completion" in columns:
        used = ["prompt", "completion"]
    else:
        hints = {
            "text": "plain-text (language modelling) rows are not supported: the sft stage trains on conversations",
            "conversations": "ShareGPT data: rename the column to messages and its turns to role/content",
            "chosen": "preference data: use dataset.source hh_rlhf or ultrafeedback, which take the chosen side",
        }
        hint = next((f" ({h})" for c, h in hints.items() if c in columns), "")
        raise DataError(f"{what}: {source} has neither a 'messages' column nor 'prompt'/'completion' columns "
                        f"(columns: {columns}){hint}; expected {TRL_SFT_EXPECTED}")
    rep = LoadReport(source=source)
    fix = ("the last assistant turn is the reply to learn" if used == ["messages"]
           else "the completion column holds the assistant's reply")
    out: list[list[dict[str, str]]] = []
    for i, row in enumerate(ds.select_columns(used).to_list()):
        rep.rows_in += 1
        if used == ["messages"]:
            turns = _conversation(row["messages"], what=what, source=source, row=i, column="messages")
        else:
            prompt, completion = row["prompt"], row["completion"]
            turns = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                     else _conversation(prompt, what=what, source=source, row=i, column="prompt"))
            turns += ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                      else _conversation(completion, what=what, source=source, row=i, column="completion"))
        kept = _with_reply(turns, rep, what=what, source=source, row=i, column=used[-1], fix=fix)
        if kept is not None:
            out.append(kept)
    return _conversations_out(out, rep, report, what=what, fix="every row's assistant replies are empty")


def load_ultrafeedback_chosen(
    name_or_path: str | Path,
    split: str = "train",
    *,
    score_key: str = "overall_score",
    report: LoadReport | None = None,
) -> list[list[dict[str, str]]]:
    """The preferred conversation of each UltraFeedback record, for SFT.

    UltraFeedback-binarized (``HuggingFaceH4/ultrafeedback_binarized``, splits ``train_sft``/``train_prefs``): the
    ``chosen`` column (``messages`` when there is no ``chosen``), already a list of chat turns. Raw UltraFeedback
    (``openbmb/UltraFeedback``: ``instruction``/``completions``, read by :func:`load_ultrafeedback`): the instruction
    as the user turn and its best-rated completion (``score_key``; the first on ties) as the reply; records with no
    scored non-empty completion are skipped and counted.
    """
    what = "load_ultrafeedback_chosen"
    ds = load_rows(name_or_path, split, what=what, expected=ULTRAFEEDBACK_SFT_EXPECTED)
    source = str(name_or_path)
    _require_rows(ds, what=what, source=source, split=split, expected=ULTRAFEEDBACK_SFT_EXPECTED)
    column = next((c for c in ("chosen", "messages") if c in ds.column_names), None)
    rep = LoadReport(source=f"{source} [chosen]")
    out: list[list[dict[str, str]]] = []
    if column is not None:
        fix = f"the {column!r} conversation must end in the preferred assistant reply"
        for i, row in enumerate(ds.select_columns([column]).to_list()):
            rep.rows_in += 1
            turns = _conversation(row[column], what=what, source=source, row=i, column=column)
            kept = _with_reply(turns, rep, what=what, source=source, row=i, column=column, fix=fix)
            if kept is not None:
                out.append(kept)
    elif "instruction" in ds.column_names and "completions" in ds.column_names:
        scored = load_ultrafeedback(name_or_path, split, score_key=score_key)
        rep.rows_in = len(ds)
        rep.rows_skipped_empty = len(ds) - len(scored)  # empty instructions, skipped by load_ultrafeedback
        for item in scored:
            ranked = [(s, r) for s, r in zip(item.scores, item.responses, strict=True) if math.isfinite(s)]
            if not ranked:
                rep.rows_skipped_empty += 1  # no non-empty completion with a score: nothing to prefer
                continue
            best = max(ranked, key=lambda sr: sr[0])[1]  # max keeps the first of equal scores
            out.append([{"role": "user", "content": item.prompt}, {"role": "assistant", "content": best}])
    else:
        raise DataError(f"{what}: {source} has no 'chosen'/'messages' column and no 'instruction'/'completions' "
                        f"columns (columns: {ds.column_names}); expected {ULTRAFEEDBACK_SFT_EXPECTED}")
    return _conversations_out(out, rep, report, what=what, fix="no record has a non-empty preferred reply")


def load_hh_rlhf_chosen(
    path_or_id: str | Path,
    *,
    source_split: str = "train",
    heldout_fraction: float = HH_HELDOUT_FRACTION,
    data_dir: str | None = None,
    report: LoadReport | None = None,
) -> list[list[dict[str, str]]]:
    """The chosen side of the HH-RLHF pairs of :func:`load_hh_rlhf_pairs` (its ``"train"`` part, so the held-out
    prompts stay unseen), for SFT: ``[user: raw dialogue up to the last "\\n\\nAssistant:", assistant: chosen
    reply]``, the same prompt the preference stages train on (``to_trl_rows``). Rows that adapter skips (malformed,
    empty, identical replies) are skipped here too."""
    what = "load_hh_rlhf_chosen"
    rep = report if report is not None else LoadReport()
    pairs = load_hh_rlhf_pairs(path_or_id, split="train", heldout_fraction=heldout_fraction,
                               source_split=source_split, data_dir=data_dir, report=rep)
    if not pairs:
        raise DataError(f"{what}: no usable dialogue in {path_or_id} split {source_split!r} ({rep.summary()}); "
                        f"expected rows {HH_EXPECTED}")
    return [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.chosen}] for p in pairs]


def load_sft_source(source: str, path: str | Path, split: str = "train", *,
                    report: LoadReport | None = None) -> list[list[dict[str, str]]]:
    """The conversations of an sft stage's real ``dataset.source``: one dispatch, so the stage and the runner's
    preflight read a dataset the same way (the stage adds the seeded ``limit``)."""
    if source == "trl":
        return load_sft_conversations(path, split, report=report)
    if source == "hh_rlhf":
        return load_hh_rlhf_chosen(path, source_split=split, report=report)
    if source == "ultrafeedback":
        return load_ultrafeedback_chosen(path, split, report=report)
    raise ValueError(f"unknown SFT data source {source!r}")
