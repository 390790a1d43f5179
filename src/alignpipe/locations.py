"""Folders of the repository the code reads at run time, in one module that imports nothing heavy: the command line's
help lists the evaluation suites without importing the harness that runs them, and every folder is found the same
way (from this file's place in ``src/alignpipe``)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITES_DIR = REPO / "eval" / "suites"
PIPELINES_DIR = REPO / "pipelines"  # one runnable per stage type: what a stage's launch runs
ACCELERATE_DIR = REPO / "recipes" / "accelerate"  # the launch topologies' accelerate and DeepSpeed configs


def suite_names() -> list[str]:
    """The suites ``alignpipe eval --suite NAME`` knows by name (``eval/suites/<name>.yaml``)."""
    return sorted(path.stem for path in SUITES_DIR.glob("*.yaml"))
