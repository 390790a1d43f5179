"""The ``osp`` stage: online self-preferring optimisation (Zhai et al. 2024, arXiv 2405.14103).

Each round samples K responses per prompt from the current policy, has the policy itself (or a recipe-chosen judge)
rank them against an intermediate anchor, forms ranked pairs with soft strengths ``p = σ(logit s_i − logit s_j)``,
and trains with the soft-preference cross-entropy. Reconstructed from the abstract and secondary descriptions: the
pairing and loss details are [I] in ALGORITHMS.md §4, not the authors' verified method.

    alignpipe run recipes/quickstart.yaml      # the quickstart's osp stage (gold judge: a tiny model cannot judge)
"""

from __future__ import annotations

from alignpipe.pipeline.stage import StageContext
from alignpipe.trainers.iterative import run_rounds
from alignpipe.trainers.round_methods import PairingRule


def run(ctx: StageContext) -> dict:
    return run_rounds(ctx, PairingRule(method=ctx.stage.pairing, hard_labels=False))
