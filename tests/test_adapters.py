"""Tests for the real-data loaders (alignpipe.data.rows, scored_sources, hh_rlhf, sft_sources) on the real files in
../shared/data and on small local files."""

import contextlib
import json
import math
from pathlib import Path

import pytest

from alignpipe.data.errors import DataError, LoadReport
from alignpipe.data.hh_rlhf import load_hh_rlhf_pairs, split_hh_dialogue
from alignpipe.data.pairing import ScoredSet, build_pairs, to_trl_rows
from alignpipe.data.scored_sources import load_alpaca_eval_prefs, load_scored_sets_synthetic, load_ultrafeedback

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = SHARED_DATA / "alpaca-eval-prefs" / "prefs-8models.jsonl.gz"
HH = SHARED_DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def need_shared_data(path: Path) -> None:
    if not SHARED_DATA.is_dir() or not path.is_file():
        pytest.skip(f"../shared/data not available: {path}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ AlpacaEval


def test_alpaca_eval_prefs_real_file():
    need_shared_data(ALPACA)
    report = LoadReport()
    sets = load_alpaca_eval_prefs(ALPACA, report=report)
    assert len(sets) == 805 and report.rows_in == 805 and report.items_out == 805
    assert all(len(s.responses) == len(set(s.responses)) == len(s.scores) for s in sets)
    assert sum(len(s.responses) for s in sets) == 805 * 8 - report.responses_merged_repeated  # a repeated text once
    assert all(0.0 <= x <= 1.0 for s in sets for x in s.scores)
    pairs, pair_report = build_pairs(sets, method="anchor", strength="probability")
    assert pairs and pair_report.sets_in == 805
    assert all(0.5 < p.strength <= 0.99 for p in pairs)
    # with the reference appended at 0.5, every set has a spread of scores and gives pairs; a response that is the
    # reference's own text merges with it
    with_ref = load_alpaca_eval_prefs(str(ALPACA), include_reference=True)
    appended = [s for s, plain in zip(with_ref, sets) if len(s.responses) == len(plain.responses) + 1]
    assert len(appended) > 790 and all(s.scores[-1] == 0.5 for s in appended)


def test_alpaca_eval_texts_repeated_within_an_instruction_are_merged(tmp_path):
    """Two models that wrote the same answer give one response, scored with the mean of the judge's two scores, and
    the load report counts it: pairing then neither repeats a pair nor puts one text on both sides of another."""
    row = {"instruction": "Name a dog breed.", "reference": {"model": "ref", "text": "Beagle."}, "responses": [
        {"model": "m1", "text": "Chihuahua.", "score": 0.3}, {"model": "m2", "text": "Poodle.", "score": 0.2},
        {"model": "m3", "text": "Chihuahua.", "score": 0.1}, {"model": "m4", "text": "Pug.", "score": 0.05}]}
    report = LoadReport()
    (scored,) = load_alpaca_eval_prefs(write_jsonl(tmp_path / "prefs.jsonl", [row]), report=report)
    assert scored.responses == ("Chihuahua.", "Poodle.", "Pug.") and scored.scores == pytest.approx((0.2, 0.2, 0.05))
    assert report.responses_merged_repeated == 1 and "merged 1 repeated responses" in report.summary()
    pairs, _ = build_pairs([scored], method="all_pairs", strength="hard")
    assert sorted((p.chosen, p.rejected) for p in pairs) == [("Chihuahua.", "Pug."), ("Poodle.", "Pug.")]


def test_alpaca_eval_real_file_has_no_repeated_pair():
    """On the real file 53 responses repeat a text of their instruction (30 instructions); all_pairs made 226 exact
    repeats of 20,827 pairs, 2 of them with another strength."""
    import collections

    need_shared_data(ALPACA)
    report = LoadReport()
    sets = load_alpaca_eval_prefs(ALPACA, report=report)
    assert report.responses_merged_repeated == 53 and sum(len(s.responses) < 8 for s in sets) == 30
    assert all(len(set(s.responses)) == len(s.responses) for s in sets)
    pairs, _ = build_pairs(sets, method="all_pairs", strength="probability", score_clip=1e-6)
    counts = collections.Counter((p.prompt, p.chosen, p.rejected) for p in pairs)
    assert len(pairs) == 20_601 and max(counts.values()) == 1
    assert not any((q, b, a) in counts for q, a, b in counts)


# ------------------------------------------------------------------------------------------------ HH-RLHF


def test_split_hh_dialogue_hand_case():
    text = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:  Fine, thanks. "
    prompt, reply = split_hh_dialogue(text)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
    assert reply == "Fine, thanks."
    with pytest.raises(ValueError, match="no '\\\\n\\\\nAssistant:' turn"):
        split_hh_dialogue("\n\nHuman: only a question")


def test_hh_rlhf_real_file_split():
    need_shared_data(HH)
    train_report, heldout_report = LoadReport(), LoadReport()
    train = load_hh_rlhf_pairs(HH, split="train", report=train_report)
    heldout = load_hh_rlhf_pairs(str(HH), split="heldout", report=heldout_report)
    assert train_report.rows_in == heldout_report.rows_in == 2312
    skipped = train_report.rows_skipped_empty + train_report.rows_skipped_malformed + train_report.rows_skipped_identical
    assert skipped < 50  # an empty reply, chosen/rejected prompts that differ, a reply that writes a Human turn
    assert len(train) + len(heldout) + skipped == 2312  # a partition of the usable rows
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert abs(len(heldout) / (len(train) + len(heldout)) - 0.2) < 0.03
    assert load_hh_rlhf_pairs(HH, split="heldout") == heldout  # deterministic
    for p in train[:50] + heldout[:50]:
        assert p.prompt.startswith("\n\nHuman: ") and p.prompt.endswith("\n\nAssistant:")
        assert p.chosen and p.rejected and p.chosen != p.rejected and p.strength == 1.0
    assert to_trl_rows(heldout[:1])[0]["prompt"][0]["content"] == heldout[0].prompt


def _root(prompt: str) -> str:
    """An HH conversation's root, its opening human turn (spelt out here: the test does not trust the adapter's)."""
    return prompt.split("\n\nAssistant:")[0]


def _roots_on_both_sides(train: list[str], heldout: list[str]) -> set[str]:
    """Conversation roots found on both sides of a split."""
    return {_root(p) for p in train} & {_root(p) for p in heldout}


def _reward_split(path, fraction: float) -> tuple[list[str], list[str]]:
    """The (train, held-out) prompts of a reward stage on an HH file's train part, split as the stage splits them."""
    from alignpipe.data.preference import preference_pairs_for, reward_heldout_rows
    from alignpipe.recipe import DataSpec, PreferenceDataSpec, RewardStage

    stage = RewardStage(name="rm", heldout_fraction=fraction,
                        dataset=PreferenceDataSpec(source="hh_rlhf", path=str(path)))
    rows = preference_pairs_for(stage.dataset, DataSpec(), 0)
    prompts = [row["prompt"][0]["content"] for row in rows]
    heldout = reward_heldout_rows(stage, rows)
    return [p for p, h in zip(prompts, heldout) if not h], [p for p, h in zip(prompts, heldout) if h]


def _hh_conversations(n: int, depths: int = 3) -> list[dict]:
    """n HH conversations, each stored at ``depths`` depths as HH stores them: the row at depth k + 1 goes on with
    the depth-k row's rejected reply."""
    rows = []
    for i in range(n):
        context = f"\n\nHuman: how do I do thing {i}?\n\nAssistant:"
        for k in range(depths):
            rows.append({"chosen": f"{context} fine {i}.{k}", "rejected": f"{context} never {i}.{k}"})
            context = f"{context} never {i}.{k}\n\nHuman: why not {k}?\n\nAssistant:"
    return rows


def test_hh_splits_keep_every_depth_of_a_conversation_on_one_side(tmp_path):
    """HH stores one conversation cut at several depths as separate rows; a hash of the whole prompt put them on
    independent sides, so a held-out row's dialogue went on in a training row (with its rejected reply). The
    adapter's 80/20 split hashes the conversation's root instead."""
    path = write_jsonl(tmp_path / "hh.jsonl", _hh_conversations(60))
    train = [p.prompt for p in load_hh_rlhf_pairs(path, split="train")]
    heldout = [p.prompt for p in load_hh_rlhf_pairs(path, split="heldout")]
    assert len(train) + len(heldout) == 180 and train and heldout
    assert not _roots_on_both_sides(train, heldout)
    assert len({_root(p) for p in heldout}) * 3 == len(heldout)  # whole conversations
    from alignpipe.data.hh_rlhf import hh_conversation_root

    assert hh_conversation_root("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == "\n\nHuman: a"


def test_a_reward_stage_on_hh_holds_out_whole_conversations(tmp_path):
    """The reward stage's own held-out split of the HH train part (salted, for reward_eval.json) is keyed on the
    conversation root too: it hashed whole prompts, so its metrics scored rows whose dialogue it trained on."""
    path = write_jsonl(tmp_path / "hh.jsonl", _hh_conversations(100))
    train = [p.prompt for p in load_hh_rlhf_pairs(path, split="train")]
    reward_train, reward_heldout = _reward_split(path, 0.3)
    assert sorted(reward_train + reward_heldout) == sorted(train) and reward_train and reward_heldout
    assert not _roots_on_both_sides(reward_train, reward_heldout)


def test_hh_real_file_splits_keep_conversations_on_one_side():
    """On the real file: 32 of the 464 held-out pairs shared a conversation with a training row under the
    whole-prompt hash, and 21 of the MiniLM reward recipe's 226 held-out pairs (heldout_fraction 0.125)."""
    need_shared_data(HH)
    train = [p.prompt for p in load_hh_rlhf_pairs(HH, split="train")]
    heldout = [p.prompt for p in load_hh_rlhf_pairs(HH, split="heldout")]
    assert not _roots_on_both_sides(train, heldout)
    assert not any(t.startswith(h) or h.startswith(t) for t in train for h in heldout)
    reward_train, reward_heldout = _reward_split(HH, 0.125)
    assert not _roots_on_both_sides(reward_train, reward_heldout)


def test_hh_rlhf_local_file_skips_bad_rows(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: a\n\nAssistant: good", "rejected": "\n\nHuman: a\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: b\n\nAssistant: ", "rejected": "\n\nHuman: b\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: c\n\nAssistant: same", "rejected": "\n\nHuman: c\n\nAssistant: same"},
        {"chosen": "\n\nHuman: d\n\nAssistant: x", "rejected": "\n\nHuman: e\n\nAssistant: y"},
        {"chosen": "no dialogue", "rejected": "\n\nHuman: f\n\nAssistant: y"},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    report = LoadReport()
    train = load_hh_rlhf_pairs(path, split="train", heldout_fraction=0.0, report=report)
    assert [(p.prompt, p.chosen, p.rejected) for p in train] == [("\n\nHuman: a\n\nAssistant:", "good", "bad")]
    assert (report.rows_skipped_empty, report.rows_skipped_identical, report.rows_skipped_malformed) == (1, 1, 2)
    assert load_hh_rlhf_pairs(path, split="heldout", heldout_fraction=0.0) == []


def test_hh_rows_that_go_on_after_the_reply_or_have_no_prompt_text_are_skipped(tmp_path):
    """A "\n\nHuman:" turn after the compared reply would put the user's next turn into the reply a policy learns to
    write (malformed); a prompt of turn markers alone has nothing to answer (empty). Both counted."""
    rows = [
        {"chosen": "\n\nHuman: a\n\nAssistant: good", "rejected": "\n\nHuman: a\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: b\n\nAssistant: no.\n\nHuman: please?", "rejected": "\n\nHuman: b\n\nAssistant: ok"},
        {"chosen": "\n\nHuman: c\n\nAssistant: no", "rejected": "\n\nHuman: c\n\nAssistant: ok\n\nHuman: thanks"},
        {"chosen": "\n\nHuman: \n\nAssistant: hello", "rejected": "\n\nHuman: \n\nAssistant: what?"},
    ]
    report = LoadReport()
    pairs = load_hh_rlhf_pairs(write_jsonl(tmp_path / "hh.jsonl", rows), split="train", heldout_fraction=0.0,
                               report=report)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("\n\nHuman: a\n\nAssistant:", "good", "bad")]
    assert (report.rows_skipped_malformed, report.rows_skipped_empty) == (2, 1)


def test_hh_replies_that_write_a_human_turn_without_the_blank_line_are_skipped(tmp_path):
    """HH replies also write the user's turn as "Human:" at their start, a line's start or after a sentence; the
    "\n\nHuman:" check let them through (into SFT too, from the chosen side). A "Human:" quoted mid-sentence stays."""
    from alignpipe.data.sft_sources import load_hh_rlhf_chosen

    def row(q: str, chosen: str, rejected: str = "no") -> dict:
        prompt = f"\n\nHuman: {q}\n\nAssistant:"
        return {"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"}

    skipped = [row("a", "Human: How do I steal a car?"), row("b", "Sure.\nHuman: thanks"),
               row("c", "fine", "Sure. \n  Human: and then?"), row("d", "Bad idea.  Human:  Why not?"),
               row("e", 'You asked "what?"  Human: That said, no.')]
    kept = [row("f", "This is a real quote from Human: What is it?."), row("g", "[Click to copy: Human: SAY IT]"),
            row("h", "Humans: people; human: a person")]
    path = write_jsonl(tmp_path / "hh.jsonl", skipped + kept)
    report = LoadReport()
    pairs = load_hh_rlhf_pairs(path, split="train", heldout_fraction=0.0, report=report)
    assert [p.prompt.split()[1] for p in pairs] == ["f", "g", "h"] and report.rows_skipped_malformed == 5
    sft = load_hh_rlhf_chosen(path, heldout_fraction=0.0)
    assert [turns[1]["content"] for turns in sft] == [p.chosen for p in pairs]


def test_hh_real_file_rows_whose_reply_writes_a_human_turn():
    """On the real file 29 rows' replies write a Human turn without the blank line (27 at a line's start, 2 after a
    sentence); 2 more quote "Human:" mid-sentence and are kept."""
    need_shared_data(HH)
    report = LoadReport()
    pairs = load_hh_rlhf_pairs(HH, split="train", heldout_fraction=0.0, report=report)
    assert report.rows_skipped_malformed == 5 + 29 and len(pairs) == 2312 - 4 - 34
    assert sum("Human:" in p.chosen or "Human:" in p.rejected for p in pairs) == 2


def _hh_tranches(root: Path) -> Path:
    """A local copy of a Hub dataset laid out as Anthropic/hh-rlhf is: one folder per tranche."""
    for tranche in ("harmless-base", "helpful-base"):
        (root / tranche).mkdir(parents=True)
        write_jsonl(root / tranche / "train.jsonl", [
            {"chosen": f"\n\nHuman: {tranche} {i}\n\nAssistant: yes", "rejected": f"\n\nHuman: {tranche} {i}"
                                                                               "\n\nAssistant: no"}
            for i in range(3)])
    return root


def test_data_dir_picks_a_tranche_of_a_local_dataset_folder_and_is_refused_for_a_file(tmp_path):
    """A local copy of a Hub dataset reads as the Hub id does: data_dir picks one tranche (every tranche was read
    before). A file is one tranche already, so data_dir with a file is an error rather than ignored."""
    from alignpipe.data.errors import DataError

    root = _hh_tranches(tmp_path / "hh-rlhf")
    pairs = load_hh_rlhf_pairs(root, split="train", heldout_fraction=0.0, data_dir="harmless-base")
    assert sorted(p.prompt.split()[1] for p in pairs) == ["harmless-base"] * 3
    assert len(load_hh_rlhf_pairs(root, split="train", heldout_fraction=0.0)) == 6
    with pytest.raises(DataError, match="data_dir 'harmless-base' picks a folder .* is a file"):
        load_hh_rlhf_pairs(root / "helpful-base" / "train.jsonl", split="train", data_dir="harmless-base")


def test_a_split_slice_reads_a_slice_of_a_local_file(tmp_path):
    """"train[:50%]" reads half of a local file, as it would of a Hub split (it was a confusing error about the
    file's split name)."""
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
            for i in range(10)]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    half = load_hh_rlhf_pairs(path, split="train", heldout_fraction=0.0, source_split="train[:50%]")
    assert [p.prompt for p in half] == [f"\n\nHuman: q{i}\n\nAssistant:" for i in range(5)]
    assert len(load_hh_rlhf_pairs(path, split="train", heldout_fraction=0.0, source_split="validation")) == 10


@pytest.mark.parametrize("compress, suffix", [("gzip", ".gz"), ("bz2", ".bz2"), ("lzma", ".xz")])
def test_a_compressed_file_whose_name_does_not_say_so_is_named_as_such(tmp_path, compress, suffix):
    """Its bytes are not UTF-8, but re-encoding (the advice for a latin-1 file) is not the fix: the name is."""
    import importlib

    from alignpipe.data.errors import DataError

    path = tmp_path / "hh.jsonl"
    path.write_bytes(importlib.import_module(compress).compress(b'{"chosen": "a", "rejected": "b"}\n'))
    with pytest.raises(DataError, match=rf"is {suffix[1:]}-compressed but its name does not end in {suffix}; rename "
                                        rf"it to hh.jsonl{suffix}"):
        load_hh_rlhf_pairs(path, split="train")


@pytest.mark.parametrize("encoding, named", [("utf-16", "utf-16"), ("utf-16-be", "utf-16"), ("utf-32", "utf-32"),
                                             ("utf-32-be", "utf-32")])
def test_a_utf16_or_utf32_file_is_named_as_such(tmp_path, encoding, named):
    """Its byte-order mark says what it is: re-encoding from latin1 (the advice for other non-UTF-8 bytes) would
    garble it."""
    from alignpipe.data.errors import DataError

    path = tmp_path / "hh.jsonl"
    bom = "\ufeff" if encoding.endswith("-be") else ""  # the plain codecs write the mark themselves
    path.write_bytes(f'{bom}{{"chosen": "a", "rejected": "b"}}\n'.encode(encoding))
    with pytest.raises(DataError, match=rf"it is {named.upper()} text .* re-save it as UTF-8 \(e.g. iconv -f {named} "
                                        r"-t utf-8 hh.jsonl > new-hh.jsonl\)"):
        load_hh_rlhf_pairs(path, split="train")


def test_a_csv_file_reads_every_cell_as_the_text_it_holds(tmp_path):
    """A CSV cell has no type: answers that are all digits stay text, "NA" stays "NA", an empty reply is skipped and
    counted as it is in JSON lines, and a `preference` cell is read as the number it spells (empty = 1). Type
    guessing made the first column a number (refused as non-text) and the empty cell a null (refusing the file)."""
    from alignpipe.data.errors import LoadReport
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected,preference\n"What is 2+2, in digits?",4,5,0.8\nSay hi,hi,,\n'
                    "Write NA,NA,null,\n")
    report = LoadReport()
    rows = preference_pairs_for(PreferenceDataSpec(source="trl", path=str(path)), DataSpec(), 0, report=report)
    assert rows.to_list() == [
        {"prompt": "What is 2+2, in digits?", "chosen": "4", "rejected": "5", "preference": 0.8},
        {"prompt": "Write NA", "chosen": "NA", "rejected": "null", "preference": 1.0}]
    assert (report.rows_in, report.rows_skipped_empty) == (3, 1)

    path.write_text("prompt,chosen,rejected,preference\nSay hi,hi,ho,likely\n")
    with pytest.raises(DataError, match=r"row 0, column 'preference': expected P\(chosen preferred over rejected\), "
                                        r"a number in \[0, 1\] or null \(= 1\), got 'likely'"):
        preference_pairs_for(PreferenceDataSpec(source="trl", path=str(path)), DataSpec(), 0)
    path.write_text("prompt,chosen,prompt\na,b,c\n")
    with pytest.raises(DataError, match=r"header names column 'prompt' more than once"):
        preference_pairs_for(PreferenceDataSpec(source="trl", path=str(path)), DataSpec(), 0)


def test_a_csv_row_with_another_field_count_than_the_header_is_refused_naming_its_line(tmp_path):
    """With one extra field in every row pandas made the first column the index and shifted the others left: prompts
    became the chosen text, silently. A blank header cell (a spreadsheet's trailing comma) still loads."""
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    path = tmp_path / "pairs.csv"
    spec = PreferenceDataSpec(source="trl", path=str(path))
    path.write_text('prompt,chosen,rejected\n"two\nlines",b,c\nd,e,f,EXTRA\n')
    with pytest.raises(DataError, match=r"pairs.csv line 4 has 4 fields and the header 3"):
        preference_pairs_for(spec, DataSpec(), 0)
    path.write_text("prompt,chosen,rejected,\nq,a,b,\n")
    assert preference_pairs_for(spec, DataSpec(), 0).to_list() == [{"prompt": "q", "chosen": "a", "rejected": "b"}]


def test_a_csv_file_is_read_once_before_the_datasets_library_reads_it(tmp_path, monkeypatch):
    """Its UTF-8 check and its header and field-count check share one pass over the file (a large file was read
    twice before the datasets library read it a third time). The other open reads only the first bytes, for the
    magic number of a compression the name does not give."""
    from alignpipe.data import rows as data_rows

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nq,a,b\n")
    opened = []

    def counting_open(file, *args, **kwargs):
        opened.extend([file] if Path(file) == path else [])
        return open(file, *args, **kwargs)

    monkeypatch.setattr(data_rows, "open", counting_open, raising=False)  # the module's own opens, not pandas'
    rows = data_rows.load_rows(path, "train", what="dataset.path", expected="prompt/chosen/rejected columns")
    assert rows.to_list() == [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    assert len(opened) == 2


@pytest.mark.parametrize("bad_row_first", [True, False])
def test_a_csv_file_with_a_byte_that_is_not_utf8_and_a_row_of_another_field_count_names_the_byte(tmp_path,
                                                                                              bad_row_first):
    """The byte is named wherever it is, before or after the row: the file must be re-saved as UTF-8 first."""
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    path = tmp_path / "pairs.csv"
    lines = [b"q,a,b,EXTRA\n", b"caf\xe9,a,b\n"]
    path.write_bytes(b"prompt,chosen,rejected\n" + b"".join(lines if bad_row_first else lines[::-1]))
    with pytest.raises(DataError, match=rf"cannot read .*pairs.csv: line {3 if bad_row_first else 2} is not UTF-8 "
                                        r"text \(byte 0xe9\); re-save the file as UTF-8"):
        preference_pairs_for(PreferenceDataSpec(source="trl", path=str(path)), DataSpec(), 0)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_a_csv_row_of_another_field_count_past_the_first_mebibyte_is_named_by_its_line(tmp_path, newline):
    """The file is read in 1 MiB chunks; a line end cut by a chunk's end (a "\\r\\n" split in two, a "\\r" that
    might be one) is one line end all the same, so the row is named by the line the csv module counts."""
    from alignpipe.data.rows import load_rows

    head, row, last = f'x,y{newline}"a{newline}b",c{newline}', f"a,b{newline}", f",b{newline}"  # a field of 2 lines
    up_to_cut = (1 << 20) + len(newline) - 1  # the first chunk ends in the line end, or inside it
    rows = (up_to_cut - len(head) - len(last)) // len(row) - 1
    stretched = "a" * (up_to_cut - len(head) - len(last) - rows * len(row)) + last
    path = tmp_path / "pairs.csv"
    path.write_text(head + row * rows + stretched + f"d,e,f{newline}", newline="")
    assert path.read_bytes()[:up_to_cut].endswith(newline.encode())
    with pytest.raises(DataError, match=rf"pairs.csv line {rows + 5} has 3 fields and the header 2"):
        load_rows(path, "train", what="dataset.path", expected="x/y columns")


def test_a_csv_cell_longer_than_the_csv_modules_limit_is_read_whole(tmp_path, monkeypatch):
    """A 200,000-character reply is a valid cell (the datasets library reads it), past the csv module's default
    field limit of 131,072: the check lifts the limit while it reads, and a csv error it still meets names the line.
    A cell longer than a read chunk (1 MiB) that spans lines is one line all the same."""
    import alignpipe.data.rows as data_rows

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nq," + "a" * 200_000 + f',b\nr,"{"c" * (3 << 20)}\nd",e\n')
    rows = data_rows.load_rows(path, "train", what="dataset.path", expected="prompt/chosen/rejected columns")
    assert [len(row["chosen"]) for row in rows] == [200_000, (3 << 20) + 2]
    monkeypatch.setattr(data_rows, "_csv_fields_of_any_size", contextlib.nullcontext)  # the csv module's own limit
    with pytest.raises(DataError, match=r"pairs.csv line 2 is not CSV \(field larger than field limit"):
        data_rows.load_rows(path, "train", what="dataset.path", expected="prompt/chosen/rejected columns")


def test_csv_checks_in_two_threads_keep_the_field_limit_lifted_for_each_and_restore_it(tmp_path):
    """The csv module's field limit is one per process: a check that finished first put the default back under one
    still reading (which then refused its long cell), and the last left the lifted limit behind."""
    import csv
    import threading
    import time

    import alignpipe.data.rows as data_rows

    text = "prompt,chosen,rejected\n" + "q,a,b\n" * 3 + "q," + "a" * 200_000 + ",b\n"
    errors: list[str] = []

    def check(pause: float) -> None:
        def slowly():
            for line in text.splitlines(keepends=True):
                time.sleep(pause)
                yield line
        try:
            data_rows._csv_header(slowly(), tmp_path / "pairs.csv", what="dataset.path", expected="columns")
        except DataError as error:
            errors.append(str(error))

    default = csv.field_size_limit()
    threads = [threading.Thread(target=check, args=(pause,)) for pause in (0.01, 0.04)]
    threads[0].start()
    time.sleep(0.005)
    threads[1].start()
    for thread in threads:
        thread.join()
    assert errors == [] and csv.field_size_limit() == default


# ------------------------------------------------------------------------------------------------ UltraFeedback


def test_load_ultrafeedback_local_jsonl(tmp_path):
    rows = [
        {"instruction": "Say hi", "completions": [
            {"response": "Hi!", "overall_score": 8.0, "model": "m1"},
            {"response": "Go away.", "overall_score": 2.5, "model": "m2"},
            {"response": "", "overall_score": 5.0, "model": "m3"},
            {"response": "Hello.", "overall_score": None, "model": "m4"},
        ]},
        {"instruction": "", "completions": [{"response": "x", "overall_score": 1.0}]},
        {"instruction": "Count", "completions": [{"response": "1 2 3", "overall_score": 7.0}]},
    ]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    report = LoadReport()
    sets = load_ultrafeedback(str(path), report=report)
    assert [s.prompt for s in sets] == ["Say hi", "Count"]
    assert sets[0].responses == ("Hi!", "Go away.", "Hello.")
    assert sets[0].scores[:2] == (8.0, 2.5) and math.isnan(sets[0].scores[2])
    assert (report.rows_in, report.rows_skipped_empty, report.responses_dropped_empty) == (3, 1, 1)
    pairs, pair_report = build_pairs(sets, method="best_worst", strength="reward", temperature=5.0)
    assert [(p.chosen, p.rejected) for p in pairs] == [("Hi!", "Go away.")]
    assert pairs[0].strength == pytest.approx(1 / (1 + math.exp(-5.5 / 5.0)))
    assert pair_report.responses_dropped_nonfinite == 1 and pair_report.sets_skipped_too_few == 1


def test_load_ultrafeedback_custom_score_key(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [
        {"instruction": "q", "completions": [{"response": "a", "helpfulness": 4}, {"response": "b", "helpfulness": 1}]},
    ])
    sets = load_ultrafeedback(str(path), score_key="helpfulness")
    assert sets == [ScoredSet("q", ("a", "b"), (4.0, 1.0))]
    with pytest.raises(ValueError, match=r"uf.jsonl row 0: column 'completions' .* without field 'overall_score'"):
        load_ultrafeedback(str(path))


# ------------------------------------------------------------------------------------------------ errors


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "prefs.jsonl.gz"
    with pytest.raises(FileNotFoundError, match=r"load_alpaca_eval_prefs: no such file .*nope/prefs\.jsonl\.gz"):
        load_alpaca_eval_prefs(missing)
    with pytest.raises(FileNotFoundError, match="nope/hh.jsonl"):
        load_hh_rlhf_pairs(str(tmp_path / "nope" / "hh.jsonl"), split="train")
    with pytest.raises(FileNotFoundError, match="uf.parquet"):
        load_ultrafeedback("data/uf.parquet")


def test_missing_column_names_file_and_column(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "answer": "x"}])
    with pytest.raises(ValueError, match=r"pairs\.jsonl has no column 'rejected'.*expected rows with"):
        load_hh_rlhf_pairs(path, split="train")
    with pytest.raises(ValueError, match=r"pairs\.jsonl has no column 'instruction'"):
        load_ultrafeedback(str(path))
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "q", "responses": [{"text": "a", "score": 0.3}]}])
    with pytest.raises(ValueError, match=r"alpaca\.jsonl has no column 'reference'"):
        load_alpaca_eval_prefs(path, include_reference=True)


def test_synthetic_loader_names_bad_rows():
    with pytest.raises(ValueError, match="synthetic scored set 1: missing key 'scores'"):
        load_scored_sets_synthetic([{"prompt": "p", "responses": ["a"], "scores": [1.0]}, {"prompt": "q", "responses": []}])
    with pytest.raises(ValueError, match="synthetic scored set 0: .*2 responses but 1 scores"):
        load_scored_sets_synthetic([{"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}])
