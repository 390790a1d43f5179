"""Preflight: the checks a run can make in seconds, before the runner writes ``runs/<name>/`` or loads any weights.

Why: a bad row in a dataset file or a broken tokenizer should fail at once, naming the file, the row or key and the
fix, and leave no half-made run directory behind; inside a stage it would surface only after the base model was
built and the stage directory created. The checks read local files only, through the code the stages use (the
data adapters, ``load_tokenizer``), plus model configs; never weights. Hub ids (models or datasets) are left to the
stages, which may have network access where this process has none. transformers and datasets are imported only
when a check needs them, so importing the runner stays cheap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignpipe.data.errors import DataError
from alignpipe.data.rows import looks_like_path
from alignpipe.data.truncation import trains_truncated
from alignpipe.models.checkpoint_files import TOKENIZER_FILES, has_tokenizer_files
from alignpipe.recipe import (
    DPOStage,
    ModelSpec,
    Recipe,
    RewardStage,
    SFTDataSpec,
    SFTStage,
    TinyModelSpec,
)

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["PreflightError", "model_tokenizer", "preflight"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
SYNTHETIC_ROWS = "the synthetic task's rows"  # where a length problem is, for a stage on the built-in task
SAMPLING_BUDGETS = ("max_new_tokens", "max_completion_length")  # online/ppo/bon/eval stages; grpo/rloo (TRL's name)


log = logging.getLogger("alignpipe")


class PreflightError(ValueError):
    """Everything the preflight found wrong, one ``key: problem`` line each, raised before anything is written."""

    def __init__(self, recipe: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(f"recipe '{recipe}' cannot start; nothing was written (fix these and run again):{lines}")


def preflight(recipe: Recipe) -> None:
    """Check the recipe's local model, reward backbones, dataset files and reward callables (imported, as the stage
    will); raise one PreflightError listing every problem. Cheap: tokenizers, configs and rows are read, weights are
    not."""
    problems: list[str] = []
    pairs = _PreferencePairs(recipe)
    model_key = "model.gguf_package" if recipe.model.gguf_package is not None else "model.name_or_path"
    tokenizer = _checked(problems, model_key, lambda: _model_tokenizer(recipe, pairs))
    longest = _LongestTaskPrompt()
    # the model's positions, read once (a local config) for every stage that samples or scores pairs
    positions = _checked(problems, model_key, lambda: _position_limit(recipe)) if tokenizer is not None else None
    for stage in recipe.stages:
        if isinstance(stage, RewardStage) and stage.backbone is not None:
            _checked(problems, f"stages.{stage.name}.backbone", lambda s=stage: _check_backbone(
                s, conversations=_trl_reward_on_conversations(s, pairs), remote_code=recipe.model.trust_remote_code))
        if isinstance(stage, RewardStage) and stage.top_layers is not None:
            _checked(problems, f"stages.{stage.name}.top_layers", lambda s=stage: _check_top_layers(recipe, s))
        if getattr(stage, "lora", None) is not None and isinstance(stage.lora.target_modules, list):
            _checked(problems, f"stages.{stage.name}.lora.target_modules",
                     lambda s=stage: _check_lora_targets(recipe, s))
        if isinstance(stage, SFTStage) and stage.assistant_only_loss and tokenizer is not None:
            _checked(problems, f"stages.{stage.name}.assistant_only_loss",
                     lambda s=stage: _sft_template(tokenizer, s))
        if isinstance(stage, SFTStage | DPOStage | RewardStage):
            _checked(problems, f"stages.{stage.name}.dataset",
                     lambda s=stage: _check_dataset(recipe, s, tokenizer, pairs))
        if (budget := _sampling_budget(stage)) is not None and positions is not None:
            _checked(problems, f"stages.{stage.name}" + (f".{budget[0]}" if budget[0] else ""),
                     lambda s=stage, b=budget: _check_sampling_positions(recipe, tokenizer, s, *b, longest, positions))
        if (draw := _heldout_draw(recipe, stage)) is not None:
            _checked(problems, f"stages.{stage.name}" + (f".{draw[0]}" if draw[0] else ""),
                     lambda d=draw: _check_heldout_prompts(recipe, *d[1:]))
        if getattr(stage, "implicit_reward_pairs", 0) and positions is not None:
            _checked(problems, f"stages.{stage.name}.implicit_reward_pairs",
                     lambda s=stage: _check_implicit_pairs(recipe, tokenizer, s, positions))
        if getattr(stage, "reward", None) is not None and stage.reward.source == "callable":
            from alignpipe.rewards.plugin import load_callable

            _checked(problems, f"stages.{stage.name}.reward.callable", lambda s=stage: load_callable(s.reward.callable))
    if problems:
        raise PreflightError(recipe.name, problems)


def model_tokenizer(recipe: Recipe):
    """The recipe model's tokenizer, found and checked as :func:`preflight` does (local folder, GGUF file or package,
    hub model already in the cache, the tiny model's trained as the runner trains it), for measuring data before a run
    (``alignpipe data``). None for a hub model not fetched yet, one whose own code would have to run, or the tiny
    model when no stage reads a data file or samples."""
    return _model_tokenizer(recipe, _PreferencePairs(recipe))


class _PreferencePairs:
    """Each stage's local preference pairs, read once per preflight: a trl reward file is read both to see whether its
    rows are conversations (which decides the tokenizer checks) and to check the rows themselves. A read that fails
    is kept too, so the dataset check reports the same error without reading the file again."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self._read: dict[str, Dataset | ValueError | OSError] = {}

    def __call__(self, stage: DPOStage | RewardStage) -> Dataset:
        if stage.name not in self._read:
            from alignpipe.data.preference import preference_pairs_for

            try:
                self._read[stage.name] = preference_pairs_for(stage.dataset, self.recipe.data, self.recipe.seed)
            except (ValueError, OSError) as error:
                self._read[stage.name] = error
        if isinstance(read := self._read[stage.name], Exception):
            raise read
        return read


def _checked(problems: list[str], key: str, check: Callable[[], Any]) -> Any:
    """Run one check; a data or model problem becomes a line under ``key`` (other exceptions are bugs and
    propagate)."""
    try:
        return check()
    except (ValueError, OSError) as error:  # DataError, ModelError, and the OS errors of reading a local file
        problems.append(f"{key}: {error}")
        return None


# ----------------------------------------------------------------------------- models and tokenizers


def _local_dir(name_or_path: str) -> Path | None:
    """The local directory a model name points at; None for a hub id (``owner/name``, checked by the stage when it
    downloads). A name written as a path (absolute, ``./``, ``~``, deeper nesting) that does not exist is an error
    here, before anything runs, rather than a failed hub download later."""
    from alignpipe.models.loading import ModelError, resolve_model_location

    path = Path(resolve_model_location(name_or_path))
    if path.exists():
        return path.absolute()  # absolute: "model has no config.json" would read badly
    if looks_like_path(str(name_or_path)):
        raise ModelError(f"{name_or_path} does not exist; give an existing checkpoint directory (one with "
                         "config.json and the weights) or a Hugging Face hub id such as owner/name")
    return None


def _model_tokenizer(recipe: Recipe, pairs: _PreferencePairs):
    """The recipe model's tokenizer once its folder is checked; None when there is nothing local to check.

    A GGUF model's tokenizer is read from the file's metadata (5-15 s on two busy cores; the weights are not read),
    or, for a GGUF package already converted, from the cached conversion the stages load (~1 s)."""
    spec = recipe.model
    if spec.is_tiny:  # trained on the task text in well under a second, as the runner trains it
        from alignpipe.models.factory import tiny_tokenizer

        return tiny_tokenizer(recipe)
    if spec.gguf_package is not None:
        return _gguf_package_tokenizer(spec, chat_template=_needs_chat_template(recipe, pairs))
    from alignpipe.models.loading import ModelError

    folder = _local_dir(spec.name_or_path)
    if folder is None:
        folder = _fetched_hub_folder(spec)
        if folder is None:
            return None
    elif spec.revision is not None:
        raise ModelError(f"{spec.name_or_path} is a local folder, which has no revisions; drop model.revision (it "
                         "pins a hub model's branch, tag or commit)")
    if spec.gguf_file is not None:
        if not (folder / spec.gguf_file).is_file():
            raise ModelError(f"{folder}: no GGUF file {spec.gguf_file!r} there; set model.gguf_file to one of "
                             f"{sorted(p.name for p in folder.glob('*.gguf')) or 'its *.gguf files (none found)'}")
        return _tokenizer(folder, gguf_file=spec.gguf_file, chat_template=_needs_chat_template(recipe, pairs))
    _require_files(folder, weights=True)
    if spec.trust_remote_code:
        return None  # loading would run the checkpoint's own code; the stage does that, with the warning
    tokenizer = _tokenizer(folder, chat_template=_needs_chat_template(recipe, pairs))
    _check_vocab(folder, tokenizer)
    return tokenizer


def _fetched_hub_folder(spec: ModelSpec) -> Path | None:
    """The snapshot folder of the recipe's hub model when its files are already in the Hugging Face cache (checked
    like a local folder); None while they are still to be downloaded. Resolving the revision (one request, or the
    cache offline) is the check: a model or revision the Hub does not have fails here, not in the first stage."""
    from alignpipe.models import hub

    return _fetched_folder(hub.resolve_model(spec))


def _fetched_folder(snapshot) -> Path | None:
    """A pinned hub snapshot's folder when every file it needs is in the Hugging Face cache; None until fetched."""
    from alignpipe.models import hub

    folder = hub.snapshot_folder(snapshot)
    return folder if all((folder / name).is_file() for name in snapshot.files) and folder.is_dir() else None


def _gguf_package_tokenizer(spec: ModelSpec, *, chat_template: bool):
    """The tokenizer the stages get from ``model.gguf_package`` (the converted checkpoint's, with the recipe's
    ``chat_template``), without converting: from the cached conversion when there is one, else from the GGUF file.
    A template the recipe installs (``chatml``) needs none in the file."""
    from alignpipe.models.chat_templates import apply_chat_template_choice
    from alignpipe.models.gguf import cached_conversion, gguf_package_file

    own_template = chat_template and spec.chat_template == "own"
    if (converted := cached_conversion(spec.gguf_package)) is not None:
        tokenizer = _tokenizer(converted, chat_template=own_template)
    else:
        path = gguf_package_file(spec.gguf_package)
        tokenizer = _tokenizer(path.parent, gguf_file=path.name, chat_template=own_template)
    return apply_chat_template_choice(tokenizer, spec.chat_template)


def _check_backbone(stage: RewardStage, *, conversations: bool, remote_code: bool) -> None:
    """The ensemble pair-encodes plain text when its backbone has no chat template, so only pad/EOS are required;
    TRL's RewardTrainer renders ``conversations`` (every built-in source's rows) with the chat template. A hub
    backbone is resolved (a missing one fails here) and checked once it is in the cache."""
    from alignpipe.models.loading import ModelError

    folder = _local_dir(stage.backbone)
    if folder is None:
        from alignpipe.models import hub

        folder = _fetched_folder(hub.resolve_backbone(stage, remote_code=remote_code))
        if folder is None:
            return
    _require_files(folder, weights=True)
    try:
        tokenizer = _tokenizer(folder, chat_template=conversations)
    except ModelError as error:
        if not conversations or "chat template" not in str(error):
            raise
        raise ModelError(f"{error}; or keep this backbone with implementation: ensemble, which pair-encodes "
                         "prompt and response without a template") from error
    _check_vocab(folder, tokenizer)


def _check_top_layers(recipe: Recipe, stage: RewardStage) -> None:
    """``top_layers`` may not exceed the backbone's depth (known from the tiny spec or a local config.json)."""
    from alignpipe.models.loading import ModelError

    found = _backbone_depth(recipe, stage)
    if found is not None and stage.top_layers > found[1]:
        raise ModelError(f"top_layers is {stage.top_layers} but the backbone ({found[0]}) has {found[1]} layers; "
                         f"set top_layers to at most {found[1]}, or null to adapt every layer")


def _backbone_depth(recipe: Recipe, stage: RewardStage) -> tuple[str, int] | None:
    """(name, layer count) of the model a reward stage adapts (:func:`_adapted_model`), read from the tiny spec or
    the folder's config.json; None when neither is at hand."""
    found = _adapted_model(recipe, stage)
    if isinstance(found, TinyModelSpec):
        return "the tiny model, model.tiny.num_layers", found.num_layers
    if found is None:
        return None
    try:
        config = json.loads((found / "config.json").read_text())
    except (OSError, ValueError):
        return None  # an unreadable config is the loader's error to report
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            return str(found), config[key]
    return None


def _adapted_model(recipe: Recipe, stage) -> TinyModelSpec | Path | None:
    """What ``stage`` puts adapters on, when it is known without a download: a reward stage's local ``backbone``,
    else the recipe's model (its tiny spec, or its local folder; an input checkpoint has the recipe model's
    architecture). A folder is returned only when it holds a config.json; None for hub ids and GGUF models."""
    if isinstance(stage, RewardStage) and stage.backbone is not None:
        return _local_config_folder(stage.backbone)
    if recipe.model.is_tiny:
        return recipe.model.tiny
    if recipe.model.gguf_package or recipe.model.gguf_file:
        return None
    return _local_config_folder(recipe.model.name_or_path)


def _check_lora_targets(recipe: Recipe, stage) -> None:
    """Every listed ``lora.target_modules`` entry must name a module of the model the stage adapts. Why: PEFT
    raises only when no entry matches and silently skips the others, so a typo would train fewer layers than asked.
    Names come from the architecture built on the meta device (no weights); PEFT's rule: a module matches an entry
    when its name equals it or ends with ``.<entry>``."""
    from alignpipe.models.loading import ModelError

    found = _architecture(recipe, stage)
    if found is None:
        return
    where, model = found
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in stage.lora.target_modules if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        import torch

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(f"{missing} match no module of {where}; its linear layers are named {linear}: list some of "
                         "those, or use target_modules: all-linear")


def _architecture(recipe: Recipe, stage):
    """(description, model on the meta device) of what ``stage`` puts adapters on (:func:`_adapted_model`): the
    bare backbone for a reward stage, the causal LM otherwise. None when unknown or the checkpoint's own code would
    have to run."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from alignpipe.models.tiny import tiny_config

    found = _adapted_model(recipe, stage)
    if isinstance(found, TinyModelSpec):
        config, where = tiny_config(vocab_size=found.vocab_size, hidden_size=found.hidden_size,
                                    num_layers=found.num_layers, num_heads=found.num_heads,
                                    intermediate_size=found.intermediate_size,
                                    max_position_embeddings=found.max_position_embeddings), "the tiny model"
    elif found is None or recipe.model.trust_remote_code:
        return None
    else:
        try:
            config, where = AutoConfig.from_pretrained(found), str(found)
        except (OSError, ValueError):
            return None  # an unreadable config is the loader's error to report
    with torch.device("meta"):
        return where, (AutoModel if isinstance(stage, RewardStage) else AutoModelForCausalLM).from_config(config)


def _local_config_folder(name: str) -> Path | None:
    """The local folder of ``name`` when it holds a config.json; None for hub ids and for folders the model /
    backbone checks already report (missing path, no config)."""
    try:
        folder = _local_dir(name)
    except ValueError:
        return None
    return folder if folder is not None and (folder / "config.json").is_file() else None


def _needs_chat_template(recipe: Recipe, pairs: _PreferencePairs) -> bool:
    """Policy stages render conversations with the model's template; a reward stage on the recipe's model does so
    when it samples the policy it starts from (synthetic data) or trains through TRL on conversational rows."""
    return any(not isinstance(s, RewardStage) or (s.backbone is None and (
        s.dataset.source == "synthetic" or _trl_reward_on_conversations(s, pairs))) for s in recipe.stages)


def _trl_reward_on_conversations(stage: RewardStage, pairs: _PreferencePairs) -> bool:
    """Whether TRL's RewardTrainer will render this stage's rows with a chat template: every built-in source gives
    conversational rows; a ``trl`` dataset file is read to see (the ensemble pair-encodes either kind)."""
    if stage.implementation != "trl":
        return False
    if stage.dataset.source != "trl":
        return True
    if not _is_local(stage.dataset.path):
        return False  # a hub dataset: the stage checks it after downloading
    from alignpipe.rewards.single import dataset_text_format

    try:
        return dataset_text_format(pairs(stage)) == "chat"
    except (ValueError, OSError):
        return False  # unreadable or empty: the dataset check reports it


def _require_files(folder: Path, *, weights: bool) -> None:
    from alignpipe.models.loading import ModelError

    if not folder.is_dir():
        raise ModelError(f"{folder} is a file, not a model directory; give the directory that holds config.json "
                         "(for a GGUF file: the directory as model.name_or_path and the file name as model.gguf_file)")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if weights and not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"weights ({' or '.join(WEIGHT_FILES[:3])})")
    if not has_tokenizer_files(folder):
        missing.append(f"tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    if missing:
        raise ModelError(f"{folder} has no {'; no '.join(missing)}; save the complete model there with "
                         "model.save_pretrained(dir) and tokenizer.save_pretrained(dir), or point at the directory "
                         "that has them")


def _tokenizer(folder: Path, *, chat_template: bool, gguf_file: str | None = None):
    from alignpipe.models.loading import ModelError, load_tokenizer

    try:
        return load_tokenizer(str(folder), gguf_file=gguf_file, require_chat_template=chat_template)
    except ModelError:
        raise
    except Exception as error:  # transformers raises many kinds for a broken folder; the path and the fix matter
        where, fix = ((folder / gguf_file, "give a complete GGUF model file (reading one needs `pip install gguf`)")
                      if gguf_file else (folder, "save it again with tokenizer.save_pretrained(dir)"))
        raise ModelError(f"{where}: its tokenizer does not load ({type(error).__name__}: {str(error)[:300]}); "
                         f"{fix}") from error


def _check_vocab(folder: Path, tokenizer) -> None:
    """Token ids at or above the config's vocab_size have no embedding row: the first batch would index past it."""
    from transformers import AutoConfig

    from alignpipe.models.loading import ModelError

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as error:  # as above: a broken config.json fails in many ways inside transformers
        raise ModelError(f"{folder}/config.json does not load ({type(error).__name__}: {str(error)[:300]}); "
                         "save the model again with model.save_pretrained(dir)") from error
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(vocab_size, int) and len(tokenizer) > vocab_size:
        raise ModelError(f"{folder}: the tokenizer has {len(tokenizer)} tokens but config.json's vocab_size is "
                         f"{vocab_size}, so ids >= {vocab_size} have no embedding; use the tokenizer saved with this "
                         "model, or call model.resize_token_embeddings(len(tokenizer)) and save both again")


# ----------------------------------------------------------------------------- sampling


def _sampling_budget(stage) -> tuple[str | None, int] | None:
    """(key, value) of the tokens ``stage`` samples per prompt of the recipe's task; None for a stage that samples
    nothing. A reward stage on the task without a backbone samples its starting policy at the harness's default
    budget (to score its uncertainty against the gold reward): no key sets it."""
    for key in SAMPLING_BUDGETS:
        if isinstance(value := getattr(stage, key, None), int):
            return key, value
    if isinstance(stage, RewardStage) and stage.backbone is None and stage.dataset.source == "synthetic":
        from alignpipe.evaluation.generation import GenerationSettings

        return None, GenerationSettings().max_new_tokens
    return None


class _LongestTaskPrompt:
    """The longest prompt of the recipe's task, (text, tokens in the model's chat template), measured once per
    preflight on :func:`longest_prompts`."""

    def __init__(self) -> None:
        self._found: tuple[str, int] | None = None

    def __call__(self, recipe: Recipe, tokenizer) -> tuple[str, int]:
        if self._found is None:
            from alignpipe.data.synthetic import task_space
            from alignpipe.evaluation.generation import render_prompts
            from alignpipe.tasks.synthetic import longest_prompts

            prompts = longest_prompts(task_space(recipe.data))
            lengths = [_token_count(tokenizer, text) for text in render_prompts(tokenizer, prompts)]
            self._found = max(zip(prompts, lengths), key=lambda found: found[1])
        return self._found


def _token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_sampling_positions(recipe: Recipe, tokenizer, stage, key: str | None, budget: int,
                              longest: _LongestTaskPrompt, positions: tuple[int, str, str]) -> None:
    """A stage's prompts and the ``budget`` tokens it samples after each (and the end of turn a kept truncated reply
    trains with) must fit the model's positions. Why here: the eval harness refuses such samples only when the eval
    stage starts, after every stage before it has trained, and the other stages sample past the positions silently
    (rotary positions extrapolate; learned ones fail). A self-judging stage whose judge prompts (two replies each)
    run past them is warned of, as the judge itself warns when it reads them. ``positions``: :func:`_position_limit`."""
    limit, where, raise_it = positions
    text, prompt = longest(recipe, tokenizer)
    # a kept truncated reply (keep; reject's rejected side) trains with the end of turn appended, unless the stage's
    # max_length cuts the row first
    policy = getattr(stage, "truncated_samples", None)
    keep = policy is not None and trains_truncated(policy) and getattr(stage, "max_length", limit + 1) > limit
    end = _reply_end_tokens(tokenizer) if keep else 0
    if (reach := prompt + budget + end) > limit:
        room = limit - prompt - end
        fixes = [*([f"lower {key} to {room} or less"] if key and room > 0 else []), "lower data.max_items",
                 *([raise_it] if raise_it else [])]
        sampling = (f"with {key} {budget}" if key else
                    f"sampling its starting policy ({budget} new tokens, to score its uncertainty against the gold "
                    "reward)")
        kept = f" and the {end} end-of-turn token(s) a kept truncated reply trains with" if end else ""
        raise ValueError(
            f"the recipe's task has prompts of {prompt} tokens (data.max_items {recipe.data.max_items}, in the "
            f"model's chat template), so {sampling}{kept} a sample reaches {reach} positions, past the {limit} of "
            f"{where}: {_any_of(fixes)}")
    judged = _judge_prompt_tokens(tokenizer, text) + 2 * budget if getattr(stage, "judge", None) == "self" else 0
    if judged > limit:
        log.warning("stages.%s: its self-judge's prompts hold the task prompt and two replies of up to %s %d: up to "
                    "%d tokens, past the %d positions of %s, so its verdicts read positions the model never learned; "
                    "lower %s or data.max_items, or judge with gold or a reward stage", stage.name, key, budget,
                    judged, limit, where, key)


def _reply_end_tokens(tokenizer) -> int:
    """The tokens the chat template ends an assistant turn with (after an empty reply). A template that refuses an
    assistant turn is refused here: the stage would train its rows as conversations, and fail on that template only
    after every stage before it had trained."""
    from alignpipe.models.chat_templates import rendered_turn

    rendered = rendered_turn(tokenizer, "")
    if rendered is None:
        raise ValueError("the model's chat template raises on an assistant turn, so this stage cannot train its "
                         "samples as conversations: give the model a template that renders one "
                         "(model.chat_template: chatml, where its vocabulary has ChatML's tokens)")
    prompt, turn = rendered
    return max(_token_count(tokenizer, turn) - _token_count(tokenizer, prompt), 0)


def _judge_prompt_tokens(tokenizer, prompt: str) -> int:
    """Tokens of the self-judge's prompt on ``prompt`` with two empty replies (the default template, the only one a
    recipe can set)."""
    from alignpipe.evaluation.generation import render_prompts
    from alignpipe.rewards.judges import DEFAULT_LABELS, DEFAULT_TEMPLATE

    question = DEFAULT_TEMPLATE.format(instruction=prompt, response_a="", response_b="", label_a=DEFAULT_LABELS[0],
                                       label_b=DEFAULT_LABELS[1])
    return _token_count(tokenizer, render_prompts(tokenizer, [question])[0])


def _check_implicit_pairs(recipe: Recipe, tokenizer, stage, positions: tuple[int, str, str]) -> None:
    """An eval stage's implicit-reward pairs (prompt and either reply) must fit the model's positions: the stage
    refuses them, after every stage before it has trained. The same pairs and the same check as the stage's. Called
    only for a stage that asks for pairs (``implicit_reward_pairs`` above 0)."""
    from alignpipe.data.synthetic import task_space
    from alignpipe.evaluation.harness import conversation_ids, synthetic_implicit_pairs

    try:
        pairs = synthetic_implicit_pairs(stage.implicit_reward_pairs, task_space(recipe.data))
    except ValueError:
        return  # too few held-out prompts: the stage leaves the pairs out with a warning
    limit, where, raise_it = positions
    longest = max(len(conversation_ids(tokenizer, prompt, reply)) for prompt, *replies in pairs for reply in replies)
    if longest > limit:
        fixes = ["set implicit_reward_pairs: 0", "lower data.max_items", *([raise_it] if raise_it else [])]
        raise ValueError(f"the stage scores {len(pairs)} held-out pairs of the task as conversations of up to "
                         f"{longest} tokens (prompt and reply, in the model's chat template), past the {limit} of "
                         f"{where}: {_any_of(fixes)}")


def _heldout_draw(recipe: Recipe, stage) -> tuple[str | None, int, int, str, list[str]] | None:
    """(key, count, seed, what for, fixes) of the task's held-out prompts ``stage`` samples; None for a stage that
    samples none. They must be distinct, and the held-out split is about 1 in 8 of the task's prompts, so a small task
    space (one family, few items) can hold fewer than a stage asks for, and the stage would stop after every stage
    before it had trained."""
    from alignpipe.data.synthetic import POLICY_SAMPLES
    from alignpipe.seeds import EVAL_SEED

    widen = ["raise data.max_items (or lower data.min_items)", "add data.families"]
    if stage.type in ("eval", "bon"):
        return "n_prompts", stage.n_prompts, stage.seed, "samples", ["lower n_prompts", *widen]
    if isinstance(getattr(stage, "eval_prompts", None), int):
        return "eval_prompts", stage.eval_prompts, EVAL_SEED, "evaluates on", ["lower eval_prompts", *widen]
    if isinstance(stage, RewardStage) and stage.backbone is None and stage.dataset.source == "synthetic":
        return (None, POLICY_SAMPLES, recipe.seed, "samples its starting policy (to score its uncertainty against the "
                "gold reward) on", [*widen, "give the stage a backbone"])
    return None


def _check_heldout_prompts(recipe: Recipe, count: int, seed: int, what_for: str, fixes: list[str]) -> None:
    """The stage's own draw (:func:`~alignpipe.data.synthetic.evaluation_tasks`): milliseconds, even for thousands."""
    from alignpipe.data.synthetic import evaluation_tasks

    try:
        evaluation_tasks(recipe.data, count, seed)
    except ValueError:
        data = recipe.data
        raise ValueError(f"the stage {what_for} {count} distinct held-out prompts of the task, more than its "
                         f"families {list(data.families)} with {data.min_items}..{data.max_items} items hold: "
                         f"{_any_of(fixes)}") from None


def _any_of(fixes: list[str]) -> str:
    """``a``, ``a or b``, ``a, b, or c``."""
    if len(fixes) < 3:
        return " or ".join(fixes)
    return f"{', '.join(fixes[:-1])}, or {fixes[-1]}"


def _position_limit(recipe: Recipe) -> tuple[int, str, str] | None:
    """(positions, whose, how to raise them) of the recipe's model, when its config is local; None when unknown (hub
    ids, GGUF files) or unbounded (:func:`~alignpipe.evaluation.harness.position_limit`)."""
    if recipe.model.is_tiny:
        return (recipe.model.tiny.max_position_embeddings, "the tiny model",
                "raise model.tiny.max_position_embeddings")
    if recipe.model.gguf_package or recipe.model.gguf_file or recipe.model.trust_remote_code:
        return None
    if (folder := _local_config_folder(recipe.model.name_or_path)) is None:
        return None
    from transformers import AutoConfig

    from alignpipe.evaluation.harness import position_limit

    try:
        limit = position_limit(AutoConfig.from_pretrained(folder))
    except (OSError, ValueError):
        return None  # an unreadable config is the loader's error to report
    return None if limit is None else (limit, f"{folder} (max_position_embeddings)", "")


# ----------------------------------------------------------------------------- datasets


def _check_dataset(recipe: Recipe, stage: SFTStage | DPOStage | RewardStage, tokenizer,
                   pairs: _PreferencePairs) -> None:
    """Resolve a hub dataset's revision and, offline, check that the datasets cache holds its rows at that commit.
    Load a local dataset as the stage will (same adapters, same limit), check
    that the stage can train on soft strengths if the pairs carry them (a trl file's own column), that a reward
    stage's held-out split leaves both sides non-empty and, with the model's tokenizer at hand, that every reply
    starts within max_length (for a reward stage trained with TRL, that some pair fits in it)."""
    spec = stage.dataset
    if spec.source == "synthetic":
        if tokenizer is not None and isinstance(stage, SFTStage | DPOStage):
            _check_synthetic_reply_room(recipe, stage, tokenizer, pairs)
        return
    if not _is_local(spec.path):  # resolved, not read: a missing dataset or revision fails here, not in the stage
        from alignpipe.data.hub_datasets import resolve_cached_dataset

        resolve_cached_dataset(spec.path, key=f"stages.{stage.name}.dataset.path")
        return
    if isinstance(spec, SFTDataSpec):
        from alignpipe.data.preference import sft_conversations_for

        conversations = sft_conversations_for(spec, recipe.seed)
        if tokenizer is not None:
            _check_sft_reply_room(spec.path, conversations, tokenizer, stage, recipe.seed)
        return
    from alignpipe.data.preference import check_soft_targets, reward_heldout_rows

    rows = pairs(stage)
    check_soft_targets(stage, rows)
    # a split with one side empty: the stage would refuse it after the earlier stages ran
    heldout = reward_heldout_rows(stage, rows) if isinstance(stage, RewardStage) else None
    if tokenizer is None or (isinstance(stage, RewardStage) and (stage.implementation != "trl"
                                                                 or stage.backbone is not None)):
        return  # the ensemble keeps the end of long texts; a backbone tokenizes with its own tokenizer
    from alignpipe.data.length_report import dpo_pair_spans, require_reward_pairs_within

    measured = dpo_pair_spans(rows, tokenizer, seed=recipe.seed, source=spec.path)
    if isinstance(stage, RewardStage):  # TRL's RewardTrainer drops the pairs longer than max_length
        require_reward_pairs_within(measured, stage.max_length, heldout, source=spec.path, stage=stage.name)
    else:
        _check_reply_room(spec.path, measured, "pair", stage, lambda row: _text(rows[row]["prompt"]))


def _check_synthetic_reply_room(recipe: Recipe, stage: SFTStage | DPOStage, tokenizer, pairs: _PreferencePairs
                                ) -> None:
    """The task's own rows, as the stage builds them, checked for room like a file's: with a max_length below the
    task's prompts TRL drops every row and the stage then stops on an empty sampler's error."""
    if isinstance(stage, SFTStage):
        from alignpipe.data.synthetic import sft_dataset

        conversations = [row["messages"] for row in sft_dataset(recipe.data, recipe.seed)]
        _check_sft_reply_room(SYNTHETIC_ROWS, conversations, tokenizer, stage, recipe.seed)
        return
    from alignpipe.data.length_report import dpo_pair_spans

    rows = pairs(stage)
    measured = dpo_pair_spans(rows, tokenizer, seed=recipe.seed, source=SYNTHETIC_ROWS)
    _check_reply_room(SYNTHETIC_ROWS, measured, "pair", stage, lambda row: _text(rows[row]["prompt"]))


def _is_local(path: str) -> bool:
    """A data path that exists here or is clearly meant as one (a hub id is ``owner/name[@revision]``)."""
    from alignpipe.data.hub_datasets import hub_dataset_id

    return hub_dataset_id(path) is None


def _sft_template(tokenizer, stage: SFTStage) -> str | None:
    """The chat template the stage's SFTTrainer will train with; a template TRL cannot give ``{% generation %}``
    markers would fail there, after the model is loaded, so it is reported here."""
    from alignpipe.data.length_report import sft_training_template

    try:
        return sft_training_template(tokenizer, assistant_only_loss=stage.assistant_only_loss)
    except ValueError as error:
        raise DataError(
            "the model's chat template has no {% generation %} markers and TRL cannot add them (it patches only the "
            "templates it knows, such as Qwen2.5 and Llama 3), so assistant-only loss cannot find the reply tokens "
            f"(TRL: {error}); set stages.{stage.name}.assistant_only_loss: false, or use model.chat_template: chatml "
            "for a gguf_package model trained on ChatML, or save the tokenizer with a template that wraps the "
            "assistant's content in {% generation %} ... {% endgeneration %}"
        ) from error


def _check_sft_reply_room(path: str, conversations: list[list[dict[str, str]]], tokenizer, stage: SFTStage,
                          seed: int) -> None:
    """The conversations as the stage trains them (``messages`` rows, its training template) checked for room."""
    from datasets import Dataset

    from alignpipe.data.length_report import sft_reply_spans

    try:
        template = _sft_template(tokenizer, stage)
    except DataError:
        return  # reported by its own check, under assistant_only_loss
    measured = sft_reply_spans(Dataset.from_list([{"messages": turns} for turns in conversations]), tokenizer,
                               chat_template=template, seed=seed, source=path)
    _check_reply_room(path, measured, "conversation", stage, lambda row: _sft_prompt(conversations[row]))


def _sft_prompt(turns: list[dict[str, str]]) -> str:
    """The text before the first assistant reply: SFT truncation keeps the start, so this part always survives."""
    first = next(i for i, turn in enumerate(turns) if turn["role"] == "assistant")
    return "".join(turn["content"] for turn in turns[:first])


def _text(field: Any) -> str:
    return field if isinstance(field, str) else "".join(m["content"] for m in field)


def _check_reply_room(path: str, measured, noun: str, stage: SFTStage | DPOStage, prompt_text: Callable[[int], str],
                      ) -> None:
    """Truncation keeps the start, so a row whose reply starts at or after max_length (its prompt, rendered as the
    trainer renders it, fills max_length) has nothing of its reply to train on: TRL's DPOTrainer drops such pairs
    and, with assistant-only loss, its SFTTrainer such conversations, silently. The rows are located exactly as the
    stage's length report locates them (:mod:`alignpipe.data.length_report`), over the same seeded sample of a
    dataset too large to tokenize whole here."""
    from alignpipe.data.length_report import pair_truncation_counts, rows_without_reply, truncation_counts

    limit = stage.max_length
    lost = rows_without_reply(measured, limit)
    if not lost:
        return
    span = dict(zip(measured.rows, measured.spans))[lost[0]]
    start = (span[0] if isinstance(span, tuple) else span).start
    counted = (pair_truncation_counts(measured.spans, limit).tokens_for_every_pair if noun == "pair"
               else truncation_counts(measured.spans, limit).tokens_for_every_reply)
    of = (f"{len(measured.rows)} {noun}s measured (a seeded sample of its {measured.sampled_from})"
          if measured.sampled_from else f"its {len(measured.rows)} {noun}s")
    needed = f"at least {counted}" if measured.sampled_from else str(counted)
    fate = ("TRL's DPOTrainer would drop those pairs" if noun == "pair" else
            "TRL's SFTTrainer would drop those conversations" if getattr(stage, "assistant_only_loss", False) else
            "those conversations would train on their prompt alone")
    shown = ", ".join(map(str, lost[:5])) + (", ..." if len(lost) > 5 else "")
    found = (f"{path}: {len(lost)} of {of} (numbered as loaded: {shown}) have a prompt of at least "
             f"stages.{stage.name}.max_length = {limit} tokens with the chat template ({noun} {lost[0]}: its reply "
             f"starts at token {start}; the prompt starts {prompt_text(lost[0])[:40]!r}), so truncation leaves none of "
             f"the reply to train on and {fate}")
    if stage.long_prompts == "drop":
        log.warning("%s (stages.%s.long_prompts: drop)", found, stage.name)
        return
    if path == SYNTHETIC_ROWS:  # long_prompts: drop is refused there: the task's prompts are short by design
        raise DataError(f"{found}; raise stages.{stage.name}.max_length (to {needed} to keep every reply whole)")
    raise DataError(f"{found}; raise stages.{stage.name}.max_length (to {needed} to keep every reply whole), shorten "
                    f"or drop those rows, or set stages.{stage.name}.long_prompts: drop to train without them")
