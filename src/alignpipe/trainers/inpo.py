"""The ``inpo`` stage: Iterative Nash Policy Optimization (Zhang et al. 2024; ALGORITHMS.md §10).

Two of the K samples from ``π_t`` per prompt, labelled by a draw from the judge's preference (no win-rate estimate,
so only the drawn pair is judged: 2 judge evaluations per prompt, where SPPO's matrix takes K(K−1)), trained with
``(h_t − η/2)²`` where ``h_t`` mixes the stage's input policy (``π_ref``, weight ``reference_mix`` = ητ) with the
previous iterate. The loss constant η/2 and the mixing parametrisation are [M/I] in ALGORITHMS.md.
"""

from __future__ import annotations

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.iterative import run_rounds
from alignpipe.trainers.round_methods import SelfPlayRule


def run(ctx: StageContext) -> dict:
    return run_rounds(ctx, SelfPlayRule("inpo"))
