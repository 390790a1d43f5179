"""The recipe's error type and the helpers every part of the schema raises with: ``RecipeError`` (what the user
sees: a headline, then one line per problem), ``did_you_mean`` (the nearest valid name) and ``_problem`` (a pydantic
error carrying (key path, message) pairs, so that a cross-field check points at the offending key). Apart because the
specs, the stage types, the ``Recipe`` model, loading and the rendering of messages all raise with them, while this
module imports none of those."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from pydantic_core import PydanticCustomError


class RecipeError(ValueError):
    """A recipe problem, phrased for the person editing the YAML: a headline, then one line per problem."""

    def __init__(self, headline: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        super().__init__(f"{headline}:" + "".join(f"\n  - {p}" for p in self.problems) if problems else headline)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` when a close name exists, else ``""``. Compared case-insensitively: difflib counts
    each capital as a changed letter, so ``MAX_STEPS`` or ``SFT`` found nothing, though the fix is the name's case."""
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def _problem(*problems: tuple[tuple[str | int, ...], str]) -> PydanticCustomError:
    """A validation error carrying (location, message) pairs, so cross-field checks can point
    at the offending key (``max_items``) rather than at the whole model."""
    summary = "; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems)
    return PydanticCustomError("recipe", "{summary}", {"summary": summary, "problems": list(problems)})
