"""Scoring (prompt, response) pairs with a saved or in-memory :class:`~alignpipe.rewards.ensemble.RewardEnsemble`
(:class:`EnsembleScorer`), and the Bradley–Terry pairwise probability of any reward scorer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignpipe.models.loading import DTYPES, remote_code_kwargs, resolve_model_location
from alignpipe.rewards.ensemble import RewardEnsemble
from alignpipe.rewards.ensemble_encoding import collate_features, encode_examples
from alignpipe.rewards.ensemble_files import read_manifest, recorded_scoring
from alignpipe.rewards.penalties import EnsembleRewards

__all__ = [
    "EnsembleScorer",
]


def bradley_terry_pairwise(score, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
    """``σ(r̄(a) − r̄(b))`` per triple, with ``a`` and ``b`` scored in one ``score`` call (any reward scorer)."""
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"prompts, a and b must have the same length, got {len(prompts)}, {len(a)}, {len(b)}")
    n = len(prompts)
    if n == 0:
        return []
    means = score(list(prompts) * 2, list(a) + list(b)).mean.double()
    return [float(p) for p in torch.sigmoid(means[:n] - means[n:])]


class EnsembleScorer:
    """Batched scoring of (prompt, response) pairs with a :class:`RewardEnsemble`.

    Also a :class:`alignpipe.rewards.judges.PairwiseJudge`: ``pairwise_probabilities`` is the Bradley–Terry
    ``σ(r̄_a − r̄_b)`` on the ensemble-mean reward.
    """

    def __init__(
        self,
        ensemble: RewardEnsemble,
        tokenizer,
        *,
        batch_size: int = 32,
        max_length: int = 512,
        judge_id: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad or an EOS token")
        self.ensemble = ensemble
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.judge_id = judge_id or f"reward_ensemble:{Path(ensemble.spec.backbone).name}:k{ensemble.num_members}"

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, backbone: str | None = None,
             dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             **kwargs: Any) -> EnsembleScorer:
        """Load the ensemble (:meth:`RewardEnsemble.load`, moved to ``device`` when given) and the tokenizer of its
        backbone. ``judge_id`` defaults to ``reward_ensemble:<directory name>``; ``dtype`` and ``max_length`` to
        those it was trained with (the manifest's ``scoring``; float32 and 512 for an ensemble saved without)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        scoring = recorded_scoring(manifest, kwargs)
        if dtype is None:
            dtype = DTYPES.get(scoring.get("dtype"), torch.float32)
        ensemble = RewardEnsemble._from_manifest(directory, manifest, backbone=backbone, dtype=dtype)
        if device is not None:
            ensemble.to(device)
        kwargs.setdefault("judge_id", f"reward_ensemble:{directory.resolve().name}")
        return cls.for_ensemble(ensemble, **kwargs)

    @classmethod
    def for_ensemble(cls, ensemble: RewardEnsemble, **kwargs: Any) -> EnsembleScorer:
        """A scorer for an in-memory ensemble, with its backbone's tokenizer (pad falls back to EOS)."""
        from transformers import AutoTokenizer

        spec = ensemble.spec
        tok_kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        tok_kwargs.update(remote_code_kwargs())
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_location(spec.backbone), **tok_kwargs)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(ensemble, tokenizer, **kwargs)

    def encode_features(self, prompts: Sequence[str], responses: Sequence[str], *, max_length: int | None = None,
                        ) -> list[dict[str, list[int]]]:
        """Unpadded token ids per (prompt, response) as scored, keeping the LAST ``max_length`` tokens (default: the
        ensemble's own); see :func:`encode_examples` for the template/pair rules."""
        return encode_examples(self.tokenizer, prompts, responses,
                               max_length=self.max_length if max_length is None else max_length)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, Tensor]:
        """One padded batch (see :func:`encode_examples` for the template/pair rules and the left truncation)."""
        return collate_features(self.tokenizer, self.encode_features(prompts, responses))

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> EnsembleRewards:
        """Per-member rewards ``[N, K]`` with mean and population std, in batches of ``batch_size`` (length-sorted
        to limit padding, returned in input order). Eval mode while scoring; the previous mode is restored."""
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length, got {len(prompts)}, {len(responses)}")
        if not prompts:
            raise ValueError("nothing to score")
        features = encode_examples(self.tokenizer, prompts, responses, max_length=self.max_length)
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        device = next(self.ensemble.parameters()).device
        was_training = self.ensemble.training
        self.ensemble.eval()
        out = torch.empty((len(features), self.ensemble.num_members), dtype=torch.float32)
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = collate_features(self.tokenizer, [features[i] for i in idx])
                batch = {k: v.to(device) for k, v in batch.items()}
                out[torch.tensor(idx)] = self.ensemble(**batch).float().cpu()
        finally:
            self.ensemble.train(was_training)
        return EnsembleRewards.from_members(out)

    def pairwise_probabilities(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """``σ(r̄(a) − r̄(b))`` per triple (``a`` and ``b`` scored in one call)."""
        return bradley_terry_pairwise(self.score, prompts, a, b)
