"""Reading a run directory for the report (:mod:`alignpipe.evaluation.report`): its JSON/JSONL into plain data.

:func:`read_run` gives a :class:`RunData`; nothing is computed there beyond dropping records that a resumed stage
logged twice. Apart from the plots and the HTML so that reading needs no matplotlib and is usable on its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignpipe.evaluation.leaderboard import load_leaderboard
from alignpipe.io import why_unreadable
from alignpipe.pipeline.rundir import read_json_object, read_run_record

__all__ = ["RunData", "StageData", "read_run"]


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
            records=_read_jsonl(sub / "metrics.jsonl", errors, running=manifest.get("status") == "running"),
            bon=_read_json(sub / "bon.json", errors) if done else None,
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
