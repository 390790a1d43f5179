"""Datasets for the embedded synthetic task, built from the recipe's ``data`` block.

Why a separate module: stages ask for "the SFT dataset" or "the preference dataset" of a recipe; this is the one
place that knows how the synthetic task turns into TRL-format ``datasets.Dataset`` objects.
"""

from __future__ import annotations

from datasets import Dataset

from alignpipe.recipe import DataSpec
from alignpipe.tasks import (
    Task,
    TaskSpace,
    heldout_tasks,
    preference_pairs,
    sft_demonstrations,
)

POLICY_SAMPLES = 256  # held-out prompts a reward stage on the task samples its starting policy on (trainers/reward.py)


def task_space(data: DataSpec) -> TaskSpace:
    return TaskSpace(families=tuple(data.families), min_items=data.min_items, max_items=data.max_items)


def sft_dataset(data: DataSpec, seed: int) -> Dataset:
    """Conversational ``messages`` rows from the noisy demonstrator."""
    return Dataset.from_list(sft_demonstrations(data.n_sft, seed, data.demo_noise, task_space(data)))


def preference_dataset(data: DataSpec, seed: int) -> Dataset:
    """Conversational ``prompt``/``chosen``/``rejected`` rows, Bradley–Terry-labelled from the gold reward."""
    rows = preference_pairs(
        data.n_pairs, seed, noise=data.pair_noise, temperature=data.pair_temperature,
        label_noise=data.label_noise, space=task_space(data),
    )
    return Dataset.from_list(rows)


def evaluation_tasks(data: DataSpec, n: int, seed: int) -> list[Task]:
    """Held-out prompts, disjoint from every training split by construction."""
    return heldout_tasks(n, seed, task_space(data))
