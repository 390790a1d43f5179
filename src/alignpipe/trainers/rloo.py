"""The ``rloo`` stage: RLOO (Ahmadian et al. 2024; leave-one-out baseline, KL in the reward) is TRL's RLOOTrainer.

Nothing here re-implements the algorithm: alignpipe only adapts its task prompts, reward plug-in and evaluation to
it (``trainers/trl_online.py``, shared with ``grpo``).
"""

from __future__ import annotations

from trl import RLOOConfig, RLOOTrainer

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.trl_online import run_online


def run(ctx: StageContext) -> dict:
    return run_online(ctx, RLOOTrainer, RLOOConfig)
