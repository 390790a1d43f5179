"""Pinning a Hugging Face Hub dataset to one commit for a whole run.

Why: ``load_dataset("ORG/NAME")`` reads whatever the default branch holds today, and offline it silently takes the
newest copy in the datasets cache, whatever commit that was (it ignores ``revision`` then). So a run could not say
which rows it trained on, and the stage's hashes never saw a push. The runner resolves a stage's hub dataset
(``dataset.path: ORG/NAME``, or ``ORG/NAME@REVISION`` for a branch, tag or commit) to a commit once, hashes the commit
into the stage's inputs (a push upstream re-runs the stage; a commit keeps it), and the stage loads
``ORG/NAME@<commit>``: :func:`alignpipe.data.adapters.load_rows` passes the commit to ``load_dataset`` and checks the
rows came from that commit (:func:`check_loaded_commit`).

Offline (``HF_HUB_OFFLINE=1``, or no route to the Hub), a revision resolves through the Hugging Face cache's
``refs/``, as for models (:mod:`alignpipe.models.hub`); the runner records the ref once a stage has loaded the rows.
"""

from __future__ import annotations

from pathlib import Path

from alignpipe.data.adapters import DataError, looks_like_path
from alignpipe.models import hub


def hub_dataset_id(path: str | None) -> str | None:
    """``path`` when it names a hub dataset (``ORG/NAME[@REVISION]``), not a local file or folder; else None."""
    if not path or Path(path).expanduser().exists():
        return None
    repo_id, _, revision = path.partition("@")
    # a hub revision holds "/" only as refs/... (refs/pr/1, refs/convert/parquet); runs/exp@lr1e-5/pairs is a folder
    if looks_like_path(repo_id) or ("/" in revision and not revision.startswith("refs/")):
        return None
    return None if looks_like_path(Path(path).name) else path


def resolve_dataset(path: str, *, key: str) -> str:
    """The commit a hub dataset's revision (the default branch when unset) names: asked of the Hub (one request,
    remembered inside :func:`alignpipe.models.hub.resolving_once`), else of the local cache. ``key``: the setting that
    names it, for the errors."""
    repo_id, revision = _split(path, key)
    wanted = revision or hub.DEFAULT_REVISION
    return hub.once(("dataset", repo_id, wanted), lambda: _resolve(repo_id, wanted, key))


def pinned(path: str, commit: str) -> str:
    """``path``'s hub dataset named at ``commit`` (``ORG/NAME@<commit>``): what the stage loads."""
    return f"{path.partition('@')[0]}@{commit}"


def check_cached_offline(path: str, commit: str, *, key: str) -> None:
    """Offline, refuse a pinned commit the datasets cache has no copy of (``<owner>___<name>/*/*/<commit>``), before
    the runner touches the stage's directory: the stage could only fail on it."""
    import datasets
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants

    if not (constants.is_offline_mode() or datasets.config.HF_HUB_OFFLINE):
        return
    owner, _, name = path.partition("@")[0].rpartition("/")
    folder = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(filter(None, (owner, camelcase_to_snakecase(name))))
    if not any(folder.glob(f"*/*/{commit}")):
        cached = sorted({found.name for found in folder.glob("*/*/*") if hub.COMMIT.fullmatch(found.name)})
        held = f"; it holds commit(s) {', '.join(cached)}" if cached else ""
        raise DataError(f"{key}: offline mode is on and the datasets cache ({datasets.config.HF_DATASETS_CACHE}) has "
                        f"no copy of {path.partition('@')[0]!r} at commit {commit}{held}; load it once where there is "
                        "network, or name a cached commit (ORG/NAME@COMMIT). The stage was left as it was")


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


def _resolve(repo_id: str, revision: str, key: str) -> str:
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
        return _from_cache(repo_id, revision, key, error)
    return info.sha


def record_loaded(path: str, commit: str) -> None:
    """Record in the Hugging Face cache that ``path``'s revision is ``commit`` (``refs/<revision>``), once a stage has
    loaded that commit's rows here, so the same caches resolve it offline later. Not before: an offline run would
    then pin a commit whose rows this machine does not have."""
    repo_id, _, revision = path.partition("@")
    revision = revision or hub.DEFAULT_REVISION
    if revision != commit:
        hub.record_ref(repo_id, revision, commit, kind="datasets")


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
