"""TRL's ``DPOTrainer`` with its ``sigmoid`` term swapped for any per-pair loss: the hook every non-TRL loss uses.

Why: TRL 1.16's ``DPOTrainer`` computes everything a pairwise preference loss needs (tokenisation, the policy
forward, the reference forward, its metrics, the optional ``sft`` NLL term), but its ``_compute_loss`` is one
~330-line method with no per-pair hook, and it has no loss that reads per-pair data columns (soft targets, SPPO win
rates) or a second reference (INPO). Subclasses here define only :meth:`PairLossDPOTrainer.pair_loss`.

How it hooks into TRL (kept as thin as TRL's structure allows):

* float data columns named in ``pair_columns`` survive tokenisation (TRL's ``map`` keeps extra columns), are kept
  by ``remove_unused_columns`` (``_set_signature_columns_if_needed``) and become float tensors in the batch
  (:class:`FloatColumnsCollator` around TRL's collator; the wrapped collator never sees them);
* ``_compute_loss``: TRL computes everything. We capture the policy's per-token log-probs with a forward hook on
  that same forward, obtain the reference log-probs with TRL's own ``compute_ref_log_probs`` and hand them to TRL
  in the batch as its ``precompute_ref_log_probs`` mode does (one reference forward per step, as in stock TRL), and
  replace TRL's hard-label term: ``loss = loss_TRL + w · mean(pair_loss − (−log σ(βh)))``, with ``h`` rebuilt
  exactly as TRL builds it and ``w`` the weight of the loss list's ``sigmoid`` entry, wherever it sits. Where the
  pair loss equals ``−log σ(βh)`` the correction is exactly zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from alignpipe.losses.preference import dpo_logits
from alignpipe.trainers.reference_logps import InMemoryReferenceLogps

__all__ = [
    "FloatColumnsCollator", "PairLogps", "PairLossDPOTrainer", "check_replaceable_sigmoid", "check_sigmoid_options",
    "replaces_sigmoid", "sigmoid_weight",
]

SIGMOID_LOSS_TYPES = (["sigmoid"], ["sigmoid", "sft"])  # the pair loss replaces the sigmoid term; sft (NLL) may stay


class FloatColumnsCollator:
    """Wraps a preference collator so the named float fields become ``batch[name]`` float tensors.

    ``defaults[name]`` replaces a missing or null value (``None`` = the field is required). The wrapped collator
    never sees the fields, so any collator works; batches with none of the fields pass through unchanged.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
                 defaults: dict[str, float | None]):
        self.collator = collator
        self.defaults = dict(defaults)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        names = [n for n in self.defaults if any(n in example for example in examples)]
        if not names:
            return self.collator(examples)
        batch = self.collator([{k: v for k, v in ex.items() if k not in self.defaults} for ex in examples])
        for name in names:
            values = [example.get(name) for example in examples]
            if any(v is None for v in values) and self.defaults[name] is None:
                raise ValueError(f"column {name!r} is null in a batch; every row needs a value")
            batch[name] = torch.tensor([self.defaults[name] if v is None else float(v) for v in values],
                                       dtype=torch.float32)
        return batch

    def __getattr__(self, name: str):  # e.g. `pad_token_id`, `tokenizer`, read by Trainer.save_model
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def replaces_sigmoid(loss_types) -> bool:
    """Whether a per-pair loss can stand in for TRL's loss list: ``["sigmoid"]``, optionally with ``"sft"``."""
    return list(loss_types) in SIGMOID_LOSS_TYPES


def sigmoid_weight(loss_types, loss_weights) -> float:
    """The weight of TRL's ``sigmoid`` term in a loss list: TRL adds ``weight · mean(loss)`` per entry, so the sum of
    the ``sigmoid`` entries' weights wherever they sit (0 when there is none)."""
    return sum(weight for loss, weight in zip(loss_types, loss_weights, strict=True) if loss == "sigmoid")


def check_replaceable_sigmoid(args: DPOConfig, why: str) -> None:
    """A loss list other than ``[sigmoid]`` (plus ``sft``), or options under which TRL's ``sigmoid`` term is not
    ``−log σ(βh)`` with our ``h``, are rejected, naming them: for a loss that stands in for the whole DPO loss."""
    if not replaces_sigmoid(args.loss_type):
        raise ValueError(
            f"{why} requires DPOConfig loss_type=['sigmoid'] or ['sigmoid', 'sft'] (its loss replaces the sigmoid DPO "
            f"loss); got loss_type={list(args.loss_type)}. Use loss_type=['sigmoid'] (plus 'sft' for an NLL term)."
        )
    check_sigmoid_options(args, why)


def check_sigmoid_options(args: DPOConfig, why: str) -> None:
    """Options under which TRL's ``sigmoid`` term is not ``−log σ(βh)`` with our ``h`` are rejected, naming them."""
    unsupported = {
        "ld_alpha": (args.ld_alpha, None),
        "f_divergence_type": (args.f_divergence_type, "reverse_kl"),
        "use_weighting": (args.use_weighting, False),
    }
    for option, (value, default) in unsupported.items():
        if value != default:
            raise ValueError(f"{why} does not support DPOConfig {option}={value!r}: it changes TRL's sigmoid term, "
                             f"which is replaced on the assumption that it is −log σ(βh) of summed log-probs; leave "
                             f"it at {default!r}.")


class PairLogps:
    """Sequence log-probabilities of one batch of pairs under the policy and TRL's reference."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor):
        self.chosen, self.rejected, self.ref_chosen, self.ref_rejected = chosen, rejected, ref_chosen, ref_rejected

    @property
    def h(self) -> torch.Tensor:
        """The DPO logit, bit-identical to TRL's ``delta_score`` (same tensors, same order of operations)."""
        return dpo_logits(self.chosen, self.rejected, self.ref_chosen, self.ref_rejected)

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected


class PairLossDPOTrainer(InMemoryReferenceLogps, DPOTrainer):
    """``trl.DPOTrainer`` whose ``sigmoid`` term is replaced by :meth:`pair_loss` (see the module docstring).

    Subclasses set ``pair_columns`` (float column -> default for null, ``None`` = required) and implement
    :meth:`pair_loss`; :meth:`uses_pair_loss` may fall back to stock TRL for a batch.
    """

    pair_columns: ClassVar[dict[str, float | None]] = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.check_sigmoid_replacement()
        # Wrapped after TRL's __init__, which builds its default collator; its reference precompute (if any) ran with
        # the plain collator, which ignores the extra fields.
        if self.pair_columns:
            self.data_collator = FloatColumnsCollator(self.data_collator, self.pair_columns)

    def check_sigmoid_replacement(self) -> None:
        """Refuse, when the trainer is built, a ``DPOConfig`` under which TRL's loss is not the ``sigmoid`` term that
        :meth:`pair_loss` replaces (another ``loss_type``, ``use_weighting``, ``f_divergence_type``, ``ld_alpha``).

        Why here: a trainer whose every batch uses its pair loss (SPPO, INPO) would otherwise train on a loss that is
        neither TRL's nor its own, without a word. A subclass that is stock TRL unless asked otherwise overrides it.
        """
        check_replaceable_sigmoid(self.args, type(self).__name__)

    def pair_loss(self, logps: PairLogps, columns: dict[str, torch.Tensor], inputs: dict) -> torch.Tensor:
        """Per-pair loss replacing ``−log σ(βh)``; may add metrics via :meth:`log_metric`."""
        raise NotImplementedError

    def uses_pair_loss(self, columns: dict[str, torch.Tensor]) -> bool:
        return True

    def log_metric(self, name: str, value: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode][name].append(self.accelerator.gather(value.detach().float()).mean().item())

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        missing = [c for c in self.pair_columns if c not in self._signature_columns]
        self._signature_columns = [*self._signature_columns, *missing]

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        columns = {name: inputs.pop(name) for name in self.pair_columns if name in inputs}  # not for the forward
        if not self.uses_pair_loss(columns):
            return super()._compute_loss(model, inputs, return_outputs)  # stock TRL
        if columns:  # a column's loss list is checked in `_prepare_dataset`, which vision datasets skip: here too
            check_replaceable_sigmoid(self.args, type(self).__name__)

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

        # Rebuild TRL's per-pair log-probs from the same tensors, with the same operations (`ld_alpha is None`).
        seq_len = inputs["completion_mask"].size(1) - 1
        chosen, rejected = captured[0].log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
        logps = PairLogps(chosen, rejected, inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
        columns = {name: value.to(chosen.device) for name, value in columns.items()}

        # TRL's loss holds w * mean(-log σ(βh)) (+ its other entries, + MoE aux loss); replace the hard-label term.
        hard = -F.logsigmoid(self.beta * logps.h)
        weight = sigmoid_weight(self.loss_types, self.loss_weights)
        loss = loss + weight * (self.pair_loss(logps, columns, inputs) - hard).mean()
        return (loss, outputs) if return_outputs else loss
