"""Folders of the repository the code reads at run time, in a module that imports nothing heavy: the command line's
help lists the evaluation suites without importing the harness that runs them."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITES_DIR = REPO / "eval" / "suites"


def suite_names() -> list[str]:
    """The suites ``alignpipe eval --suite NAME`` knows by name (``eval/suites/<name>.yaml``)."""
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))
