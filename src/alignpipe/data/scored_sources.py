"""Scored multi-response sets: the synthetic task's scored response sets, AlpacaEval's multi-response preferences
and UltraFeedback, as :class:`~alignpipe.data.pairing.ScoredSet` lists for ranked pairing. Apart from the other
loaders because these datasets score several responses per prompt; HH-RLHF's pairs are in
:mod:`~alignpipe.data.hh_rlhf`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from alignpipe.data.errors import DataError, LoadReport
from alignpipe.data.pairing import ScoredSet, merge_repeated_responses
from alignpipe.data.rows import _as_score, _field, _finish, _text, load_rows, require_columns


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
