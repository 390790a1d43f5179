"""The benchmarks run on demand, not in the suite; these check that their code still runs against the library's
(a benchmark calling a function whose settings grew a field failed only when someone ran it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The benchmarks pin torch's thread count for their own process; the suite keeps its own."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["sft", "ppo"])
def test_ppo_memory_measures_both_modes_at_the_smallest_size(mode):
    measured = _benchmark("ppo_memory").measure(mode, SimpleNamespace(hidden=16, layers=1, batch=2, new_tokens=3))
    assert measured["mode"] == mode and measured["peak_mib"] >= measured["baseline_mib"] > 0


def test_reward_ensemble_prints_its_ratios_at_the_smallest_size(capsys):
    _benchmark("reward_ensemble").main(["--members", "2", "--batch", "2", "--repeats", "1", "--max-length", "16",
                                        "--texts", "synthetic", "--no-rss", "--device", "cpu"])
    assert "x" in capsys.readouterr().out


def test_kl_estimators_prints_its_coverage_at_the_smallest_size(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kl_estimators.py", "--tokens", "3", "--samples", "8", "--repeats", "3"])
    _benchmark("kl_estimators").main()
    assert "k1" in capsys.readouterr().out
