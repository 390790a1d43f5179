"""`alignpipe data`: what each stage will train on, built by the stages' own functions and shown before training.

The counts, skips, strengths and truncation numbers are checked against the builders and length reports the stages
call themselves (called here directly), on the tiny recipe and on small local files.
"""

from __future__ import annotations

import errno
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import SHARED, TINY_RECIPE, write_recipe
from test_adapters import write_jsonl

from alignpipe.cli import main
from alignpipe.data import preview_export
from alignpipe.data.errors import LoadReport
from alignpipe.data.hh_rlhf import load_hh_rlhf_pairs
from alignpipe.data.length_report import (
    dpo_pair_spans,
    pair_truncation_counts,
    sft_reply_spans,
    sft_training_template,
    truncation_counts,
)
from alignpipe.data.pairing import PairingReport, plain_text
from alignpipe.data.preference import is_reward_heldout, preference_pairs_for
from alignpipe.data.preview import LOAD_SKIPS, PAIRING_SKIPS
from alignpipe.data.preview_render import render_text
from alignpipe.recipe import load_recipe
from alignpipe.trainers.sft import sft_dataset_for

SMALL = {"n_sft": 64, "n_pairs": 48}
REWARD = {"name": "reward", "type": "reward", "inputs": ["sft"], "max_length": 48, "members": 2}


def _recipe(tmp_path: Path, *, stages: list[dict] = ()) -> Path:
    """TINY_RECIPE (sft, dpo, eval) with fewer rows; ``stages`` updates its stages by name, or adds one after sft.
    With a real dataset the eval stage goes (it scores on the synthetic task, so the recipe would be refused)."""
    by_name = {s["name"]: s for s in TINY_RECIPE["stages"]}
    for stage in stages:
        by_name[stage["name"]] = {**by_name.get(stage["name"], {}), **stage}
    if any("dataset" in stage for stage in stages):
        del by_name["eval"]
    order = [s["name"] for s in TINY_RECIPE["stages"]]
    names = order[:1] + [n for n in by_name if n not in order] + [n for n in order[1:] if n in by_name]
    return write_recipe(tmp_path, {**TINY_RECIPE, "data": SMALL, "stages": [by_name[n] for n in names]})


def _json(capsys, *argv: str) -> dict:
    assert main(["data", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _words(text: str) -> str:
    """The text output with its alignment (runs of spaces, line breaks) reduced to single spaces."""
    return " ".join(text.split())


def _error(capsys, *argv: str) -> str:
    """The stderr of a `data` command that must fail like `validate` does: exit code 2, one line, no traceback."""
    assert main(["data", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]  # not datasets' progress bars
    assert len(errors) == 1 and captured.err.endswith(errors[0] + "\n"), captured.err
    return errors[0]


def test_synthetic_counts_and_examples_are_the_stage_builders(tmp_path, capsys):
    path = _recipe(tmp_path, stages=[REWARD])
    recipe = load_recipe(path)
    document = _json(capsys, str(path), "--show", "3")
    stages = {s["name"]: s for s in document["stages"]}
    assert list(stages) == ["sft", "reward", "dpo"]
    assert [(s["name"], s["type"]) for s in document["without_data"]] == [("eval", "eval")]
    sft = sft_dataset_for(recipe.stage("sft").dataset, recipe.data, recipe.seed)
    pairs = preference_pairs_for(recipe.stage("dpo").dataset, recipe.data, recipe.seed)
    assert (stages["sft"]["size"], stages["sft"]["unit"]) == (len(sft), "conversations") == (SMALL["n_sft"],
                                                                                             "conversations")
    assert stages["sft"]["examples"] == sft.select(range(3)).to_list()
    for name in ("reward", "dpo"):
        assert (stages[name]["size"], stages[name]["labels"], stages[name]["skipped"]) == (len(pairs), "hard", [])
        assert stages[name]["examples"] == pairs.select(range(3)).to_list()
    fraction = recipe.stage("reward").heldout_fraction
    assert stages["reward"]["heldout"] == sum(is_reward_heldout(plain_text(p), fraction) for p in pairs["prompt"])
    assert stages["dpo"]["heldout"] is None and document["tokenizer"] and document["no_tokenizer"] is None
    assert all(s["lengths"]["measured"] == s["size"] for s in stages.values())

    assert main(["data", str(path), "--stage", "dpo", "--show", "1"]) == 0
    out = _words(capsys.readouterr().out)
    assert "dpo (dpo): the synthetic task" in out and "sft (sft)" not in out and "stages without" not in out
    assert f"pairs {len(pairs)} (hard labels)" in out
    assert "example 1" in out and "example 2" not in out and "max_length 48" in out


def test_trl_file_skips_limit_and_soft_strengths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dataset paths are relative to where alignpipe runs
    good = [{"prompt": f"copy: {i}", "chosen": f"{i}", "rejected": f"{i} {i}", "preference": p}
            for i, p in enumerate([0.6, 0.9, None, 0.75])]
    bad = [{"prompt": "copy: 5", "chosen": "5", "rejected": "5", "preference": 0.7},  # chosen == rejected
           {"prompt": "copy: 6", "chosen": "6 6", "rejected": "6 6", "preference": 0.7},
           {"prompt": "copy: 7", "chosen": "", "rejected": "7", "preference": 0.7},  # an empty response
           {"prompt": "copy: 8", "chosen": "8", "rejected": "  ", "preference": 0.7}]
    write_jsonl(tmp_path / "pairs.jsonl", [good[0], bad[0], good[1], bad[2], good[2], bad[1], bad[3], good[3]])
    dataset = {"source": "trl", "path": "pairs.jsonl", "limit": 3}
    path = _recipe(tmp_path, stages=[{"name": "dpo", "dataset": dataset}])
    dpo = _json(capsys, str(path), "--stage", "dpo")["stages"][0]
    assert (dpo["read"], dpo["before_limit"], dpo["limit"], dpo["size"]) == (8, 4, 3, 3)
    assert {(s["key"], s["count"]) for s in dpo["skipped"]} == {("rows_skipped_empty", 2),
                                                                 ("rows_skipped_identical", 2)}
    recipe = load_recipe(path)
    rows = preference_pairs_for(recipe.stage("dpo").dataset, recipe.data, recipe.seed)
    strengths = rows["preference"]  # the seeded limit's pick, nulls read as 1
    assert dpo["labels"] == "soft" and dpo["strengths"] == {
        "mean": pytest.approx(sum(strengths) / 3), "min": min(strengths), "max": max(strengths)}

    assert main(["data", str(path), "--stage", "dpo", "--show", "0"]) == 0
    out = _words(capsys.readouterr().out)
    assert "trl pairs.jsonl (split train)" in out and "read 8 rows" in out
    assert f"skipped 2 rows: {LOAD_SKIPS['rows_skipped_identical'][1]}" in out
    assert f"skipped 2 rows: {LOAD_SKIPS['rows_skipped_empty'][1]}" in out
    assert "limit 3: a seeded shuffle picked 3 of 4" in out and "soft labels: strength mean" in out

    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "copy: 1 2", "chosen": "1 2", "rejected": "2 1"},
                                           {"prompt": "copy: 2", "chosen": 7, "rejected": "2"}])
    err = _error(capsys, str(path), "--stage", "dpo")  # a field that is not text stops the stage: an error here too
    assert err.startswith("error: stages.dpo.dataset: pairs.jsonl: row 1, column 'chosen': expected a string")


def test_hh_rlhf_file_reports_the_adapters_skips(tmp_path, capsys):
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: good {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: bad"}
            for i in range(12)]
    rows += [{"chosen": "\n\nHuman: b\n\nAssistant: ", "rejected": "\n\nHuman: b\n\nAssistant: bad"},
             {"chosen": "\n\nHuman: c\n\nAssistant: same", "rejected": "\n\nHuman: c\n\nAssistant: same"},
             {"chosen": "\n\nHuman: d\n\nAssistant: x", "rejected": "\n\nHuman: e\n\nAssistant: y"},
             {"chosen": "no dialogue", "rejected": "\n\nHuman: f\n\nAssistant: y"}]
    data = str(write_jsonl(tmp_path / "hh.jsonl", rows))
    path = _recipe(tmp_path, stages=[{"name": "sft", "dataset": {"source": "hh_rlhf", "path": data}},
                                     {"name": "dpo", "dataset": {"source": "hh_rlhf", "path": data}}])
    report = LoadReport()
    expected = load_hh_rlhf_pairs(data, split="train", report=report)
    stages = _json(capsys, str(path), "--show", "1")["stages"]
    assert 0 < len(expected) < 12 and report.rows_other_split > 0  # both parts of the 80/20 prompt-hash split
    for stage in stages:
        assert (stage["read"], stage["size"]) == (len(rows), len(expected))
        assert {s["key"]: s["count"] for s in stage["skipped"]} == {
            key: getattr(report, key) for key in LOAD_SKIPS if getattr(report, key)}
    assert stages[1]["examples"][0]["chosen"] == [{"role": "assistant", "content": expected[0].chosen}]


@pytest.mark.skipif(not (SHARED / "data" / "alpaca-eval-prefs").is_dir(),
                    reason="needs ../shared/data/alpaca-eval-prefs (AlpacaEval's prefs-8models.jsonl.gz)")
def test_alpaca_eval_shared_file_pairs_and_strengths(tmp_path, capsys):
    data = str(SHARED / "data" / "alpaca-eval-prefs" / "prefs-8models.jsonl.gz")
    path = _recipe(tmp_path, stages=[{"name": "dpo", "dataset": {"source": "alpaca_eval", "path": data,
                                                                   "limit": 64}}])
    recipe = load_recipe(path)
    load, pairing = LoadReport(), PairingReport()
    rows = preference_pairs_for(recipe.stage("dpo").dataset, recipe.data, recipe.seed, report=load, pairing=pairing)
    dpo = _json(capsys, str(path), "--stage", "dpo", "--show", "0")["stages"][0]
    assert (dpo["read"], dpo["before_limit"], dpo["size"]) == (load.rows_in, pairing.pairs_out, len(rows)) == (805,
                                                                                                           3067, 64)
    assert {s["key"]: s["count"] for s in dpo["skipped"]} == {  # the loader merged 53 repeated texts
        key: getattr(report, key) for report, skips in ((load, LOAD_SKIPS), (pairing, PAIRING_SKIPS)) for key in skips
        if getattr(report, key)} == {"responses_merged_repeated": 53, "pairs_dropped_ties": 116}
    assert dpo["labels"] == "soft" and dpo["strengths"]["min"] == min(rows["preference"])


def test_truncation_counts_are_length_reports_at_max_length(tmp_path, capsys):
    """With max_length cutting into the tiny task's replies, the counts are the length report's, measured with the
    tokenizer the stages load from the tiny base the runner creates."""
    from alignpipe.models.factory import create_tiny_base
    from alignpipe.models.loading import load_tokenizer

    path = _recipe(tmp_path, stages=[{"name": "sft", "max_length": 11}, {"name": "dpo", "max_length": 10}])
    recipe = load_recipe(path)
    tokenizer = load_tokenizer(str(create_tiny_base(recipe, tmp_path / "base")))
    stages = {s["name"]: s for s in _json(capsys, str(path), "--show", "0")["stages"]}

    sft = sft_dataset_for(recipe.stage("sft").dataset, recipe.data, recipe.seed)
    template = sft_training_template(tokenizer, assistant_only_loss=True)
    expected = truncation_counts(sft_reply_spans(sft, tokenizer, chat_template=template, seed=0).spans, 11)
    assert stages["sft"]["lengths"]["truncation"] == asdict(expected)
    assert expected.end_lost > 0 and expected.reply_lost > 0

    pairs = preference_pairs_for(recipe.stage("dpo").dataset, recipe.data, recipe.seed)
    expected_pairs = pair_truncation_counts(dpo_pair_spans(pairs, tokenizer, seed=0).spans, 10)
    assert stages["dpo"]["lengths"]["truncation"] == asdict(expected_pairs)
    assert expected_pairs.dropped > 0


def test_export_writes_the_rows_whole_or_not_at_all(tmp_path, capsys, monkeypatch):
    path = _recipe(tmp_path)
    recipe = load_recipe(path)
    out = tmp_path / "rows"
    assert main(["data", str(path), "--show", "0", "--export", str(out)]) == 0
    assert f"wrote {out / 'sft.jsonl'}" in capsys.readouterr().out
    sft = sft_dataset_for(recipe.stage("sft").dataset, recipe.data, recipe.seed).to_list()
    pairs = preference_pairs_for(recipe.stage("dpo").dataset, recipe.data, recipe.seed).to_list()
    written = {name: (out / f"{name}.jsonl").read_text() for name in ("sft", "dpo")}
    assert [json.loads(line) for line in written["sft"].splitlines()] == sft
    assert [json.loads(line) for line in written["dpo"].splitlines()] == pairs
    assert sorted(p.name for p in out.iterdir()) == ["dpo.jsonl", "sft.jsonl"]

    err = _error(capsys, str(path), "--export", str(out))
    assert "already exist" in err and "--force" in err and "nothing was written" in err
    assert {name: (out / f"{name}.jsonl").read_text() for name in written} == written

    real = preview_export.json_line
    calls = []

    def disk_full_in_dpo(row: dict) -> str:  # the second stage's second row: its file is half-written by then
        calls.append(row)
        if "chosen" in row and sum("chosen" in r for r in calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(row)

    monkeypatch.setattr(preview_export, "json_line", disk_full_in_dpo)
    for directory, force in ((tmp_path / "fresh", []), (out, ["--force"])):
        calls.clear()
        err = _error(capsys, str(path), "--show", "0", "--export", str(directory), *force)
        assert "No space left on device" in err and "nothing was written" in err
        assert len(calls) == len(sft) + 2  # every sft row was written before the failure
    assert not (tmp_path / "fresh").exists() or not any((tmp_path / "fresh").iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["dpo.jsonl", "sft.jsonl"]  # no temp file left behind
    assert {name: (out / f"{name}.jsonl").read_text() for name in written} == written  # the old files kept whole


def test_bad_stage_names_files_and_overrides_are_one_line_errors(tmp_path, capsys, monkeypatch):
    path = _recipe(tmp_path)
    err = _error(capsys, str(path), "--stage", "bogus")
    assert "--stage 'bogus'" in err and "the stages that read data are: sft, dpo" in err
    err = _error(capsys, str(path), "--stage", "eval")
    # an eval stage trains on nothing: it was said to draw its prompts "while it trains", as "a eval stage"
    assert "--stage 'eval': eval stages read no dataset (this one evaluates on held-out prompts of the synthetic " \
           "task); the stages that read data are: sft, dpo" in err

    monkeypatch.chdir(tmp_path)
    missing = _recipe(tmp_path, stages=[{"name": "dpo", "dataset": {"source": "trl", "path": "nope/pairs.jsonl"}}])
    err = _error(capsys, str(missing), "--stage", "dpo")
    assert err.startswith("error: stages.dpo.dataset: dataset.path: no such file nope/pairs.jsonl")

    assert main(["data", str(path), "stages.dpo.betta=0.2"]) == main(["validate", str(path), "stages.dpo.betta=0.2"])
    err = capsys.readouterr().err
    assert err.count("did you mean 'beta'") == 2 and "Traceback" not in err


def test_help_describes_the_output_and_export(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--export DIR" in out and "--json" in out and "alignpipe data recipes/quickstart.yaml" in out


def test_a_recipe_preview_without_data_stages_says_so():
    from alignpipe.data.preview import NoDataStage, RecipePreview

    preview = RecipePreview(recipe="r", model="tiny", tokenizer=None, no_tokenizer=None, stages=[],
                            without_data=[NoDataStage("ppo", "ppo", "trains on prompts of the synthetic task")])
    assert render_text(preview).splitlines()[1:3] == ["no stage reads a dataset", ""]


def test_a_reward_export_marks_the_pairs_the_stage_holds_out(tmp_path, capsys):
    """The reward stage trains on the pairs its prompt-hash split does not hold out: the export flags the others."""
    path = _recipe(tmp_path, stages=[REWARD])
    recipe = load_recipe(path)
    out = tmp_path / "rows"
    assert main(["data", str(path), "--stage", "reward", "--show", "0", "--export", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "reward.jsonl").read_text().splitlines()]
    pairs = preference_pairs_for(recipe.stage("reward").dataset, recipe.data, recipe.seed).to_list()
    assert [{k: v for k, v in row.items() if k != "heldout"} for row in rows] == pairs
    fraction = recipe.stage("reward").heldout_fraction
    assert [row["heldout"] for row in rows] == [is_reward_heldout(plain_text(p["prompt"]), fraction) for p in pairs]
    assert 0 < sum(row["heldout"] for row in rows) < len(rows)
    assert f"held out {sum(row['heldout'] for row in rows)} by prompt hash" in _words(capsys.readouterr().out)


def test_a_reward_split_the_stage_would_refuse_is_an_error(tmp_path, capsys):
    path = _recipe(tmp_path, stages=[REWARD])
    err = _error(capsys, str(path), "--stage", "reward", "data.n_pairs=2")
    assert "2 pairs split into 2 train / 0 held-out" in err and "data.n_pairs" in err and "heldout_fraction" in err


def test_an_export_target_that_is_a_directory_is_refused_before_anything_is_written(tmp_path, capsys):
    path = _recipe(tmp_path)
    out = tmp_path / "rows"
    (out / "sft.jsonl").mkdir(parents=True)
    err = _error(capsys, str(path), "--show", "0", "--export", str(out), "--force")
    assert "sft.jsonl is a directory" in err and "nothing was written" in err
    assert [p.name for p in out.iterdir()] == ["sft.jsonl"]


STRICT_TEMPLATE = (  # as Llama-2 and Mistral templates do: roles must alternate, so a system turn is refused
    "{%- for m in messages -%}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- endfor -%}{%- for m in messages -%}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")


def test_a_row_the_chat_template_refuses_is_a_one_line_error(tmp_path, capsys, llama_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(llama_path, model)
    (model / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    data = tmp_path / "sft.jsonl"
    write_jsonl(data, [{"messages": [{"role": "user", "content": "copy: 1"}, {"role": "assistant", "content": "1"}]},
                       {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "copy: 2"},
                                     {"role": "assistant", "content": "2"}]}])
    path = write_recipe(tmp_path, {"name": "strict", "model": {"name_or_path": str(model)}, "stages": [
        {"name": "sft", "type": "sft", "dataset": {"source": "trl", "path": str(data)}}]})
    err = _error(capsys, str(path))
    assert f"stages.sft.dataset: {data}: row 1 (numbered as loaded)" in err
    assert "(roles system, user, assistant): Conversation roles must alternate" in err
