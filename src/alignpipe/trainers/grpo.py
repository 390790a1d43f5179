"""The ``grpo`` stage: GRPO (Shao et al. 2024; group-normalised advantages, KL as a loss term) is TRL's GRPOTrainer.

Nothing here re-implements the algorithm: alignpipe only adapts its task prompts, reward plug-in and evaluation to
it (``trainers/trl_online.py``, shared with ``rloo``).
"""

from __future__ import annotations

from trl import GRPOConfig, GRPOTrainer

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.trl_online import run_online

SEQUENCE_LEVEL_LOSSES = frozenset({"luspo"})  # TRL 1.16's GRPOConfig: "requires importance_sampling_level='sequence'"


def importance_sampling_level(loss_type: str) -> str:
    """Where TRL takes the policy ratio for ``loss_type``: once per completion (the mean of its token log-ratios) for
    LUSPO, a length-scaled GSPO whose paper and TRL's implementation assume it (TRL only warns without it, and
    trains a token-level variant that is not the method); per token, TRL's default, for every other loss (VESPO
    computes its sequence weights itself from the token ratios)."""
    return "sequence" if loss_type in SEQUENCE_LEVEL_LOSSES else "token"


# CISPO's ε_max (ScaleRL, and TRL 1.16's GRPOConfig docs): TRL clips the CISPO weight at ``epsilon_high``, which falls
# back to the PPO-style ε = 0.2 when unset, so an on-policy ratio of 1 was cut to 0.2 on every token.
CISPO_EPSILON_MAX = 5.0


def clipping_arguments(loss_type: str) -> dict[str, float]:
    """``GRPOConfig`` clipping settings ``loss_type`` needs beyond TRL's defaults: CISPO's importance weight is
    ``min(ratio, ε_max)``, and TRL's default ε_max (its PPO ε, 0.2) scaled every token's policy gradient by 0.2 while
    the KL term kept its weight (β five times as strong), and counted tokens of on-policy batches as clipped."""
    return {"epsilon_high": CISPO_EPSILON_MAX} if loss_type == "cispo" else {}


def run(ctx: StageContext) -> dict:
    loss_type = ctx.stage.loss_type
    return run_online(ctx, GRPOTrainer, GRPOConfig, loss_type=loss_type,
                      importance_sampling_level=importance_sampling_level(loss_type), **clipping_arguments(loss_type),
                      scale_rewards=ctx.stage.scale_rewards)
