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


def _limit(rows: list, limit: int | None, seed: int) -> list:
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
        return Dataset.from_list(_limit(rows.select_columns(list(TRL_COLUMNS)).to_list(), spec.limit, seed))
    else:
        raise ValueError(f"unknown preference data source {spec.source!r}")
    if not spec.soft_labels:
        pairs = harden(pairs)
    rows = to_trl_rows(_limit(pairs, spec.limit, seed))
    if spec.source == "hh_rlhf" or not spec.soft_labels:
        rows = [{k: v for k, v in row.items() if k != "preference"} for row in rows]
    return Dataset.from_list(rows)
