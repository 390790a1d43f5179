"""Recipe schema, extends, overrides, and — above all — the error messages users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from alignpipe.recipe import (
    STAGE_TYPES,
    DataSpec,
    DPOStage,
    EvalStage,
    GRPOStage,
    LoraSpec,
    ModelSpec,
    PPOStage,
    Recipe,
    RecipeError,
    RLOOStage,
    SFTStage,
    TinyModelSpec,
    _alternatives,
    _OptimizerStage,
    _TrainingStage,
    load_recipe,
    load_recipe_dict,
    parse_override,
    recipe_to_dict,
)
from alignpipe.strict_yaml import dump_yaml, parse_strict_yaml

REPO = Path(__file__).parents[1]
BAD_RECIPES = sorted((Path(__file__).parent / "bad_inputs" / "recipes").glob("*.yaml"))  # see test_bad_inputs.py

GOOD = """\
name: quickstart
seed: 3
model:
  tiny: {hidden_size: 64, num_heads: 4}
data:
  families: [copy, sort]
  n_sft: 100
stages:
  - name: sft
    type: sft
    max_steps: 20
  - name: dpo
    type: dpo
    inputs: [sft]
    loss_type: ipo
    lora: {r: 8}
  - name: ev
    type: eval
    inputs: [sft, dpo]
    reference: sft
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_for(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------- good recipes


def test_good_recipe_applies_defaults_and_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD)
    recipe = load_recipe(path)
    sft, dpo, ev = recipe.stages
    assert isinstance(sft, SFTStage) and isinstance(dpo, DPOStage) and isinstance(ev, EvalStage)
    assert (sft.learning_rate, sft.assistant_only_loss, sft.inputs, sft.lr_scheduler_type) == (2e-5, True, [], "cosine")
    assert (dpo.learning_rate, dpo.beta, dpo.loss_type, dpo.loss_weights) == (1e-6, 0.1, ["ipo"], None)
    assert dpo.lora == LoraSpec(r=8) and dpo.lora.target_modules == "all-linear"
    assert (ev.include_base, ev.bootstrap_resamples, ev.seed) == (True, 1000, 1234)
    assert recipe.model.tiny.num_layers == 4 and recipe.data.max_items == 6
    assert recipe.stage("dpo") is dpo

    resolved = write(tmp_path / "resolved.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    assert load_recipe(resolved) == recipe


def test_a_trl_reward_stage_without_members_1_is_told_to_set_it() -> None:
    """`implementation: trl` alone was refused with "members: leave it at its default", and the default (5) was
    what failed. It is not defaulted to 1 instead: a resolved recipe (--print, a run's recipe.yaml) would write
    members: 1, and switching it back to the ensemble would then train one member."""
    from alignpipe.recipe import RewardStage

    assert RewardStage(name="rm", implementation="trl", members=1).members == 1
    for members in ({}, {"members": 3}):
        with pytest.raises(ValueError, match=r"members: is \d \(the ensemble's default is 5\); TRL's RewardTrainer "
                                             r"trains one model: set members: 1"):
            RewardStage(name="rm", implementation="trl", **members)


def test_diversity_form_is_refused_where_it_has_no_effect() -> None:
    """diversity_form shapes the ensemble's diversity term: with TRL's RewardTrainer (one model, no term) or with
    diversity_weight 0 a non-default form did nothing, silently. At its default it passes (a resolved recipe)."""
    from alignpipe.recipe import RewardStage

    with pytest.raises(ValueError, match=r"diversity_form: is an option of implementation 'ensemble'"):
        RewardStage(name="rm", implementation="trl", members=1, diversity_form="nnm")
    with pytest.raises(ValueError, match=r"diversity_form: is not read: 'nnm' shapes the diversity term, and "
                                         r"diversity_weight is 0, so there is none; set diversity_weight > 0"):
        RewardStage(name="rm", diversity_form="nnm")
    assert RewardStage(name="rm", diversity_weight=0.01, diversity_form="nnm").diversity_form == "nnm"
    assert RewardStage(name="rm", implementation="trl", members=1, diversity_form="ratio").diversity_weight == 0


def test_long_prompts_drop_is_refused_where_trl_would_not_drop_anything() -> None:
    """On the synthetic task there is no file to drop rows from; an sft stage without assistant-only loss trains such
    conversations on their prompt alone, so "drop" would have claimed what it did not do."""
    data = {"source": "trl", "path": "rows.jsonl"}
    assert SFTStage(name="sft", long_prompts="drop", dataset=data).long_prompts == "drop"
    with pytest.raises(ValueError, match=r"long_prompts: drop applies to a dataset file"):
        DPOStage(name="dpo", inputs=["sft"], long_prompts="drop")
    with pytest.raises(ValueError, match=r"long_prompts: drop: without assistant_only_loss TRL's SFTTrainer keeps"):
        SFTStage(name="sft", long_prompts="drop", dataset=data, assistant_only_loss=False)
    assert SFTStage(name="sft", long_prompts="refuse").long_prompts == "refuse"  # what a resolved recipe writes


def test_stage_lookup_suggests_a_name() -> None:
    recipe = Recipe(name="r", stages=[SFTStage(name="sft"), DPOStage(name="dpo", inputs=["sft"])])
    with pytest.raises(RecipeError, match=r"no stage 'dpp'; did you mean 'dpo'\?"):
        recipe.stage("dpp")


def test_extends_chain_merges_stages_by_name(tmp_path: Path) -> None:
    write(
        tmp_path / "grand.yaml",
        "name: grand\ndata: {n_sft: 50, families: [copy, sort]}\n"
        "stages:\n  - {name: sft, type: sft, max_steps: 5}\n  - {name: dpo, type: dpo, inputs: [sft]}\n",
    )
    write(tmp_path / "mid.yaml", "extends: grand.yaml\nseed: 7\nstages:\n  - {name: dpo, beta: 0.3}\n")
    child = write(
        tmp_path / "sub" / "child.yaml",
        "extends: ../mid.yaml\nname: child\ndata: {families: [sum]}\n"
        "stages:\n  - {name: ev, type: eval, inputs: [dpo]}\n  - {name: sft, learning_rate: 1.0e-4}\n",
    )
    raw = load_recipe_dict(child)
    assert "extends" not in raw
    recipe = load_recipe(child)
    assert [s.name for s in recipe.stages] == ["sft", "dpo", "ev"]  # parent order kept, new names appended
    assert (recipe.name, recipe.seed, recipe.data.n_sft, recipe.data.families) == ("child", 7, 50, ["sum"])
    assert (recipe.stage("sft").max_steps, recipe.stage("sft").learning_rate) == (5, 1e-4)
    assert recipe.stage("dpo").beta == 0.3


def test_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD)
    overrides = ["stages.dpo.beta=0.2", "data.n_sft=10", "data.families=[sum, count]", "stages.ev.reference=dpo"]
    recipe = load_recipe(path, [*overrides, "model.tiny.num_layers=2", "stages.dpo.lora=null"])
    assert recipe.stage("dpo").beta == 0.2 and recipe.stage("dpo").lora is None
    assert (recipe.data.n_sft, recipe.data.families, recipe.model.tiny.num_layers) == (10, ["sum", "count"], 2)
    assert recipe.stage("ev").reference == "dpo"
    assert load_recipe_dict(path, ["description=hi"])["description"] == "hi"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("stages.dpo.beta=0.2", (["stages", "dpo", "beta"], 0.2)),
        ("data.families=[copy, sort]", (["data", "families"], ["copy", "sort"])),
        ("stages.sft.bf16=true", (["stages", "sft", "bf16"], True)),
        ("description=a=b", (["description"], "a=b")),
        ("model.gguf_file=", (["model", "gguf_file"], None)),
    ],
)
def test_parse_override(text: str, expected: tuple[list[str], object]) -> None:
    assert parse_override(text) == expected


def test_every_field_is_documented() -> None:
    for model in (Recipe, ModelSpec, TinyModelSpec, DataSpec, LoraSpec, *STAGE_TYPES.values()):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def _shipped_recipes() -> list[Path]:
    root = REPO / "recipes"
    return sorted(p for p in root.rglob("*.yaml") if "accelerate" not in p.relative_to(root).parts)


@pytest.mark.parametrize("path", _shipped_recipes() or [None], ids=lambda p: p.name if p else "none")
def test_shipped_recipes_validate(path: Path | None) -> None:
    if path is None:
        pytest.skip("no recipes/ yet")
    assert isinstance(load_recipe(path), BaseModel)


# ----------------------------------------------------------------------------- bad recipes


@pytest.mark.parametrize("case", BAD_RECIPES, ids=lambda p: p.stem)
def test_bad_recipe_fixture(case: Path, tmp_path: Path) -> None:
    """Each recipe case of the bad-input corpus lists what its error must say (``contains`` / ``expect``)."""
    spec = yaml.safe_load(case.read_text())
    assert spec.get("contains") or spec.get("expect"), f"{case.name} says nothing about its error"
    recipe = spec["recipe"]
    path = write(tmp_path / "recipe.yaml", recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    for name, content in spec.get("files", {}).items():  # other recipe files of an extends chain
        write(tmp_path / name, yaml.safe_dump(content["yaml"]))
    message = error_for(path, spec.get("overrides", ()))
    assert message.startswith(f"recipe {path} is invalid:\n  - ")
    for text in spec.get("contains", []):
        assert text in message, f"{text!r} not in:\n{message}"


def test_enough_bad_recipe_fixtures() -> None:
    assert len(BAD_RECIPES) >= 14


def test_extends_cycle(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "extends: b.yaml\nname: a\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\nstages: []\n")
    message = error_for(a)
    assert f"recipe {a} is invalid" in message
    assert f"{tmp_path / 'b.yaml'}: extends: cycle {a} -> {tmp_path / 'b.yaml'} -> {a}" in message


def test_missing_extends_file(tmp_path: Path) -> None:
    path = write(tmp_path / "child.yaml", "extends: nope.yaml\nname: c\nstages: []\n")
    message = error_for(path)
    assert f"{path}: extends: file {tmp_path / 'nope.yaml'} not found" in message


def test_a_directory_is_not_called_missing(tmp_path: Path) -> None:
    """A recipe path or an extends that names a directory was reported as 'not found', though it is there."""
    (tmp_path / "recipes").mkdir()
    assert f"{tmp_path / 'recipes'} is a directory, not a recipe file" in error_for(tmp_path / "recipes")
    path = write(tmp_path / "child.yaml", "extends: recipes\nname: c\n")
    assert f"{path}: extends: {tmp_path / 'recipes'} is a directory, not a recipe file" in error_for(path)


def test_error_in_extended_file_names_that_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "name: b\nstages:\n  - {name: sft, type: sft, warmup_ratio: 2}\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: c\n")
    message = error_for(child)
    assert f"recipe {child} is invalid" in message
    assert f"stages.sft.warmup_ratio: expected a number in [0, 1), got 2 (set in {base})" in message


def test_yaml_error_in_extended_file(tmp_path: Path) -> None:
    base = write(tmp_path / "base.yaml", "name: [b\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\n")
    message = error_for(child)
    assert f"recipe {child} is invalid" in message and f"{base} line 2" in message


def test_merge_keys_let_a_mapping_override_what_it_merges(tmp_path: Path) -> None:
    """A key beside ``<<: *anchor`` overrides the merged one (YAML merge keys); it was refused as a duplicate key
    pointing at the anchor's line. A key written twice in the mapping itself is still a duplicate."""
    path = write(tmp_path / "merge.yaml", "name: m\nstages:\n  - &s {name: sft, type: sft, learning_rate: 1.0e-3}\n"
                 "  - <<: *s\n    name: sft2\n    inputs: [sft]\n    learning_rate: 2.0e-3\n")
    recipe = load_recipe(path)
    assert [(s.name, s.learning_rate, s.inputs) for s in recipe.stages] == [("sft", 1e-3, []), ("sft2", 2e-3, ["sft"])]
    twice = write(tmp_path / "twice.yaml", "name: m\nstages:\n  - &s {name: sft, type: sft}\n"
                  "  - {<<: *s, name: a, name: b}\n")
    assert "duplicate key 'name' (first set on line 4)" in error_for(twice)


def test_merges_check_each_mapping_as_written(tmp_path: Path) -> None:
    """An anchor defined inside a merge and aliased again is the mapping it reads as (SafeLoader flattened it in
    place, and its merged keys were then taken for duplicates), and two ``<<`` in one mapping are a duplicate key, as
    any key written twice (the later one won silently)."""
    inline = write(tmp_path / "inline.yaml", "name: m\nstages:\n"
                   "  - {name: a, type: sft, lora: &base {r: 8, alpha: 16}}\n"
                   "  - {name: b, type: sft, lora: {<<: &small {<<: *base, r: 4}}}\n"
                   "  - {name: c, type: sft, lora: *small}\n")
    assert [(s.lora.r, s.lora.alpha) for s in load_recipe(inline).stages] == [(8, 16), (4, 16), (4, 16)]
    two = write(tmp_path / "two.yaml", "name: m\nstages:\n  - &a {name: sft, type: sft, learning_rate: 1.0e-3}\n"
                "  - &b {name: dpo, type: dpo, inputs: [sft], beta: 0.2}\n  - {<<: *a, <<: *b, name: x}\n")
    assert "duplicate key '<<' (first set on line 5); merge several mappings with one <<: [*a, *b]" in error_for(two)


def test_keys_that_read_as_one_key_are_duplicates(tmp_path: Path) -> None:
    """Only keys that are text were compared, so 1 and 1, 1 and 1.0, or 1 and true (one key once read) kept the last
    value without a word. Keys a merge brings in still give way to the mapping's own, and a list as a key is a
    YAML error with its line (``!!str [a]`` as a key was a TypeError traceback)."""
    for text, problem in (("{1: a, 1: b}", "duplicate key 1 (first set on line 1)"),
                          ("{true: x, true: y}", "duplicate key true (first set on line 1)"),
                          ("{1: a, 1.0: b}", "duplicate key 1.0 (first set on line 1 as 1, which reads as the same"),
                          ("{1: a, true: b}", "duplicate key true (first set on line 1 as 1, which reads as the same"),
                          ("{~: a, null: b}", "duplicate key null (first set on line 1 as ~, which reads as the same"),
                          ("{[a]: 1}", "a list cannot be a key (keys are text, numbers, true/false or null); quote it"),
                          ("{!!str [a]: 1}", "expected a scalar node, but found sequence")):
        with pytest.raises(yaml.YAMLError) as info:
            parse_strict_yaml(text)
        assert problem in str(info.value), text
    assert parse_strict_yaml("{'1': a, 1: b, 1.5: c}") == {"1": "a", 1: "b", 1.5: "c"}
    merged = parse_strict_yaml("a: &a {1: x, 2: y}\nb: {<<: *a, +1: w}\nc: {<<: [{1: x}, {+1: y}]}\n")
    assert (merged["b"], merged["c"]) == ({1: "w", 2: "y"}, {1: "x"})  # own keys win; the earlier source wins
    path = write(tmp_path / "keys.yaml", GOOD + "x-anchors:\n  ports:\n    8080: a\n    +8080: b\n")
    assert (f"{path} line 24, column 5: YAML syntax error: duplicate key +8080 (first set on line 23 as 8080, which "
            "reads as the same key)") in error_for(path)
    listed = write(tmp_path / "listed.yaml", GOOD + "x-anchors:\n  [a, b]: 1\n")
    assert f"{listed} line 22, column 3: YAML syntax error: a list cannot be a key" in error_for(listed)


def test_merged_keys_that_read_as_one_key_are_refused(tmp_path: Path) -> None:
    """A merged key and another that YAML holds apart but Python as one (1 and true, 1 and 1.0) were left to the
    mapping's build, which kept the key of one and the value of the other: {<<: {1: a}, true: b} read as {1: 'b'} and
    <<: [{1: x}, {true: y}] as {True: 'x'}. They are refused, naming both keys and where each comes from; keys that
    are one YAML key (1 and +1, ~ and null, text written twice) still follow the merge rules without a word."""
    for text, problem in (
            ("{<<: {1: a}, true: b}", "keys true (line 1) and 1 (line 1, merged by the << on line 1) read as the same "
             "key, so one value would be lost; change one of them or quote it (a quoted key is text)"),
            ("{<<: [{1: x}, {true: y}]}", "keys 1 (line 1, merged by the << on line 1) and true (line 1, merged by "
             "the << on line 1) read as the same key"),
            ("a: &a {1: x}\nb: &b {0: y, 1.0: z}\nc:\n  k: 1\n  <<: [*b, *a]\n",
             "keys 1.0 (line 2, merged by the << on line 5) and 1 (line 1, merged by the << on line 5) read as the "
             "same key"),
            ("a: &a {1: x, 2: y}\nb: &b {<<: *a, false: n}\nc: {<<: *b, 0: w}\n",
             "keys 0 (line 3) and false (line 2, merged by the << on line 3) read as the same key")):
        with pytest.raises(yaml.YAMLError) as info:
            parse_strict_yaml(text)
        assert problem in str(info.value), text
    same = parse_strict_yaml("a: &a {1: x, ~: n, r: 8}\nb: &b {+1: y, null: m, r: 2}\n"
                             "c: {<<: [*a, *b], r: 4}\nd: {<<: [*b, *a], 1: z}\n")
    assert (same["c"], same["d"]) == ({1: "x", None: "n", "r": 4}, {1: "z", None: "m", "r": 2})
    path = write(tmp_path / "clash.yaml", GOOD + "x-anchors:\n  base: &base {1: a}\n  port:\n    <<: *base\n"
                 "    true: b\n")
    assert (f"{path} line 25, column 5: YAML syntax error: keys true (line 25) and 1 (line 22, merged by the << on "
            "line 24) read as the same key") in error_for(path)


def test_merge_keys_read_alike_on_every_pyyaml(tmp_path: Path) -> None:
    """Merges are applied by the recipe loader, not by PyYAML's flatten_mapping (6.0.4 changed it, and read the
    nested anchor above with r: 8): of several merged mappings the earlier wins, and a mapping merging itself is an
    error with its line, not a recursion."""
    order = write(tmp_path / "order.yaml", "name: m\nstages:\n"
                  "  - {name: a, type: sft, lora: &x {r: 2, dropout: 0.1}}\n"
                  "  - {name: b, type: sft, lora: &y {r: 6, alpha: 12}}\n"
                  "  - {name: c, type: sft, lora: {<<: [*x, *y], alpha: 4}}\n")
    assert [(s.lora.r, s.lora.alpha, s.lora.dropout) for s in load_recipe(order).stages][2] == (2, 4, 0.1)
    itself = write(tmp_path / "itself.yaml", "name: m\nstages:\n  - &s {name: a, type: sft, <<: *s}\n")
    assert "line 3, column 29: YAML syntax error: a mapping cannot merge itself" in error_for(itself)


def test_merges_are_worked_out_once_and_odd_yaml_is_a_clear_error(tmp_path: Path) -> None:
    """Each merge source was expanded again wherever it was merged, so 22 levels of ``<<: [*a, *a]`` took 26 s (and
    each level doubled it); a quoted '<<' is an ordinary key; ``=`` and ``<<`` as values are text (they stopped
    SafeLoader); nesting too deep for Python's stack was a RecursionError traceback."""
    levels = "".join(f"    l{i}: &l{i} {{<<: [*l{i - 1}, *l{i - 1}], k{i}: {i}}}\n" for i in range(1, 24))
    doubling = GOOD + "x-anchors:\n    l0: &l0 {r: 4}\n" + levels
    raw = load_recipe_dict(write(tmp_path / "doubling.yaml", doubling))
    assert raw["x-anchors"]["l23"] == {"r": 4, **{f"k{i}": i for i in range(1, 24)}}
    quoted = write(tmp_path / "quoted.yaml", GOOD.replace("lora: {r: 8}", "lora: {<<: {r: 4}, '<<': 1}"))
    assert "stages.dpo.lora.<<: unknown key" in error_for(quoted)
    assert (parse_override("description==")[1], parse_override("description=<<")[1]) == ("=", "<<")
    # keys other than text are left to the build (1 and +1 are one key: the earlier source, a, wins; PyYAML 6.0.4
    # gives y), and !!str << is an ordinary key
    other = parse_strict_yaml("a: &a {1: x}\nb: &b {<<: *a, +1: y}\nc: {<<: [*a, *b]}\nd: {!!str <<: 5}\n")
    assert (other["b"], other["c"], other["d"]) == ({1: "y"}, {1: "x"}, {"<<": 5})
    deep = write(tmp_path / "deep.yaml", GOOD.replace("n_sft: 100", "n_sft: " + "[" * 3000 + "]" * 3000))
    assert "YAML syntax error: nested too deeply to read" in error_for(deep)


def test_a_hint_never_fails_on_the_text_it_explains(tmp_path: Path) -> None:
    """Reading the text as YAML 1.1 to explain it raised for a true/false field given '{{ x }}' or '[x', and for a
    number field given 0x_ (a pattern match YAML 1.1 cannot read either): a traceback instead of the error."""
    path = write(tmp_path / "good.yaml", GOOD)
    for text in ("'{{ x }}'", "'[x'", "'*x'", "'2024-13-45'"):
        message = error_for(path, (f"model.trust_remote_code={text}",))
        assert f"model.trust_remote_code: expected true or false, got {text}" in message
        assert "only true and false" not in message
    message = error_for(path, ("seed=0x_",))
    assert "seed: expected an integer, got '0x_': numbers are read in decimal only; write" in message


def test_a_character_yaml_refuses_is_one_line_with_line_and_column(tmp_path: Path) -> None:
    """A NUL or control character was reported over two lines, at a character offset in "<unicode string>"."""
    path = write(tmp_path / "bell.yaml", "name: x\nstages:\n  - {name: sft, type: sft}\ndescription: a\x07b\n")
    message = error_for(path)
    assert message.splitlines()[1:] == [f"  - {path} line 4, column 15: YAML syntax error: character #x0007 is not "
                                        "allowed in YAML (only printable text, tabs and line breaks); remove it"]


def test_bad_override_syntax(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("stages.dpo.beta",))
    assert f"recipe {path} is invalid" in message
    assert "bad override syntax: expected key.path=value, got 'stages.dpo.beta'" in message
    assert "empty key segment in 'stages..beta=1'" in error_for(path, ("stages..beta=1",))


def test_override_to_unknown_stage(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("stages.dop.beta=0.2",))
    assert f"recipe {path} is invalid" in message
    assert (
        "stages.dop: unknown stage 'dop'; did you mean 'dpo'? (stages: sft, dpo, ev) "
        "(from command-line override 'stages.dop.beta=0.2')" in message
    )


def test_an_override_indexing_a_list_is_told_how_overrides_address_entries(tmp_path: Path) -> None:
    """stages[0].beta=1 got "did you mean 'stages'?", though stages was what the user wrote."""
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("stages[1].beta=1",))
    assert ("stages[1]: overrides address a stage by its name, stages.<name>.<field>=value, here stages.dpo.beta=1 "
            "(stages: sft, dpo, ev) (from command-line override 'stages[1].beta=1')") in message
    assert "did you mean" not in message
    assert "stages.0: overrides address a stage by its name, stages.<name>.<field>=value, here stages.sft.max_steps=5" \
        in error_for(path, ("stages.0.max_steps=5",))
    assert "data.families[0]: overrides have no [index]; a list is set whole (data.families=[...])" in error_for(
        path, ("data.families[0]=copy",))
    assert "data.families: is a list, not a mapping, so it has no key '0'; set the whole list (data.families=[...])" \
        in error_for(path, ("data.families.0=copy",))
    # a key in brackets is written with a dot, not set as a list
    assert "data[families]: overrides write keys with dots: data.families=..." in error_for(
        path, ("data[families]=[copy]",))
    assert "stages.dpo[beta]: overrides write keys with dots: stages.dpo.beta=..." in error_for(
        path, ("stages.dpo[beta]=0.2",))


def test_override_sub_key_of_a_scalar(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("data.n_sft.x=1",))
    assert f"recipe {path} is invalid" in message
    assert "data.n_sft: is 100, not a mapping, so it has no key 'x'" in message
    assert "stages.dpo: set a stage's fields one by one" in error_for(path, ("stages.dpo={beta: 1}",))


def test_override_unknown_key_says_it_came_from_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("stages.dpo.betta=0.2", "data.n_sft=-1"))
    assert f"recipe {path} is invalid" in message
    assert (
        "stages.dpo.betta: unknown key; did you mean 'beta'? (from command-line override 'stages.dpo.betta=0.2')"
        in message
    )
    assert "data.n_sft: expected an integer > 0, got -1 (from command-line override 'data.n_sft=-1')" in message

    message = error_for(path, ("model.tiny={num_layers: 2, hidden: 8}",))
    assert "model.tiny.hidden: unknown key; did you mean 'hidden_size'? (from command-line override" in message


def test_did_you_mean_ignores_case(tmp_path: Path) -> None:
    """A key or value in capitals got no suggestion: difflib counted every capital as a changed letter."""
    path = write(tmp_path / "caps.yaml", GOOD.replace("seed: 3", "SEED: 3").replace("lora: {r: 8}", "LORA: {r: 8}")
                 .replace("type: sft", "type: SFT"))
    message = error_for(path, ("stages.dpo.loss_type=IPO",))
    assert "SEED: unknown key; did you mean 'seed'?" in message
    assert "stages.dpo.LORA: unknown key; did you mean 'lora'?" in message
    assert "stages.sft.type: unknown stage type 'SFT'; did you mean 'sft'?" in message
    assert "stages.dpo.loss_type[0]: 'IPO' is not a valid loss_type; did you mean 'ipo'?" in message


def test_a_key_an_override_makes_is_blamed_on_the_override(tmp_path: Path) -> None:
    """An unknown key made by an override one level up was said to be 'set in' the extended file."""
    base = write(tmp_path / "base.yaml", GOOD)
    child = write(tmp_path / "child.yaml", "extends: base.yaml\nname: child\n")
    message = error_for(child, ("model.tiny.hidden.size=8",))
    assert "model.tiny.hidden: unknown key; did you mean 'hidden_size'? (from command-line override " in message
    assert str(base) not in message


def test_values_are_not_coerced_to_another_type(tmp_path: Path) -> None:
    """true is not the integer 1 nor the rate 1.0, and a quoted '30' is not 30 (each was taken silently); an integer
    still gives a number."""
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("stages.sft.max_steps=true", "stages.dpo.beta=true", "data.n_sft='30'"))
    assert "stages.sft.max_steps: expected an integer, got true" in message
    assert "stages.dpo.beta: expected a number, got true" in message
    assert "data.n_sft: expected an integer, got '30'" in message
    assert load_recipe(path, ("stages.dpo.beta=1",)).stage("dpo").beta == 1.0
    # 1e-5 is a number (YAML 1.2), in a file as on the command line; PyYAML's YAML 1.1 read it as the string '1e-5'
    exponent = GOOD.replace("    max_steps: 20\n", "    max_steps: 20\n    learning_rate: 1e-5\n")
    written = write(tmp_path / "exponent.yaml", exponent)
    assert load_recipe(written).stage("sft").learning_rate == 1e-5
    assert load_recipe(path, ("stages.dpo.beta=5E-2",)).stage("dpo").beta == 0.05


def test_plain_numbers_are_decimal_and_others_stay_text(tmp_path: Path) -> None:
    """YAML 1.1 read seed: 010 as 8, 0x10 as 16 and 1:30 as 90 (base 60), silently; they are text now, so a number
    field names its key and says why, and a text field keeps what was written."""
    quirks = GOOD.replace("seed: 3", "seed: 010").replace("n_sft: 100", "n_sft: 0x10\n  pair_temperature: 1:30")
    message = error_for(write(tmp_path / "quirks.yaml", quirks), ("stages.sft.max_steps=0b11",))
    assert ("seed: expected an integer, got '010': numbers are read in decimal only (YAML 1.1 reads it as 8); write "
            "the decimal number") in message
    assert "data.n_sft: expected an integer, got '0x10': numbers are read in decimal only (YAML 1.1 reads it as 16)" \
        in message
    assert "data.pair_temperature: expected a number, got '1:30': numbers are read in decimal only (YAML 1.1 reads " \
        "it as 90)" in message
    assert "stages.sft.max_steps: expected an integer, got '0b11': numbers are read in decimal only (YAML 1.1 reads " \
        "it as 3); write the decimal number (from command-line override 'stages.sft.max_steps=0b11')" in message
    path = write(tmp_path / "good.yaml", GOOD)
    recipe = load_recipe(path, ("description=1:30", "data.n_sft=1_000", "stages.dpo.beta=.5"))
    assert (recipe.description, recipe.data.n_sft, recipe.stage("dpo").beta) == ("1:30", 1000, 0.5)
    assert load_recipe(path, ("stages.sft.learning_rate=1.5e-5",)).stage("sft").learning_rate == 1.5e-5
    assert "data.n_sft: expected an integer, got '1_'" in error_for(path, ("data.n_sft=1_",))
    # a field that takes no number is not told to write a decimal one
    for override in ("stages.dpo.precompute_ref_log_probs=0b1", "stages.dpo.inputs=010"):
        assert "numbers are read in decimal" not in error_for(path, (override,))


def test_only_true_and_false_are_booleans_and_dates_stay_text(tmp_path: Path) -> None:
    """YAML 1.1 read yes/no/on/off as booleans and 2024-01-31 as a date: a stage named no became false, and a
    true/false field took on silently. They are text now, as in YAML 1.2, and a true/false field says so."""
    norway = GOOD.replace("name: sft", "name: no").replace("inputs: [sft]", "inputs: [no]").replace(
        "inputs: [sft, dpo]\n    reference: sft", "inputs: [no, dpo]\n    reference: no")
    recipe = load_recipe(write(tmp_path / "no.yaml", norway), ("description=2024-01-31",
                                                                "stages.dpo.lora.target_modules=[on, off]"))
    assert [s.name for s in recipe.stages] == ["no", "dpo", "ev"] and recipe.stage("dpo").inputs == ["no"]
    assert (recipe.description, recipe.stage("dpo").lora.target_modules) == ("2024-01-31", ["on", "off"])
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("stages.dpo.precompute_ref_log_probs=yes", "model.trust_remote_code=Off"))
    assert ("stages.dpo.precompute_ref_log_probs: expected true or false, got 'yes': only true and false are booleans "
            "here (yes is text, as in YAML 1.2); write true or false") in message
    assert "model.trust_remote_code: expected true or false, got 'Off': only true and false" in message
    assert load_recipe(path, ("stages.dpo.precompute_ref_log_probs=True",)).stage("dpo").precompute_ref_log_probs
    for text in ("maybe", "yEs", "oN"):  # YAML 1.1 read yes, Yes and YES as true, never yEs
        message = error_for(path, (f"stages.dpo.precompute_ref_log_probs={text}",))
        assert f"got {text!r}" in message and "only true and false" not in message


def test_an_explicit_tag_reads_what_a_plain_scalar_of_its_kind_reads(tmp_path: Path) -> None:
    """seed: !!bool maybe was a KeyError traceback, !!int x and !!float x a ValueError, !!timestamp x an AttributeError
    and a 5000-digit number a ValueError; and a tag read YAML 1.1's way what a plain scalar is refused as (!!int 010
    as 8, !!bool yes as true) or dropped the text (!!null x). A tag takes what a plain scalar of its kind is read from
    (!!float takes any decimal number), anything else is a YAML error at its line and column, and, dates being text
    here, !!timestamp is refused."""
    read = parse_strict_yaml("[!!int -1_000, !!float 1e3, !!float 1, !!float -.inf, !!bool True, !!null ~, !!null '',"
                             " !!str 010, !!str 2024-01-31, !!int '7']")
    assert read == [-1000, 1000.0, 1.0, float("-inf"), True, None, None, "010", "2024-01-31", 7]
    decimal = "; write it in decimal, with no leading 0 (10, -3, 1_000), or drop the tag to keep the text"
    for text, problem in (("!!bool maybe", "!!bool needs true or false, got 'maybe'"),
                          ("!!bool yes", "!!bool needs true or false, got 'yes'; write true or false (yes, no, on and "
                           "off are text here)"),
                          ("!!int x", "!!int needs a decimal integer, got 'x'" + decimal),
                          ("!!int 010", "!!int needs a decimal integer, got '010'" + decimal),
                          ("!!int 0x1F", "!!int needs a decimal integer, got '0x1F'"),
                          ("!!int 1:30", "!!int needs a decimal integer, got '1:30'"),
                          ("!!int 1e3", "!!int needs a decimal integer, got '1e3'"),
                          ('!!int "1\\n"', "!!int needs a decimal integer, got '1\\n'"),
                          ("!!float x", "!!float needs a decimal number, got 'x'; write it in decimal (1.5, -2, 1e-3, "
                           ".inf, .nan), or drop the tag to keep the text"),
                          ("!!float 0x1F", "!!float needs a decimal number, got '0x1F'"),
                          ("!!float", "!!float needs a decimal number, got ''"),
                          ("!!null x", "!!null needs null, ~ or nothing, got 'x'; drop the tag to keep the text"),
                          ("!!timestamp x", "!!timestamp is not read here (dates are text); drop the tag to keep 'x' "
                           "as text"),
                          ("!!timestamp 2024-01-31", "!!timestamp is not read here (dates are text)"),
                          ("1" * 5000, "an integer of 5000 characters is too long to read as a number; quote it"),
                          ("!!binary é", "failed to convert base64 data"),
                          ("!!set [a]", "expected a mapping node, but found sequence"),
                          ("!!seq x", "expected a sequence node, but found scalar"),
                          ("!!map x", "expected a mapping node, but found scalar"),
                          ("!!str [a]", "expected a scalar node, but found sequence"),
                          ("!!omap x", "expected a sequence, but found scalar"),
                          ("!!pairs x", "expected a sequence, but found scalar")):
        with pytest.raises(yaml.YAMLError) as info:
            parse_strict_yaml(f"a: 1\nk: {text}\n")
        assert problem in str(info.value) and "line 2, column 4" in str(info.value), text
    for text in ("!!omap [a]", "!!omap [{a: 1, b: 2}]", "!!pairs [a]"):
        with pytest.raises(yaml.YAMLError):
            parse_strict_yaml(f"k: {text}\n")
    path = write(tmp_path / "tagged.yaml", GOOD.replace("seed: 3", "seed: !!bool maybe"))
    assert f"{path} line 2, column 7: YAML syntax error: !!bool needs true or false, got 'maybe'" in error_for(path)


def test_a_union_with_true_or_false_gets_the_true_false_hint(tmp_path: Path) -> None:
    """A field that takes true/false or another type fails once per member, and the message joining them
    (``_alternatives``) added only the number hint: yes got no word on why it is not true. A true/false-or-null field
    (bf16) is one check in pydantic and had the hint already."""
    class Flag(BaseModel):
        model_config = {"strict": True}
        flag: bool | int

    with pytest.raises(ValidationError) as info:
        Flag(flag="yes")
    assert _alternatives(info.value.errors()) == ("expected true or false or an integer, got 'yes': only true and "
                                                  "false are booleans here (yes is text, as in YAML 1.2); write true "
                                                  "or false")
    with pytest.raises(ValidationError) as info:
        Flag(flag="010")
    assert _alternatives(info.value.errors()).endswith("got '010': numbers are read in decimal only (YAML 1.1 reads "
                                                       "it as 8); write the decimal number")
    message = error_for(write(tmp_path / "good.yaml", GOOD), ("stages.sft.bf16=yes",))
    assert "stages.sft.bf16: expected true or false, got 'yes': only true and false are booleans here" in message


def test_written_recipes_read_back_the_same_with_either_yaml_reader(tmp_path: Path) -> None:
    """SafeDumper wrote text that looks like a number to this loader but not to YAML 1.1 (1.5e5) plain, so
    ``validate --print`` gave a recipe that read back with a number in a text field. Text is now quoted wherever
    either reader would read it as something else."""
    overrides = ("description='1.5e5'", "stages.dpo.lora.target_modules=['yes', '010', '2024-01-31', '.5e1']")
    recipe = load_recipe(write(tmp_path / "good.yaml", GOOD), overrides)
    assert recipe.stage("dpo").lora.target_modules == ["yes", "010", "2024-01-31", ".5e1"]
    written = dump_yaml(recipe_to_dict(recipe))
    assert parse_strict_yaml(written) == yaml.safe_load(written) == recipe_to_dict(recipe)
    assert load_recipe(write(tmp_path / "again.yaml", written)) == recipe
    assert "description: '1.5e5'" in written and "- 'yes'\n" in written and "- '.5e1'\n" in written
    for text in ("a\x85b", "é\u2028", "=", "<<", "~", "1_000", "0o17"):  # NEL: a line break to YAML unless escaped
        assert parse_strict_yaml(dump_yaml({"k": text})) == yaml.safe_load(dump_yaml({"k": text})) == {"k": text}


def test_seeds_numpy_cannot_take_a_synthetic_split_and_an_unused_tiny_block_are_refused(tmp_path: Path) -> None:
    """A seed from 2**32 up failed mid-run in the first stage's numpy seeding; a larger one failed as a bare
    'Overflow when unpacking long long'. A split of the synthetic SFT source was ignored."""
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("seed=4294967296", "stages.sft.dataset.split=test"))
    assert "seed: expected an integer in [0, 2147483647], got 4294967296" in message
    assert "stages.sft.dataset.split: source 'synthetic' has no splits" in message
    assert "seed: expected an integer in [0, 2147483647]" in error_for(path, ("seed=99999999999999999999999",))
    # a tiny block with another model shapes nothing, yet changed every stage's hash
    assert "model.tiny: shapes the built-in tiny model only, and this recipe loads './local-model'" in error_for(
        path, ("model.name_or_path=./local-model",))


def test_an_empty_name_or_path_is_refused_at_its_key(tmp_path: Path) -> None:
    """'' was taken: a reward backbone '' was read as the current directory ("has no config.json"), and a
    gguf_package '' was blamed on model.tiny ("this recipe loads 'tiny'")."""
    path = write(tmp_path / "reward.yaml", yaml.safe_dump({"name": "r", "model": {"gguf_package": ""}, "stages": [
        {"name": "rm", "type": "reward", "backbone": "", "dataset": {"source": "trl", "path": "p.jsonl", "split": ""}}]}))
    message = error_for(path)
    assert "model.gguf_package: expected a non-empty string or null, got ''" in message
    assert "stages.rm.backbone: expected a non-empty string or null, got ''" in message
    assert "stages.rm.dataset.split: expected a non-empty string, got ''" in message
    assert "model.tiny" not in message


def test_lora_target_modules_must_name_modules(tmp_path: Path) -> None:
    """[] and [''] passed validate (the preflight matched '' to the model itself) and stopped the stage in PEFT."""
    path = write(tmp_path / "good.yaml", GOOD)
    for value in ("[]", "['']", "[q_proj, ' ']"):
        message = error_for(path, (f"stages.dpo.lora.target_modules={value}",))
        assert "stages.dpo.lora.target_modules: expected module names to put adapters on, got " in message, message
        assert "or use all-linear" in message
    assert load_recipe(path, ("stages.dpo.lora.target_modules=[q_proj]",)).stage("dpo").lora.target_modules == [
        "q_proj"]


def test_an_input_listed_twice_is_refused(tmp_path: Path) -> None:
    """An eval stage took [sft, sft, dpo] and evaluated sft twice, as two leaderboard rows of one name."""
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("stages.ev.inputs=[sft, dpo, sft]",))
    assert "stages.ev.inputs[2]: 'sft' is listed twice; name each input once" in message


def test_dpo_loss_weights_must_train_something(tmp_path: Path) -> None:
    """[0, 0] (no loss: the stage trained nothing) and a negative weight (which maximises its loss) were taken."""
    path = write(tmp_path / "good.yaml", GOOD)
    both = "stages.dpo.loss_type=[sigmoid, sft]"
    message = error_for(path, (both, "stages.dpo.loss_weights=[0, 0]"))
    assert "stages.dpo.loss_weights: every weight is 0, so the stage has no loss and trains nothing" in message
    message = error_for(path, (both, "stages.dpo.loss_weights=[1, -0.5]"))
    assert ("stages.dpo.loss_weights[1]: expected a weight >= 0, got -0.5: a negative weight maximises the sft loss "
            "instead of minimising it; use 0 to switch a loss off (from command-line override") in message
    assert load_recipe(path, (both, "stages.dpo.loss_weights=[0, 1]")).stage("dpo").loss_weights == [0.0, 1.0]


@pytest.mark.parametrize("losses", ["[sigmoid, robust]", "[robust, sigmoid]", "[sigmoid, hinge]", "[ipo, sigmoid, sft]",
                                    "[aot]"])
def test_label_smoothing_is_taken_with_any_loss_that_reads_it(tmp_path: Path, losses: str) -> None:
    """The sigmoid entry reads it (cDPO) wherever it sits in loss_type, so [sigmoid, hinge] was refused though the
    trainer applies it; TRL's robust, exo_pair and aot losses read it too."""
    path = write(tmp_path / "good.yaml", GOOD)
    stage = load_recipe(path, (f"stages.dpo.loss_type={losses}", "stages.dpo.label_smoothing=0.1")).stage("dpo")
    assert stage.label_smoothing == 0.1


def test_label_smoothing_no_loss_reads_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("stages.dpo.loss_type=[hinge, sft]", "stages.dpo.label_smoothing=0.1"))
    assert ("stages.dpo.label_smoothing: no entry of loss_type ['hinge', 'sft'] reads it, so it would change nothing: "
            "it makes the sigmoid loss conservative DPO (cDPO) and is TRL's ε for robust, exo_pair, aot and "
            "aot_unpaired; add one of those or remove label_smoothing") in message


@pytest.mark.parametrize("losses", ["exo_pair", "[sigmoid, exo_pair]"])
def test_exo_pair_needs_label_smoothing_at_validation(tmp_path: Path, losses: str) -> None:
    """TRL refuses exo_pair with label_smoothing 0 only when the trainer is built, after the model has loaded."""
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, (f"stages.dpo.loss_type={losses}",))
    assert "stages.dpo.label_smoothing: loss_type exo_pair needs label_smoothing > 0" in message
    assert "set label_smoothing, e.g. 0.001" in message
    stage = load_recipe(path, (f"stages.dpo.loss_type={losses}", "stages.dpo.label_smoothing=0.001")).stage("dpo")
    assert stage.label_smoothing == 0.001


def test_a_null_setting_the_source_does_not_read_gets_the_same_message_as_a_value(tmp_path: Path) -> None:
    """score_clip: null on the synthetic source was refused as a value is, but said the synthetic task 'reads
    ready-made pairs': it generates them, labelled from its gold reward."""
    path = write(tmp_path / "good.yaml", GOOD)
    messages = [error_for(path, (f"stages.dpo.dataset.score_clip={value}",)).splitlines()[1].partition(" (from")[0]
                for value in ("null", "0.01")]
    assert messages[0] == messages[1] == (
        "  - stages.dpo.dataset.score_clip: is not read: source 'synthetic' generates its pairs already labelled from "
        "the task's gold reward (data.pair_temperature sets how sharply), so there are no scored responses to pair or "
        "weigh (this applies to alpaca_eval and ultrafeedback); remove it")


def test_override_value_must_be_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "good.yaml", GOOD)
    message = error_for(path, ("data.families=[copy",))
    assert f"recipe {path} is invalid" in message and "bad override value in 'data.families=[copy'" in message


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path / "many.yaml",
        "name: m\nfoo: 1\ndata: {n_pairs: 0}\nstages:\n  - {name: sft, type: sft, bf16: maybe}\n",
    )
    problems = [line for line in error_for(path).splitlines() if line.startswith("  - ")]
    assert len(problems) == 3


# ----------------------------------------------------------------------------- options a stage would ignore

PPO = {"name": "ppo", "type": "ppo", "inputs": ["sft"], "reward": {"source": "gold"}}


def _recipe_with(tmp_path: Path, *stages: dict) -> Path:
    return write(tmp_path / "recipe.yaml", yaml.safe_dump({"name": "r", "stages": [{"name": "sft", "type": "sft"},
                                                                                   *stages]}))


def test_ppo_has_no_trainer_schedule_fields() -> None:
    """PPO's own loop reads none of the Trainer stages' schedule/batch/length/precision fields, so its resolved
    config (config.yaml) must not show them, and each one it lacks has a message saying what PPO uses instead."""
    trainer_only = set(_TrainingStage.model_fields) - set(_OptimizerStage.model_fields)
    assert trainer_only and not trainer_only & set(PPOStage.model_fields)
    assert set(PPOStage.replaced_keys) == trainer_only
    assert {"learning_rate", "weight_decay", "max_grad_norm", "lora", "save_steps"} <= set(PPOStage.model_fields)


@pytest.mark.parametrize(("key", "value", "instead"), [
    ("lr_scheduler_type", "linear", "constant learning_rate"), ("warmup_ratio", 0.1, "constant learning_rate"),
    ("max_steps", 5, "set total_steps"), ("num_train_epochs", 2, "set total_steps"),
    ("per_device_train_batch_size", 4, "rollout_batch_size"), ("gradient_accumulation_steps", 2, "mini_batch_size"),
    ("global_batch_size", 16, "mini_batch_size"), ("logging_steps", 1, "eval_every"),
    ("max_length", 64, "max_new_tokens"), ("bf16", True, "model.dtype"), ("gradient_checkpointing", True, "remove it"),
])
def test_ppo_rejects_trainer_fields_and_says_what_it_uses(tmp_path: Path, key: str, value, instead: str) -> None:
    message = error_for(_recipe_with(tmp_path, {**PPO, key: value}))
    assert f"stages.ppo.{key}: not read by a ppo stage" in message and instead in message


def test_a_penalty_coefficient_without_an_ensemble_is_reported_at_its_key(tmp_path: Path) -> None:
    """penalty_coef on a gold reward was reported at reward.penalty, which the recipe did not set."""
    path = _recipe_with(tmp_path, {**PPO, "reward": {"source": "gold", "penalty_coef": 0.5}})
    message = error_for(path)
    assert "stages.ppo.reward.penalty_coef: penalties combine ensemble members; source 'gold' has none" in message
    assert "reward.penalty:" not in message
    path = _recipe_with(tmp_path, {**PPO, "reward": {"source": "gold", "penalty": "min"}})
    assert "stages.ppo.reward.penalty: penalties combine ensemble members" in error_for(path)


def test_adaptive_kl_needs_a_nonzero_start(tmp_path: Path) -> None:
    """The adaptive controller multiplies kl_coef, so kl_target with kl_coef 0 would keep the penalty at 0."""
    message = error_for(_recipe_with(tmp_path, {**PPO, "kl_target": 6.0, "kl_coef": 0}))
    assert "stages.ppo.kl_coef: is the adaptive controller's starting value" in message and "kl_coef > 0" in message
    assert load_recipe(_recipe_with(tmp_path, {**PPO, "kl_coef": 0})).stage("ppo").kl_coef == 0  # fixed: no KL


def test_group_rl_stages_have_no_max_length() -> None:
    """TRL's GRPO/RLOO configs take no prompt length, so the resolved config must not show an unused max_length."""
    for kind in (GRPOStage, RLOOStage):
        assert "max_length" not in kind.model_fields and "max_completion_length" in kind.model_fields


# ----------------------------------------------------------------------------- stages that only know the built-in task

REAL_SFT = {"name": "sft", "type": "sft", "dataset": {"source": "hh_rlhf", "path": "hh"}}
REAL_RM = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 2,
           "dataset": {"source": "trl", "path": "pairs.jsonl"}}


def _stages(tmp_path: Path, *stages: dict) -> Path:
    return write(tmp_path / "recipe.yaml", yaml.safe_dump({"name": "r", "stages": list(stages)}))


@pytest.mark.parametrize(("kind", "does"), [
    ("ppo", "draw their prompts from the built-in synthetic task"), ("grpo", "draw their prompts from the built-in"),
    ("rloo", "draw their prompts from the built-in"), ("bon", "sample the held-out prompts of the built-in"),
])
def test_rewarded_stages_after_real_data_are_errors(tmp_path: Path, kind: str, does: str) -> None:
    """ppo, grpo, rloo and bon sample the built-in task's prompts and score them with its gold reward whatever
    trained their inputs, so a policy or reward model trained on a real dataset anywhere upstream is an error."""
    synthetic_sft = {"name": "sft", "type": "sft"}
    stage = {"name": "s", "type": kind, "inputs": ["sft"], "reward": {"source": "gold"}}
    assert load_recipe(_stages(tmp_path, synthetic_sft, stage)).stage("s").type == kind

    message = error_for(_stages(tmp_path, REAL_SFT, stage))
    assert f"stages.s.inputs: {kind} stages {does}" in message
    assert "but 'sft' trained on dataset.source 'hh_rlhf'" in message and "train the stages before it" in message
    judged = {**stage, "inputs": ["sft", "rm"], "reward": {"source": "model"}}  # a real reward model, policy synthetic
    assert "but 'rm' trained on dataset.source 'trl'" in error_for(_stages(tmp_path, synthetic_sft, REAL_RM, judged))
    dpo = {"name": "dpo", "type": "dpo", "inputs": ["sft"]}  # synthetic itself, but started from the real sft
    assert "but 'sft' trained on" in error_for(_stages(tmp_path, REAL_SFT, dpo, {**stage, "inputs": ["dpo"]}))


def test_a_stage_without_a_dataset_block_after_real_data_must_say_it_switches_task(tmp_path: Path) -> None:
    """A forgotten dataset: block after a real-data stage would train on the built-in task silently; written out as
    source: synthetic it is a switch on purpose, and what that stage makes belongs to the built-in task (a reward
    model on synthetic pairs over a backbone SFT'd on real dialogues may score a ppo stage on the task)."""
    for kind in ("dpo", "reward", "sft"):
        stage = {"name": "s", "type": kind, "inputs": ["sft"], **({"members": 2} if kind == "reward" else {})}
        message = error_for(_stages(tmp_path, REAL_SFT, stage))
        assert (f"stages.s: {kind} stage 's' has no dataset: block, so it trains on the built-in synthetic task, but "
                "'sft' trained on dataset.source 'hh_rlhf'; give it the dataset: block of your data, or write "
                "dataset: {source: synthetic}") in message
        explicit = {**stage, "dataset": {"source": "synthetic"}}
        assert load_recipe(_stages(tmp_path, REAL_SFT, explicit)).stage("s").dataset.source == "synthetic"

    synthetic_rm = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 2,
                    "dataset": {"source": "synthetic"}}
    policy = {"name": "pol", "type": "sft", "inputs": [], "dataset": {"source": "synthetic"}}
    ppo = {"name": "ppo", "type": "ppo", "inputs": ["pol", "rm"], "reward": {"source": "model"}}
    assert load_recipe(_stages(tmp_path, REAL_SFT, synthetic_rm, policy, ppo)).stage("ppo").inputs == ["pol", "rm"]
    implicit_rm = {k: v for k, v in synthetic_rm.items() if k != "dataset"}
    assert "stages.rm: reward stage 'rm' has no dataset: block" in error_for(
        _stages(tmp_path, REAL_SFT, implicit_rm, policy, ppo))
    real_policy = {**ppo, "inputs": ["sft", "rm"]}
    assert "but 'sft' trained on" in error_for(_stages(tmp_path, REAL_SFT, synthetic_rm, real_policy))


def test_eval_stages_reject_policies_trained_on_real_data_but_not_reward_rows(tmp_path: Path) -> None:
    """An eval stage scores policies on the built-in task's held-out prompts; a reward input is a row of its own
    held-out pairs, so a reward stage trained on a real dataset is fine there and a policy is not."""
    sft = {"name": "sft", "type": "sft"}
    real_dpo = {"name": "dpo", "type": "dpo", "inputs": ["sft"], "dataset": {"source": "trl", "path": "pairs.jsonl"}}
    ev = {"name": "ev", "type": "eval", "inputs": ["sft", "rm"]}
    assert load_recipe(_stages(tmp_path, sft, REAL_RM, ev)).stage("ev").inputs == ["sft", "rm"]
    message = error_for(_stages(tmp_path, sft, REAL_RM, real_dpo, {**ev, "inputs": ["sft", "rm", "dpo"]}))
    assert ("stages.ev.inputs[2]: eval stages sample the held-out prompts of the built-in synthetic task (the recipe's "
            "data: block) and score them with its gold reward, but 'dpo' trained on dataset.source 'trl', so this "
            "stage would score 'dpo' on another task; drop it here") in message
    assert "alignpipe eval <checkpoint> --suite" in message and "stages.ev.inputs[1]" not in message


MAINTAINER_DOCS = ("ALGORITHMS.md", "EVALUATION.md", "DESIGN.md", "STYLE-ANCHORS.md")


def test_what_a_user_reads_cites_no_document_their_clone_lacks() -> None:
    """The design documents live beside the repository, not in it: the README, recipes, suites, metric cards,
    benchmarks and launcher a user reads name papers or the README instead."""
    readable = [REPO / "README.md", REPO / "launch.sh", *(REPO / "recipes").rglob("*.yaml"),
                *(REPO / "eval").rglob("*.*"), *(REPO / "benchmarks").rglob("*.py"),
                *(REPO / "pipelines").rglob("*.py")]
    texts = {path: path.read_text(encoding="utf-8") for path in readable
             if path.suffix in {".md", ".sh", ".yaml", ".py"}}
    citing = [f"{path.relative_to(REPO)}: {name}" for path, text in texts.items() for name in MAINTAINER_DOCS
              if name in text]
    assert len(readable) > 20 and citing == []
