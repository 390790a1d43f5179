"""The whole recipe: the ``Recipe`` model (model, data and ordered stages), the ``Stage`` union of stage types and
``STAGE_TYPES``, with the checks that read more than one stage (the stage graph, eval policies, quantization and
LoRA, tasks and datasets). Apart because it is the one module that knows every stage family; the stage modules import
only the shared bases, never each other or this one."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator

from alignpipe.recipe.errors import RecipeError, _problem, did_you_mean
from alignpipe.recipe.offline_stages import DPOStage, RewardStage, SFTStage
from alignpipe.recipe.online_stages import (
    DNOStage,
    INPOStage,
    OnlineDPOStage,
    OSPStage,
    SPINStage,
    SPPOStage,
    _JudgedStage,
    _OnlineStage,
)
from alignpipe.recipe.rl_stages import (
    BoNStage,
    EvalStage,
    GRPOStage,
    PPOStage,
    RLOOStage,
    _RewardedStage,
    ppo_full_weight_problem,
)
from alignpipe.recipe.specs import DataSpec, ModelSpec, _Spec
from alignpipe.recipe.stage_base import MAX_SEED, RESERVED_STAGE_NAMES, _OptimizerStage

RUN_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")


Stage = Annotated[
    SFTStage | RewardStage | DPOStage | OSPStage | OnlineDPOStage | SPPOStage | SPINStage | DNOStage | INPOStage
    | PPOStage | GRPOStage | RLOOStage | BoNStage | EvalStage,
    Field(discriminator="type"),
]
STAGE_TYPES: dict[str, type[BaseModel]] = {
    "sft": SFTStage, "reward": RewardStage, "dpo": DPOStage, "osp": OSPStage, "online_dpo": OnlineDPOStage,
    "sppo": SPPOStage, "spin": SPINStage, "dno": DNOStage, "inpo": INPOStage, "ppo": PPOStage, "bon": BoNStage,
    "grpo": GRPOStage, "rloo": RLOOStage, "eval": EvalStage,
}


class Recipe(_Spec):
    """One run: model + data + ordered stages."""

    name: str = Field(description="Run name (a slug); outputs go to runs/<name>/.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for data generation and training.")
    description: str | None = Field(None, description="Free text shown in reports.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The model the first stage starts from.")
    data: DataSpec = Field(default_factory=DataSpec, description="Synthetic data settings.")
    stages: list[Stage] = Field(min_length=1, description="Stages, run in order; inputs name earlier stages only.")

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not RUN_NAME_RE.fullmatch(name):
            raise ValueError(f"expected a slug (lowercase letters, digits, '_', '.' or '-', starting with a letter "
                             f"or digit), got {name!r}")
        return name

    @model_validator(mode="after")
    def _stage_graph(self) -> Recipe:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        names = [s.name for s in self.stages]
        for i, stage in enumerate(self.stages):
            if stage.name in names[:i]:
                msg = f"duplicate stage name {stage.name!r} (already used by stages[{names.index(stage.name)}])"
                problems.append((("stages", i, "name"), msg))
            earlier = names[:i]
            for j, ref in enumerate(stage.inputs):
                if isinstance(stage, EvalStage) and ref in stage.inputs[:j]:  # it sampled and ranked it twice
                    problems.append((("stages", i, "inputs", j), f"{ref!r} is listed twice; name each input once"))
                    continue
                if ref in earlier:
                    source = self.stages[earlier.index(ref)]
                    if isinstance(source, EvalStage | BoNStage):
                        problems.append((("stages", i, "inputs", j),
                                         f"{ref!r} is an {source.type} stage: it has no checkpoint"))
                    elif isinstance(source, RewardStage) and not _reads_reward(stage, j):
                        msg = f"{ref!r} is a reward stage: its checkpoint is a reward ensemble, not a policy"
                        problems.append((("stages", i, "inputs", j), msg))
                    elif isinstance(stage, _JudgedStage | _RewardedStage) and j == 1 and not isinstance(source,
                                                                                              RewardStage):
                        msg = f"{ref!r} is not a reward stage; the second input must be the reward stage to read"
                        problems.append((("stages", i, "inputs", j), msg))
                    continue
                if ref == stage.name:
                    msg = "a stage cannot take itself as input"
                elif ref in names:
                    msg = f"forward reference to {ref!r}, which runs later; inputs must name earlier stages"
                elif ref in RESERVED_STAGE_NAMES:
                    msg = f"{ref!r} is the recipe's model: start from it with inputs: [] (eval stages: include_base)"
                else:
                    msg = (f"unknown stage {ref!r}{did_you_mean(ref, earlier)} "
                           f"(earlier stages: {', '.join(earlier) or 'none'})")
                problems.append((("stages", i, "inputs", j), msg))
        problems += self._eval_policies(names)
        problems += self._quantized_stages_use_lora()
        problems += self._ppo_full_weights_in_float32()
        problems += self._trl_reward_models_skip_gguf()
        problems += self._penalties_need_members()
        problems += self._task_stages_follow_the_task()
        problems += self._dataset_stages_say_when_they_switch_task()
        if problems:
            raise _problem(*problems)
        return self

    def _eval_policies(self, names: list[str]) -> list[tuple[tuple[str | int, ...], str]]:
        """Eval stages rank policies: they need one, and their win-rate reference must be one (not a reward model)."""
        problems = []
        rewards = {s.name for s in self.stages if isinstance(s, RewardStage)}
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, EvalStage) or any(n not in names for n in stage.inputs):
                continue
            policies = [n for n in stage.inputs if n not in rewards]
            if not policies:
                problems.append((("stages", i, "inputs"), "an eval stage needs at least one policy input "
                                 "(reward stages only add rows to the reward-model table)"))
            elif stage.reference in rewards:
                problems.append((("stages", i, "reference"), f"{stage.reference!r} is a reward stage; the reference "
                                 f"must be a policy: one of {', '.join(policies)}"))
            if stage.proxy not in (None, "auto"):
                if stage.proxy not in rewards:
                    problems.append((("stages", i, "proxy"), f"{stage.proxy!r} is not a reward stage; the proxy must "
                                     "be one of this stage's reward inputs"
                                     + (f": {', '.join(r for r in stage.inputs if r in rewards)}"
                                        if any(r in rewards for r in stage.inputs) else " (it has none)")))
                elif real := self._real_data_upstream(stage.proxy):
                    problems.append((("stages", i, "proxy"), f"the proxy scores samples of the built-in task, but "
                                     f"{real}; use a reward stage trained on the synthetic task, or proxy: null"))
        return problems

    def eval_proxy(self, stage: EvalStage) -> str | None:
        """The reward input an eval stage scores its samples with (its ``proxy``, ``auto`` resolved)."""
        if stage.proxy != "auto":
            return stage.proxy
        candidates = [n for n in stage.inputs if self._is_reward_stage(n) and not self._real_data_upstream(n)]
        return candidates[0] if len(candidates) == 1 else None

    def _quantized_stages_use_lora(self) -> list[tuple[tuple[str | int, ...], str]]:
        """k-bit base weights are frozen: with model.quantization every training stage must train LoRA adapters."""
        if self.model.quantization is None:
            return []
        problems = [(("stages", i, "lora"), "model.quantization loads frozen k-bit weights; this training stage needs "
                     "a lora block (QLoRA), or drop model.quantization")
                    for i, stage in enumerate(self.stages) if isinstance(stage, _OptimizerStage) and stage.lora is None]
        problems += [(("stages", i, "critic"), "critic: model trains a full copy of the decoder, which k-bit weights "
                      "cannot be; use critic: adapter with model.quantization")
                     for i, stage in enumerate(self.stages) if isinstance(stage, PPOStage) and stage.critic == "model"]
        return problems

    def _ppo_full_weights_in_float32(self) -> list[tuple[tuple[str | int, ...], str]]:
        """A ppo stage steps its weights in the dtype they load in (no float32 master copy): full weights in bf16 or
        fp16 would round most AdamW steps away. Under ``auto`` they load in float32 (``loading.policy_dtype``)."""
        if self.model.dtype not in ("bfloat16", "float16"):
            return []
        return [(("stages", i, "lora" if stage.lora is None else "critic"), ppo_full_weight_problem(self.model.dtype))
                for i, stage in enumerate(self.stages)
                if isinstance(stage, PPOStage) and stage.trains_full_weights]

    def _trl_reward_models_skip_gguf(self) -> list[tuple[tuple[str | int, ...], str]]:
        """TRL's RewardTrainer loads its backbone by name and cannot read a GGUF file: a ``trl`` reward stage that
        would start from the recipe's ``model.gguf_file`` (no inputs, no backbone) is refused before anything runs."""
        if self.model.gguf_file is None:
            return []
        return [(("stages", i, "implementation"), "implementation: trl cannot train on the recipe's model.gguf_file "
                 "(TRL's RewardTrainer reads safetensors checkpoints); put an sft stage first and give it as input, "
                 "set a backbone, or use implementation: ensemble")
                for i, stage in enumerate(self.stages)
                if isinstance(stage, RewardStage) and stage.implementation == "trl" and not stage.inputs
                and stage.backbone is None]

    def _penalties_need_members(self) -> list[tuple[tuple[str | int, ...], str]]:
        """An uncertainty penalty (std, var, min over members) is 0 or undefined for a single reward model."""
        problems = []
        rewards = {s.name: s for s in self.stages if isinstance(s, RewardStage)}
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, _RewardedStage) or stage.reward.penalty == "mean" or len(stage.inputs) != 2:
                continue
            source = rewards.get(stage.inputs[1])
            if source is not None and source.members < 2:
                problems.append((("stages", i, "reward", "penalty"), f"penalty {stage.reward.penalty!r} combines "
                                 f"the members of an ensemble, but reward stage {source.name!r} trains members: "
                                 f"{source.members}; set members >= 2 there (implementation: ensemble) or use "
                                 "penalty: mean"))
        return problems

    def _task_stages_follow_the_task(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Only sft, dpo and reward stages read a ``dataset:``. The online, self-play and RL stages (ppo, grpo,
        rloo) train on the built-in task's prompts (``round_prompts``, ``sample_tasks``; SPIN also on its
        demonstrations), and bon and eval stages sample its held-out prompts and score them with its gold reward.
        After a stage trained on a real dataset they would carry that policy (or judge with that reward model) onto
        another task, so such a recipe is an error rather than a silent switch of data. An eval stage's reward
        inputs are exempt: their rows are the reward stage's own held-out pairs (``reward_eval.json``)."""
        problems = []
        task = "the built-in synthetic task (the recipe's data: block)"
        scored = f"sample the held-out prompts of {task} and score them with its gold reward"
        for i, stage in enumerate(self.stages):
            if isinstance(stage, EvalStage):
                for j, name in enumerate(stage.inputs):
                    if self._is_reward_stage(name) or not (real := self._real_data_upstream(name)):
                        continue
                    problems.append((("stages", i, "inputs", j), f"eval stages {scored}, but {real}, so this stage "
                                     f"would score {name!r} on another task; drop it here and evaluate it on your "
                                     "data with alignpipe eval <checkpoint> --suite <suite> [--judge <reward "
                                     "checkpoint>]"))
                continue
            if not isinstance(stage, _OnlineStage | _RewardedStage):
                continue
            if not (real := next(filter(None, map(self._real_data_upstream, stage.inputs)), None)):
                continue
            fix = "train the stages before it on the synthetic task"
            if isinstance(stage, BoNStage):
                does, would, fix = scored, "rank samples of another task", f"{fix} (bon has no other prompts)"
            else:
                what = "prompts and demonstrations" if isinstance(stage, SPINStage) else "prompts"
                does, would = f"draw their {what} from {task}", "train on another task"
                fix += ", or use a dpo stage on your dataset"
            problems.append((("stages", i, "inputs"), f"{stage.type} stages {does}, but {real}, so this stage would "
                             f"{would}; {fix}"))
        return problems

    def _dataset_stages_say_when_they_switch_task(self) -> list[tuple[tuple[str | int, ...], str]]:
        """An sft, dpo or reward stage without a ``dataset:`` block trains on the built-in task. After a stage trained
        on a real dataset that is a switch of task a forgotten block would make silently, so it must be written out
        (``dataset: {source: synthetic}``); written out, it also starts the synthetic task afresh for the stages
        after it (:meth:`_real_data_upstream`)."""
        problems = []
        for i, stage in enumerate(self.stages):
            if not hasattr(stage, "dataset") or "dataset" in stage.model_fields_set:
                continue
            if real := next(filter(None, map(self._real_data_upstream, stage.inputs)), None):
                problems.append((("stages", i), f"{stage.type} stage {stage.name!r} has no dataset: block, so it "
                                 f"trains on the built-in synthetic task, but {real}; give it the dataset: block of "
                                 "your data, or write dataset: {source: synthetic} to switch to the built-in task "
                                 "on purpose"))
        return problems

    def _is_reward_stage(self, name: str) -> bool:
        return any(s.name == name and isinstance(s, RewardStage) for s in self.stages)

    def _real_data_upstream(self, name: str) -> str | None:
        """Which stage at or upstream of ``name`` (following inputs) trained on a real dataset, if any, in words.

        A stage whose ``dataset:`` block says ``source: synthetic`` in so many words ends the search on its branch:
        it trained on the built-in task on purpose (a reward model on synthetic pairs over a backbone SFT'd on real
        dialogues, say), so what it makes belongs to that task."""
        by_name = {s.name: s for s in self.stages}
        upstream, seen = [name], set()
        while upstream:
            source = by_name.get(current := upstream.pop())
            if source is None or current in seen:
                continue
            seen.add(current)
            dataset = getattr(source, "dataset", None)
            if dataset is not None and dataset.source != "synthetic":
                return f"{current!r} trained on dataset.source {dataset.source!r}"
            if dataset is not None and "dataset" in source.model_fields_set:
                continue
            upstream += source.inputs
        return None

    def stage(self, name: str) -> Stage:
        """The stage called ``name``; unknown names raise a RecipeError with a suggestion, not a bare KeyError."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        names = [s.name for s in self.stages]
        raise RecipeError(f"recipe {self.name!r} has no stage {name!r}{did_you_mean(name, names)} "
                          f"(stages: {', '.join(names)})")


def _reads_reward(stage: Stage, input_index: int) -> bool:
    """Eval stages read reward models as table rows; judged stages read one as their judge (second input)."""
    return isinstance(stage, EvalStage) or (isinstance(stage, _JudgedStage | _RewardedStage) and input_index == 1)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (every default filled in), JSON/YAML-serialisable."""
    return recipe.model_dump(mode="json")
