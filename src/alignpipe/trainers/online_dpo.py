"""The ``online_dpo`` stage: iterative DPO on on-policy samples with hard labels.

The same loop as ``osp``: the same sampling and judging (a first round started from the same policy draws the same
samples and makes the same judge calls), then hard labels (the better response of each pair is chosen with
probability 1). The pairs differ by default: ``online_dpo`` keeps each prompt's best-vs-worst pair (``pairing:
best_worst``, one a prompt), ``osp`` pairs ranks i and K+1−i (``pairing: anchor``, ⌊K/2⌋ a prompt), so it trains on
fewer pairs for fewer steps. To compare OSP's soft strengths with hard labels at equal compute (the same pairs, only
the labels differ) set ``pairing: anchor``, as ``recipes/osp-vs-dpo.yaml`` does.
"""

from __future__ import annotations

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.iterative import run_rounds
from alignpipe.trainers.round_methods import PairingRule


def run(ctx: StageContext) -> dict:
    return run_rounds(ctx, PairingRule(method=ctx.stage.pairing, hard_labels=True))
