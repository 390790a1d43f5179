"""Pinning a Hugging Face Hub model to one commit for a whole run, and fetching the files transformers loads.

Why: a hub id names whatever its branch holds today. Loaded by name in every stage, a run could not say which
weights it trained on, an upstream push between two stages mixed two models, and the stages' hashes never saw the
change. Neither transformers nor huggingface_hub pins a model across calls (each ``from_pretrained`` resolves the
branch again), so the runner does it here: it resolves ``model.name_or_path`` at ``model.revision`` (a branch, tag
or commit; the default branch when unset) to a commit once, downloads that commit's model files into the Hugging
Face cache, and every stage loads the local snapshot folder. The commit is part of every stage's hash. A reward
stage's hub ``backbone`` (``ORG/NAME@REVISION``) and an ``alignpipe eval`` argument are pinned the same way.

Offline (``HF_HUB_OFFLINE=1``, or no route to the Hub), a revision resolves through the local cache as
huggingface_hub itself would resolve it, so a cache filled on another machine works on compute nodes without network.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from alignpipe.models.checkpoint_files import TOKENIZER_FILES, has_tokenizer_files
from alignpipe.models.loading import ModelError

DEFAULT_REVISION = "main"
# Where a recipe names a hub model and its revision, for error messages: the recipe's model by default.
MODEL_KEYS = ("model.name_or_path", "model.revision")
COMMIT = re.compile(r"[0-9a-f]{40}")
# Top-level files transformers reads besides the weights: configs, tokenizer files, chat templates.
SUPPORT_FILE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
NAMED_CHAT_TEMPLATES = "additional_chat_templates/"  # transformers 5 reads every .jinja there as a named template
TRANSFORMERS_SAFETENSORS = re.compile(r"model(-\d+-of-\d+)?\.safetensors")
TORCH_BIN_WEIGHTS = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")
SHARD_FILE = re.compile(r"([^/]+)-\d+-of-\d+\.(safetensors|bin)")  # (name, suffix) of the index that lists it
# What was resolved inside resolving_once: ("model" | "dataset", repo id, revision, ...) -> snapshot or commit.
_PINNED: ContextVar[dict[tuple, Any] | None] = ContextVar("alignpipe_hub_pinned", default=None)
T = TypeVar("T")


@dataclass(frozen=True)
class HubSnapshot:
    """A hub model pinned to a commit. ``files`` are the model's: to download (from the repository's listing), or,
    with ``folder`` set, found in the local cache (the Hub could not be asked), whose folder is used as it is."""

    repo_id: str
    revision: str
    commit: str
    files: tuple[str, ...]
    folder: Path | None = None

    def describe(self) -> str:
        pinned = "" if self.revision == self.commit else f" ({self.revision})"
        return f"{self.repo_id} at commit {self.commit[:12]}{pinned}"


def backbone_keys(stage: str) -> tuple[str, str]:
    """Where a reward stage names a hub backbone and its revision, for error messages."""
    return f"stages.{stage}.backbone", f"the @REVISION of stages.{stage}.backbone"


def resolve_model(spec) -> HubSnapshot:
    """The recipe's hub model (its ``ModelSpec``: ``name_or_path`` at ``revision``) pinned to a commit."""
    return resolve(spec.name_or_path, spec.revision, gguf_file=spec.gguf_file, remote_code=spec.trust_remote_code)


def resolve_backbone(stage, *, remote_code: bool) -> HubSnapshot:
    """A reward stage's hub ``backbone`` (``ORG/NAME[@REVISION]``) pinned to a commit."""
    return resolve(*split_revision(stage.backbone), remote_code=remote_code, keys=backbone_keys(stage.name))


def backbone_here(stage, commit: str, *, remote_code: bool) -> Path:
    """A reward stage's hub ``backbone`` at the ``commit`` the runner pinned, in this machine's cache
    (:func:`snapshot_here`)."""
    return snapshot_here(split_revision(stage.backbone)[0], commit, remote_code=remote_code,
                         keys=backbone_keys(stage.name))


def split_revision(name: str) -> tuple[str, str | None]:
    """``ORG/NAME@REVISION`` as (``ORG/NAME``, ``REVISION``), ``ORG/NAME`` as (it, None): how a hub id that is not
    the recipe's model (a reward backbone, an ``alignpipe eval`` argument) names a revision. Hub ids cannot hold
    ``@``, so the split is unambiguous; a local path is never split (callers look for it first)."""
    repo_id, at, revision = name.partition("@")
    if at and not revision:
        raise ModelError(f"{name!r}: nothing after '@'; give a branch, tag or commit (ORG/NAME@REVISION)")
    return repo_id, revision or None


def files_to_fetch(repo_files: list[str], *, gguf_file: str | None = None, remote_code: bool = False,
                   repo_id: str = "the model", keys: tuple[str, str] = MODEL_KEYS) -> tuple[str, ...]:
    """The files of a hub model's commit that loading it needs: top-level configs and tokenizer files, named chat
    templates, and one copy of the weights: the named GGUF file, else transformers' ``model*.safetensors`` (any
    top-level safetensors when none is named so), else ``pytorch_model*.bin``. Why not the whole repository: many
    ship the weights twice or three times (``.bin`` beside safetensors, a ``consolidated.safetensors`` for another
    runtime, an ``original/`` folder, ONNX exports), which would multiply the download. Python files are fetched only
    with ``model.trust_remote_code``, the one case transformers runs them."""
    top_level = [name for name in repo_files if "/" not in name]
    wanted = {name for name in top_level if name.endswith(SUPPORT_FILE_SUFFIXES)}
    wanted |= {name for name in repo_files if name.startswith(NAMED_CHAT_TEMPLATES) and name.endswith(".jinja")}
    if remote_code:
        wanted |= {name for name in top_level if name.endswith(".py")}
    if gguf_file is not None:
        if gguf_file not in repo_files:
            ggufs = sorted(name for name in repo_files if name.endswith(".gguf"))
            raise ModelError(f"{repo_id} has no GGUF file {gguf_file!r} (model.gguf_file); it has "
                             f"{', '.join(ggufs) if ggufs else 'none'}")
        weights = [gguf_file]
    else:
        weights = ([name for name in top_level if TRANSFORMERS_SAFETENSORS.fullmatch(name)]
                   or [name for name in top_level if name.endswith(".safetensors")]
                   or [name for name in top_level if TORCH_BIN_WEIGHTS.fullmatch(name)])
    if not weights:
        raise ModelError(f"{repo_id} has no weights transformers can load (model*.safetensors or "
                         "pytorch_model*.bin at the top level); a GGUF-only repository needs model.gguf_file")
    if "config.json" not in wanted and gguf_file is None:
        adapter = " (it holds a PEFT adapter: name its base model here and train your own adapter on it)" \
            if "adapter_config.json" in wanted else " (a model repository, not a dataset or a space)"
        raise ModelError(f"{repo_id} has no config.json at the top level, so transformers cannot build it; check "
                         f"{keys[0]}{adapter}")
    return tuple(sorted(wanted | set(weights)))


def resolve(repo_id: str, revision: str | None, *, gguf_file: str | None = None, remote_code: bool = False,
            keys: tuple[str, str] = MODEL_KEYS) -> HubSnapshot:
    """``repo_id`` at ``revision`` pinned to a commit: asked of the Hub (one request, no download), else of the local
    cache. A model or revision the Hub does not have is a :class:`ModelError` that says what to check: ``keys``, the
    settings that name the model and its revision."""
    wanted = revision or DEFAULT_REVISION
    return once(("model", repo_id, wanted, gguf_file, remote_code),
                lambda: _resolve(repo_id, wanted, gguf_file=gguf_file, remote_code=remote_code, keys=keys))


def _resolve(repo_id: str, wanted: str, *, gguf_file: str | None, remote_code: bool,
             keys: tuple[str, str]) -> HubSnapshot:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=wanted)
    except HFValidationError as error:
        raise ModelError(f"model {repo_id!r} is neither an existing local folder nor a hub id (owner/name): "
                         f"{error}") from error
    except RevisionNotFoundError as error:
        raise ModelError(f"model {repo_id!r} has no revision {wanted!r} on the Hub; {keys[1]} takes a branch, a tag "
                         "or a full 40-character commit") from error
    except RepositoryNotFoundError as error:  # gated and private repositories answer the same without a login
        raise ModelError(f"model {repo_id!r} is not on the Hugging Face Hub, or it is private or gated and this "
                         f"machine is not logged in (`hf auth login`, or HF_TOKEN); check {keys[0]} (a local folder "
                         "must exist)") from error
    except Exception as error:  # no network, offline mode, a proxy or a server error: the cache may still have it
        snapshot = _from_cache(repo_id, wanted, gguf_file=gguf_file, remote_code=remote_code, unreachable=error,
                               keys=keys)
    else:
        files = files_to_fetch([sibling.rfilename for sibling in info.siblings or []], gguf_file=gguf_file,
                               remote_code=remote_code, repo_id=repo_id, keys=keys)
        snapshot = HubSnapshot(repo_id, wanted, info.sha, files=files)
    return snapshot


@contextmanager
def resolving_once() -> Iterator[None]:
    """Within it, a hub model or dataset is resolved once per revision (:func:`once`): a run's preflight and its runner
    then pin the same commit with one request, where the branch could have moved between two."""
    token = _PINNED.set({})
    try:
        yield
    finally:
        _PINNED.reset(token)


def once(key: tuple, resolve_it: Callable[[], T]) -> T:
    """``resolve_it()``, remembered under ``key`` inside :func:`resolving_once` (asked every time outside it)."""
    pinned = _PINNED.get()
    if pinned is None:
        return resolve_it()
    if key not in pinned:
        pinned[key] = resolve_it()
    return pinned[key]


def _from_cache(repo_id: str, revision: str, *, gguf_file: str | None, remote_code: bool,
                unreachable: Exception | None, keys: tuple[str, str] = MODEL_KEYS) -> HubSnapshot:
    """The commit the local cache holds for ``revision`` (a branch's or tag's ref, or the commit itself), when its
    snapshot has a loadable model; its ``files`` are the model's among those cached."""
    from huggingface_hub import constants

    repository = repository_folder(repo_id)
    ref = repository / "refs" / revision
    commit = revision if COMMIT.fullmatch(revision) else (ref.read_text().strip() if ref.is_file() else None)
    folder = repository / "snapshots" / commit if commit else None
    if folder is None or not folder.is_dir():
        offline = "offline mode is on (HF_HUB_OFFLINE)" if constants.is_offline_mode() or unreachable is None else \
            f"the Hub could not be reached ({type(unreachable).__name__}: {unreachable})"
        cached = sorted(path.name for path in (repository / "snapshots").glob("*") if path.is_dir())
        known = f"; the cache has it at commit(s) {', '.join(cached)} but does not say which is {revision!r}: name " \
                f"one as {keys[1]}" if cached else ""
        raise ModelError(f"model {repo_id!r} at revision {revision!r} is not in the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and {offline}{known}; download it where there is network "
                         f"(`hf download {repo_id}{'' if revision == DEFAULT_REVISION else ' --revision ' + revision}"
                         "` into the same HF_HUB_CACHE), or give a local checkpoint folder") from unreachable
    cached = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
    where = f"the cached snapshot of {repo_id} ({folder})"
    files = files_to_fetch(cached, gguf_file=gguf_file, remote_code=remote_code, repo_id=where, keys=keys)
    if missing := _missing_parts(folder, files, gguf_file=gguf_file):
        raise ModelError(f"{where} lacks {'; and '.join(missing)}, as a download cut short leaves it; download it "
                         f"again where there is network (`hf download {repo_id} --revision {commit}` into the same "
                         "HF_HUB_CACHE), or give a local checkpoint folder")
    return HubSnapshot(repo_id, revision, commit, files=files, folder=folder)


def _missing_parts(folder: Path, files: tuple[str, ...], *, gguf_file: str | None) -> list[str]:
    """What a cached snapshot lacks of a loadable model: the index of shards it holds, shards its index names, a
    tokenizer. Why each: a download cut short keeps whatever files arrived, so a first shard without its index, or
    weights without any tokenizer file, looked like a model here and failed only when a stage loaded it, with advice
    to re-run the stage that cannot complete the download. A GGUF file carries its own tokenizer."""
    missing = [*_missing_indexes(folder, files), *_missing_shards(folder)]
    if gguf_file is None and not has_tokenizer_files(folder):
        missing.append(f"a tokenizer file ({', '.join(TOKENIZER_FILES[:4])}, ...)")
    return missing


def _missing_indexes(folder: Path, files: tuple[str, ...]) -> list[str]:
    """The weight index each shard file (``model-00001-of-00002.safetensors``) needs: transformers finds sharded
    weights only through ``model.safetensors.index.json`` (``pytorch_model.bin.index.json`` for ``.bin``)."""
    indexes = {f"{match[1]}.{match[2]}.index.json" for name in files if (match := SHARD_FILE.fullmatch(name))}
    return [f"the weight index {index}" for index in sorted(indexes) if not (folder / index).is_file()]


def _missing_shards(folder: Path) -> list[str]:
    """The shards a cached snapshot's weight index names that are not there."""
    import json

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            shards = set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
            if missing := sorted(name for name in shards if not (folder / name).is_file()):
                return [f"{len(missing)} of its {len(shards)} weight shards ({missing[0]}, ...)"]
            return []
    return []


def fetch(snapshot: HubSnapshot) -> Path:
    """The local folder of ``snapshot``'s commit with its model files, downloaded into the Hugging Face cache where
    they are missing (huggingface_hub's progress bars; files already there are not fetched again). The revision's
    ref is recorded beside it, as ``from_pretrained`` records it, so the same cache resolves it later offline."""
    if snapshot.folder is not None:
        return snapshot.folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    try:  # names escaped: huggingface_hub matches them as glob patterns, and "[" is a file name character too
        folder = Path(snapshot_download(snapshot.repo_id, revision=snapshot.commit,
                                        allow_patterns=[glob.escape(name) for name in snapshot.files]))
    except GatedRepoError as error:
        raise ModelError(f"model {snapshot.repo_id!r} is gated: accept its licence on its Hub page and log in on "
                         "this machine (`hf auth login`, or HF_TOKEN) with that account") from error
    except HfHubHTTPError as error:
        raise ModelError(f"downloading {snapshot.describe()} failed: {error}") from error
    if snapshot.revision != snapshot.commit:
        record_ref(snapshot.repo_id, snapshot.revision, snapshot.commit)
    return folder


def record_ref(repo_id: str, revision: str, commit: str, kind: str = "models") -> None:
    """Write the cache's ``refs/<revision>`` (atomically): huggingface_hub writes it only when it resolves a branch
    or tag itself, and :func:`fetch` downloads by commit (``datasets`` loads a pinned dataset by commit too)."""
    ref = repository_folder(repo_id, kind) / "refs" / revision
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    temporary.write_text(commit)
    os.replace(temporary, ref)


def repository_folder(repo_id: str, kind: str = "models") -> Path:
    """A repository's folder in the Hugging Face cache (its documented layout: ``models--owner--name``, or
    ``datasets--owner--name`` for a dataset)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"{kind}--{repo_id.replace('/', '--')}"


def snapshot_folder(snapshot: HubSnapshot) -> Path:
    """Where :func:`fetch` puts (or found) ``snapshot``, without downloading: for a dry run's commands."""
    return snapshot.folder if snapshot.folder is not None else repository_folder(snapshot.repo_id) / "snapshots" / \
        snapshot.commit


def cached_snapshot_identity(folder: str | Path) -> tuple[str, str] | None:
    """(repo id, commit) of a snapshot folder in a Hugging Face cache (``models--owner--name/snapshots/<commit>``);
    None for any other folder. Hub repository names cannot hold ``--``, so the folder name splits one way only."""
    folder = Path(folder)
    repository = folder.parent.parent.name
    if folder.parent.name != "snapshots" or not COMMIT.fullmatch(folder.name) or \
            not repository.startswith("models--"):
        return None
    return repository.removeprefix("models--").replace("--", "/"), folder.name


def snapshot_here(repo_id: str, commit: str, *, gguf_file: str | None = None, remote_code: bool = False,
                  keys: tuple[str, str] = MODEL_KEYS) -> Path:
    """This machine's folder of ``repo_id`` at ``commit``: from its Hugging Face cache when the model is there (no
    request), else resolved and downloaded. For what names a commit that was pinned elsewhere: a stage's pinned
    backbone in each of its processes, a saved reward ensemble's backbone on another machine."""
    return fetched_here(repo_id, commit, gguf_file=gguf_file, remote_code=remote_code, keys=keys).folder


def fetched_here(repo_id: str, commit: str, *, gguf_file: str | None = None, remote_code: bool = False,
                 keys: tuple[str, str] = MODEL_KEYS) -> HubSnapshot:
    """:func:`snapshot_here`'s snapshot, its ``folder`` set."""
    if (repository_folder(repo_id) / "snapshots" / commit).is_dir():
        try:
            return _from_cache(repo_id, commit, gguf_file=gguf_file, remote_code=remote_code, unreachable=None,
                               keys=keys)
        except ModelError:
            pass  # cached in part (another file set, a download cut short): fetch what is missing; offline, the
            # resolve below fails with what is missing and the `hf download` that completes it
    snapshot = resolve(repo_id, commit, gguf_file=gguf_file, remote_code=remote_code, keys=keys)
    return replace(snapshot, folder=fetch(snapshot))
