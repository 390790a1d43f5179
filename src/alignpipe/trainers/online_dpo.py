"""The ``online_dpo`` stage: iterative DPO on on-policy samples with hard labels.

The same loop, samples and judge calls as ``osp``; only the labels differ (the better response of each pair is
chosen with probability 1), so OSP's soft strengths can be compared with hard labels at equal compute.
"""

from __future__ import annotations

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.iterative import PairingRule, run_rounds


def run(ctx: StageContext) -> dict:
    return run_rounds(ctx, PairingRule(method=ctx.stage.pairing, hard_labels=True))
