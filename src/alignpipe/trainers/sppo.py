"""The ``sppo`` stage: Self-Play Preference Optimization (Wu et al. 2024; ALGORITHMS.md §7).

Each iteration samples K responses per prompt from ``π_t``, fills the K×K preference matrix with the recipe's judge
(gold, a reward stage's Bradley–Terry model, or the policy itself), takes each prompt's highest- and lowest-win-rate
responses with their win rates ``P̂`` (row means, §7b) and regresses their log-ratios against ``π_t`` onto
``(P̂ − ½)/β`` (§7a). The iterate's checkpoint becomes the next reference. TRL only has the ``sppo_hard`` surrogate.

    alignpipe run recipes/selfplay.yaml
"""

from __future__ import annotations

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.iterative import run_rounds
from alignpipe.trainers.round_methods import SelfPlayRule


def run(ctx: StageContext) -> dict:
    return run_rounds(ctx, SelfPlayRule("sppo"))
