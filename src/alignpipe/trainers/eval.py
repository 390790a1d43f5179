"""The ``eval`` stage: the shared harness on the run's checkpoints, writing ``runs/<run>/leaderboard.{json,md}``.

    alignpipe run recipes/quickstart.yaml     # the last stage of the quickstart
"""

from __future__ import annotations

import dataclasses
import json
import logging

from alignpipe.data.synthetic import evaluation_tasks, task_space
from alignpipe.evaluation.cache import EvalCache, content_key
from alignpipe.evaluation.generation import GenerationSettings
from alignpipe.evaluation.harness import (
    Checkpoint,
    DiversitySampling,
    diversity_rows,
    evaluate_checkpoints,
    implicit_rows,
    kl_estimator_record,
    sample_rows,
)
from alignpipe.evaluation.leaderboard import (
    LEADERBOARD_FILES,
    CheckpointResult,
    build_leaderboard,
    write_leaderboard,
)
from alignpipe.evaluation.metrics import MetricValue
from alignpipe.evaluation.proxy_scorer import ProxyScorer
from alignpipe.evaluation.reward_suite import gold_ordered_heldout_pairs
from alignpipe.io import atomic_write_json, atomic_write_text
from alignpipe.pipeline.rundir import RUN_FILE, StageDir, package_versions
from alignpipe.pipeline.stage import StageContext
from alignpipe.tasks import GoldJudge

log = logging.getLogger("alignpipe")

SUITE = "synthetic"
PRIMARY_METRIC = "gold_reward"
RUN_RESULTS = (*LEADERBOARD_FILES, "report.html")  # what this stage writes at the run root
IMPLICIT_PAIR_SEED = 4242  # the reward-models suite's synthetic seed: no shipped recipe trains on it
IMPLICIT_HELDOUT_FRACTION = 0.1  # a reward stage's default heldout_fraction


def _checkpoint(ctx: StageContext, name: str, path: str) -> Checkpoint:
    manifest = StageDir(ctx.run_dir / name).read_manifest() or {}
    return Checkpoint(name=name, path=path, weights_sha256=manifest.get("output_sha256"))


def _reward_row(ctx: StageContext, name: str) -> CheckpointResult:
    """A reward stage's held-out metrics (written by the stage itself, with the shared reward_eval functions)."""
    report = json.loads((ctx.run_dir / name / "reward_eval.json").read_text())["metrics"]
    metrics = {key: MetricValue(value=v["value"], ci95=tuple(v["ci95"]) if v["ci95"] else None, n=v["n"],
                                higher_is_better=v["higher_is_better"],
                                extra={k: x for k, x in v.items()
                                       if k not in ("value", "ci95", "n", "higher_is_better")
                                       and not isinstance(x, list | dict)})  # tables stay in reward_eval.json
               for key, v in report.items()}
    checkpoint = _checkpoint(ctx, name, ctx.inputs[name])
    return CheckpointResult(name=name, path=checkpoint.path, weights_sha256=checkpoint.weights_sha256, metrics=metrics)


def _proxy(ctx: StageContext, name: str, cache: EvalCache) -> tuple[ProxyScorer, dict]:
    """A reward stage's model as the proxy scorer (loaded only if a score is not cached), and what the leaderboard
    records of it: the stage and its weights' hash, which tell two runs' proxies apart."""
    weights = (StageDir(ctx.run_dir / name).read_manifest() or {}).get("output_sha256")
    log.info("[%s] proxy reward: the %s stage's model", ctx.dir.name, name)
    scorer = ProxyScorer(ctx.inputs[name], weights, dtype=ctx.recipe.model.dtype, device=ctx.device, cache=cache)
    return scorer, {"proxy": {"stage": name, "sha256": weights}}


def _implicit_pairs(ctx: StageContext) -> tuple[list[tuple[str, str, str]], dict]:
    """The held-out pairs for ``implicit_reward_accuracy``, ordered by gold, and what the leaderboard records of them.

    What they are unseen by: they come from the synthetic task's pair stream for :data:`IMPLICIT_PAIR_SEED` in the
    recipe's task space, kept only where :func:`~alignpipe.data.preference.is_reward_heldout` holds their prompt out at
    0.1, so a reward stage on the synthetic task with ``heldout_fraction >= 0.1`` (the default) never trains on their
    prompts, whatever its seed. A dpo stage holds nothing out: it trains on every pair of the stream for the recipe's
    seed, drawn from the same train split of a finite prompt space. Another seed draws other tasks and responses, so
    its pairs are not these, but prompts can coincide: against a default 2000-pair stream (seeds 0 to 3 and 42), 4 to
    11 of 256 prompts did, and 0 to 2 of the pairs themselves (responses in either order); SFT demonstrations come from
    that split too. A recipe whose seed is 4242 would draw these prompts, and at the default pair settings these pairs,
    for its dpo stage. The eval prompts of :func:`evaluation_tasks` are another split, never trained on.
    """
    n = ctx.stage.implicit_reward_pairs
    pairs = gold_ordered_heldout_pairs(n, IMPLICIT_PAIR_SEED, IMPLICIT_HELDOUT_FRACTION, task_space(ctx.recipe.data))
    record = {"source": "synthetic", "seed": IMPLICIT_PAIR_SEED, "heldout_fraction": IMPLICIT_HELDOUT_FRACTION,
              "labels": "gold", "n": len(pairs), "sha256": content_key(pairs)[:16]}
    return pairs, {"implicit_reward_pairs": record}


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
    diversity = (DiversitySampling(stage.diversity_samples, min(stage.diversity_prompts, len(prompts)))
                 if stage.diversity_samples else None)
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
    for checkpoint_samples in samples:
        rows = sample_rows(checkpoint_samples)
        atomic_write_text(samples_dir / f"{checkpoint_samples.checkpoint.name}.jsonl",
                          "".join(json.dumps(r) + "\n" for r in rows))
        if checkpoint_samples.diversity_groups:
            atomic_write_text(samples_dir / f"{checkpoint_samples.checkpoint.name}.diversity.jsonl",
                              "".join(json.dumps(r) + "\n" for r in diversity_rows(checkpoint_samples)))
        if checkpoint_samples.implicit_margins is not None:
            atomic_write_text(samples_dir / f"{checkpoint_samples.checkpoint.name}.implicit.jsonl",
                              "".join(json.dumps(r) + "\n" for r in implicit_rows(checkpoint_samples)))
    record = ctx.run_dir / RUN_FILE
    run_record = json.loads(record.read_text()) if record.exists() else {}
    leaderboard = build_leaderboard(
        results,
        run={"name": recipe.name, "stage": ctx.dir.name, "reference": reference_name,
             "reference_sha256": reference.weights_sha256, "recipe_path": run_record.get("recipe_path"),
             "recipe_sha256": run_record.get("recipe_sha256"),
             "git_sha": run_record.get("git_sha")},
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
    atomic_write_json(ctx.dir.root / "results.json", leaderboard)
    json_path, md_path = write_leaderboard(leaderboard, ctx.run_dir)
    log.info("[%s] leaderboard written to %s and %s", ctx.dir.name, json_path, md_path)
    try:  # the HTML report is a view of the run: it must never fail the stage
        from alignpipe.evaluation.report import write_report

        log.info("[%s] report written to %s", ctx.dir.name, write_report(ctx.run_dir, writing_stage=ctx.dir.name))
    except Exception as error:  # noqa: BLE001
        log.warning("[%s] could not write report.html: %r", ctx.dir.name, error)
    return {r.name: r.metrics[PRIMARY_METRIC].value for r in results}
