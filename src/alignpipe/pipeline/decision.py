"""Whether a stage is skipped, started over or resumed: one rule for the run, ``--dry-run`` and the decision node 0
tells the other nodes of a multi-node run, so that what a dry run reports is what the run does.

A stage is skipped when its manifest says ``complete`` with the same config and input hashes and its published
checkpoint and recorded results (and for the recipe's last eval stage, the run's leaderboard) are there, their files
as they were published (unless ``--force``); with ``--resume`` an unfinished attempt of the same work continues from
its newest intact trainer checkpoint (or its finished rounds), unless it would train on another global batch than the
attempt it continues; anything else starts over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignpipe.pipeline.batching import BatchSplit
from alignpipe.pipeline.rundir import StageDir

Action = Literal["skip", "run", "resume"]
BATCH_SPLIT = "batch_split"  # manifest key: the split (BatchSplit's fields) a training stage's attempt started with


@dataclass(frozen=True)
class StageDecision:
    action: Action
    reason: str
    resume_from: Path | None = None  # the verified trainer checkpoint a resume continues from (None: rounds only)


def decide_stage(directory: StageDir, manifest: dict, config_hash: str, input_hashes: dict, *, forced: bool,
                 resume: bool, batch: BatchSplit | None = None, look_only: bool = False,
                 owns_run_root: bool = False) -> StageDecision:
    """What to do with the stage in ``directory`` whose recorded attempt is ``manifest``, now that its work hashes to
    ``config_hash`` and ``input_hashes`` and it would train with the batch split ``batch`` (None: not a stage whose
    global batch depends on the process count). Reads the directory (checkpoints, rounds); with ``look_only`` (a dry
    run) it changes nothing, where the run sets a corrupt trainer checkpoint aside while looking for an intact one.
    ``owns_run_root``: it is the recipe's last eval stage now, so the run's leaderboard must be the one it wrote."""
    same_work = manifest.get("config_hash") == config_hash and manifest.get("input_hashes") == input_hashes
    complete = manifest.get("status") == "complete"
    # A stage that published a checkpoint or results is done only while they are there, as it published them
    changed = (directory.published_problem(manifest, owns_run_root=owns_run_root)
               if same_work and complete and not forced else None)
    published = changed is None
    if same_work and complete and published and not forced:
        return StageDecision("skip", "complete with the same config and inputs")

    resuming = resume and same_work and not complete and directory.has_progress()
    batch_change = _batch_change(manifest.get(BATCH_SPLIT), batch) if resuming else None
    resuming = resuming and batch_change is None
    latest = directory.latest_trainer_checkpoint(quiet=look_only) if resuming else None  # verified
    if batch_change is not None:
        reason = batch_change
    elif resuming and latest is None and not directory.has_round_progress():
        resuming = False
        reason = "no intact checkpoint to resume from; starting over"
    elif resuming:  # --force on an unfinished stage: nothing to skip, so --resume decides (the reason says so)
        reason = f"resuming from {latest.name if latest else 'its completed rounds'}"
    elif forced:
        reason = "forced"
    elif not manifest:
        reason = unrecorded_reason(directory)
    elif not same_work:
        reason = "config or inputs changed"
    elif not published:
        reason = f"complete, but {changed}; starting over"
    elif directory.has_progress():
        reason = f"previous attempt {manifest.get('status', 'unknown')}; starting over (use --resume to continue)"
    else:  # with or without --resume: the attempt saved nothing to continue from
        reason = f"previous attempt {manifest.get('status', 'unknown')}; no checkpoint to resume from; starting over"
    return StageDecision("resume" if resuming else "run", reason, latest if resuming else None)


def unrecorded_reason(directory: StageDir) -> str:
    """Why a stage with no readable manifest runs: it is new, or its manifest is damaged (which loses the record
    that it completed and of its trainer checkpoints, so even ``--resume`` starts it over)."""
    problem = directory.manifest_problem()
    return "new" if problem is None else f"{problem}; starting over (its earlier outputs are deleted)"


def _batch_change(recorded: dict | None, now: BatchSplit | None) -> str | None:
    """Why a resume would train on another global batch than the attempt it continues (None when it would not).

    Why: without ``global_batch_size`` the global batch is per-device x accumulation x the process count, which the
    config hash leaves out, so resuming with another ``--processes`` changed the optimisation mid-stage. Another
    split of the same global batch may resume. A manifest from before splits were recorded cannot tell."""
    if recorded is None or now is None or recorded["global_batch_size"] == now.global_batch_size:
        return None
    started = BatchSplit(**recorded).describe()
    return f"batch split changed: {started} when it started, {now.describe()} now; starting over"
