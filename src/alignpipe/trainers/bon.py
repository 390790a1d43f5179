"""The ``bon`` stage: the best-of-n over-optimisation curve of a policy under a reward (ALGORITHMS.md §15).

Why one sampling pass: Coste et al.'s unbiased estimator gives the exact expected score of best-of-``n`` for every
``n <= N`` from the same ``N`` samples per prompt, and best-of-n's KL to the policy is analytic
(``log n − (n − 1)/n``), so the whole curve costs ``N`` samples per held-out prompt and no reference model. Gao et
al.'s form ``d(α − βd)`` is fitted to (``d = sqrt(KL)``, gold gain over ``n = 1``) from ``N >= 5`` (three ``n > 1``;
two would be matched exactly whatever they are); a reward penalty (UP-RLHF, WCO, UWO) should move its peak to larger
``n``, which is why selection by the raw ensemble mean is recorded beside it.

Writes ``bon.json`` (the curves, fits and settings), ``samples.jsonl`` (every sample with its scores) and one line
per ``n`` to ``metrics.jsonl``. The stage has no checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import math

import numpy as np

from alignpipe.data.synthetic import evaluation_tasks
from alignpipe.evaluation.best_of_n import best_of_n_curve, fit_bon, fit_measured, kl_best_of_n, n_for_kl_best_of_n
from alignpipe.evaluation.generation import GenerationSettings, generate
from alignpipe.evaluation.metrics import bootstrap_ci
from alignpipe.io import atomic_write_json, atomic_write_text
from alignpipe.models.loading import load_causal_lm, load_tokenizer
from alignpipe.pipeline.stage import StageContext
from alignpipe.rewards.plugin import make_reward_source
from alignpipe.tasks import gold_reward
from alignpipe.trainers.common import append_metrics

log = logging.getLogger("alignpipe")

BOOTSTRAP_RESAMPLES = 1000  # the eval stage's default: CIs resample prompts, the unit of independence


def best_of_n_grid(num_samples: int) -> list[int]:
    """``n = 1, 2, 4, ...`` up to ``N``, plus ``N`` itself."""
    return sorted({2**k for k in range(num_samples.bit_length()) if 2**k <= num_samples} | {num_samples})


def run(ctx: StageContext) -> dict:
    stage, recipe = ctx.stage, ctx.recipe
    prompts = [task.prompt for task in evaluation_tasks(recipe.data, stage.n_prompts, stage.seed)]
    settings = GenerationSettings(max_new_tokens=stage.max_new_tokens, temperature=stage.temperature, top_p=1.0,
                                  batch_size=stage.batch_size * stage.n_samples, seed=stage.seed)
    responses = _sample(ctx, prompts, settings)
    flat_prompts = [p for p in prompts for _ in range(stage.n_samples)]
    reward_path = ctx.inputs[stage.inputs[1]] if len(stage.inputs) == 2 else None
    source = make_reward_source(stage.reward, reward_path, dtype=recipe.model.dtype, device=ctx.device)
    scored = source(flat_prompts, responses, update=False)  # one call: one UP-RLHF offset for every prompt
    shape = (len(prompts), stage.n_samples)
    scores = {
        "gold": np.array([gold_reward(p, r) for p, r in zip(flat_prompts, responses)]).reshape(shape),
        "proxy": scored.proxy.double().numpy().reshape(shape),
    }
    selectors = {"mean": scores["proxy"]}  # the raw ensemble mean (the score itself for gold/callable sources)
    if stage.reward.penalty != "mean":
        scores["penalised"] = selectors["penalised"] = scored.reward.double().numpy().reshape(shape)
    selection = "penalised" if "penalised" in selectors else "mean"

    ns = best_of_n_grid(stage.n_samples)
    kl = np.asarray(kl_best_of_n(ns), dtype=np.float64)
    curves = {name: selection_curve(select, scores, ns, np.sqrt(kl), seed=stage.seed)
              for name, select in selectors.items()}
    main = curves[selection]
    std = scored.std.double().numpy().reshape(shape) if scored.std is not None else None
    report = {
        "selection": selection, "n_prompts": len(prompts), "n_samples": stage.n_samples, "ns": ns,
        "kl_bon": kl.tolist(), "sqrt_kl": np.sqrt(kl).tolist(),
        "reward": {**stage.reward.model_dump(mode="json"), "id": source.name},
        "mean_gold": float(scores["gold"].mean()), "mean_proxy": float(scores["proxy"].mean()),
        "mean_ensemble_std": float(std.mean()) if std is not None else None,
        # KL_bon is exact only without proxy ties; repeated samples tie, so below 1 it is an upper bound
        "distinct_fraction": float(np.mean([len(set(responses[i * shape[1]:(i + 1) * shape[1]])) / shape[1]
                                            for i in range(shape[0])])),
        "curves": curves,
        "config": {"generation": settings.__dict__, "prompt_set": {"id": f"synthetic/heldout@seed{stage.seed}",
                                                                   "n": len(prompts)},
                   "bootstrap_iters": BOOTSTRAP_RESAMPLES},
    }
    if ctx.is_main_process:
        _write(ctx, report, flat_prompts, responses, scores, std)
    log.info("[%s] best-of-n by %s: gold %.3f (n=1) -> %.3f (n=%d); fitted peak n = %s", ctx.dir.name, selection,
             main["gold"][0], main["gold"][-1], ns[-1], main["fit"] and main["fit"]["peak_n"])
    fit = main["fit"] or {}
    return {
        "selection": selection, "gold_n1": main["gold"][0], "gold_nN": main["gold"][-1],
        "proxy_n1": main["proxy"][0], "proxy_nN": main["proxy"][-1],
        "best_n": ns[int(np.argmax(main["gold"]))], "peak_n": fit.get("peak_n"),
        "fit_alpha": fit.get("alpha"), "fit_beta": fit.get("beta"),
    }


def selection_curve(select: np.ndarray, scores: dict[str, np.ndarray], ns: list[int], d: np.ndarray, *,
                    seed: int) -> dict:
    """Expected best-of-n value of each score when the ``[P, N]`` ``select`` scores pick, averaged over prompts.

    Each score gets its mean per ``n`` and a bootstrap CI over prompts; the gold gain over ``n = 1`` is fitted
    with Gao et al.'s best-of-n form (``None`` unless ``MIN_FIT_POINTS`` of the ``n > 1`` are measured:
    :func:`fit_measured`, the rule the report draws its fit by).
    """
    curve: dict = {}
    for name, values in scores.items():
        per_prompt = np.stack([best_of_n_curve(s, v, ns) for s, v in zip(select, values)])  # [P, len(ns)]
        curve[name] = per_prompt.mean(axis=0).tolist()
        curve[f"{name}_ci95"] = [list(bootstrap_ci(per_prompt[:, j], resamples=BOOTSTRAP_RESAMPLES, seed=seed))
                                 for j in range(len(ns))]
    gain = np.asarray(curve["gold"]) - curve["gold"][0]
    curve["gold_gain"] = gain.tolist()
    fit, _ = fit_measured(fit_bon, d, gain)
    curve["fit"] = None
    if fit is not None:
        curve["fit"] = {"form": "d(alpha - beta d)", "alpha": fit.alpha, "beta": fit.beta,
                        "peak_d": _finite(fit.peak_d), "peak_gold_gain": _finite(fit.peak_r),
                        "peak_n": _finite(n_for_kl_best_of_n(fit.peak_d ** 2))}
    return curve


def _finite(value: float) -> float | None:
    """JSON has no infinity: an unbounded peak (no over-optimisation within the fit) is stored as null."""
    return float(value) if math.isfinite(value) else None


def _sample(ctx: StageContext, prompts: list[str], settings: GenerationSettings) -> list[str]:
    """``n_samples`` responses per prompt from the policy (the stage's first input), grouped by prompt."""
    path = ctx.inputs[ctx.stage.inputs[0]]
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, dtype=ctx.recipe.model.dtype, device=ctx.device)
    repeated = [p for p in prompts for _ in range(ctx.stage.n_samples)]
    responses = [g.response for g in generate(model, tokenizer, repeated, settings, desc="best-of-n sampling")]
    del model
    gc.collect()  # free the policy before the reward model loads
    return responses


def _write(ctx: StageContext, report: dict, prompts: list[str], responses: list[str], scores: dict[str, np.ndarray],
           std: np.ndarray | None) -> None:
    atomic_write_json(ctx.dir.root / "bon.json", report)
    flat = {name: values.reshape(-1).tolist() for name, values in scores.items()}
    if std is not None:
        flat["ensemble_std"] = std.reshape(-1).tolist()
    rows = [{"prompt": p, "response": r, **{k: v[i] for k, v in flat.items()}}
            for i, (p, r) in enumerate(zip(prompts, responses))]
    atomic_write_text(ctx.dir.root / "samples.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    selection = report["selection"]
    for j, n in enumerate(report["ns"]):
        record = {"n": n, "kl_bon": report["kl_bon"][j], "sqrt_kl": report["sqrt_kl"][j], "selection": selection}
        for name in sorted(report["curves"], key=lambda name: name != selection):  # the selection's own first
            prefix = "" if name == selection else f"by_{name}/"
            record.update({f"{prefix}{key}": values[j] for key, values in report["curves"][name].items()
                           if key != "fit"})
        append_metrics(ctx.dir.metrics, record)
