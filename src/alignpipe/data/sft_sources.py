"""SFT conversations: TRL's SFT formats, or the preferred side of preference data (UltraFeedback, HH-RLHF), as
lists of chat turns, and :func:`load_sft_source`, the one dispatch the sft stage and the runner's preflight share.
Apart from the preference loaders because it builds on them (:mod:`~alignpipe.data.scored_sources`,
:mod:`~alignpipe.data.hh_rlhf`) and only the SFT side needs it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from alignpipe.data.errors import DataError, LoadReport
from alignpipe.data.hh_rlhf import HH_EXPECTED, HH_HELDOUT_FRACTION, load_hh_rlhf_pairs
from alignpipe.data.rows import _finish, load_rows
from alignpipe.data.scored_sources import ULTRAFEEDBACK_EXPECTED, load_ultrafeedback

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
