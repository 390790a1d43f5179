"""The training pairs of a preference stage, from the recipe's ``dataset`` block (synthetic task or real data).

One dispatch on ``source`` with a final raise: each real source goes through its adapter
(:mod:`alignpipe.data.adapters`) and, for multi-response data, through ranked pairing
(:mod:`alignpipe.data.pairing`), so every stage reads real data the same way.
"""

from __future__ import annotations

import logging
import random

from datasets import Dataset

from alignpipe.data.adapters import (
    LoadReport,
    load_alpaca_eval_prefs,
    load_hh_rlhf_pairs,
    load_rows,
    load_ultrafeedback,
    require_columns,
)
from alignpipe.data.pairing import PreferencePair, build_pairs, harden, to_trl_rows
from alignpipe.data.synthetic import preference_dataset as synthetic_preference_dataset
from alignpipe.recipe import DataSpec, PreferenceDataSpec

log = logging.getLogger("alignpipe")

TRL_COLUMNS = ("prompt", "chosen", "rejected")


def _message_text(value, *, source: str, row: int, column: str) -> str:
    """The text of a TRL field (a string or a list of messages); anything else is an error naming the row."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in value
    ):
        return "".join(m["content"] for m in value)
    raise ValueError(
        f"{source}: row {row}, column {column!r}: expected a string or a list of {{'role', 'content'}} messages "
        f"(TRL preference format), got {type(value).__name__}: {str(value)[:80]!r}"
    )


def explicit_prompt(row: dict, *, source: str, index: int) -> dict:
    """A row with a string ``prompt`` beside whole conversations as ``chosen``/``rejected`` (UltraFeedback-binarized's
    ``train_prefs``) in TRL's conversational format: the shared turns before the last reply become the prompt.

    Why: TRL 1.16's DPOTrainer fails on that mix (it concatenates the string prompt with a list); other rows pass
    through unchanged.
    """
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if not (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list) and chosen
            and rejected):
        return row
    if chosen[:-1] != rejected[:-1]:
        raise ValueError(f"{source}: row {index}: chosen and rejected are conversations that differ before their last "
                         "turn, so they share no prompt; keep one common history and differing final replies")
    return {**row, "prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def clean_trl_rows(rows: list[dict], source: str) -> list[dict]:
    """Drop pairs that cannot teach a preference (empty texts, chosen == rejected), counting them in the log;
    wrongly typed fields raise before any model loads. Whole-conversation rows get an explicit prompt first."""
    kept, empty, identical = [], 0, 0
    rows = [explicit_prompt(row, source=source, index=i) for i, row in enumerate(rows)]
    for i, row in enumerate(rows):
        texts = {c: _message_text(row[c], source=source, row=i, column=c) for c in TRL_COLUMNS}
        if not texts["chosen"].strip() or not texts["rejected"].strip():
            empty += 1
        elif texts["chosen"] == texts["rejected"]:
            identical += 1
        else:
            kept.append(row)
    log.info("%s: %d pairs kept; skipped %d with an empty response and %d with chosen == rejected",
             source, len(kept), empty, identical)
    if not kept:
        raise ValueError(f"{source}: none of its {len(rows)} pairs is usable ({empty} empty, {identical} identical)")
    return kept


def seeded_limit(rows: list, limit: int | None, seed: int) -> list:
    """At most ``limit`` rows, picked by a shuffle seeded with the recipe seed (the same pick in every stage)."""
    if limit is None or len(rows) <= limit:
        return rows
    picked = list(rows)
    random.Random(f"limit:{seed}").shuffle(picked)
    return picked[:limit]


def _pairs_from_scored_sets(spec: PreferenceDataSpec, sets) -> list[PreferencePair]:
    pairs, report = build_pairs(sets, method=spec.pairing, strength=spec.strength, temperature=spec.temperature,
                                score_clip=spec.score_clip if spec.strength == "probability" else None)
    log.info("%s: %s", spec.path, report.summary())
    if not pairs:
        raise ValueError(f"{spec.path}: no preference pairs could be built ({report.summary()}); check the scores "
                         "and the dataset.pairing / dataset.strength settings")
    return pairs


def preference_pairs_for(spec: PreferenceDataSpec, data: DataSpec, seed: int) -> Dataset:
    """A TRL preference ``Dataset`` (prompt/chosen/rejected, plus ``preference`` for soft labels)."""
    if spec.source == "synthetic":
        return synthetic_preference_dataset(data, seed)
    report = LoadReport()
    if spec.source == "alpaca_eval":
        pairs = _pairs_from_scored_sets(spec, load_alpaca_eval_prefs(spec.path, split=spec.split, report=report))
    elif spec.source == "ultrafeedback":
        pairs = _pairs_from_scored_sets(spec, load_ultrafeedback(spec.path, spec.split, report=report))
    elif spec.source == "hh_rlhf":
        pairs = load_hh_rlhf_pairs(spec.path, split="train", report=report)
    elif spec.source == "trl":
        rows = load_rows(spec.path, spec.split, what="dataset.path", expected="prompt/chosen/rejected columns")
        require_columns(rows, TRL_COLUMNS, what="dataset.path", source=spec.path,
                        expected="prompt/chosen/rejected columns (TRL preference format)")
        cleaned = clean_trl_rows(rows.select_columns(list(TRL_COLUMNS)).to_list(), spec.path)
        return Dataset.from_list(seeded_limit(cleaned, spec.limit, seed))
    else:
        raise ValueError(f"unknown preference data source {spec.source!r}")
    if not spec.soft_labels:
        pairs = harden(pairs)
    rows = to_trl_rows(seeded_limit(pairs, spec.limit, seed))
    if spec.source == "hh_rlhf" or not spec.soft_labels:
        rows = [{k: v for k, v in row.items() if k != "preference"} for row in rows]
    return Dataset.from_list(rows)
