"""Create the recipe's built-in tiny base model (tokenizer trained on the task's text + random-init Llama)."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from alignpipe.data.synthetic import task_space
from alignpipe.models.tiny import (
    build_tiny_model,
    save_tiny_checkpoint,
    train_tokenizer,
)
from alignpipe.recipe import Recipe
from alignpipe.tasks import tokenizer_corpus


def tiny_tokenizer(recipe: Recipe) -> PreTrainedTokenizerFast:
    """The tokenizer the recipe's tiny model gets, trained (deterministically, in well under a second) on the task's
    text: the tiny model's data can then be measured in tokens before the model exists (``alignpipe data``)."""
    return train_tokenizer(tokenizer_corpus(task_space(recipe.data), seed=recipe.seed), recipe.model.tiny.vocab_size)


def create_tiny_base(recipe: Recipe, directory: Path) -> Path:
    spec = recipe.model.tiny
    tokenizer = tiny_tokenizer(recipe)
    model = build_tiny_model(
        tokenizer,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        seed=recipe.seed,
    )
    return save_tiny_checkpoint(model, tokenizer, directory)
