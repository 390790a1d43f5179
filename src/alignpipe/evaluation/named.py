"""``NAME=PATH`` command-line arguments, shared by ``alignpipe eval``'s policy and reward-model suites."""

from __future__ import annotations


def split_named(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` as (NAME, PATH); a plain path or hub id as ("", it)."""
    name, sep, path = spec.partition("=")
    return (name, path) if sep else ("", spec)
