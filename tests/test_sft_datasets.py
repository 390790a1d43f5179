"""The sft stage's `dataset` block: real SFT data (TRL formats, HH-RLHF chosen, UltraFeedback chosen) as `messages`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, write_recipe
from datasets import Dataset

from alignpipe.data.hh_rlhf import HH_ASSISTANT, hh_is_heldout
from alignpipe.recipe import DataSpec, RecipeError, SFTDataSpec, load_recipe, recipe_to_dict
from alignpipe.trainers.sft import sft_dataset_for


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _messages(spec: SFTDataSpec, seed: int = 0) -> list:
    dataset = sft_dataset_for(spec, DataSpec(), seed)
    assert dataset.column_names == ["messages"]
    return dataset["messages"]


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


CONVERSATIONS = [
    [_turn("user", "copy: 1 2"), _turn("assistant", "1 2")],
    [_turn("system", "be brief"), _turn("user", "sort: 3 1"), _turn("assistant", "1 3")],
    [_turn("user", "sum: 1 2"), _turn("assistant", "3"), _turn("user", "count: 4 4"), _turn("assistant", "2")],
]


# ----------------------------------------------------------------------------- each source parses

def test_default_is_the_synthetic_task():
    from alignpipe.data.synthetic import sft_dataset

    data = DataSpec(n_sft=5)
    assert sft_dataset_for(SFTDataSpec(), data, 3).to_list() == sft_dataset(data, 3).to_list()


def test_trl_messages_file(tmp_path):
    rows = [{"messages": [{**t, "name": None} for t in c], "id": i} for i, c in enumerate(CONVERSATIONS)]
    path = _jsonl(tmp_path / "sft.jsonl", rows)
    assert _messages(SFTDataSpec(source="trl", path=str(path))) == CONVERSATIONS  # extra keys and columns dropped


def test_trl_messages_saved_to_disk(tmp_path):
    Dataset.from_list([{"messages": c} for c in CONVERSATIONS]).save_to_disk(tmp_path / "saved")
    assert _messages(SFTDataSpec(source="trl", path=str(tmp_path / "saved"))) == CONVERSATIONS


def test_trl_prompt_completion_become_messages(tmp_path):
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS]
    path = _jsonl(tmp_path / "conv.jsonl", rows)
    assert _messages(SFTDataSpec(source="trl", path=str(path))) == CONVERSATIONS
    # plain strings: one user turn and one assistant turn
    path = _jsonl(tmp_path / "plain.jsonl", [{"prompt": "copy: 1", "completion": "1"}] * 3)
    assert _messages(SFTDataSpec(source="trl", path=str(path))) == [[_turn("user", "copy: 1"),
                                                                     _turn("assistant", "1")]] * 3


def _hh_rows(n: int) -> list[dict]:
    """HH dialogues whose prompts fall in the adapter's train part (80/20 split by prompt hash)."""
    rows = []
    for i in range(100):
        prompt = f"\n\nHuman: hello {i}{HH_ASSISTANT} hi\n\nHuman: copy: {i}{HH_ASSISTANT}"
        if not hh_is_heldout(prompt, 0.2):
            rows.append({"chosen": f"{prompt} {i}", "rejected": f"{prompt} no"})
        if len(rows) == n:
            return rows
    raise AssertionError("not enough train-part prompts")


def test_hh_rlhf_chosen_dialogues(tmp_path):
    rows = _hh_rows(3)
    path = _jsonl(tmp_path / "hh.jsonl", rows)
    got = _messages(SFTDataSpec(source="hh_rlhf", path=str(path)))
    # the raw dialogue up to the last "\n\nAssistant:" is one user turn, as the preference stages see it
    assert got == [[_turn("user", r["chosen"].rsplit(" ", 1)[0]), _turn("assistant", r["chosen"].rsplit(" ", 1)[1])]
                   for r in rows]
    assert got[0][0]["content"].endswith(HH_ASSISTANT) and got[0][0]["content"].startswith("\n\nHuman: hello")


def test_ultrafeedback_binarized_takes_chosen(tmp_path):
    rows = [{"prompt": c[-2]["content"], "prompt_id": str(i), "chosen": c,
             "rejected": [*c[:-1], _turn("assistant", "wrong")], "messages": c, "score_chosen": 8.0,
             "score_rejected": 3.0} for i, c in enumerate(CONVERSATIONS)]
    path = _jsonl(tmp_path / "train_sft.jsonl", rows)
    assert _messages(SFTDataSpec(source="ultrafeedback", path=str(path))) == CONVERSATIONS


def test_ultrafeedback_raw_takes_the_best_rated_completion(tmp_path):
    rows = [
        {"instruction": "copy: 1", "completions": [{"response": "2", "overall_score": 3.0},
                                                   {"response": "1", "overall_score": 9.0}]},
        {"instruction": "copy: 2", "completions": [{"response": "2", "overall_score": 7.0},
                                                   {"response": "", "overall_score": 10.0}]},   # empty: dropped
        {"instruction": "copy: 3", "completions": [{"response": "3", "overall_score": 5.0},
                                                   {"response": "33", "overall_score": 5.0}]},  # tie: the first
    ]
    path = _jsonl(tmp_path / "uf.jsonl", rows)
    assert _messages(SFTDataSpec(source="ultrafeedback", path=str(path))) == [
        [_turn("user", f"copy: {i}"), _turn("assistant", str(i))] for i in (1, 2, 3)]


def test_limit_is_a_seeded_pick(tmp_path):
    path = _jsonl(tmp_path / "sft.jsonl", [{"messages": [_turn("user", f"copy: {i}"), _turn("assistant", str(i))]}
                                           for i in range(20)])
    spec = SFTDataSpec(source="trl", path=str(path), limit=5)
    first = _messages(spec)
    assert len(first) == 5 and first == _messages(spec)
    assert first != _messages(spec, seed=1)


# ----------------------------------------------------------------------------- errors name the file and the fix

def test_missing_column_names_file_columns_and_format(tmp_path):
    path = _jsonl(tmp_path / "lm.jsonl", [{"text": "copy: 1 -> 1"}] * 3)
    with pytest.raises(ValueError, match=r"lm\.jsonl has neither a 'messages' column nor 'prompt'/'completion' "
                                         r"columns \(columns: \['text'\]\) \(plain-text"):
        sft_dataset_for(SFTDataSpec(source="trl", path=str(path)), DataSpec(), 0)
    path = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "x", "chosen": "y", "rejected": "z"}] * 3)
    with pytest.raises(ValueError, match=r"prefs\.jsonl .*use dataset\.source hh_rlhf or ultrafeedback"):
        sft_dataset_for(SFTDataSpec(source="trl", path=str(path)), DataSpec(), 0)
    with pytest.raises(ValueError, match=r"prefs\.jsonl has no 'chosen'/'messages' column and no "
                                         r"'instruction'/'completions' columns"):
        path = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": "x", "response": "y"}] * 3)
        sft_dataset_for(SFTDataSpec(source="ultrafeedback", path=str(path)), DataSpec(), 0)
    with pytest.raises(ValueError, match=r"hh\.jsonl has no column 'rejected'"):
        sft_dataset_for(SFTDataSpec(source="hh_rlhf", path=str(_jsonl(tmp_path / "hh.jsonl", [{"chosen": "x"}]))),
                        DataSpec(), 0)


@pytest.mark.parametrize("source", ["trl", "ultrafeedback", "hh_rlhf"])
@pytest.mark.parametrize("text", ["", "\n\n", "[]"], ids=["no-bytes", "blank-lines", "empty-list"])
def test_empty_file_names_the_file(tmp_path, source, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty \(no rows\); expected a file with"):
        sft_dataset_for(SFTDataSpec(source=source, path=str(path)), DataSpec(), 0)


@pytest.mark.parametrize("source", ["trl", "ultrafeedback"])
def test_empty_split_names_the_split_and_the_fix(monkeypatch, source):
    """A hub dataset or directory whose split has no rows (datasets cannot save or read an empty local file)."""
    from alignpipe.data import sft_sources

    monkeypatch.setattr(sft_sources, "load_rows", lambda *a, **k: Dataset.from_dict({"messages": []}))
    with pytest.raises(ValueError, match=r"org/sft has no rows in split 'test'.*check dataset\.path and "
                                         r"dataset\.split"):
        sft_dataset_for(SFTDataSpec(source=source, path="org/sft", split="test"), DataSpec(), 0)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        sft_dataset_for(SFTDataSpec(source="trl", path=str(tmp_path / "nope.jsonl")), DataSpec(), 0)


def test_row_without_an_assistant_turn_names_row_and_column(tmp_path):
    rows = [{"messages": CONVERSATIONS[0]}, {"messages": [_turn("user", "copy: 1")]}]
    path = _jsonl(tmp_path / "sft.jsonl", rows)
    with pytest.raises(ValueError, match=r"sft\.jsonl row 1, column 'messages': no assistant turn \(roles: \['user'\]\)"
                                         r"; SFT trains on the assistant's replies"):
        sft_dataset_for(SFTDataSpec(source="trl", path=str(path)), DataSpec(), 0)
    rows = [{"prompt": [_turn("user", "copy: 1")], "completion": [_turn("user", "1")]}]
    path = _jsonl(tmp_path / "pc.jsonl", rows)
    with pytest.raises(ValueError, match=r"pc\.jsonl row 0, column 'completion': no assistant turn.*the completion "
                                         r"column holds the assistant's reply"):
        sft_dataset_for(SFTDataSpec(source="trl", path=str(path)), DataSpec(), 0)


def test_sharegpt_turns_and_unknown_roles_say_how_to_fix(tmp_path):
    path = _jsonl(tmp_path / "sg.jsonl", [{"messages": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(ValueError, match=r"sg\.jsonl row 0, column 'messages': a turn without role/content.*rename "
                                         r"from -> role, value -> content"):
        sft_dataset_for(SFTDataSpec(source="trl", path=str(path)), DataSpec(), 0)
    path = _jsonl(tmp_path / "gpt.jsonl", [{"messages": [_turn("human", "hi"), _turn("gpt", "yo")]}])
    with pytest.raises(ValueError, match=r"gpt\.jsonl row 0, column 'messages': unknown role 'human'.*human -> user"):
        sft_dataset_for(SFTDataSpec(source="trl", path=str(path)), DataSpec(), 0)


def test_blank_replies_are_skipped_and_all_blank_raises(tmp_path, caplog):
    rows = [{"messages": CONVERSATIONS[0]}, {"messages": [_turn("user", "copy: 1"), _turn("assistant", " ")]}]
    with caplog.at_level("INFO"):
        got = _messages(SFTDataSpec(source="trl", path=str(_jsonl(tmp_path / "a.jsonl", rows))))
    assert got == [CONVERSATIONS[0]] and "2 rows -> 1 items; skipped 1 empty" in caplog.text
    with pytest.raises(ValueError, match=r"no usable conversation in .*b\.jsonl"):
        sft_dataset_for(SFTDataSpec(source="trl", path=str(_jsonl(tmp_path / "b.jsonl", rows[1:]))), DataSpec(), 0)


def test_hh_file_with_only_heldout_prompts_says_so(tmp_path):
    prompt = next(p for p in (f"\n\nHuman: q{i}{HH_ASSISTANT}" for i in range(200)) if hh_is_heldout(p, 0.2))
    path = _jsonl(tmp_path / "hh.jsonl", [{"chosen": prompt + " a", "rejected": prompt + " b"}])
    with pytest.raises(ValueError, match=r"no usable dialogue in .*hh\.jsonl split 'train' .*1 in the other split"):
        sft_dataset_for(SFTDataSpec(source="hh_rlhf", path=str(path)), DataSpec(), 0)


# ----------------------------------------------------------------------------- the recipe block

def _recipe_with(tmp_path, dataset: dict | None) -> Path:
    sft = {**TINY_RECIPE["stages"][0], **({"dataset": dataset} if dataset is not None else {})}
    return write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft]})


def test_recipe_with_a_trl_dataset_validates(tmp_path):
    recipe = load_recipe(_recipe_with(tmp_path, {"source": "trl", "path": "data/sft.jsonl", "limit": 100}))
    assert recipe.stage("sft").dataset == SFTDataSpec(source="trl", path="data/sft.jsonl", limit=100)
    default = recipe_to_dict(load_recipe(_recipe_with(tmp_path, None)))["stages"][0]["dataset"]
    assert default == {"source": "synthetic", "path": None, "split": "train", "limit": None}


@pytest.mark.parametrize(("dataset", "message"), [
    ({"source": "trl"}, "stages.sft.dataset.path: source 'trl' needs a path"),
    ({"path": "x.jsonl"}, "stages.sft.dataset.path: source 'synthetic' takes no path"),
    ({"limit": 10}, "stages.sft.dataset.limit: source 'synthetic' generates data.n_sft demonstrations"),
    ({"source": "sharegpt", "path": "x"}, "stages.sft.dataset.source: 'sharegpt' is not a valid source"),
    ({"source": "trl", "path": "x", "limt": 3}, "stages.sft.dataset.limt: unknown key; did you mean 'limit'?"),
    ({"source": "trl", "path": "x", "limit": 0}, "stages.sft.dataset.limit: expected a number > 0, got 0"),
])
def test_bad_dataset_blocks_are_reported_before_any_model_loads(tmp_path, dataset, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(_recipe_with(tmp_path, dataset))
    assert message in str(error.value)


# ----------------------------------------------------------------------------- one real run

def test_sft_stage_trains_on_a_local_messages_file(tmp_path, caplog):
    """The tiny model's tokenizer only knows the synthetic task, so the file holds 8 synthetic demonstrations."""
    from alignpipe.data.synthetic import sft_dataset
    from alignpipe.pipeline.rundir import StageDir
    from alignpipe.pipeline.runner import Runner

    rows = sft_dataset(DataSpec(n_sft=8, demo_noise=0.0), seed=7).to_list()
    path = _jsonl(tmp_path / "demos.jsonl", rows)
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 10, "per_device_train_batch_size": 8, "logging_steps": 1,
           "save_steps": 10, "dataset": {"source": "trl", "path": str(path)}}
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft]}))
    runner = Runner(recipe, runs_dir=tmp_path / "runs", in_process=True)
    with caplog.at_level("INFO", logger="alignpipe"):
        outcomes = {o.name: o.action for o in runner.run()}
    assert outcomes == {"sft": "ran"}
    assert f"sft data {path} (trl, split train): 8 conversations" in caplog.text
    stage = StageDir(runner.run_dir / "sft")
    losses = [m["loss"] for m in map(json.loads, stage.metrics.read_text().splitlines()) if "loss" in m]
    assert len(losses) == 10
    assert losses[-1] < 0.8 * losses[0], losses  # measured: 4.55 -> 3.22 (the same 8 rows every step)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert stage.read_manifest()["summary"]["global_step"] == 10
