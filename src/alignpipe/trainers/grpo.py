"""The ``grpo`` stage: GRPO (Shao et al. 2024; group-normalised advantages, KL as a loss term) is TRL's GRPOTrainer.

Nothing here re-implements the algorithm: alignpipe only adapts its task prompts, reward plug-in and evaluation to
it (``trainers/trl_online.py``, shared with ``rloo``).
"""

from __future__ import annotations

from trl import GRPOConfig, GRPOTrainer

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.trl_online import run_online


def run(ctx: StageContext) -> dict:
    return run_online(ctx, GRPOTrainer, GRPOConfig, loss_type=ctx.stage.loss_type)
