"""The online, iterative and self-play stage types (``osp``, ``online_dpo``, ``sppo``, ``spin``, ``dno``,
``inpo``): one loop of rounds (sample, judge, pair, train with a DPO-style loss, evaluate) and its fields in
``_OnlineStage``, ``_JudgedStage``, ``_IterativeStage`` and ``_SelfPlayStage``. Apart because they are one family with
one set of round settings, which neither the offline nor the RL stage types have."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignpipe.data.truncation import TruncatedSamples
from alignpipe.recipe.errors import _problem
from alignpipe.recipe.specs import LoraSpec
from alignpipe.recipe.stage_base import _TrainingStage


class _OnlineStage(_TrainingStage):
    """Online rounds of sample -> (judge) -> pair -> train -> evaluate, shared by every iterative method.

    Prompts come from the recipe's built-in task and each round is evaluated on its gold reward, so the stages
    before one must train on that task too. Rounds train with TRL's DPOTrainer, whose ``disable_dropout`` also turns
    ``lora.dropout`` off. Defaults follow ALGORITHMS.md §4c (OSP, marked [I] there: reconstructed,
    not the authors' exact values).
    """

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate per round (OSP §4c: 1e-4 with LoRA).")
    lora: LoraSpec | None = Field(
        default_factory=LoraSpec, description="LoRA adapter per round, merged at the end of the round (OSP is "
        "parameter-efficient, §4a); null = full fine-tuning.",
    )
    beta: float = Field(0.1, gt=0, description="Implicit KL coefficient of the DPO-style loss (OSP §4c: 0.1).")
    rounds: int = Field(3, gt=0, description="Sample/judge/train rounds, a.k.a. iterations (OSP §4c: 3-5; SPPO: 3).")
    prompts_per_round: int = Field(128, gt=0,
                                   description="Fresh training prompts sampled each round (tiny-model setting).")
    reference: Literal["initial", "previous"] = Field(
        "initial", description="DPO reference: the stage's input policy every round (OSP §4c) or the previous "
        "round's policy (the ablation of §4c; what SPPO-style iteration uses).",
    )
    nll_weight: float = Field(
        0.0, ge=0, description="Weight of an NLL term on the chosen response (TRL's `sft` DPO loss, as in RPO, Pang "
        "et al. 2024) added to the preference loss; 0 = the pure loss of ALGORITHMS.md §4a.",
    )
    max_new_tokens: int = Field(24, gt=0, description="Generation budget when sampling (tiny-model setting).")
    truncated_samples: TruncatedSamples = Field(
        "drop", description="Samples that hit max_new_tokens without an end-of-sequence token: drop = leave them "
        "out before judging (a prompt left with fewer than 2 finished samples, or SPIN's truncated generation, gives "
        "no pair); keep = judge and train on them as finished replies (the chat template's end token is appended, "
        "so the policy learns a reply that ends where the budget cut it); reject = judge them with the rest but keep "
        "only the pairs they lose (a pair whose chosen reply is truncated is dropped; SPIN keeps a truncated "
        "generation as its rejected reply), so a policy that starts running past the budget is pushed back, which "
        "drop cannot do.",
    )
    sampling_temperature: float = Field(1.0, gt=0, description="Sampling temperature for the K samples (OSP §4c).")
    eval_prompts: int = Field(256, gt=0, description="Held-out prompts for the per-round gold evaluation.")

    @field_validator("inputs")
    @classmethod
    def _exactly_one(cls, inputs: list[str]) -> list[str]:
        if len(inputs) != 1:
            raise ValueError(f"an iterative stage needs exactly 1 input (the policy to start from), got {inputs}")
        return inputs


class _JudgedStage(_OnlineStage):
    """An online stage whose K samples per prompt are compared by a judge."""

    samples_per_prompt: int = Field(4, ge=2, description="K responses sampled per prompt (OSP §4c: 4-8).")
    judge: Literal["self", "gold", "reward"] = Field(
        "self", description="Who judges the samples: the current policy itself (OSP's self-preferring setting), the "
        "embedded task's gold judge (the external-judge ablation of §4b), or a reward stage's model (Bradley-Terry; "
        "name the reward stage as this stage's second input).",
    )
    judge_temperature: float = Field(
        0.1, gt=0, description="Bradley-Terry temperature of the gold judge's probabilities (judge: gold only; "
        "tiny-model setting).",
    )

    @field_validator("inputs")
    @classmethod
    def _exactly_one(cls, inputs: list[str]) -> list[str]:
        if len(inputs) not in (1, 2):
            raise ValueError(f"a judged iterative stage needs 1 input (the policy to start from), plus the reward "
                             f"stage with judge: reward; got {inputs}")
        return inputs

    @model_validator(mode="after")
    def _reward_judge_input(self) -> _JudgedStage:
        if self.judge == "reward" and len(self.inputs) != 2:
            raise _problem((("inputs",), "judge: reward needs 2 inputs: [<policy stage>, <reward stage>]"))
        if self.judge != "reward" and len(self.inputs) != 1:
            raise _problem((("inputs",), f"a second input is only read with judge: reward (the judge is "
                                         f"{self.judge!r}); drop {self.inputs[1]!r} or set judge: reward"))
        if self.judge != "gold" and self.judge_temperature != type(self).model_fields["judge_temperature"].default:
            own = "the policy's own verdicts" if self.judge == "self" else "the reward model's σ(r_a − r_b)"
            raise _problem((("judge_temperature",), f"is the gold judge's temperature; judge {self.judge!r} uses "
                            f"{own} and never reads it; remove it or set judge: gold"))
        return self


class _IterativeStage(_JudgedStage):
    """OSP-style ranked pairing: judged against an anchor, pairs from the ranking."""

    reanchor: bool = Field(
        True, description="Judge against a random anchor, then again against the median-strength sample (OSP §4b "
        "two-pass anchor); false = one pass against a random anchor.",
    )
    min_gap: float = Field(0.0, ge=0, lt=0.5, description="Drop pairs whose strength is within min_gap of 0.5 (ties).")


class OSPStage(_IterativeStage):
    """Online self-preferring (Zhai et al. 2024): ranked pairs with soft strengths, soft-preference loss."""

    type: Literal["osp"] = Field("osp", description="Stage type: online self-preferring optimisation.")
    pairing: Literal["anchor", "best_worst", "all_pairs"] = Field(
        "anchor", description="How pairs are formed from the ranked samples (OSP §4b: anchor = rank i with K+1-i)."
    )


class OnlineDPOStage(_IterativeStage):
    """Iterative/online DPO: the OSP loop with hard labels, on each prompt's best-vs-worst pair by default; at equal
    compute with OSP (the same pairs) with ``pairing: anchor``."""

    type: Literal["online_dpo"] = Field("online_dpo", description="Stage type: online DPO with hard labels.")
    pairing: Literal["anchor", "best_worst", "all_pairs"] = Field(
        "best_worst", description="How pairs are formed from the ranked samples (best vs worst by default)."
    )


class _SelfPlayStage(_JudgedStage):
    """Self-play against the previous iterate: the reference is ``π_t`` (§7-§10)."""

    reference: Literal["initial", "previous"] = Field(
        "previous", description="Reference of the loss: the previous iterate π_t (the method's definition, §7-§10) "
        "or the stage's input policy every round (an ablation).",
    )
    samples_per_prompt: int = Field(5, ge=2, description="K responses sampled per prompt (SPPO §7c: 5).")


class SPPOStage(_SelfPlayStage):
    """SPPO (Wu et al. 2024): win rates from a K×K preference matrix, squared loss against π_t (§7)."""

    type: Literal["sppo"] = Field("sppo", description="Stage type: self-play preference optimisation.")
    beta: float = Field(
        0.1, gt=0, description="1/eta of the SPPO loss: log-ratio targets are (win rate - 1/2)/beta (official code: "
        "0.001 for 7B models with 1024 tokens; tiny-model setting 0.1).",
    )


class SPINStage(_OnlineStage):
    """SPIN (Chen et al. 2024): SFT demonstrations vs the policy's own generations, DPO against π_t (§8).

    The demonstrations are the built-in task's (the recipe's ``data`` block, what a synthetic sft stage trains on),
    so no stage before it may train on a real dataset (``Recipe._task_stages_follow_the_task``).
    """

    type: Literal["spin"] = Field("spin", description="Stage type: self-play fine-tuning.")
    reference: Literal["initial", "previous"] = Field(
        "previous", description="Reference: the previous iterate π_t (SPIN §8a) or the stage's input every round."
    )


class DNOStage(_SelfPlayStage):
    """DNO-Prct (Rosset et al. 2024): best vs worst with a large-margin filter, DPO against π_t (§9)."""

    type: Literal["dno"] = Field("dno", description="Stage type: direct Nash optimisation (practical variant).")
    margin_threshold: float = Field(
        0.2, ge=0, lt=1, description="Keep a pair only when its win-rate gap is at least this (§9e; [M] value).",
    )


class INPOStage(_SelfPlayStage):
    """INPO (Zhang et al. 2024): sampled labels, squared loss mixing π_t with the fixed reference (§10)."""

    type: Literal["inpo"] = Field("inpo", description="Stage type: iterative Nash policy optimisation.")
    beta: float = Field(0.1, gt=0, description="1/eta: the loss regresses h_t onto eta/2 = 1/(2 beta) (§10a, [M]).")
    reference_mix: float = Field(
        0.1, ge=0, le=1, description="eta*tau: the weight of the stage's input policy (pi_ref) in INPO's mixed "
        "reference; 0 = online IPO against pi_t (§10e) ([M/I] value). Needs reference: previous.",
    )

    @model_validator(mode="after")
    def _mix_needs_two_references(self) -> INPOStage:
        if self.reference == "initial" and self.reference_mix != type(self).model_fields["reference_mix"].default:
            raise _problem((("reference_mix",), "mixes the stage's input policy with the previous iterate, but with "
                            "reference: initial both references are the input policy, so it changes nothing; remove "
                            "it or use reference: previous"))
        return self
