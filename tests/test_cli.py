"""The command line: --help texts, validate exit codes and messages, and one real end-to-end run via subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, TINY_RECIPE, write_recipe

from alignpipe.cli import main
from alignpipe.recipe import load_recipe


@pytest.mark.parametrize("argv, expected", [
    (["--help"], "Staged RLHF"),
    (["run", "--help"], "--resume"),
    (["validate", "--help"], "without loading any weights"),
    (["validate", "--help"], "a local file's rows"),  # not only the recipe: the preflight checks too
    (["eval", "--help"], "held-out prompts"),
    (["leaderboard", "--help"], "gold_vs_kl.png"),
])
def test_help_explains_each_command(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_validate_accepts_the_quickstart(capsys):
    assert main(["validate", str(REPO / "recipes" / "quickstart.yaml")]) == 0
    assert "sft(sft) -> reward(reward) -> dpo(dpo) -> osp(osp) -> ppo(ppo) -> eval(eval)" in capsys.readouterr().out


def test_validate_rejects_a_bad_override_naming_file_and_key(tiny_recipe_path, capsys):
    assert main(["validate", str(tiny_recipe_path), "stages.dpo.betta=0.2"]) == 2
    err = capsys.readouterr().err
    assert str(tiny_recipe_path) in err and "stages.dpo.betta" in err and "did you mean 'beta'" in err


def test_overrides_may_follow_options(tiny_recipe_path, capsys):
    assert main(["validate", str(tiny_recipe_path), "--print", "stages.dpo.beta=0.25"]) == 0
    printed = capsys.readouterr()
    assert "beta: 0.25" in printed.out and "valid recipe" in printed.err
    # the printed recipe is one, and loads as the same recipe (the verdict went to stderr)
    resolved = tiny_recipe_path.parent / "resolved.yaml"
    resolved.write_text(printed.out)
    assert load_recipe(resolved) == load_recipe(tiny_recipe_path, ["stages.dpo.beta=0.25"])


def test_run_end_to_end_through_stage_processes(tmp_path, monkeypatch, caplog):
    """The real path: `alignpipe run` launching pipelines/<type>.py processes (sft, then an eval of the checkpoint
    that process published), then a second run that skips all, launching nothing. (DPO's own stage process runs
    through the same command line in tests/test_fault_injection.py and tests/test_distributed.py.)"""
    import logging

    from alignpipe.pipeline.runner import Runner

    recipe = {**TINY_RECIPE, "stages": [
        {**TINY_RECIPE["stages"][0], "max_steps": 4, "save_steps": 4},
        {**TINY_RECIPE["stages"][2], "inputs": ["sft"], "n_prompts": 8},
    ]}
    recipe_path = write_recipe(tmp_path, recipe)
    argv = ["run", str(recipe_path), "--runs-dir", str(tmp_path / "runs")]
    first = subprocess.run([sys.executable, "-m", "alignpipe.cli", *argv], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pipelines/sft.py" in first.stderr and "pipelines/eval.py" in first.stderr
    board = json.loads((tmp_path / "runs" / "tiny" / "leaderboard.json").read_text())
    assert board["schema_version"] == "1.0" and sorted(c["name"] for c in board["checkpoints"]) == ["base", "sft"]

    def launch(*args, **kwargs):
        raise AssertionError("the second run launched a stage")

    monkeypatch.setattr(Runner, "_spawn", launch)  # the command's own code, in this process: only a launch would differ
    with caplog.at_level(logging.INFO, logger="alignpipe"):
        assert main(argv) == 0
    for stage in ("sft", "eval"):
        assert f"[{stage}] skipped in 0.0s (complete with the same config and inputs)" in caplog.text


@pytest.fixture
def two_boards(tmp_path):
    """Two runs' leaderboard directories, ready to merge."""
    from test_leaderboard import build

    from alignpipe.evaluation.leaderboard import write_leaderboard

    board = build()
    for name in ("a", "b"):
        write_leaderboard({**board, "run": {**board["run"], "name": name}}, tmp_path / name)
    return tmp_path / "a", tmp_path / "b"


def test_mistyped_paths_are_one_line_errors_before_any_work(llama_path, two_boards, tmp_path, monkeypatch, capsys):
    """A typo in a later checkpoint path, a file where a directory goes, a recipe that is not UTF-8: exit code 2 and a
    line naming the path, before a model is loaded (they were tracebacks, some after the first checkpoint's samples)."""
    import alignpipe.evaluation.harness as harness

    def fail(*a, **k):
        raise AssertionError("sampled before checking the command line")

    monkeypatch.setattr(harness, "generate", fail)
    monkeypatch.setattr(harness, "load_causal_lm", fail)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    typo = str(tmp_path / "runs" / "tiny" / "sft" / "chekpoint")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    for argv, expected in (
        (["eval", llama_path, typo, *cache], f"no checkpoint at {typo}"),
        (["eval", llama_path, "--cache-dir", str(a_file)], f"--cache-dir {a_file} is a file"),
        (["eval", llama_path, "--out", str(a_file), *cache], f"--out {a_file} is a file"),
        (["leaderboard", *map(str, two_boards), "--out", str(a_file)], f"--out {a_file} is a file"),
        (["run", str(REPO / "recipes" / "quickstart.yaml"), "--runs-dir", str(a_file)],
         f"--runs-dir {a_file} is a file"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    for option, value, expected in (("--seed", "-5", "expected a whole number in [0, 2147483647], got '-5'"),
                                    ("--n-prompts", "0", "expected a whole number >= 1, got '0'")):
        with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before any work
            main(["eval", llama_path, option, value, *cache])
        assert exit_.value.code == 2 and f"argument {option}: {expected}" in capsys.readouterr().err
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \x92tiny\n")
    assert main(["validate", str(binary)]) == 2
    assert f"{binary}: not UTF-8 text (byte 0x92 at offset 6); save it as UTF-8" in capsys.readouterr().err


def test_ctrl_c_during_a_run_is_a_one_line_stop_with_exit_code_130(tiny_recipe_path, tmp_path, monkeypatch,
                                                                     capsys):
    """Ctrl-C ends like SIGTERM: the runner marks the stage interrupted; the command says so (it was a traceback),
    naming the stage, or saying that none was running (a stop during the preflight said a stage was stopped)."""
    from alignpipe.pipeline import runner as runner_module
    from alignpipe.pipeline.runner import Runner

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "run", interrupted)
    assert main(["run", str(tiny_recipe_path), "--runs-dir", str(tmp_path / "runs")]) == 130
    assert capsys.readouterr().err.strip() == ("stopped: interrupted (Ctrl-C) while no stage was running; the stages "
                                               "already complete are kept")

    def interrupted_in_sft(command, env, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.undo()
    monkeypatch.setattr(runner_module, "run_watched", interrupted_in_sft)
    assert main(["run", str(tiny_recipe_path), "--runs-dir", str(tmp_path / "runs")]) == 130
    assert capsys.readouterr().err.strip().endswith(
        "stopped: interrupted (Ctrl-C); stage 'sft' was stopped and marked interrupted (add --resume to continue it)")
    manifest = json.loads((tmp_path / "runs" / "tiny" / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"


def test_only_a_stop_names_the_stage_it_stopped():
    """A stage that failed is not named by a stop that comes after it (between stages, nothing runs)."""
    from types import SimpleNamespace

    from alignpipe.pipeline.runner import Runner

    runner = SimpleNamespace(stopped_stage=None)
    with pytest.raises(RuntimeError), Runner._stopping(runner, "sft"):
        raise RuntimeError("the stage failed")
    assert runner.stopped_stage is None
    with pytest.raises(KeyboardInterrupt), Runner._stopping(runner, "dpo"):
        raise KeyboardInterrupt
    assert runner.stopped_stage == "dpo"
    with Runner._stopping(runner, "osp"):
        pass
    assert runner.stopped_stage is None


def test_unreadable_and_unwritable_files_are_one_line_errors(tmp_path, monkeypatch, capsys):
    """OSError and UnicodeDecodeError from the non-run commands: what went wrong and where, exit code 2. A run's own
    files that are not UTF-8 are listed in the report, as any damaged one, and do not stop it."""
    import alignpipe.evaluation.report as report

    (tmp_path / "run.json").write_bytes(b'{"name": "\xff"}')
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_bytes(b'{"loss": 1}\n\xfe\n')
    assert main(["report", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert f"run.json in {tmp_path.name}: not UTF-8 text (byte 0xff at offset 10)" in page
    assert "metrics.jsonl in sft: not UTF-8 text (byte 0xfe at offset 12)" in page

    # a leaderboard or a suite file given that is not UTF-8 is named, with the byte (the codec's words named none)
    (tmp_path / "board").mkdir()
    (tmp_path / "board" / "leaderboard.json").write_bytes(b'{"name": "\xff"}')
    (tmp_path / "suite.yaml").write_bytes(b"name: x\nseed: \xfe\n")
    assert main(["leaderboard", str(tmp_path / "board"), "--out", str(tmp_path / "merged")]) == 2
    assert f"{tmp_path / 'board' / 'leaderboard.json'}: not UTF-8 text (byte 0xff at offset 10)" in \
        capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--suite", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "e")]) == 2
    assert f"suite file {tmp_path / 'suite.yaml'}: not UTF-8 text (byte 0xfe at offset 14)" in capsys.readouterr().err

    def not_utf8(*a, **k):
        raise UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte")

    monkeypatch.setattr(report, "write_report", not_utf8)
    assert main(["report", str(tmp_path)]) == 2
    assert "is not UTF-8 text (byte 0xff at offset 2)" in capsys.readouterr().err

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "report.html"))

    monkeypatch.setattr(report, "write_report", denied)
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'report.html'}: Permission denied; check the paths given "
                                       "on the command line\n")


def test_leaderboard_refuses_to_write_over_a_source(two_boards, capsys):
    """`--out A` with A among the sources replaced run A's own leaderboard (its eval stage's record) with the merge."""
    a, b = two_boards
    recorded = (a / "leaderboard.json").read_bytes()
    for out in (a, a / ".." / "a"):
        assert main(["leaderboard", str(a), str(b / "leaderboard.json"), "--out", str(out)]) == 2
        assert f"--out {out} holds one of the leaderboards being merged" in capsys.readouterr().err
    assert main(["leaderboard", str(a), str(b / "leaderboard.json"), "--out", str(b)]) == 2
    assert (a / "leaderboard.json").read_bytes() == recorded
    assert main(["leaderboard", str(a), str(b), "--out", str(a.parent / "merged")]) == 0


def test_leaderboard_plots_are_written_beside_the_merge(two_boards, tmp_path, caplog, monkeypatch):
    """--plots: gold_vs_kl.png and win_rate_vs_length.png in --out, written with the tables all or none, and a log
    line for each file written, each plot skipped and each set of rows a plot leaves out."""
    import logging

    a, b = two_boards
    out = tmp_path / "merged"
    with caplog.at_level(logging.INFO, logger="alignpipe"):
        assert main(["leaderboard", str(a), str(b), "--out", str(out), "--plots"]) == 0
    for name in ("gold_vs_kl.png", "win_rate_vs_length.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG") and f"wrote {out / name}" in caplog.text
    assert not list(out.glob(".*.tmp"))  # the atomic write left no temp file
    # only dpo has a win rate and a length in these boards
    assert "win_rate_vs_length.png: Not placed (no value of win_rate_vs_ref and len_tokens_mean): a/sft" in caplog.text

    before = {path.name: path.read_bytes() for path in out.iterdir()}
    fsync, calls = os.fsync, []

    def failing_on_the_last_file(fd):  # a full disk while the last plot is flushed
        calls.append(fd)
        if len(calls) == len(before):
            raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr("alignpipe.io.os.fsync", failing_on_the_last_file)
    board = json.loads((b / "leaderboard.json").read_text())
    board["checkpoints"][0]["results"]["gold_reward"]["value"] += 1  # the merge would write other numbers
    (b / "leaderboard.json").write_text(json.dumps(board))
    assert main(["leaderboard", str(a), str(b), "--out", str(out), "--plots"]) != 0
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # tables and plots: all old
    monkeypatch.setattr("alignpipe.io.os.fsync", fsync)

    for run in (a, b):  # boards without KL: no frontier to draw, and the earlier merge's plot goes
        board = json.loads((run / "leaderboard.json").read_text())
        for row in board["checkpoints"]:
            row["results"].pop("kl_ref_k1")
        board["higher_is_better"].pop("kl_ref_k1")
        (run / "leaderboard.json").write_text(json.dumps(board))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignpipe"):
        assert main(["leaderboard", str(a), str(b), "--out", str(out), "--plots"]) == 0
    assert "gold_vs_kl.png not drawn: no checkpoint has both gold_reward and kl_ref_k1" in caplog.text
    assert not (out / "gold_vs_kl.png").exists() and f"removed {out / 'gold_vs_kl.png'}" in caplog.text
    assert (out / "win_rate_vs_length.png").exists()
    assert main(["leaderboard", str(a), str(b), "--out", str(tmp_path / "plain")]) == 0
    assert not list((tmp_path / "plain").glob("*.png"))  # no --plots, no plots
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignpipe"):  # a merge without --plots into the plots' directory
        assert main(["leaderboard", str(a), str(b), "--out", str(out)]) == 0
    assert not list(out.glob("*.png")) and f"removed {out / 'win_rate_vs_length.png'}" in caplog.text
    mine = tmp_path / "mine"  # PNGs of those names in a directory no merge wrote to are the user's: left alone
    mine.mkdir()
    (mine / "gold_vs_kl.png").write_bytes(b"mine")
    (mine / "win_rate_vs_length.png").mkdir()
    assert main(["leaderboard", str(a), str(b), "--out", str(mine)]) == 0
    assert (mine / "gold_vs_kl.png").read_bytes() == b"mine" and (mine / "win_rate_vs_length.png").is_dir()


def test_a_run_stopped_by_a_hangup_exits_129_even_when_its_terminal_is_gone(tiny_recipe_path, tmp_path, monkeypatch):
    """After SIGHUP the terminal may be gone: the closing message raised OSError (exit 1 and a traceback)."""
    import signal

    from alignpipe.pipeline.runner import Runner
    from alignpipe.pipeline.watched import Terminated

    class GoneTerminal:
        def write(self, text):
            raise OSError(5, "Input/output error")

        def flush(self):
            pass

    def hung_up(self):
        raise Terminated(signal.SIGHUP)

    monkeypatch.setattr(Runner, "run", hung_up)
    monkeypatch.setattr(sys, "stderr", GoneTerminal())
    assert main(["run", str(tiny_recipe_path), "--runs-dir", str(tmp_path / "runs")]) == 128 + signal.SIGHUP
