"""The ``reward-models`` suite: saved reward models (ensembles or single) on held-out pairs from several sources.

Why a suite of its own: a reward stage reports metrics on its own held-out split only; comparing reward models
needs the same pairs for all of them, from every source they may be used on (the embedded task, HH-RLHF, AlpacaEval).
Every metric is the reward stage's own (:func:`alignpipe.evaluation.reward_eval.reward_model_metrics`: accuracy, ECE,
Brier, NLL, uncertainty AUROC), prefixed with the source's name.
"""

from __future__ import annotations

from pathlib import Path

from alignpipe.data.hh_rlhf import load_hh_rlhf_pairs
from alignpipe.data.pairing import build_pairs
from alignpipe.data.preference import is_reward_heldout
from alignpipe.data.scored_sources import load_alpaca_eval_prefs
from alignpipe.evaluation.leaderboard import CheckpointResult, build_leaderboard
from alignpipe.evaluation.named import split_named
from alignpipe.evaluation.reward_eval import reward_model_metrics
from alignpipe.evaluation.suites import PairSource, SuiteSpec, data_path
from alignpipe.pipeline.rundir import RUN_FILE, StageDir, output_hash, package_versions
from alignpipe.tasks import gold_reward, preference_pairs

__all__ = ["expand_reward_models", "load_pair_source", "run_reward_suite"]

SYNTHETIC_PAIRS = 512  # a synthetic source's default size


def load_pair_source(source: PairSource) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples of one source's held-out part: HH-RLHF's held-out split; for the synthetic
    task and AlpacaEval, the prompts every reward stage with ``heldout_fraction >= source.heldout_fraction`` held out
    (:func:`is_reward_heldout`), since the stages train on the rest of the same prompts."""
    if source.source == "synthetic":
        return _synthetic_heldout(source.n or SYNTHETIC_PAIRS, source.seed, source.heldout_fraction)
    if source.source == "hh_rlhf":
        triples = [(p.prompt, p.chosen, p.rejected) for p in load_hh_rlhf_pairs(data_path(source), split="heldout")]
    else:
        pairs, _ = build_pairs(load_alpaca_eval_prefs(data_path(source)), method="best_worst", strength="hard")
        triples = [(p.prompt, p.chosen, p.rejected) for p in pairs if is_reward_heldout(p.prompt,
                                                                                         source.heldout_fraction)]
        if not triples:
            raise ValueError(f"pair source '{source.name}': none of its prompts is held out at heldout_fraction "
                             f"{source.heldout_fraction}; raise heldout_fraction (at most the smallest one the "
                             "reward models were trained with)")
    return triples[:source.n] if source.n else triples


def _synthetic_heldout(n: int, seed: int, fraction: float) -> list[tuple[str, str, str]]:
    """The first ``n`` held-out pairs of the synthetic task's pair stream for ``seed`` (the task's prompt space is
    finite, so a fresh seed alone still repeats training prompts)."""
    drawn = max(64, round(n / fraction * 1.25))
    while True:
        rows = preference_pairs(drawn, seed, noise=0.5, temperature=0.1)
        triples = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]
        triples = [t for t in triples if is_reward_heldout(t[0], fraction)]
        if len(triples) >= n:
            return triples[:n]
        drawn *= 2


def expand_reward_models(spec: str) -> list[tuple[str, str]]:
    """``NAME=DIR``, a saved reward model directory, or a run directory (the checkpoints of its reward stages whose
    manifest says complete: a failed or interrupted one is left out, whatever files it left)."""
    name, path = split_named(spec)
    directory = Path(path)
    if (directory / RUN_FILE).exists():
        stages = [StageDir(d) for d in sorted(directory.iterdir()) if d.is_dir()]
        manifests = {s.name: s.read_manifest() or {} for s in stages}
        rewards = [s for s in stages if manifests[s.name].get("type") == "reward"]
        found = [(s.name, str(s.checkpoint)) for s in rewards
                 if manifests[s.name].get("status") == "complete" and s.checkpoint.is_dir()]
        if not found:
            unfinished = ", ".join(f"{s.name}: {manifests[s.name].get('status', 'unknown')}" for s in rewards)
            raise ValueError(f"run directory {directory} has no completed reward stage"
                             + (f" ({unfinished})" if unfinished else ""))
        return found
    if not (directory / "manifest.json").exists():
        raise ValueError(f"{directory} is not a saved reward model (no manifest.json) nor a run directory")
    label = name or (directory.parent.name if directory.name == "checkpoint" else directory.name)
    return [(label, str(directory))]


def run_reward_suite(spec: SuiteSpec, suite_hash: str, models: list[tuple[str, str]]) -> dict:
    """Every reward model on every source's pairs; one leaderboard row per model."""
    from alignpipe.rewards.loading import load_reward_scorer

    sources = [(source, load_pair_source(source)) for source in spec.pair_sources]
    results = []
    for name, path in models:
        scorer = load_reward_scorer(path)  # on the process's device
        metrics = {}
        for source, triples in sources:
            values = reward_model_metrics(scorer, triples, gold=gold_reward if source.source == "synthetic" else None,
                                          resamples=spec.bootstrap_resamples)
            metrics.update({f"{source.name}/{key}": value for key, value in values.items()})
        manifest = StageDir(Path(path).parent).read_manifest() or {}
        weights = manifest.get("output_sha256") or output_hash(Path(path))
        results.append(CheckpointResult(name=name, path=path, weights_sha256=weights, metrics=metrics))
    return build_leaderboard(
        results, run={"name": f"suite:{spec.name}", "suite_sha256": suite_hash},
        config={"suite": spec.model_dump(), "pair_sources": {s.name: len(t) for s, t in sources},
                "bootstrap_iters": spec.bootstrap_resamples},
        env=package_versions(), suite=spec.name, primary_metric=spec.primary_metric,
    )
