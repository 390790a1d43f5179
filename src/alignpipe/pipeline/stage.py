"""What one stage process sees, and the entry point every ``pipelines/<type>.py`` calls.

A stage process reads only its own ``config.yaml`` (written by the runner) and writes only its own directory,
so the same code runs in-process (tests), as a subprocess, or under ``accelerate launch``. The one exception is
``--base``: the other nodes of a multi-node run pass their own copy of the recipe's model, because the one node 0
wrote into ``config.yaml`` may live in node 0's cache (a converted GGUF package) or site-packages (``pypi:``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from alignpipe.pipeline.run_lock import stage_holds_run
from alignpipe.pipeline.rundir import StageDir, published_output_hash, utc_now
from alignpipe.pipeline.watched import stop_with_supervisor
from alignpipe.recipe import Recipe

log = logging.getLogger("alignpipe")

# stage type -> module in alignpipe.trainers exposing ``run(ctx) -> dict`` (imported lazily: each pulls in TRL)
STAGE_MODULES = {
    "sft": "alignpipe.trainers.sft",
    "reward": "alignpipe.trainers.reward",
    "dpo": "alignpipe.trainers.dpo",
    "osp": "alignpipe.trainers.osp",
    "online_dpo": "alignpipe.trainers.online_dpo",
    "sppo": "alignpipe.trainers.sppo",
    "spin": "alignpipe.trainers.spin",
    "dno": "alignpipe.trainers.dno",
    "inpo": "alignpipe.trainers.inpo",
    "ppo": "alignpipe.trainers.ppo",
    "grpo": "alignpipe.trainers.grpo",
    "rloo": "alignpipe.trainers.rloo",
    "bon": "alignpipe.trainers.bon",
    "eval": "alignpipe.trainers.eval",
}


@dataclass(frozen=True)
class StageContext:
    """Everything a stage needs: the validated recipe, its own config, where its inputs are, where to write."""

    recipe: Recipe
    stage: Any  # the stage's typed config (SFTStage, DPOStage, EvalStage, ...)
    dir: StageDir
    run_dir: Path
    base: str  # the recipe's model: a local checkpoint path or a hub id
    inputs: dict[str, str]  # earlier stage name -> its checkpoint path
    resume_from: Path | None
    resume: bool = False  # started with --resume (stages with several trainers find their own checkpoints)
    pins: dict[str, str] = field(default_factory=dict)  # hub commits the runner hashed ("backbone", "dataset")

    @property
    def start_model(self) -> str:
        """The model a training stage starts from: its (single) input, or the recipe's model."""
        return self.inputs[self.stage.inputs[0]] if self.stage.inputs else self.base

    @property
    def is_main_process(self) -> bool:
        from accelerate import PartialState

        return PartialState().is_main_process

    @property
    def device(self):
        """This process's device (its GPU under a GPU launch, else the CPU): where a stage's models run."""
        from alignpipe.models.loading import process_device

        return process_device()


def stage_runner(stage_type: str) -> Callable[[StageContext], dict]:
    if stage_type not in STAGE_MODULES:
        raise ValueError(f"no stage implementation for type {stage_type!r}; known: {sorted(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[stage_type]).run


def load_context(stage_dir: Path, *, resume: bool, base: str | None = None) -> StageContext:
    """The stage's context from its ``config.yaml``; ``base`` replaces the recipe's model it names (see ``--base``)."""
    directory = StageDir(stage_dir)
    config = directory.read_config()
    recipe = Recipe.model_validate(config["recipe"])
    stage = recipe.stage(config["stage"])
    pins = config.get("pins") or {}
    if "dataset" in pins:  # the commit the runner pinned the hub dataset to (alignpipe.data.hub_datasets)
        from alignpipe.data.hub_datasets import pinned

        stage = stage.model_copy(update={"dataset": stage.dataset.model_copy(
            update={"path": pinned(stage.dataset.path, pins["dataset"])})})
    resume_from = _resume_checkpoint(directory) if resume else None
    return StageContext(
        recipe=recipe, stage=stage, dir=directory, run_dir=stage_dir.parent,
        base=base or config["base"], inputs=config["inputs"], resume_from=resume_from, resume=resume,
        pins=pins,
    )


def _resume_checkpoint(directory: StageDir) -> Path | None:
    """The checkpoint the runner verified (manifest ``resume_from``), so no rank hashes it again; when the stage is
    started by hand (``pipelines/<type>.py --resume``), the newest intact one."""
    verified = (directory.read_manifest() or {}).get("resume_from")
    if verified and (directory.root / verified).is_dir():
        return directory.root / verified
    return verified_trainer_checkpoint(directory)


def verified_trainer_checkpoint(directory: StageDir, under: Path | None = None) -> Path | None:
    """``StageDir.latest_trainer_checkpoint`` for a stage running on several ranks: rank 0 verifies the hashes and sets
    bad checkpoints aside, every rank gets its answer. (Each rank checking by itself would race rank 0's renames.)"""
    from alignpipe.pipeline import distributed

    found = directory.latest_trainer_checkpoint(under) if distributed.is_main() else None
    return distributed.from_main(found)


def execute(stage_dir: Path, *, resume: bool = False, base: str | None = None) -> dict:
    """Run one prepared stage directory to completion and mark its manifest complete.

    The checkpoint hash recorded here is what downstream stages use as their input hash, so a re-run that
    reproduces the same weights does not invalidate the stages after it.
    """
    with stage_holds_run(Path(stage_dir).parent):  # a run started beside it is refused while this process lives
        return _execute(Path(stage_dir), resume=resume, base=base)


def _execute(stage_dir: Path, *, resume: bool, base: str | None) -> dict:
    ctx = load_context(stage_dir, resume=resume, base=base)
    from alignpipe.models.loading import allow_remote_code

    allow_remote_code(ctx.recipe.model.trust_remote_code)
    if ctx.resume_from is not None:
        log.info("[%s] resuming from %s", ctx.dir.name, ctx.resume_from)
    started = time.time()
    summary = stage_runner(ctx.stage.type)(ctx)
    if ctx.is_main_process:
        output = ctx.dir.checkpoint
        ctx.dir.update_manifest(
            status="complete",
            end_time=utc_now(),
            wall_time_s=round(time.time() - started, 2),
            output_sha256=published_output_hash(output) if output.exists() else None,
            resume_from=ctx.dir.relative_key(ctx.resume_from) if ctx.resume_from else None,
            summary=summary,
        )
    return summary


def argument_parser(stage_type: str) -> argparse.ArgumentParser:
    """The command line of ``pipelines/<type>.py`` (the runner builds it: ``Runner.stage_command``)."""
    parser = argparse.ArgumentParser(
        prog=f"pipelines/{stage_type}.py",
        description=f"Run one '{stage_type}' stage of a prepared run directory (normally started by `alignpipe run`; "
        "also the script `accelerate launch` runs for multi-GPU).",
    )
    parser.add_argument("--stage-dir", type=Path, required=True, help="runs/<run>/<stage>/ holding config.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the latest trainer checkpoint")
    parser.add_argument("--base", metavar="PATH", help="this machine's copy of the recipe's model, instead of the "
                        "one config.yaml names (node 0's: its GGUF conversion cache need not be shared)")
    return parser


def main(stage_type: str, argv: list[str] | None = None) -> None:
    """Entry point of ``pipelines/<type>.py``: ``python pipelines/sft.py --stage-dir runs/quickstart/sft``."""
    args = argument_parser(stage_type).parse_args(argv)
    stop_with_supervisor()  # before the rendezvous, which waits for ranks that may never come
    state = init_distributed()
    rank = f"[rank {state.process_index}/{state.num_processes}] " if state.num_processes > 1 else ""
    logging.basicConfig(level=logging.INFO if state.is_main_process else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s: {rank}%(message)s", force=True)
    config = StageDir(args.stage_dir).read_config()
    declared = config["recipe"]["stages"]
    actual = next((s["type"] for s in declared if s["name"] == config["stage"]), None)
    if actual != stage_type:
        sys.exit(f"error: {args.stage_dir} is a '{actual}' stage, but this is pipelines/{stage_type}.py")
    try:
        execute(args.stage_dir, resume=args.resume, base=args.base)
    except Exception:
        traceback.print_exc()
        if state.is_main_process:
            StageDir(args.stage_dir).update_manifest(status="failed", end_time=utc_now())
        sys.exit(1)


def init_distributed():
    """Join the launch's process group before anything else (and before any config is read).

    On CPU the ranks must join a gloo group: a bare ``PartialState()`` on a machine without CUDA (or with
    ``ACCELERATE_USE_CPU``, which accelerate's multi-process launcher does not forward) leaves each process thinking
    it is alone, and later ``PartialState(cpu=True)`` calls cannot change that.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
