"""The benchmarks run on demand, not in the suite; these check that their code still runs against the library's
(a benchmark calling a function whose settings grew a field failed only when someone ran it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str):
    """Load ``benchmarks/<name>.py`` as running it does: with ``benchmarks/`` on ``sys.path`` (for ``bench_common``)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The benchmarks pin torch's thread count for their own process; the suite keeps its own."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_ppo_memory_main_measures_both_arms_in_workers_at_the_smallest_size(capsys):
    """``main``: both arms in subprocess workers (the fixed-threshold glibc environment, JSON back), then the table."""
    _benchmark("ppo_memory").main(["--hidden", "16", "--layers", "1", "--batch", "2", "--new-tokens", "3",
                                   "--repeats", "1"])
    out = capsys.readouterr().out
    assert "1 measurement(s) of each" in out and "glibc mmap threshold fixed" in out
    rows = [line for line in out.splitlines() if line.startswith(("peak RSS", "added RSS"))]
    assert len(rows) == 2 and all("x [" in row.split(" ratio ")[1] for row in rows)  # ratio: median [min-max]


def test_the_memory_workers_run_with_a_fixed_glibc_mmap_threshold():
    """glibc reads MALLOC_* when a process starts, so only the workers' environment can fix the threshold; the
    worker's last output line is its result."""
    common = _benchmark("bench_common")
    script = ("import json, os; print('noise'); "
              "print(json.dumps({k: v for k, v in os.environ.items() if 'MALLOC' in k}))")
    seen = common.run_worker("-c", [script], "environment")
    assert seen == common.MALLOC_ENV == {"MALLOC_MMAP_THRESHOLD_": "262144", "MALLOC_TRIM_THRESHOLD_": "1048576"}
    for module in ("ppo_memory", "reward_ensemble"):  # both memory benchmarks start their workers through it
        assert _benchmark(module).run_worker is sys.modules["bench_common"].run_worker


def test_reward_ensemble_prints_its_ratios_at_the_smallest_size(capsys):
    _benchmark("reward_ensemble").main(["--members", "2", "--batch", "2", "--repeats", "1", "--max-length", "16",
                                        "--texts", "synthetic", "--no-rss", "--device", "cpu"])
    assert "x" in capsys.readouterr().out


def test_kl_estimators_prints_its_coverage_at_the_smallest_size(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["kl_estimators.py", "--tokens", "3", "--samples", "8", "--repeats", "3"])
    _benchmark("kl_estimators").main()
    assert "k1" in capsys.readouterr().out


def test_kl_estimators_covers_a_finite_true_kl_when_the_policy_has_exact_zeros(capsys, monkeypatch):
    """Concentration 0.05 draws exact zeros: 0 log 0 made the true KL NaN, and every coverage then printed 0.00."""
    monkeypatch.setattr(sys, "argv", ["kl_estimators.py", "--concentration", "0.05", "--repeats", "20",
                                      "--samples", "64"])
    _benchmark("kl_estimators").main()
    out = capsys.readouterr().out
    true_kl = float(out.split("true sequence KL ")[1].split()[0])
    coverage = {line.split("CI coverage")[0].strip(): float(line.split("CI coverage")[1].split()[0])
                for line in out.splitlines() if "CI coverage" in line}
    assert np.isfinite(true_kl) and len(coverage) == 3
    assert coverage["k1"] >= 0.5  # k1 is unbiased with a sound CI: it covers a finite true KL most of the time


def test_kl_estimators_true_kl_counts_a_zero_probability_as_zero():
    policy, reference = np.array([[0.5, 0.5, 0.0]]), np.array([[0.25, 0.25, 0.5]])
    assert _benchmark("kl_estimators").true_sequence_kl(policy, reference) == pytest.approx(np.log(2))


def test_kl_estimators_refuses_an_infinite_true_kl():
    """A reference with probability 0 where the policy has mass: KL is infinite, and no coverage would mean anything."""
    with pytest.raises(ValueError, match="infinite"):
        _benchmark("kl_estimators").true_sequence_kl(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]))


def test_reward_ensemble_timing_rotates_the_order_of_the_models():
    calls: list[str] = []
    models = {name: (lambda name=name, **batch: calls.append(name)) for name in ("single", "ensemble", "plain")}
    times = _benchmark("reward_ensemble").time_interleaved(models, {}, 3, "cpu")
    rounds = [calls[i:i + 3] for i in range(3, len(calls), 3)]  # after one warm-up call each
    assert rounds == [["single", "ensemble", "plain"], ["ensemble", "plain", "single"], ["plain", "single", "ensemble"]]
    assert all(len(t) == 3 for t in times.values())


def test_reward_ensemble_rss_worker_counts_the_weights_under_load(tmp_path):
    """One peak-RSS measurement through its subprocess worker, on a backbone whose weights are mostly embedding rows
    that no token of the batch reads (a tiny Llama with a 65,536-row table: 16 of its 17 MB). transformers memory-maps
    the safetensors, so such rows were paged in by nothing before "loaded" (nor by the forward); the worker reads every
    parameter first, so load holds the model's parameters."""
    import torch

    from alignpipe.models.tiny import build_tiny_model, save_tiny_checkpoint, train_tokenizer
    from alignpipe.rewards.ensemble import RewardEnsemble
    from alignpipe.rewards.ensemble_scorer import EnsembleScorer
    from alignpipe.tasks import tokenizer_corpus

    bench = _benchmark("reward_ensemble")
    tokenizer = train_tokenizer(tokenizer_corpus(n=200), vocab_size=160)
    backbone = build_tiny_model(tokenizer, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128,
                                max_position_embeddings=64, seed=0)
    backbone.resize_token_embeddings(65536, mean_resizing=False)
    args = SimpleNamespace(backbone=str(save_tiny_checkpoint(backbone, tokenizer, tmp_path / "tiny")), lora_r=8,
                           pooling="last", threads=1, repeats=1)
    spec = bench.spec_for(args, 1, None)
    model = RewardEnsemble.create(spec)
    batch = EnsembleScorer.for_ensemble(model, max_length=16).encode(["a prompt"] * 2, ["a response"] * 2)
    torch.save(batch, tmp_path / "batch.pt")
    measured = bench.measure_rss(args, spec, tmp_path / "batch.pt")
    assert measured["loaded_kb"] > measured["base_kb"] > 0 and measured["peak_kb"] > 0
    # RSS moves by about a MB with the allocator; the weights are 17 MB (before the fix, load was a few MB)
    assert (measured["loaded_kb"] - measured["base_kb"]) * 1024 >= 0.8 * bench.param_bytes(model)
