"""Recipe schema: one YAML file describes one run (model, synthetic data, ordered stages).

A recipe is fully validated before any model loads. ``extends`` and command-line overrides are
applied to the raw YAML first, remembering where each key came from, and pydantic's errors are
then rewritten into one ``RecipeError`` that names the file, the key path (stages by *name*,
``stages.dpo.beta``) and a hint for every problem. Cross-field checks (``max_items >=
min_items``, stage inputs, ...) run once the fields they read have valid types, so a recipe
with type errors may reveal more problems after those are fixed.
"""

from __future__ import annotations

from alignpipe.recipe.errors import RecipeError
from alignpipe.recipe.errors import did_you_mean as did_you_mean
from alignpipe.recipe.loading import load_recipe, load_recipe_dict, parse_override
from alignpipe.recipe.messages import _alternatives as _alternatives
from alignpipe.recipe.offline_stages import LABEL_SMOOTHING_LOSSES as LABEL_SMOOTHING_LOSSES
from alignpipe.recipe.offline_stages import DPOLossType as DPOLossType
from alignpipe.recipe.offline_stages import DPOStage, RewardStage, SFTDataSpec, SFTStage
from alignpipe.recipe.online_stages import DNOStage, INPOStage, OnlineDPOStage, OSPStage, SPINStage, SPPOStage
from alignpipe.recipe.rl_stages import BoNStage, EvalStage, GRPOStage, PPOStage, RLOOStage
from alignpipe.recipe.rl_stages import ppo_full_weight_problem as ppo_full_weight_problem
from alignpipe.recipe.schema import RUN_NAME_RE as RUN_NAME_RE
from alignpipe.recipe.schema import STAGE_TYPES, Recipe, Stage, recipe_to_dict
from alignpipe.recipe.specs import (
    DataSpec,
    LoraSpec,
    ModelSpec,
    PreferenceDataSpec,
    QuantizationSpec,
    RewardSpec,
    TinyModelSpec,
)
from alignpipe.recipe.stage_base import MAX_SEED as MAX_SEED
from alignpipe.recipe.stage_base import RESERVED_STAGE_NAMES as RESERVED_STAGE_NAMES
from alignpipe.recipe.stage_base import STAGE_NAME_RE as STAGE_NAME_RE
from alignpipe.recipe.stage_base import SchedulerType as SchedulerType
from alignpipe.recipe.stage_base import _OptimizerStage as _OptimizerStage
from alignpipe.recipe.stage_base import _TrainerStage as _TrainerStage
from alignpipe.recipe.stage_base import _TrainingStage as _TrainingStage

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
