"""The benchmarks run on demand, not in the suite; these check that their code still runs against the library's
(a benchmark calling a function whose settings grew a field failed only when someone ran it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["sft", "ppo"])
def test_ppo_memory_measures_both_modes_at_the_smallest_size(mode):
    import torch

    args = SimpleNamespace(hidden=16, layers=1, batch=2, new_tokens=3)
    threads = torch.get_num_threads()
    try:
        measured = _benchmark("ppo_memory").measure(mode, args)
    finally:
        torch.set_num_threads(threads)  # the benchmark pins one thread for its own process
    assert measured["mode"] == mode and measured["peak_mib"] >= measured["baseline_mib"] > 0
