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
from dataclasses import asdict
from pathlib import Path

from pydantic import BaseModel, ConfigDict, TypeAdapter

from alignpipe.evaluation.generation import Generation, GenerationSettings
from alignpipe.io import atomic_write_text

__all__ = ["EvalCache", "content_key"]

# 2: a sample ends at every end token (the tokenizer's EOS, the model's declared ones, the chat template's end of
# turn: generation.end_token_ids); version 1's samples ended at the EOS alone.
CACHE_VERSION = 2


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

    def _read(self, kind: str, key: str, shape: TypeAdapter):
        """The entry, validated as ``shape``; None (a miss, recomputed and overwritten) when there is none or it
        cannot be read: a file cut short, or one of another shape (a number where text belongs, a list of lists
        where a list belongs)."""
        path = self._path(kind, key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            value = shape.validate_json(path.read_bytes())
        except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
            self.misses += 1
            return None
        self.hits += 1
        return value

    def get_generations(self, key: str) -> list[Generation] | None:
        entries = self._read("generations", key, _GENERATIONS)
        return None if entries is None else [Generation(e.prompt, e.response, e.response_ids, e.truncated,
                                                        e.context_ids) for e in entries]

    def put_generations(self, key: str, generations: list[Generation]) -> None:
        rows = [{"prompt": g.prompt, "response": g.response, "response_ids": list(g.response_ids),
                 "truncated": g.truncated,
                 **({"context_ids": list(g.context_ids)} if g.context_ids is not None else {})} for g in generations]
        atomic_write_text(self._path("generations", key), json.dumps(rows))

    def get_token_logprobs(self, key: str) -> list[list[float]] | None:
        return self._read("token_logprobs", key, _FLOAT_ROWS)

    def put_token_logprobs(self, key: str, values: list[list[float]]) -> None:
        atomic_write_text(self._path("token_logprobs", key), json.dumps([[float(v) for v in row] for row in values]))

    def get_member_scores(self, key: str) -> list[list[float]] | None:
        return self._read("member_scores", key, _FLOAT_ROWS)

    def put_member_scores(self, key: str, values: list[list[float]]) -> None:
        atomic_write_text(self._path("member_scores", key), json.dumps([[float(v) for v in row] for row in values]))

    def get_floats(self, key: str) -> list[float] | None:
        return self._read("logprobs", key, _FLOATS)

    def put_floats(self, key: str, values: list[float]) -> None:
        atomic_write_text(self._path("logprobs", key), json.dumps([float(v) for v in values]))


class _GenerationEntry(BaseModel):
    """A cached generation as :meth:`EvalCache.put_generations` writes it."""

    model_config = ConfigDict(strict=True)  # a number is no text, 1 is no true: such an entry is a miss
    prompt: str
    response: str
    response_ids: tuple[int, ...]
    truncated: bool
    context_ids: tuple[int, ...] | None = None


# The shapes of the entries, checked on reading (strict: true is not a number); JSON's NaN and Infinity are numbers.
_GENERATIONS = TypeAdapter(list[_GenerationEntry])
_FLOAT_ROWS = TypeAdapter(list[list[float]], config=ConfigDict(strict=True))
_FLOATS = TypeAdapter(list[float], config=ConfigDict(strict=True))
