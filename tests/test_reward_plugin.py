"""The model reward source's UP-RLHF bookkeeping in one process (tests/test_distributed.py checks it over ranks)."""

from __future__ import annotations

import pytest
import torch

from alignpipe.rewards.penalties import EnsembleRewards
from alignpipe.rewards.plugin import ModelRewardSource

MEMBERS = {"sure": [1.0, 1.0, 1.0], "unsure": [0.0, 1.0, 2.0], "mid": [0.5, 1.0, 1.5]}


class TableScorer:
    def score(self, prompts, responses):
        return EnsembleRewards.from_members(torch.tensor([MEMBERS[r] for r in responses]))


def _std(name: str) -> float:
    return torch.tensor(MEMBERS[name]).std(correction=0).item()


def test_training_calls_penalise_against_the_mean_std_seen_before_and_then_fold_in_their_own() -> None:
    source = ModelRewardSource(TableScorer(), "mean_minus_std", 2.0)
    first = source(["p", "p"], ["sure", "unsure"]).reward
    u_bar = (_std("sure") + _std("unsure")) / 2  # nothing seen yet: the first batch's own mean std
    assert first.tolist() == pytest.approx([1.0 + 2.0 * u_bar, 1.0 - 2.0 * (_std("unsure") - u_bar)], abs=1e-6)
    assert source.state_dict()["running_std"] == {"count": 2, "mean": pytest.approx(u_bar)}

    evaluation = source(["p"], ["mid"], update=False).reward  # evaluation: same ū, state untouched
    assert evaluation.item() == pytest.approx(1.0 - 2.0 * (_std("mid") - u_bar), abs=1e-6)
    assert source.state_dict()["running_std"]["count"] == 2

    source(["p"], ["mid"])
    assert source.state_dict()["running_std"] == {"count": 3, "mean": pytest.approx((2 * u_bar + _std("mid")) / 3)}


def test_a_zero_coefficient_gives_the_mean_and_still_tracks_the_running_std() -> None:
    source = ModelRewardSource(TableScorer(), "mean_minus_std", 0.0)
    assert source(["p", "p"], ["sure", "unsure"]).reward.tolist() == pytest.approx([1.0, 1.0])
    assert source.state_dict()["running_std"]["count"] == 2  # so raising β_2 on resume has a meaningful ū


@pytest.mark.parametrize("penalty, coef", [("mean", 0.0), ("min", 0.0), ("mean_minus_var", 1.0)])
def test_penalties_without_a_running_mean_leave_it_alone(penalty, coef) -> None:
    source = ModelRewardSource(TableScorer(), penalty, coef)
    source(["p"], ["unsure"])
    assert source.state_dict()["running_std"] == {"count": 0, "mean": 0.0}


def test_trl_reward_functions_score_multi_turn_prompts_with_every_turn() -> None:
    from alignpipe.rewards.plugin import RewardSource, ScoredBatch, trl_reward_function

    seen = []

    class Recording(RewardSource):
        def __call__(self, prompts, responses, *, update=True):
            seen.extend(zip(prompts, responses))
            return ScoredBatch(torch.zeros(len(prompts)), torch.zeros(len(prompts)), None)

    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort: 2 1"}]
    trl_reward_function(Recording())([prompt], [[{"role": "assistant", "content": "1 2"}]])
    assert seen == [("\n\nSystem: be brief\n\nHuman: sort: 2 1\n\nAssistant:", "1 2")]


REWARD_MODULE = """
import numpy as np, torch
def as_list(p, r): return [float(len(x)) for x in r]
def as_tensor(p, r): return torch.tensor([float(len(x)) for x in r])
def as_array(p, r): return np.array([len(x) for x in r])
def as_dict(p, r): return {float(len(x)): 0.0 for x in r}
def as_scalar(p, r): return 1.0
def as_none(p, r): return None
def as_strings(p, r): return [str(len(x)) for x in r]
def as_nested(p, r): return [[1.0, 2.0] for _ in r]
def as_column(p, r): return torch.ones(len(r), 1)
def as_generator(p, r): return (1.0 for _ in r)
def as_zero_dim_tensors(p, r): return [torch.tensor(float(len(x))) for x in r]
def as_numpy_scalars(p, r): return [np.int64(len(x)) for x in r]
def as_numpy_bools(p, r): return [np.bool_(len(x) > 2) for x in r]
def as_bools(p, r): return [len(x) > 2 for x in r]
"""


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "rewards_under_test.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rewards_under_test"


@pytest.mark.parametrize("function", ["as_list", "as_tensor", "as_array", "as_zero_dim_tensors", "as_numpy_scalars"])
def test_a_reward_callable_returns_a_list_tensor_or_array_of_numbers(reward_module, function) -> None:
    from alignpipe.rewards.plugin import CallableRewardSource

    assert CallableRewardSource(f"{reward_module}:{function}")(["p", "p"], ["ab", "abc"]).reward.tolist() == [2.0, 3.0]


@pytest.mark.parametrize("function", ["as_bools", "as_numpy_bools"])
def test_python_and_numpy_bools_are_read_alike_as_zero_and_one(reward_module, function) -> None:
    from alignpipe.rewards.plugin import CallableRewardSource

    assert CallableRewardSource(f"{reward_module}:{function}")(["p", "p"], ["ab", "abc"]).reward.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(("function", "named"), [
    ("as_dict", "returned a dict"), ("as_scalar", "returned a float"), ("as_none", "returned a NoneType"),
    ("as_strings", "returned a str ('2') at position 0"), ("as_nested", "returned a list ([1.0, 2.0]) at position 0"),
    ("as_column", "returned a 2-D Tensor of shape (2, 1)"), ("as_generator", "returned a generator"),
])
def test_a_reward_callable_returning_anything_else_is_refused_naming_it_and_the_type(reward_module, function,
                                                                                     named) -> None:
    from alignpipe.rewards.plugin import CallableRewardSource

    with pytest.raises(ValueError, match="one real number per response") as info:
        CallableRewardSource(f"{reward_module}:{function}")(["p", "p"], ["ab", "abc"])
    assert f"'{reward_module}:{function}' {named}" in str(info.value)


def test_a_stage_process_finds_a_reward_module_in_the_working_directory(tmp_path) -> None:
    """Stage scripts run as pipelines/<type>.py, so the module path starts at pipelines/, not at the directory the
    run was started in; a reward module there (beside the recipe, where relative data paths are read) is found."""
    import os
    import subprocess
    import sys

    work, scripts = tmp_path / "work", tmp_path / "pipelines"
    work.mkdir(), scripts.mkdir()
    (work / "reward_beside_the_recipe.py").write_text("def length(p, r): return [float(len(x)) for x in r]\n")
    (scripts / "stage.py").write_text("from alignpipe.rewards.plugin import CallableRewardSource\n"
                                      "print(CallableRewardSource('reward_beside_the_recipe:length')(['p'], ['abc'])"
                                      ".reward.tolist())\n")
    done = subprocess.run([sys.executable, str(scripts / "stage.py")], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[3.0]"


def test_preflight_imports_reward_callables(tmp_path, monkeypatch) -> None:
    """validate and run refuse a callable the stage could not import before anything is written, naming its key."""
    import sys

    from conftest import TINY_RECIPE, write_recipe

    from alignpipe.pipeline.preflight import PreflightError, preflight
    from alignpipe.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "preflight_rewards.py").write_text("def length(p, r): return [float(len(x)) for x in r]\n")

    def recipe(target: str):
        bon = {"name": "bon", "type": "bon", "inputs": ["sft"], "reward": {"source": "callable", "callable": target},
               "n_samples": 2, "n_prompts": 4, "max_new_tokens": 4, "batch_size": 4}
        return load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], bon]}))

    preflight(recipe("preflight_rewards:length"))  # found in the working directory, as the stage will find it
    for target, problem in (("preflight_rewards:lenght", "module 'preflight_rewards' has no function 'lenght'"),
                            ("no_such_reward_module:f", "cannot import module 'no_such_reward_module'")):
        with pytest.raises(PreflightError) as info:
            preflight(recipe(target))
        assert f"stages.bon.reward.callable: reward callable {target!r}: {problem}" in str(info.value)
