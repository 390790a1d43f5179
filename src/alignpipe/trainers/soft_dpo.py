"""TRL's ``DPOTrainer`` with per-pair soft preference targets: DPO, cDPO and OSP's SPCE loss in one trainer.

Why our own loss and not a TRL ``loss_type``:

* TRL 1.16's ``sigmoid`` loss is hard-label DPO only: it **ignores** ``label_smoothing`` (that option now feeds only
  ``robust``, ``exo_pair`` and ``aot*``), so conservative DPO (cDPO, Mitchell 2023) is not available in TRL.
* Per-pair soft targets ``p = P(chosen ≻ rejected)`` — OSP's self-judged preference strengths (ALGORITHMS.md §4a),
  or Bradley–Terry probabilities from a judge — are not in TRL at all.

Both are the same loss, ``soft_preference_loss(h, p, β) = −[p log σ(βh) + (1−p) log σ(−βh)]``
(``alignpipe.losses.preference``): ``p = 1`` is DPO, ``p = 1 − ε`` cDPO, soft ``p`` SPCE.

Usage: give the training dataset a float column ``preference`` in [0, 1] (null = 1). Without the column the trainer
is exactly TRL's ``DPOTrainer``, except that with ``loss_type=["sigmoid"]`` a nonzero ``label_smoothing`` ε now
means cDPO (``p = 1 − ε`` for every pair) instead of being silently ignored.

How it hooks into TRL (kept as thin as TRL 1.16's structure allows; its ``_compute_loss`` is one ~330-line method
with no per-pair hook):

* ``_prepare_dataset``: validates the ``preference`` column (and the options) before tokenizing; TRL's ``map``
  calls keep extra columns, so the column survives tokenization.
* ``_set_signature_columns_if_needed``: adds ``preference`` to the columns ``remove_unused_columns`` keeps.
* the data collator (TRL's default, or yours) is wrapped to turn the column into a ``preference`` tensor.
* ``_compute_loss``: TRL computes everything (policy forward, reference, its ``sigmoid`` loss, MoE aux loss, all
  its metrics). We capture the policy's per-token log-probs with a forward hook on that same forward, obtain the
  reference log-probs with TRL's own ``compute_ref_log_probs`` and hand them to TRL in the batch, as its
  ``precompute_ref_log_probs`` mode does (one reference forward per step, as in stock TRL), rebuild ``h``
  exactly as TRL does, and swap TRL's hard-label term for the soft one:
  ``loss = loss_TRL + w · mean(soft(h, p) − (−log σ(βh)))``. With ``p = 1`` the correction is exactly zero, so
  the loss is bit-identical to TRL's.

Extra metrics: ``soft/margin_gap`` = mean ``|βh − logit(p)|`` (p clipped to [1e-6, 1 − 1e-6]), how far the implicit
reward margins are from the soft loss's minimiser (OSP's "margins saturate near logit(p)"); ``soft/preference``
= mean target. TRL's ``rewards/*``, ``logps/*`` and ``logits/*`` are logged as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from trl import DPOConfig, DPOTrainer

from alignpipe.losses.preference import dpo_logits, margin_gap, soft_preference_loss

PREFERENCE_COLUMN = "preference"

__all__ = ["PREFERENCE_COLUMN", "PreferenceTargetCollator", "SoftPreferenceDPOTrainer"]


class PreferenceTargetCollator:
    """Wraps a preference collator so a ``preference`` field becomes a float tensor ``batch["preference"]``.

    The wrapped collator never sees the field (so any collator works); a missing or null value means a hard label,
    ``p = 1``. Batches without the field pass through unchanged.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not any(PREFERENCE_COLUMN in example for example in examples):
            return self.collator(examples)
        targets = [example.get(PREFERENCE_COLUMN) for example in examples]
        batch = self.collator([{k: v for k, v in ex.items() if k != PREFERENCE_COLUMN} for ex in examples])
        batch[PREFERENCE_COLUMN] = torch.tensor([1.0 if p is None else float(p) for p in targets],
                                                dtype=torch.float32)
        return batch

    def __getattr__(self, name: str):  # e.g. `pad_token_id`, `tokenizer`, read by Trainer.save_model
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


SOFT_LOSS_TYPES = (["sigmoid"], ["sigmoid", "sft"])  # the soft loss replaces the sigmoid term; sft (NLL) may stay


def _soft_compatible(loss_types) -> bool:
    return list(loss_types) in SOFT_LOSS_TYPES


def _check_soft_options(args: DPOConfig, why: str) -> None:
    """Options under which TRL's ``sigmoid`` term is not ``−log σ(βh)`` with our ``h`` are rejected, naming them."""
    if not _soft_compatible(args.loss_type):
        raise ValueError(
            f"{why} requires DPOConfig loss_type=['sigmoid'] or ['sigmoid', 'sft'] (the soft-preference loss replaces "
            f"the sigmoid DPO loss); got loss_type={list(args.loss_type)}. Drop the column, or use loss_type=['sigmoid']."
        )
    unsupported = {
        "ld_alpha": (args.ld_alpha, None),
        "f_divergence_type": (args.f_divergence_type, "reverse_kl"),
        "use_weighting": (args.use_weighting, False),
    }
    for option, (value, default) in unsupported.items():
        if value != default:
            raise ValueError(f"{why} does not support DPOConfig {option}={value!r}; leave it at {default!r}.")


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


class SoftPreferenceDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose ``sigmoid`` loss takes a per-pair soft target from a ``preference`` column.

    See the module docstring for why (TRL's sigmoid ignores ``label_smoothing``; per-pair soft targets are not in
    TRL) and how it hooks into TRL. With a ``preference`` column, ``loss_type`` must be ``["sigmoid"]`` or ``["sigmoid", "sft"]`` (an NLL anchor).
    """

    _tag_names: ClassVar[list[str]] = ["trl", "dpo", "soft-preference"]
    _label_smoothing_target = False  # set in __init__: cDPO via label_smoothing when no column gives targets

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Wrapped after TRL's __init__, which builds its default collator; its reference precompute (if any) ran with
        # the plain collator, which ignores the extra field.
        self.data_collator = PreferenceTargetCollator(self.data_collator)
        self._label_smoothing_target = _soft_compatible(self.loss_types) and self.label_smoothing > 0
        if self._label_smoothing_target:
            _check_soft_options(self.args, f"label_smoothing={self.label_smoothing} (cDPO)")

    # --- data ------------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if _has_preference_column(dataset):
            _check_soft_options(args, f"a {PREFERENCE_COLUMN!r} column in the {dataset_name} dataset")
            if args.label_smoothing:
                raise ValueError(
                    f"the {dataset_name} dataset has a {PREFERENCE_COLUMN!r} column and DPOConfig "
                    f"label_smoothing={args.label_smoothing}: ambiguous. Fold cDPO into the column "
                    f"(preference * (1 - eps) + (1 - preference) * eps) and set label_smoothing=0."
                )
            if isinstance(dataset, Dataset):  # streamed values are checked per batch by the loss instead
                _validate_preference_column(dataset, dataset_name)
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if PREFERENCE_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, PREFERENCE_COLUMN]

    # --- loss ------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        target = inputs.pop(PREFERENCE_COLUMN, None)  # must not reach the model's forward
        if target is None and not self._label_smoothing_target:
            return super()._compute_loss(model, inputs, return_outputs)  # stock TRL
        if not _soft_compatible(self.loss_types):  # vision datasets skip `_prepare_dataset`, so check here too
            _check_soft_options(self.args, f"a {PREFERENCE_COLUMN!r} column")

        # Reference log-probs from TRL's own helper (adapters disabled under PEFT), passed in the batch as in TRL's
        # precompute mode, so TRL's `_compute_loss` does not run a second reference forward.
        precompute = self.precompute_ref_logps
        if not precompute:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = self.compute_ref_log_probs(ref_model, inputs)

        # TRL runs the policy forward inside `_compute_loss` and keeps only scalar metrics; keep its output (with the
        # graph) from the first call (a later one, with `return_outputs`, only recomputes logits without grad).
        captured = []

        def keep_policy_output(module, args, output):
            if not captured:
                captured.append(output)

        handle = model.register_forward_hook(keep_policy_output)
        self.precompute_ref_logps = True
        try:
            result = super()._compute_loss(model, inputs, return_outputs)
        finally:
            handle.remove()
            self.precompute_ref_logps = precompute
        loss, outputs = result if return_outputs else (result, None)

        # Rebuild TRL's per-pair DPO logit from the same tensors, with the same operations (`ld_alpha is None`).
        seq_len = inputs["completion_mask"].size(1) - 1
        chosen_logps, rejected_logps = captured[0].log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        h = dpo_logits(chosen_logps, rejected_logps, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
        if target is None:
            target = torch.full_like(h, 1.0 - self.label_smoothing, dtype=torch.float32)
        target = target.to(h.device)

        # TRL's loss holds w * mean(-log σ(βh)) (+ w_sft * NLL, + MoE aux loss); replace the hard-label term.
        hard = -F.logsigmoid(self.beta * h)
        soft = soft_preference_loss(h, target, self.beta)
        loss = loss + self.loss_weights[0] * (soft - hard).mean()

        mode = "train" if self.model.training else "eval"
        gap = margin_gap(h.detach(), target, self.beta)
        self._metrics[mode]["soft/margin_gap"].append(self.accelerator.gather(gap).mean().item())
        self._metrics[mode]["soft/preference"].append(self.accelerator.gather(target.float()).mean().item())
        return (loss, outputs) if return_outputs else loss

