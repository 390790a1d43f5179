"""Pinning a Hugging Face Hub dataset to one commit for a whole run.

Why: ``load_dataset("ORG/NAME")`` reads whatever the default branch holds today, and offline it silently takes the
newest copy in the datasets cache, whatever commit that was (it ignores ``revision`` then). So a run could not say
which rows it trained on, and the stage's hashes never saw a push. The runner resolves a stage's hub dataset
(``dataset.path: ORG/NAME``, or ``ORG/NAME@REVISION`` for a branch, tag or commit) to a commit once, hashes the commit
into the stage's inputs (a push upstream re-runs the stage; a commit keeps it), and the stage loads
``ORG/NAME@<commit>``: :func:`alignpipe.data.rows.load_rows` passes the commit to ``load_dataset`` and checks the
rows came from that commit (:func:`check_loaded_commit`).

Offline (``HF_HUB_OFFLINE=1``, or no route to the Hub), a revision resolves through the Hugging Face cache's
``refs/``, as for models (:mod:`alignpipe.models.hub`); the runner records the ref once a stage has loaded the rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from alignpipe.data.errors import DataError
from alignpipe.data.rows import looks_like_path
from alignpipe.models import hub

log = logging.getLogger("alignpipe")


def hub_dataset_id(path: str | None) -> str | None:
    """``path`` when it names a hub dataset (``ORG/NAME[@REVISION]``), not a local file or folder; else None."""
    if not path or Path(path).expanduser().exists():
        return None
    repo_id, _, revision = path.partition("@")
    if looks_like_path(repo_id):
        return None
    # A branch may hold "/" (dev/v2, refs/pr/1), and so may a folder: runs/exp@lr1e-5/pairs is one under a folder
    # that exists here ("runs"), where an owner's name rarely is one.
    if "/" in revision and not revision.startswith("refs/") and Path(repo_id.split("/")[0]).expanduser().is_dir():
        return None
    return None if looks_like_path(Path(path).name) else path


@dataclass(frozen=True)
class DatasetPin:
    """A hub dataset's revision resolved: its ``commit``, and whether only the local cache could say (``offline``:
    the Hub was not asked or not reached, so the rows can only come from the datasets cache)."""

    commit: str
    offline: bool


def resolve_dataset(path: str, *, key: str) -> DatasetPin:
    """The commit a hub dataset's revision (the default branch when unset) names: asked of the Hub (one request,
    remembered inside :func:`alignpipe.models.hub.resolving_once`), else of the local cache. ``key``: the setting that
    names it, for the errors."""
    repo_id, revision = _split(path, key)
    wanted = revision or hub.DEFAULT_REVISION
    return hub.once(("dataset", repo_id, wanted), lambda: _resolve(repo_id, wanted, key))


def resolve_cached_dataset(path: str, *, key: str) -> DatasetPin:
    """:func:`resolve_dataset`, and offline :func:`check_cached_offline` of its commit: what every look before a run
    (preflight, ``alignpipe data``) checks, as the runner does when the stage starts."""
    pin = resolve_dataset(path, key=key)
    check_cached_offline(path, pin.commit, key=key, offline=pin.offline)
    return pin


def repo_id_of(path: str) -> str:
    """The repository a hub dataset path names (``ORG/NAME`` of ``ORG/NAME@REVISION``): what its hashes hold."""
    return path.partition("@")[0]


def pinned(path: str, commit: str) -> str:
    """``path``'s hub dataset named at ``commit`` (``ORG/NAME@<commit>``): what the stage loads."""
    return f"{repo_id_of(path)}@{commit}"


def check_cached_offline(path: str, commit: str, *, key: str, offline: bool = False) -> None:
    """Offline (``offline``: the runner's resolution could not reach the Hub; or offline mode), refuse a pinned commit
    the datasets cache cannot give, before the runner touches the stage's directory: the stage could only fail on it.
    Offline, datasets reads the newest copy of a config (``<owner>___<name>/<config>/<version>/<hash>``), so the
    commit must be that copy for some config. A copy under a module hash (an older datasets release's) cannot be told
    apart, and is let through, as :func:`check_loaded_commit` lets it."""
    import datasets
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants

    if not (offline or constants.is_offline_mode() or datasets.config.HF_HUB_OFFLINE):
        return
    repo_id = repo_id_of(path)
    owner, _, name = repo_id.rpartition("/")
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(filter(None, (owner, camelcase_to_snakecase(name))))
    newest = [max(copies, key=lambda copy: copy.stat().st_mtime).name for config in folder.glob("*") if config.is_dir()
              if (copies := [copy for copy in config.glob("*/*") if copy.is_dir()])]
    if commit in newest or any(not hub.COMMIT.fullmatch(copy) for copy in newest):
        return
    held = f"; it holds commit(s) {', '.join(sorted(set(newest)))} as its newest copies" if newest else ""
    raise DataError(f"{key}: offline, and the datasets cache ({datasets.config.HF_DATASETS_CACHE}) cannot give "
                    f"{repo_id!r} at commit {commit} (datasets reads only the newest copy it holds){held}; load it "
                    "once where there is network, or name that commit (ORG/NAME@COMMIT)")


def check_loaded_commit(rows, repo_id: str, commit: str, *, what: str) -> None:
    """Refuse rows that ``load_dataset`` took from another commit than ``commit`` (when it is one): offline, it reads
    the newest copy in the datasets cache (``<cache>/<owner>___<name>/<config>/<version>/<commit>/``) whatever
    ``revision`` says. A copy in a folder of an older datasets release (named by a module hash, not a commit) cannot
    be told apart, and is let through."""
    folders = {Path(entry["filename"]).parent.name for entry in rows.cache_files}
    loaded = sorted(folder for folder in folders if hub.COMMIT.fullmatch(folder))
    if hub.COMMIT.fullmatch(commit) and loaded and commit not in loaded:
        raise DataError(f"{what}: dataset {repo_id!r} at commit {commit} cannot be loaded here: the Hub could not be "
                        "reached, and offline the datasets library reads only the newest copy in its cache, which is "
                        f"commit {', '.join(loaded)}. Load it once where there is network, or name that commit "
                        f"({repo_id}@{loaded[0]})")


def _split(path: str, key: str) -> tuple[str, str | None]:
    repo_id, at, revision = path.partition("@")
    if at and not revision:
        raise DataError(f"{path!r}: nothing after '@' in {key}; give a branch, tag or commit (ORG/NAME@REVISION)")
    return repo_id, revision or None


def _resolve(repo_id: str, revision: str, key: str) -> DatasetPin:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().dataset_info(repo_id, revision=revision)
    except HFValidationError as error:
        raise DataError(f"{repo_id!r} is neither an existing local file or folder nor a hub dataset id (owner/name): "
                        f"{error}") from error
    except RevisionNotFoundError as error:
        raise DataError(f"dataset {repo_id!r} has no revision {revision!r} on the Hub; name a branch, a tag or a "
                        f"full 40-character commit after the '@' of {key}") from error
    except RepositoryNotFoundError as error:  # gated and private repositories answer the same without a login
        raise DataError(f"dataset {repo_id!r} is not on the Hugging Face Hub, or it is private or gated and this "
                        f"machine is not logged in (`hf auth login`, or HF_TOKEN); check {key} (a local file must "
                        "exist)") from error
    except Exception as error:  # no network, offline mode, a proxy or a server error: the cache may still know it
        return DatasetPin(_from_cache(repo_id, revision, key, error), offline=True)
    return DatasetPin(info.sha, offline=False)


def record_loaded(path: str, commit: str) -> None:
    """Record in the Hugging Face cache that ``path``'s revision is ``commit`` (``refs/<revision>``), once a stage has
    loaded that commit's rows here, so the same caches resolve it offline later. Not before: an offline run would
    then pin a commit whose rows this machine does not have. A cache that cannot be written (a shared one mounted
    read-only) only loses that convenience: the stage has completed."""
    repo_id, _, revision = path.partition("@")
    revision = revision or hub.DEFAULT_REVISION
    if revision == commit:
        return
    try:
        hub.record_ref(repo_id, revision, commit, kind="datasets")
    except OSError as error:
        log.warning("could not record that dataset %s at %s is commit %s in the Hugging Face cache (%s); an offline "
                    "run there will need the commit named (%s@%s)", repo_id, revision, commit[:12], error, repo_id,
                    commit)


def _from_cache(repo_id: str, revision: str, key: str, unreachable: Exception) -> str:
    """The commit the Hugging Face cache records for ``revision`` (written when a dataset is loaded online), or the
    revision itself when it is a commit."""
    from huggingface_hub import constants

    if hub.COMMIT.fullmatch(revision):
        return revision
    ref = hub.repository_folder(repo_id, "datasets") / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    offline = "offline mode is on (HF_HUB_OFFLINE)" if constants.is_offline_mode() else \
        f"the Hub could not be reached ({type(unreachable).__name__}: {unreachable})"
    raise DataError(f"cannot tell which commit dataset {repo_id!r} at revision {revision!r} is: {offline} and the "
                    f"Hugging Face cache ({constants.HF_HUB_CACHE}) has no ref for it; run once where there is "
                    f"network, or name the commit in {key} ({repo_id}@COMMIT)") from unreachable
