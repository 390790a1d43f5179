"""The ``eval`` stage: the shared harness on the run's checkpoints, writing ``runs/<run>/leaderboard.{json,md,csv}``.

    alignpipe run recipes/quickstart.yaml     # the last stage of the quickstart
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from alignpipe.data.synthetic import evaluation_tasks, task_space
from alignpipe.evaluation.cache import EvalCache, content_key
from alignpipe.evaluation.generation import GenerationSettings
from alignpipe.evaluation.harness import (
    IMPLICIT_PAIR_SEED,
    Checkpoint,
    DiversitySampling,
    evaluate_checkpoints,
    implicit_pairs_record,
    kl_estimator_record,
    sample_files,
    synthetic_implicit_pairs,
    write_sample_files,
)
from alignpipe.evaluation.leaderboard import (
    LEADERBOARD_FILES,
    CheckpointResult,
    build_leaderboard,
    seen_from,
    write_leaderboard,
)
from alignpipe.evaluation.metrics import MetricValue
from alignpipe.evaluation.proxy_scorer import ProxyScorer
from alignpipe.io import atomic_write_json
from alignpipe.pipeline.rundir import StageDir, package_versions, read_run_record
from alignpipe.pipeline.stage import StageContext
from alignpipe.tasks import GoldJudge

log = logging.getLogger("alignpipe")

SUITE = "synthetic"
PRIMARY_METRIC = "gold_reward"
RUN_RESULTS = (*LEADERBOARD_FILES, "report.html")  # what this stage writes at the run root
STAGE_RESULTS = ("results.json", "samples")  # what it writes in its own directory


def _checkpoint(ctx: StageContext, name: str, path: str) -> Checkpoint:
    manifest = StageDir(ctx.run_dir / name).read_manifest() or {}
    return Checkpoint(name=name, path=path, weights_sha256=manifest.get("output_sha256"))


def _reward_row(ctx: StageContext, name: str) -> CheckpointResult:
    """A reward stage's held-out metrics (written by the stage itself, with the shared reward_eval functions)."""
    report = _reward_metrics(ctx.run_dir / name / "reward_eval.json", name)
    metrics = {key: MetricValue(value=v["value"], ci95=tuple(v["ci95"]) if v["ci95"] else None, n=v["n"],
                                higher_is_better=v["higher_is_better"],
                                extra={k: x for k, x in v.items()
                                       if k not in ("value", "ci95", "n", "higher_is_better")
                                       and not isinstance(x, list | dict)})  # tables stay in reward_eval.json
               for key, v in report.items()}
    checkpoint = _checkpoint(ctx, name, ctx.inputs[name])
    return CheckpointResult(name=name, path=checkpoint.path, weights_sha256=checkpoint.weights_sha256, metrics=metrics)


def _recorded_run(ctx: StageContext) -> dict:
    """What the leaderboard records of the run from its ``run.json``: the recipe and the code that ran it. A damaged
    record (cut short, edited by hand) leaves out what cannot be read of it, with a warning, where the stage died
    after evaluating every checkpoint."""
    record, problems = read_run_record(ctx.run_dir)
    for problem in problems:
        log.warning("[%s] %s; the leaderboard records what could be read of the run", ctx.dir.name, problem)
    return {key: record.get(key) for key in ("recipe_path", "recipe_sha256", "git_sha")}


def _reward_metrics(path: Path, stage: str) -> dict:
    """The ``metrics`` of a reward stage's ``reward_eval.json``; a ValueError naming the file and the fix when it is
    damaged (cut short by a full disk, edited), where the stage died on a KeyError or a JSONDecodeError."""
    fix = f"re-run that stage (`alignpipe run RECIPE --force {stage}`)"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: the {stage} stage's held-out metrics cannot be read ({type(error).__name__}: "
                         f"{error}); {fix}") from error
    entries = ("value", "ci95", "n", "higher_is_better")
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) and all(k in v for k in entries)
                                                for v in metrics.values()):
        raise ValueError(f"{path}: 'metrics' is not a mapping of metric entries ({', '.join(entries)}); {fix}")
    return metrics


def _proxy(ctx: StageContext, name: str, cache: EvalCache) -> tuple[ProxyScorer, dict]:
    """A reward stage's model as the proxy scorer (loaded only if a score is not cached), and what the leaderboard
    records of it: the stage and the model's identity (:func:`~alignpipe.rewards.loading.reward_model_identity`),
    which tells two runs' proxies apart, and keys its cached scores, wherever each run lies."""
    from alignpipe.rewards.loading import reward_model_identity

    weights = reward_model_identity(ctx.inputs[name])
    log.info("[%s] proxy reward: the %s stage's model", ctx.dir.name, name)
    scorer = ProxyScorer(ctx.inputs[name], weights, dtype=ctx.recipe.model.dtype, device=ctx.device, cache=cache)
    return scorer, {"proxy": {"stage": name, "sha256": weights}}


def _record_results(ctx: StageContext) -> None:
    """Record what the next run checks is as this stage wrote it before it skips it (``StageDir.published_problem``):
    its results.json and samples/, and apart, the run's leaderboard, checked only while this is the recipe's last eval
    stage (an earlier one's is replaced by the next's). Not report.html: ``alignpipe report`` rewrites it, and it may
    fail without failing the stage."""
    own = [path for path in (ctx.dir.root / name for name in STAGE_RESULTS) if path.exists()]
    ctx.dir.record_results(own, [path for path in (ctx.run_dir / name for name in LEADERBOARD_FILES) if path.exists()])


def _implicit_pairs(ctx: StageContext) -> tuple[list[tuple[str, str, str]] | None, dict]:
    """The pairs for ``implicit_reward_accuracy``, ordered by gold, and what the leaderboard records of them.

    They are drawn on prompts of the task's held-out split
    (:func:`~alignpipe.evaluation.harness.synthetic_implicit_pairs`), which no training stage draws from: sft, dpo,
    reward and the online stages all sample the train split, so no checkpoint has seen these prompts, whatever the
    recipe's seed. (The eval prompts come from the same split with another seed;
    both are unseen.)
    """
    n = ctx.stage.implicit_reward_pairs
    try:
        pairs = synthetic_implicit_pairs(n, task_space(ctx.recipe.data))
    except ValueError as error:  # a small task space has few held-out prompts: the other metrics still count
        log.warning("[%s] no implicit_reward_accuracy: %s (set implicit_reward_pairs lower, or 0)", ctx.dir.name, error)
        return None, {}
    return pairs, {"implicit_reward_pairs": implicit_pairs_record(pairs, "synthetic", "gold", seed=IMPLICIT_PAIR_SEED)}


def run(ctx: StageContext) -> dict:
    stage, recipe = ctx.stage, ctx.recipe
    if ctx.is_main_process:  # the last attempt's results go first: a failed re-run must not leave them looking current
        for name in RUN_RESULTS:
            (ctx.run_dir / name).unlink(missing_ok=True)
    reward_names = [n for n in stage.inputs if recipe.stage(n).type == "reward"]
    policy_names = [n for n in stage.inputs if n not in reward_names]
    checkpoints = [_checkpoint(ctx, "base", ctx.base)] if stage.include_base else []
    checkpoints += [_checkpoint(ctx, name, ctx.inputs[name]) for name in policy_names]
    reference_name = stage.reference or policy_names[0]
    reference = _checkpoint(ctx, reference_name, ctx.inputs[reference_name])
    settings = GenerationSettings(
        max_new_tokens=stage.max_new_tokens, temperature=stage.temperature, top_p=stage.top_p,
        batch_size=stage.batch_size, seed=stage.seed,
    )
    prompts = [task.prompt for task in evaluation_tasks(recipe.data, stage.n_prompts, stage.seed)]
    diversity = DiversitySampling.planned(stage.diversity_samples, stage.diversity_prompts, len(prompts))
    cache = EvalCache(ctx.run_dir.parent / ".cache" / "eval")  # shared by the runs in one runs directory
    proxy_name = recipe.eval_proxy(stage)
    if proxy_name is None and stage.proxy == "auto" and len(reward_names) > 1:
        log.info("[%s] no proxy reward: proxy: auto takes the only reward input, and there are %d (%s); name one "
                 "with proxy: <stage>", ctx.dir.name, len(reward_names), ", ".join(reward_names))
    proxy, proxy_record = _proxy(ctx, proxy_name, cache) if proxy_name else (None, {})
    pairs, pairs_record = _implicit_pairs(ctx) if stage.implicit_reward_pairs else (None, {})
    results, samples = evaluate_checkpoints(
        checkpoints, reference, prompts, GoldJudge(), settings,
        dtype=recipe.model.dtype, bootstrap_resamples=stage.bootstrap_resamples, cache=cache,
        diversity=diversity, proxy=proxy, pairs=pairs,
    )
    if proxy is not None:
        proxy.release()
    samples_dir = ctx.dir.root / "samples"
    written = {s.checkpoint.name: write_sample_files(samples_dir, s.checkpoint.name, sample_files(s)) for s in samples}
    results = [dataclasses.replace(r, samples=f"{samples_dir.name}/{written[r.name]}") for r in results]
    leaderboard = build_leaderboard(
        results,
        run={"name": recipe.name, "stage": ctx.dir.name, "reference": reference_name,
             "reference_sha256": reference.weights_sha256, **_recorded_run(ctx)},
        # the prompts depend on recipe.data as well as the seed: their hash tells a merge whether two runs share them
        config={"generation": settings.__dict__,
                "prompt_set": {"id": f"synthetic/heldout@seed{stage.seed}:{content_key(prompts)[:16]}",
                               "n": len(prompts)},
                "judge": {"type": "gold", "id": GoldJudge.judge_id, "position_swap": True},
                **({"diversity": dataclasses.asdict(diversity)} if diversity else {}), **proxy_record, **pairs_record,
                "bootstrap_iters": stage.bootstrap_resamples, **kl_estimator_record(results)},
        env=package_versions(), suite=SUITE, primary_metric=PRIMARY_METRIC,
        reward_models=[_reward_row(ctx, name) for name in reward_names],
    )
    atomic_write_json(ctx.dir.root / "results.json", leaderboard)  # the stage's record: samples/ lies beside it
    write_leaderboard(seen_from(leaderboard, ctx.dir.name), ctx.run_dir)
    log.info("[%s] %s written to %s", ctx.dir.name, ", ".join(LEADERBOARD_FILES), ctx.run_dir)
    try:  # the HTML report is a view of the run: it must never fail the stage
        from alignpipe.evaluation.report import write_report

        log.info("[%s] report written to %s", ctx.dir.name, write_report(ctx.run_dir, writing_stage=ctx.dir.name))
    except Exception as error:  # noqa: BLE001
        log.warning("[%s] could not write report.html: %r", ctx.dir.name, error)
    if ctx.is_main_process:
        _record_results(ctx)
    return {r.name: r.metrics[PRIMARY_METRIC].value for r in results}
