"""What the memory benchmarks share: a worker subprocess with a fixed glibc heap policy. Not a benchmark itself.

The benchmarks are run as scripts (``.venv/bin/python benchmarks/NAME.py``), which puts ``benchmarks/`` first on
``sys.path``, so they import this module as ``bench_common``; ``tests/test_benchmarks.py`` loads them the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# glibc: a FIXED mmap threshold (setting it turns off the dynamic one) makes every allocation over 256 KiB its own
# mapping, returned to the OS when freed, so RSS follows the live tensors instead of what the heap keeps cached.
# glibc reads these when a process starts, so they only act on the worker subprocesses, not on the process running
# the benchmark.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024)}


def run_worker(script: str, args: list[str], what: str) -> dict:
    """Run ``script`` with ``args`` in a fresh Python process under :data:`MALLOC_ENV` and return the JSON object on
    the last line of its output; exit with the worker's error output when it fails (``what`` names the measurement)."""
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **MALLOC_ENV})
    if done.returncode != 0:
        sys.exit(f"the {what} measurement failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
