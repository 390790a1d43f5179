"""The reward plug-in: one interface for every stage that optimises or ranks by a reward (PPO, GRPO, RLOO, best-of-n).

A :class:`RewardSource` maps (prompts, responses) to a :class:`ScoredBatch`: the reward to optimise, the raw proxy
(ensemble mean) and the ensemble std, so every stage logs the same quantities. Three sources, chosen by the recipe's
``reward:`` block (:class:`alignpipe.recipe.RewardSpec`):

* ``model``: a reward stage's saved ensemble (or single model), penalised by ``penalty`` / ``penalty_coef``
  (:func:`alignpipe.rewards.penalties.penalised_rewards`; UP-RLHF's running mean of the std lives here and is saved
  with the stage's state for resume);
* ``gold``: the embedded task's exact gold reward (oracle runs);
* ``callable``: any ``package.module:function(prompts, responses) -> list[float]``.

:func:`trl_reward_function` adapts a source to TRL's reward-function signature for ``GRPOTrainer``/``RLOOTrainer``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alignpipe.data.pairing import plain_text
from alignpipe.pipeline import distributed
from alignpipe.rewards.penalties import EnsembleRewards, RunningMean, penalised_rewards
from alignpipe.tasks import gold_reward

__all__ = ["RewardSource", "ScoredBatch", "callable_source_hash", "load_callable", "make_reward_source",
           "reward_values", "trl_reward_function"]


@dataclass(frozen=True)
class ScoredBatch:
    """``reward`` is what the optimiser sees; ``proxy`` the unpenalised score; ``std`` the ensemble disagreement."""

    reward: Tensor
    proxy: Tensor
    std: Tensor | None

    @property
    def penalty(self) -> Tensor:
        return self.proxy - self.reward


class RewardSource:
    """Scores responses; ``update=False`` scores without touching running statistics (evaluation batches)."""

    name: str = "reward"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str], *, update: bool = True) -> ScoredBatch:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class GoldRewardSource(RewardSource):
    name = "gold"

    def __call__(self, prompts, responses, *, update=True) -> ScoredBatch:
        scores = torch.tensor([gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)])
        return ScoredBatch(scores, scores, None)


class CallableRewardSource(RewardSource):
    def __init__(self, target: str):
        self.function = load_callable(target)
        self.name = target

    def __call__(self, prompts, responses, *, update=True) -> ScoredBatch:
        returned = self.function(list(prompts), list(responses))
        scores = torch.tensor(reward_values(returned, len(responses), f"reward callable {self.name!r}"))
        return ScoredBatch(scores, scores, None)


class ModelRewardSource(RewardSource):
    """A saved reward ensemble (or single model) with a penalty mode; one backbone in memory for all members.

    Under data parallelism each rank scores its own share of a step's samples, but UP-RLHF's ``ū`` must be one
    number: a training call (``update=True``) all-reduces the step's std count and sum, so every rank penalises
    with the same ``ū`` (the one a single process would hold) and rank 0's saved state is every rank's. That makes
    a training call a collective under ``mean_minus_std``: every rank calls it once per step, as PPO's rollout and
    TRL's reward functions do. Evaluation calls (``update=False``) stay rank-local.
    """

    def __init__(self, scorer, penalty: str, coef: float):
        self.scorer, self.penalty, self.coef = scorer, penalty, coef
        self.running_std = RunningMean()
        self.name = f"{getattr(scorer, 'judge_id', 'reward-model')}:{penalty}:{coef:g}"

    def __call__(self, prompts, responses, *, update=True) -> ScoredBatch:
        rewards: EnsembleRewards = self.scorer.score(list(prompts), list(responses))
        u_bar = None
        if self.penalty == "mean_minus_std":  # a training call's batch is the whole step, pooled over ranks
            batch = _moments_over_ranks(rewards.std) if update else RunningMean.of(rewards.std)
            u_bar = self.running_std.centre(batch)
            if update:
                self.running_std.merge(batch)  # after: this step's rewards do not depend on their batch mates
        reward = penalised_rewards(rewards, self.penalty, coef=self.coef, u_bar=u_bar)
        return ScoredBatch(reward.float(), rewards.mean.float(), rewards.std.float())

    def state_dict(self) -> dict[str, Any]:
        return {"running_std": self.running_std.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "running_std" in state:
            self.running_std = RunningMean.from_state_dict(state["running_std"])


def _moments_over_ranks(values: Tensor) -> RunningMean:
    """Count and mean of ``values`` pooled over every rank (the identity in one process; a collective otherwise)."""
    local = RunningMean.of(values)
    total, count = distributed.all_reduce_sum(
        torch.tensor([local.mean * local.count, float(local.count)], dtype=torch.float64)).tolist()
    return RunningMean(count=round(count), mean=total / count if count else 0.0)


def reward_values(returned: Any, count: int, source: str) -> list[float]:
    """``returned`` as ``count`` finite floats, or a ValueError naming ``source`` and what it returned instead.

    A reward function must return one real number per response: a list or tuple, or a 1-D tensor or array. Anything
    else is refused rather than coerced, since ``float()`` over it would take a dict's keys, parse strings such as
    ``"1.5"``, or fail with a message that does not say which function was wrong.
    """
    expected = f"it must return one real number per response ({count}) as a list, or a 1-D tensor or array"
    ndim = getattr(returned, "ndim", None)
    if ndim is not None and hasattr(returned, "tolist"):  # torch / numpy
        if ndim != 1:
            raise ValueError(f"{source} returned a {ndim}-D {type(returned).__name__} of shape "
                             f"{tuple(returned.shape)}; {expected}")
        returned = returned.tolist()
    elif isinstance(returned, (str, bytes)) or not isinstance(returned, Sequence):
        raise ValueError(f"{source} returned a {type(returned).__name__}; {expected}")
    # 0-d tensors and numpy scalars (a numpy bool included) count as the numbers they hold
    returned = [v.item() if getattr(v, "ndim", None) == 0 and hasattr(v, "item") else v for v in returned]
    wrong = next(((i, v) for i, v in enumerate(returned) if not isinstance(v, numbers.Real)), None)
    if wrong is not None:
        raise ValueError(f"{source} returned a {type(wrong[1]).__name__} ({wrong[1]!r:.40}) at position {wrong[0]}; "
                         f"{expected}")
    if len(returned) != count:
        raise ValueError(f"{source} returned {len(returned)} values for {count} responses; {expected}")
    values = [float(v) for v in returned]
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{source} returned NaN or inf for {len(bad)} of {count} responses (first at position "
                         f"{bad[0]}); rewards must be finite")
    return values


def load_callable(target: str) -> Callable:
    """``'package.module:function'`` -> the function; errors say which part is wrong and how to write it.

    The module is looked for on the module path, then in the working directory (:func:`importable_working_directory`),
    which the runner, its preflight and every stage process share: a module ``alignpipe validate`` finds, the stages
    find too."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward callable {target!r} must look like 'package.module:function'")
    importable_working_directory()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward callable {target!r}: cannot import module {module_name!r} ({exc}); it is looked "
                         f"for on the module path and in the working directory {os.getcwd()}") from exc
    except Exception as exc:  # the module's own code failed (a SyntaxError, an error at import time)
        raise ValueError(f"reward callable {target!r}: importing module {module_name!r} raised "
                         f"{type(exc).__name__}: {exc}") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"reward callable {target!r}: module {module_name!r} has no function {attribute!r}")
    return function


def callable_source_hash(target: str) -> str | None:
    """sha256 of the files that define a reward callable: the module the recipe names and the file of the function
    under any decorators, so that editing the function re-runs the stages that optimise it (the recipe names it only
    by ``'module:function'``). ``inspect.getsourcefile`` alone follows a decorator's wrapper (``@torch.no_grad()``)
    to the decorator's file. None when neither has a source file (compiled code)."""
    function = load_callable(target)
    try:
        defining = inspect.getsourcefile(inspect.unwrap(function))
    except TypeError:  # a builtin, or an object that is not a function
        defining = None
    named = getattr(sys.modules.get(target.partition(":")[0]), "__file__", None)
    paths = sorted({os.path.abspath(p) for p in (named, defining) if p and os.path.isfile(p)})
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            digest.update(hashlib.sha256(handle.read()).digest())
    return digest.hexdigest()


def importable_working_directory() -> None:
    """Put the working directory at the end of the module path, once: ``alignpipe`` started from its console script
    does not have it there (``python -m`` does), and a reward callable's module usually sits beside the recipe, where
    relative data paths are resolved too. At the end, so that it shadows no installed package."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


def make_reward_source(spec, reward_model_path: str | None, *, dtype: str = "auto",
                       device: str | torch.device | None = None) -> RewardSource:
    """The source a recipe's ``reward:`` block names (``reward_model_path`` = the reward stage's checkpoint); a
    reward model is placed on ``device`` (the policy's, so scoring a rollout does not run on the CPU beside a GPU
    policy; None = the process's device, :func:`~alignpipe.rewards.loading.load_reward_scorer`'s default)."""
    if spec.source == "gold":
        return GoldRewardSource()
    if spec.source == "callable":
        return CallableRewardSource(spec.callable)
    if reward_model_path is None:
        raise ValueError("reward.source: model needs the reward stage's checkpoint (the stage's second input)")
    from alignpipe.rewards.loading import load_reward_scorer  # heavy: only when a model is the source

    scorer = load_reward_scorer(reward_model_path, dtype=dtype, device=device)
    return ModelRewardSource(scorer, spec.penalty, spec.penalty_coef)


def trl_reward_function(source: RewardSource, log_std: Callable[[float], None] | None = None) -> Callable:
    """``source`` in TRL's reward-function signature ``f(prompts, completions, **kwargs) -> list[float]``.

    Conversational prompts/completions (lists of messages) become plain text with
    :func:`alignpipe.data.pairing.plain_text`, as in the reward stage's pairs (a multi-turn prompt keeps its turns).
    The mean ensemble std of each call is passed to ``log_std`` (GRPO/RLOO log it beside TRL's own metrics).
    """

    def reward_function(prompts, completions, **kwargs) -> list[float]:
        scored = source([plain_text(p) for p in prompts], [plain_text(c) for c in completions])
        if log_std is not None and scored.std is not None:
            log_std(float(scored.std.mean()))
        return scored.reward.tolist()

    reward_function.__name__ = f"alignpipe_{source.name.split(':')[0].replace('-', '_')}"
    return reward_function
