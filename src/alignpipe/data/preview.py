"""What each data-reading stage of a recipe will train on, gathered before training (``alignpipe data``).

Why: between a dataset file and a trainer, an adapter skips rows, pairing drops pairs, a seeded ``limit`` picks a
subset and ``max_length`` cuts what is left, and none of it shows until the stage runs. Each stage's rows are built
here through the functions the stage itself calls (``sft_dataset_for``, ``preference_pairs_for``) and measured with
the model's tokenizer through :mod:`alignpipe.data.length_report` (the stages' own seeded sample), so the numbers
cannot drift from training. No weights are loaded and nothing is written: rendering is
:mod:`alignpipe.data.preview_render`, writing the rows out :mod:`alignpipe.data.preview_export`.

Only sft, dpo and reward stages read a ``dataset:``. The online stages (osp, sppo, ppo, grpo, ...) draw fresh prompts
of the synthetic task while they train and pair their own samples, so there are no rows to show before training:
they are listed, not built.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from alignpipe.data.errors import DataError, LoadReport
from alignpipe.data.length_report import (
    PairTruncationCounts,
    TruncationCounts,
    dpo_pair_spans,
    pair_truncation_counts,
    require_reward_pairs_within,
    sft_reply_spans,
    sft_training_template,
    truncation_counts,
)
from alignpipe.data.pairing import PairingReport
from alignpipe.data.preference import PREFERENCE, check_soft_targets, preference_pairs_for, reward_heldout_rows
from alignpipe.recipe import DPOStage, PreferenceDataSpec, Recipe, RewardStage, SFTDataSpec, SFTStage

log = logging.getLogger("alignpipe")

DataStage = SFTStage | DPOStage | RewardStage

# What each counter of the adapters' LoadReport and of pairing's PairingReport counts, and why those were left out
LOAD_SKIPS = {
    "rows_skipped_empty": ("rows", "an empty prompt or reply"),
    "rows_skipped_malformed": ("rows", "not split into prompt and reply (no assistant turn, or chosen and rejected "
                                       "differ before it)"),
    "rows_skipped_identical": ("rows", "chosen == rejected"),
    "rows_other_split": ("rows", "the prompt is in the held-out part of the prompt-hash split (kept for evaluation)"),
    "responses_dropped_empty": ("responses", "empty (dropped from rows that were kept)"),
    "responses_merged_repeated": ("responses", "repeat a text of their row (merged into it, with the mean score)"),
}
PAIRING_SKIPS = {
    "sets_skipped_too_few": ("prompts", "fewer than 2 usable responses"),
    "sets_without_pairs": ("prompts", "their responses gave no pair (tied scores)"),
    "responses_dropped_nonfinite": ("responses", "no numeric score"),
    "pairs_dropped_ties": ("pairs", "tied"),
    "pairs_dropped_identical": ("pairs", "identical texts"),
}


class PreviewError(ValueError):
    """A stage that cannot be previewed (an unknown ``--stage``, or data the stage could not train on), one line."""


@dataclass(frozen=True)
class Skip:
    """Rows (or responses, prompts, pairs: ``unit``) left out of a stage's data, and why: a non-zero counter (``key``)
    of the adapter's or pairing's report."""

    key: str
    count: int
    unit: str
    reason: str


@dataclass(frozen=True)
class LengthStats:
    """Nearest-rank percentiles of token counts (whole numbers of tokens, as a person reads them)."""

    p50: int
    p95: int
    max: int


@dataclass(frozen=True)
class Strengths:
    """Soft pair strengths P(chosen > rejected) of a ``preference`` column: 1.0 everywhere is a hard label."""

    mean: float
    min: float
    max: float


@dataclass(frozen=True)
class StageLengths:
    """Token lengths of a stage's rows as its trainer tokenizes them, and what ``max_length`` cuts (keep-start
    truncation, as the stage's own length report counts it). ``replies`` holds ``reply`` for conversations, ``chosen``
    and ``rejected`` for pairs; ``sequence`` is prompt + reply (the longer one of a pair)."""

    measured: int
    sampled_from: int | None  # the dataset's size when a seeded sample was measured (the stage measures the same)
    prompt: LengthStats
    replies: dict[str, LengthStats]
    sequence: LengthStats
    truncation: TruncationCounts | PairTruncationCounts
    keeps_start: bool  # the stage keeps a sequence's first max_length tokens (sft, dpo): the cut counts apply
    cut_note: str  # what the stage does with a sequence longer than max_length


@dataclass
class StagePreview:
    """One data-reading stage: where its rows come from, how many it gets and what was left out, its labels and
    lengths, and a few rows. ``rows`` is the dataset the stage builds; a reward stage then trains on the rows that
    ``heldout_rows`` does not mark and measures its reward metrics on the others."""

    name: str
    type: str
    source: str
    path: str | None
    split: str | None
    commit: str | None  # a hub dataset's commit, resolved as the runner pins it
    unit: str  # "conversations" or "pairs"
    size: int  # rows the stage gets
    read: int | None  # rows read from the source file (real datasets)
    skipped: list[Skip]
    limit: int | None
    before_limit: int  # rows there were for the limit to pick from
    labels: str | None  # pairs: "hard", or "soft" with a preference column
    strengths: Strengths | None = None  # soft labels: the preference column's spread
    heldout: int | None = None  # reward stages: pairs held out of training by prompt hash
    heldout_rows: list[bool] | None = field(default=None, repr=False)  # reward stages: which rows those are
    lengths: StageLengths | None = None
    lengths_skipped: str | None = None  # why lengths were not measured
    examples: list[dict] = field(default_factory=list)
    rows: Dataset | None = field(default=None, repr=False)


@dataclass(frozen=True)
class NoDataStage:
    """A stage that reads no dataset, and where its prompts come from instead."""

    name: str
    type: str
    note: str


@dataclass
class RecipePreview:
    """Every selected data-reading stage of one recipe, the stages that read none, and the tokenizer measured with."""

    recipe: str
    model: str
    tokenizer: str | None  # where the tokenizer came from; None when there is none at hand
    no_tokenizer: str | None  # why not
    stages: list[StagePreview]
    without_data: list[NoDataStage]


def data_stages(recipe: Recipe, names: Sequence[str] = ()) -> list[DataStage]:
    """The stages that read a ``dataset:`` block, in recipe order; ``names`` (``--stage``) restricts them. An unknown
    name, or one of a stage that reads no dataset, is a PreviewError that lists the stages that do."""
    readers = [stage for stage in recipe.stages if isinstance(stage, DataStage)]
    known = {stage.name: stage for stage in recipe.stages}
    valid = ", ".join(stage.name for stage in readers) or "none"
    for name in names:
        if name not in known:
            raise PreviewError(f"--stage {name!r}: recipe {recipe.name!r} has no such stage; the stages that read "
                               f"data are: {valid}")
        if not isinstance(known[name], DataStage):
            raise PreviewError(f"--stage {name!r}: {known[name].type} stages read no dataset (this one "
                               f"{_no_data_note(known[name].type)}); the stages that read data are: {valid}")
    return [stage for stage in readers if not names or stage.name in names]


def preview_recipe(recipe: Recipe, names: Sequence[str] = (), *, show: int = 2) -> RecipePreview:
    """Build and measure the rows of every selected data-reading stage (``names``: all when empty, and then the
    stages that read no dataset are listed too), with ``show`` example rows each. Raises PreviewError naming the
    stage's dataset key when its data cannot be read."""
    stages = data_stages(recipe, names)
    tokenizer, about = recipe_tokenizer(recipe) if any(_uses_model_tokenizer(s) for s in stages) else (None, None)
    previews = [_preview_stage(recipe, stage, tokenizer, about, show) for stage in stages]
    return RecipePreview(
        recipe=recipe.name, model=recipe.model.gguf_package or recipe.model.name_or_path,
        tokenizer=about if tokenizer is not None else None, no_tokenizer=about if tokenizer is None else None,
        stages=previews, without_data=[] if names else [NoDataStage(s.name, s.type, _no_data_note(s.type))
                                                        for s in recipe.stages if not isinstance(s, DataStage)],
    )


def recipe_tokenizer(recipe: Recipe) -> tuple[PreTrainedTokenizerBase | None, str]:
    """(the tokenizer the stages get, where it comes from), or (None, why there is none): the tiny model's is trained
    from the task text as the runner trains it; any other is found as preflight finds it, without weights."""
    if recipe.model.is_tiny:
        from alignpipe.models.factory import tiny_tokenizer

        return tiny_tokenizer(recipe), "the tiny model's tokenizer (trained on the task text, as the run trains it)"
    from alignpipe.pipeline.preflight import model_tokenizer

    name = recipe.model.gguf_package or recipe.model.name_or_path
    try:
        tokenizer = model_tokenizer(recipe)
    except (ValueError, OSError) as error:
        return None, f"the tokenizer of {name} does not load ({' '.join(str(error).split())})"
    if tokenizer is None:
        return None, (f"no tokenizer of {name} at hand (a hub model not in the Hugging Face cache yet, or one that "
                      "needs trust_remote_code)")
    return tokenizer, f"the tokenizer of {name}"


def _uses_model_tokenizer(stage: DataStage) -> bool:
    """A reward stage with its own backbone tokenizes with that backbone, not with the recipe's model."""
    return not (isinstance(stage, RewardStage) and stage.backbone is not None)


def _no_data_note(stage_type: str) -> str:
    if stage_type in ("eval", "bon"):
        return "evaluates on held-out prompts of the synthetic task"
    if stage_type == "spin":
        return "trains on the synthetic task's demonstrations and its own samples, drawn while it trains"
    return "trains on prompts of the synthetic task drawn while it trains, with responses it samples itself"


def _preview_stage(recipe: Recipe, stage: DataStage, tokenizer: PreTrainedTokenizerBase | None,
                   no_tokenizer: str | None, show: int) -> StagePreview:
    key = f"stages.{stage.name}.dataset"
    try:
        spec, commit = _pinned(stage)
        log.info("[%s] building the %s rows (%s%s)", stage.name, stage.type, spec.source,
                 f": {spec.path}" if spec.path else "")
        load, pairing = LoadReport(), PairingReport()
        if isinstance(stage, SFTStage):
            from alignpipe.trainers.sft import sft_dataset_for  # the sft stage's own builder (imports TRL's trainer)

            rows = sft_dataset_for(spec, recipe.data, recipe.seed, report=load)
        else:
            rows = preference_pairs_for(spec, recipe.data, recipe.seed, report=load, pairing=pairing)
            check_soft_targets(stage, rows)  # as the stage does: soft strengths its loss cannot take are an error
    except (ValueError, OSError) as error:
        raise PreviewError(f"{key}: {' '.join(str(error).split())}") from error
    synthetic = spec.source == "synthetic"
    preview = StagePreview(
        name=stage.name, type=stage.type, source=spec.source, path=stage.dataset.path,
        split=None if synthetic else spec.split, commit=commit,
        unit="conversations" if isinstance(stage, SFTStage) else "pairs", size=len(rows),
        read=None if synthetic else load.rows_in, skipped=_skips(load, pairing), limit=spec.limit,
        before_limit=len(rows) if synthetic else (pairing.pairs_out if pairing.sets_in else load.items_out),
        labels=None, examples=rows.select(range(min(show, len(rows)))).to_list(), rows=rows,
    )
    if not isinstance(stage, SFTStage):
        _describe_pairs(preview, stage, rows)
    if not _uses_model_tokenizer(stage):
        preview.lengths_skipped = f"this stage tokenizes with its backbone {stage.backbone}, not the recipe's model"
    elif tokenizer is None:
        preview.lengths_skipped = no_tokenizer
    else:
        log.info("[%s] measuring token lengths", stage.name)
        try:
            preview.lengths = stage_lengths(stage, rows, tokenizer, seed=recipe.seed)
        except DataError as error:  # a row the chat template refuses: the stage would fail on it too
            raise PreviewError(f"{key}: {' '.join(str(error).split())}") from error
        except ValueError as error:  # a template TRL cannot give {% generation %} markers (alignpipe validate says)
            preview.lengths_skipped = f"the chat template cannot be trained as this stage asks ({error})"
    return preview


def _pinned(stage: DataStage) -> tuple[SFTDataSpec | PreferenceDataSpec, str | None]:
    """The stage's dataset block as the stage reads it: a hub dataset at the commit the runner would pin it to."""
    from alignpipe.data.hub_datasets import hub_dataset_id, pinned, resolve_cached_dataset

    spec = stage.dataset
    if spec.source == "synthetic" or hub_dataset_id(spec.path) is None:
        return spec, None
    pin = resolve_cached_dataset(spec.path, key=f"stages.{stage.name}.dataset.path")
    return spec.model_copy(update={"path": pinned(spec.path, pin.commit)}), pin.commit


def _skips(load: LoadReport, pairing: PairingReport) -> list[Skip]:
    """The non-zero skip counters of both reports, each with its reason."""
    return [Skip(key, count, unit, reason) for report, reasons in ((load, LOAD_SKIPS), (pairing, PAIRING_SKIPS))
            for key, (unit, reason) in reasons.items() if (count := getattr(report, key))]


def _describe_pairs(preview: StagePreview, stage: DPOStage | RewardStage, rows: Dataset) -> None:
    """Hard or soft labels (with the strengths' mean, min and max), and a reward stage's held-out share."""
    if PREFERENCE in rows.column_names:
        strengths = rows[PREFERENCE]
        preview.labels = "soft"
        preview.strengths = Strengths(mean=sum(strengths) / len(strengths), min=min(strengths), max=max(strengths))
    else:
        preview.labels = "hard"
    if isinstance(stage, RewardStage):  # the split the reward stage makes (and refuses with a side empty)
        try:
            preview.heldout_rows = reward_heldout_rows(stage, rows)
        except DataError as error:
            raise PreviewError(f"stages.{stage.name}.dataset: {error}") from error
        preview.heldout = sum(preview.heldout_rows)


def stage_lengths(stage: DataStage, rows: Dataset, tokenizer: PreTrainedTokenizerBase, *, seed: int) -> StageLengths:
    """Token lengths and truncation counts of a stage's rows, tokenized as its trainer tokenizes them (the sft stage's
    training chat template; TRL's DPO tokenization of pairs) over the seeded sample the stage's own length report
    measures. Raises ValueError for an sft chat template TRL cannot train with assistant-only loss, DataError for a
    row the chat template refuses or a reward stage trained with TRL whose pairs are all longer than max_length."""
    limit = stage.max_length
    if isinstance(stage, SFTStage):
        template = sft_training_template(tokenizer, assistant_only_loss=stage.assistant_only_loss)
        measured = sft_reply_spans(rows, tokenizer, chat_template=template, seed=seed, source=stage.dataset.path)
        spans = measured.spans
        counts = truncation_counts(spans, limit)
        replies = {"reply": _stats([s.end - s.start for s in spans])}
        prompts, sequences = [s.start for s in spans], [s.length for s in spans]
        fate = ("TRL's SFTTrainer keeps the first max_length tokens and drops a conversation left without reply"
                if stage.assistant_only_loss else "TRL's SFTTrainer keeps the first max_length tokens")
    else:
        measured = dpo_pair_spans(rows, tokenizer, seed=seed, source=stage.dataset.path)
        if isinstance(stage, RewardStage) and stage.implementation == "trl":  # as preflight refuses it
            require_reward_pairs_within(measured, limit, reward_heldout_rows(stage, rows), source=stage.dataset.path,
                                        stage=stage.name)
        spans = measured.spans
        counts = pair_truncation_counts(spans, limit)
        replies = {"chosen": _stats([c.end - c.start for c, _ in spans]),
                   "rejected": _stats([r.end - r.start for _, r in spans])}
        prompts, sequences = [c.start for c, _ in spans], [max(c.length, r.length) for c, r in spans]
        fate = _pair_fate(stage)
    return StageLengths(measured=len(spans), sampled_from=measured.sampled_from, prompt=_stats(prompts),
                        replies=replies, sequence=_stats(sequences),
                        truncation=replace(counts, sampled_from=measured.sampled_from),
                        keeps_start=not isinstance(stage, RewardStage), cut_note=fate)


def _pair_fate(stage: DPOStage | RewardStage) -> str:
    if isinstance(stage, DPOStage):
        return "TRL's DPOTrainer keeps the first max_length tokens and drops a pair whose prompt fills them"
    measured = "lengths as TRL's DPO tokenizes it"
    if stage.implementation == "trl":
        return f"TRL's RewardTrainer drops a pair longer than max_length; {measured}"
    return f"the reward ensemble keeps a longer pair's last max_length tokens; {measured}"


def _stats(values: Sequence[int]) -> LengthStats:
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return LengthStats(p50=rank(0.5), p95=rank(0.95), max=ordered[-1])
