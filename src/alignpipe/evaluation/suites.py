"""Evaluation suites as data: ``eval/suites/<name>.yaml`` names a prompt set, pinned generation settings, a judge, a
reference and the primary metric; :func:`run_suite` evaluates checkpoints on one.

Why data, not code: a leaderboard is only comparable if every checkpoint saw the same prompts, sampling settings and
judge; a YAML file pins them, is hashed into the result's provenance, and can be reviewed like a recipe.

Two kinds of reference:

* ``checkpoint`` (the ``synthetic`` suite): win rates and KL against another checkpoint's own samples (the eval
  stage's harness, :func:`alignpipe.evaluation.harness.evaluate_checkpoints`);
* ``dataset`` (``alpaca-eval``, ``hh-harmless``): fixed reference outputs stored with the prompts (AlpacaEval's
  reference answers, HH's chosen replies). No KL (there is no reference model); lengths for the length-controlled
  win rate are in characters, the one unit both sides share.

Judges: ``gold`` (the embedded task) or ``reward_model`` (a saved reward ensemble or single reward model, given with
``--judge``; pairwise preference = Bradley–Terry on its mean reward). A reward-model judge never scores prompts it was
trained on: when its reward stage trained on the suite's own AlpacaEval instructions, the suite keeps only those the
stage held out (:mod:`alignpipe.evaluation.judge_training`).

A ``checkpoint``-reference suite with an ``implicit_reward`` block (``synthetic``, ``hh-harmless-vs-base``) also
scores every checkpoint but the reference as a reward model, as the eval stage does: ``implicit_reward_accuracy``,
how often the DPO margin against the reference ranks chosen over rejected on held-out pairs no policy stage trains
on (:func:`load_implicit_pairs`; :mod:`alignpipe.evaluation.implicit_reward`). It is the policy's own DPO implicit
reward (RewardBench's) when the reference is the checkpoint its DPO stage started from; against another reference
(an untrained base) the margins also hold what the stages before DPO moved.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alignpipe.data.hh_rlhf import HH_HELDOUT_FRACTION, load_hh_rlhf_pairs
from alignpipe.evaluation.cache import EvalCache, content_key
from alignpipe.evaluation.diversity import distinct_n, mean_repetition_rate, within_prompt_diversity
from alignpipe.evaluation.generation import Generation, GenerationSettings
from alignpipe.evaluation.harness import (
    GOLD_REWARD,
    IMPLICIT_PAIR_SEED,
    JUDGE_REWARD,
    Checkpoint,
    DiversitySampling,
    LazyModel,
    Pair,
    cached_generations,
    check_sampling_positions,
    diversity_groups,
    evaluate_checkpoints,
    implicit_pairs_record,
    kl_estimator_record,
    lc_win_rate_metric,
    sample_files,
    synthetic_implicit_pairs,
)
from alignpipe.evaluation.judge_training import unseen_by_judge
from alignpipe.evaluation.leaderboard import LC_METRICS, CheckpointResult, build_leaderboard
from alignpipe.evaluation.length_control import MIN_PROMPTS
from alignpipe.evaluation.metrics import length_delta, length_stats, mean_with_ci, reward_delta, win_rate
from alignpipe.io import why_unreadable
from alignpipe.locations import REPO, SUITES_DIR
from alignpipe.pipeline.rundir import package_versions
from alignpipe.rewards.judges import RewardJudge, order_averaged
from alignpipe.seeds import EVAL_SEED
from alignpipe.strict_yaml import parse_strict_yaml
from alignpipe.tasks import GoldJudge, TaskSpace, heldout_tasks, preference_probability

__all__ = ["SUITES_DIR", "ImplicitRewardPairs", "PairSource", "PromptSet", "SuiteGeneration", "SuiteSpec",
           "draws_synthetic_tasks", "fit_pairs", "fit_prompts", "load_implicit_pairs", "load_suite", "run_suite"]

log = logging.getLogger("alignpipe")



class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no text taken for a number ('010' is not 10)


class PromptSet(_Spec):
    source: Literal["synthetic", "alpaca_eval", "hh_rlhf"]
    path: str | None = Field(None, description="Data file; relative paths are relative to the repository root, ~ is "
                             "the home directory.")
    n: int | None = Field(None, gt=0, description="Number of prompts (synthetic: required; others: first n, or all).")
    seed: int = EVAL_SEED
    heldout_fraction: float = Field(
        HH_HELDOUT_FRACTION, gt=0, le=1, description="hh_rlhf: the held-out share of conversations (by a hash of "
        f"their opening turn); at most {HH_HELDOUT_FRACTION}, the share every HH stage holds out of training.")

    @model_validator(mode="after")
    def _held_out_by_every_stage(self) -> PromptSet:
        if self.source == "hh_rlhf" and self.heldout_fraction > HH_HELDOUT_FRACTION:
            raise ValueError(
                f"prompts.heldout_fraction {self.heldout_fraction:g} is above {HH_HELDOUT_FRACTION}: every HH stage "
                f"trains on the prompts outside the held-out {HH_HELDOUT_FRACTION:g}, so the suite would score "
                "prompts the policies (and a reward-model judge) trained on; use at most "
                f"{HH_HELDOUT_FRACTION:g}")
        return self


class SuiteGeneration(_Spec):
    max_new_tokens: int = Field(24, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(64, gt=0)
    seed: int = EVAL_SEED
    max_prompt_tokens: int | None = Field(
        None, gt=0, description="Cut each prompt to this many tokens of the policy's tokenizer (small models), on the "
        "truncation_side.")
    truncation_side: Literal["left", "right"] = Field(
        "left", description="Which end of an over-long prompt goes: left keeps the end (a dialogue keeps its final "
        "turn and closing 'Assistant:'), right keeps the start (a single instruction keeps its task statement).")


class SuiteDiversity(_Spec):
    """Within-prompt diversity (self_bleu_4, distinct_1/2_within): extra samples on prompts spread over the set."""

    samples_per_prompt: int = Field(4, ge=0, description="Samples per prompt; 0 = off, else at least 2.")
    prompts: int = Field(32, gt=0, description="How many of the suite's prompts get them.")

    @model_validator(mode="after")
    def _several_or_none(self) -> SuiteDiversity:
        if self.samples_per_prompt == 1:
            raise ValueError("diversity.samples_per_prompt: self-BLEU and distinct-n within a prompt compare its "
                             "samples with each other: use 2 or more, or 0 to leave them out")
        return self

    def sampling(self, n_prompts: int) -> DiversitySampling | None:
        """The harness's sampling plan for a suite of ``n_prompts`` prompts (None when off)."""
        return DiversitySampling.planned(self.samples_per_prompt, self.prompts, n_prompts)


class PairSource(_Spec):
    """Held-out preference pairs of one source, for the reward-model suite."""

    name: str
    source: Literal["synthetic", "alpaca_eval", "hh_rlhf"]
    path: str | None = None
    n: int | None = Field(None, gt=0, description="At most this many pairs (the first n held-out ones; synthetic: "
                          "exactly n, default 512).")
    seed: int = Field(4242, description="synthetic: a seed no recipe trains on by default.")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=1, description="synthetic, alpaca_eval: keep only pairs whose prompt a reward stage with "
        "heldout_fraction >= this holds out of training (0.1 = the stage's default), so no reward model trained "
        "on the source has seen them; hh_rlhf uses the adapter's own held-out split instead.",
    )


class ImplicitRewardPairs(_Spec):
    """Held-out preference pairs on which every checkpoint but the reference gets ``implicit_reward_accuracy``:
    pairs no *policy* stage trains on, so a DPO policy is scored as a reward model on unseen data
    (:func:`load_implicit_pairs` says which pairs those are).

    ``alpaca_eval`` is refused: a dpo stage on AlpacaEval draws its pairs (``dataset.limit`` a seeded share) from every
    instruction, holding none out, so no AlpacaEval pair is known to be unseen by a policy. (A reward stage's held-out
    instructions, which the reward-model suites use, are held out of that reward stage only.)
    """

    source: Literal["synthetic", "hh_rlhf", "alpaca_eval"]
    path: str | None = Field(None, description="hh_rlhf: the data file; relative paths are relative to the "
                             "repository root.")
    n: int = Field(256, gt=0, description="synthetic: exactly n gold-ordered pairs; hh_rlhf: the first n pairs of "
                   "the held-out split (all of them, if fewer).")
    seed: int | None = Field(None, description=f"synthetic: the pairs' seed (default {IMPLICIT_PAIR_SEED}, the eval "
                             "stage's); hh_rlhf takes its pairs in file order and reads none.")

    @model_validator(mode="after")
    def _unseen_by_every_policy(self) -> ImplicitRewardPairs:
        if self.source == "alpaca_eval":
            raise ValueError(
                "implicit_reward.source alpaca_eval: no policy stage holds AlpacaEval pairs out of training (a dpo "
                "stage on alpaca_eval draws its pairs from every instruction), so none is known to be unseen by the "
                "policies; use source hh_rlhf or synthetic, or remove implicit_reward")
        if self.source == "synthetic" and self.path is not None:
            raise ValueError("implicit_reward.path: source synthetic draws its pairs from the embedded task and reads "
                             "no file; remove path")
        if self.source == "hh_rlhf" and self.path is None:
            raise ValueError("implicit_reward.path: source hh_rlhf needs the data file (e.g. "
                             "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz)")
        if self.source == "hh_rlhf" and self.seed is not None:
            raise ValueError("implicit_reward.seed is not read: hh_rlhf pairs are the first n of the held-out split "
                             "in file order; remove seed")
        return self


class SuiteSpec(_Spec):
    name: str
    description: str = ""
    kind: Literal["policy", "reward_models"] = "policy"
    prompts: PromptSet | None = None
    generation: SuiteGeneration = Field(default_factory=SuiteGeneration)
    diversity: SuiteDiversity = Field(default_factory=SuiteDiversity)
    reference: Literal["checkpoint", "dataset"] | None = None
    judge: Literal["gold", "reward_model"] | None = None
    pair_sources: list[PairSource] = Field(default_factory=list)
    implicit_reward: ImplicitRewardPairs | None = Field(
        None, description="reference: checkpoint: held-out pairs for every other checkpoint's "
        "implicit_reward_accuracy (the DPO margin against the reference; RewardBench's score of a DPO model).")
    primary_metric: str
    bootstrap_resamples: int = Field(1000, ge=100)

    @model_validator(mode="after")
    def _complete(self) -> SuiteSpec:
        if self.kind == "policy" and None in (self.prompts, self.reference, self.judge):
            raise ValueError("a policy suite needs prompts, reference and judge")
        if self.kind == "reward_models" and not self.pair_sources:
            raise ValueError("a reward_models suite needs pair_sources")
        if self.implicit_reward is not None and self.kind == "reward_models":
            raise ValueError("implicit_reward scores policies (their DPO margin against a reference policy); a "
                             "reward_models suite scores reward models on its pair_sources: remove implicit_reward, "
                             "or add the pairs to pair_sources")
        if self.implicit_reward is not None and self.reference == "dataset":
            raise ValueError("implicit_reward needs reference: checkpoint: the implicit reward log(pi/pi_ref) is "
                             "measured against a reference policy, and reference: dataset has only fixed outputs; "
                             "remove implicit_reward, or compare with a reference checkpoint")
        reward_name, other = _reward_names(self)
        if self.kind == "policy" and self.primary_metric.startswith(other):
            raise ValueError(f"primary_metric {self.primary_metric}: this suite records its judge's reward as "
                             f"{reward_name} ({_REWARD_NAME_WHY[reward_name]}); write "
                             f"{self.primary_metric.replace(other, reward_name, 1)}")
        if self.primary_metric in LC_METRICS and self.prompts and self.prompts.n is not None \
                and self.prompts.n < MIN_PROMPTS:  # refused here, not after every checkpoint was sampled and judged
            raise ValueError(f"primary_metric {self.primary_metric} needs at least {MIN_PROMPTS} prompts "
                             f"(prompts.n is {self.prompts.n}): its length GLM cannot be fitted on fewer")
        return self


_REWARD_NAME_WHY = {GOLD_REWARD: "the gold judge against a reference checkpoint",
                    JUDGE_REWARD: "a reward model's score, or any judge's against fixed reference outputs"}


def _reward_names(spec: SuiteSpec) -> tuple[str, str]:
    """(the name a policy suite's rows give its judge's reward, the other name). ``gold_reward`` only for the gold
    judge against a reference checkpoint; a reward model's score is a proxy and is never called gold, and the
    dataset-reference rows have always called theirs ``judge_reward``."""
    gold = spec.judge == "gold" and spec.reference == "checkpoint"
    return (GOLD_REWARD, JUDGE_REWARD) if gold else (JUDGE_REWARD, GOLD_REWARD)


def load_suite(name_or_path: str) -> tuple[SuiteSpec, str]:
    """A suite by name (``eval/suites/<name>.yaml``) or path, validated; returns it and its content hash."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise ValueError(f"no evaluation suite {name_or_path!r} (looked for {path}); known suites: {known}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"suite file {path}: {why_unreadable(error)}") from None
    try:
        spec = SuiteSpec.model_validate(parse_strict_yaml(text))  # as recipes: a seed 010 is no number
    except Exception as error:  # pydantic's message names the key; say which file
        raise ValueError(f"suite file {path} is invalid: {error}") from error
    return spec, content_key(text)


def data_path(prompts: PromptSet | PairSource | ImplicitRewardPairs) -> Path:
    """A suite's data file: absolute (``~`` expanded), or relative to the repository root; a clear error when it is
    absent."""
    if prompts.path is None:
        raise ValueError(f"source {prompts.source!r} needs a path")
    path = Path(prompts.path).expanduser()
    path = path if path.is_absolute() else REPO / path
    if not path.exists():
        raise FileNotFoundError(f"suite data {path} does not exist (the shared data lives in ../shared/data)")
    return path


def load_prompts(prompts: PromptSet, keep: Callable[[str], bool] | None = None,
                 space: TaskSpace | None = None) -> tuple[list[str], list[str] | None]:
    """The suite's prompts and, for dataset references, the reference output of each; with ``keep``, only the
    prompts it passes (AlpacaEval and HH-RLHF: before ``n`` takes the first ones). Synthetic prompts are drawn from
    ``space`` (the evaluated runs' task space), else the default one."""
    if prompts.source == "synthetic":
        if prompts.n is None:
            raise ValueError("the synthetic prompt set needs n")
        return [t.prompt for t in heldout_tasks(prompts.n, prompts.seed, space or TaskSpace())], None
    if prompts.source == "alpaca_eval":
        pairs = [(r["instruction"], r["reference"]["text"]) for r in _json_lines(data_path(prompts))]
        pairs = [(p, r) for p, r in pairs if keep is None or keep(p)]
    else:  # the prompts of the adapter's held-out pairs (rows it skips as malformed or empty give none)
        pairs = [(pair.prompt, pair.chosen) for pair in load_hh_rlhf_pairs(
            data_path(prompts), split="heldout", heldout_fraction=prompts.heldout_fraction)
            if keep is None or keep(pair.prompt)]
    pairs = pairs[:prompts.n] if prompts.n else pairs
    return [p for p, _ in pairs], [r for _, r in pairs]


def load_implicit_pairs(spec: ImplicitRewardPairs, space: TaskSpace | None = None) -> tuple[list[Pair], dict]:
    """The (prompt, chosen, rejected) pairs of ``implicit_reward_accuracy``, and where they come from (source, labels
    and split: the arguments of :func:`~alignpipe.evaluation.harness.implicit_pairs_record` but the pairs).

    Unseen by the policies, not only by reward models:

    * synthetic: :func:`~alignpipe.tasks.heldout_gold_pairs`, the eval stage's pairs (of ``space``, else the default
      task space): prompts of the task's held-out
      split, which no training stage draws from (sft, dpo, reward and the online stages sample the train split),
      ordered by the gold reward. Not the reward-model suites' synthetic pairs: their prompts are only held out of
      reward stages (``is_reward_heldout``), and a dpo stage may train on them.
    * hh_rlhf: the adapter's held-out split, the ``HH_HELDOUT_FRACTION`` of conversations that every HH stage holds
      out: sft (``load_hh_rlhf_chosen``), dpo and reward (``preference_pairs_for``) read only the train part, at that
      fraction, and no other stage reads HH. The split hashes each conversation's root (its opening human turn), so
      no training dialogue continues a held-out one. The same split bounds a suite's HH prompts
      (``prompts.heldout_fraction`` is at most that fraction), so the pairs may share prompts with them: both unseen.
    """
    if spec.source == "synthetic":
        seed = IMPLICIT_PAIR_SEED if spec.seed is None else spec.seed
        pairs = synthetic_implicit_pairs(spec.n, space or TaskSpace(), seed)  # the synthetic prompt set's task space
        return pairs, {"source": "synthetic", "labels": "gold", "seed": seed}
    if spec.source == "hh_rlhf":
        path = data_path(spec)
        pairs = [(p.prompt, p.chosen, p.rejected) for p in load_hh_rlhf_pairs(path, split="heldout")][:spec.n]
        if not pairs:
            raise ValueError(f"implicit_reward: {path} has no usable HH-RLHF pair in its held-out split (the "
                             f"{HH_HELDOUT_FRACTION:g} of conversations every HH stage holds out); give a larger file")
        if len(pairs) < spec.n:
            log.warning("implicit_reward: %s holds %d held-out HH-RLHF pairs, fewer than n=%d; using them all", path,
                        len(pairs), spec.n)
        return pairs, {"source": "hh_rlhf", "labels": "human", "heldout_fraction": HH_HELDOUT_FRACTION}
    raise ValueError(f"implicit_reward.source {spec.source!r}: no held-out pairs that no policy trains on")


def _json_lines(path: Path) -> list[dict]:
    """A suite data file's rows (JSON lines, gzipped or not)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def fit_pairs(pairs: list[Pair], tokenizer, max_tokens: int | None, side: str = "left") -> list[Pair]:
    """``pairs`` with each prompt cut as :func:`fit_prompts` cuts the suite's prompts: a pair's replies are scored
    after the prompt a policy is given in this suite, so its sequences fit a small model's positions as its samples
    do (where the cut bites, not the whole dialogue DPO trained on; a left cut keeps the final turn)."""
    cut = fit_prompts([prompt for prompt, _, _ in pairs], tokenizer, max_tokens, side)
    return [(prompt, chosen, rejected) for prompt, (_, chosen, rejected) in zip(cut, pairs, strict=True)]


def fit_prompts(prompts: list[str], tokenizer, max_tokens: int | None, side: str = "left") -> list[str]:
    """Each prompt longer than ``max_tokens`` tokens of ``tokenizer`` cut to its last (``side="left"``) or first
    (``side="right"``) ``max_tokens`` tokens.

    Why left by default: in a dialogue the final user turn and the closing ``Assistant:`` cue are what the reply
    answers, and the earliest turns are the context a small model can best do without. A single instruction is the
    other way round: its task statement comes first and any pasted input after it.
    """
    if max_tokens is None:
        return prompts
    if side not in ("left", "right"):
        raise ValueError(f"truncation side must be 'left' or 'right', got {side!r}")
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            prompt = tokenizer.decode(ids[-max_tokens:] if side == "left" else ids[:max_tokens])
        out.append(prompt)
    return out


class CachedJudge:
    """A pointwise judge whose scores are cached by content (judge weights hash, prompts, responses).

    Pairwise preferences are Bradley–Terry on the scores (``σ((r_a − r_b)/T)``), which is position-free, so each
    response is scored once and order averaging needs no second pass.
    """

    def __init__(self, judge, judge_hash: str, cache: EvalCache, temperature: float = 1.0):
        self.judge, self.judge_hash, self.cache, self.temperature = judge, judge_hash, cache, temperature
        self.judge_id = judge.judge_id

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        key = content_key("judge", self.judge_hash, prompts, responses)
        cached = self.cache.get_floats(key)
        if cached is None:
            cached = [float(x) for x in self.judge.score(prompts, responses)]
            self.cache.put_floats(key, cached)
        return cached

    def preferences(self, prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
        ours, theirs = self.score(prompts, responses), self.score(prompts, references)
        return [preference_probability(a, b, self.temperature) for a, b in zip(ours, theirs, strict=True)]


def _judge(spec: SuiteSpec, judge_path: str | None, cache: EvalCache):
    if spec.judge == "gold":
        return GoldJudge()
    if judge_path is None:
        raise ValueError(f"suite {spec.name!r} is judged by a reward model: pass --judge <saved reward model dir>")
    from alignpipe.rewards.loading import load_reward_scorer, reward_model_identity

    scorer = load_reward_scorer(judge_path)  # on the process's device
    judge = RewardJudge(lambda p, r: scorer.score(p, r).mean.tolist(), judge_id=scorer.judge_id, temperature=1.0)
    return CachedJudge(judge, reward_model_identity(judge_path), cache)  # copies in two runs are one judge


def run_suite(spec: SuiteSpec, suite_hash: str, checkpoints: list[Checkpoint], *, reference: Checkpoint | None,
              judge_path: str | None, cache: EvalCache, dtype: str = "auto",
              samples_out: dict[str, dict[str, list[dict]]] | None = None, space: TaskSpace | None = None) -> dict:
    """Evaluate ``checkpoints`` on the suite; returns a leaderboard record (EVALUATION.md §9 envelope). With
    ``samples_out``, each checkpoint's per-sample records go there by name (file suffix -> rows, as
    :func:`~alignpipe.evaluation.harness.sample_files` gives them), for the caller to write beside the table.
    Synthetic prompts and pairs are drawn from ``space`` (the runs' own task space; default: the default one), which
    the board's ``config.task_space`` records."""
    unseen, trained_on = None, None
    if spec.judge == "reward_model" and judge_path is not None:
        unseen, trained_on = unseen_by_judge(spec.prompts.source, judge_path)
    prompts, reference_outputs = load_prompts(spec.prompts, keep=unseen, space=space)
    if unseen is not None:
        if not prompts:
            raise ValueError(f"suite {spec.name!r}: the judge {judge_path} trained on every one of its prompts (reward "
                             f"stage {trained_on.stage!r}, heldout_fraction {trained_on.heldout_fraction:g}); judge "
                             "with a reward model trained on another source")
        log.warning("suite %s: the judge %s was trained on %s prompts (reward stage %r, heldout_fraction %g); "
                    "evaluating only the %d it held out", spec.name, judge_path, trained_on.source, trained_on.stage,
                    trained_on.heldout_fraction, len(prompts))
    g = spec.generation
    settings = GenerationSettings(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                  batch_size=g.batch_size, seed=g.seed)
    judge = _judge(spec, judge_path, cache)
    diversity = spec.diversity.sampling(len(prompts))  # prompt cutting keeps their number
    pairs, pairs_record = None, {}
    if spec.reference == "checkpoint":
        reference = reference or checkpoints[0]
        # every policy answers the same prompts as the reference, cut with the reference's tokenizer; so are the pairs
        tokenizer = LazyModel(reference, dtype).tokenizer()
        prompts = fit_prompts(prompts, tokenizer, g.max_prompt_tokens, g.truncation_side)
        if spec.implicit_reward is not None:
            pairs, pairs_record = _implicit_pairs(spec, tokenizer, space)
        results, judged = evaluate_checkpoints(checkpoints, reference, prompts, judge, settings, dtype=dtype,
                                               bootstrap_resamples=spec.bootstrap_resamples, cache=cache,
                                               diversity=diversity, pairs=pairs, reward_name=_reward_names(spec)[0])
        files = {s.checkpoint.name: sample_files(s) for s in judged}
        reference_name, reference_sha256 = reference.name, reference.weights_sha256
    else:
        models = [LazyModel(c, dtype) for c in checkpoints]
        # each policy answers the prompts cut with its own tokenizer; all are checked before any is sampled
        fitted = [fit_prompts(prompts, m.tokenizer(), g.max_prompt_tokens, g.truncation_side) for m in models]
        for model, its_prompts in zip(models, fitted, strict=True):
            check_sampling_positions([model], its_prompts, settings.max_new_tokens)
        outcomes = [_against_outputs(m, f, reference_outputs, judge, settings, spec, cache, diversity)
                    for m, f in zip(models, fitted, strict=True)]
        results = [result for result, _ in outcomes]
        files = {result.name: rows for result, rows in outcomes}
        reference_name, reference_sha256 = f"{spec.prompts.source} reference outputs", None
    if samples_out is not None:
        samples_out.update(files)
    return build_leaderboard(
        results, run={"name": f"suite:{spec.name}", "reference": reference_name, "reference_sha256": reference_sha256,
                      "suite_sha256": suite_hash},
        config={"suite": spec.model_dump(), "generation": settings.__dict__,
                "prompt_set": {"id": f"{spec.prompts.source}:{content_key(prompts)[:16]}", "n": len(prompts),
                               "held_out_by_judge": unseen is not None},
                "judge": {"type": spec.judge, "id": judge.judge_id, "position_swap": True,
                          "trained_on": trained_on.record() if trained_on else None,
                          **({"weights_sha256": judge.judge_hash} if isinstance(judge, CachedJudge) else {})},
                "bootstrap_iters": spec.bootstrap_resamples, **kl_estimator_record(results),
                **({"diversity": dataclasses.asdict(diversity)} if diversity else {}), **pairs_record,
                **_task_space_record(spec, space)},
        env=package_versions(), suite=spec.name, primary_metric=spec.primary_metric,
    )


def draws_synthetic_tasks(spec: SuiteSpec) -> bool:
    """Whether a policy suite's prompts or implicit-reward pairs are drawn from the synthetic task (a task space)."""
    return spec.kind == "policy" and "synthetic" in {
        spec.prompts.source, spec.implicit_reward.source if spec.implicit_reward else None}


def _task_space_record(spec: SuiteSpec, space: TaskSpace | None) -> dict:
    """``{"task_space": ...}``, the synthetic task the suite's synthetic prompts or pairs were drawn from (a run's
    ``data`` block's families and item range), for a board that has any; else nothing."""
    return {"task_space": dataclasses.asdict(space or TaskSpace())} if draws_synthetic_tasks(spec) else {}


def _implicit_pairs(spec: SuiteSpec, tokenizer, space: TaskSpace | None) -> tuple[list[Pair], dict]:
    """The suite's implicit-reward pairs, their prompts cut like the suite's (:func:`fit_pairs`), and the
    leaderboard's ``implicit_reward_pairs`` record of them as scored (with how many prompts a cut shortened)."""
    g = spec.generation
    drawn, origin = load_implicit_pairs(spec.implicit_reward, space)
    pairs = fit_pairs(drawn, tokenizer, g.max_prompt_tokens, g.truncation_side)
    record = implicit_pairs_record(pairs, **origin)
    if g.max_prompt_tokens is not None:
        record["prompts_cut"] = sum(new != old for (new, _, _), (old, _, _) in zip(pairs, drawn, strict=True))
        log.info("suite %s: %d of the %d implicit-reward pairs' prompts cut to %d tokens", spec.name,
                 record["prompts_cut"], len(pairs), g.max_prompt_tokens)
    return pairs, {"implicit_reward_pairs": record}


def _against_outputs(model: LazyModel, fitted: list[str], reference_outputs: list[str], judge, settings,
                     spec: SuiteSpec, cache: EvalCache,
                     diversity: DiversitySampling | None) -> tuple[CheckpointResult, dict[str, list[dict]]]:
    """One checkpoint against fixed reference outputs: judge reward, win rate (both orders), LC win rate, lengths;
    and its per-sample records (each reply, its judge reward, the reference output's, the preference), by file
    suffix as :func:`~alignpipe.evaluation.harness.sample_files` gives them.

    The judge sees the prompt the policy answered (``fitted``: cut by ``max_prompt_tokens`` with this checkpoint's
    tokenizer), not the full one: a reply is judged as an answer to what the policy was asked, the reference output
    is judged in that same context, and a checkpoint reference's samples (which carry the cut prompts) are judged the
    same way.
    """
    checkpoint = model.checkpoint
    generations: list[Generation] = cached_generations(model, fitted, settings, cache)
    groups = diversity_groups(model, fitted, settings, diversity, cache) if diversity else None
    model.release()
    responses = [gen.response for gen in generations]
    rewards = judge.score(fitted, responses)
    reference_rewards = judge.score(fitted, reference_outputs)
    preferences = (judge.preferences(fitted, responses, reference_outputs) if isinstance(judge, CachedJudge)
                   else order_averaged(judge, fitted, responses, reference_outputs))
    seed, resamples = settings.seed, spec.bootstrap_resamples
    metrics = {
        JUDGE_REWARD: mean_with_ci(rewards, resamples=resamples, seed=seed, higher_is_better=True),
        f"{JUDGE_REWARD}_delta_vs_ref": reward_delta(rewards, reference_rewards, resamples=resamples, seed=seed),
        "win_rate_vs_ref": win_rate(preferences, resamples=resamples, seed=seed),
        **lc_win_rate_metric(preferences, [len(r) for r in responses], [len(r) for r in reference_outputs],
                             resamples=resamples, seed=seed),
        "len_chars_delta_vs_ref": length_delta([len(r) for r in responses], [len(r) for r in reference_outputs],
                                               resamples=resamples, seed=seed),  # text references: characters
        "distinct_1": distinct_n(responses, 1), "distinct_2": distinct_n(responses, 2),
        "repetition_4": mean_repetition_rate(responses, 4, resamples=resamples, seed=seed),
    }
    metrics.update(length_stats([len(gen.response_ids) for gen in generations], [gen.truncated for gen in generations],
                                resamples=resamples, seed=seed))
    if groups:
        metrics.update(within_prompt_diversity(groups, resamples=resamples, seed=seed))
    rows = [{"prompt": prompt, "response": gen.response, "n_tokens": len(gen.response_ids), "truncated": gen.truncated,
             JUDGE_REWARD: reward, "reference_output": reference, f"reference_{JUDGE_REWARD}": reference_reward,
             "preference_vs_ref": preference}
            for prompt, gen, reward, reference, reference_reward, preference in zip(
                fitted, generations, rewards, reference_outputs, reference_rewards, preferences, strict=True)]
    files = {"": rows}
    if groups:
        files[".diversity"] = [{"prompt": prompt, "responses": group}
                               for prompt, group in zip(diversity.chosen(fitted), groups, strict=True)]
    return CheckpointResult(name=checkpoint.name, path=checkpoint.path, weights_sha256=checkpoint.weights_sha256,
                            metrics=metrics), files
