"""Leaderboard: one versioned JSON record per suite plus a Markdown table generated from it.

The JSON is the source of truth (EVALUATION.md §9 envelope: ``schema_version``, ``run``, ``suite``, ``config``,
``higher_is_better``, ``env``, ``date``); ``leaderboard.md`` and ``leaderboard.csv`` are rendered from it and never
hand-edited (§10), with per-row flags (truncation above 5 %, KL above a budget, LC vs raw win-rate disagreement).
Checkpoints are ranked by the suite's primary metric, in that metric's declared direction.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import html
import io
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from alignpipe.evaluation.length_control import lc_gap_warning
from alignpipe.evaluation.metrics import MetricValue
from alignpipe.io import atomic_open_all, json_text, why_unreadable

log = logging.getLogger("alignpipe")
SCHEMA_VERSION = "1.0"
_REQUIRED_KEYS = ("schema_version", "run", "suite", "config", "checkpoints", "higher_is_better", "env", "date")
_MISSING = "–"
KL_BUDGET = 10.0  # nats per sequence (k3) above which a row is flagged
MAX_TRUNCATION = 0.05  # responses without EOS above which a row is flagged (EVALUATION.md §10)
LC_METRICS = ("lc_win_rate_vs_ref", "lc_win_rate")  # the harness's name, and EVALUATION.md §9's
_ARROW = {True: "↑", False: "↓", None: ""}
_DIRECTION = {True: "↑ higher is better", False: "↓ lower is better", None: "no preferred direction (diagnostic)"}


@dataclass
class CheckpointResult:
    """One leaderboard row: a checkpoint and its metrics on the suite."""

    name: str  # row label, e.g. "base", "sft", "dpo"
    path: str  # checkpoint path or hub id
    weights_sha256: str | None
    metrics: dict[str, MetricValue]  # e.g. gold_reward, win_rate_vs_ref, kl_ref_k1, kl_ref_k3, truncation_rate
    # Its per-sample JSONL, relative to the leaderboard's directory (any other sample files of the row sit beside it
    # with the same stem): what makes each number traceable to its generations and judgments (EVALUATION.md §10).
    samples: str | None = None


REWARD_COLUMNS = ("accuracy", "gold_accuracy", "label_gold_agreement", "ece", "ece_unscaled", "brier", "nll",
                  "uncertainty_auroc", "uncertainty_auroc_std", "uncertainty_auroc_probability_std",
                  "uncertainty_auroc_std_at_fixed_margin", "margin_auroc_baseline", "uncertainty_auroc_gold",
                  "uncertainty_auroc_std_gold", "member_std", "member_std_off_distribution",
                  "off_distribution_std_ratio", "policy_std_vs_proxy_gold_gap_spearman")


def _rows(results: list[CheckpointResult]) -> list[dict]:
    return [
        {"name": r.name, "path": r.path, "weights_sha256": r.weights_sha256,
         **({"samples": r.samples} if r.samples else {}),
         "results": {metric: mv.to_dict() for metric, mv in r.metrics.items()}}
        for r in results
    ]


def build_leaderboard(
    results: list[CheckpointResult], *, run: dict, config: dict, env: dict, suite: str, primary_metric: str,
    reward_models: list[CheckpointResult] = (),
) -> dict:
    """Assemble the leaderboard record, checkpoints sorted best-first by ``primary_metric``.

    Raises ``ValueError`` when the ranking would be meaningless: duplicate row names, a metric whose direction
    differs between checkpoints, a primary metric that no checkpoint has or that has no direction.
    Checkpoints lacking the primary metric are kept, last; equal values keep their input order. Reward models
    (held-out accuracy, calibration, uncertainty) form their own table, in input order.
    """
    names = [r.name for r in results]
    if dups := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"duplicate checkpoint names: {dups}")
    directions: dict[str, bool | None] = {}
    for r in results:
        for metric, mv in r.metrics.items():
            if directions.setdefault(metric, mv.higher_is_better) != mv.higher_is_better:
                raise ValueError(
                    f"metric {metric!r} has higher_is_better={directions[metric]} in one checkpoint "
                    f"and {mv.higher_is_better} in {r.name!r}"
                )
    if primary_metric not in directions:
        raise ValueError(f"primary metric {primary_metric!r} is in no checkpoint's metrics; have {sorted(directions)}")
    higher = directions[primary_metric]
    if higher is None:
        raise ValueError(f"cannot rank by {primary_metric!r}: it declares no direction (higher_is_better=None)")

    def rank_key(r: CheckpointResult) -> tuple[int, float]:
        mv = r.metrics.get(primary_metric)
        if mv is None or not math.isfinite(mv.value):  # as is_ranked: such a row is listed last, unranked
            return (1, 0.0)
        return (0, -mv.value if higher else mv.value)

    return {
        "schema_version": SCHEMA_VERSION,
        "run": copy.deepcopy(run),
        "suite": {"name": suite, "primary_metric": primary_metric},
        "config": copy.deepcopy(config),
        "checkpoints": _rows(sorted(results, key=rank_key)),
        "reward_models": _rows(list(reward_models)),
        "higher_is_better": directions,
        "env": copy.deepcopy(env),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def seen_from(leaderboard: dict, subdirectory: str) -> dict:
    """``leaderboard`` as written one level up from ``subdirectory``: its rows' relative sample paths prefixed with
    it (the eval stage's record lies in its stage directory, the run's leaderboard in the run directory)."""
    moved = copy.deepcopy(leaderboard)
    for row in moved["checkpoints"]:
        if row.get("samples") and not os.path.isabs(row["samples"]):
            row["samples"] = f"{subdirectory}/{row['samples']}"
    return moved


LEADERBOARD_PLOTS = ("gold_vs_kl.png", "win_rate_vs_length.png")  # what `alignpipe leaderboard --plots` writes


# EVALUATION.md §10's table columns: reward and its gain over the reference, KL, proxy gain and gap, raw and LC win
# rate, length, truncation, distinct-2. The headline table shows those a board has; "All metrics" shows every one.
HEADLINE_METRICS = ("gold_reward", "judge_reward", "gold_reward_delta_vs_ref", "judge_reward_delta_vs_ref", "kl_ref_k1",
                    "proxy_reward_delta_vs_ref", "proxy_gold_gap", "win_rate_vs_ref", "lc_win_rate_vs_ref",
                    "len_tokens_mean", "truncation_rate", "distinct_2")


def render_markdown(leaderboard: dict) -> str:
    """A headline table (EVALUATION.md §10's columns, flags included), then every metric when there are more; rows
    in JSON order; each cell is ``value [lo, hi]`` at 3 significant digits.

    The ``n`` column is the primary metric's n; a cell whose n differs (e.g. KL over several samples per prompt)
    says so inline, so every number still carries its n. Missing metrics render as "–". A row that records its
    files links to them in a ``trace`` column (§10: every number traceable): its sample JSONL, and in a merged table
    the run's own leaderboard (paths as recorded: relative to the leaderboard's directory, see
    :func:`write_leaderboard`).
    """
    suite = leaderboard["suite"]
    primary = suite["primary_metric"]
    directions: dict[str, bool | None] = leaderboard["higher_is_better"]
    metrics = [primary, *(m for m in directions if m != primary)]
    headline = [primary, *(m for m in HEADLINE_METRICS if m in directions and m != primary)]
    run = leaderboard.get("run", {})
    run_name = run.get("run_id") or run.get("name") or _MISSING

    lines = [
        "<!-- generated by alignpipe.evaluation.leaderboard from leaderboard.json; do not edit -->",
        f"# Leaderboard: {suite['name']}",
        "",
        f"Suite `{suite['name']}` · primary metric `{primary}` {_ARROW[directions[primary]]} · run `{run_name}` · "
        f"{leaderboard['date']} · schema {leaderboard['schema_version']}",
        "",
        *_policy_table(leaderboard["checkpoints"], headline, primary, directions),
    ]
    if len(headline) < len(metrics):
        lines += ["", "## All metrics", "",
                  *_policy_table(leaderboard["checkpoints"], metrics, primary, directions)]
    lines += ["", "Metric directions:", ""]
    lines += [f"- `{m}`: {_DIRECTION[directions[m]]}" for m in metrics]
    lines += _reward_table(leaderboard.get("reward_models") or [])
    return "\n".join(lines) + "\n"


def _policy_table(checkpoints: list[dict], metrics: list[str], primary: str, directions: dict) -> list[str]:
    traced = any(_TRACED_FILES.keys() & ckpt.keys() for ckpt in checkpoints)
    lines = [_row(["rank", "checkpoint", *(f"{m} {_ARROW[directions[m]]}".rstrip() for m in metrics), "n", "flags",
                   *(["trace"] if traced else [])]),
             _row(["---:", "---", *("---" for _ in metrics), "---:", "---", *(["---"] if traced else [])])]
    for rank, ckpt in enumerate(checkpoints, start=1):
        res = ckpt["results"]
        row_n = res[primary].get("n") if primary in res else None
        cells = [str(rank) if is_ranked(res, primary) else _MISSING, _escape(ckpt["name"])]
        cells += [_cell(res.get(m), row_n) for m in metrics]
        cells.append(_MISSING if row_n is None else str(row_n))
        cells.append("; ".join(checkpoint_flags(res)) or "")
        if traced:
            cells.append(" · ".join(_link(text, ckpt[key]) for key, text in _TRACED_FILES.items() if ckpt.get(key)))
        lines.append(_row(cells))
    return lines


_TRACED_FILES = {"samples": "samples", "leaderboard": "results"}  # row key -> link text


def _link(text: str, target: str) -> str:
    """A Markdown link to the file ``target``: percent-encoded (a ``#``, ``?``, ``%`` or space in a run's name is part
    of the path, not a fragment, a query or an escape), and a relative one starting ``./`` or ``../`` (``run-12:00/...``
    is not a URL scheme)."""
    path = Path(target).as_posix()
    plain = os.path.isabs(target) or path.startswith("../")
    return f"[{text}]({'' if plain else './'}{quote(path, safe='/')})"


def _files_relative_to(leaderboard: dict, directory: Path) -> dict:
    """``leaderboard`` with its rows' absolute file paths (a merge's) made relative to ``directory``, where it is
    written: tables moved or copied together with the runs still find their files. A path on another drive (Windows)
    stays absolute."""
    rows = []
    for row in leaderboard["checkpoints"]:
        files = {}
        for key in _TRACED_FILES:
            if row.get(key) and os.path.isabs(row[key]):
                with contextlib.suppress(ValueError):
                    files[key] = os.path.relpath(row[key], Path(directory).resolve())
        rows.append({**row, **files})
    return {**leaderboard, "checkpoints": rows}


def checkpoint_flags(results: dict, *, kl_budget: float = KL_BUDGET, truncation_limit: float = MAX_TRUNCATION
                     ) -> list[str]:
    """Warnings for one leaderboard row (EVALUATION.md §10): truncation above the limit, KL above the budget, LC vs
    raw win-rate gap. The one definition used by ``leaderboard.md``, ``leaderboard.csv`` and ``report.html``."""
    flags = []
    truncation = metric_value(results, "truncation_rate")
    if truncation is not None and truncation > truncation_limit:
        flags.append(f"truncation {100 * truncation:.1f}% > {100 * truncation_limit:g}%")
    over = [(name[-2:], kl) for name in ("kl_ref_k1", "kl_ref_k3") if (kl := metric_value(results, name)) is not None
            and kl > kl_budget]
    if over:  # either estimator: k1 is unbiased but noisy, k3 low-variance; a flag should not hinge on the choice
        flags.append(f"KL ({', '.join(f'{k} {v:.3g}' for k, v in over)}) > budget {kl_budget:g} nats")
    raw = metric_value(results, "win_rate_vs_ref")
    lc = next((v for name in LC_METRICS if (v := metric_value(results, name)) is not None), None)
    if raw is not None and lc is not None:
        try:
            warning = lc_gap_warning(raw, lc)
        except ValueError as error:
            warning = str(error)
        if warning:
            flags.append(f"LC/raw disagreement: {warning}")
    return flags


def is_ranked(results: dict, primary_metric: str) -> bool:
    """Whether a row gets a rank: only with a value of the primary metric (rows without one are listed last, unranked,
    in every rendering)."""
    return metric_value(results, primary_metric) is not None


def metric_value(results: dict, metric: str) -> float | None:
    """A row's finite value of ``metric``, else None (absent, null or non-finite)."""
    entry = results.get(metric)
    if not isinstance(entry, dict) or entry.get("value") is None:
        return None
    value = float(entry["value"])
    return value if math.isfinite(value) else None


def render_csv(leaderboard: dict) -> str:
    """The policy table as CSV: one row per checkpoint, ``<metric>``, ``<metric>_lo``, ``<metric>_hi``, ``<metric>_n``;
    ``rank`` is empty for a row without the primary metric, as in the Markdown."""
    metrics = list(leaderboard["higher_is_better"])
    primary = leaderboard["suite"]["primary_metric"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "checkpoint", *(f"{m}{s}" for m in metrics for s in ("", "_lo", "_hi", "_n")), "flags"])
    for rank, ckpt in enumerate(leaderboard["checkpoints"], start=1):
        res = ckpt["results"]
        cells: list = [rank if is_ranked(res, primary) else None, ckpt["name"]]
        for m in metrics:
            entry = res.get(m) or {}
            ci = entry.get("ci95") or (None, None)
            cells += [entry.get("value"), ci[0], ci[1], entry.get("n")]
        writer.writerow(["" if c is None else c for c in cells] + ["; ".join(checkpoint_flags(res))])
    return buffer.getvalue()


# What a ranking across runs must share, as each leaderboard records it: (what, section, key).
_MERGE_INVARIANTS = (
    ("suite file hash", "run", "suite_sha256"), ("reference", "run", "reference"),
    ("reference weights", "run", "reference_sha256"), ("prompt set", "config", "prompt_set"),
    ("generation settings", "config", "generation"),
    ("judge", "config", "judge"), ("pair sources", "config", "pair_sources"),
    ("KL k3 estimator", "config", "kl_k3"), ("diversity sampling", "config", "diversity"),
    ("implicit-reward pairs", "config", "implicit_reward_pairs"),
)
# Settings of extra samples whose metrics only the boards that drew them have (within-prompt diversity, the pairs of
# implicit_reward_accuracy): compared only when both boards record them, so a board without those columns still
# merges with one that has them
_RECORDED_WHEN_DRAWN = frozenset({"diversity", "implicit_reward_pairs"})
_RECORDED_SINCE = "reference_sha256"  # a run key absent from leaderboards written before the merge checked weights


def merge_leaderboards(paths: list[str | os.PathLike[str]]) -> dict:
    """One leaderboard from several runs' ``leaderboard.json``, rows ``<run directory>/<checkpoint>``.

    Rows are re-ranked on the primary metric, so every source must have been evaluated the same way: one suite and
    primary metric, each metric in one direction (``higher_is_better``, null included: the table shows one direction
    per metric, as :func:`build_leaderboard` requires within a board), and the same suite file hash, reference (name
    and weights), prompt set (its id carries a hash of the prompts), generation settings and judge (as each records
    them: a reward-model judge by the hash of its weights, so a board without that hash is refused). Otherwise
    ``ValueError`` names the files and what differs. A merged leaderboard is checked run by run, as its
    ``config.sources`` records them, so merging merged leaderboards refuses what merging their runs would. A
    policy leaderboard written before the reference's weights were recorded is merged with a warning: what it lacks
    cannot be checked. Each run's path, run, config and env are kept under ``config.sources`` (one entry per run,
    labelled like its rows) so every row stays traceable.
    """
    if not paths:
        raise ValueError("no leaderboards to merge")
    boards = [(Path(p), load_leaderboard(p)) for p in paths]
    first_path, first = boards[0]
    for path, board in boards[1:]:
        if board["suite"] != first["suite"]:
            raise ValueError(f"{path} is suite {board['suite']} but {first_path} is {first['suite']}; merge "
                             "leaderboards of one suite at a time")
    directions = merged_directions(boards)
    labels = source_labels([path for path, _ in boards])
    sources = [run for (path, board), label in zip(boards, labels, strict=True)
               for run in merge_sources(path, board, label)]
    _check_runs_agree(sources)
    rows, reward_rows = [], []
    for (path, board), label in zip(boards, labels, strict=True):
        rows += [_merged_row(row, label, path) for row in board["checkpoints"]]
        reward_rows += [{**row, "name": f"{label}/{row['name']}"} for row in board.get("reward_models") or []]
    left_out = _proxy_columns_to_leave_out(sources, rows)
    if left_out:
        rows = [{**row, "results": {k: v for k, v in row["results"].items() if k not in left_out}} for row in rows]
        directions = {k: v for k, v in directions.items() if k not in left_out}
    primary = first["suite"]["primary_metric"]
    sign = -1.0 if directions.get(primary) is not False else 1.0
    rows.sort(key=lambda r: (not is_ranked(r["results"], primary), sign * (metric_value(r["results"], primary) or 0.0)))
    return {
        "schema_version": SCHEMA_VERSION, "run": {"name": "merged", "sources": len(sources)}, "suite": first["suite"],
        "config": {"sources": sources, **({"left_out": {"metrics": sorted(left_out), "why": PROXIES_DIFFER}}
                                          if left_out else {})},
        "checkpoints": rows, "reward_models": reward_rows,
        "higher_is_better": directions, "env": first["env"], "date": max(b["date"] for _, b in boards),
    }


def _merged_row(row: dict, label: str, path: Path) -> dict:
    """A source's row in a merged table: named ``<label>/<name>``, its files absolute until the merged table is
    written (:func:`write_leaderboard` makes them relative to it): its samples, and the leaderboard it came from (a
    row of a merged source keeps the one its merge recorded; a merge written before rows recorded it gives itself)."""
    directory = Path(path).resolve().parent
    # relative to the source's directory; an absolute path (another drive) stays as it is
    files = {key: os.path.normpath(directory / row[key]) for key in _TRACED_FILES if row.get(key)}
    files.setdefault("leaderboard", str(Path(path).resolve()))
    return {**row, "name": f"{label}/{row['name']}", **files}


PROXY_PREFIX = "proxy_"
PROXIES_DIFFER = "the runs' proxy reward models differ: their proxy scores have no common scale"


def _proxy_columns_to_leave_out(sources: list[dict], rows: list[dict]) -> set[str]:
    """The ``proxy_*`` metrics, when the runs scored them with different reward models (each run trains its own):
    such columns would rank numbers of unrelated scales together. Each run's own leaderboard keeps them. A proxy is
    told by its identity hash (``sha256``), not its stage's name, so two runs' copies of one reward model agree."""
    proxies = {_identity_hash(proxy, "sha256") or json.dumps(proxy, sort_keys=True)
               for proxy in (s["config"].get("proxy") for s in sources) if proxy}
    if len(proxies) < 2:
        return set()
    metrics = {k for row in rows for k in row["results"] if k.startswith(PROXY_PREFIX)}
    if metrics:
        log.warning("merged leaderboard: leaving out %s: %s; compare them within each run's own leaderboard",
                    ", ".join(sorted(metrics)), PROXIES_DIFFER)
    return metrics


def merge_sources(path: Path, board: dict, label: str) -> list[dict]:
    """The runs behind one leaderboard file, as ``config.sources`` entries: the board itself, or for a merged board
    the runs it records (its own run and config only say "merged"; recursively, for one merged before these were
    flattened), labelled ``<label>/<their label>`` as its rows are, with ``via`` listing the merged files they came
    through (innermost first)."""
    recorded = board["config"].get("sources")
    if not isinstance(recorded, list):
        return [{"path": str(path), "label": label,
                 **{key: board[key] for key in ("run", "config", "env", "date", "via") if key in board}}]
    return [{**run, "via": [*run.get("via", []), str(path)]} for source in recorded
            for run in merge_sources(Path(source["path"]), source, f"{label}/{source['label']}")]


def merged_directions(boards: list[tuple[Path, dict]]) -> dict[str, bool | None]:
    """Each metric's ``higher_is_better`` across the boards; ``ValueError`` naming the metric and both files when
    two disagree (null vs a direction included: they did not define the metric the same way)."""
    directions: dict[str, bool | None] = {}
    declared_in: dict[str, Path] = {}
    for path, board in boards:
        for metric, higher in board["higher_is_better"].items():
            if directions.setdefault(metric, higher) != higher:
                raise ValueError(
                    f"metric {metric!r} has higher_is_better={directions[metric]} in {declared_in[metric]} and "
                    f"{higher} in {path}: one table cannot show it both ways; merge them separately")
            declared_in.setdefault(metric, path)
    return directions


def _check_runs_agree(sources: list[dict]) -> None:
    """Refuse runs whose recorded settings differ; warn about policy runs too old to say."""
    older = [source_origin(s) for s in sources if "prompt_set" in s["config"] and _RECORDED_SINCE not in s["run"]]
    # every pair, not each against the first: settings only the boards that drew them record (_RECORDED_WHEN_DRAWN)
    # are skipped against a board without them, so a first board without them would let two others disagree
    for i, first in enumerate(sources):
        for source in sources[i + 1:]:
            if differences := merge_conflicts(first, source):
                pair = (source_origin(first), source_origin(source))
                unchecked = [origin for origin in pair if origin in older]
                raise ValueError(
                    f"cannot rank {pair[0]} and {pair[1]} in one table: they differ in {'; '.join(differences)}. "
                    "Re-run `alignpipe eval` on both with the same suite file and --reference (or the same eval stage "
                    "settings), or merge them separately"
                    + (f" ({', '.join(unchecked)}: written by an older alignpipe, which recorded neither the "
                       "reference's weights nor a hash of an eval stage's prompts; re-run its evaluation)"
                       if unchecked else ""))
    if older:
        log.warning("merging %s without checking that every run used the same reference weights and (eval stages) "
                    "the same held-out prompts: written by an older alignpipe, which did not record them; re-run "
                    "their evaluation to have this checked", ", ".join(older))


def source_origin(source: dict) -> str:
    """Where a run's leaderboard came from, for messages: its file, and any merged files it came through."""
    via = source.get("via")
    return f"{source['path']} (via {', '.join(via)})" if via else source["path"]


def merge_conflicts(a: dict, b: dict) -> list[str]:
    """What two leaderboards record differently among the settings a shared ranking needs (empty: mergeable)."""
    def shown(board: dict, section: str, key: str) -> str:
        return repr(board[section][key]) if key in board[section] else "not recorded"

    def differ(section: str, key: str) -> bool:
        if key in _RECORDED_WHEN_DRAWN and (key not in a[section] or key not in b[section]):
            return False  # one board has no such columns: nothing of it is ranked beside the other's
        if key == "judge":
            return _judged_alike(a[section].get(key)) != _judged_alike(b[section].get(key))
        return a[section].get(key) != b[section].get(key)

    conflicts = [f"{what} ({shown(a, section, key)} vs {shown(b, section, key)})"
                 for what, section, key in _MERGE_INVARIANTS if differ(section, key)]
    if _unproven_judge(a) or _unproven_judge(b):
        conflicts.append("judge weights (config.judge.weights_sha256: "
                         f"{' vs '.join(repr(board['config']['judge'].get('weights_sha256')) for board in (a, b))}; "
                         "a reward-model judge is compared by the hash of its weights, which a board evaluated by an "
                         "older alignpipe did not record: re-run its evaluation)")
    return conflicts


def _judged_alike(judge: dict | None) -> dict | None:
    """What of a board's judge record two boards must share: a reward-model judge with its identity hash
    (``weights_sha256``) without the names the hash already stands behind: its id (``reward_ensemble:<its directory
    name>``) and the name of the reward stage that trained it, so copies of one judge under other names merge."""
    if _identity_hash(judge, "weights_sha256") is None:
        return judge
    trained_on = judge.get("trained_on")
    return {**{k: v for k, v in judge.items() if k != "id"},
            "trained_on": {k: v for k, v in trained_on.items() if k != "stage"} if isinstance(trained_on, dict)
            else trained_on}


def _identity_hash(record: dict | None, key: str) -> str | None:
    """The identity hash that a board's record of a model (a judge, a proxy) holds under ``key``; None when it holds
    none (a board by an older alignpipe, a judge of another kind). The one rule for "judged alike": two boards'
    models are the same model when their hashes are equal, whatever directory or stage names they had; a record
    without one is compared whole."""
    return (record.get(key) or None) if isinstance(record, dict) else None


def _unproven_judge(board: dict) -> bool:
    """Whether ``board`` was judged by a reward model without recording its weights' hash: its judge id names only
    the judge's directory (every reward stage saves to ``checkpoint``), so it cannot be shown to be another's judge."""
    judge = board["config"].get("judge") or {}
    return judge.get("type") == "reward_model" and _identity_hash(judge, "weights_sha256") is None


def source_labels(paths: list[Path]) -> list[str]:
    """A unique label per leaderboard file: the fewest trailing parts of its directory that tell them apart
    (``runs/a/leaderboard.json`` and ``runs/b/leaderboard.json`` give ``a`` and ``b``)."""
    directories = [Path(p).resolve().parent for p in paths]
    if len(set(directories)) < len(directories):
        twice = sorted({str(d) for d in directories if directories.count(d) > 1})
        raise ValueError(f"the leaderboard in {', '.join(twice)} is given more than once; name each run once")
    for depth in range(1, max(len(d.parts) for d in directories) + 1):
        labels = ["/".join(d.parts[-depth:]) for d in directories]
        if len(set(labels)) == len(labels):
            return labels
    return [str(d) for d in directories]  # unreachable: distinct directories differ at full depth


def _reward_table(rows: list[dict]) -> list[str]:
    """The reward-model table (EVALUATION.md §10): held-out accuracy, calibration and uncertainty quality."""
    if not rows:
        return []
    columns = [c for c in REWARD_COLUMNS if any(c in r["results"] for r in rows)]
    lines = ["", "## Reward models", "", _row(["reward model", *columns, "n"]),
             _row(["---", *("---" for _ in columns), "---:"])]
    for row in rows:
        res = row["results"]
        n = res["accuracy"].get("n") if "accuracy" in res else None
        lines.append(_row([_escape(row["name"]), *(_cell(res.get(c), n) for c in columns),
                           _MISSING if n is None else str(n)]))
    return lines


LEADERBOARD_FILES = ("leaderboard.json", "leaderboard.csv", "leaderboard.md")  # what write_leaderboard writes


def write_leaderboard(leaderboard: dict, directory: Path, *, drawn: Mapping[str, bytes] | None = None
                      ) -> tuple[Path, Path]:
    """Write ``leaderboard.json``, ``leaderboard.csv`` and ``leaderboard.md``, and ``drawn`` (file name -> bytes:
    plots drawn from this leaderboard), all or none; returns the JSON and md paths.

    Every file is produced, flushed and synced before any is touched, and then they replace the old ones together
    (:func:`~alignpipe.io.atomic_open_all`), so a failure (a full disk, a bad record) leaves the old set intact: never
    new tables beside the plots of other rows. Only a rename itself failing part-way (a directory where a file goes)
    can leave some replaced, and the ``PartlyReplacedError`` names them. Rows' absolute file paths (a merge's) are
    written relative to ``directory``.
    """
    directory = Path(directory)
    leaderboard = _files_relative_to(leaderboard, directory)
    json_name, csv_name, md_name = LEADERBOARD_FILES
    # the plots first: a rename that fails (a directory in the way) most likely fails there, before any table moves
    files = {**(drawn or {}), json_name: json_text(leaderboard).encode(), csv_name: render_csv(leaderboard).encode(),
             md_name: render_markdown(leaderboard).encode()}
    with atomic_open_all([directory / name for name in files], binary=True) as handles:
        for handle, content in zip(handles, files.values(), strict=True):
            handle.write(content)
    return directory / json_name, directory / md_name


def load_leaderboard(path: str | os.PathLike[str]) -> dict:
    """Read a leaderboard JSON, refusing any other ``schema_version`` (readers must not guess at layouts)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: {why_unreadable(e)}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: unsupported leaderboard schema_version {version!r}; this alignpipe reads {SCHEMA_VERSION!r}"
        )
    if missing := [k for k in _REQUIRED_KEYS if k not in data]:
        raise ValueError(f"{path}: leaderboard is missing keys {missing}")
    return data


def _cell(entry: dict | None, row_n: int | None) -> str:
    if entry is None or entry.get("value") is None:
        return _MISSING
    value = entry["value"]
    text = _fmt(value, value)
    if entry.get("ci95") is not None:
        lo, hi = entry["ci95"]
        text += f" [{_fmt(lo, value)}, {_fmt(hi, value)}]"
    n = entry.get("n")
    if n is not None and n != row_n:
        text += f" (n={n})"
    return text


def _fmt(x: float, ref: float) -> str:
    """Format ``x`` with the decimals that give ``ref`` 3 significant digits, so a value and its CI align."""
    if not math.isfinite(x):
        return str(x)
    if ref != 0 and math.isfinite(ref) and abs(ref) < 1e-4:
        return f"{x:.2e}"
    decimals = 3 if ref == 0 or not math.isfinite(ref) else max(0, 2 - math.floor(math.log10(abs(ref))))
    text = f"{x:.{decimals}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000"


def _escape(text: str) -> str:
    """A name as one literal Markdown table cell: a line break would end the row, ``|`` end the cell (and ``\\|``,
    unless the backslash is escaped first), and a ``<`` start inline HTML."""
    one_line = " ".join(str(text).splitlines())
    return html.escape(one_line, quote=False).replace("\\", "\\\\").replace("|", "\\|")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
