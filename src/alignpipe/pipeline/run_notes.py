"""What the runner says of what a run directory already holds from elsewhere: a leaderboard no eval stage of this
recipe owns any more, or the run of another recipe file with the same ``name:``; and the recipe file as ``run.json``
records it, which the second note compares with.

Why apart from the runner: they read files the runner does not otherwise manage and only word warnings.
"""

from __future__ import annotations

import os
from pathlib import Path

from alignpipe.pipeline.rundir import read_run_record
from alignpipe.recipe import Recipe

__all__ = ["leaderboard_stage", "other_recipe_note", "recorded_recipe_file", "unowned_leaderboard_note"]


def leaderboard_stage(recipe: Recipe) -> str | None:
    """The stage whose leaderboard the run keeps: the recipe's last eval stage, as the recipe is now (each eval stage
    replaces the one before's). Only its record of the leaderboard is checked before it is skipped."""
    return next((stage.name for stage in reversed(recipe.stages) if stage.type == "eval"), None)


def unowned_leaderboard_note(run_dir: Path, owner: str | None) -> str | None:
    """What to say of a leaderboard at the run root when the recipe has no eval stage (``owner`` None): one an eval
    stage wrote before the recipe dropped it. Nothing checks it before a skip any more and nothing replaces it, so it
    may describe checkpoints that have changed since. It is kept (a table the user may still want), and said."""
    from alignpipe.evaluation.leaderboard import LEADERBOARD_FILES, load_leaderboard

    found = [name for name in LEADERBOARD_FILES if (run_dir / name).exists()]
    if owner is not None or not found:
        return None
    try:
        writer = load_leaderboard(run_dir / "leaderboard.json")["run"].get("stage")
    except (OSError, ValueError, AttributeError):  # gone, damaged or of another schema: the files are still there
        writer = None
    by = f"eval stage '{writer}'" if isinstance(writer, str) else "an eval stage"
    return (f"{run_dir} holds {', '.join(found)} from {by}, but this recipe has no eval stage: they show the "
            "checkpoints as that stage evaluated them, and nothing updates them now. Add an eval stage to evaluate "
            "the checkpoints as they are, or remove the files.")


def recorded_recipe_file(recipe_path: str | Path | None, run_dir: Path) -> str | None:
    """The recipe file as ``run.json``'s ``recipe_file`` records it: relative to the run directory as it is named
    (symlinks kept: a ``runs`` linked to scratch space stays inside the project), so a project moved or copied whole,
    its recipes with its runs, still names the same file."""
    return os.path.relpath(os.path.abspath(recipe_path), os.path.abspath(run_dir)) if recipe_path else None


def other_recipe_note(run_dir: Path, recipe_path: str | Path | None) -> str | None:
    """A warning when ``run_dir``'s last run came from another recipe file than ``recipe_path``; else None.

    Why: the run directory is ``runs/<name>``, so two recipe files with one ``name:`` share it: a copied recipe not
    renamed, or a child recipe (``extends:``), which inherits its parent's name. Its stages whose settings differ
    then re-run and replace the other recipe's outputs, as overrides do, which is what overrides are for but rarely
    what a second file meant. Records written before ``recipe_file`` existed, and runs without a file, say nothing."""
    earlier = read_run_record(run_dir)[0].get("recipe_file")  # a damaged record, or a field of another type: none
    here = recorded_recipe_file(recipe_path, run_dir)
    if not earlier or not here or earlier == here:
        return None
    earlier = os.path.normpath(os.path.join(os.path.abspath(run_dir), earlier))
    if os.path.exists(earlier) and os.path.samefile(earlier, recipe_path):  # the same file by another path
        return None
    return (f"{run_dir} holds the run of {earlier}; this recipe, {Path(recipe_path).resolve()}, has the same name "
            f"({run_dir.name}), so "
            "its stages whose settings differ re-run there and replace that recipe's outputs. Give this recipe its "
            "own name: to keep both runs (a recipe that extends another inherits its name)")
