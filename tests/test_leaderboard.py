"""Tests for alignpipe.evaluation.leaderboard and the atomic writers in alignpipe.io."""

import json
import math
import os
import stat
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from alignpipe.evaluation.leaderboard import (
    SCHEMA_VERSION,
    CheckpointResult,
    build_leaderboard,
    load_leaderboard,
    merge_leaderboards,
    render_markdown,
    seen_from,
    write_leaderboard,
)
from alignpipe.evaluation.metrics import MetricValue
from alignpipe.io import atomic_write_json, atomic_write_text


def mv(value, lo=None, hi=None, n=2000, hib=True, **extra):
    return MetricValue(value, None if lo is None else (lo, hi), n, hib, extra)


def results():
    """Given in the wrong order on purpose: base < sft < dpo on gold reward (higher is better)."""
    return [
        CheckpointResult("base", "ckpts/base", None, {
            "gold_reward": mv(0.0, -0.04, 0.04),
            "kl_ref_k1": mv(0.0, 0.0, 0.0, n=8000, hib=None),
            "truncation_rate": mv(0.10, 0.08, 0.12, hib=False),
        }),
        CheckpointResult("sft", "ckpts/sft", "ab" * 32, {
            "gold_reward": mv(0.2, 0.17, 0.23),
            "kl_ref_k1": mv(1.5, 1.4, 1.6, n=8000, hib=None),
            "truncation_rate": mv(0.02, 0.01, 0.03, hib=False),
        }),
        CheckpointResult("dpo", "ckpts/dpo", "cd" * 32, {
            "gold_reward": mv(0.41, 0.37, 0.45),
            "kl_ref_k1": mv(6.2, 5.9, 6.5, n=8000, hib=None),
            "truncation_rate": mv(0.05, 0.04, 0.06, hib=False),
            "win_rate_vs_ref": mv(0.58, 0.55, 0.61, n_wins=1120, n_losses=800, n_ties=80),
            "len_tokens_mean": mv(212.4, 208.1, 216.9, hib=None),
        }),
    ]


def build(res=None, primary="gold_reward"):
    return build_leaderboard(
        results() if res is None else res,
        run={"run_id": "quick_dpo_s1", "git_sha": "0" * 40},
        config={"generation": {"temperature": 1.0, "seed": 0}, "bootstrap_iters": 1000},
        env={"torch": "2.13.0"},
        suite="gold",
        primary_metric=primary,
    )


def names(lb):
    return [c["name"] for c in lb["checkpoints"]]


# ---------------------------------------------------------------------------------------------------- building


def test_sorted_best_first_when_higher_is_better():
    lb = build()
    assert names(lb) == ["dpo", "sft", "base"]
    assert lb["schema_version"] == SCHEMA_VERSION
    assert lb["suite"] == {"name": "gold", "primary_metric": "gold_reward"}
    assert lb["higher_is_better"] == {
        "gold_reward": True, "kl_ref_k1": None, "truncation_rate": False, "win_rate_vs_ref": True,
        "len_tokens_mean": None,
    }
    dpo = lb["checkpoints"][0]
    assert dpo["path"] == "ckpts/dpo" and dpo["weights_sha256"] == "cd" * 32
    assert dpo["results"]["win_rate_vs_ref"] == {
        "value": 0.58, "ci95": [0.55, 0.61], "n": 2000, "higher_is_better": True,
        "n_wins": 1120, "n_losses": 800, "n_ties": 80,
    }


def test_sorted_best_first_when_lower_is_better():
    assert names(build(primary="truncation_rate")) == ["sft", "dpo", "base"]


def test_checkpoint_without_primary_metric_goes_last():
    lb = build(primary="win_rate_vs_ref")
    assert names(lb) == ["dpo", "base", "sft"]  # dpo ranked; the others keep input order
    md = render_markdown(lb)
    assert "| – | base |" in md and "| 1 | dpo |" in md


def test_build_rejects_meaningless_rankings():
    with pytest.raises(ValueError, match="no direction"):
        build(primary="kl_ref_k1")
    with pytest.raises(ValueError, match="in no checkpoint"):
        build(primary="gold_rewrd")
    conflicting = results()
    conflicting[1].metrics["truncation_rate"] = mv(0.02, hib=True)
    with pytest.raises(ValueError, match="truncation_rate"):
        build(conflicting)
    duplicated = results()
    duplicated[0].name = "sft"
    with pytest.raises(ValueError, match="duplicate"):
        build(duplicated)


# ---------------------------------------------------------------------------------------------------- markdown


def test_markdown_table_rows_cis_and_directions():
    lb = build()
    md = render_markdown(lb)
    lines = md.splitlines()
    rows = [ln for ln in lines if ln.startswith("| ") and ln.split("|")[1].strip().isdigit()]
    assert [r.split("|")[2].strip() for r in rows] == ["dpo", "sft", "base"]  # one row each, JSON order
    header = next(ln for ln in lines if ln.startswith("| rank"))
    # EVALUATION.md §10's column order; every metric here is a headline one, so there is no "All metrics" table
    assert header == (
        "| rank | checkpoint | gold_reward ↑ | kl_ref_k1 | win_rate_vs_ref ↑ | len_tokens_mean | truncation_rate ↓ "
        "| n | flags |"
    )
    assert "## All metrics" not in md
    assert rows[0] == (
        "| 1 | dpo | 0.410 [0.370, 0.450] | 6.20 [5.90, 6.50] (n=8000) | 0.580 [0.550, 0.610] | 212 [208, 217] "
        "| 0.0500 [0.0400, 0.0600] | 2000 |  |"
    )
    # CI bounds take the value's decimals so they line up; missing metrics are "–".
    assert rows[2] == (
        "| 3 | base | 0.000 [-0.040, 0.040] | 0.000 [0.000, 0.000] (n=8000) | – | – | 0.100 [0.080, 0.120] "
        "| 2000 | truncation 10.0% > 5% |"
    )
    assert "`gold`" in md and "primary metric `gold_reward` ↑" in md and "`quick_dpo_s1`" in md
    assert "- `truncation_rate`: ↓ lower is better" in md
    assert "- `kl_ref_k1`: no preferred direction (diagnostic)" in md
    assert "- `gold_reward`: ↑ higher is better" in md


def test_markdown_headline_table_then_every_metric():
    """A board with more than the headline metrics shows EVALUATION.md §10's columns first, then all of them."""
    from alignpipe.evaluation.metrics import MetricValue

    res = results()
    for r in res:
        r.metrics["self_bleu_4"] = MetricValue(0.3, (0.2, 0.4), 32, False)
    md = render_markdown(build(res))
    headline, rest = md.split("## All metrics")
    assert "self_bleu_4" not in headline.split("Metric directions")[0] and "| gold_reward ↑ |" in headline
    assert "| self_bleu_4 ↓ |" in rest and rest.count("| dpo |") == 1 and headline.count("| dpo |") == 1


def test_markdown_escapes_pipes_in_names():
    res = results()
    res[0].name = "base|v2"
    assert "| base\\|v2 |" in render_markdown(build(res))


@pytest.mark.parametrize("name, cell", [
    ("back\\|slash", "back\\\\\\|slash"),  # the backslash kept as one: its own escape would eat the pipe's
    ("two\nlines", "two lines"),  # a line break ends the table row
    ("<img src=x> & co", "&lt;img src=x&gt; &amp; co"),  # inline HTML, shown as text
])
def test_markdown_shows_odd_names_as_one_literal_cell(name, cell):
    res = results()
    res[0].name = name
    row = next(line for line in render_markdown(build(res)).splitlines() if line.startswith("| 3 |"))
    assert row.startswith(f"| 3 | {cell} | ")
    unescaped_bars = len(row) - len(row.replace("|", "")) - row.count("\\|")
    header = next(line for line in render_markdown(build(res)).splitlines() if line.startswith("| rank"))
    assert unescaped_bars == header.count("|")


def test_non_finite_metric_values_are_refused_where_they_are_made():
    """JSON has no NaN or inf, so one such value stopped the whole leaderboard being written; and an inf ranked
    first while the table called it unranked."""
    with pytest.raises(ValueError, match="finite"):
        MetricValue(math.inf, None, 3, True)
    with pytest.raises(ValueError, match="finite"):
        MetricValue(math.nan, None, 3, True)
    with pytest.raises(ValueError, match="ci95 bounds must be finite"):
        MetricValue(0.5, (0.1, math.inf), 3, True)


# ---------------------------------------------------------------------------------------------- write and load


def test_write_load_round_trip(tmp_path):
    lb = build()
    json_path, md_path = write_leaderboard(lb, tmp_path / "runs" / "r1")
    assert (json_path.name, md_path.name) == ("leaderboard.json", "leaderboard.md")
    assert sorted(p.name for p in json_path.parent.iterdir()) == ["leaderboard.csv", "leaderboard.json", "leaderboard.md"]
    assert load_leaderboard(json_path) == lb
    assert json_path.read_text(encoding="utf-8").endswith("}\n")
    assert md_path.read_text(encoding="utf-8") == render_markdown(lb)
    date = datetime.fromisoformat(lb["date"])
    assert date.utcoffset() == timedelta(0)


def test_load_rejects_other_schema_versions(tmp_path):
    path = tmp_path / "leaderboard.json"
    lb = build()
    for bad in ("0.9", "2.0", None):
        path.write_text(json.dumps({**lb, "schema_version": bad}), encoding="utf-8")
        with pytest.raises(ValueError, match=r"unsupported leaderboard schema_version .* reads '1\.0'"):
            load_leaderboard(path)
    path.write_text(json.dumps({k: v for k, v in lb.items() if k != "checkpoints"}), encoding="utf-8")
    with pytest.raises(ValueError, match="missing keys.*checkpoints"):
        load_leaderboard(path)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON object"):
        load_leaderboard(path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_leaderboard(path)


def test_failed_write_keeps_old_files_and_leaves_no_temp_files(tmp_path):
    json_path, md_path = write_leaderboard(build(), tmp_path)
    old_json, old_md = json_path.read_bytes(), md_path.read_bytes()
    bad = build()
    bad["config"]["judge"] = object()  # not JSON-serialisable
    with pytest.raises(TypeError):
        write_leaderboard(bad, tmp_path)
    assert json_path.read_bytes() == old_json and md_path.read_bytes() == old_md
    unrenderable = build()
    del unrenderable["higher_is_better"]  # serialises fine, but the Markdown cannot be made: write neither file
    with pytest.raises(KeyError):
        write_leaderboard(unrenderable, tmp_path)
    assert json_path.read_bytes() == old_json and md_path.read_bytes() == old_md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaderboard.csv", "leaderboard.json", "leaderboard.md"]


def test_atomic_write_text_cleans_up_when_writing_fails(tmp_path):
    path = tmp_path / "a" / "b" / "notes.txt"  # parents are created
    atomic_write_text(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "lone surrogate \ud800")  # fails after the temp file exists
    assert path.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in path.parent.iterdir()] == ["notes.txt"]


def test_atomic_open_all_replaces_every_file_or_none(tmp_path, monkeypatch):
    """Files read together are renamed into place only after all are written and synced: a failure while writing,
    or a sync failing (a full disk), leaves every old file; only a rename failing can replace some, and says which."""
    import alignpipe.io as io

    paths = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for p in paths:
        p.write_text("old\n")
    with pytest.raises(RuntimeError):
        with io.atomic_open_all(paths) as (a, b):
            a.write("new a\n")
            raise RuntimeError("stop")
    synced = []

    def full_disk_on_the_second(fd):
        synced.append(fd)
        if len(synced) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full_disk_on_the_second)
    with pytest.raises(OSError, match="No space"):
        with io.atomic_open_all(paths) as (a, b):
            a.write("new a\n")
            b.write("new b\n")
    monkeypatch.undo()
    assert [p.read_text() for p in paths] == ["old\n", "old\n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temp file left

    paths[1].unlink()
    paths[1].mkdir()  # the second rename fails: the first file is already replaced, and the error says so
    with pytest.raises(io.PartlyReplacedError, match="already replaced: .*a.txt") as error:
        with io.atomic_open_all(paths) as (a, b):
            a.write("new a\n")
            b.write("new b\n")
    assert error.value.replaced == [paths[0]] and paths[0].read_text() == "new a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]

    with io.atomic_open_all([tmp_path / "c.txt", tmp_path / "sub" / "d.txt"]) as (c, d):
        c.write("c\n")
        d.write("d\n")
    assert (tmp_path / "c.txt").read_text() == "c\n" and (tmp_path / "sub" / "d.txt").read_text() == "d\n"
    with io.atomic_open_all([tmp_path / "e.png"], binary=True) as (e,):  # plots: bytes exactly as given
        e.write(b"\x89PNG\r\n\x1a\n")
    assert (tmp_path / "e.png").read_bytes() == b"\x89PNG\r\n\x1a\n"


def test_atomic_write_json_format_nan_and_permissions(tmp_path):
    path = atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert path.read_text(encoding="utf-8") == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'  # order kept
    with pytest.raises(ValueError, match="JSON compliant"):
        atomic_write_json(path, {"loss": float("nan")})
    assert json.loads(path.read_text(encoding="utf-8")) == {"b": 1, "a": [1, 2]}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_flags_csv_and_merge(tmp_path):
    from alignpipe.evaluation.leaderboard import checkpoint_flags, merge_leaderboards, render_csv

    assert checkpoint_flags({"kl_ref_k3": {"value": 12.0}}) == ["KL (k3 12) > budget 10 nats"]
    flags = checkpoint_flags({"win_rate_vs_ref": {"value": 0.75}, "lc_win_rate_vs_ref": {"value": 0.45}})
    assert len(flags) == 1 and "LC" in flags[0]
    lb = build()
    rows = render_csv(lb).splitlines()
    assert rows[0].startswith("rank,checkpoint,gold_reward,gold_reward_lo,gold_reward_hi,gold_reward_n")
    assert rows[1].startswith("1,dpo,0.41,0.37,0.45,2000") and rows[3].endswith("truncation 10.0% > 5%")
    for name in ("a", "b"):
        write_leaderboard({**lb, "run": {**lb["run"], "name": name}}, tmp_path / name)
    merged = merge_leaderboards([tmp_path / "a" / "leaderboard.json", tmp_path / "b" / "leaderboard.json"])
    assert [r["name"] for r in merged["checkpoints"]][:2] == ["a/dpo", "b/dpo"]
    assert len(merged["config"]["sources"]) == 2
    other = {**lb, "suite": {"name": "alpaca-eval", "primary_metric": "gold_reward"}}
    write_leaderboard(other, tmp_path / "c")
    with pytest.raises(ValueError, match="one suite at a time"):
        merge_leaderboards([tmp_path / "a" / "leaderboard.json", tmp_path / "c" / "leaderboard.json"])


def _suite_board(changed: tuple[str, str, object] | None = None) -> dict:
    """A leaderboard as `alignpipe eval --suite synthetic` records it (every such run is named "suite:synthetic"),
    with one recorded setting ``(section, key, value)`` changed."""
    sections = {
        "run": {"name": "suite:synthetic", "reference": "sft", "reference_sha256": "ab" * 32,
                "suite_sha256": "aa" * 32},
        "config": {"generation": {"max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0, "batch_size": 64,
                                  "seed": 1234},
                   "prompt_set": {"id": "synthetic:0123456789abcdef", "n": 256},
                   "judge": {"type": "gold", "id": "gold:synthetic-v1", "position_swap": True}},
    }
    if changed:
        section, key, value = changed
        sections[section][key] = value
    return build_leaderboard(results(), run=sections["run"], config=sections["config"], env={}, suite="synthetic",
                             primary_metric="gold_reward")


def test_rows_link_their_samples_and_merged_rows_their_run_too(tmp_path):
    """A row that records its sample file gets a trace column linking it; a merged table, written elsewhere, links
    each row's samples and its run's own leaderboard relative to itself, so tables copied together with the runs
    still find them; a merge of merges keeps the first run's leaderboard."""
    import shutil

    res = results()
    for r in res[1:]:
        r.samples = f"samples/{r.name} #1?(100%).jsonl"  # a fragment, a query, an escape: still part of the path
    board = build(res)
    assert seen_from(board, "eval")["checkpoints"][0]["samples"] == "eval/samples/dpo #1?(100%).jsonl"
    assert board["checkpoints"][0]["samples"] == "samples/dpo #1?(100%).jsonl"  # a copy: the record is unchanged
    run = tmp_path / "runs" / "run-12:00"  # not a URL scheme
    write_leaderboard(seen_from(board, "eval"), run)
    md = (run / "leaderboard.md").read_text()
    assert "| trace |" in md and "[samples](./eval/samples/dpo%20%231%3F%28100%25%29.jsonl)" in md
    base_row = next(line for line in md.splitlines() if "| base |" in line)
    assert base_row.endswith("|  |")  # no file recorded: an empty cell
    assert "| trace |" not in render_markdown(build())  # nothing recorded: no column

    merged_dir = tmp_path / "tables" / "merged"
    write_leaderboard(merge_leaderboards([run / "leaderboard.json"]), merged_dir)
    dpo = next(r for r in load_leaderboard(merged_dir / "leaderboard.json")["checkpoints"]
               if r["name"] == "run-12:00/dpo")
    assert dpo["samples"] == "../../runs/run-12:00/eval/samples/dpo #1?(100%).jsonl"
    assert dpo["leaderboard"] == "../../runs/run-12:00/leaderboard.json"
    assert ("[samples](../../runs/run-12%3A00/eval/samples/dpo%20%231%3F%28100%25%29.jsonl) · "
            "[results](../../runs/run-12%3A00/leaderboard.json)") in (merged_dir / "leaderboard.md").read_text()

    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "runs", moved / "runs")
    shutil.copytree(tmp_path / "tables", moved / "tables")
    again = merge_leaderboards([moved / "tables" / "merged" / "leaderboard.json"])
    row = next(r for r in again["checkpoints"] if r["name"] == "merged/run-12:00/dpo")
    assert row["leaderboard"] == str((moved / "runs" / "run-12:00" / "leaderboard.json").resolve())
    assert Path(row["samples"]) == (moved / "runs" / "run-12:00" / "eval" / "samples" / "dpo #1?(100%).jsonl").resolve()


def test_merged_suite_runs_get_one_distinct_row_per_run_and_checkpoint(tmp_path):
    from alignpipe.evaluation.leaderboard import merge_leaderboards

    paths = [write_leaderboard(_suite_board(), tmp_path / "runs" / run)[0] for run in ("a", "b")]
    merged = merge_leaderboards(paths)
    assert sorted(names(merged)) == ["a/base", "a/dpo", "a/sft", "b/base", "b/dpo", "b/sft"]
    assert "b/dpo" in render_markdown(merged)
    # same directory names elsewhere: the labels grow until they tell the runs apart
    again = [write_leaderboard(_suite_board(), tmp_path / user / "eval-out" / "synthetic")[0] for user in ("x", "y")]
    assert {n.rsplit("/", 1)[0] for n in names(merge_leaderboards(again))} == {"x/eval-out/synthetic",
                                                                                "y/eval-out/synthetic"}
    with pytest.raises(ValueError, match="more than once"):
        merge_leaderboards([paths[0], paths[0]])


@pytest.mark.parametrize("section, key, value, what", [
    ("run", "suite_sha256", "bb" * 32, "suite file hash"),
    ("run", "reference", "base", "reference"),
    ("run", "reference_sha256", "cd" * 32, "reference weights"),
    ("config", "prompt_set", {"id": "synthetic:fedcba9876543210", "n": 16}, "prompt set"),
    ("config", "generation", {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0, "batch_size": 64, "seed": 1234},
     "generation settings"),
    ("config", "kl_k3", "summed per token", "KL k3 estimator"),  # against a board from before k3 was per token
    ("config", "pair_sources", {"hh-rlhf": 128}, "pair sources"),  # a reward suite's held-out pairs
])
def test_merge_refuses_runs_evaluated_differently(tmp_path, section, key, value, what):
    from alignpipe.evaluation.leaderboard import merge_leaderboards

    a = write_leaderboard(_suite_board(), tmp_path / "a")[0]
    b = write_leaderboard(_suite_board((section, key, value)), tmp_path / "b")[0]
    with pytest.raises(ValueError, match=what) as error:
        merge_leaderboards([a, b])
    assert str(a) in str(error.value) and str(b) in str(error.value) and "alignpipe eval" in str(error.value)


@pytest.mark.parametrize("key, four, eight, what", [
    ("diversity", {"samples_per_prompt": 4, "prompts": 32}, {"samples_per_prompt": 8, "prompts": 32},
     "diversity sampling"),
    ("implicit_reward_pairs", {"source": "synthetic", "seed": 4242, "n": 256, "sha256": "0123456789abcdef"},
     {"source": "synthetic", "seed": 4242, "n": 64, "sha256": "fedcba9876543210"}, "implicit-reward pairs"),
])
def test_merge_compares_extra_samples_only_where_both_boards_drew_them(tmp_path, key, four, eight, what):
    """Self-BLEU and distinct-n within a prompt move with the samples per prompt, an implicit-reward accuracy with its
    pairs: boards that drew them differently are not ranked together, but a board without those columns (older, or
    the setting off) still merges."""
    from alignpipe.evaluation.leaderboard import merge_leaderboards

    def board(name: str, drawn: dict | None) -> Path:
        return write_leaderboard(_suite_board(("config", key, drawn) if drawn else None), tmp_path / name)[0]

    with pytest.raises(ValueError, match=what):
        merge_leaderboards([board("a", four), board("b", eight)])
    with pytest.raises(ValueError, match=what):  # checked pair by pair: a first board without them checks nothing
        merge_leaderboards([board("none", None), board("a4", four), board("b8", eight)])
    assert len(merge_leaderboards([board("c", four), board("d", None)])["checkpoints"]) == 2 * len(results())
    assert len(merge_leaderboards([board("e", four), board("f", four)])["checkpoints"]) == 2 * len(results())


def test_merge_leaves_out_proxy_columns_scored_by_different_reward_models(tmp_path, caplog):
    """Each run trains its own proxy, whose scores have their own scale: a merge of runs with different proxies
    keeps every other column and leaves the proxy ones out (saying so); runs sharing one proxy keep them."""
    from alignpipe.evaluation.leaderboard import merge_leaderboards
    from alignpipe.evaluation.metrics import MetricValue

    def board(name: str, proxy_sha: str | None, stage: str = "rm") -> Path:
        rows = [CheckpointResult(r.name, r.path, r.weights_sha256,
                                 {**r.metrics, "proxy_reward": MetricValue(1.0, (0.5, 1.5), 8, None)})
                for r in results()]
        config = {**_suite_board()["config"], **({"proxy": {"stage": stage, "sha256": proxy_sha}} if proxy_sha else {})}
        record = build_leaderboard(rows, run=_suite_board()["run"], config=config, env={}, suite="synthetic",
                                   primary_metric="gold_reward")
        return write_leaderboard(record, tmp_path / name)[0]

    with caplog.at_level("WARNING", logger="alignpipe"):
        merged = merge_leaderboards([board("a", "11" * 32), board("b", "22" * 32)])
    assert all("proxy_reward" not in row["results"] and "gold_reward" in row["results"]
               for row in merged["checkpoints"])
    assert "proxy_reward" not in merged["higher_is_better"]
    assert merged["config"]["left_out"]["metrics"] == ["proxy_reward"] and "proxy_reward" in caplog.text
    kept = merge_leaderboards([board("c", "11" * 32), board("d", "11" * 32)])
    assert all("proxy_reward" in row["results"] for row in kept["checkpoints"]) and "left_out" not in kept["config"]
    renamed = merge_leaderboards([board("g", "11" * 32), board("h", "11" * 32, stage="reward")])  # one model
    assert all("proxy_reward" in row["results"] for row in renamed["checkpoints"])
    assert all("proxy_reward" in row["results"] for row in merge_leaderboards(
        [board("e", "11" * 32), board("f", None)])["checkpoints"])  # one proxy only: nothing to mix up


def test_merge_of_leaderboards_that_predate_the_reference_weights(tmp_path, caplog):
    """Written before the reference's weights were recorded: merged with a warning when nothing else differs, refused
    (saying which file is older) against a leaderboard that records other weights."""
    from alignpipe.evaluation.leaderboard import merge_leaderboards

    old = _suite_board()
    del old["run"]["reference_sha256"]
    a, b = (write_leaderboard(old, tmp_path / run)[0] for run in ("a", "b"))
    with caplog.at_level("WARNING", logger="alignpipe"):
        assert len(merge_leaderboards([a, b])["checkpoints"]) == 6
    assert "without checking" in caplog.text and str(a) in caplog.text and str(b) in caplog.text
    new = write_leaderboard(_suite_board(), tmp_path / "new")[0]
    with pytest.raises(ValueError, match="reference weights") as error:
        merge_leaderboards([a, new])
    assert f"not recorded vs {'ab' * 32!r}" in str(error.value) and f"{a}: written by an older" in str(error.value)


def test_boards_judged_by_a_reward_model_without_its_weights_hash_are_not_merged(tmp_path):
    """A reward-model judge's id names only its directory (every reward stage saves to .../checkpoint): boards that
    did not record the judge's weights hash cannot be shown to share a judge, even when their ids agree."""
    from alignpipe.evaluation.leaderboard import merge_leaderboards

    judge = {"type": "reward_model", "id": "reward_ensemble:checkpoint", "position_swap": True, "trained_on": None}
    old = ("config", "judge", judge)
    new = ("config", "judge", {**judge, "weights_sha256": "cd" * 32})
    a, b = (write_leaderboard(_suite_board(old), tmp_path / run)[0] for run in ("a", "b"))
    c, d = (write_leaderboard(_suite_board(new), tmp_path / run)[0] for run in ("c", "d"))
    for pair in ((a, b), (a, c)):
        with pytest.raises(ValueError, match="judge weights") as error:
            merge_leaderboards(list(pair))
        assert "config.judge.weights_sha256: None vs" in str(error.value)
        assert "re-run its evaluation" in str(error.value)
    assert len(merge_leaderboards([c, d])["checkpoints"]) == 6


def test_merging_merged_leaderboards_checks_every_run_they_hold(tmp_path, caplog):
    """A merged leaderboard records its runs' settings only under config.sources: merging merged leaderboards checks
    those runs, so runs judged differently are refused as when merged directly, and agreeing ones merge into a
    board whose config.sources has one entry per run, labelled like its rows."""
    from alignpipe.evaluation.leaderboard import merge_leaderboards

    other_judge = ("config", "judge", {"type": "reward_model", "id": "rm:other", "position_swap": True,
                                       "weights_sha256": "cd" * 32})
    runs = {name: write_leaderboard(_suite_board(other_judge if name.startswith("b") else None), tmp_path / name)[0]
            for name in ("a1", "a2", "a3", "b1", "b2")}
    merged = {name: write_leaderboard(merge_leaderboards([runs[x] for x in parts]), tmp_path / name)[0]
              for name, parts in (("mA", ("a1", "a2")), ("mB", ("b1", "b2")))}
    with pytest.raises(ValueError, match="judge") as error:
        merge_leaderboards([merged["mA"], merged["mB"]])
    assert f"{runs['a1']} (via {merged['mA']})" in str(error.value)
    assert f"{runs['b1']} (via {merged['mB']})" in str(error.value)
    with pytest.raises(ValueError, match="judge"):
        merge_leaderboards([merged["mA"], runs["b1"]])
    with caplog.at_level("WARNING", logger="alignpipe"):
        board = merge_leaderboards([merged["mA"], runs["a3"]])
    assert not caplog.records
    sources = board["config"]["sources"]
    assert [s["label"] for s in sources] == ["mA/a1", "mA/a2", "a3"] and board["run"]["sources"] == 3
    assert sources[0]["path"] == str(runs["a1"]) and sources[0]["via"] == [str(merged["mA"])]
    assert sources[0]["run"]["reference_sha256"] == "ab" * 32 and "via" not in sources[2]
    assert {row["name"].rsplit("/", 1)[0] for row in board["checkpoints"]} == {"mA/a1", "mA/a2", "a3"}
    again = write_leaderboard(board, tmp_path / "mm")[0]  # a third level still checks the runs themselves
    assert [s["via"] for s in merge_leaderboards([again])["config"]["sources"]][0] == [str(merged["mA"]), str(again)]
    with pytest.raises(ValueError, match="judge"):
        merge_leaderboards([again, merged["mB"]])


@pytest.mark.parametrize("direction", [True, None])
def test_merge_refuses_a_metric_declared_with_different_directions(tmp_path, direction):
    """As build_leaderboard within one board: a table shows one direction per metric, so a metric lower-is-better in
    one run and higher-is-better (or without a direction) in another is refused, naming the metric and both files."""
    from alignpipe.evaluation.leaderboard import merge_leaderboards

    a = write_leaderboard(_suite_board(), tmp_path / "a")[0]
    flipped = _suite_board()
    flipped["higher_is_better"]["truncation_rate"] = direction
    b = write_leaderboard(flipped, tmp_path / "b")[0]
    with pytest.raises(ValueError, match="'truncation_rate' has higher_is_better=False") as error:
        merge_leaderboards([a, b])
    assert f"in {a} and {direction} in {b}" in str(error.value)


def test_merging_current_reward_suite_leaderboards_warns_of_nothing(tmp_path, monkeypatch, caplog):
    """A reward-models suite has no reference, so its leaderboard has no reference weights to record: it is not taken
    for one written by an older alignpipe."""
    import alignpipe.evaluation.reward_suite as reward_suite
    import alignpipe.rewards.loading
    from alignpipe.evaluation.leaderboard import merge_leaderboards
    from alignpipe.evaluation.suites import PairSource, SuiteSpec

    monkeypatch.setattr(alignpipe.rewards.loading, "load_reward_scorer", lambda path: None)
    monkeypatch.setattr(reward_suite, "reward_model_metrics", lambda *a, **k: {"accuracy": mv(0.7, 0.6, 0.8)})
    spec = SuiteSpec(name="rm", kind="reward_models", primary_metric="synthetic/accuracy",
                     pair_sources=[PairSource(name="synthetic", source="synthetic", n=4)], bootstrap_resamples=100)
    paths = []
    for name in ("a", "b"):
        (tmp_path / "models" / name).mkdir(parents=True)
        board = reward_suite.run_reward_suite(spec, "cc" * 32, [(name, str(tmp_path / "models" / name))])
        paths.append(write_leaderboard(board, tmp_path / name)[0])
    with caplog.at_level("WARNING", logger="alignpipe"):
        assert names(merge_leaderboards(paths)) == ["a/a", "b/b"]
    assert not caplog.records


def test_eval_stage_records_a_hash_of_its_prompts_and_the_reference_weights(completed_tiny_run):
    """The held-out prompts depend on recipe.data, not only on the seed, and two runs' "sft" may be different models:
    the leaderboard records both exactly, so a merge can tell such runs apart."""
    from alignpipe.data.synthetic import evaluation_tasks
    from alignpipe.evaluation.cache import content_key
    from alignpipe.pipeline.rundir import StageDir
    from alignpipe.recipe import DataSpec

    runner, _ = completed_tiny_run
    board = load_leaderboard(runner.run_dir / "leaderboard.json")
    stage = runner.recipe.stage("eval")

    def prompt_set_id(data: DataSpec) -> str:
        prompts = [t.prompt for t in evaluation_tasks(data, stage.n_prompts, stage.seed)]
        return f"synthetic/heldout@seed{stage.seed}:{content_key(prompts)[:16]}"

    assert board["config"]["prompt_set"]["id"] == prompt_set_id(runner.recipe.data)
    assert prompt_set_id(runner.recipe.data) != prompt_set_id(DataSpec(families=["sort"]))
    assert board["run"]["reference"] == "sft"
    assert board["config"]["kl_k3"] == "summed per token"
    # within-prompt diversity from the stage's extra samples, which are kept beside the main ones
    diversity = board["config"]["diversity"]
    assert diversity == {"samples_per_prompt": stage.diversity_samples,
                         "prompts": min(stage.diversity_prompts, stage.n_prompts)}
    for row in board["checkpoints"]:
        assert row["results"]["self_bleu_4"]["n"] == diversity["prompts"]
        rows = (runner.run_dir / "eval" / "samples" / f"{row['name']}.diversity.jsonl").read_text().splitlines()
        assert [len(json.loads(r)["responses"]) for r in rows] == [diversity["samples_per_prompt"]] * len(rows)
    assert board["run"]["reference_sha256"] == StageDir(runner.run_dir / "sft").read_manifest()["output_sha256"]


def test_eval_stage_rows_link_their_samples_from_both_records(completed_tiny_run):
    """EVALUATION §10: every row links to its sample JSONL: the run's leaderboard (run directory) and the stage's
    results.json (stage directory) each name it relative to themselves, and leaderboard.md links it."""
    runner, _ = completed_tiny_run
    board = load_leaderboard(runner.run_dir / "leaderboard.json")
    record = load_leaderboard(runner.run_dir / "eval" / "results.json")
    assert [r["samples"] for r in board["checkpoints"]] == [f"eval/samples/{r['name']}.jsonl"
                                                            for r in board["checkpoints"]]
    for row, recorded in zip(board["checkpoints"], record["checkpoints"], strict=True):
        assert (runner.run_dir / row["samples"]).samefile(runner.run_dir / "eval" / recorded["samples"])
        lines = (runner.run_dir / row["samples"]).read_text().splitlines()
        assert len(lines) == row["results"]["gold_reward"]["n"]
    assert f"[samples](./eval/samples/{board['checkpoints'][0]['name']}.jsonl)" in (
        runner.run_dir / "leaderboard.md").read_text()


def test_eval_stage_reports_implicit_reward_accuracy_on_recorded_pairs(completed_tiny_run):
    """Every policy but the reference gets implicit_reward_accuracy on the gold-ordered held-out pairs, whose source,
    seed, count and content hash the leaderboard records (merges compare them); each pair's margin is kept."""
    from alignpipe.data.synthetic import task_space
    from alignpipe.evaluation.cache import content_key
    from alignpipe.tasks import heldout_gold_pairs

    runner, _ = completed_tiny_run
    board = load_leaderboard(runner.run_dir / "leaderboard.json")
    n = runner.recipe.stage("eval").implicit_reward_pairs
    pairs = heldout_gold_pairs(n, 4242, task_space(runner.recipe.data))
    assert board["config"]["implicit_reward_pairs"] == {
        "source": "synthetic", "split": "heldout", "seed": 4242, "labels": "gold", "n": n,
        "sha256": content_key(pairs)[:16]}
    rows = {row["name"]: row["results"] for row in board["checkpoints"]}
    assert "implicit_reward_accuracy" not in rows["sft"]  # the reference: every margin would be 0
    assert board["higher_is_better"]["implicit_reward_accuracy"] is True
    for name in ("base", "dpo"):
        samples = runner.run_dir / "eval" / "samples" / f"{name}.implicit.jsonl"
        margins = [json.loads(line)["margin"] for line in samples.read_text().splitlines()]
        accuracy = rows[name]["implicit_reward_accuracy"]
        assert accuracy["n"] == n == len(margins)
        assert accuracy["value"] == pytest.approx(sum(m > 0 for m in margins) / n)
    assert not (runner.run_dir / "eval" / "samples" / "sft.implicit.jsonl").exists()
    # it moves: 32 DPO steps from SFT rank the better of two responses to unseen prompts first more often than chance
    # (0.65 [0.59, 0.72] of 256 on one CPU; another CPU type trains a little differently, hence the CI's lower end
    # against 0.5) and than the untrained model against the same reference (0.41)
    dpo, base = rows["dpo"]["implicit_reward_accuracy"], rows["base"]["implicit_reward_accuracy"]
    assert dpo["ci95"][0] > 0.5 and dpo["value"] > base["value"]


def test_csv_and_markdown_rank_the_same_rows():
    """A row without the primary metric is listed last and unranked in both renderings (Markdown "–", CSV empty)."""
    from alignpipe.evaluation.leaderboard import render_csv

    unranked = CheckpointResult("no-gold", "ckpts/x", None, {"win_rate_vs_ref": mv(0.5, 0.4, 0.6)})
    lb = build([*results(), unranked])
    markdown = [line.split("|")[1:3] for line in render_markdown(lb).splitlines()[7:7 + len(lb["checkpoints"])]]
    csv_rows = [line.split(",")[:2] for line in render_csv(lb).splitlines()[1:]]
    assert [(rank.strip(), name.strip()) for rank, name in markdown] == [
        ("1", "dpo"), ("2", "sft"), ("3", "base"), ("–", "no-gold")]
    assert csv_rows == [["1", "dpo"], ["2", "sft"], ["3", "base"], ["", "no-gold"]]


def test_one_reward_model_judge_under_two_names_merges_and_two_judges_do_not():
    """A reward-model judge is compared by its identity hash: its id (the directory's name) and the name of the stage
    that trained it do not set apart two copies of it; another hash, or another training source, does."""
    from alignpipe.evaluation.leaderboard import merge_conflicts

    def board(**judge):
        record = {"type": "reward_model", "id": "reward_ensemble:checkpoint", "position_swap": True,
                  "weights_sha256": "a" * 64,
                  "trained_on": {"stage": "rm", "source": "alpaca_eval", "heldout_fraction": 0.2}}
        return {"run": {}, "config": {"judge": {**record, **judge}}}

    renamed = board(id="reward_ensemble:rm-v1", trained_on={"stage": "reward", "source": "alpaca_eval",
                                                            "heldout_fraction": 0.2})
    assert merge_conflicts(board(), renamed) == []
    assert merge_conflicts(board(), board(weights_sha256="b" * 64))[0].startswith("judge (")
    other_source = board(trained_on={"stage": "rm", "source": "hh_rlhf", "heldout_fraction": 0.2})
    assert merge_conflicts(board(), other_source)[0].startswith("judge (")
    unproven = board(id="reward_ensemble:rm-v1", weights_sha256=None)  # an older board: the id is all it has
    assert any(c.startswith("judge weights") for c in merge_conflicts(board(), unproven))
