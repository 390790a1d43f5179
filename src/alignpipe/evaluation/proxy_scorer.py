"""A saved reward model as the harness's proxy scorer: loaded on first use, its scores cached by content.

The harness scores every checkpoint's samples with it after the policies are released, so at most one model is
resident at a time besides it; a re-evaluation whose samples and scores are all cached never loads it.
"""

from __future__ import annotations

import gc
import logging
import os

import torch

from alignpipe.evaluation.cache import EvalCache, content_key
from alignpipe.models.loading import resolve_dtype

log = logging.getLogger("alignpipe")

__all__ = ["ProxyScorer"]


class ProxyScorer:
    """``(prompts, responses) -> [N, K]`` per-member rewards of the reward model saved in ``path``.

    ``weights_sha256`` (the reward stage's output hash) keys the cache; without it or a cache, nothing is cached.
    ``dtype`` is a recipe's ``model.dtype`` name, resolved as the reward stage resolved it.
    """

    def __init__(self, path: str | os.PathLike[str], weights_sha256: str | None, *, dtype: str = "auto",
                 device: str | torch.device | None = None, cache: EvalCache | None = None):
        self.path, self.weights_sha256, self.dtype, self.device, self.cache = path, weights_sha256, dtype, device, cache
        self._scorer = None

    def __call__(self, prompts: list[str], responses: list[str]) -> list[list[float]]:
        key = None
        if self.cache is not None and self.weights_sha256:
            machine_dtype = str(resolve_dtype(self.dtype))  # what "auto" means here: cached scores depend on it
            key = content_key("proxy", self.weights_sha256, self.dtype, machine_dtype, prompts, responses)
            cached = self.cache.get_member_scores(key)
            if cached is not None:
                return cached
        scorer = self._loaded()
        scores = scorer.score(prompts, responses).per_member.tolist()
        self._warn_if_cut(scorer, prompts, responses)
        if key:
            self.cache.put_member_scores(key, scores)
        return scores

    def _loaded(self):
        if self._scorer is None:
            from alignpipe.rewards.loading import load_reward_scorer

            log.info("[eval] loading the proxy reward model %s", self.path)
            self._scorer = load_reward_scorer(self.path, dtype=self.dtype, device=self.device)
        return self._scorer

    def _warn_if_cut(self, scorer, prompts: list[str], responses: list[str]) -> None:
        """A reward model keeps ``max_length`` tokens of what it scores: say when that cut a conversation."""
        whole = scorer.encode_features(prompts, responses, max_length=2**31 - 1)  # encoded as scored, uncut
        cut = sum(len(example["input_ids"]) > scorer.max_length for example in whole)
        if cut:
            log.warning("[eval] proxy: %d of %d responses with their prompts are longer than the reward model's "
                        "max_length %d, which cut them to that many tokens, the prompt's start first (raise the "
                        "reward stage's max_length, or lower the eval stage's max_new_tokens)", cut, len(whole),
                        scorer.max_length)

    def release(self) -> None:
        self._scorer = None
        gc.collect()
