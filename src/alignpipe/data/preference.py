"""The training pairs of a preference stage, from the recipe's ``dataset`` block (synthetic task or real data).

One dispatch on ``source`` with a final raise: each real source goes through its adapter
(:mod:`~alignpipe.data.scored_sources`, :mod:`~alignpipe.data.hh_rlhf`, :mod:`~alignpipe.data.sft_sources`) and, for
multi-response data, through ranked pairing (:mod:`alignpipe.data.pairing`), so every stage reads real data the same
way.
"""

from __future__ import annotations

import hashlib
import logging
import random

from datasets import Dataset

from alignpipe.data.errors import DataError, LoadReport
from alignpipe.data.hh_rlhf import hh_conversation_root, load_hh_rlhf_pairs
from alignpipe.data.pairing import PairingReport, PreferencePair, build_pairs, harden, plain_text, to_trl_rows
from alignpipe.data.rows import load_rows, require_columns
from alignpipe.data.scored_sources import load_alpaca_eval_prefs, load_ultrafeedback
from alignpipe.data.sft_sources import load_sft_source
from alignpipe.data.synthetic import preference_dataset as synthetic_preference_dataset
from alignpipe.recipe import DataSpec, PreferenceDataSpec, RewardStage, SFTDataSpec

log = logging.getLogger("alignpipe")

TRL_COLUMNS = ("prompt", "chosen", "rejected")
PREFERENCE = "preference"  # soft pair strength P(chosen > rejected): what the soft-preference and ensemble losses read


def is_reward_heldout(prompt: str, fraction: float) -> bool:
    """Whether a reward stage with ``heldout_fraction = fraction`` holds ``prompt`` out of training.

    A threshold on a hash, so a prompt held out at ``fraction`` is held out at every larger one (the reward-model
    suites rely on it). Salted, so it is independent of any split the data adapter already made with a plain hash
    (HH-RLHF's 80/20 split keeps conversations whose unsalted root bucket is >= 0.2; reusing that hash would hold out
    nothing). ``prompt`` is the text to hash: :func:`reward_split_key` says which for a stage's pairs."""
    digest = hashlib.sha256(f"reward-heldout:{prompt}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < fraction


def reward_split_key(prompt: str, source: str) -> str:
    """The text a reward stage's held-out split hashes for a pair on ``prompt`` from a ``source`` dataset: an HH-RLHF
    prompt's conversation root (:func:`~alignpipe.data.hh_rlhf.hh_conversation_root`), any other prompt whole.

    Why: HH stores one conversation cut at several depths as separate rows, and a hash of the whole prompt put a
    conversation's shorter row on one side and its longer row, which goes on with the shorter one's rejected reply,
    on the other (21 of the 226 held-out pairs of recipes/hh-rlhf/reward-ensemble-minilm.yaml)."""
    return hh_conversation_root(prompt) if source == "hh_rlhf" else prompt


def reward_heldout_rows(stage: RewardStage, rows: Dataset) -> list[bool]:
    """Which of a reward stage's pairs it holds out (:func:`is_reward_heldout` of each prompt's
    :func:`reward_split_key`); a DataError when either side of the split is empty.

    Why: the stage trains on one side and scores the other, so it refuses such a split; preflight and ``alignpipe
    data`` call this too, so the same pairs are refused before any stage runs."""
    source = stage.dataset.source
    heldout = [is_reward_heldout(reward_split_key(plain_text(prompt), source), stage.heldout_fraction)
               for prompt in rows["prompt"]]
    if sum(heldout) in (0, len(heldout)):
        spec = stage.dataset
        source, more = (("the synthetic task", "a larger data.n_pairs") if spec.source == "synthetic" else
                        (spec.path, f"a larger stages.{stage.name}.dataset.limit") if spec.limit is not None else
                        (spec.path, "more rows in the file"))
        raise DataError(
            f"{source}: its {len(heldout)} pairs split into {len(heldout) - sum(heldout)} train / "
            f"{sum(heldout)} held-out by prompt hash (heldout_fraction {stage.heldout_fraction}), and the reward stage "
            f"needs both non-empty; give it more pairs ({more}) or another stages.{stage.name}.heldout_fraction")
    return heldout


def _message_text(value, *, source: str, row: int, column: str) -> str:
    """The text of a TRL field (a string or a list of messages); anything else is an error naming the row."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in value
    ):
        return "".join(m["content"] for m in value)
    got = "no value (missing or null)" if value is None else f"{type(value).__name__}: {str(value)[:80]!r}"
    raise DataError(
        f"{source}: row {row}, column {column!r}: expected a string or a list of {{'role', 'content'}} messages "
        f"(TRL preference format), got {got}; fix or drop that row"
    )


def explicit_prompt(row: dict, *, source: str, index: int) -> dict:
    """A row with a string ``prompt`` beside whole conversations as ``chosen``/``rejected`` (UltraFeedback-binarized's
    ``train_prefs``) in TRL's conversational format: the shared turns before the last reply become the prompt (or, for
    single-message replies, the string prompt becomes the user turn). A message-list prompt beside plain-string
    replies gets its replies wrapped as assistant messages.

    Why: TRL 1.16's DPO and reward trainers fail on either mix (they concatenate prompt and reply, a string with a
    list); other rows pass through unchanged.
    """
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, list) and isinstance(chosen, str) and isinstance(rejected, str):
        # a conversational prompt beside plain replies: TRL would concatenate a list and a string
        return {**row, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    if not (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list) and chosen
            and rejected):
        return row
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{source}: row {index}: chosen and rejected are conversations that differ before their last "
                        "turn, so they share no prompt; keep one common history and differing final replies")
    history = chosen[:-1]  # single-message replies carry no history: the string prompt is the user turn
    return {**row, "prompt": history or [{"role": "user", "content": prompt}], "chosen": chosen[-1:],
            "rejected": rejected[-1:]}


def _one_format(row: dict, *, source: str, index: int) -> None:
    """Raise a DataError when, after :func:`explicit_prompt`, a row still mixes strings and message lists.

    Why: TRL 1.16 applies the chat template to a row only when its fields are messages, and otherwise concatenates
    prompt and reply as text, so a mix fails (or is measured wrongly) only once the model is loaded."""
    kinds = {c: "a string" if isinstance(row[c], str) else "a list of messages" for c in TRL_COLUMNS}
    if len(set(kinds.values())) > 1:
        got = ", ".join(f"{c} is {kind}" for c, kind in kinds.items())
        raise DataError(f"{source}: row {index}: {got}; prompt, chosen and rejected must be all strings or all lists "
                        "of {'role', 'content'} messages (TRL preference format); convert that row to one format "
                        "or drop it")


def clean_trl_rows(rows: list[dict], source: str, *, report: LoadReport | None = None) -> list[dict]:
    """Drop pairs that cannot teach a preference (empty texts, chosen == rejected), counting them in the log and in
    ``report`` when given; wrongly typed fields raise before any model loads. Whole-conversation rows get an explicit
    prompt first."""
    kept, empty, identical = [], [], []
    rows = [explicit_prompt(row, source=source, index=i) for i, row in enumerate(rows)]
    for i, row in enumerate(rows):
        texts = {c: _message_text(row[c], source=source, row=i, column=c) for c in TRL_COLUMNS}
        _one_format(row, source=source, index=i)
        if not texts["chosen"].strip() or not texts["rejected"].strip():
            empty.append(i)
        elif texts["chosen"] == texts["rejected"]:
            identical.append(i)
        else:
            kept.append(row)
    log.info("%s: %d pairs kept; skipped %d with an empty response and %d with chosen == rejected",
             source, len(kept), len(empty), len(identical))
    if report is not None:
        report.__dict__.update(LoadReport(source=source, rows_in=len(rows), rows_skipped_empty=len(empty),
                                          rows_skipped_identical=len(identical), items_out=len(kept)).__dict__)
    if not kept:
        raise DataError(f"{source}: none of its {len(rows)} pairs is usable: {_rows(empty)} an empty chosen or "
                        f"rejected response, {_rows(identical)} chosen == rejected; every pair needs two different, "
                        "non-empty responses (fix those rows or point dataset.path at the intended file)")
    return kept


def _strength(value, *, source: str, row: int) -> float:
    """A `preference` cell as a probability (null = 1, as the soft-DPO trainer reads it); anything else raises.
    Text is read as the number it spells, an empty cell as null: a CSV file's cells are all text."""
    if isinstance(value, str):
        try:
            value = float(value) if value.strip() else None
        except ValueError:
            pass
    if value is None:
        return 1.0
    if isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value)
    raise DataError(f"{source}: row {row}, column {PREFERENCE!r}: expected P(chosen preferred over rejected), "
                    f"a number in [0, 1] or null (= 1), got {value!r}; fix that row, or set dataset.soft_labels: "
                    "false to train on hard labels")


def check_soft_targets(stage, pairs: Dataset) -> None:
    """Raise a DataError when loaded pairs carry soft strengths (a `preference` column, e.g. a trl file's own) that
    the stage cannot train on: the recipe check sees this only for scored sources, where the column is certain.
    ``stage`` is a DPOStage or RewardStage (``soft_strength_problems``)."""
    if PREFERENCE not in pairs.column_names:
        return
    problems = stage.soft_strength_problems()
    if problems:
        details = "; ".join(f"stages.{stage.name}.{'.'.join(key)}: {msg}" for key, msg in problems)
        raise DataError(f"{stage.dataset.path}: its {PREFERENCE!r} column gives the pairs soft strengths, which "
                        f"this stage cannot train on ({details})")


def _rows(indices: list[int]) -> str:
    """'2 rows (0, 3) have' / 'no row has', for messages about skipped rows."""
    if not indices:
        return "no row has"
    shown = ", ".join(map(str, indices[:5])) + (", ..." if len(indices) > 5 else "")
    return f"{len(indices)} row{'s' if len(indices) > 1 else ''} ({shown}) {'have' if len(indices) > 1 else 'has'}"


def sft_conversations_for(spec: SFTDataSpec, seed: int, *,
                          report: LoadReport | None = None) -> list[list[dict[str, str]]]:
    """The conversations of a real SFT ``dataset`` after its seeded ``limit``: what the stage trains on and what the
    runner's preflight checks. ``report``, when given, is filled with what the adapter read and skipped."""
    return seeded_limit(load_sft_source(spec.source, spec.path, spec.split, report=report), spec.limit, seed)


def seeded_limit(rows: list, limit: int | None, seed: int) -> list:
    """At most ``limit`` rows, picked by a shuffle seeded with the recipe seed (the same pick in every stage)."""
    if limit is None or len(rows) <= limit:
        return rows
    picked = list(rows)
    random.Random(f"limit:{seed}").shuffle(picked)
    return picked[:limit]


def _pairs_from_scored_sets(spec: PreferenceDataSpec, sets, loaded: LoadReport,
                            given: PairingReport | None) -> list[PreferencePair]:
    try:
        pairs, report = build_pairs(sets, method=spec.pairing, strength=spec.strength, temperature=spec.temperature,
                                    score_clip=spec.score_clip if spec.strength == "probability" else None)
    except ValueError as error:  # e.g. a score that is not a probability: name the file (the message quotes the row)
        raise DataError(f"{spec.path}: {error}") from error
    log.info("%s: %s", spec.path, report.summary())
    if given is not None:
        given.__dict__.update(report.__dict__)
    if not pairs:
        rows = f"; e.g. {'; '.join(loaded.examples)}" if loaded.examples else ""
        raise DataError(f"{spec.path}: no preference pairs could be built ({report.summary()}){rows}; every row "
                        "needs at least 2 non-empty responses with different numeric scores (check the scores and "
                        "the dataset.pairing / dataset.strength settings)")
    return pairs


def _hh_pairs(spec: PreferenceDataSpec, report: LoadReport) -> list[PreferencePair]:
    pairs = load_hh_rlhf_pairs(spec.path, split="train", source_split=spec.split, report=report)
    if not pairs:
        raise DataError(f"{spec.path}: no usable HH-RLHF pair in its train part ({report.summary()}); each row "
                        'needs "chosen" and "rejected" dialogues that share their "\\n\\nHuman: ..." prompt and end in '
                        'different, non-empty "\\n\\nAssistant: ..." replies')
    return pairs


def preference_pairs_for(spec: PreferenceDataSpec, data: DataSpec, seed: int, *, report: LoadReport | None = None,
                         pairing: PairingReport | None = None) -> Dataset:
    """A TRL preference ``Dataset`` (prompt/chosen/rejected, plus ``preference`` for soft labels). ``report`` and
    ``pairing``, when given, are filled with what the adapter read and skipped and what pairing dropped (the logs
    say the same), so a caller can show why rows are missing."""
    if spec.source == "synthetic":
        return synthetic_preference_dataset(data, seed)
    report = report if report is not None else LoadReport()
    if spec.source == "alpaca_eval":
        pairs = _pairs_from_scored_sets(spec, load_alpaca_eval_prefs(spec.path, split=spec.split, report=report),
                                        report, pairing)
    elif spec.source == "ultrafeedback":
        pairs = _pairs_from_scored_sets(spec, load_ultrafeedback(spec.path, spec.split, report=report), report,
                                        pairing)
    elif spec.source == "hh_rlhf":
        pairs = _hh_pairs(spec, report)
    elif spec.source == "trl":
        rows = load_rows(spec.path, spec.split, what="dataset.path", expected="prompt/chosen/rejected columns")
        require_columns(rows, TRL_COLUMNS, what="dataset.path", source=spec.path,
                        expected="prompt/chosen/rejected columns (TRL preference format)")
        soft = spec.soft_labels and PREFERENCE in rows.column_names  # the file's own strengths (README: soft DPO)
        raw = rows.select_columns([*TRL_COLUMNS, PREFERENCE] if soft else list(TRL_COLUMNS)).to_list()
        if soft:
            raw = [{**row, PREFERENCE: _strength(row[PREFERENCE], source=spec.path, row=i)}
                   for i, row in enumerate(raw)]
        return Dataset.from_list(seeded_limit(clean_trl_rows(raw, spec.path, report=report), spec.limit, seed))
    else:
        raise ValueError(f"unknown preference data source {spec.source!r}")
    if not spec.soft_labels:
        pairs = harden(pairs)
    rows = to_trl_rows(seeded_limit(pairs, spec.limit, seed))
    if not spec.soft_strengths:  # hard labels carry no column: the DPO trainers then accept any loss_type
        rows = [{k: v for k, v in row.items() if k != PREFERENCE} for row in rows]
    return Dataset.from_list(rows)
