"""The bad-input corpus (``tests/bad_inputs/``) and fuzzing of recipe overrides, tagged YAML scalars and dataset rows.

Every case goes through the real entry path (``load_recipe`` with overrides, then ``Runner.run()`` in-process) and
must fail with one of our error types, before anything is trained or written: no ``runs/<name>/`` is left behind.

A case is one YAML file under ``recipes/``, ``datasets/`` or ``models/``:

* ``recipe``: the recipe, as a mapping or as raw YAML text (for syntax errors); written to ``recipe.yaml`` in a fresh
  directory, which is also the working directory (dataset paths are relative to it, as under launch.sh);
* ``overrides``: command-line overrides (``key.path=value``);
* ``files``: more files next to the recipe: a string is written as text, ``{jsonl: [rows]}`` as JSON Lines (NaN
  allowed), ``{yaml: mapping}`` as YAML, ``{hex: "..."}`` as raw bytes (non-UTF-8 input);
* ``model_setup``: make ``path`` a copy of a healthy tiny checkpoint, then break it: ``remove`` files,
  ``delete_keys`` / ``set_keys`` in its JSON files;
* ``error``: the expected class (RecipeError, PreflightError); ``expect``: regexes that must all match the message
  (``{dir}`` = the case directory, ``{recipe}`` = the recipe path); ``contains``: literal substrings.
"""

from __future__ import annotations

import json
import re
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TINY_RECIPE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from alignpipe.data.errors import DataError
from alignpipe.data.preference import preference_pairs_for
from alignpipe.data.sft_sources import load_sft_source
from alignpipe.models.loading import ModelError
from alignpipe.pipeline.preflight import PreflightError
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import (
    STAGE_TYPES,
    DataSpec,
    PreferenceDataSpec,
    Recipe,
    RecipeError,
    load_recipe,
)
from alignpipe.strict_yaml import parse_strict_yaml

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = sorted(CORPUS.glob("*/*.yaml"))
ERRORS = {"RecipeError": RecipeError, "PreflightError": PreflightError}
OURS = (RecipeError, PreflightError, DataError, ModelError)


# ----------------------------------------------------------------------------- building a case


def _write_file(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content)
    elif "hex" in content:
        path.write_bytes(bytes.fromhex(content["hex"]))
    elif "jsonl" in content:
        path.write_text("".join(json.dumps(row) + "\n" for row in content["jsonl"]))
    elif "yaml" in content:
        path.write_text(yaml.safe_dump(content["yaml"], sort_keys=False))
    else:
        raise ValueError(f"unknown file content {sorted(content)} (text, hex, jsonl or yaml)")


def _break_model(setup: dict, directory: Path, healthy: Path) -> None:
    target = directory / setup.get("path", "model")
    shutil.copytree(healthy, target)
    for name in setup.get("remove", []):
        (target / name).unlink()
    for name, keys in setup.get("delete_keys", {}).items():
        data = json.loads((target / name).read_text())
        (target / name).write_text(json.dumps({k: v for k, v in data.items() if k not in keys}))
    for name, values in setup.get("set_keys", {}).items():
        data = json.loads((target / name).read_text())
        (target / name).write_text(json.dumps({**data, **values}))


def _materialise(case: dict, directory: Path, healthy_model: Path) -> Path:
    recipe = case["recipe"]
    recipe_path = directory / "recipe.yaml"
    recipe_path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    for name, content in case.get("files", {}).items():
        _write_file(directory / name, content)
    if "model_setup" in case:
        _break_model(case["model_setup"], directory, healthy_model)
    return recipe_path


@pytest.fixture(scope="module")
def healthy_model(llama_path) -> Path:
    return Path(llama_path)


# ----------------------------------------------------------------------------- the corpus


def test_the_corpus_has_at_least_50_cases_in_every_category() -> None:
    counts = {kind: len(list((CORPUS / kind).glob("*.yaml"))) for kind in ("recipes", "datasets", "models")}
    assert sum(counts.values()) >= 50, counts
    assert counts["datasets"] >= 12 and counts["models"] >= 6, counts


@pytest.mark.parametrize("case_path", CASES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_bad_input_fails_fast_with_a_clear_error(case_path: Path, tmp_path: Path, monkeypatch,
                                                  healthy_model: Path) -> None:
    case = yaml.safe_load(case_path.read_text())
    directory = tmp_path / "case"
    directory.mkdir()
    recipe_path = _materialise(case, directory, healthy_model)
    monkeypatch.chdir(directory)
    runs = tmp_path / "runs"

    with pytest.raises(Exception) as info:
        recipe = load_recipe(recipe_path, case.get("overrides", []))
        Runner(recipe, runs_dir=runs, recipe_path=recipe_path, in_process=True).run()

    error, message = info.value, str(info.value)
    assert type(error) is ERRORS[case["error"]], f"{type(error).__name__} instead of {case['error']}: {message}"
    for pattern in case.get("expect", []):
        regex = pattern.replace("{dir}", re.escape(str(directory))).replace("{recipe}", re.escape(str(recipe_path)))
        assert re.search(regex, message), f"{pattern!r} does not match:\n{message}"
    for text in case.get("contains", []):
        assert text in message, f"{text!r} not in:\n{message}"
    if isinstance(error, RecipeError):
        assert message.startswith(f"recipe {recipe_path} is invalid"), message  # names the file
    else:  # one line per problem, each under the recipe key it is about
        key = (r"(model\.(name_or_path|gguf_package)|"
               r"stages\.[\w-]+\.(dataset|backbone|top_layers|lora\.target_modules)): ")
        assert all(re.match(key, p) for p in error.problems)
    assert not runs.exists() or not any(runs.iterdir()), "a run directory was left behind"


# ----------------------------------------------------------------------------- fuzzing recipe overrides

FUZZ_RECIPE = {**TINY_RECIPE, "stages": [
    *TINY_RECIPE["stages"][:2],
    {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 2},
    {"name": "ppo", "type": "ppo", "inputs": ["sft", "rm"], "rollout_batch_size": 8, "mini_batch_size": 4},
    {"name": "eval", "type": "eval", "inputs": ["sft", "dpo", "ppo"]},
]}


def _schema_keys(model: type[BaseModel], prefix: str) -> list[str]:
    """Every dotted key the schema accepts below ``prefix`` (nested specs included)."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        for inner in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                keys += _schema_keys(inner, f"{key}.")
    return keys


def _real_keys() -> list[str]:
    keys = [k for k in _schema_keys(Recipe, "") if not k.startswith("stages")]
    for stage in FUZZ_RECIPE["stages"]:
        keys += _schema_keys(STAGE_TYPES[stage["type"]], f"stages.{stage['name']}.")
    return keys


_identifier = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_identifier, inner, max_size=3)), max_leaves=6)

# values a user would write, so that some fuzzed recipes load and the cross-field checks run too
_PLAUSIBLE = st.sampled_from(["1", "2", "8", "64", "0.1", "0.5", "1.0e-4", "-1", "0", "true", "false", "null", "sft",
                              "[sft]", "[sft, rm]", "sigmoid", "ipo", "cosine", "mean", "mean_minus_std", "trl",
                              "ensemble", "synthetic", "[copy, sort]", "{r: 4}", "all-linear", "adapter", "model"])


@st.composite
def _override(draw) -> str:
    key = draw(st.sampled_from(_real_keys()))
    if draw(st.booleans()):  # a junk key somewhere along the path
        parts = key.split(".")
        parts.insert(draw(st.integers(0, len(parts))), draw(_identifier))
        key = ".".join(parts)
    if draw(st.integers(0, 9)) == 0:  # malformed syntax: no '=', or an empty segment
        return draw(st.sampled_from([key, f"{key}..x=1", f".{key}=1"]))
    raw = draw(st.one_of(_value.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6)
                                    .removesuffix("\n").removesuffix("\n...")),
                         st.text(max_size=10), _PLAUSIBLE))
    return f"{key}={raw}"


def _names_a_key(message: str, override: str) -> bool:
    """The error points at the override's key: its first segment as a key path, or the override itself."""
    if override in message or repr(override) in message:
        return True
    key = override.partition("=")[0].split(".")[0].strip()
    return bool(key) and re.search(rf"(?<![\w.]){re.escape(key)}(?=[.\[:=])", message) is not None


@pytest.fixture(scope="module")
def fuzz_recipe_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(yaml.safe_dump(FUZZ_RECIPE, sort_keys=False))
    return path


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(_override(), min_size=1, max_size=3))
def test_fuzzed_overrides_load_or_name_the_key(fuzz_recipe_path: Path, overrides: list[str]) -> None:
    try:
        load_recipe(fuzz_recipe_path, overrides)
    except RecipeError as error:
        message = str(error)
        assert any(_names_a_key(message, o) for o in overrides), f"{overrides} -> {message}"
        assert all(line.startswith("  - ") for line in message.splitlines()[1:]), message  # one line per problem


# ----------------------------------------------------------------------------- fuzzing tagged YAML scalars

# every tag SafeLoader builds, the merge tag, and ones it cannot; text near what each tag reads, and any text
_TAGS = ["!!null", "!!bool", "!!int", "!!float", "!!binary", "!!timestamp", "!!omap", "!!pairs", "!!set", "!!str",
         "!!seq", "!!map", "!!merge", "!!value", "!"]
_tagged = st.one_of(st.text(max_size=12), st.lists(st.sampled_from(
    ["0", "1", "9", "x", "e", "_", "+", "-", ".", ":", "~", "yes", "true", "null", "inf", "2024-01-31", "T1:2", "[",
     "]", "{", "}", ",", " ", "a: 1", "'", "<<", "*a", "&b", "!!int", "=", "é"]), max_size=6).map("".join))


@settings(max_examples=150, deadline=None)
@given(tag=st.sampled_from(_TAGS), text=_tagged,
       place=st.sampled_from(["k: {} {}\n", "{{{} {}: 1}}", "- {} {}\n", "a: &a {{x: 1}}\nk: {} {}\n"]))
def test_fuzzed_tagged_scalars_read_or_are_a_yaml_error(tag: str, text: str, place: str) -> None:
    """A tag on text it cannot read (!!bool maybe, !!int x, !!timestamp x) was a KeyError, ValueError or
    AttributeError traceback from loading a recipe; every problem a file has must be a YAML error, which the recipe
    loader reports with its line."""
    try:
        parse_strict_yaml(place.format(tag, text))
    except yaml.YAMLError:
        pass


# ----------------------------------------------------------------------------- fuzzing dataset rows

_COLUMNS = ["prompt", "chosen", "rejected", "messages", "completion", "instruction", "completions", "responses",
            "reference"]
_texts = st.one_of(st.sampled_from(["", " ", "copy: 1 2", "\n\nHuman: hi\n\nAssistant: yo", "\n\nAssistant:"]),
                   st.text(max_size=20))
_turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "human", 3]),
                               "content": st.one_of(_texts, st.integers())})
_response = st.dictionaries(st.sampled_from(["text", "response", "score", "overall_score", "model"]),
                            st.one_of(_texts, st.floats(allow_nan=True), st.integers(), st.none()), max_size=4)
_cell = st.one_of(_texts, st.none(), st.integers(), st.floats(allow_nan=True), st.booleans(),
                  st.lists(_turn, max_size=3), st.lists(_response, max_size=3), _response)
_row = st.dictionaries(st.sampled_from(_COLUMNS), _cell, max_size=5)

_LOADERS = {
    **{f"preference/{source}": source for source in ("trl", "hh_rlhf", "ultrafeedback", "alpaca_eval")},
    **{f"sft/{source}": source for source in ("trl", "hh_rlhf", "ultrafeedback")},
}


def _load(loader: str, path: Path) -> None:
    kind, source = loader.split("/")
    if kind == "sft":
        load_sft_source(source, str(path))
    else:
        preference_pairs_for(PreferenceDataSpec(source=source, path=str(path)), DataSpec(), 0)


@settings(max_examples=100, deadline=None)
@given(loader=st.sampled_from(sorted(_LOADERS)), rows=st.lists(_row, max_size=4),
       garbage=st.sampled_from([None, b"\xff\xfe{}\n", b'{"prompt": \n']))
def test_fuzzed_rows_load_or_name_the_file(loader: str, rows: list[dict], garbage: bytes | None) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rows.jsonl"
        text = "".join(json.dumps(row) + "\n" for row in rows).encode()
        path.write_bytes(text + (garbage or b""))
        try:
            _load(loader, path)
        except DataError as error:
            assert str(path) in str(error), str(error)

