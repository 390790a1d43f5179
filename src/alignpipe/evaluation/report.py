"""A self-contained HTML report of a run directory (EVALUATION.md §10 "Presentation"): ``runs/<run>/report.html``.

    alignpipe report runs/quickstart        # the eval stage also writes it, after the leaderboard

Three layers, each usable on its own:

* **reading** (:func:`read_run`): the run directory's JSON/JSONL into plain data (:class:`RunData`). Nothing is
  computed there beyond dropping records that a resumed stage logged twice (the last one wins, as in the PPO stage);
* **shaping and plotting** (:func:`ppo_curve`, :func:`bon_curves`, :func:`checkpoint_flags`, ``plot_*``): lists in,
  fitted curves, flags or PNG bytes out. Plots use matplotlib's object API on the Agg canvas (no pyplot: no global
  state, no display needed);
* **HTML** (:func:`render_report`): tables, notes and the PNGs inlined as base64 ``data:`` URIs with inline CSS.
  No JavaScript and no reference to any other file or to the network, so the file can be mailed as it is.

The leaderboard's own plots (gold vs √KL with its Pareto frontier, win rate vs length) are also written as PNG files
beside a merged leaderboard by ``alignpipe leaderboard --plots`` (:func:`leaderboard_plots`; ``write_leaderboard``
writes them with the tables, all or none), drawn by the same functions as the report's.

A section whose data is absent is replaced by a one-line note saying what is missing; a section whose data cannot
be read is replaced by a note naming the error, so one odd file never costs the rest of the report.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from alignpipe.evaluation.best_of_n import (
    OveroptimisationFit,
    fit_bon,
    fit_measured,
    fit_rl,
    gold_bon,
    gold_rl,
    kl_best_of_n,
)
from alignpipe.evaluation.leaderboard import (
    KL_BUDGET,
    LC_METRICS,
    LEADERBOARD_PLOTS,
    REWARD_COLUMNS,
    checkpoint_flags,
    is_ranked,
    load_leaderboard,
    metric_value,
)
from alignpipe.evaluation.leaderboard import MAX_TRUNCATION as TRUNCATION_LIMIT
from alignpipe.evaluation.pareto import (
    KL_METRIC,
    REWARD_METRICS,
    ZOOM_FACTOR,
    KLPoint,
    gold_vs_kl,
    pareto_front,
    row_runs,
    zoomed,
)
from alignpipe.io import atomic_write_text, why_unreadable
from alignpipe.pipeline.run_lock import run_in_use
from alignpipe.pipeline.rundir import read_json_object, read_run_record

__all__ = ["KL_BUDGET", "LEADERBOARD_PLOTS", "TRUNCATION_LIMIT", "LeaderboardPlots", "LengthPoint", "OveroptCurve",
           "RunData", "StageData", "bon_curves", "checkpoint_flags", "leaderboard_plots", "length_points",
           "plot_gold_vs_kl", "plot_overoptimisation", "plot_ppo_training", "plot_reliability", "plot_rounds",
           "plot_trl_curves", "plot_win_rate_vs_length", "ppo_curve", "read_run", "render_report",
           "write_report"]

log = logging.getLogger("alignpipe")

_MISSING = "–"
_DPI = 100
_ACCURACY_KEYS = ("rewards/accuracies", "accuracy", "mean_token_accuracy")  # second panel of a TRL stage's curves
_LC_METRICS = ("lc_win_rate_vs_ref", "lc_win_rate")  # the harness's name, then EVALUATION.md §9's
_KL_METRICS = ("kl_ref_k1", "kl_ref_k3")  # Monte-Carlo KL to the reference: k1 and the low-variance k3 (§8)
_PEAK_REACH = 1.5  # a fitted peak beyond this many times the largest measured d is extrapolation: not drawn


# ----------------------------------------------------------------------------------------------------- reading

@dataclass
class StageData:
    """One ``runs/<run>/<stage>/`` directory, as stored."""

    name: str
    type: str
    manifest: dict
    records: list[dict]  # metrics.jsonl lines in file order (unparseable lines skipped)
    bon: dict | None = None  # bon/bon.json, read only when the manifest says complete (as reward_eval)
    reward_eval: dict | None = None  # reward/reward_eval.json


@dataclass
class RunData:
    name: str
    root: Path
    run_record: dict  # run.json
    stages: list[StageData]  # in the order they started
    leaderboard: dict | None = None
    leaderboard_error: str | None = None  # why a present leaderboard.json could not be read
    errors: list[str] = field(default_factory=list)  # files that could not be read


def _read_json(path: Path, errors: list[str]) -> dict | None:
    data, problem = read_json_object(path)
    if problem:
        errors.append(problem)
    return data


def _read_jsonl(path: Path, errors: list[str], *, running: bool) -> list[dict]:
    """The JSON object records of a ``metrics.jsonl``. Lines that are not one are left out and named in ``errors``
    (the file is damaged: a full disk, a hand edit), except the last line of a stage still ``running``, which may be
    being appended."""
    if not path.exists():
        return []
    records, bad = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as error:
        errors.append(f"{path.name} in {path.parent.name}: {why_unreadable(error)}")
        return []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip() and not (running and number == len(lines)):
            bad.append(number)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        which = f"line {shown} of {len(lines)} is not a JSON record" if len(bad) == 1 else \
            f"lines {shown} of {len(lines)} are not JSON records"
        errors.append(f"{path.name} in {path.parent.name}: {which} (the file is damaged: cut short, or edited); its "
                      "curves below leave those lines out")
    return records


def read_run(run_dir: Path) -> RunData:
    """Everything the report shows, read from ``run_dir`` (nothing written)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: not a run directory")
    errors: list[str] = []
    stages = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        manifest = _read_json(sub / "manifest.json", errors)
        if manifest is None and not (sub / "metrics.jsonl").exists():
            continue
        manifest = manifest or {}
        # a stage's result files count only once it is complete: a failed or interrupted attempt may have left some
        done = manifest.get("status") == "complete"
        stages.append(StageData(
            name=sub.name, type=str(manifest.get("type") or sub.name), manifest=manifest,
            records=_read_jsonl(sub / "metrics.jsonl", errors, running=manifest.get("status") == "running"), bon=_read_json(sub / "bon.json", errors) if done else None,
            reward_eval=_read_json(sub / "reward_eval.json", errors) if done else None))
    started = {s.name: str(s.manifest.get("start_time") or s.manifest.get("end_time") or "") for s in stages}
    stages.sort(key=lambda s: (not started[s.name], started[s.name], s.name))  # ISO times sort as text
    run_record, problems = read_run_record(root)
    errors += problems
    data = RunData(name=str(run_record.get("run") or root.name), root=root, run_record=run_record, stages=stages,
                   errors=errors)
    if (root / "leaderboard.json").exists():
        try:
            data.leaderboard = load_leaderboard(root / "leaderboard.json")
        except (OSError, ValueError) as error:
            data.leaderboard_error = str(error)
    return data


def _last_per_key(records: Sequence[dict], key: str, require: str | None = None) -> list[dict]:
    """Records carrying ``key`` (and ``require``), one per value of ``key`` (the last logged), sorted by it."""
    by_key = {r[key]: r for r in records if key in r and (require is None or require in r)}
    return [by_key[k] for k in sorted(by_key)]


def _round_segments(records: Sequence[dict], metric: str) -> list[list[dict]]:
    """An iterative stage's trainer lines split by round: the lines before the ``round`` r record are round r's."""
    segments: list[list[dict]] = [[]]
    for r in records:
        if "round" in r:
            segments.append([])
        elif "step" in r and metric in r:
            segments[-1].append(r)
    return [_last_per_key(s, "step") for s in segments if s]


# ---------------------------------------------------------------------------------------------- shaping (pure)

@dataclass(frozen=True)
class OveroptCurve:
    """Gold and proxy reward gains over the ``d = 0`` point against ``d = √KL``, with Gao et al.'s fit.

    ``proxy`` is the reward the policy was optimised (best-of-n: selected) by: with an uncertainty penalty the
    penalised reward, named by ``proxy_name`` (``"min"``, ``"mean_minus_std (coef 1)"``), and the raw ensemble mean
    beside it as ``raw_proxy``; without one the proxy itself (``proxy_name`` ``"proxy"``, no ``raw_proxy``).
    """

    label: str
    d: list[float]
    gold: list[float]
    gold_ci: list[tuple[float, float]] | None  # the gold level's 95% CI, shifted by the same baseline
    proxy: list[float] | None
    fit: OveroptimisationFit | None
    fit_note: str | None = None  # why there is no fit
    proxy_name: str = "proxy"
    raw_proxy: list[float] | None = None  # the unpenalised ensemble mean's gains, when proxy is penalised


def _penalty_name(penalty: str | None, coef: float | None) -> str:
    """How the report names a penalised reward: its mode, with the coefficient when it takes one."""
    if not penalty:
        return "penalised reward"  # recorded before stages named their penalty
    return f"{penalty} (coef {coef:g})" if coef else penalty


def _gains(values: Sequence[float] | None) -> list[float] | None:
    return [v - values[0] for v in values] if values else None


def _ppo_rewards(evaluations: Sequence[dict]) -> tuple[list[float] | None, str, list[float] | None]:
    """The optimised reward's levels, its name and the raw proxy's levels (None unless the two differ).

    A PPO stage optimises the penalised reward (``penalised_reward``, named by ``reward_penalty``); it is the raw
    proxy exactly when the penalty is ``mean`` (or the source is not an ensemble). Records from before stages named
    their penalty count as penalised when the two values differ.
    """
    raw = [e["proxy_reward"] for e in evaluations] if all(
        e.get("proxy_reward") is not None for e in evaluations) else None
    if not evaluations or not all(e.get("penalised_reward") is not None for e in evaluations):
        return raw, "proxy", None
    penalty = evaluations[-1].get("reward_penalty")
    penalised = [e["penalised_reward"] for e in evaluations]
    if penalty == "mean" or (penalty is None and penalised == raw):
        return raw, "proxy", None
    return penalised, _penalty_name(penalty, evaluations[-1].get("reward_penalty_coef")), raw


def ppo_curve(label: str, evaluations: Sequence[dict]) -> OveroptCurve:
    """A PPO stage's held-out evaluations (``eval_step`` lines, step order) as gains over the first one.

    The RL form ``d(α − β log d)`` is fitted to the later points by :func:`fit_measured`, as the PPO stage's own
    summary is.
    """
    base = evaluations[0]
    d = [float(e["sqrt_kl"]) if e.get("sqrt_kl") is not None else math.sqrt(max(float(e["kl"]), 0.0))
         for e in evaluations]
    gold = [e["gold_reward"] - base["gold_reward"] for e in evaluations]
    ci = None
    if all(e.get("gold_reward_ci95") for e in evaluations):
        ci = [(e["gold_reward_ci95"][0] - base["gold_reward"], e["gold_reward_ci95"][1] - base["gold_reward"])
              for e in evaluations]
    proxy, proxy_name, raw = _ppo_rewards(evaluations)
    fit, note = fit_measured(fit_rl, d[1:], gold[1:])
    return OveroptCurve(label, d, gold, ci, _gains(proxy), fit, note, proxy_name, _gains(raw))


def bon_curves(bon: dict) -> list[OveroptCurve]:
    """``bon.json``'s curves (one per selection rule) as gains over ``n = 1``, each with the BoN fit ``d(α − βd)``.

    The selection by the penalised reward shows that reward (named by ``bon.json``'s penalty) and the raw mean
    beside it; the selection by the mean shows the mean, the reward it selected by.
    """
    ns = bon["ns"]
    d = [float(x) for x in bon.get("sqrt_kl") or np.sqrt(kl_best_of_n(ns)).tolist()]
    reward = bon.get("reward") or {}
    curves = []
    for selection, curve in bon["curves"].items():
        gold = [g - curve["gold"][0] for g in curve["gold"]]
        ci = [(lo - curve["gold"][0], hi - curve["gold"][0]) for lo, hi in curve["gold_ci95"]] \
            if curve.get("gold_ci95") else None
        proxy, proxy_name, raw = _gains(curve.get("proxy")), "proxy", None
        if selection == "penalised" and curve.get("penalised"):
            proxy, raw = _gains(curve["penalised"]), proxy
            proxy_name = _penalty_name(reward.get("penalty"), reward.get("penalty_coef"))
        fit, note = fit_measured(fit_bon, d, gold)
        curves.append(OveroptCurve(f"best-of-n ({selection})", d, gold, ci, proxy, fit, note, proxy_name, raw))
    return curves


def _lc_name(results: dict) -> str | None:
    """The length-controlled win-rate metric a row carries, under either name (harness or EVALUATION.md §9)."""
    return next((name for name in LC_METRICS if name in results), None)


def _lc_value(results: dict) -> float | None:
    name = _lc_name(results)
    return metric_value(results, name) if name else None


@dataclass(frozen=True)
class LengthPoint:
    name: str
    length: float
    win_rate: float
    win_rate_ci: tuple[float, float] | None
    lc_win_rate: float | None = None


def length_points(checkpoints: Sequence[dict]) -> list[LengthPoint]:
    """Leaderboard rows with both ``win_rate_vs_ref`` and ``len_tokens_mean``, as points (other rows left out)."""
    points = []
    for c in checkpoints:
        res = c["results"]
        wr, length = metric_value(res, "win_rate_vs_ref"), metric_value(res, "len_tokens_mean")
        if wr is None or length is None:
            continue
        ci = res["win_rate_vs_ref"].get("ci95")
        points.append(LengthPoint(c["name"], length, wr, tuple(ci) if ci else None, _lc_value(res)))
    return points


# ---------------------------------------------------------------------------------------------- plotting (pure)

def _plain_text(plot: Callable[..., bytes]) -> Callable[..., bytes]:
    """Draw ``plot``'s text as written: checkpoint and stage names go into labels and titles, and matplotlib would read
    a ``$`` in one as mathtext (a balanced pair drawn as maths, an odd one a ValueError that lost the plot)."""
    @functools.wraps(plot)
    def drawn(*args, **kwargs) -> bytes:
        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)
    return drawn


def _figure(rows: int, cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _errorbar(ax, x, y, ci, **kwargs):
    """Points with asymmetric 95% CI bars (plain points when ``ci`` is None); returns the artist for a legend."""
    if ci is None:
        return ax.plot(x, y, linestyle="none", **kwargs)[0]
    lower = [max(v - lo, 0.0) for v, (lo, _) in zip(y, ci)]
    upper = [max(hi - v, 0.0) for v, (_, hi) in zip(y, ci)]
    return ax.errorbar(x, y, yerr=[lower, upper], linestyle="none", capsize=2, elinewidth=0.8, **kwargs)


def _sorted_by_x(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    return [x[i] for i in order], [y[i] for i in order]


@_plain_text
def plot_overoptimisation(curves: Sequence[OveroptCurve], form: str, title: str) -> bytes:
    """Gold gain (points, 95% CI, fitted Gao curve, peak ★) and proxy gain vs ``d``; one colour per curve.

    ``form``: ``"rl"`` for ``d(α − β log d)``, ``"bon"`` for ``d(α − βd)``.
    """
    model = {"rl": gold_rl, "bon": gold_bon}[form]
    fig, (gold_ax, proxy_ax) = _figure(1, 2, 12, 4.6)
    d_max = max((max(c.d) for c in curves), default=1.0) or 1.0
    for i, c in enumerate(curves):
        colour = f"C{i % 10}"
        label = c.label
        _errorbar(gold_ax, c.d, c.gold, c.gold_ci, marker="o", markersize=4, color=colour,
                  alpha=0.8 if len(curves) < 3 else 0.5)
        if c.fit is not None:
            peak_ok = math.isfinite(c.fit.peak_d) and 0 < c.fit.peak_d
            shown = peak_ok and c.fit.peak_d <= _PEAK_REACH * d_max  # a far extrapolated peak would squash the data
            right = max(d_max, c.fit.peak_d) if shown else d_max
            grid = np.linspace(0.0, right * 1.02, 200)
            gold_ax.plot(grid, model(grid, c.fit.alpha, c.fit.beta), color=colour, linewidth=1.6)
            if shown:
                gold_ax.plot([c.fit.peak_d], [c.fit.peak_r], marker="*", markersize=14, color=colour,
                             markeredgecolor="black", linestyle="none")
            label += (f"  (d*={c.fit.peak_d:.2f}" + ("" if shown else ", off the plot") + ")") if peak_ok \
                else "  (no peak in fit)"
        gold_ax.plot([], [], color=colour, marker="o", label=label)
        if c.proxy is not None:
            proxy_ax.plot(*_sorted_by_x(c.d, c.proxy), marker="o", markersize=4, linewidth=1, color=colour,
                          label=c.label if c.raw_proxy is None else f"{c.label}: {c.proxy_name}")
        if c.raw_proxy is not None:
            proxy_ax.plot(*_sorted_by_x(c.d, c.raw_proxy), linestyle="--", linewidth=1, color=colour,
                          label=f"{c.label}: raw ensemble mean")
    form_text = {"rl": "d(α − β log d)", "bon": "d(α − βd)"}[form]
    for ax, what in ((gold_ax, "gold"), (proxy_ax, "proxy")):
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("d = √KL(π ‖ π_init)")
        ax.set_ylabel(f"{what} reward gain over d = 0")
    gold_ax.set_title(f"{title}: gold (points ± 95% CI, line = fit {form_text}, ★ = fitted peak)", fontsize=10)
    dashed = "; dashed = raw ensemble mean" if any(c.raw_proxy is not None for c in curves) else ""
    proxy_ax.set_title(f"{title}: proxy (the reward being optimised{dashed})", fontsize=10)
    gold_ax.legend(fontsize=8)
    if proxy_ax.has_data():
        proxy_ax.legend(fontsize=8)
    return _png(fig)


@_plain_text
def plot_win_rate_vs_length(points: Sequence[LengthPoint]) -> bytes:
    """Raw win rate (● ± 95% CI) and, when present, LC win rate (□) against mean response length, per checkpoint."""
    fig, (ax,) = _figure(1, 1, 9, 4.6)
    handles = []
    for i, p in enumerate(points):
        colour = f"C{i % 10}"
        ci = [(100 * p.win_rate_ci[0], 100 * p.win_rate_ci[1])] if p.win_rate_ci else None
        handles.append(_errorbar(ax, [p.length], [100 * p.win_rate], ci, marker="o", markersize=7, color=colour,
                                 label=f"{p.name}: {100 * p.win_rate:.1f}% at {p.length:.3g} tokens"))
        if p.lc_win_rate is not None:
            handles += ax.plot([p.length], [100 * p.lc_win_rate], marker="s", markersize=7, markerfacecolor="none",
                               color=colour, linestyle="none", label=f"{p.name} LC: {100 * p.lc_win_rate:.1f}%")
            ax.plot([p.length, p.length], [100 * p.win_rate, 100 * p.lc_win_rate], color=colour, linewidth=0.8,
                    linestyle=":")
    ax.axhline(50.0, color="grey", linewidth=0.8)
    ax.set_xlabel("mean response length (tokens)")
    ax.set_ylabel("win rate vs reference (%)")
    has_lc = any(p.lc_win_rate is not None for p in points)
    ax.set_title("win rate vs length: ● raw ± 95% CI" + (", □ length-controlled" if has_lc else ""), fontsize=10)
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


@_plain_text
def plot_gold_vs_kl(points: Sequence[KLPoint], reward_name: str = "gold_reward",
                    runs: Sequence[str] = ()) -> bytes:
    """Reward (● ± 95% CI) vs √KL to the reference, one labelled point per checkpoint, and the Pareto frontier as a
    step line: the best reward reached at no more KL (○ marks its checkpoints). Rows of several runs are coloured by
    run (in the order of ``runs``, e.g. the merge's sources, then as met) and labelled by checkpoint; a KL estimate
    below 0 is drawn at 0 (see :mod:`alignpipe.evaluation.pareto`). When a few checkpoints lie far out in KL (an
    untrained model), a second panel shows the others alone (:func:`~alignpipe.evaluation.pareto.zoomed`)."""
    if not points:
        raise ValueError("no checkpoint with a reward and a KL to draw")
    near = zoomed(points)
    fig, axes = _figure(1, 2, 14, 4.6) if near else _figure(1, 1, 9, 4.6)
    met = {p.run for p in points if p.run is not None}
    runs = [r for r in dict.fromkeys([*runs, *(p.run for p in points if p.run is not None)]) if r in met]
    by_run = len(runs) > 1

    def key(p: KLPoint) -> str:
        return str(p.run) if by_run else p.name

    colours = {k: f"C{i % 10}" for i, k in enumerate(dict.fromkeys([*(runs if by_run else []), *map(key, points)]))}
    negative = " (k1 estimates below 0 drawn at 0)" if any(p.kl < 0 for p in points) else ""
    panels = [(axes[0], points, f"{reward_name} vs √KL: ● checkpoint ± 95% CI, line = Pareto frontier (○ on it)")]
    if near:
        panels.append((axes[1], near, f"zoom: the {len(near)} checkpoints within {ZOOM_FACTOR:g}× the median √KL"))
    for ax, shown, title in panels:
        for p in shown:
            _errorbar(ax, [p.d], [p.reward], [p.reward_ci] if p.reward_ci else None, marker="o", markersize=6,
                      color=colours[key(p)])
            label = p.name[len(p.run) + 1:] if by_run and p.run else p.name
            ax.annotate(label, (p.d, p.reward), xytext=(5, 4), textcoords="offset points", fontsize=7,
                        color=colours[key(p)])
        front = [shown[i] for i in pareto_front([(p.kl, p.reward) for p in shown])]
        ax.step([p.d for p in front], [p.reward for p in front], where="post", color="black", linewidth=1.2,
                alpha=0.7, zorder=1, label="Pareto frontier")  # under the points and their CI bars
        ax.plot([p.d for p in front], [p.reward for p in front], marker="o", markersize=12, markerfacecolor="none",
                markeredgecolor="black", linestyle="none", zorder=1)
        ax.set_xlabel(f"√KL(π ‖ π_ref), {KL_METRIC}{negative}")
        ax.set_ylabel(reward_name)
        ax.set_title(title, fontsize=10)
    legend_ax = axes[-1]
    for run in runs if by_run else []:
        legend_ax.plot([], [], marker="o", linestyle="none", color=colours[run], label=run)
    legend_ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


@_plain_text
def plot_reliability(table: Sequence[dict], title: str) -> bytes:
    """Reliability diagram from :func:`~alignpipe.evaluation.reward_metrics.reliability_table` rows."""
    rows = [r for r in table if r.get("count")]
    fig, (ax, hist) = _figure(1, 2, 10, 4.2)
    ax.plot([0.5, 1.0], [0.5, 1.0], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    ax.plot([r["mean_confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o", label="bins")
    ax.set(xlabel="confidence max(p, 1 − p)", ylabel="accuracy of the predicted side", xlim=(0.48, 1.02),
           ylim=(-0.02, 1.02))
    ax.set_title(f"{title}: reliability", fontsize=10)
    ax.legend(fontsize=8)
    hist.bar([(r["lo"] + r["hi"]) / 2 for r in rows], [r["count"] for r in rows],
             width=[0.9 * (r["hi"] - r["lo"]) for r in rows])
    hist.set(xlabel="confidence", ylabel="pairs", xlim=(0.48, 1.02))
    hist.set_title("pairs per bin", fontsize=10)
    return _png(fig)


@_plain_text
def plot_trl_curves(title: str, steps: Sequence[float], loss: Sequence[float],
                    accuracy: tuple[str, Sequence[float], Sequence[float]] | None = None) -> bytes:
    """Training loss vs step, and an accuracy-like metric ``(name, steps, values)`` beside it when logged."""
    fig, axes = _figure(1, 2 if accuracy else 1, 12 if accuracy else 7, 3.4)
    axes[0].plot(steps, loss, marker=".", linewidth=1.2)
    axes[0].set(xlabel="step", ylabel="loss")
    axes[0].set_title(f"{title}: training loss", fontsize=10)
    if accuracy:
        name, x, y = accuracy
        axes[1].plot(x, y, marker=".", linewidth=1.2, color="C1")
        axes[1].set(xlabel="step", ylabel=name)
        axes[1].set_title(f"{title}: {name}", fontsize=10)
    return _png(fig)


@_plain_text
def plot_rounds(title: str, rounds: Sequence[dict], loss_segments: Sequence[Sequence[dict]]) -> bytes:
    """An iterative stage: gold reward, win rate and KL vs the initial policy per round (± 95% CI), and the
    trainer loss of every round end to end (dotted lines separate the rounds)."""
    fig, axes = _figure(2, 2, 12, 6.4)
    x = [r["round"] for r in rounds]
    panels = (("gold_reward", "gold reward"), ("win_rate_vs_initial", "win rate vs initial"),
              ("kl_initial_k3", "KL to initial (k3, nats)"))
    for ax, (key, name) in zip(axes, panels):
        if all(key in r for r in rounds):
            ci = [tuple(r[f"{key}_ci95"]) for r in rounds] if all(r.get(f"{key}_ci95") for r in rounds) else None
            _errorbar(ax, x, [r[key] for r in rounds], ci, marker="o", markersize=5)
            ax.plot(x, [r[key] for r in rounds], linewidth=1, color="C0")
        ax.set(xlabel="round", ylabel=name, xticks=x)
        ax.set_title(f"{title}: {name} per round", fontsize=10)
    offset, loss_ax = 0.0, axes[3]
    for i, segment in enumerate(loss_segments):
        loss_ax.plot([offset + r["step"] for r in segment], [r["loss"] for r in segment], marker=".", color="C0")
        if i:
            loss_ax.axvline(offset, color="grey", linestyle=":", linewidth=1)
        offset += max(r["step"] for r in segment)
    loss_ax.set(xlabel="trainer step (rounds end to end)", ylabel="loss")
    loss_ax.set_title(f"{title}: training loss", fontsize=10)
    return _png(fig)


@_plain_text
def plot_ppo_training(title: str, iterations: Sequence[dict], evaluations: Sequence[dict]) -> bytes:
    """A PPO stage: train gold/proxy reward per iteration (lines) with the held-out evaluations (markers, gold
    ± 95% CI) overlaid, and the KL to the initial policy likewise. With an uncertainty penalty the proxy drawn solid
    (filled markers) is the penalised reward the stage optimised, and the raw ensemble mean is dashed (hollow)."""
    fig, (reward_ax, kl_ax) = _figure(1, 2, 12, 3.8)
    steps = [r["step"] for r in iterations]
    eval_steps = [e["eval_step"] for e in evaluations]
    optimised, name, raw = _ppo_rewards(evaluations)
    penalised = raw is not None
    proxies = [("reward/penalised", "-", f"proxy ({name})"), ("reward/proxy", "--", "proxy (raw ensemble mean)")] \
        if penalised else [("reward/proxy", "-", "proxy")]
    for key, colour, style, label in [("reward/gold", "C0", "-", "gold"), *((k, "C1", *rest) for k, *rest in proxies)]:
        if iterations and all(key in r for r in iterations):
            reward_ax.plot(steps, [r[key] for r in iterations], color=colour, linestyle=style, linewidth=1,
                           alpha=0.6, label=f"train {label}")
    if evaluations:
        ci = [tuple(e["gold_reward_ci95"]) for e in evaluations] \
            if all(e.get("gold_reward_ci95") for e in evaluations) else None
        _errorbar(reward_ax, eval_steps, [e["gold_reward"] for e in evaluations], ci, marker="o", markersize=5,
                  color="C0", label="held-out gold ± 95% CI")
        if optimised is not None:
            reward_ax.plot(eval_steps, optimised, marker="s", markersize=5, color="C1", linestyle="none",
                           label=f"held-out proxy ({name})" if penalised else "held-out proxy")
        if penalised:
            reward_ax.plot(eval_steps, raw, marker="s", markersize=5, color="C1", markerfacecolor="none",
                           linestyle="none", label="held-out proxy (raw ensemble mean)")
        kl_ax.plot(eval_steps, [e["kl"] for e in evaluations], marker="o", color="C2", linestyle="none",
                   label="held-out KL (k1)")
    if iterations and all("kl" in r for r in iterations):
        kl_ax.plot(steps, [r["kl"] for r in iterations], color="C2", linewidth=1, alpha=0.6, label="train KL")
    reward_ax.set(xlabel="iteration", ylabel="reward")
    reward_ax.set_title(f"{title}: reward", fontsize=10)
    kl_ax.set(xlabel="iteration", ylabel="KL(π ‖ π_init), nats")
    kl_ax.set_title(f"{title}: KL", fontsize=10)
    for ax in (reward_ax, kl_ax):
        if ax.has_data():
            ax.legend(fontsize=8)
    return _png(fig)


# ------------------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1240px;padding:0 16px;
color:#222;font-size:14px;line-height:1.4}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #d6d6d6;padding:3px 8px;text-align:right;vertical-align:top}
td{white-space:nowrap}.scroll{overflow-x:auto}
th{background:#f2f2f2}td.l,th.l{text-align:left}
tr.flagged td{background:#fff4f2}
.flag{display:inline-block;background:#c0392b;color:#fff;border-radius:3px;padding:0 5px;margin:1px 0;
font-size:12px;text-align:left;white-space:normal;max-width:360px}
.note{color:#555;font-style:italic}.meta td{border:none;text-align:left;padding:1px 10px 1px 0}
code{font-size:12px;background:#f6f6f6;padding:0 3px}
img{max-width:100%;display:block;margin:6px 0 14px}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(x: float | None, ref: float | None = None) -> str:
    """``x`` with the decimals that give ``ref`` (default ``x``) 3 significant digits, so a CI lines up."""
    if x is None:
        return _MISSING
    if not math.isfinite(x):
        return str(x)
    ref = x if ref is None else ref
    if ref != 0 and abs(ref) < 1e-3:
        return f"{x:.2e}"
    decimals = 3 if ref == 0 else min(6, max(0, 2 - math.floor(math.log10(abs(ref)))))
    return f"{x:.{decimals}f}"


def _metric(entry: dict | None, *, percent: bool = False) -> str:
    """``value [lo, hi]`` (or ``value ± stderr``); ``percent``: × 100 with one decimal, for rates."""
    if not isinstance(entry, dict) or entry.get("value") is None:
        return _MISSING
    scale = 100.0 if percent else 1.0
    value = float(entry["value"]) * scale

    def fmt(x: float) -> str:
        return f"{x:.1f}" if percent and math.isfinite(x) else _fmt(x, value)

    text = fmt(value) + ("%" if percent else "")
    if entry.get("ci95"):
        lo, hi = (float(b) * scale for b in entry["ci95"])
        text += f" [{fmt(lo)}, {fmt(hi)}]"
    elif entry.get("stderr") is not None:
        text += f" ± {fmt(float(entry['stderr']) * scale)}"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1,
           row_classes: Sequence[str] | None = None) -> str:
    """Cells are HTML already; the first ``left`` columns are left-aligned."""
    def cls(i: int) -> str:
        return ' class="l"' if i < left else ""
    out = ['<div class="scroll"><table><tr>' + "".join(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(header)) + "</tr>"]
    for j, row in enumerate(rows):
        attr = f' class="{row_classes[j]}"' if row_classes and row_classes[j] else ""
        out.append(f"<tr{attr}>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    return "\n".join(out) + "</table></div>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _header(run: RunData) -> str:
    record = run.run_record
    board_run = (run.leaderboard or {}).get("run", {})
    recipe = record.get("recipe_path") or board_run.get("recipe_path")
    sha = record.get("recipe_sha256") or board_run.get("recipe_sha256")
    git = record.get("git_sha") or board_run.get("git_sha")
    meta = [("run directory", f"<code>{_e(run.root)}</code>"),
            ("recipe", f"<code>{_e(recipe or _MISSING)}</code>" + (f" (sha256 <code>{_e(sha)}</code>)" if sha else "")),
            ("git commit", f"<code>{_e(git or _MISSING)}</code>")]
    if record.get("overrides"):
        meta.append(("overrides", " ".join(f"<code>{_e(o)}</code>" for o in record["overrides"])))
    if attempt := _last_attempt(record):
        meta.append(("last attempt", _e(attempt)))
    meta.append(("report written", _e(datetime.now(timezone.utc).isoformat(timespec="seconds"))))
    rows = [[_e(s.name), _e(s.type), _e(s.manifest.get("status", _MISSING)),
             _fmt(s.manifest.get("wall_time_s")) if s.manifest.get("wall_time_s") is not None else _MISSING,
             _e(s.manifest.get("end_time") or _MISSING)] for s in run.stages]
    parts = [f"<h1>Run report: {_e(run.name)}</h1>",
             '<table class="meta">' + "".join(f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in meta)
             + "</table>"]
    if rows:
        parts += ["<h3>Stages</h3>", _table(["stage", "type", "status", "wall time (s)", "finished"], rows, left=3)]
    parts += [_note(f"could not read {e}") for e in run.errors]
    if record.get("status") in (*_UNFINISHED, UNRECORDED_END):
        stopped_at = record.get("stopped_at")
        where = ("the stages not marked complete above and those after them" if stopped_at is None
                 else "every stage" if stopped_at == BASE_MODEL else f"stage '{stopped_at}' and those after it")
        parts.append(_note(f"The run's last attempt did not finish: {where} (an eval stage, and so the leaderboard "
                           "below, among them) may hold an earlier attempt's outputs, made under the recipe and "
                           "overrides that attempt had. Run it again to bring them up to date."))
    return "\n".join(parts)


_UNFINISHED = ("interrupted", "failed")
UNRECORDED_END = "ended unrecorded"  # run.json says running, but nothing holds the run directory: killed
BASE_MODEL = "base"  # run.json's stopped_at while the run prepared the recipe's model, before any stage


def _last_attempt(record: dict) -> str | None:
    """How the run's last attempt ended, from ``run.json`` (None for a record from before it said)."""
    status = record.get("status")
    if status == "running":
        return f"running since {record.get('started', _MISSING)}" + (
            f" (this report was written by its stage '{record['writing_stage']}')" if record.get("writing_stage")
            else "")
    if status == UNRECORDED_END:
        return (f"stopped without recording its end (killed, or its machine went down); it started "
                f"{record.get('started', _MISSING)}")
    if status in _UNFINISHED:
        at = record.get("stopped_at", _MISSING)
        where = "while preparing the recipe's model" if at == BASE_MODEL else f"at stage '{at}'"
        return f"{status} {where} ({record.get('updated', _MISSING)})"
    return f"{status} ({record.get('updated', _MISSING)})" if status else None


def _leaderboard_section(run: RunData, kl_budget: float) -> str:
    board = run.leaderboard
    if board is None:
        why = (f"leaderboard.json could not be read: {run.leaderboard_error}" if run.leaderboard_error else
               "No leaderboard.json in this run (no eval stage has run), so there is no checkpoint table.")
        return _note(why)
    primary = board["suite"]["primary_metric"]
    directions = board.get("higher_is_better", {})
    checkpoints = board["checkpoints"]
    has_lc = any(_lc_name(c["results"]) for c in checkpoints)
    header = ["rank", "checkpoint", f"{_e(primary)} [95% CI]", "n", "win rate vs ref [95% CI]<br>wins / losses / ties"]
    header += ["LC win rate"] if has_lc else []
    header += ["KL to ref [95% CI], nats", "length mean / median", "truncation", "flags"]
    rows, classes, warnings = [], [], []
    for rank, c in enumerate(checkpoints, start=1):
        res = c["results"]
        wr = res.get("win_rate_vs_ref") or {}
        kl_name = next((m for m in _KL_METRICS if m in res), None)
        kl = metric_value(res, kl_name) if kl_name else None
        flags = checkpoint_flags(res, kl_budget=kl_budget)
        warnings += [f"{c['name']}: {f}" for f in flags if f.startswith("LC/raw")]
        counts = " / ".join(str(wr.get(k, _MISSING)) for k in ("n_wins", "n_losses", "n_ties"))
        row = [str(rank) if is_ranked(res, primary) else _MISSING, _e(c["name"]), _metric(res.get(primary)),
               _e(res.get(primary, {}).get("n", _MISSING)),
               _metric(wr, percent=True) + (f"<br><small>{counts}</small>" if "n_wins" in wr else "")]
        row += [_metric(res.get(_lc_name(res) or ""), percent=True)] if has_lc else []
        row += [_metric(res.get(kl_name or "")) + (f"<br><small>{kl_name[-2:]}, √KL {_fmt(math.sqrt(kl))}</small>"
                                                   if kl is not None and kl >= 0 else ""),
                f"{_fmt(metric_value(res, 'len_tokens_mean'))} / {_fmt(metric_value(res, 'len_tokens_median'))}",
                _metric(res.get("truncation_rate"), percent=True),
                "<br>".join(f'<span class="flag">{_e(_short_flag(f))}</span>' for f in flags)]
        rows.append(row)
        classes.append("flagged" if flags else "")
    suite = board["suite"]
    arrow = {True: "↑", False: "↓"}.get(directions.get(primary), "")
    parts = [f"<p>Suite <code>{_e(suite['name'])}</code>, ranked by <code>{_e(primary)}</code> {arrow}; reference "
             f"<code>{_e(board.get('run', {}).get('reference', _MISSING))}</code>; evaluated {_e(board.get('date'))}. "
             f"Flags: truncation &gt; {100 * TRUNCATION_LIMIT:g}%, KL (k1 or k3) &gt; {kl_budget:g} nats, and a large "
             "length-controlled vs raw win-rate gap.</p>",
             _table(header, rows, left=2, row_classes=classes), *(_note(w) for w in warnings)]
    metrics = list(directions)
    all_rows = [[_e(c["name"]), *(_metric(c["results"].get(m)) for m in metrics)] for c in checkpoints]
    parts.append("<details><summary>all metrics</summary>" + _table(["checkpoint", *map(_e, metrics)], all_rows)
                 + "</details>")
    return "\n".join(parts)


def _short_flag(flag: str) -> str:
    """The table's badge: the LC warning is a paragraph, so the badge keeps its numbers and the note below the rest."""
    if not flag.startswith("LC/raw"):
        return flag
    gap = re.search(r"by ([+-][\d.]+ points \(limit [\d.]+\))", flag)
    return f"LC/raw gap {gap.group(1)}" if gap else "LC/raw gap"


def _overopt_section(run: RunData) -> str:
    parts = []
    ppo = [(s.name, _last_per_key(s.records, "eval_step", "gold_reward")) for s in run.stages]
    ppo = [(name, evals) for name, evals in ppo if evals]
    if ppo:
        curves = [ppo_curve(name, evals) for name, evals in ppo]
        parts += ["<h3>RL (PPO): held-out gold and proxy reward vs √KL</h3>",
                  _img(plot_overoptimisation(curves, "rl", "RL"), "gold and proxy reward vs sqrt KL, PPO stages"),
                  _fit_table(curves, "each stage's first held-out evaluation (normally step 0, the initial policy)")]
    else:
        parts.append(_note("No PPO stage with held-out evaluations (eval_step lines) in this run."))
    bons = [s for s in run.stages if s.bon and s.bon.get("curves")]
    for stage in bons:
        curves = bon_curves(stage.bon)
        parts += [f"<h3>Best-of-n ({_e(stage.name)}): gold and proxy reward vs √KL_bon</h3>",
                  _img(plot_overoptimisation(curves, "bon", "BoN"), "best-of-n gold and proxy reward vs sqrt KL"),
                  _fit_table(curves, "n = 1 (the initial policy)"),
                  _note(f"KL_bon = log n − (n − 1)/n for n = {', '.join(map(str, stage.bon['ns']))}; "
                        f"{stage.bon.get('n_prompts', '?')} prompts × {stage.bon.get('n_samples', '?')} samples.")]
    if not bons:
        parts.append(_note("No best-of-n stage (bon.json) in this run."))
    return "\n".join(parts)


def _fit_table(curves: Sequence[OveroptCurve], baseline: str) -> str:
    raw = any(c.raw_proxy is not None for c in curves)
    rows = []
    for c in curves:
        best = int(np.argmax(c.gold))
        fit = c.fit
        row = [_e(c.label), str(len(c.d)), _fmt(max(c.d)), _fmt(c.gold[-1]), _e(c.proxy_name),
               _fmt(c.proxy[-1]) if c.proxy else _MISSING]
        row += [_fmt(c.raw_proxy[-1]) if c.raw_proxy else _MISSING] if raw else []
        rows.append(row + [f"{_fmt(c.gold[best])} at d = {_fmt(c.d[best])}",
                           _fmt(fit.alpha) if fit else _MISSING, _fmt(fit.beta) if fit else _MISSING,
                           _e(_peak_text(c))])
    header = ["curve", "points", "max d", "last gold gain", "proxy optimised", "last proxy gain"]
    header += ["last raw-mean gain"] if raw else []
    header += ["best measured gold gain", "α", "β", "fitted peak"]
    return _table(header, rows) + _note(f"Gains are relative to {baseline}; error bars are the 95% CI of the "
                                        "gold level at that point.")


def _peak_text(c: OveroptCurve) -> str:
    if c.fit is None:
        return f"no fit: {c.fit_note}"
    if not math.isfinite(c.fit.peak_d):
        return "none: gold still rising in the fit"
    text = f"d* = {_fmt(c.fit.peak_d)} (KL {_fmt(c.fit.peak_d ** 2)}), gain {_fmt(c.fit.peak_r)}"
    return text + (" — extrapolated beyond the data" if c.fit.peak_d > max(c.d) else "")


def _pareto_section(run: RunData) -> str:
    if run.leaderboard is None:
        return _note("No leaderboard.json, so no checkpoints to place by reward and KL.")
    shaped = gold_vs_kl(run.leaderboard)
    if not shaped.points:
        reward = shaped.reward_metric or " or ".join(REWARD_METRICS)
        return _note(f"No checkpoint has both {reward} and {KL_METRIC} (KL to the reference), so there is no "
                     "frontier to draw.")
    results = {c["name"]: c["results"] for c in run.leaderboard["checkpoints"]}
    front = [shaped.points[i] for i in shaped.front]
    proxy = any("proxy_reward" in results[p.name] for p in front)
    header = ["checkpoint", f"{_e(shaped.reward_metric)} [95% CI]", "KL to ref, k1 [95% CI], nats", "√KL"]
    header += ["proxy_reward [95% CI]"] if proxy else []
    rows = [[_e(p.name), _metric(results[p.name].get(shaped.reward_metric)), _metric(results[p.name].get(KL_METRIC)),
             _fmt(p.d)] + ([_metric(results[p.name].get("proxy_reward"))] if proxy else []) for p in front]
    notes = [f"The frontier, by increasing KL: {len(front)} of the {len(shaped.points)} checkpoints placed. A "
             f"checkpoint is on it when no other has both lower-or-equal KL and higher-or-equal "
             f"{shaped.reward_metric}, one strictly."]
    if negative := [p.name for p in shaped.points if p.kl < 0]:
        notes.append(f"{KL_METRIC} below 0 (Monte-Carlo noise; true KL is never negative) for {', '.join(negative)}: "
                     "drawn and compared at √KL = 0.")
    notes += [shaped.note()] if shaped.note() else []
    return "\n".join([_img(plot_gold_vs_kl(shaped.points, shaped.reward_metric, row_runs(run.leaderboard)),
                            f"{shaped.reward_metric} vs sqrt KL with the Pareto frontier"),
                       _table(header, rows), *map(_note, notes)])


def _length_section(run: RunData) -> str:
    if run.leaderboard is None:
        return _note("No leaderboard.json, so no per-checkpoint win rates and lengths.")
    points = length_points(run.leaderboard["checkpoints"])
    if not points:
        return _note("No checkpoint has both win_rate_vs_ref and len_tokens_mean.")
    note = "" if any(p.lc_win_rate is not None for p in points) else _note(
        "No length-controlled win rate (lc_win_rate_vs_ref / lc_win_rate) on this leaderboard: raw win rates only.")
    return _img(plot_win_rate_vs_length(points), "win rate vs mean response length") + note


# The leaderboard's reward table (one list, so the two never drift apart) plus ECE's rescaling factor after NLL.
_REWARD_COLUMNS = tuple(c for name in REWARD_COLUMNS
                        for c in ((name, "calibration_scale") if name == "nll" else (name,)))


def _reward_cell(entry: dict | None, n_pairs: int | None) -> str:
    """A metric with its CI on a second line, and its own n where it counts other items than the row's pairs
    (gold-decided pairs, off-distribution or policy samples), as the leaderboard's table marks it."""
    text = _metric(entry).replace(" [", "<br><small>[").replace("]", "]</small>")
    n = entry.get("n") if isinstance(entry, dict) else None
    return text + (f" <small>(n={_e(n)})</small>" if n is not None and n != n_pairs else "")


def _reward_section(run: RunData) -> str:
    models = {s.name: s.reward_eval.get("metrics", {}) for s in run.stages if s.reward_eval}
    unfinished = {s.name: s.manifest.get("status", _MISSING) for s in run.stages
                  if s.type == "reward" and s.manifest.get("status") != "complete"}
    for row in (run.leaderboard or {}).get("reward_models") or []:
        if row["name"] not in unfinished:  # else the row is of a model that stage no longer holds
            models.setdefault(row["name"], row["results"])
    notes = [_note(f"Not shown: reward stage {name} (status {status}); its metrics count once it is complete.")
             for name, status in unfinished.items()]
    if not models:
        return "\n".join([_note("No reward model in this run (no reward_eval.json of a complete reward stage, no "
                                 "reward_models on the leaderboard)."), *notes])
    columns = [c for c in _REWARD_COLUMNS if any(c in m for m in models.values())]
    rows = [[_e(name), *(_reward_cell(m.get(c), m.get("accuracy", {}).get("n")) for c in columns),
             _e(m.get("accuracy", {}).get("n", _MISSING))] for name, m in models.items()]
    header = [_e(c).replace("_", "_<wbr>") for c in columns]  # long metric names may break after an underscore
    parts = [_table(["reward model", *header, "n pairs"], rows)]
    for name, m in models.items():
        ece = m.get("ece") or {}
        table = ece.get("reliability")
        if table:
            parts.append(_img(plot_reliability(table, name), f"reliability diagram of {name}"))
        elif ece:
            parts.append(_note(
                f"{name}: ECE {_metric(ece)} over {ece.get('bins', '?')} bins (largest bin gap {_fmt(ece.get('mce'))}, "
                f"mean confidence {_fmt(ece.get('mean_confidence'))} vs accuracy {_fmt(ece.get('accuracy'))}). "
                "The reliability diagram needs per-bin counts or per-pair predictions, which this run does not store "
                "(reward_eval.json keeps only the summary)."))
    return "\n".join(parts + notes)


def _training_section(run: RunData) -> str:
    parts, skipped = [], []
    for s in run.stages:
        rounds = _last_per_key(s.records, "round")
        evaluations = _last_per_key(s.records, "eval_step", "gold_reward")
        iterations = _last_per_key(s.records, "step", "reward/gold")
        title = f"{s.name} ({s.type})"
        if rounds:
            png = plot_rounds(title, rounds, _round_segments(s.records, "loss"))
        elif evaluations or iterations:
            png = plot_ppo_training(title, iterations, evaluations)
        elif losses := _last_per_key(s.records, "step", "loss"):
            accuracy = next(((k, [r["step"] for r in losses if k in r], [r[k] for r in losses if k in r])
                             for k in _ACCURACY_KEYS if any(k in r for r in losses)), None)
            png = plot_trl_curves(title, [r["step"] for r in losses], [r["loss"] for r in losses], accuracy)
        else:
            skipped.append(s.name)
            continue
        status = s.manifest.get("status")
        parts += [f"<h3>{_e(title)}" + (f" — status: {_e(status)}" if status and status != "complete" else "")
                  + "</h3>", _img(png, f"training curves of {s.name}")]
    if not parts:
        return _note("No stage logged training metrics (metrics.jsonl with step/loss, round or eval_step lines).")
    if skipped:
        parts.append(_note(f"No training curves for: {', '.join(skipped)} (no step/loss, round or eval_step lines)."))
    return "\n".join(parts)


_SECTIONS: tuple[tuple[str, str, Callable], ...] = (
    ("leaderboard", "1. Leaderboard", lambda run, kl: _leaderboard_section(run, kl)),
    ("overoptimisation", "2. Over-optimisation: reward vs √KL", lambda run, kl: _overopt_section(run)),
    # gold_reward, or a reward-model judge's judge_reward (the section names which)
    ("pareto", "3. Reward vs KL: the Pareto frontier", lambda run, kl: _pareto_section(run)),
    ("length", "4. Win rate vs response length", lambda run, kl: _length_section(run)),
    ("reward-models", "5. Reward models: accuracy and calibration", lambda run, kl: _reward_section(run)),
    ("training", "6. Training curves", lambda run, kl: _training_section(run)),
)


def render_report(run: RunData, *, kl_budget: float = KL_BUDGET) -> str:
    """The whole report as one HTML string (images inlined)."""
    body = [_header(run)]
    for anchor, title, build in _SECTIONS:
        try:
            content = build(run, kl_budget)
        except Exception as error:  # noqa: BLE001 - one unreadable section must not cost the rest of the report
            log.warning("report section %r of %s failed: %r", anchor, run.root, error)
            content = _note(f"This section could not be drawn: {type(error).__name__}: {error}")
        body.append(f'<section id="{anchor}">\n<h2>{_e(title)}</h2>\n{content}\n</section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>alignpipe report: {_e(run.name)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body)
            + "\n<p class=\"note\">Generated by alignpipe.evaluation.report from the run directory; "
              "do not edit.</p>\n</body></html>\n")


def write_report(run_dir: Path, *, kl_budget: float = KL_BUDGET, writing_stage: str | None = None) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path.

    ``writing_stage``: the stage calling this from inside its own run (the eval stage), whose manifest is only marked
    complete after it returns; its row says so instead of "running".
    """
    run = read_run(Path(run_dir))
    for stage in run.stages:
        if stage.name == writing_stage and stage.manifest.get("status") == "running":
            stage.manifest = {**stage.manifest, "status": "finishing (wrote this report)"}
    if run.run_record.get("status") == "running":
        if writing_stage is not None:
            run.run_record = {**run.run_record, "writing_stage": writing_stage}
        elif run_in_use(run.root) is None:  # no run or stage process holds the directory: it was killed
            run.run_record = {**run.run_record, "status": UNRECORDED_END}
    return atomic_write_text(run.root / "report.html", render_report(run, kl_budget=kl_budget))


# ------------------------------------------------------------------------------------------ leaderboard plots



@dataclass(frozen=True)
class LeaderboardPlots:
    """The plots drawn for a leaderboard, kept apart from writing them so nothing is written until all are drawn."""

    pngs: dict[str, bytes]  # file name -> PNG, for the plots the leaderboard has data for
    notes: list[str]  # one line per plot skipped or per rows a plot leaves out, saying why


def leaderboard_plots(board: dict) -> LeaderboardPlots:
    """A (merged) leaderboard's plots, drawn before anything is written, so a failure leaves the old files alone."""
    gold_file, length_file = LEADERBOARD_PLOTS
    pngs, notes = {}, []
    shaped = gold_vs_kl(board)
    if shaped.points:
        pngs[gold_file] = plot_gold_vs_kl(shaped.points, shaped.reward_metric, row_runs(board))
        notes += [f"{gold_file}: {shaped.note()}"] if shaped.note() else []
    else:
        reward = shaped.reward_metric or " or ".join(REWARD_METRICS)
        notes.append(f"{gold_file} not drawn: no checkpoint has both {reward} and {KL_METRIC}")
    points = length_points(board["checkpoints"])
    if points:
        pngs[length_file] = plot_win_rate_vs_length(points)
        drawn = {p.name for p in points}
        if left := [c["name"] for c in board["checkpoints"] if c["name"] not in drawn]:
            notes.append(f"{length_file}: Not placed (no value of win_rate_vs_ref and len_tokens_mean): "
                         f"{', '.join(left)}.")
    else:
        notes.append(f"{length_file} not drawn: no checkpoint has both win_rate_vs_ref and len_tokens_mean")
    return LeaderboardPlots(pngs, notes)
