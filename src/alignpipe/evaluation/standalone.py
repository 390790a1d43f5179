"""``alignpipe eval``: the harness on arbitrary checkpoints (run directories, local paths, hub ids)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml
from huggingface_hub.utils import HFValidationError, validate_repo_id
from pydantic import ValidationError

from alignpipe.data.synthetic import task_space
from alignpipe.evaluation.cache import EvalCache, content_key
from alignpipe.evaluation.harness import SAMPLE_SUFFIXES, Checkpoint, write_sample_files
from alignpipe.evaluation.leaderboard import load_leaderboard, source_labels, write_leaderboard
from alignpipe.evaluation.named import split_named
from alignpipe.evaluation.suites import (
    PromptSet,
    SuiteGeneration,
    SuiteSpec,
    draws_synthetic_tasks,
    load_suite,
    run_suite,
)
from alignpipe.io import atomic_write_json, cache_root
from alignpipe.pipeline.rundir import RUN_FILE, StageDir, cached_directory_hash
from alignpipe.recipe import STAGE_TYPES, DataSpec
from alignpipe.tasks import TaskSpace

# Manifest types whose checkpoint is a policy: the runner's tiny base and the training stages, less reward (a reward
# model, scored by a reward_models suite) and bon and eval (which save none).
POLICY_TYPES = frozenset({"base", *STAGE_TYPES}) - {"reward", "bon", "eval"}
log = logging.getLogger("alignpipe")


def expand_checkpoints(specs: list[str]) -> list[Checkpoint]:
    """The checkpoints that ``specs`` name, refusing two of one name now, before anything is sampled.

    A run directory's rows are named by stage, or ``<run>/<stage>`` when several run directories are given (``<run>``:
    the fewest trailing parts of their paths that tell them apart, or NAME of ``NAME=DIR``).
    """
    split = [split_named(spec) for spec in specs]
    runs = [(name, Path(path).resolve()) for name, path in split if (Path(path) / RUN_FILE).exists()]
    unnamed = list(dict.fromkeys(directory for name, directory in runs if not name))
    several = len(runs) > 1
    labels = {}
    if several and unnamed:
        labels = dict(zip(unnamed, source_labels([d / RUN_FILE for d in unnamed]), strict=True))
    checkpoints = [c for name, path in split
                   for c in _expand(name or labels.get(Path(path).resolve(), ""), path, prefix=several)]
    names = [c.name for c in checkpoints]
    if dups := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"more than one checkpoint is named {', '.join(map(repr, dups))}: give each its own name "
                         "with NAME=PATH (with several run directories, NAME=DIR names that run's rows NAME/<stage>)")
    return checkpoints


def _expand(name: str, path: str, *, prefix: bool = False) -> list[Checkpoint]:
    """A checkpoint path or hub id (row ``name``, else its directory's), or a run directory: the checkpoint of every
    policy stage in it whose manifest says complete, in the order they finished (a reward model is no policy to sample
    from), rows ``<name>/<stage>`` with ``prefix``, else ``<stage>``."""
    directory = Path(path)
    if (directory / RUN_FILE).exists():
        manifests = {d: StageDir(d).read_manifest() or {} for d in directory.iterdir() if d.is_dir()}
        stages = sorted((d for d, m in manifests.items() if m.get("type") in POLICY_TYPES
                         and m.get("status") == "complete" and (d / "checkpoint" / "config.json").exists()),
                        key=lambda d: manifests[d].get("end_time") or "")
        if not stages:
            raise ValueError(f"run directory {directory} has no completed policy stage yet; run its recipe first")
        return [Checkpoint(f"{name}/{d.name}" if prefix else d.name, str(d / "checkpoint"),
                           _stage_weights_sha256(d / "checkpoint", manifests[d])) for d in stages]
    if not directory.exists():
        return [_hub_checkpoint(name, path)]
    if not (directory / "config.json").exists():
        raise ValueError(f"{directory} is neither a run directory (run.json) nor a checkpoint (config.json)")
    label = name or (directory.parent.name if directory.name == "checkpoint" else directory.name)
    return [Checkpoint(label, path, cached_directory_hash(directory))]


def _stage_weights_sha256(checkpoint: Path, manifest: dict) -> str:
    """A run's stage checkpoint hashed by its files, as any other path is: samples are cached by this hash, and a
    checkpoint changed since its stage finished (copied over, edited) must not be served the old weights' samples
    and numbers. The manifest's ``output_sha256`` is only compared, for a warning that says so."""
    sha = cached_directory_hash(checkpoint)
    if (recorded := manifest.get("output_sha256")) and recorded != sha:
        log.warning("%s: its files changed since the %s stage wrote them (manifest output_sha256 %s, now %s); "
                    "evaluating the files as they are now", checkpoint, checkpoint.parent.name, recorded[:12],
                    sha[:12])
    return sha


def _hub_checkpoint(name: str, spec: str) -> Checkpoint:
    """A hub model, ``ORG/NAME`` or ``ORG/NAME@REVISION`` (a branch, tag or commit; hub ids cannot hold ``@``),
    pinned to a commit and fetched like a recipe's model (:mod:`alignpipe.models.hub`), then hashed by content like
    a local checkpoint: its generations are cached, and its row says which weights it scored. Row: NAME, or the
    repository's name."""
    from alignpipe.models import hub

    repo_id, revision = hub.split_revision(spec)
    try:  # the rule transformers applies; a path that breaks it would only fail there, after earlier checkpoints
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"no checkpoint at {spec}: no such file or directory (and not a hub id, NAME or "
                         "ORG/NAME, with @REVISION if wanted); check the path") from None
    snapshot = hub.resolve(repo_id, revision, keys=(f"the checkpoint argument {spec!r}", "its @REVISION"))
    folder = hub.fetch(snapshot)
    log.info("%s: %s (%s)", spec, snapshot.describe(), folder)
    model_files = set(snapshot.files)  # not whatever else an earlier full download left in the folder
    return Checkpoint(name or repo_id.rsplit("/", 1)[-1], str(folder),
                      cached_directory_hash(folder, include=lambda relative: relative.as_posix() in model_files))


def runs_task_space(specs: list[str], reference: str | None = None) -> TaskSpace | None:
    """The synthetic task space of the run directories among ``specs`` and ``reference`` (their ``recipe.yaml``'s
    ``data`` block), from which their synthetic prompts are drawn, as their eval stage draws them: a run trained on
    some families is scored on those. None when no run directory is given; a ``ValueError`` when the runs' task
    spaces differ."""
    named = [*specs, *([reference] if reference else [])]
    spaces = {directory: _recorded_task_space(directory) for directory in
              dict.fromkeys(Path(split_named(spec)[1]) for spec in named) if (directory / RUN_FILE).exists()}
    if len(set(spaces.values())) > 1:
        described = "; ".join(f"{directory}: {_describe(space)}" for directory, space in spaces.items())
        raise ValueError(f"the run directories were trained on different synthetic tasks ({described}), so no one "
                         "prompt set fits them all; evaluate each run (or runs of one task space) on its own")
    if spaces:
        space = next(iter(spaces.values()))
        log.info("synthetic prompts from the runs' task space: %s", _describe(space))
        return space
    return None


def _recorded_task_space(directory: Path) -> TaskSpace:
    """The task space of the recipe a run directory recorded (``recipe.yaml``, the resolved recipe)."""
    path = directory / "recipe.yaml"
    try:
        recorded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return task_space(DataSpec.model_validate(recorded.get("data") or {}))
    except (OSError, yaml.YAMLError, ValidationError, AttributeError) as error:
        raise ValueError(f"cannot read the task space of run directory {directory} from {path} (its data block): "
                         f"{error}; re-run its recipe with alignpipe run to write it again") from None


def _describe(space: TaskSpace) -> str:
    return f"families {', '.join(space.families)}, {space.min_items}-{space.max_items} items"


def default_cache_dir() -> Path:
    """``$ALIGNPIPE_CACHE/eval``, else ``~/.cache/alignpipe/eval``: generations are reused across invocations."""
    return cache_root() / "eval"


def evaluate_paths(
    specs: list[str], *, reference: str | None, out: Path | None, n_prompts: int, max_new_tokens: int,
    batch_size: int, seed: int, cache_dir: Path | None = None,
) -> tuple[Path, Path]:
    """``alignpipe eval`` without ``--suite``: the synthetic suite with the command line's sizes and seed."""
    spec = SuiteSpec(
        name="synthetic", prompts=PromptSet(source="synthetic", n=n_prompts, seed=seed),
        generation=SuiteGeneration(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed),
        reference="checkpoint", judge="gold", primary_metric="gold_reward",
    )
    checkpoints = expand_checkpoints(specs)
    _check_file_names([c.name for c in checkpoints])
    space = runs_task_space(specs, reference)
    # hashed without the implicit_reward block it never sets: boards written before that block existed still merge
    samples: dict[str, dict[str, list[dict]]] = {}
    board = run_suite(spec, content_key(spec.model_dump(exclude={"implicit_reward"})), checkpoints,
                      reference=_expand(*split_named(reference))[0] if reference else None, judge_path=None,
                      cache=EvalCache(cache_dir or default_cache_dir()), samples_out=samples, space=space)
    if out is None:  # never the run directory itself: its leaderboard is the eval stage's record of the run
        first = Path(split_named(specs[0])[1])
        out = Path("eval-out") / first.resolve().name if (first / RUN_FILE).exists() else Path("eval-out")
    earlier = _earlier_rows(out)
    written = write_leaderboard(_with_samples(board, samples, out), out)
    _remove_stale(out, earlier, board, samples)
    return written


def evaluate_suite(
    specs: list[str], *, suite: str, reference: str | None, judge: str | None, out: Path | None,
    cache_dir: Path | None = None,
) -> tuple[Path, Path]:
    """``alignpipe eval --suite NAME``: checkpoints on a suite file; writes the suite's leaderboard (json, md, csv)
    and one JSON per checkpoint (``results/<checkpoint>.json``: the same envelope with that checkpoint only), and
    a policy suite's per-sample records (``samples/<checkpoint>[.diversity|.implicit].jsonl``)."""
    spec, suite_hash = load_suite(suite)
    check_suite_options(spec, reference=reference, judge=judge)
    if spec.kind == "reward_models":
        from alignpipe.evaluation.reward_suite import expand_reward_models, run_reward_suite

        models = [m for item in specs for m in expand_reward_models(item)]
        _check_file_names([name for name, _ in models])
        board, samples = run_reward_suite(spec, suite_hash, models), {}
    else:
        checkpoints = expand_checkpoints(specs)
        _check_file_names([c.name for c in checkpoints])
        ref = _expand(*split_named(reference))[0] if reference else None
        # only a suite that draws synthetic prompts or pairs reads the runs' task space
        space = runs_task_space(specs, reference) if draws_synthetic_tasks(spec) else None
        samples: dict[str, dict[str, list[dict]]] = {}
        board = run_suite(spec, suite_hash, checkpoints, reference=ref, judge_path=judge,
                          cache=EvalCache(cache_dir or default_cache_dir()), samples_out=samples, space=space)
    out = out or Path("eval-out") / spec.name
    earlier = _earlier_rows(out)
    if samples:
        board = _with_samples(board, samples, out)
    for row in board["checkpoints"]:  # a row's file names its samples from where it lies (a/dpo: two levels down)
        path = out / "results" / f"{row['name']}.json"
        located = {**row, "samples": os.path.relpath(out / row["samples"], path.parent)} if row.get("samples") else row
        atomic_write_json(path, {**board, "checkpoints": [located]})
    written = write_leaderboard(board, out)
    _remove_stale(out, earlier, board, samples)
    return written


def check_suite_options(spec: SuiteSpec, *, reference: str | None, judge: str | None) -> None:
    """Refuse, before any work, ``--judge`` for a suite no reward model judges and ``--reference`` for one that
    compares with no reference checkpoint: either would be ignored, and the board would look judged by, or compared
    with, the model given."""
    scores_reward_models = "scores reward models on its pairs (kind: reward_models)"
    if judge is not None and spec.judge != "reward_model":
        how = scores_reward_models if spec.kind == "reward_models" else \
            f"is judged by the {spec.judge} reward (judge: {spec.judge})"
        raise ValueError(f"--judge {judge}: suite {spec.name!r} {how} and reads no judge model; drop --judge, or pass "
                         "a suite judged by a reward model (judge: reward_model, e.g. alpaca-eval, hh-harmless)")
    if reference is not None and spec.reference != "checkpoint":
        how = scores_reward_models if spec.kind == "reward_models" else \
            "compares each checkpoint with its dataset's reference outputs (reference: dataset)"
        raise ValueError(f"--reference {reference}: suite {spec.name!r} {how} and reads no reference checkpoint; drop "
                         "--reference, or pass a suite with reference: checkpoint (e.g. hh-harmless-vs-base)")


def _check_file_names(names: list[str]) -> None:
    """Refuse, before any work, row names whose files (named after them) would land outside ``--out`` (``..``, an
    absolute name) or be another row's (``a`` and ``a.diversity``)."""
    if bad := [name for name in names if Path(name).is_absolute() or ".." in Path(name).parts]:
        raise ValueError(f"checkpoint names {bad} would write outside --out (their files are named after them): "
                         "rename them with NAME=PATH")
    files = [f"{name}{suffix}" for name in names for suffix in SAMPLE_SUFFIXES]
    if clashes := sorted({name for name in files if files.count(name) > 1}):
        raise ValueError(f"checkpoint names {clashes} would share sample files (a name may not end in .diversity "
                         "or .implicit): rename them with NAME=PATH")


def _with_samples(board: dict, samples: dict[str, dict[str, list[dict]]], out: Path) -> dict:
    """Write each checkpoint's per-sample records to ``out/samples/`` (before the table that links them) and return
    ``board`` with every row naming its file (EVALUATION.md §10: every number traceable to its generations)."""
    rows = []
    for row in board["checkpoints"]:
        written = write_sample_files(out / "samples", row["name"], samples[row["name"]])
        rows.append({**row, "samples": f"samples/{written}"})
    return {**board, "checkpoints": rows}


def _earlier_rows(out: Path) -> list[str]:
    """The checkpoint names of the leaderboard an earlier ``alignpipe eval`` wrote to ``out`` (none if it holds
    none): their sample and result files are this command's own to replace."""
    try:
        return [row["name"] for row in load_leaderboard(out / "leaderboard.json")["checkpoints"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _remove_stale(out: Path, earlier: list[str], board: dict, samples: dict[str, dict[str, list[dict]]]) -> None:
    """Remove what an earlier run into ``out`` wrote and this one did not (a checkpoint left out, diversity or
    implicit pairs turned off): files beside a table must be of its rows. Only files of the earlier table's names."""
    kept = {out / "samples" / f"{name}{suffix}.jsonl" for name, files in samples.items() for suffix in files}
    current = {row["name"] for row in board["checkpoints"]}
    for name in earlier:
        candidates = [out / "samples" / f"{name}{suffix}.jsonl" for suffix in SAMPLE_SUFFIXES]
        if name not in current:
            candidates.append(out / "results" / f"{name}.json")
        for path in candidates:
            if path not in kept and path.is_file():
                path.unlink()
                log.info("removed %s: an earlier evaluation wrote it, and this one has no such records", path)
