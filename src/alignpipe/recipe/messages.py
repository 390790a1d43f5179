"""Error-message rendering: pydantic's validation errors rewritten in the terms of the person editing the YAML, each
location a key path with stages by name (``stages.dpo.beta``), each message with a hint (the nearest valid key, a
field's bounds, why YAML 1.1 text is not a number or a boolean) and a note of where the value came from (``_Origins``:
the file or the command-line override that set it). Apart because it walks the schema from ``Recipe`` down and reads
no files: loading calls it once validation fails."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from alignpipe.recipe.errors import did_you_mean
from alignpipe.recipe.schema import STAGE_TYPES, Recipe
from alignpipe.recipe.stage_base import RESERVED_STAGE_NAMES, STAGE_NAME_RE, _StageBase

# Provenance: key path (stages addressed by name) -> where its value came from, e.g. "set in
# recipes/base.yaml" or "from command-line override 'data.n_sft=10'"; "" = the top-level file.
_Origins = dict[tuple[str, ...], str]


def _show(value: Any) -> str:
    """A value as the user would have written it in YAML (containers by kind only)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class _Located:
    """A pydantic error location in the user's terms."""

    path: list[str | int]  # keys (a stage's name right after "stages") and list indices
    owner: type[BaseModel] | None  # the model whose key the path ends in, for did-you-mean
    field: FieldInfo | None  # that key's field, for bounds


def _raw_stage(data: dict[str, Any], index: int) -> dict[str, Any] | None:
    stages = data.get("stages")
    entry = stages[index] if isinstance(stages, list) and index < len(stages) else None
    return entry if isinstance(entry, dict) else None


def _stage_key(data: dict[str, Any], index: int) -> str | int:
    """A stage's name for key paths, or its index when the name is missing, invalid or duplicated."""
    name = (_raw_stage(data, index) or {}).get("name")
    if not isinstance(name, str) or not STAGE_NAME_RE.fullmatch(name) or name in RESERVED_STAGE_NAMES:
        return index
    same = [i for i in range(len(data["stages"])) if (_raw_stage(data, i) or {}).get("name") == name]
    return name if len(same) == 1 else index


def _locate(loc: Sequence[str | int], data: dict[str, Any], extra_key: bool) -> _Located:
    """Walk a pydantic ``loc`` alongside the schema: stage indices become names, and the
    discriminator tag and union-member labels (``'list[str]'``) that pydantic inserts are dropped."""
    path: list[str | int] = []
    model: type[BaseModel] | None = Recipe
    owner: type[BaseModel] | None = None
    field: FieldInfo | None = None
    tag: str | None = None  # a stage's type, which pydantic repeats in loc right after the stage index
    for pos, part in enumerate(loc):
        if tag is not None:
            is_tag, tag = part == tag, None
            if is_tag:
                continue
        if isinstance(part, int):
            if path == ["stages"]:
                kind = (_raw_stage(data, part) or {}).get("type")
                tag = kind if isinstance(kind, str) and kind in STAGE_TYPES else None
                model = STAGE_TYPES[tag] if tag else _StageBase
                path.append(_stage_key(data, part))
            else:
                path.append(part)
            continue
        if model is not None and (part in model.model_fields or (extra_key and pos == len(loc) - 1)):
            owner, field = model, model.model_fields.get(part)
            path.append(part)
            model = _nested_model(field) if field else None
    return _Located(path=path, owner=owner, field=field)


def _nested_model(field: FieldInfo) -> type[BaseModel] | None:
    for candidate in (field.annotation, *get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _render(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _bounds(field: FieldInfo | None) -> str:
    """' > 0', ' in [0, 1)', ... from a field's constraints."""
    lo = hi = None
    for meta in field.metadata if field else ():
        for attr, bracket in (("gt", "("), ("ge", "[")):
            if getattr(meta, attr, None) is not None:
                lo = (bracket, getattr(meta, attr))
        for attr, bracket in (("lt", ")"), ("le", "]")):
            if getattr(meta, attr, None) is not None:
                hi = (bracket, getattr(meta, attr))
    if lo and hi:
        return f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f" {'>' if lo[0] == '(' else '>='} {lo[1]}"
    if hi:
        return f" {'<' if hi[0] == ')' else '<='} {hi[1]}"
    return ""


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _message(err: dict[str, Any], where: _Located) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        replaced = getattr(where.owner, "replaced_keys", {}).get(str(where.path[-1]))
        if replaced:  # a key other stage types have and this one replaces (PPO: no Trainer schedule)
            return replaced
        valid = list(where.owner.model_fields) if where.owner else []
        hint = did_you_mean(str(where.path[-1]), valid)
        return f"unknown key{hint}" if hint else f"unknown key (valid keys: {', '.join(valid)})"
    if kind == "missing":
        return "missing required key"
    if kind == "union_tag_not_found":
        return f"missing required key (one of: {', '.join(STAGE_TYPES)})"
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag"))
        return f"unknown stage type {tag!r}{did_you_mean(tag, list(STAGE_TYPES))} (valid: {', '.join(STAGE_TYPES)})"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        noun = next((p for p in reversed(where.path) if isinstance(p, str)), "value")
        if where.path and isinstance(where.path[-1], int):  # an item of a list: families -> family
            noun = noun[:-3] + "y" if noun.endswith("ies") else noun.removesuffix("s")
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        return f"{_show(value)} is not a valid {noun}{hint} (valid: {', '.join(choices)})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        number = "an integer" if where.field is not None and where.field.annotation is int else "a number"
        return f"expected {number}{_bounds(where.field)}, got {_show(value)}"
    if kind == "string_too_short":  # "" for a name or path: pydantic's own words named no fix
        optional = where.field is not None and type(None) in get_args(where.field.annotation)
        return f"expected a non-empty string{' or null' if optional else ''}, got ''"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length', 1)} item(s), got {_show(value) if value else 'none'}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "list_type" and where.path == ["stages"]:
        return f"expected a list of stages (each entry starting '- name: ...'), got {_show(value)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_show(value)}{_yaml11_hint(value, kind)}"
    return f"{err['msg']}, got {_show(value)}"


_NUMBER_KINDS = frozenset({"int_type", "int_parsing", "float_type", "float_parsing"})  # where a number was expected
_NOT_DECIMAL = re.compile(r"[-+]?(?:0[0-9_]+|0[xXoObB][0-9a-fA-F_]+|[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?)")


# YAML 1.1 booleans that are text here, in the three cases its resolver read (yes, Yes, YES: not yEs; y/n never were)
_YAML11_BOOLEANS = frozenset(form for word in ("yes", "no", "on", "off") for form in (word, word.title(), word.upper()))


def _yaml11_hint(value: Any, kind: str) -> str:
    """Why text reached a number or a true/false field where YAML 1.1 would have read a number or a boolean."""
    if kind in _NUMBER_KINDS:
        return _number_hint(value)
    if kind in ("bool_type", "bool_parsing") and isinstance(value, str) and value in _YAML11_BOOLEANS:
        return f": only true and false are booleans here ({value} is text, as in YAML 1.2); write true or false"
    return ""


def _number_hint(value: Any) -> str:
    """Why a number written in octal, hex, binary or base 60 reached a number field as text (``strict_yaml``): the
    user sees a number, and YAML 1.1 and 1.2 read some of these differently (010: 8 or 10)."""
    if not (isinstance(value, str) and _NOT_DECIMAL.fullmatch(value)):
        return ""
    try:
        yaml11 = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError):  # 0x_ matches the pattern, yet YAML 1.1 cannot read it as a number either
        yaml11 = None
    read = f" (YAML 1.1 reads it as {yaml11})" if isinstance(yaml11, (int, float)) else ""
    return f": numbers are read in decimal only{read}; write the decimal number"


def _alternatives(errs: list[dict[str, Any]]) -> str | None:
    """A union field fails once per member; say 'expected A or B, got x' instead, with the hint a member gives (a
    true/false-or-number field given yes is told what a single true/false field is)."""
    phrases = []
    for err in errs:
        if err["type"] in _EXPECTED:
            phrases.append(_EXPECTED[err["type"]])
        elif err["type"] == "literal_error":
            phrases.append(err["ctx"]["expected"])
        else:
            return None
    hint = next(filter(None, (_yaml11_hint(err["input"], err["type"]) for err in errs)), "")
    return f"expected {' or '.join(phrases)}, got {_show(errs[0]['input'])}{hint}"


def _origin_note(path: Sequence[str | int], origins: _Origins) -> str:
    """' (set in base.yaml)' / ' (from command-line override ...)' for the longest known prefix of path. A key that
    no file sets but that holds a key an override sets was made by that override (``model.tiny.foo.bar=1`` makes
    ``model.tiny.foo``), not by the file that sets a shorter prefix."""
    keys = tuple(p for p in path if isinstance(p, str))
    for n in range(len(keys), 0, -1):
        origin = origins.get(keys[:n], next((o for k, o in origins.items() if k[:n] == keys[:n]), None))
        if origin is not None:
            return f" ({origin})" if origin else ""
    return ""


def _explain(exc: ValidationError, data: dict[str, Any], origins: _Origins) -> list[str]:
    """One line per problem: ``key.path: message (where the value came from)``."""
    groups: dict[str, list[tuple[dict[str, Any], str]]] = {}
    notes: dict[str, str] = {}
    for err in exc.errors():
        if err["type"] == "recipe":  # our cross-field checks: already (loc, message) pairs
            items = [((*err["loc"], *loc), msg) for loc, msg in err["ctx"]["problems"]]
        else:
            items = [(err["loc"], None)]
        for loc, msg in items:
            where = _locate(loc, data, extra_key=err["type"] == "extra_forbidden")
            if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
                where.path.append("type")
            key = _render(where.path)
            groups.setdefault(key, []).append((err, msg or _message(err, where)))
            notes[key] = _origin_note(where.path, origins)
    lines = []
    for key, group in groups.items():
        merged = _alternatives([err for err, _ in group]) if len(group) > 1 else None
        lines.append(f"{key}: {merged or '; '.join(dict.fromkeys(msg for _, msg in group))}{notes[key]}")
    return lines
