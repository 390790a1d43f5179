"""Content-addressed cache of generations and log-probabilities for the evaluation harness.

Why: re-ranking, a new metric or a re-run of ``alignpipe eval`` must not regenerate. A generation list is keyed by
the checkpoint's weights hash, the dtype they are loaded in, the hash of the prompt list, the generation settings
(which pin the seed) and the batch layout, because the harness seeds each batch; log-probabilities by the scoring
model's weights hash and dtype and the hash of the scored generations. The dtype is in both because the same weights
sample and score differently in bfloat16 and float32. A checkpoint without a content hash (a hub id) is never
cached: its name does not identify its weights. Entries are written atomically (temp + fsync + rename), so a crash
leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from alignpipe.evaluation.generation import Generation, GenerationSettings
from alignpipe.io import atomic_write_text

__all__ = ["EvalCache", "content_key"]

CACHE_VERSION = 1


def content_key(*parts) -> str:
    """sha256 of the JSON of ``parts`` (sorted keys): the same inputs always give the same key."""
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class EvalCache:
    """Generations, per-token log-probs, per-sample floats (judge scores) and per-member reward-model scores stored
    as JSON under ``directory`` (``generations/``, ``token_logprobs/``, ``logprobs/``, ``member_scores/``)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0

    # --- keys ---------------------------------------------------------------------------------------------------

    @staticmethod
    def generation_key(weights_sha256: str, prompts: list[str], settings: GenerationSettings, *, dtype: str) -> str:
        """``dtype``: the one the weights are loaded in (``auto`` resolved), e.g. ``"bfloat16"``."""
        return content_key("generations", weights_sha256, dtype, content_key(prompts), asdict(settings))

    @staticmethod
    def token_logprob_key(weights_sha256: str, generations: list[Generation], *, dtype: str) -> str:
        """``dtype``: the one the scoring model's weights are loaded in (``auto`` resolved)."""
        # a context other than the rendered prompt is part of what was scored (a key without one is unchanged)
        scored = [(g.prompt, list(g.response_ids)) if g.context_ids is None
                  else (g.prompt, list(g.response_ids), list(g.context_ids)) for g in generations]
        return content_key("token_logprobs", weights_sha256, dtype, content_key(scored))

    # --- entries ------------------------------------------------------------------------------------------------

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / kind / key[:2] / f"{key}.json"

    def _read(self, kind: str, key: str, parse: Callable[[Any], Any]):
        """The entry as ``parse`` reads it; None (a miss, recomputed and overwritten) when there is none or it cannot
        be read, or parsed: a file cut short, or one of another shape (``parse`` raises)."""
        path = self._path(kind, key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            value = parse(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):  # JSONDecodeError is a ValueError
            self.misses += 1
            return None
        self.hits += 1
        return value

    def get_generations(self, key: str) -> list[Generation] | None:
        return self._read("generations", key, lambda rows: [
            Generation(_text(r["prompt"]), _text(r["response"]), _ints(r["response_ids"]), _flag(r["truncated"]),
                       None if r.get("context_ids") is None else _ints(r["context_ids"])) for r in _items(rows)])

    def put_generations(self, key: str, generations: list[Generation]) -> None:
        rows = [{"prompt": g.prompt, "response": g.response, "response_ids": list(g.response_ids),
                 "truncated": g.truncated,
                 **({"context_ids": list(g.context_ids)} if g.context_ids is not None else {})} for g in generations]
        atomic_write_text(self._path("generations", key), json.dumps(rows))

    def get_token_logprobs(self, key: str) -> list[list[float]] | None:
        return self._read("token_logprobs", key, lambda rows: [_floats(row) for row in _items(rows)])

    def put_token_logprobs(self, key: str, values: list[list[float]]) -> None:
        atomic_write_text(self._path("token_logprobs", key), json.dumps([[float(v) for v in row] for row in values]))

    def get_member_scores(self, key: str) -> list[list[float]] | None:
        return self._read("member_scores", key, lambda rows: [_floats(row) for row in _items(rows)])

    def put_member_scores(self, key: str, values: list[list[float]]) -> None:
        atomic_write_text(self._path("member_scores", key), json.dumps([[float(v) for v in row] for row in values]))

    def get_floats(self, key: str) -> list[float] | None:
        return self._read("logprobs", key, _floats)

    def put_floats(self, key: str, values: list[float]) -> None:
        atomic_write_text(self._path("logprobs", key), json.dumps([float(v) for v in values]))


# Readers of a cache entry's parts: a part of another type raises TypeError, which makes the entry a miss.
def _items(value: Any) -> list:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _floats(value: Any) -> list[float]:
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in _items(value)):
        raise TypeError("expected numbers")
    return [float(v) for v in value]


def _ints(value: Any) -> tuple[int, ...]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in _items(value)):
        raise TypeError("expected token ids")
    return tuple(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected text")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value
