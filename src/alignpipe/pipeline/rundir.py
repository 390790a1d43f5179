"""The on-disk layout of a run and its manifests.

``runs/<run>/<stage>/`` holds ``config.yaml`` (resolved), ``manifest.json`` (status, hashes, versions, timings),
``metrics.jsonl``, ``checkpoint/`` (``save_pretrained`` format) and ``trainer/`` (trainer checkpoints for
``--resume``). A stage is complete only when its manifest says so; every file is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from alignpipe.io import atomic_write_json, atomic_write_text, cache_root, why_unreadable
from alignpipe.strict_yaml import dump_yaml

log = logging.getLogger("alignpipe")

RUN_FILE = "run.json"  # the runner's record at the top of a run directory (recipe, overrides, hashes)
CHECKPOINTS = "checkpoints"  # manifest key: {path relative to the stage dir: sha256} of every fully saved checkpoint
# manifest key: {path relative to the run dir: content_hash} of the results a stage published without a checkpoint
# (the eval stage's results.json and samples/), checked before the stage is skipped
RESULTS = "results_sha256"
# manifest key: {file name: content_hash} of what it wrote at the run's root (the eval stage's leaderboard), which a
# later eval stage replaces: checked only for the stage whose copy the run keeps (``owns_run_root``)
RUN_ROOT_RESULTS = "run_results_sha256"
ROUND_DATA = "pairs.json"  # an iterative stage's generated rows of one round (rounds/round-<r>/), kept for --resume
# What a stage writes beside checkpoint/ as its result (reward: reward_eval.json; bon: bon.json, samples.jsonl; eval:
# results.json, samples/). Read only while the manifest says complete; a stage that starts over deletes them first.
RESULT_FILES = ("reward_eval.json", "bon.json", "samples.jsonl", "results.json", "samples")
HASH_CACHE = "hashes"  # cached_directory_hash's results under cache_root(), one JSON file per folder state
RACY_NS = 2_000_000_000  # a file changed this recently (ns) is not trusted by its stat yet (cached_directory_hash)
LARGE_FOLDER = 1_000_000_000  # bytes: hashing a folder this large for real is worth telling the user about
TRACKED_PACKAGES = ("alignpipe", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def canonical_hash(obj: Any) -> str:
    """Hash of a JSON-serialisable object that ignores key order (config hashes must be stable across runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def directory_hash(directory: Path, include: Callable[[Path], bool] | None = None) -> str:
    """sha256 over every file's relative path and bytes, in sorted order: identifies a checkpoint's content.
    ``include`` (given the relative path) leaves out files that are not part of what is identified."""
    return _hash_files(directory, _included_files(directory, include))


def cached_directory_hash(directory: Path, include: Callable[[Path], bool] | None = None) -> str:
    """``directory_hash``, reused while the stat (size, mtime, inode, device, ctime) of every included file is the
    same.

    Why: a user's local model or judge folder is hashed on every run, dry run and eval to notice replaced weights,
    and reading a 7B model takes 10+ s although it rarely changes. As git's index does, a file whose stat is the
    same is trusted to hold the same bytes: the result is kept in ``cache_root()/hashes``, keyed by the folder and
    the stat of every included file, so a changed, added or removed file gives another key. Only for such inputs:
    a stage's output and a checkpoint verified before a resume must be read (``directory_hash``). A cache entry
    that cannot be read is recomputed, one that cannot be written is not kept; neither is an error."""
    started_ns = time.time_ns()
    files = _included_files(directory, include)
    stats = _file_stats(directory, files)
    try:
        entry = cache_root() / HASH_CACHE / f"{canonical_hash([str(directory.resolve()), stats])}.json"
    except RuntimeError as error:  # Path.home() with neither $HOME nor a passwd entry (a container's bare uid)
        log.debug("not caching the hash of %s: %s", directory, error)
        return _hash_files(directory, files)
    if (sha := _cached_sha(entry)) is not None:
        return sha
    # Racily clean files (git's term): a file written just before or while it is read can be written again within
    # the same timestamp tick, keeping its size and mtime, and its stat would not show it. So a result is kept only
    # when every file is older than the 2 s it takes for any filesystem's timestamps (FAT's too) to move on.
    settled = all(mtime_ns < started_ns - RACY_NS for _, _, mtime_ns, *_ in stats)
    size = sum(file_size for _, file_size, *_ in stats)
    if size > LARGE_FOLDER:
        log.info("hashing %s (%.1f GB)%s", directory, size / 1e9,
                 " once; later runs reuse it while its files are unchanged" if settled else "")
    sha = _hash_files(directory, files)
    if settled and _unchanged(directory, files, stats):  # and none was written while it was read
        try:
            atomic_write_json(entry, {"directory": str(directory.resolve()), "sha256": sha})
        except OSError as error:
            log.debug("not caching the hash of %s: %s", directory, error)
    return sha


def _cached_sha(entry: Path) -> str | None:
    """The sha256 a ``cached_directory_hash`` entry holds; None when it is missing, unreadable or corrupt."""
    try:
        sha = json.loads(entry.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):  # AttributeError: valid JSON, but not an object
        return None
    return sha if isinstance(sha, str) and len(sha) == 64 and set(sha) <= set("0123456789abcdef") else None


def _included_files(directory: Path, include: Callable[[Path], bool] | None) -> list[Path]:
    files = (p for p in directory.rglob("*") if p.is_file())
    return sorted(p for p in files if include is None or include(p.relative_to(directory)))


def _hash_files(directory: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(directory).as_posix().encode())
        _update_with_file(digest, path)
    return digest.hexdigest()


def _file_stats(directory: Path, files: list[Path]) -> list[tuple[str, int, int, int, int, int]]:
    """What ``cached_directory_hash`` trusts: each file's relative path, size, mtime (ns), inode, device and ctime
    (ns), which no copy can set back (``cp -p`` and ``rsync -a --inplace`` keep the other four)."""
    return [(path.relative_to(directory).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns)
            for path, st in ((path, path.stat()) for path in files)]


def _unchanged(directory: Path, files: list[Path], stats: list[tuple]) -> bool:
    try:
        return _file_stats(directory, files) == stats
    except OSError:  # a file was deleted
        return False


def content_hash(path: Path) -> str:
    """sha256 of a file's bytes, or ``directory_hash`` of a directory: identifies a local dataset's content."""
    if path.is_dir():
        return directory_hash(path)
    digest = hashlib.sha256()
    _update_with_file(digest, path)
    return digest.hexdigest()


def _update_with_file(digest, path: Path) -> None:
    """Feed a file's bytes to ``digest`` in 1 MiB blocks (model weights need not fit in memory twice)."""
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def output_hash(checkpoint: Path, *, cached: bool = False) -> str:
    """What a stage's manifest records as ``output_sha256`` for its published ``checkpoint``: its ``directory_hash``,
    but a saved reward model's identity (:func:`~alignpipe.rewards.loading.reward_model_identity`), which leaves out
    the absolute paths its JSON files hold. Why: a reward stage re-run in a moved or copied run folder gave another
    hash for the same weights, and every stage after it re-ran. ``cached``: trust the stat cache (checking a
    published checkpoint, not hashing a stage's fresh output)."""
    if _is_reward_model(checkpoint):
        from alignpipe.rewards.loading import reward_model_identity

        return reward_model_identity(checkpoint)
    return cached_directory_hash(checkpoint) if cached else directory_hash(checkpoint)


def _is_reward_model(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a saved reward model, whose ``output_hash`` is its identity."""
    if not (checkpoint / "manifest.json").is_file():  # policies have none; a reward model's says its format
        return False
    from alignpipe.rewards.loading import reward_model_format

    try:
        reward_model_format(checkpoint)
    except ValueError:
        return False
    return True


def published_output_hash(checkpoint: Path) -> str:
    """:func:`output_hash` of a checkpoint a stage has just written, read in full. A large one is hashed through the
    stat cache, so that the next run's check that it is unchanged (``StageDir.published_problem``) reads nothing.

    Why wait: the cache keeps no result for files written in the last ``RACY_NS`` (their stat may not show a change
    yet), so a large folder first waits out what is left of that since its newest file was written (at most 2 s,
    against the minutes of writing it); otherwise the next run read every large checkpoint of the run once more."""
    stats = [path.stat() for path in _included_files(checkpoint, None)]
    if sum(st.st_size for st in stats) <= LARGE_FOLDER:
        return output_hash(checkpoint)
    settled_at_ns = max(st.st_mtime_ns for st in stats) + RACY_NS
    if (wait_ns := min(settled_at_ns - time.time_ns(), RACY_NS)) > 0:  # a file dated ahead (clock skew) waits no more
        time.sleep(wait_ns / 1e9 + 0.01)
    return output_hash(checkpoint, cached=True)  # kept only where every file is settled by now


def recorded_output_sha256(checkpoint: Path) -> str | None:
    """The ``output_sha256`` (:func:`output_hash`) that a complete stage's manifest records for ``checkpoint`` when it
    is that stage's ``checkpoint/`` (``runs/<run>/<stage>/checkpoint``, ``runs/<run>/base/checkpoint``); None for any
    other directory. Cheap: reads one JSON file and hashes nothing."""
    checkpoint = Path(checkpoint)
    if checkpoint.name != "checkpoint" or not checkpoint.is_dir():
        return None
    manifest = StageDir(checkpoint.parent).read_manifest() or {}
    return manifest.get("output_sha256") if manifest.get("status") == "complete" else None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_sha(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass(frozen=True)
class StageDir:
    """Paths of one stage's directory."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def trainer(self) -> Path:
        return self.root / "trainer"

    def read_manifest(self) -> dict | None:
        """The stage's record; None when there is none or it cannot be read (``manifest_problem`` says why): a
        damaged manifest (truncated, hand-edited, not a JSON object) means "not complete"."""
        return read_manifest_file(self.manifest)[0]

    def manifest_problem(self) -> str | None:
        """Why a ``manifest.json`` that is there cannot be read (None when it reads, or there is none), for the
        reason a stage gives for starting over."""
        return read_manifest_file(self.manifest)[1]

    def published_problem(self, manifest: dict, *, owns_run_root: bool = False) -> str | None:
        """Why what a complete stage published is not as its ``manifest`` recorded it (None when it is, or when it
        recorded nothing): its checkpoint (``output_sha256``) or its results (``RESULTS``), and with ``owns_run_root``
        (it is the recipe's last eval stage, whose leaderboard the run keeps) what it wrote at the run's root. Why the
        results: the eval stage publishes no checkpoint, and skipped, it left the run's leaderboard deleted or edited.
        """
        return (self._checkpoint_published_problem(manifest)
                or results_problem(self.root.parent, manifest, owns_run_root=owns_run_root))

    def _checkpoint_published_problem(self, manifest: dict) -> str | None:
        """Why the checkpoint a complete ``manifest`` records is not the one the stage published (None when it is,
        or when it recorded none): gone, or its files hash otherwise than ``output_sha256`` (a copy cut short, a
        disk error, an edit). Why: a skipped stage hands its recorded hash to the stages after it, so a changed
        checkpoint would be trained on and evaluated under the old one's name. Hashed with the stat cache, so
        unchanged files are not read again."""
        recorded = manifest.get("output_sha256")
        if recorded is None:
            return None
        if not self.checkpoint.is_dir():
            return f"its checkpoint ({self.checkpoint}) is missing"
        try:
            found = output_hash(self.checkpoint, cached=True)
        except Exception as error:  # noqa: BLE001 - a reward model's manifest or backbone that cannot be read: a
            # damaged checkpoint, whatever its shape (an edited backbone record gave an AttributeError)
            return f"its checkpoint ({self.checkpoint}) cannot be hashed ({error})"
        old_record = found != recorded and _is_reward_model(self.checkpoint)  # recorded as its directory's hash
        if found != recorded and not (old_record and cached_directory_hash(self.checkpoint) == recorded):
            return (f"its checkpoint's files ({self.checkpoint}) changed since it completed (they hash to "
                    f"{found[:12]}, recorded {recorded[:12]})")
        return None

    def record_results(self, paths: list[Path], run_root: list[Path]) -> None:
        """Record the content hash of each result file or folder in ``paths`` (under the run directory) and of each
        file in ``run_root`` (at its top) once all are written, for ``published_problem`` to check before the stage
        is skipped. Apart: whether the run-root files are checked depends on the recipe as it is then, not now."""
        run_dir = self.root.parent
        self.update_manifest(**{RESULTS: {path.relative_to(run_dir).as_posix(): content_hash(path) for path in paths},
                                RUN_ROOT_RESULTS: {path.name: content_hash(path) for path in run_root}})

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest, manifest)

    def update_manifest(self, **fields: Any) -> dict:
        manifest = {**(self.read_manifest() or {}), **fields}
        self.write_manifest(manifest)
        return manifest

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config, dump_yaml(config))

    def read_config(self) -> dict:
        return yaml.safe_load(self.config.read_text(encoding="utf-8"))

    # -- trainer checkpoints: recorded with their hash once fully written, verified before a resume -------------

    def record_checkpoint(self, path: Path) -> str:
        """Record a fully written checkpoint's content hash in the manifest (the last step of every save).

        Why: a checkpoint directory is written file by file (by TRL, DeepSpeed, ...), so a kill mid-save leaves a
        directory that looks like a checkpoint. Only one with a matching recorded hash is resumed from. Records of
        checkpoints that no longer exist (rotated away) are dropped in the same write.
        """
        sha = directory_hash(path)
        manifest = self.read_manifest() or {}
        records = self._existing_records(manifest)
        records[self.relative_key(path)] = sha
        self.write_manifest({**manifest, CHECKPOINTS: records})
        return sha

    def save_trainer_checkpoint(self, step: int, write: Callable[[Path], None], *, keep: int) -> Path:
        """A resumable ``trainer/checkpoint-<step>`` for our own training loops (PPO, the reward ensemble): ``write``
        fills a staging directory, which is moved into place and its hash recorded, so a save cut short anywhere is
        never resumed from. Older checkpoints are pruned to ``keep`` only after that (``record_and_prune``)."""
        final = self.trainer / f"checkpoint-{step}"
        staging = final.with_name(final.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        write(staging)
        publish_directory(staging, final)
        self.record_and_prune(final, keep)
        return final

    def record_and_prune(self, path: Path, keep: int) -> None:
        """Record ``path`` (``record_checkpoint``), then delete all but the newest ``keep`` checkpoints beside it.

        Why in this order: hashing a large checkpoint takes a while, and an interrupt then, with older checkpoints
        already deleted (``keep: 1``), would leave nothing recorded to resume from."""
        self.record_checkpoint(path)
        prune_checkpoints(path.parent, keep)

    def remove_trainer_checkpoints(self, under: Path) -> None:
        """Delete the trainer checkpoints under ``under`` (an online stage's ``trainer/round-<r>``) and their hash
        records, once the work they could resume is done.

        Why: ``save_total_limit`` bounds the checkpoints a stage keeps, and rotation prunes only beside the newest
        one, so each finished round kept its own (weights and optimizer state) to the end of the stage."""
        shutil.rmtree(under, ignore_errors=True)
        manifest = self.read_manifest() or {}
        if checkpoint_records(manifest):
            self.write_manifest({**manifest, CHECKPOINTS: self._existing_records(manifest)})

    def checkpoint_problem(self, path: Path) -> str | None:
        """Why ``path`` cannot be resumed from (None when it is intact): never recorded, or its bytes changed."""
        recorded = checkpoint_records(self.read_manifest() or {}).get(self.relative_key(path))
        if recorded is None:
            return "its save never finished (no hash recorded in the manifest)"
        if directory_hash(path) != recorded:
            return "its files differ from the hash recorded when it was saved (corrupt or partly deleted)"
        return None

    def trainer_checkpoints(self, under: Path | None = None) -> list[Path]:
        """``checkpoint-N`` directories under ``trainer/`` (or ``under``), newest first."""
        return checkpoint_dirs(under or self.trainer)

    def latest_trainer_checkpoint(self, under: Path | None = None, *, quiet: bool = False) -> Path | None:
        """The newest intact trainer checkpoint; newer ones that are incomplete or corrupt are skipped with a message
        (falling back to the previous one) and set aside as ``invalid-checkpoint-N`` so a resumed run does not save
        into them or count them when rotating."""
        for path in self.trainer_checkpoints(under):
            problem = self.checkpoint_problem(path)
            if problem is None:
                return path
            if quiet:
                continue
            log.warning("[%s] skipping %s: %s; falling back to the previous checkpoint", self.name,
                        path.relative_to(self.root), problem)
            aside = path.with_name(f"invalid-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        return None

    def has_progress(self) -> bool:
        """Whether an interrupted attempt left something ``--resume`` may continue from: a trainer checkpoint whose
        save finished (hash recorded; verifying it is left to ``latest_trainer_checkpoint``, so it is hashed once) or
        a round's work (``has_round_progress``)."""
        return bool(self._existing_records(self.read_manifest() or {})) or self.has_round_progress()

    def _existing_records(self, manifest: dict) -> dict[str, str]:
        """The manifest's checkpoint hash records whose directories still exist (rotation deletes old ones)."""
        return {key: sha for key, sha in checkpoint_records(manifest).items() if (self.root / key).is_dir()}

    def has_round_progress(self) -> bool:
        """Whether an iterative stage kept a finished round or a round's generated data (``ROUND_DATA``)."""
        rounds = self.root / "rounds"
        return any(rounds.glob("round-*/checkpoint")) or any(rounds.glob(f"round-*/{ROUND_DATA}"))

    def keep_metrics(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite ``metrics.jsonl`` with only the records ``keep`` accepts (a resume drops the records of the steps it
        is about to redo, so the resumed log's step records equal an uninterrupted one's; the Trainer's closing
        summary, ``train_loss`` included, covers only the steps the resumed attempt ran). A torn last line (killed
        mid-write) goes too."""
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if keep(record):
                kept.append(line + "\n")
        atomic_write_text(self.metrics, "".join(kept))

    def relative_key(self, path: Path) -> str:
        """``path`` relative to the stage directory, as the manifest records it."""
        return Path(path).resolve().relative_to(self.root.resolve()).as_posix()

    def reset(self) -> None:
        """Forget a previous attempt (used when a stage starts over rather than resuming): its checkpoints, logs and
        result files (``RESULT_FILES``), so nothing of it is left beside a new attempt that fails or is interrupted.

        The manifest goes first: deleting a large checkpoint takes a while, and a reset interrupted half-way must not
        leave a half-deleted stage under a manifest that still says ``complete``."""
        if self.manifest.is_dir():  # a damaged stage directory: whatever stands in the manifest's place goes too
            shutil.rmtree(self.manifest)
        self.manifest.unlink(missing_ok=True)
        leftovers = (self.checkpoint, self.trainer, self.metrics, self.root / "checkpoint.tmp", self.root / "rounds",
                     *(self.root / name for name in RESULT_FILES),
                     *self.root.glob(f".{self.checkpoint.name}.staging-*"))  # reward models' save_* staging dirs
        for path in leftovers:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def read_manifest_file(path: Path) -> tuple[dict | None, str | None]:
    """A manifest's contents and, when a file is there but cannot be read as a JSON object, why not (naming it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8 (a torn or overwritten file)
        return None, f"{path} cannot be read ({type(error).__name__}: {error})"
    if not isinstance(data, dict):
        return None, f"{path} holds a JSON {type(data).__name__}, not the object a manifest is"
    return data, None


def read_json_object(path: Path) -> tuple[dict | None, str | None]:
    """A run's JSON file that must hold an object, and why it cannot be used, naming it by its folder (``run.json in
    tiny: ...``), for the report and the run record; (None, None) when there is none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not JSON, or not UTF-8
        return None, f"{path.name} in {path.parent.name}: {why_unreadable(error)}"
    if not isinstance(data, dict):
        return None, f"{path.name} in {path.parent.name}: it holds a JSON {type(data).__name__}, not an object"
    return data, None


# run.json's fields by the type the runner writes them with (Runner._write_run_record)
_RUN_RECORD_TYPES = {**dict.fromkeys(("run", "recipe_path", "recipe_file", "recipe_sha256", "git_sha", "status",
                                     "started", "updated", "stopped_at", "writing_stage"), str),
                    "overrides": list, "versions": dict}


def read_run_record(run_dir: Path) -> tuple[dict, list[str]]:
    """A run directory's ``run.json`` and what is wrong with it, for every reader of it (the next run, the eval stage,
    the report). The record leaves out the fields whose type is not the one the runner writes (a hand edit), so one
    such field costs only itself; it is empty when there is no file, or one that cannot be read (cut short, not
    UTF-8, a directory in its place) or that is not a JSON object. The problems name each of these (none for a
    missing file: a run that has not started yet)."""
    record, problem = read_json_object(Path(run_dir) / RUN_FILE)
    if record is None:
        return {}, [problem] if problem else []
    wrong = [key for key, kind in _RUN_RECORD_TYPES.items()
             if record.get(key) is not None and not isinstance(record[key], kind)]
    if isinstance(record.get("overrides"), list) and not all(isinstance(o, str) for o in record["overrides"]):
        wrong.append("overrides")
    problems = [f"{RUN_FILE}: its {key!r} is a {type(record[key]).__name__}, not the "
                f"{_RUN_RECORD_TYPES[key].__name__} the runner writes (edited by hand?); left out" for key in wrong]
    return {key: value for key, value in record.items() if key not in wrong}, problems


def results_problem(run_dir: Path, manifest: dict, *, owns_run_root: bool = False) -> str | None:
    """Why the results a complete stage's ``manifest`` recorded (``RESULTS``; with ``owns_run_root``, also
    ``RUN_ROOT_RESULTS``) are not as it wrote them, naming each one missing or hashing otherwise; None when all are as
    recorded, or none were. A stage recorded before results were (no ``RESULTS``) is trusted, as a reward model
    recorded by its folder's hash is (``_is_reward_model``): its results cannot be compared, and re-running every such
    eval stage once would sample again wherever its cache is gone. One that recorded its own results but not the run's
    (before the two were kept apart) cannot tell the run's leaderboard from another eval stage's: as the last eval
    stage, it runs again once."""
    if owns_run_root and manifest.get(RESULTS) is not None and manifest.get(RUN_ROOT_RESULTS) is None:
        return f"its record names no leaderboard of its own ({RUN_ROOT_RESULTS}): the run's may be another eval stage's"
    recorded: dict[str, str] = {}
    for key in (RESULTS, RUN_ROOT_RESULTS) if owns_run_root else (RESULTS,):
        if (records := manifest.get(key)) is None:
            continue
        if not isinstance(records, dict) or not all(isinstance(sha, str) for sha in records.values()):
            return f"its record of its results ({key}) is not a mapping of file hashes (edited by hand?)"
        recorded.update(records)
    changed = [problem for name, sha in sorted(recorded.items()) if (problem := _result_problem(run_dir, name, sha))]
    return f"its results in {run_dir} changed since it completed: {', '.join(changed)}" if changed else None


def _result_problem(run_dir: Path, name: str, recorded: str) -> str | None:
    """What became of one recorded result ``name`` (relative to ``run_dir``); None when it hashes as recorded."""
    path = run_dir / name
    if not path.exists():
        return f"{name} is missing"
    try:
        found = content_hash(path)
    except OSError as error:
        return f"{name} cannot be read ({error.strerror or error})"
    return None if found == recorded else f"{name} hashes to {found[:12]} (recorded {recorded[:12]})"


def checkpoint_records(manifest: dict) -> dict[str, str]:
    """The manifest's ``{checkpoint: sha256}`` records; none when the entry is not such a mapping (hand-edited)."""
    records = manifest.get(CHECKPOINTS)
    if not isinstance(records, dict):
        return {}
    return {key: sha for key, sha in records.items() if isinstance(sha, str)}


def checkpoint_dirs(directory: Path) -> list[Path]:
    """``checkpoint-N`` directories in ``directory``, newest (largest N) first."""
    found = [p for p in directory.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``checkpoint-N`` directories (``save_total_limit``)."""
    for old in checkpoint_dirs(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def publish_directory(staging: Path, final: Path) -> None:
    """Move a fully written directory into place so readers never see a half-written checkpoint."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)
