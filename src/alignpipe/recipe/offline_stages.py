"""The stage types that train on a fixed set of examples: ``sft``, ``dpo`` and ``reward``, each reading its
demonstrations or preference pairs from the synthetic task or a real dataset (``SFTDataSpec``,
``PreferenceDataSpec``), with the checks on long prompts, DPO losses and the reward ensemble's options. Apart from the
online and RL stage types, which sample their own data from the policy and take none of these blocks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from alignpipe.recipe.errors import _problem
from alignpipe.recipe.specs import LoraSpec, PreferenceDataSpec, _Spec
from alignpipe.recipe.stage_base import _CheckpointedStage, _TrainingStage

DPOLossType = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
# The DPO losses that read label_smoothing: sigmoid as conservative DPO (alignpipe's SoftPreferenceDPOTrainer, wherever
# it sits in the list; TRL 1.16's own sigmoid ignores it), the others in TRL itself.
LABEL_SMOOTHING_LOSSES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})


def _long_prompts_problems(stage: SFTStage | DPOStage) -> list[tuple[tuple[str | int, ...], str]]:
    """``long_prompts: drop`` where it means nothing, or where TRL would not drop the rows it names (checked on the
    value, not on whether it was written: a resolved recipe, ``--print``'s or a run's, writes every field)."""
    if stage.long_prompts != "drop":
        return []
    if stage.dataset.source == "synthetic":
        return [(("long_prompts",), "drop applies to a dataset file; the synthetic task's prompts are a few tokens "
                 "long (leave it out)")]
    if not getattr(stage, "assistant_only_loss", True):
        return [(("long_prompts",), "drop: without assistant_only_loss TRL's SFTTrainer keeps such conversations and "
                 "trains them on their prompt alone; set assistant_only_loss: true (TRL then drops them) or raise "
                 "max_length")]
    return []


def _long_prompts_field() -> Any:
    return Field("refuse", description="Rows of a dataset file whose prompt, with the chat template, fills max_length "
                 "have no reply left to train on, and TRL drops them. refuse = the preflight stops the run and names "
                 "them (raise max_length, or fix the data); drop = let TRL drop them, counted in the stage's length "
                 "report. Not part of the stage's config hash: it never changes what a stage trains.")


class SFTDataSpec(_Spec):
    """Where an sft stage's demonstrations come from: the synthetic task (default) or a real dataset."""

    source: Literal["synthetic", "trl", "hh_rlhf", "ultrafeedback"] = Field(
        "synthetic", description="synthetic = the recipe's `data` task (noisy demonstrations); trl = any dataset "
        "already in TRL's SFT formats: a `messages` column of chat turns, or `prompt`/`completion` columns (turned "
        "into `messages`); hh_rlhf = the chosen reply of each Anthropic HH pair, its prompt the raw dialogue as one "
        "user turn (what the preference stages see); ultrafeedback = the chosen conversation of UltraFeedback-"
        "binarized (`chosen`/`messages`, e.g. HuggingFaceH4/ultrafeedback_binarized split train_sft) or the "
        "best-rated completion of raw UltraFeedback (`instruction`/`completions`).",
    )
    path: str | None = Field(
        None, min_length=1, description="Local file/directory (JSON/JSONL(.gz)/parquet/CSV, a data directory, or a "
        "Dataset.save_to_disk directory) or hub dataset id, ORG/NAME or ORG/NAME@REVISION (pinned to a commit for "
        "the run), required unless source is synthetic; relative paths are taken from the directory alignpipe runs "
        "in (the project root under launch.sh).",
    )
    split: str = Field(
        "train", min_length=1, description="Dataset split to read (hh_rlhf: its train part of the 80/20 prompt-hash "
        "split, so held-out prompts stay unseen).",
    )
    limit: int | None = Field(
        None, gt=0, description="Use at most this many conversations (a seeded shuffle picks them); synthetic: set "
        "data.n_sft instead.",
    )

    @model_validator(mode="after")
    def _path_needed(self) -> SFTDataSpec:
        if self.source != "synthetic" and not self.path:
            raise _problem((("path",), f"source {self.source!r} needs a path (local file, directory or hub id)"))
        if self.source == "synthetic" and self.path:
            raise _problem((("path",), "source 'synthetic' takes no path (it uses the recipe's data block)"))
        if self.source == "synthetic" and self.limit is not None:
            raise _problem((("limit",), "source 'synthetic' generates data.n_sft demonstrations; set data.n_sft "
                                        "instead of limit"))
        if self.source == "synthetic" and self.split != "train":
            raise _problem((("split",), "source 'synthetic' has no splits (it generates data.n_sft demonstrations "
                                        "from the task's train prompts); remove split"))
        return self


class SFTStage(_TrainingStage):
    """Supervised fine-tuning on demonstrations (TRL SFTTrainer)."""

    type: Literal["sft"] = Field("sft", description="Stage type: supervised fine-tuning.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (TRL SFTConfig default).")
    assistant_only_loss: bool = Field(
        True, description="Loss on the response only, not the prompt (tiny-model setting; TRL's is False). Needs "
        "{% generation %} markers in the chat template: TRL patches known templates (Qwen2.5, Llama 3, ...); "
        "otherwise set model.chat_template: chatml.",
    )
    dataset: SFTDataSpec = Field(
        default_factory=SFTDataSpec, description="Demonstrations: the synthetic task or a real dataset."
    )
    long_prompts: Literal["refuse", "drop"] = _long_prompts_field()

    @field_validator("inputs")
    @classmethod
    def _at_most_one(cls, inputs: list[str]) -> list[str]:
        if len(inputs) > 1:
            raise ValueError(f"an sft stage starts from at most 1 model ([] = the recipe's model), got {inputs}")
        return inputs

    @model_validator(mode="after")
    def _long_prompts_apply(self) -> SFTStage:
        if problems := _long_prompts_problems(self):
            raise _problem(*problems)
        return self


def _loss_weight_problems(weights: list[float], losses: list[str]) -> list[tuple[tuple[str | int, ...], str]]:
    """Weights TRL would train with but that make no sense: a negative one maximises its loss (the policy learns the
    opposite of that loss's preference), and all zeros leave no loss, so the stage steps without learning."""
    problems: list[tuple[tuple[str | int, ...], str]] = [
        (("loss_weights", i), f"expected a weight >= 0, got {weight}: a negative weight maximises the {loss} loss "
                              "instead of minimising it; use 0 to switch a loss off")
        for i, (weight, loss) in enumerate(zip(weights, losses, strict=True)) if weight < 0]
    if not problems and not any(weights):
        problems.append((("loss_weights",), f"every weight is 0, so the stage has no loss and trains nothing; give "
                                            f"at least one of {losses} a weight > 0"))
    return problems


class DPOStage(_TrainingStage):
    """Direct Preference Optimization (Rafailov et al. 2023) on preference pairs (TRL DPOTrainer).

    TRL's ``disable_dropout`` (on by default, standard for DPO) turns every dropout off, ``lora.dropout`` included.
    """

    type: Literal["dpo"] = Field("dpo", description="Stage type: direct preference optimization.")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (TRL DPOConfig default).")
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL penalty to the reference (DPO paper; "
                        "TRL default).")
    loss_type: list[DPOLossType] = Field(
        default_factory=lambda: ["sigmoid"],
        min_length=1,
        description="TRL DPO loss(es), combined with loss_weights; sigmoid = the DPO paper's loss (TRL default).",
    )
    loss_weights: list[float] | None = Field(
        None, description="One weight >= 0 per loss_type (0 switches a loss off; not all 0); null = all 1 (TRL "
        "default).",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed label-flip rate ε: the sigmoid loss becomes conservative DPO (cDPO) "
        "wherever it sits in loss_type; TRL's robust, exo_pair (needs ε > 0) and aot losses read it too (TRL "
        "default: 0).",
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute reference log-probs once up front instead of per batch (TRL default)."
    )
    dataset: PreferenceDataSpec = Field(
        default_factory=PreferenceDataSpec, description="Preference pairs: the synthetic task or a real dataset."
    )
    long_prompts: Literal["refuse", "drop"] = _long_prompts_field()

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_loss_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("inputs")
    @classmethod
    def _exactly_one(cls, inputs: list[str]) -> list[str]:
        if len(inputs) != 1:
            raise ValueError(f"a dpo stage needs exactly 1 input (the policy to start from, also the reference),"
                             f" got {inputs}")
        return inputs

    @model_validator(mode="after")
    def _weights_match_losses(self) -> DPOStage:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            msg = (f"needs one weight per loss_type entry: {len(self.loss_weights)} weights for "
                   f"{len(self.loss_type)} loss types {self.loss_type}")
            raise _problem((("loss_weights",), msg))
        if self.loss_weights is not None and (problems := _loss_weight_problems(self.loss_weights, self.loss_type)):
            raise _problem(*problems)
        if problems := _long_prompts_problems(self):
            raise _problem(*problems)
        return self

    def soft_strength_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """What in this stage conflicts with soft pair strengths (a `preference` column): checked on the recipe for
        scored sources, and on the loaded pairs for a trl file with its own column (``check_soft_targets``)."""
        problems = []
        if self.label_smoothing:
            problems.append((("label_smoothing",), "soft pair strengths and label_smoothing both set the target "
                             "probability; fold the smoothing into the strengths or set label_smoothing: 0"))
        if self.loss_type not in (["sigmoid"], ["sigmoid", "sft"]):
            problems.append((("loss_type",), f"soft pair strengths train with the soft-preference loss, which needs "
                             f"loss_type [sigmoid] or [sigmoid, sft]; got {self.loss_type}. Set "
                             "dataset.soft_labels: false for other losses"))
        return problems

    @model_validator(mode="after")
    def _soft_labels_need_sigmoid(self) -> DPOStage:
        if self.dataset.soft_strengths and (problems := self.soft_strength_problems()):
            raise _problem(*problems)
        if "exo_pair" in self.loss_type and not self.label_smoothing:
            # TRL refuses it only when the trainer is built, after the model loaded and the pairs were tokenized
            raise _problem((("label_smoothing",), "loss_type exo_pair needs label_smoothing > 0: EXO's target gives "
                            "the rejected reply probability ε, and its loss takes log ε; set label_smoothing, e.g. "
                            "0.001 (the EXO paper's value), or drop exo_pair"))
        if self.label_smoothing and not set(self.loss_type) & LABEL_SMOOTHING_LOSSES:
            raise _problem((("label_smoothing",), f"no entry of loss_type {self.loss_type} reads it, so it would "
                            "change nothing: it makes the sigmoid loss conservative DPO (cDPO) and is TRL's ε for "
                            "robust, exo_pair, aot and aot_unpaired; add one of those or remove label_smoothing"))
        return self


class RewardStage(_CheckpointedStage):
    """Bradley-Terry reward models as K LoRA members on one frozen backbone (UP-RLHF, Zhai et al. 2024)."""

    type: Literal["reward"] = Field("reward", description="Stage type: reward model / LoRA reward ensemble.")
    backbone: str | None = Field(
        None, min_length=1, description="Hub id (ORG/NAME, or ORG/NAME@REVISION for a branch, tag or commit: pinned to "
        "a commit for the run and hashed) or local path of the backbone (e.g. a MiniLM encoder); null = the stage's "
        "input checkpoint, or the recipe's model when inputs is [].",
    )
    implementation: Literal["ensemble", "trl"] = Field(
        "ensemble", description="ensemble = our K-member LoRA trainer; trl = one model through TRL's RewardTrainer "
        "(members must be 1; `lora: null` gives full fine-tuning).",
    )
    members: int = Field(5, ge=1, description="Ensemble size K (UP-RLHF and Coste et al. use 5); implementation: "
                         "trl trains one model and needs members: 1.")
    lora: LoraSpec | None = Field(
        default_factory=lambda: LoraSpec(r=8, alpha=16, dropout=0.0),
        description="Each member's LoRA adapter (tiny-model setting: r=8); null = full fine-tuning (trl only).",
    )
    top_layers: int | None = Field(
        None, gt=0, description="Adapters only on the last N layers, so the trunk below runs once for all members "
        "(faster scoring, less per-member capacity); null = every layer.",
    )
    pooling: Literal["last", "cls", "mean"] = Field(
        "last", description="Sequence summary fed to each head: last token (decoders), first token (encoders), mean."
    )
    diversity_weight: float = Field(
        0.0, ge=0, description="λ of UP-RLHF's nuclear/Frobenius diversity term on the stacked LoRA A matrices; "
        "0 = a plain LoRA ensemble.",
    )
    diversity_form: Literal["ratio", "nnm"] = Field(
        "ratio", description="ratio = ||A||_*/||A||_F as UP-RLHF's eq. 12 prints it (scale-free; random LoRA A's "
        "start near its maximum, so it changes little); nnm = the authors' code's nuclear-norm maximisation, "
        "||A||_*/sg(||A||_F)*sqrt(max dim), which also grows the A's.",
    )
    objective: Literal["members", "mean"] = Field(
        "members", description="members = a Bradley-Terry loss per member (independent ensemble, Coste et al. 2024); "
        "mean = one loss on the ensemble-mean reward (UP-RLHF eq. 12).",
    )
    bootstrap: bool = Field(False, description="Each member trains on its own bootstrap resample of the pairs.")
    ids_rate: float = Field(
        0.0, ge=0, le=1, description="Iterative Data Smoothing (Zhu et al. 2024): after each epoch every pair's label "
        "moves this far toward the ensemble's own prediction; 0 = plain maximum likelihood.",
    )
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (TRL RewardConfig default).")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the pairs (UP-RLHF/IDS: 1 epoch).")
    per_device_train_batch_size: int = Field(
        16, gt=0, description="Pairs per step (tiny-model setting). implementation ensemble: the global batch, split "
        "over the processes; trl: per process, as in TRL (global = N x processes).",
    )
    max_length: int = Field(
        512, ge=2, description="Longest prompt+response in tokens. implementation ensemble truncates longer pairs, "
        "keeping the end; trl (TRL's RewardTrainer) drops them, and the log counts the dropped pairs.",
    )
    logging_steps: int = Field(10, gt=0, description="Log every N steps.")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of the pairs held out for accuracy, calibration and uncertainty metrics."
    )
    dataset: PreferenceDataSpec = Field(
        default_factory=PreferenceDataSpec, description="Preference pairs: the synthetic task or a real dataset."
    )

    @field_validator("inputs")
    @classmethod
    def _at_most_one(cls, inputs: list[str]) -> list[str]:
        if len(inputs) > 1:
            raise ValueError(f"a reward stage reads at most 1 backbone checkpoint ([] = recipe model), got {inputs}")
        return inputs

    def soft_strength_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """What in this stage conflicts with soft pair strengths (see ``DPOStage.soft_strength_problems``)."""
        if self.implementation != "trl":
            return []  # the ensemble trains on soft Bradley-Terry targets
        return [(("dataset", "soft_labels"), "TRL's RewardTrainer reads chosen/rejected only, so the pairs' soft "
                 "strengths would be dropped; use implementation: ensemble (soft Bradley-Terry targets) or set "
                 "dataset.soft_labels: false")]

    @model_validator(mode="after")
    def _implementation_options(self) -> RewardStage:
        if self.implementation == "trl":
            ensemble_only = {"diversity_weight": self.diversity_weight != 0,
                             "diversity_form": self.diversity_form != "ratio",
                             "bootstrap": self.bootstrap, "ids_rate": self.ids_rate != 0,
                             "top_layers": self.top_layers is not None, "objective": self.objective != "members",
                             "pooling": self.pooling != "last"}
            if self.members != 1:  # not defaulted to 1 here: a resolved recipe would then carry 1 into an ensemble
                raise _problem((("members",), f"is {self.members} (the ensemble's default is 5); TRL's RewardTrainer "
                                              "trains one model: set members: 1, or use implementation: ensemble"))
            for key, is_set in ensemble_only.items():
                if is_set:
                    raise _problem(((key,), "is an option of implementation 'ensemble'; TRL's RewardTrainer trains "
                                             "one model (leave it at its default or use implementation: ensemble)"))
            if self.dataset.soft_strengths and (problems := self.soft_strength_problems()):
                raise _problem(*problems)
        elif self.lora is None:
            raise _problem((("lora",), "the ensemble members are LoRA adapters on a shared backbone; full "
                                       "fine-tuning needs implementation: trl with members: 1"))
        elif self.diversity_weight == 0 and self.diversity_form != "ratio":
            # as a dataset's unread pairing keys: a setting with no effect is refused away from its default
            raise _problem((("diversity_form",), f"is not read: {self.diversity_form!r} shapes the diversity term, "
                                                 "and diversity_weight is 0, so there is none; set diversity_weight "
                                                 "> 0 or remove diversity_form"))
        if self.bootstrap and self.objective == "mean":
            raise _problem((("bootstrap",), "bootstrap resamples the pairs per member, but objective: mean has one "
                                            "loss on the ensemble mean; use objective: members with bootstrap"))
        return self
