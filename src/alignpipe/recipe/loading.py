"""Reading a recipe: YAML files, ``extends`` chains (stages merged by name) and ``key.path=value`` command-line
overrides, remembering where each key came from, then validation as a ``Recipe`` with any failure turned into one
``RecipeError`` (worded by ``messages``). Apart because it is the only part that touches files and the command line;
the schema itself validates plain dictionaries."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from alignpipe.recipe.errors import RecipeError, did_you_mean
from alignpipe.recipe.messages import _explain, _Origins, _show
from alignpipe.recipe.schema import Recipe
from alignpipe.strict_yaml import parse_strict_yaml

# ----------------------------------------------------------------------------- YAML + extends


def _yaml_error(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """One line: where in the file (line, column) and what. A character YAML refuses (a NUL, a control character)
    is a ReaderError, which has a character offset instead of a mark and a message over two lines."""
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        column = exc.position - (before.rfind("\n") + 1)
        return (f"{path} line {before.count(chr(10)) + 1}, column {column + 1}: YAML syntax error: character "
                f"#x{exc.character:04x} is not allowed in YAML (only printable text, tabs and line breaks); remove it")
    mark = getattr(exc, "problem_mark", None)
    where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    return f"{where}: YAML syntax error: {getattr(exc, 'problem', None) or exc}"


def _read_yaml(path: Path, headline: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = parse_strict_yaml(text)
    except OSError as exc:
        raise RecipeError(headline, [f"{path}: cannot read file ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError as exc:
        msg = f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        raise RecipeError(headline, [msg]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(headline, [_yaml_error(path, text, exc)]) from None
    if data is None:
        raise RecipeError(headline, [f"{path}: file is empty; expected a mapping with at least name and stages"])
    if not isinstance(data, dict):
        msg = f"{path}: top level must be a mapping (name: ..., stages: ...), got {_show(data)}"
        raise RecipeError(headline, [msg])
    return data


def _key_paths(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path in a raw recipe, with the top-level stage list keyed by stage name."""
    for key, value in data.items():
        path = (*prefix, str(key))
        yield path
        if path == ("stages",) and isinstance(value, list):
            for stage in value:
                if isinstance(stage, dict) and isinstance(stage.get("name"), str):
                    yield (*path, stage["name"])
                    yield from _key_paths(stage, (*path, stage["name"]))
        elif isinstance(value, dict):
            yield from _key_paths(value, path)


def _deep_merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(parent)
    for key, value in child.items():
        old = out.get(key)
        out[key] = _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def _merge_recipes(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Deep merge, except that ``stages`` merges by stage name: a child entry naming a parent stage
    refines it in place, other entries are appended; so a child recipe can tweak a single stage."""
    merged = _deep_merge(parent, {k: v for k, v in child.items() if k != "stages"})
    p_stages, c_stages = parent.get("stages"), child.get("stages")
    if not (isinstance(p_stages, list) and isinstance(c_stages, list)):
        if "stages" in child:
            merged["stages"] = c_stages
        return merged
    stages = list(p_stages)
    index = {s["name"]: i for i, s in enumerate(stages) if isinstance(s, dict) and isinstance(s.get("name"), str)}
    for entry in c_stages:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in index:
            stages[index[name]] = _deep_merge(stages[index[name]], entry)
        else:
            stages.append(entry)
    merged["stages"] = stages
    return merged


def _not_a_recipe_file(path: Path) -> str:
    """Why ``path``, which is no file, cannot be read as a recipe: a directory is not "not found"."""
    if path.is_dir():
        return f"{path} is a directory, not a recipe file; name the recipe's YAML file"
    return f"file {path} not found"


def _load_with_extends(path: Path, headline: str, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], _Origins]:
    data = _read_yaml(path, headline)
    own: _Origins = dict.fromkeys(_key_paths(data), f"set in {path}")
    ref = data.pop("extends", None)
    if ref is None:
        return data, own
    if not isinstance(ref, str) or not ref:
        raise RecipeError(headline, [f"{path}: extends: expected a path to another recipe file, got {_show(ref)}"])
    parent_path = Path(os.path.normpath(path.parent / ref))
    chain = (*chain, path)
    if parent_path.resolve() in {p.resolve() for p in chain}:
        raise RecipeError(headline, [f"{path}: extends: cycle {' -> '.join(map(str, (*chain, parent_path)))}"])
    if not parent_path.is_file():
        msg = f"{path}: extends: {_not_a_recipe_file(parent_path)} (extends paths are relative to the extending file)"
        raise RecipeError(headline, [msg])
    parent, origins = _load_with_extends(parent_path, headline, chain)
    return _merge_recipes(parent, data), origins | own


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stages.dpo.beta=0.2"`` -> ``(["stages", "dpo", "beta"], 0.2)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise RecipeError(f"bad override syntax: expected key.path=value, got {text!r}")
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise RecipeError(f"bad override syntax: empty key segment in {text!r} (expected key.path=value)")
    try:
        return parts, parse_strict_yaml(raw)  # as the file's
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line per problem
        problem = problem.replace(' in "<unicode string>",', ",")
        raise RecipeError(f"bad override value in {text!r}: not valid YAML ({problem}); write the value as YAML, "
                          "quoting text that holds ':', '#', '[' or '{' (key='a: b')") from None


_INDEXED = re.compile(r"(?P<key>[^\[\]]*)\[(?P<index>[^\]]*)\]")  # an override key segment written key[index]


def _index(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _indexed_override(parts: list[str], names: list[str], raw: str) -> str | None:
    """Why an override that indexes a list (``stages[0].beta``, ``stages.0.beta``, ``data.families[1]``) cannot be
    applied, with the form that can: overrides have no list indexing, they address a stage by its name and set any
    other list whole. None when no segment indexes a list."""
    for depth, part in enumerate(parts):
        match = _INDEXED.fullmatch(part)
        if match:
            key, index, written = match["key"], match["index"], ".".join(parts[: depth + 1])
        elif depth == 1 and parts[0] == "stages" and part not in names and _index(part) is not None:
            key, index, written = "", part, f"stages.{part}"
        else:
            continue
        where = ".".join(p for p in (*parts[:depth], key) if p)
        if where != "stages" and _index(index) is None:  # data[families]: a key in brackets, which a dot writes
            return f"{written}: overrides write keys with dots: {where}.{index}=..."
        if where != "stages":
            return f"{written}: overrides have no [index]; a list is set whole ({where}=[...])"
        position, rest = _index(index), ".".join(parts[depth + 1:])
        name = names[position] if position is not None and -len(names) <= position < len(names) else index
        example = f", here stages.{name}.{rest}={raw}" if name in names and rest else ""
        return (f"{written}: overrides address a stage by its name, stages.<name>.<field>=value{example} "
                f"(stages: {', '.join(names) or 'none'})")
    return None


def _apply_override(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set ``value`` at ``parts`` in place, addressing stages by name and creating missing mappings."""
    source = f"(from command-line override {text!r})"
    node: Any = data
    start = 0
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    names = [s["name"] for s in stages if isinstance(s, dict) and isinstance(s.get("name"), str)]
    if problem := _indexed_override(parts, names, text.partition("=")[2]):
        raise RecipeError(f"{problem} {source}")
    if parts[0] == "stages" and len(parts) > 1:
        if parts[1] not in names:
            raise RecipeError(f"stages.{parts[1]}: unknown stage {parts[1]!r}{did_you_mean(parts[1], names)} "
                              f"(stages: {', '.join(names) or 'none'}) {source}")
        if len(parts) == 2:
            raise RecipeError(f"stages.{parts[1]}: set a stage's fields one by one (stages.{parts[1]}.<field>=value),"
                              f" not the whole stage {source}")
        node, start = next(s for s in stages if isinstance(s, dict) and s.get("name") == parts[1]), 2
    for depth in range(start, len(parts) - 1):
        child = node.setdefault(parts[depth], {})
        if not isinstance(child, dict):
            whole = f"; set the whole list ({'.'.join(parts[: depth + 1])}=[...])" if isinstance(child, list) else ""
            raise RecipeError(f"{'.'.join(parts[: depth + 1])}: is {_show(child)}, not a mapping, so it has no key "
                              f"{parts[depth + 1]!r}{whole} {source}")
        node = child
    node[parts[-1]] = value


def _load(path: str | Path, overrides: Sequence[str]) -> tuple[dict[str, Any], _Origins, str]:
    path = Path(path)
    headline = f"recipe {path} is invalid"
    if not path.is_file():
        raise RecipeError(headline, [_not_a_recipe_file(path)])
    data, origins = _load_with_extends(path, headline)
    data = copy.deepcopy(data)  # YAML anchors may alias nodes; overrides must not write through them
    for text in overrides:
        try:
            parts, value = parse_override(text)
            _apply_override(data, parts, value, text)
        except RecipeError as exc:
            raise RecipeError(headline, [str(exc)]) from None
        key = tuple(parts)  # the override now owns this key and everything below it
        origins = {k: v for k, v in origins.items() if k[: len(key)] != key}
        origins[key] = f"from command-line override {text!r}"
    top = f"set in {path}"  # the headline already names the top-level file
    return data, {key: "" if origin == top else origin for key, origin in origins.items()}, headline


def load_recipe_dict(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw merged recipe (after ``extends`` and overrides, before validation), for debugging."""
    return _load(path, overrides)[0]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge (``extends``), override and validate a recipe; problems raise one RecipeError."""
    data, origins, headline = _load(path, overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(headline, _explain(exc, data, origins)) from None
