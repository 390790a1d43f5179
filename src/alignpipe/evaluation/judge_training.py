"""Which of a policy suite's prompts its reward-model judge never trained on.

A reward stage trains on the prompts of its dataset that :func:`~alignpipe.data.preference.is_reward_heldout`
rejects and holds out the rest. A judge asked about instructions it was trained on agrees with its training labels
more than it would on new ones, so a suite judged by it reports inflated win rates. The ``alpaca-eval`` suite and
``recipes/alpaca-eval/reward-ensemble.yaml`` share AlpacaEval's 805 instructions, so when the judge's reward stage
trained on ``alpaca_eval`` data the suite keeps only the instructions that stage held out. The split is a hash of the
instruction and the stage's ``heldout_fraction``, so those two are all it takes.

What a judge trained on is read from its reward stage's resolved ``config.yaml``, which the runner writes beside the
stage's ``checkpoint/``. A judge without one (trained elsewhere, or copied out of its run) cannot be checked; that is
logged. HH-RLHF suites read the adapter's held-out part, which reward stages do not train on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from alignpipe.data.preference import is_reward_heldout
from alignpipe.pipeline.rundir import StageDir

__all__ = ["JudgeTraining", "judge_training", "unseen_by_judge"]

log = logging.getLogger("alignpipe")

SPLIT_BY_PROMPT_HASH = ("alpaca_eval",)  # suite prompt sources a reward stage trains on, split by is_reward_heldout


@dataclass(frozen=True)
class JudgeTraining:
    """A reward-model judge's training data, as its reward stage's resolved config records it."""

    stage: str
    source: str  # the stage's dataset.source
    heldout_fraction: float | None
    config: Path

    def record(self) -> dict:
        """For the leaderboard's judge provenance; no path, which would set apart leaderboards of one judge that
        ``alignpipe leaderboard`` may merge."""
        return {"stage": self.stage, "source": self.source, "heldout_fraction": self.heldout_fraction}


def judge_training(judge_path: str | Path) -> JudgeTraining | None:
    """What the reward stage that saved ``judge_path`` (its ``checkpoint/``) trained on; None when the directory is
    not a stage checkpoint with a config (a model saved by hand or copied out of its run directory)."""
    checkpoint = Path(judge_path)
    stage_dir = StageDir(checkpoint.parent)
    if checkpoint.name != stage_dir.checkpoint.name or not stage_dir.config.is_file():
        return None
    try:
        resolved = stage_dir.read_config()
        name = resolved["stage"]
        stage = next(s for s in resolved["recipe"]["stages"] if s["name"] == name)
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration) as error:
        raise ValueError(f"cannot tell what the judge {checkpoint} was trained on: {stage_dir.config} does not hold a "
                         f"run's stage config ({type(error).__name__}: {error}); pass the checkpoint/ of a reward "
                         "stage of a run, or move the judge out of that directory") from error
    if stage.get("type") != "reward":
        return None
    dataset = stage.get("dataset") or {}
    return JudgeTraining(name, dataset.get("source", "synthetic"), stage.get("heldout_fraction"), stage_dir.config)


def unseen_by_judge(prompt_source: str, judge_path: str | Path) -> tuple[Callable[[str], bool] | None,
                                                                          JudgeTraining | None]:
    """A test passing the suite prompts the judge never trained on (None: every prompt passes), and the judge's
    training record (None when unknown).

    Raises ``ValueError`` when the judge trained on the suite's own source but its config does not say which prompts
    it held out.
    """
    if prompt_source not in SPLIT_BY_PROMPT_HASH:
        return None, None
    training = judge_training(judge_path)
    if training is None:
        log.warning("cannot tell what the judge %s was trained on (no reward stage config.yaml beside it); if it "
                    "trained on %s prompts, this suite's scores of them are inflated", judge_path, prompt_source)
        return None, None
    if training.source != prompt_source:
        return None, training
    fraction = training.heldout_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"the judge {judge_path} was trained on {prompt_source} prompts (reward stage "
                         f"{training.stage!r}), but {training.config} gives no heldout_fraction in (0, 1) that says "
                         f"which it held out (got {fraction!r}), so the suite cannot leave out the prompts it trained "
                         "on; judge with a reward model trained on another source")
    return (lambda prompt: is_reward_heldout(prompt, fraction)), training
