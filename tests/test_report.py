"""The HTML run report: self-contained, one inlined PNG per section that has data, notes for absent data, flags."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from alignpipe.cli import main
from alignpipe.evaluation.best_of_n import gold_bon, gold_rl, kl_best_of_n
from alignpipe.evaluation.pareto import KLPoint, gold_vs_kl
from alignpipe.evaluation.report import checkpoint_flags, write_report
from alignpipe.evaluation.report_plots import bon_curves, plot_gold_vs_kl, ppo_curve

PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
ALPHA, BETA = 0.3, 0.2  # a Gao RL curve that peaks inside the evaluated range: d* = exp(α/β − 1) ≈ 1.65


def _metric(value, ci=None, n=200, higher=None, **extra):
    return {"value": value, "ci95": ci, "n": n, "higher_is_better": higher, **extra}


def _row(name, gold, win, kl, length, truncation, **more):
    return {"name": name, "path": f"/x/{name}", "weights_sha256": None, "results": {
        "gold_reward": _metric(gold, [gold - 0.05, gold + 0.05], higher=True),
        "win_rate_vs_ref": _metric(win, [win - 0.03, win + 0.03], higher=True, n_wins=100, n_losses=60, n_ties=40),
        "kl_ref_k1": _metric(kl, [kl * 0.9, kl * 1.1]),
        "len_tokens_mean": _metric(length), "len_tokens_median": _metric(length),
        "truncation_rate": _metric(truncation, [0.0, truncation + 0.01], higher=False), **more}}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stage(run: Path, name: str, kind: str, start: str, records=()) -> None:
    _write(run / name / "manifest.json", {"stage": name, "type": kind, "status": "complete",
                                          "start_time": f"2026-01-01T00:{start}:00+00:00", "wall_time_s": 1.5})
    if records:
        _write_jsonl(run / name / "metrics.jsonl", records)


def _ppo_records() -> list[dict]:
    d = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    gold = 0.5 + gold_rl(d, ALPHA, BETA)
    train = [{"step": s, "reward/proxy": 0.6 + 0.02 * s, "reward/gold": 0.5 + 0.01 * s, "kl": 0.6 * s}
             for s in range(1, 11)]
    evals = [{"eval_step": 2 * i, "gold_reward": g, "gold_reward_ci95": [g - 0.04, g + 0.04],
              "proxy_reward": 0.6 + 0.3 * x, "kl": x * x, "sqrt_kl": x} for i, (x, g) in enumerate(zip(d, gold))]
    return [evals[0], *train[:5], evals[1], *train[5:], *evals[2:]]


def _bon() -> dict:
    ns = [1, 2, 4, 8, 16, 32]
    d = [math.sqrt(k) for k in kl_best_of_n(ns)]
    gold = (0.4 + gold_bon(d, 0.2, 0.1)).tolist()
    return {"selection": "mean", "ns": ns, "kl_bon": [x * x for x in d], "sqrt_kl": d, "n_prompts": 8, "n_samples": 32,
            "curves": {"mean": {"gold": gold, "gold_ci95": [[g - 0.05, g + 0.05] for g in gold],
                                "proxy": [0.5 + 0.2 * x for x in d], "proxy_ci95": None}}}


def _leaderboard() -> dict:
    return {"schema_version": "1.0", "run": {"name": "fake", "reference": "sft"},
            "suite": {"name": "synthetic", "primary_metric": "gold_reward"}, "config": {},
            "checkpoints": [
                _row("dpo", 0.9, 0.62, 12.5, 9.0, 0.01,
                     lc_win_rate_vs_ref=_metric(0.35, [0.3, 0.4], higher=True)),
                _row("ppo", 0.8, 0.58, 3.0, 30.0, 0.12),
                _row("sft", 0.7, 0.5, 0.0, 8.0, 0.0)],
            "reward_models": [],
            "higher_is_better": {"gold_reward": True, "win_rate_vs_ref": True, "kl_ref_k1": None,
                                 "len_tokens_mean": None, "len_tokens_median": None, "truncation_rate": False,
                                 "lc_win_rate_vs_ref": True},
            "env": {}, "date": "2026-01-01T00:00:00+00:00"}


@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A run with a leaderboard, an SFT stage's loss log, a PPO stage with held-out evaluations and a bon.json."""
    run = tmp_path / "fake"
    _write(run / "run.json", {"run": "fake", "recipe_path": "recipes/fake.yaml", "recipe_sha256": "ab" * 32,
                              "git_sha": "c0ffee" * 6 + "abcd"})
    _write(run / "leaderboard.json", _leaderboard())
    _stage(run, "sft", "sft", "01", [{"step": s, "loss": 3.0 / s, "mean_token_accuracy": 0.1 * s} for s in range(1, 8)])
    _stage(run, "ppo", "ppo", "02", _ppo_records())
    _stage(run, "bon", "bon", "03")
    _write(run / "bon" / "bon.json", _bon())
    return run


@pytest.fixture
def header_run(fake_run) -> Path:
    """``fake_run`` without the data its sections draw (the leaderboard, the stages' logs, bon.json), its run.json and
    stage manifests kept: for the tests of what the header says (how the last attempt ended, each stage's status),
    which only run.json and the manifests decide. Its report draws no figure (~1 s each on 2 busy cores)."""
    (fake_run / "leaderboard.json").unlink()
    for data in [*fake_run.glob("*/metrics.jsonl"), *fake_run.glob("*/bon.json")]:
        data.unlink()
    return fake_run


def _sections(text: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', text, flags=re.S))


def test_report_says_how_the_runs_last_attempt_ended(header_run):
    record = json.loads((header_run / "run.json").read_text())
    assert "last attempt" not in write_report(header_run).read_text()  # a record from before run.json said
    _write(header_run / "run.json", {**record, "status": "interrupted", "stopped_at": "dpo",
                                     "updated": "2026-01-02T00:00:00+00:00"})
    text = write_report(header_run).read_text()
    assert "interrupted at stage &#x27;dpo&#x27; (2026-01-02T00:00:00+00:00)" in text
    assert "did not finish: stage &#x27;dpo&#x27; and those after it" in text
    _write(header_run / "run.json", {**record, "status": "running", "started": "2026-01-01T00:00:00+00:00"})
    text = write_report(header_run, writing_stage="eval").read_text()
    assert "running since 2026-01-01T00:00:00+00:00 (this report was written by its stage &#x27;eval&#x27;)" in text
    assert "did not finish" not in text
    _write(header_run / "run.json", {**record, "status": "complete", "updated": "2026-01-03T00:00:00+00:00"})
    assert "complete (2026-01-03T00:00:00+00:00)" in write_report(header_run).read_text()
    _write(header_run / "run.json", {**record, "status": "failed", "stopped_at": "base"})
    text = write_report(header_run).read_text()
    assert "failed while preparing the recipe&#x27;s model" in text and "did not finish: every stage" in text


def test_report_tells_a_killed_run_from_a_running_one_by_the_run_directorys_lock(header_run):
    """A run killed with SIGKILL (or lost with its machine) cannot record its end: run.json still says running."""
    from alignpipe.pipeline.run_lock import run_lock

    record = json.loads((header_run / "run.json").read_text())
    _write(header_run / "run.json", {**record, "status": "running", "started": "2026-01-01T00:00:00+00:00"})
    with run_lock(header_run):  # a live run
        text = write_report(header_run).read_text()
    assert "running since 2026-01-01T00:00:00+00:00" in text and "did not finish" not in text
    text = write_report(header_run).read_text()  # nothing holds it any more
    assert "stopped without recording its end (killed, or its machine went down)" in text
    assert "did not finish: the stages not marked complete above and those after them" in text


def test_report_is_self_contained_with_a_png_per_section_that_has_data(fake_run):
    path = write_report(fake_run)
    assert path == fake_run / "report.html"
    text = path.read_text()
    for forbidden in ("http://", "https://", 'src="file', "<script", "<link", "url("):
        assert forbidden not in text
    assert len(re.findall(r'src="', text)) == len(PNG.findall(text))  # every src is an inlined PNG
    for payload in PNG.findall(text):
        assert base64.b64decode(payload).startswith(b"\x89PNG\r\n\x1a\n")
    sections = _sections(text)
    assert list(sections) == ["leaderboard", "overoptimisation", "pareto", "length", "reward-models", "training"]
    counts = {name: len(PNG.findall(body)) for name, body in sections.items()}
    # leaderboard: a table; over-optimisation: PPO + BoN; pareto and length: one scatter each; no reward model;
    # sft + ppo curves
    assert counts == {"leaderboard": 0, "overoptimisation": 2, "pareto": 1, "length": 1, "reward-models": 0,
                      "training": 2}
    assert "recipes/fake.yaml" in text and "ab" * 32 in text and "c0ffee" in text
    assert not list(fake_run.glob(".report.html.*"))  # the atomic write left no temp file


def test_rows_are_flagged_for_truncation_kl_budget_and_lc_gap(fake_run):
    section = _sections(write_report(fake_run).read_text())["leaderboard"]
    table = section.split("<details")[0]  # the ranked table, not the all-metrics one
    rows = {re.search(r'<td class="l">\d+</td><td class="l">(\w+)</td>', r).group(1): r  # rank, checkpoint
            for r in re.findall(r"<tr[^>]*>.*?</tr>", table, flags=re.S) if "<td" in r}
    assert 'class="flagged"' in rows["ppo"] and "truncation 12.0% &gt; 5%" in rows["ppo"]
    assert "KL (k1 12.5) &gt; budget 10 nats" in rows["dpo"] and "LC/raw gap -27.0 points" in rows["dpo"]
    assert "dpo: LC/raw disagreement: length-controlled win rate 35.0%" in section  # the full warning, below
    assert "flag" not in rows["sft"].replace('class="l"', "")
    assert "35.0% [30.0, 40.0]" in rows["dpo"]  # the LC column
    relaxed = _sections(write_report(fake_run, kl_budget=20.0).read_text())["leaderboard"]
    assert "budget 20 nats" not in relaxed and "KL (k1 or k3) &gt; 20 nats" in relaxed


def test_absent_sections_are_skipped_with_a_note(tmp_path):
    run = tmp_path / "bare"
    _stage(run, "sft", "sft", "01", [{"step": s, "loss": 1.0 / s} for s in range(1, 5)])
    sections = _sections(write_report(run).read_text())
    assert "No leaderboard.json" in sections["leaderboard"]
    assert "No PPO stage" in sections["overoptimisation"] and "No best-of-n stage" in sections["overoptimisation"]
    assert "No leaderboard.json" in sections["length"] and "No leaderboard.json" in sections["pareto"]
    assert "No reward model" in sections["reward-models"]
    assert len(PNG.findall(sections["training"])) == 1
    assert sum(len(PNG.findall(body)) for body in sections.values()) == 1


def test_pareto_section_lists_the_frontier_and_names_what_it_leaves_out(fake_run):
    board = _leaderboard()
    board["checkpoints"] += [_row("bad", 0.6, 0.45, 5.0, 9.0, 0.0),  # more KL than ppo for less gold: dominated
                             _row("noisy", 0.55, 0.5, -0.02, 8.0, 0.0),  # k1 < 0: compared at 0, so sft beats it
                             {"name": "judged", "path": "/x/judged", "weights_sha256": None,
                              "results": {"gold_reward": _metric(0.95)}}]  # no KL: left out, and said so
    board["checkpoints"][1]["results"]["proxy_reward"] = _metric(1.2, [1.1, 1.3])
    _write(fake_run / "leaderboard.json", board)
    section = _sections(write_report(fake_run).read_text())["pareto"]
    assert len(PNG.findall(section)) == 1 and "could not be drawn" not in section
    table = section.split("</table>")[0]
    assert re.findall(r'<td class="l">([\w-]+)</td>', table) == ["sft", "ppo", "dpo"]  # by increasing KL
    assert "proxy_reward [95% CI]" in table and "1.20 [1.10, 1.30]" in table
    assert "3 of the 5 checkpoints placed" in section
    assert "below 0 (Monte-Carlo noise; true KL is never negative) for noisy" in section
    assert "Not placed (no value of gold_reward and kl_ref_k1): judged." in section

    for row in board["checkpoints"]:
        row["results"].pop("kl_ref_k1", None)
    _write(fake_run / "leaderboard.json", board)
    section = _sections(write_report(fake_run).read_text())["pareto"]
    assert not PNG.findall(section) and "No checkpoint has both gold_reward and kl_ref_k1" in section


def test_gold_vs_kl_plot_of_one_board_and_of_a_merged_one(tmp_path):
    from alignpipe.evaluation.leaderboard import merge_leaderboards, write_leaderboard

    one = gold_vs_kl(_leaderboard())
    assert plot_gold_vs_kl(one.points).startswith(b"\x89PNG")
    paths = [write_leaderboard({**_leaderboard(), "run": {"name": name, "reference": "sft"}}, tmp_path / name)[0]
             for name in ("a", "b")]
    merged = gold_vs_kl(merge_leaderboards(paths))
    assert {p.run for p in merged.points} == {"a", "b"} and len(merged.points) == 6
    assert plot_gold_vs_kl(merged.points, merged.reward_metric, ["a", "b"]).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="no checkpoint"):
        plot_gold_vs_kl([])


@pytest.mark.parametrize("name", ["cost$_{x$", "lr=$5e-6$"])
def test_plots_draw_names_with_dollar_signs_as_text(name):
    """matplotlib read a `$` in a checkpoint name as mathtext: an odd one raised and lost the plot (and, in
    `alignpipe leaderboard --plots`, every file), a pair was drawn as maths."""
    from matplotlib.text import Text

    from alignpipe.evaluation.report_plots import LengthPoint, plot_win_rate_vs_length

    drawn_texts = []
    original = Text.draw

    def recording_draw(self, renderer):
        drawn_texts.append((self.get_text(), self.get_parse_math()))
        return original(self, renderer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Text, "draw", recording_draw)
        assert plot_gold_vs_kl([KLPoint(name, 0.5, 1.0, (0.9, 1.1)), KLPoint("sft", 0.1, 0.8)]).startswith(b"\x89PNG")
        assert plot_win_rate_vs_length([LengthPoint(name, 20.0, 0.6, (0.5, 0.7), 0.55)]).startswith(b"\x89PNG")
    named = [parse_math for text, parse_math in drawn_texts if name in text]
    assert named and not any(named)


def test_reward_section_draws_a_reliability_diagram_only_from_stored_bins(fake_run):
    metrics = {"accuracy": _metric(0.6, [0.55, 0.65], n=300, higher=True),
               "ece": _metric(0.05, [0.03, 0.08], n=300, higher=False, bins=15, mce=0.2, mean_confidence=0.62,
                              accuracy=0.6)}
    _stage(fake_run, "reward", "reward", "04", [{"step": 10, "loss": 0.7}, {"step": 20, "loss": 0.6}])
    _write(fake_run / "reward" / "reward_eval.json", {"heldout_pairs": 300, "metrics": metrics})
    body = _sections(write_report(fake_run).read_text())["reward-models"]
    assert not PNG.findall(body) and "needs per-bin counts or per-pair predictions" in body and "0.0500" in body

    metrics["ece"]["reliability"] = [{"lo": i / 10, "hi": (i + 1) / 10, "count": 30 * (i >= 5),
                                      "mean_confidence": 0.05 + i / 10 if i >= 5 else None,
                                      "accuracy": 0.1 * i if i >= 5 else None} for i in range(10)]
    _write(fake_run / "reward" / "reward_eval.json", {"heldout_pairs": 300, "metrics": metrics})
    body = _sections(write_report(fake_run).read_text())["reward-models"]
    assert len(PNG.findall(body)) == 1


def test_reward_section_shows_every_reward_column_of_the_leaderboard_with_its_own_n(fake_run):
    """The report's reward table has the leaderboard's columns (it had drifted and dropped five), and a metric
    counted over other items than the held-out pairs says how many."""
    from alignpipe.evaluation.leaderboard import REWARD_COLUMNS

    metrics = {name: _metric(0.5, [0.4, 0.6], n=300, higher=True) for name in REWARD_COLUMNS}
    metrics["label_gold_agreement"] = _metric(0.92, [0.9, 0.94], n=285, higher=None)
    _stage(fake_run, "reward", "reward", "04", [{"step": 10, "loss": 0.7}])
    _write(fake_run / "reward" / "reward_eval.json", {"heldout_pairs": 300, "metrics": metrics})
    body = _sections(write_report(fake_run).read_text())["reward-models"]
    header = body.split("</tr>")[0]
    assert all(name.replace("_", "_<wbr>") in header for name in REWARD_COLUMNS)
    assert body.count("(n=285)") == 1 and "(n=300)" not in body


def test_fits_recover_the_gao_coefficients_relative_to_d_zero():
    curve = ppo_curve("ppo", [r for r in _ppo_records() if "eval_step" in r])
    assert curve.gold[0] == 0.0 and curve.d[0] == 0.0
    assert curve.fit.alpha == pytest.approx(ALPHA) and curve.fit.beta == pytest.approx(BETA)
    assert curve.fit.peak_d == pytest.approx(math.exp(ALPHA / BETA - 1))
    (bon,) = bon_curves(_bon())
    assert bon.fit.alpha == pytest.approx(0.2) and bon.fit.beta == pytest.approx(0.1)
    assert bon.fit.peak_d == pytest.approx(1.0)
    short = ppo_curve("short", [r for r in _ppo_records() if "eval_step" in r][:3])  # 2 points with d > 0
    assert short.fit is None and "2 points" in short.fit_note
    evals = [r for r in _ppo_records() if "eval_step" in r][:4]
    evals[2] = {**evals[2], "sqrt_kl": evals[1]["sqrt_kl"], "kl": evals[1]["kl"]}  # 3 points, 2 distinct d > 0
    repeated = ppo_curve("repeated", evals)
    assert repeated.fit is None and "2 points with distinct d > 0" in repeated.fit_note


def _penalised(records: list[dict], **named) -> list[dict]:
    """PPO records whose penalised reward is the proxy minus 0.2·d² at each evaluation (0.2·KL per iteration)."""
    out = []
    for r in records:
        if "eval_step" in r:
            r = {**r, "penalised_reward": r["proxy_reward"] - 0.2 * r["kl"], **named}
        elif "reward/proxy" in r:
            r = {**r, "reward/penalised": r["reward/proxy"] - 0.2 * r["kl"]}
        out.append(r)
    return out


def test_overoptimisation_panel_shows_the_penalised_reward_the_stage_optimised(fake_run):
    """A PPO stage with an uncertainty penalty optimises the penalised reward: the panel's proxy is that reward,
    named by its penalty, with the raw ensemble mean beside it."""
    records = _penalised(_ppo_records(), reward_penalty="mean_minus_std", reward_penalty_coef=1.0)
    _stage(fake_run, "ppo", "ppo", "02", records)
    section = _sections(write_report(fake_run).read_text())["overoptimisation"]
    row = next(r for r in re.findall(r"<tr>.*?</tr>", section, flags=re.S) if '<td class="l">ppo</td>' in r)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[4:7] == ["mean_minus_std (coef 1)", "-0.500", "0.750"]  # at d = 2.5: 0.75 − 1.25, and 0.75
    assert "last raw-mean gain" in section and "could not be drawn" not in section
    curve = ppo_curve("ppo", [r for r in records if "eval_step" in r])
    d = np.array(curve.d)
    assert curve.proxy_name == "mean_minus_std (coef 1)"
    np.testing.assert_allclose(curve.proxy, 0.3 * d - 0.2 * d**2, atol=1e-12)  # proxy 0.6 + 0.3d, minus 0.2d²
    np.testing.assert_allclose(curve.raw_proxy, 0.3 * d, atol=1e-12)

    unnamed = ppo_curve("old", [r for r in _penalised(_ppo_records()) if "eval_step" in r])
    assert unnamed.proxy_name == "penalised reward" and unnamed.raw_proxy is not None
    plain = ppo_curve("mean", [r for r in _penalised(_ppo_records(), reward_penalty="mean") if "eval_step" in r])
    assert plain.proxy_name == "proxy" and plain.raw_proxy is None
    np.testing.assert_allclose(plain.proxy, 0.3 * d, atol=1e-12)


def test_best_of_n_by_the_penalised_reward_shows_that_reward():
    bon = _bon()
    mean = bon["curves"]["mean"]
    penalised = [p - 0.1 * x for p, x in zip(mean["proxy"], bon["sqrt_kl"])]
    bon.update(selection="penalised", reward={"source": "model", "penalty": "min", "penalty_coef": 0.0},
               curves={"penalised": {**mean, "penalised": penalised}, "mean": mean})
    by_penalised, by_mean = bon_curves(bon)
    d = np.array(bon["sqrt_kl"])
    assert by_penalised.proxy_name == "min" and by_mean.proxy_name == "proxy" and by_mean.raw_proxy is None
    np.testing.assert_allclose(by_penalised.proxy, 0.1 * d - 0.1 * d[0], atol=1e-12)  # 0.2d − 0.1d over n = 1
    np.testing.assert_allclose(by_penalised.raw_proxy, 0.2 * (d - d[0]), atol=1e-12)
    np.testing.assert_allclose(by_mean.proxy, 0.2 * (d - d[0]), atol=1e-12)


def test_checkpoint_flags_accept_k3_only_and_the_schema_lc_name():
    results = {"kl_ref_k3": {"value": 11.0}, "win_rate_vs_ref": {"value": 0.5}, "lc_win_rate": {"value": 0.52}}
    assert checkpoint_flags(results) == ["KL (k3 11) > budget 10 nats"]
    results["lc_win_rate"] = {"value": 0.9}
    assert checkpoint_flags(results, kl_budget=20)[0].startswith("LC/raw disagreement")


def test_report_of_a_one_prompt_evaluation_without_an_lc_win_rate(tmp_path):
    """A one-prompt evaluation has no LC win rate (its length GLM needs two prompts): the report draws every section
    and says the LC win rate is missing, instead of failing a section."""
    from alignpipe.evaluation.generation import Generation
    from alignpipe.evaluation.harness import Checkpoint, CheckpointSamples, checkpoint_metrics
    from alignpipe.evaluation.leaderboard import CheckpointResult, build_leaderboard, write_leaderboard

    samples = CheckpointSamples(Checkpoint("dpo", "x"), [Generation("p", "a b c", (1, 2, 3), False)], [0.7],
                                [[-1.0, -1.0, -1.0]], [[-1.5, -1.0, -1.5]], [1.0], [5])
    metrics = checkpoint_metrics(samples, bootstrap_resamples=50, seed=0)
    run = tmp_path / "one"
    write_leaderboard(build_leaderboard([CheckpointResult("dpo", "x", None, metrics)], run={"name": "one"},
                                        config={}, env={}, suite="synthetic", primary_metric="gold_reward"), run)
    sections = _sections(write_report(run).read_text())
    assert not any("could not be drawn" in body for body in sections.values())
    assert "No length-controlled win rate" in sections["length"] and "dpo" in sections["leaderboard"]


def test_cli_report_command(fake_run, tmp_path, capsys):
    assert main(["report", str(fake_run), "--kl-budget", "5"]) == 0
    assert str(fake_run / "report.html") in capsys.readouterr().out
    assert "budget 5 nats" in (fake_run / "report.html").read_text()
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "elsewhere").mkdir()  # a directory of something else: no empty report.html written into it
    assert main(["report", str(tmp_path / "elsewhere")]) == 2
    assert "not a run directory (it has neither run.json nor leaderboard.json)" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere" / "report.html").exists()


QUICKSTART = REPO / "runs" / "quickstart"


@pytest.mark.skipif(not (QUICKSTART / "leaderboard.json").exists(), reason="no runs/quickstart in this checkout")
def test_report_of_a_copy_of_the_quickstart_run(tmp_path):
    run = tmp_path / "quickstart"
    shutil.copytree(QUICKSTART, run, ignore=shutil.ignore_patterns(
        "checkpoint", "checkpoint.tmp", "trainer", "rounds", "samples", "report.html", "*.safetensors", "*.bin"))
    sections = _sections(write_report(run).read_text())
    board = json.loads((run / "leaderboard.json").read_text())
    for row in board["checkpoints"]:
        assert f'<td class="l">{row["name"]}</td>' in sections["leaderboard"]
    stages = [p.parent.name for p in run.glob("*/metrics.jsonl")]
    assert len(PNG.findall(sections["training"])) == len(stages)
    assert len(PNG.findall(sections["length"])) == 1
    if any(p.parent.name for p in run.glob("*/metrics.jsonl") if '"eval_step"' in p.read_text()):
        assert PNG.findall(sections["overoptimisation"])
    assert "could not be drawn" not in "".join(sections.values())


def _chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary")
def test_headless_chromium_renders_the_report(fake_run, tmp_path):
    report = write_report(fake_run)
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert shot.exists() and shot.read_bytes().startswith(b"\x89PNG")
    # Page problems (failed loads, script errors) are logged as ERROR/FATAL or CONSOLE lines; a container without a
    # system D-Bus adds ERROR lines from dbus/ that say nothing about the page.
    problems = [line for line in proc.stderr.splitlines()
                if re.search(r":(ERROR|FATAL):|CONSOLE", line) and "dbus/" not in line]
    assert not problems, "\n".join(problems)


def test_the_stage_writing_the_report_is_not_shown_as_running(header_run):
    _write(header_run / "eval" / "manifest.json", {"stage": "eval", "type": "eval", "status": "running",
                                                   "start_time": "2026-01-01T00:09:00+00:00"})
    assert ">running</td>" in write_report(header_run).read_text()
    text = write_report(header_run, writing_stage="eval").read_text()
    assert ">running</td>" not in text and "finishing (wrote this report)" in text
