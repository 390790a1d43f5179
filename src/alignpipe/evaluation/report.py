"""A self-contained HTML report of a run directory (EVALUATION.md §10 "Presentation"): ``runs/<run>/report.html``.

    alignpipe report runs/quickstart        # the eval stage also writes it, after the leaderboard

Three layers, each usable on its own, each in its own module:

* **reading** (:func:`~alignpipe.evaluation.report_data.read_run`, in :mod:`alignpipe.evaluation.report_data`): the
  run directory's JSON/JSONL into plain data (:class:`~alignpipe.evaluation.report_data.RunData`). Nothing is
  computed there beyond dropping records that a resumed stage logged twice (the last one wins, as in the PPO stage);
* **shaping and plotting** (:mod:`alignpipe.evaluation.report_plots`: ``ppo_curve``, ``bon_curves``, ``plot_*``;
  the leaderboard's :func:`checkpoint_flags`): lists in, fitted curves, flags or PNG bytes out. Plots use
  matplotlib's object API on the Agg canvas (no pyplot: no global state, no display needed);
* **HTML** (:func:`render_report`, here): tables, notes and the PNGs inlined as base64 ``data:`` URIs with inline CSS.
  No JavaScript and no reference to any other file or to the network, so the file can be mailed as it is.

The leaderboard's own plots (gold vs √KL with its Pareto frontier, win rate vs length) are also written as PNG files
beside a merged leaderboard by ``alignpipe leaderboard --plots`` (``report_plots.leaderboard_plots``;
``write_leaderboard`` writes them with the tables, all or none), drawn by the same functions as the report's.

A section whose data is absent is replaced by a one-line note saying what is missing; a section whose data cannot
be read is replaced by a note naming the error, so one odd file never costs the rest of the report.
"""

from __future__ import annotations

import base64
import html
import logging
import math
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from alignpipe.evaluation.leaderboard import (
    KL_BUDGET,
    REWARD_COLUMNS,
    checkpoint_flags,
    is_ranked,
    metric_value,
)
from alignpipe.evaluation.leaderboard import MAX_TRUNCATION as TRUNCATION_LIMIT
from alignpipe.evaluation.pareto import KL_METRIC, REWARD_METRICS, gold_vs_kl, row_runs
from alignpipe.evaluation.report_data import RunData, _last_per_key, _round_segments, read_run
from alignpipe.evaluation.report_plots import (
    OveroptCurve,
    _lc_name,
    bon_curves,
    length_points,
    plot_gold_vs_kl,
    plot_overoptimisation,
    plot_ppo_training,
    plot_reliability,
    plot_rounds,
    plot_trl_curves,
    plot_win_rate_vs_length,
    ppo_curve,
)
from alignpipe.io import atomic_write_text
from alignpipe.pipeline.run_lock import run_in_use

__all__ = ["KL_BUDGET", "TRUNCATION_LIMIT", "checkpoint_flags", "render_report", "write_report"]

log = logging.getLogger("alignpipe")

_MISSING = "–"
_ACCURACY_KEYS = ("rewards/accuracies", "accuracy", "mean_token_accuracy")  # second panel of a TRL stage's curves
_KL_METRICS = ("kl_ref_k1", "kl_ref_k3")  # Monte-Carlo KL to the reference: k1 and the low-variance k3 (§8)


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
