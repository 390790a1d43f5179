"""Shaping and plotting for the report (:mod:`alignpipe.evaluation.report`) and the leaderboard's plots.

Lists in, fitted curves (:func:`ppo_curve`, :func:`bon_curves`), points (:func:`length_points`) or PNG bytes
(``plot_*``, :func:`leaderboard_plots`) out: no file is read or written here. Plots use matplotlib's object API on the
Agg canvas (no pyplot: no global state, no display needed). Apart from the HTML so that ``alignpipe leaderboard
--plots`` draws with the same functions as the report without the report's page.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
from alignpipe.evaluation.leaderboard import LC_METRICS, LEADERBOARD_PLOTS, metric_value
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

__all__ = ["LEADERBOARD_PLOTS", "LeaderboardPlots", "LengthPoint", "OveroptCurve", "bon_curves", "leaderboard_plots",
           "length_points", "plot_gold_vs_kl", "plot_overoptimisation", "plot_ppo_training", "plot_reliability",
           "plot_rounds", "plot_trl_curves", "plot_win_rate_vs_length", "ppo_curve"]

_DPI = 100
_PEAK_REACH = 1.5  # a fitted peak beyond this many times the largest measured d is extrapolation: not drawn


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
    """Raw win rate (● ± 95% CI) and, when present, LC win rate (□) against mean response length, per
    checkpoint."""
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
    frontier_title = f"{reward_name} vs √KL: ● checkpoint ± 95% CI, line = Pareto frontier (○ on it)"
    panels = [(axes[0], points, frontier_title)]
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
