"""One Bradley–Terry reward model trained with TRL's ``RewardTrainer``, with an atomic save and a scorer.

This is the single-model counterpart of :mod:`alignpipe.rewards.ensemble`. The model is an
``AutoModelForSequenceClassification`` with ``num_labels=1`` (the backbone plus a scalar ``score`` head). It is
trained by full fine-tuning, or with LoRA through ``peft_config``. :class:`SingleRewardScorer` has the interface of
:class:`~alignpipe.rewards.ensemble_scorer.EnsembleScorer`, so PPO, best-of-n and the evaluation code take either one.
Its :class:`EnsembleRewards` have one column (``per_member`` is ``[N, 1]``) and ``std`` is identically 0.

Input formatting (what the scorer feeds the model must be what ``RewardTrainer`` fed it):

* ``"chat"`` (the dataset was conversational; :data:`TEXT_FORMATS`): TRL renders ``prompt + chosen`` (a message
  list) with the tokenizer's chat template and tokenises it without extra special tokens
  (``apply_chat_template(tokenize=True)``). :func:`~alignpipe.rewards.ensemble_encoding.encode_examples` renders
  ``[user: prompt, assistant: response]`` the same way, and gives the same token ids (tested). So the scorer
  reuses it.
* ``"plain"`` (the dataset held strings): TRL appends ``eos_token`` to the response when it is missing, concatenates
  ``prompt + response`` with no separator, and tokenises WITH the tokenizer's special tokens (BOS, ...). This is not
  what ``encode_examples`` does (it applies the chat template whenever the tokenizer has one, and uses pair encoding
  otherwise). The scorer therefore has its own encoder for this format.

Differences that remain, by design:

* Padding: TRL's collator pads on the RIGHT. The scorer pads on the right too, with the model config's
  ``pad_token_id``. That is the id the sequence-classification head uses to find the last non-pad token, and
  positions (absolute or rotary) then match training exactly, whatever ``tokenizer.padding_side`` says.
* Length: TRL DROPS training pairs whose chosen or rejected sequence is longer than ``max_length``. The scorer cannot
  drop an input, so it keeps the LAST ``max_length`` tokens (the response end), like ``encode_examples``. A truncated
  input is one the model never saw in training.
* Conversations: the scorer sees one user turn and one assistant turn (``score(prompts, responses)`` takes strings,
  and so do PPO, GRPO/RLOO and best-of-n). So a training row whose prompt carries a system message or earlier turns
  is made single-turn before training (:func:`single_turn_rows`): its prompt becomes one user message holding the
  transcript, which is what :func:`alignpipe.data.pairing.plain_text` hands the scorer. The built-in sources'
  prompts already have this form (HH-RLHF's raw dialogue in one user message).

The format travels with the model. :func:`train_single_reward_model` records it in
``model.config.alignpipe_text_format`` (and so in ``config.json``), and :func:`save_single_reward_model` writes it
to the manifest.

On disk (:func:`save_single_reward_model`): one directory with the merged model (``config.json`` and
``model.safetensors``, from ``save_pretrained``), the tokenizer files, and ``manifest.json``
``{"format": "alignpipe-reward-single", "version": 1, "members": 1, "text_format": ...}``.
:func:`alignpipe.rewards.loading.load_reward_scorer` tells it apart from an ensemble directory by that manifest.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from alignpipe.io import atomic_write_json
from alignpipe.models.loading import ModelError, load_tokenizer, remote_code_kwargs
from alignpipe.models.whole_weights import zero3_partitioning_off
from alignpipe.pipeline.rundir import publish_directory
from alignpipe.rewards.ensemble import _quiet_peft
from alignpipe.rewards.ensemble_encoding import collate_features, encode_examples
from alignpipe.rewards.ensemble_files import read_saved_manifest, recorded_scoring
from alignpipe.rewards.ensemble_scorer import bradley_terry_pairwise
from alignpipe.rewards.penalties import EnsembleRewards

log = logging.getLogger("alignpipe")

__all__ = [
    "SINGLE_FORMAT",
    "SINGLE_FORMAT_VERSION",
    "TEXT_FORMATS",
    "SingleRewardScorer",
    "TextFormat",
    "dataset_text_format",
    "read_single_manifest",
    "save_single_reward_model",
    "train_single_reward_model",
]

SINGLE_FORMAT = "alignpipe-reward-single"
SINGLE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TEXT_FORMAT_ATTR = "alignpipe_text_format"  # model.config attribute, so the format is also in config.json

TextFormat = Literal["chat", "plain"]
TEXT_FORMATS: tuple[str, ...] = get_args(TextFormat)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

def dataset_text_format(rows) -> TextFormat:
    """``"chat"`` when the rows are conversational (TRL's ``is_conversational`` on the first row), else ``"plain"``."""
    from trl.data_utils import is_conversational

    if len(rows) == 0:
        raise ValueError("the preference dataset is empty")
    return "chat" if is_conversational(rows[0]) else "plain"


def single_turn_rows(rows):
    """Conversational rows whose prompt is one user message and whose replies are one assistant message each: a
    longer prompt (system prompt, earlier turns) or reply becomes one message holding its :func:`plain_text`. Rows
    already in that form are unchanged, and so are plain-text rows and rows without a ``prompt`` column."""
    from alignpipe.data.pairing import plain_text

    if "prompt" not in rows.column_names or dataset_text_format(rows) != "chat":
        return rows

    roles = {"prompt": "user", "chosen": "assistant", "rejected": "assistant"}

    def one_message(field: list[dict], role: str) -> list[dict]:
        return field if len(field) == 1 else [{"role": role, "content": plain_text(field)}]

    if all(len(row[column]) == 1 for row in rows for column in roles):
        return rows
    return rows.map(lambda row: {column: one_message(row[column], role) for column, role in roles.items()},
                    desc="single-turn prompts")


def _load_tokenizer(name_or_path: str | os.PathLike[str], text_format: TextFormat):
    """``load_tokenizer``'s checks for the rows' format (a chat template for conversations, an EOS token to end
    plain texts), keeping the tokenizer's padding side."""
    tokenizer = load_tokenizer(str(name_or_path), require_chat_template=text_format == "chat", padding_side=None)
    if text_format == "plain" and tokenizer.eos_token is None:
        raise ModelError(f"tokenizer at {str(name_or_path)!r} has no EOS token, which plain-text rows need; set "
                         "eos_token in its tokenizer_config.json")
    return tokenizer


def _seq_cls_lora(lora):
    """A copy of ``lora`` with ``task_type=SEQ_CLS``. PEFT then trains the new ``score`` head in full
    (``modules_to_save``), as TRL recommends. A causal-LM LoRA config would leave the head at its random init."""
    from peft import TaskType

    config = copy.deepcopy(lora)
    if config.task_type not in (None, TaskType.SEQ_CLS, "SEQ_CLS"):
        log.info("single reward model: LoRA task_type %s replaced by SEQ_CLS", config.task_type)
    config.task_type = TaskType.SEQ_CLS
    return config


def train_single_reward_model(
    backbone: str,
    rows,
    output_dir: Path,
    *,
    learning_rate: float = 1e-4,
    num_train_epochs: float = 1.0,
    per_device_train_batch_size: int = 8,
    max_length: int = 512,
    lora=None,
    seed: int = 0,
    logging_steps: int = 10,
    callbacks: Iterable = (),
    max_steps: int = -1,
    center_rewards_coefficient: float | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    train: Callable[[Any], None] | None = None,
):
    """Train one reward model on ``rows`` with TRL's ``RewardTrainer``; return ``(model, tokenizer, trainer)``.

    Args:
        backbone: local path or hub id. It is loaded as ``AutoModelForSequenceClassification`` with ``num_labels=1``
            in float32. TRL calls ``set_seed(seed)`` first, so the new head's init is reproducible.
        rows: a ``datasets.Dataset`` in TRL preference format: ``prompt``/``chosen``/``rejected`` (conversational
            or plain strings), or ``chosen``/``rejected`` with the prompt inside them. An optional ``margin`` column
            is used by TRL's loss. Other columns are ignored (TRL's ``remove_unused_columns``).
        output_dir: the trainer's ``output_dir``. Checkpointing is off (``save_strategy="no"``) unless
            ``config_overrides`` turns it on; publish the model with :func:`save_single_reward_model`.
        max_length: pairs whose chosen or rejected sequence is longer are DROPPED by TRL (logged here).
        lora: a ``peft.LoraConfig`` for LoRA training (its ``task_type`` is forced to ``SEQ_CLS``, so the head is
            trained too), or None for full fine-tuning.
        callbacks: ``transformers.TrainerCallback`` instances (e.g. ``alignpipe.trainers.common.MetricsLogger``).
        max_steps: > 0 overrides ``num_train_epochs``.
        center_rewards_coefficient: TRL's auxiliary ``coef · mean((r_c + r_r)²)`` term (None = off).
        config_overrides: any other ``RewardConfig`` fields; they win over everything above.
        train: runs the built trainer (default ``trainer.train()``); the reward stage passes its resuming runner.

    CPU and GPU defaults follow :func:`alignpipe.trainers.common.trainer_arguments`: bf16 only where the GPU supports
    it, gradient checkpointing off (TRL 1.16 turns both on by default), ``use_cpu`` without CUDA, ``report_to=[]``.

    The returned ``model`` is ``trainer.model`` (a ``PeftModel`` under LoRA), in eval mode. Its
    ``config.alignpipe_text_format`` records ``"chat"`` or ``"plain"`` (module docstring).
    """
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from alignpipe.models.loading import activation_checkpointing_argument, resolve_bf16

    if not isinstance(rows, Dataset):
        raise TypeError(f"rows must be a datasets.Dataset, got {type(rows).__name__}")
    missing = {"chosen", "rejected"} - set(rows.column_names)
    if missing:
        raise ValueError(f"preference rows need 'chosen' and 'rejected' columns; missing {sorted(missing)} "
                         f"(columns: {rows.column_names})")
    text_format = dataset_text_format(rows)
    rows = single_turn_rows(rows)  # train on what the scorer will feed the model
    tokenizer = _load_tokenizer(backbone, text_format)

    arguments: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": learning_rate,
        "num_train_epochs": num_train_epochs,
        "max_steps": max_steps,
        "per_device_train_batch_size": per_device_train_batch_size,
        "max_length": max_length,
        "logging_steps": logging_steps,
        "center_rewards_coefficient": center_rewards_coefficient,
        "bf16": resolve_bf16(None),
        "use_cpu": not torch.cuda.is_available(),
        "seed": seed,
        "data_seed": seed,
        "report_to": [],
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "model_init_kwargs": {"dtype": "float32", **remote_code_kwargs()},
    }
    arguments.update(activation_checkpointing_argument(False))
    arguments.update(config_overrides or {})
    args = RewardConfig(**arguments)

    with _quiet_peft():
        trainer = RewardTrainer(
            model=str(backbone),
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
            callbacks=list(callbacks),
            peft_config=_seq_cls_lora(lora) if lora is not None else None,
        )
        kept = len(trainer.train_dataset)
        if kept == 0:
            raise ValueError(f"every preference pair is longer than max_length={max_length} tokens; "
                             "nothing to train on")
        if kept < len(rows):
            log.warning("single reward model: %d of %d pairs are longer than max_length=%d tokens and were dropped",
                        len(rows) - kept, len(rows), max_length)
        (train or (lambda t: t.train()))(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    setattr(model.config, TEXT_FORMAT_ATTR, text_format)
    model.eval()
    return model, tokenizer, trainer


# ---------------------------------------------------------------------------------------------------------------------
# Save / manifest
# ---------------------------------------------------------------------------------------------------------------------

def _text_format_of(model, tokenizer, text_format: str | None) -> TextFormat:
    if text_format is None:
        text_format = getattr(model.config, TEXT_FORMAT_ATTR, None)
    if text_format is None:
        text_format = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if text_format not in TEXT_FORMATS:
        raise ValueError(f"text_format must be one of {list(TEXT_FORMATS)}, got {text_format!r}")
    return text_format  # type: ignore[return-value]


def save_single_reward_model(
    model, tokenizer, directory: str | os.PathLike[str], *, text_format: TextFormat | None = None,
    max_length: int | None = None,
) -> Path:
    """Write a reward model to ``directory`` (replacing it) atomically and return the path.

    LoRA is merged into the weights of a deep COPY, so ``model`` itself stays a usable ``PeftModel``. This costs a
    second copy of the weights in memory while saving. The directory gets ``save_pretrained`` (safetensors),
    ``tokenizer.save_pretrained`` and ``manifest.json``. Everything is written to a hidden staging directory next to
    ``directory``, which :func:`~alignpipe.pipeline.rundir.publish_directory` moves into place.

    ``text_format`` defaults to ``model.config.alignpipe_text_format`` (set by :func:`train_single_reward_model`),
    else ``"chat"`` when the tokenizer has a chat template, else ``"plain"``. ``max_length`` (the reward stage's) is
    recorded for :meth:`SingleRewardScorer.load` to default to, so a judge scores as the stage's evaluation did.
    """
    from peft import PeftModel

    directory = Path(directory)
    text_format = _text_format_of(model, tokenizer, text_format)
    if isinstance(model, PeftModel):
        with _quiet_peft():
            merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = model
    if getattr(merged.config, "num_labels", None) != 1:
        raise ValueError(f"a reward model needs num_labels=1, got {getattr(merged.config, 'num_labels', None)}")
    had_format, old_format = hasattr(merged.config, TEXT_FORMAT_ATTR), getattr(merged.config, TEXT_FORMAT_ATTR, None)
    setattr(merged.config, TEXT_FORMAT_ATTR, text_format)  # into the saved config.json

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.staging-"))
    try:
        os.chmod(staging, 0o755)
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / MANIFEST_FILE, {
            "format": SINGLE_FORMAT,
            "version": SINGLE_FORMAT_VERSION,
            "members": 1,
            "text_format": text_format,
            "base_model": str(getattr(merged.config, "_name_or_path", "") or ""),
            "scoring": {"max_length": max_length},
        })
        publish_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if merged is model:  # a fully fine-tuned model is the caller's own: saving must not change how it scores
            if had_format:
                setattr(model.config, TEXT_FORMAT_ATTR, old_format)
            else:
                delattr(model.config, TEXT_FORMAT_ATTR)
    return directory


def read_single_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated manifest of a saved single reward model. Errors name the directory."""
    manifest = read_saved_manifest(directory, what="reward model", fmt=SINGLE_FORMAT, version_key="version",
                                   version=SINGLE_FORMAT_VERSION)
    path = Path(directory) / MANIFEST_FILE
    if manifest.get("members") != 1:
        raise ValueError(f"{path}: members must be 1, got {manifest.get('members')!r}")
    if manifest.get("text_format", "chat") not in TEXT_FORMATS:
        raise ValueError(f"{path}: text_format {manifest.get('text_format')!r} is not one of {list(TEXT_FORMATS)}")
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Scorer
# ---------------------------------------------------------------------------------------------------------------------

class SingleRewardScorer:
    """Batched scoring of (prompt, response) pairs with one sequence-classification reward model.

    Same interface as :class:`~alignpipe.rewards.ensemble_scorer.EnsembleScorer`: ``score`` returns
    :class:`EnsembleRewards` with ``per_member`` ``[N, 1]`` and ``std ≡ 0``. ``pairwise_probabilities`` is
    ``σ(r(a) − r(b))`` (so it is also a :class:`alignpipe.rewards.judges.PairwiseJudge`). ``judge_id`` names it.

    ``text_format`` (None = ``model.config.alignpipe_text_format``, else ``"chat"`` when the tokenizer has a chat
    template) must be the format the model was trained on; see the module docstring. Batches are padded on the right
    with the model config's ``pad_token_id``, as in TRL's collator. When the config has none, the tokenizer's pad
    (else EOS) id is written to it, as ``RewardTrainer`` does.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 32,
        max_length: int = 512,
        judge_id: str | None = None,
        text_format: TextFormat | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if getattr(model.config, "num_labels", None) != 1:
            raise ValueError(f"a reward model needs num_labels=1, got {getattr(model.config, 'num_labels', None)}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.text_format: TextFormat = _text_format_of(model, tokenizer, text_format)
        if self.text_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("text_format 'chat' needs a tokenizer with a chat template")
        if self.text_format == "plain" and tokenizer.eos_token is None:
            raise ValueError("text_format 'plain' needs a tokenizer with an EOS token (TRL appends it)")
        text_config = model.config.get_text_config()
        if text_config.pad_token_id is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad is None:
                raise ValueError("neither the model config nor the tokenizer has a pad or EOS token id")
            text_config.pad_token_id = pad
        self.pad_token_id = int(text_config.pad_token_id)
        # collate_features reads only these attributes: pad on the right with the model's pad id, like TRL.
        self._collator_view = SimpleNamespace(pad_token_id=self.pad_token_id, eos_token_id=None,
                                              padding_side="right")
        name = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name
        self.judge_id = judge_id or f"reward_single:{name}"

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> SingleRewardScorer:
        """Load a directory written by :func:`save_single_reward_model`. ``judge_id`` defaults to
        ``reward_single:<directory name>``, ``text_format`` and ``max_length`` to the manifest's (512 for a model
        saved without one)."""
        from transformers import AutoModelForSequenceClassification

        directory = Path(directory)
        manifest = read_single_manifest(directory)
        text_format = manifest.get("text_format", "chat")
        recorded_scoring(manifest, kwargs)
        with zero3_partitioning_off():  # a judge or reward source inside a ZeRO-3 policy stage
            model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=dtype)
        if device is not None:
            model.to(device)
        model.eval()
        tokenizer = _load_tokenizer(directory, text_format)
        kwargs.setdefault("judge_id", f"reward_single:{directory.resolve().name}")
        kwargs.setdefault("text_format", text_format)
        return cls(model, tokenizer, **kwargs)

    @property
    def num_members(self) -> int:
        return 1

    def encode_features(self, prompts: Sequence[str], responses: Sequence[str], *, max_length: int | None = None,
                        ) -> list[dict[str, list[int]]]:
        """Unpadded token ids per (prompt, response), formatted as in training and keeping the LAST ``max_length``
        tokens (default: the model's own ``self.max_length``)."""
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and "
                             f"{len(responses)}")
        max_length = self.max_length if max_length is None else max_length
        if self.text_format == "chat":
            return encode_examples(self.tokenizer, prompts, responses, max_length=max_length)
        eos = self.tokenizer.eos_token
        out: list[dict[str, list[int]]] = []
        for prompt, response in zip(prompts, responses):
            text = prompt + (response if response.endswith(eos) else response + eos)
            ids = list(self.tokenizer(text)["input_ids"])
            out.append({"input_ids": ids[-max_length:]})
        return out

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, Tensor]:
        """One right-padded batch (``input_ids``, ``attention_mask``), exactly what the model is scored on."""
        return collate_features(self._collator_view, self.encode_features(prompts, responses))

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> EnsembleRewards:
        """Rewards ``[N, 1]`` (float32) with ``mean`` = the reward and ``std`` = 0, in batches of ``batch_size``
        (length-sorted, returned in input order). Eval mode while scoring; the previous mode is restored."""
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses must have the same length, got {len(prompts)}, {len(responses)}")
        if not prompts:
            raise ValueError("nothing to score")
        features = self.encode_features(prompts, responses)
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        out = torch.empty((len(features), 1), dtype=torch.float32)
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                batch = collate_features(self._collator_view, [features[i] for i in idx])
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = self.model(**batch, use_cache=False).logits
                out[torch.tensor(idx)] = logits.float().reshape(len(idx), 1).cpu()
        finally:
            self.model.train(was_training)
        return EnsembleRewards.from_members(out)

    def pairwise_probabilities(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """``σ(r(a) − r(b))`` per triple (``a`` and ``b`` scored in one call)."""
        return bradley_terry_pairwise(self.score, prompts, a, b)
