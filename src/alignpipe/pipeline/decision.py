"""Whether a stage is skipped, started over or resumed: one rule for the run, ``--dry-run`` and the decision node 0
tells the other nodes of a multi-node run, so that what a dry run reports is what the run does.

A stage is skipped when its manifest says ``complete`` with the same config and input hashes and its published
checkpoint is there (unless ``--force``); with ``--resume`` an unfinished attempt of the same work continues from
its newest intact trainer checkpoint (or its finished rounds); anything else starts over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignpipe.pipeline.rundir import StageDir

Action = Literal["skip", "run", "resume"]


@dataclass(frozen=True)
class StageDecision:
    action: Action
    reason: str
    resume_from: Path | None = None  # the verified trainer checkpoint a resume continues from (None: rounds only)


def decide_stage(directory: StageDir, manifest: dict, config_hash: str, input_hashes: dict, *, forced: bool,
                 resume: bool, look_only: bool = False) -> StageDecision:
    """What to do with the stage in ``directory`` whose recorded attempt is ``manifest``, now that its work hashes to
    ``config_hash`` and ``input_hashes``. Reads the directory (checkpoints, rounds); with ``look_only`` (a dry run)
    it changes nothing, where the run sets a corrupt trainer checkpoint aside while looking for an intact one."""
    same_work = manifest.get("config_hash") == config_hash and manifest.get("input_hashes") == input_hashes
    complete = manifest.get("status") == "complete"
    # A stage that published a checkpoint is done only while the checkpoint is there (deleted by hand, say).
    published = manifest.get("output_sha256") is None or directory.checkpoint.exists()
    if same_work and complete and published and not forced:
        return StageDecision("skip", "complete with the same config and inputs")

    resuming = resume and same_work and not complete and directory.has_progress()
    latest = directory.latest_trainer_checkpoint(quiet=look_only) if resuming else None  # verified
    if resuming and latest is None and not directory.has_round_progress():
        resuming = False
        reason = "no intact checkpoint to resume from; starting over"
    elif forced:
        reason = "forced"
    elif resuming:
        reason = f"resuming from {latest.name if latest else 'its completed rounds'}"
    elif not manifest:
        reason = "new"
    elif not same_work:
        reason = "config or inputs changed"
    elif not published:
        reason = f"complete, but its checkpoint ({directory.checkpoint}) is missing; starting over"
    elif directory.has_progress():
        reason = f"previous attempt {manifest.get('status', 'unknown')}; starting over (use --resume to continue)"
    else:  # with or without --resume: the attempt saved nothing to continue from
        reason = f"previous attempt {manifest.get('status', 'unknown')}; no checkpoint to resume from; starting over"
    return StageDecision("resume" if resuming else "run", reason, latest if resuming else None)
