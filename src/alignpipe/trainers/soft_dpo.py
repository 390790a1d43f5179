"""TRL's ``DPOTrainer`` with per-pair soft preference targets: DPO, cDPO and OSP's SPCE loss in one trainer.

Why our own loss and not a TRL ``loss_type``:

* TRL 1.16's ``sigmoid`` loss is hard-label DPO only: it **ignores** ``label_smoothing`` (that option now feeds only
  ``robust``, ``exo_pair`` and ``aot*``), so conservative DPO (cDPO, Mitchell 2023) is not available in TRL.
* Per-pair soft targets ``p = P(chosen ≻ rejected)`` — OSP's self-judged preference strengths (ALGORITHMS.md §4a),
  or Bradley–Terry probabilities from a judge — are not in TRL at all.

Both are the same loss, ``soft_preference_loss(h, p, β) = −[p log σ(βh) + (1−p) log σ(−βh)]``
(``alignpipe.losses.preference``): ``p = 1`` is DPO, ``p = 1 − ε`` cDPO, soft ``p`` SPCE.

Usage: give the training dataset a float column ``preference`` in [0, 1] (null = 1). Without the column the trainer
is exactly TRL's ``DPOTrainer``, except that a nonzero ``label_smoothing`` ε makes the ``sigmoid`` entry of
``loss_type``, wherever it sits and at its weight, cDPO (``p = 1 − ε`` for every pair) instead of silently hard DPO;
the other entries stay TRL's (``robust``, ``exo_pair`` and ``aot*`` read ε themselves).

How it hooks into TRL: through :class:`alignpipe.trainers.pair_loss.PairLossDPOTrainer` (the shared per-pair loss
hook), with ``loss = loss_TRL + w · mean(soft(h, p) − (−log σ(βh)))``. With ``p = 1`` the correction is exactly
zero, so the loss is bit-identical to TRL's.

Extra metrics: ``soft/margin_gap`` = mean ``|βh − logit(p)|`` (p clipped to [1e-6, 1 − 1e-6]), how far the implicit
reward margins are from the soft loss's minimiser (OSP's "margins saturate near logit(p)"); ``soft/preference``
= mean target. TRL's ``rewards/*``, ``logps/*`` and ``logits/*`` are logged as usual.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from datasets import Dataset, IterableDataset

from alignpipe.losses.preference import margin_gap, soft_preference_loss
from alignpipe.trainers.pair_loss import (
    FloatColumnsCollator,
    PairLogps,
    PairLossDPOTrainer,
    check_replaceable_sigmoid,
    check_sigmoid_options,
)

PREFERENCE_COLUMN = "preference"

__all__ = ["PREFERENCE_COLUMN", "PreferenceTargetCollator", "SoftPreferenceDPOTrainer"]


class PreferenceTargetCollator(FloatColumnsCollator):
    """Turns a ``preference`` field into a float tensor ``batch["preference"]``; missing or null means ``p = 1``."""

    def __init__(self, collator):
        super().__init__(collator, {PREFERENCE_COLUMN: 1.0})


def _has_preference_column(dataset: Dataset | IterableDataset) -> bool:
    if dataset.column_names is not None:
        return PREFERENCE_COLUMN in dataset.column_names
    return PREFERENCE_COLUMN in next(iter(dataset))  # an IterableDataset with unknown features


def _validate_preference_column(dataset: Dataset, dataset_name: str) -> None:
    """Every ``preference`` value must be a probability in [0, 1] (null = 1); else a ValueError naming the column."""
    values = [1.0 if v is None else float(v) for v in dataset[PREFERENCE_COLUMN]]
    bad = [(i, v) for i, v in enumerate(values) if not 0.0 <= v <= 1.0]  # NaN fails the comparison
    if bad:
        low, high = min(v for _, v in bad), max(v for _, v in bad)
        raise ValueError(
            f"column {PREFERENCE_COLUMN!r} of the {dataset_name} dataset must hold probabilities in [0, 1] "
            f"(P(chosen preferred over rejected)); {len(bad)} of {len(values)} rows are outside, with values in "
            f"[{low:.6g}, {high:.6g}] (first: row {bad[0][0]} = {bad[0][1]!r})"
        )


class SoftPreferenceDPOTrainer(PairLossDPOTrainer):
    """``trl.DPOTrainer`` whose ``sigmoid`` loss takes a per-pair soft target from a ``preference`` column.

    See the module docstring for why (TRL's sigmoid ignores ``label_smoothing``; per-pair soft targets are not in
    TRL). With a ``preference`` column, ``loss_type`` must be ``["sigmoid"]`` or ``["sigmoid", "sft"]`` (an NLL anchor).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "soft-preference"]
    pair_columns: ClassVar[dict[str, float | None]] = {PREFERENCE_COLUMN: 1.0}
    @property
    def _label_smoothing_target(self) -> bool:
        """cDPO via ``label_smoothing``: the target ``1 − ε`` of every pair when no column gives targets, for the
        ``sigmoid`` entry wherever it sits in the loss list (beside ``robust`` too: TRL's sigmoid ignores ε)."""
        return "sigmoid" in self.loss_types and self.label_smoothing > 0

    def check_sigmoid_replacement(self) -> None:
        """Stock TRL unless asked otherwise: a ``preference`` column is checked with its dataset
        (``_prepare_dataset``), ``label_smoothing`` (cDPO) here."""
        if self._label_smoothing_target:
            check_sigmoid_options(self.args, f"label_smoothing={self.label_smoothing} (cDPO)")

    # --- data ------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if _has_preference_column(dataset):
            check_replaceable_sigmoid(args, f"a {PREFERENCE_COLUMN!r} column in the {dataset_name} dataset")
            if args.label_smoothing:
                raise ValueError(
                    f"the {dataset_name} dataset has a {PREFERENCE_COLUMN!r} column and DPOConfig "
                    f"label_smoothing={args.label_smoothing}: ambiguous. Fold cDPO into the column "
                    f"(preference * (1 - eps) + (1 - preference) * eps) and set label_smoothing=0."
                )
            if isinstance(dataset, Dataset):  # streamed values are checked per batch by the loss instead
                _validate_preference_column(dataset, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    # --- loss ------------------------------------------------------------------------------------------------------

    def uses_pair_loss(self, columns: dict[str, torch.Tensor]) -> bool:
        return PREFERENCE_COLUMN in columns or self._label_smoothing_target

    def pair_loss(self, logps: PairLogps, columns: dict[str, torch.Tensor], inputs: dict) -> torch.Tensor:
        h = logps.h
        target = columns.get(PREFERENCE_COLUMN)
        if target is None:
            target = torch.full_like(h, 1.0 - self.label_smoothing, dtype=torch.float32)
        self.log_metric("soft/margin_gap", margin_gap(h.detach(), target, self.beta))
        self.log_metric("soft/preference", target)
        return soft_preference_loss(h, target, self.beta)
