"""SPPO and INPO as TRL ``DPOTrainer`` subclasses (per-pair loss hook of ``alignpipe.trainers.pair_loss``).

Why not TRL: TRL 1.16 has only ``sppo_hard`` (a hard-label surrogate), not SPPO's regression of each response's
log-ratio onto its win rate against the previous iterate (ALGORITHMS.md §7a), and no INPO (§10a), whose target mixes
the previous iterate with a second, fixed reference. SPIN and DNO need no trainer of their own: they are TRL's
``sigmoid`` DPO with the reference set to the previous iterate.

The reference TRL sees (``ref_model``, or the adapter-free base under LoRA) is the previous iterate ``π_t``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from trl.trainer import add_fused_lm_head
from trl.trainer.utils import disable_dropout_in_model

from alignpipe.losses.selfplay import inpo_logits, inpo_loss, sppo_loss
from alignpipe.trainers.pair_loss import PairLogps, PairLossDPOTrainer

__all__ = ["INPOTrainer", "SPPOTrainer"]


class SPPOTrainer(PairLossDPOTrainer):
    """SPPO (§7a): ``0.5[(ρ_w − η(P̂_w − ½))² + (ρ_l − η(P̂_l − ½))²]`` with ``η = 1/β`` (the official code's).

    Rows carry ``chosen_win_rate`` and ``rejected_win_rate`` (:class:`alignpipe.data.selfplay.SelfPlayPair`).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "sppo"]
    pair_columns: ClassVar[dict[str, float | None]] = {"chosen_win_rate": None, "rejected_win_rate": None}

    def uses_pair_loss(self, columns: dict[str, torch.Tensor]) -> bool:
        if set(columns) != set(self.pair_columns):
            raise ValueError(f"SPPO needs the columns {sorted(self.pair_columns)} in every batch; got {sorted(columns)}")
        return True

    def pair_loss(self, logps: PairLogps, columns: dict[str, torch.Tensor], inputs: dict) -> torch.Tensor:
        loss = sppo_loss(logps.chosen_logratios, logps.rejected_logratios, columns["chosen_win_rate"],
                         columns["rejected_win_rate"], eta=1.0 / self.beta)
        self.log_metric("sppo/chosen_target", (columns["chosen_win_rate"] - 0.5) / self.beta)
        self.log_metric("sppo/rejected_target", (columns["rejected_win_rate"] - 0.5) / self.beta)
        self.log_metric("sppo/chosen_logratio", logps.chosen_logratios)
        self.log_metric("sppo/rejected_logratio", logps.rejected_logratios)
        return loss


class INPOTrainer(PairLossDPOTrainer):
    """INPO (§10a): ``(h_t − η/2)²`` with ``η = 1/β`` and ``h_t`` mixing the fixed ``anchor_model`` (``π_ref``, weight
    ``mix = ητ``) with TRL's reference (the previous iterate ``π_t``, weight ``1 − mix``).

    The anchor's log-probs come from TRL's own ``compute_ref_log_probs`` on the same batch (same tokenisation), one
    extra no-grad forward per step.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "inpo"]

    def __init__(self, *args, anchor_model, mix: float, **kwargs):
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"INPO mix (eta * tau) must be in [0, 1], got {mix}")
        super().__init__(*args, **kwargs)
        self.mix = mix
        disable_dropout_in_model(anchor_model)
        add_fused_lm_head(anchor_model)  # TRL's reference forward asks for `fused_lm_head=True`
        self.anchor_model = self.accelerator.prepare_model(anchor_model, evaluation_mode=True)

    def pair_loss(self, logps: PairLogps, columns: dict[str, torch.Tensor], inputs: dict) -> torch.Tensor:
        anchor_chosen, anchor_rejected = self.compute_ref_log_probs(self.anchor_model, inputs)
        h = inpo_logits(logps.chosen, logps.rejected, anchor_chosen, anchor_rejected,
                        logps.ref_chosen, logps.ref_rejected, self.mix)
        self.log_metric("inpo/h", h)
        return inpo_loss(h, eta=1.0 / self.beta)
