"""Seeds that several modules must agree on, in one place none of them depends on.

Why a module of its own: the recipe schema (no heavy imports) and the trainers both need the evaluation's seed, and a
twin constant in each drifts apart silently. The suite schema's, ``GenerationSettings``' and the bon stage's
default seeds are it too; suite files (``eval/suites/*.yaml``) write their own seeds.
"""

# The eval stage's default sampling seed. The training stages' own evaluations (PPO, the online rounds, GRPO/RLOO) draw
# the held-out prompts with it, so their curves are on the leaderboard's prompts; `alignpipe eval` samples with it.
EVAL_SEED = 1234
