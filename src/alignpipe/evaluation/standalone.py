"""``alignpipe eval``: the harness on arbitrary checkpoints (run directories, local paths, hub ids)."""

from __future__ import annotations

from pathlib import Path

from alignpipe.evaluation.generation import GenerationSettings
from alignpipe.evaluation.harness import Checkpoint, evaluate_checkpoints
from alignpipe.evaluation.leaderboard import build_leaderboard, write_leaderboard
from alignpipe.pipeline.rundir import StageDir, package_versions
from alignpipe.tasks import GoldJudge, heldout_tasks


def _expand(spec: str) -> list[Checkpoint]:
    """``NAME=PATH``, a checkpoint path or hub id, or a run directory (every stage checkpoint in it, in order)."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    directory = Path(path)
    if (directory / "run.json").exists():
        stages = sorted((d for d in directory.iterdir() if (d / "checkpoint" / "config.json").exists()),
                        key=lambda d: (StageDir(d).read_manifest() or {}).get("end_time") or "")
        if not stages:
            raise ValueError(f"run directory {directory} has no stage checkpoints yet; run its recipe first")
        return [Checkpoint(d.name, str(d / "checkpoint"), (StageDir(d).read_manifest() or {}).get("output_sha256"))
                for d in stages]
    if directory.exists() and not (directory / "config.json").exists():
        raise ValueError(f"{directory} is neither a run directory (run.json) nor a checkpoint (config.json)")
    label = name or (directory.parent.name if directory.name == "checkpoint" else directory.name)
    return [Checkpoint(label, path)]


def evaluate_paths(
    specs: list[str], *, reference: str | None, out: Path | None, n_prompts: int, max_new_tokens: int,
    batch_size: int, seed: int,
) -> tuple[Path, Path]:
    checkpoints = [c for spec in specs for c in _expand(spec)]
    ref = _expand(reference)[0] if reference else checkpoints[0]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    prompts = [t.prompt for t in heldout_tasks(n_prompts, seed)]
    results, _ = evaluate_checkpoints(checkpoints, ref, prompts, GoldJudge(), settings)
    leaderboard = build_leaderboard(
        results, run={"name": "alignpipe-eval", "reference": ref.name},
        config={"generation": settings.__dict__, "prompt_set": {"id": f"synthetic/heldout@seed{seed}", "n": n_prompts},
                "judge": {"type": "gold", "id": GoldJudge.judge_id, "position_swap": True}},
        env=package_versions(), suite="synthetic", primary_metric="gold_reward",
    )
    if out is None:
        first = Path(specs[0].partition("=")[2] or specs[0])
        out = first if (first / "run.json").exists() else Path("eval-out")
    return write_leaderboard(leaderboard, out)
