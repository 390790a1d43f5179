"""The ``dno`` stage: Direct Nash Optimization, practical variant (Rosset et al. 2024; ALGORITHMS.md §9).

The SPPO loop's samples and preference matrix; each prompt's best-vs-worst pair is kept only when its win-rate gap
passes ``margin_threshold`` ([M]), then TRL's DPO loss against the previous iterate ``π_t``. Not done: DNO's
teacher (e.g. GPT-4) responses among the candidates (§9b); the candidates are the policy's own samples.
"""

from __future__ import annotations

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.iterative import run_rounds
from alignpipe.trainers.round_methods import SelfPlayRule


def run(ctx: StageContext) -> dict:
    return run_rounds(ctx, SelfPlayRule("dno"))
