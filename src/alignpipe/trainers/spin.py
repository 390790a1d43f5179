"""The ``spin`` stage: Self-Play fIne-tuNing (Chen et al. 2024; ALGORITHMS.md §8).

Each iteration pairs SFT demonstrations (chosen) with the policy's own generation for the same prompt (rejected) and
trains TRL's DPO loss against the previous iterate ``π_t``: the model learns to tell the data from itself. Not done:
SPIN's reuse of the previous iteration's pairs in iterations 1-2 (§8b); each round uses fresh pairs.
"""

from __future__ import annotations

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.iterative import run_rounds
from alignpipe.trainers.round_methods import SPINRule


def run(ctx: StageContext) -> dict:
    return run_rounds(ctx, SPINRule())
