"""Data parallelism on CPU: 2 gloo processes under `accelerate launch` train like 1 process with the same global
batch, shard the data, reduce PPO statistics across ranks, and only rank 0 writes.

The 2-process runs go through the real launcher (`alignpipe run --cpu --processes 2` -> `accelerate launch` with
recipes/accelerate/ddp-cpu.yaml), so these tests exercise exactly what users run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_recipe
from safetensors.torch import load_file

from alignpipe.pipeline.watched import _descendants

TINY_MODEL = {"name_or_path": "tiny", "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                               "intermediate_size": 64, "vocab_size": 100,
                                               "max_position_embeddings": 64}}
TRAIN = {"max_steps": 8, "global_batch_size": 16, "per_device_train_batch_size": 16, "max_length": 48,
         "logging_steps": 2, "lr_scheduler_type": "constant", "save_steps": 100}
RECIPE = {
    "name": "dp", "seed": 0, "model": TINY_MODEL, "data": {"n_sft": 256, "n_pairs": 256},
    "stages": [
        {"name": "sft", "type": "sft", "learning_rate": 3e-3, **TRAIN},
        {"name": "dpo", "type": "dpo", "inputs": ["sft"], "beta": 0.5, "learning_rate": 2e-3, **TRAIN},
        {"name": "dpo_precomputed", "type": "dpo", "inputs": ["sft"], "beta": 0.5, "learning_rate": 2e-3,
         "precompute_ref_log_probs": True, **TRAIN},
        {"name": "reward", "type": "reward", "inputs": ["sft"], "members": 3, "learning_rate": 1e-3,
         "per_device_train_batch_size": 16, "max_length": 48, "logging_steps": 4, "diversity_weight": 0.1},
        {"name": "ppo", "type": "ppo", "inputs": ["sft"], "reward": {"source": "gold"}, "learning_rate": 1e-3,
         "total_steps": 4, "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2, "max_new_tokens": 8,
         "eval_every": 2, "eval_prompts": 32, "save_steps": 2},
        {"name": "osp", "type": "osp", "inputs": ["sft"], "judge": "gold", "rounds": 1, "prompts_per_round": 16,
         "samples_per_prompt": 4, "max_new_tokens": 8, "eval_prompts": 16, "learning_rate": 2e-3,
         # One global batch, filled whatever the samples: with truncated samples dropped the round kept a handful of
         # pairs (2 or 3 by seed), and an odd count is split unevenly, so accelerate repeats a row on one process
         "truncated_samples": "keep", **{**TRAIN, "max_steps": 1}},
    ],
}
# Float sums happen in a different order when the batch is split (per-rank means, then an all-reduce): after 8
# steps at lr 2e-3 / 3e-3 the weights agree to ~1e-5 (SFT ~1e-6); the reward heads (15 steps) to ~4e-4.
TOLERANCE = {"sft": 1e-4, "dpo": 1e-4, "dpo_precomputed": 1e-4, "reward": 2e-3, "osp": 1e-4}


def _alignpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "alignpipe.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same recipe run with 1 process and with 2 CPU processes (same global batch).

    The 1-process run is in this process, on one thread as a launched stage runs (OMP_NUM_THREADS=1): its weights
    equal a launched one's bit for bit, and it spares five stage launches (about a minute)."""
    import torch

    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    root = tmp_path_factory.mktemp("dp")
    recipe = write_recipe(root, RECIPE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Runner(load_recipe(recipe), runs_dir=root / "one", in_process=True).run()
    finally:
        torch.set_num_threads(threads)
    result = _alignpipe("run", str(recipe), "--runs-dir", str(root / "two"), "--cpu", "--processes", "2",
                        "--main-port", "29561", cwd=root)
    (root / "two.log").write_text(result.stdout + result.stderr)
    return {"one": root / "one" / "dp", "two": root / "two" / "dp"}


def _weights(stage_dir: Path) -> dict[str, dict]:
    return {str(f.relative_to(stage_dir)): load_file(f) for f in sorted(stage_dir.rglob("*.safetensors"))}


@pytest.mark.parametrize("stage", ["sft", "dpo", "dpo_precomputed", "reward", "osp"])
def test_two_processes_train_like_one_with_the_same_global_batch(runs, stage) -> None:
    one, two = _weights(runs["one"] / stage / "checkpoint"), _weights(runs["two"] / stage / "checkpoint")
    assert one.keys() == two.keys() and one
    worst = max(float((one[f][k] - two[f][k]).abs().max()) for f in one for k in one[f])
    moved = max(float((one[f][k] - _base_or_zero(runs, stage, f, k)).abs().max()) for f in one for k in one[f])
    assert worst < TOLERANCE[stage], f"{stage}: 2-process weights differ by {worst}"
    assert moved > 100 * worst  # training moved the weights far more than the two runs disagree


def test_precomputed_reference_log_probs_train_as_a_reference_pass_each_step(runs) -> None:
    """The reference is the stage's input either way: once before training, or at each step."""
    each_step, precomputed = (_weights(runs["one"] / stage / "checkpoint") for stage in ("dpo", "dpo_precomputed"))
    worst = max(float((each_step[f][k] - precomputed[f][k]).abs().max()) for f in each_step for k in each_step[f])
    assert worst < 1e-4


def _base_or_zero(runs, stage, file, key):
    base = runs["one"] / "base" / "checkpoint" / "model.safetensors"
    tensors = load_file(base) if file == "model.safetensors" else {}
    return tensors.get(key, 0.0 * load_file(runs["one"] / stage / "checkpoint" / file)[key])


def test_two_processes_log_the_same_losses_once(runs) -> None:
    for stage in ("sft", "dpo", "reward"):
        one = [json.loads(line) for line in (runs["one"] / stage / "metrics.jsonl").read_text().splitlines()]
        two = [json.loads(line) for line in (runs["two"] / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in two] == [r["step"] for r in one]  # rank 1 wrote nothing
        losses = [(a["loss"], b["loss"]) for a, b in zip(one, two) if "loss" in a]
        assert losses and all(abs(a - b) < 1e-4 for a, b in losses)


def test_ppo_on_two_processes_writes_once_and_reduces_its_statistics(runs) -> None:
    records = [json.loads(line) for line in (runs["two"] / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1, 2, 3, 4]
    assert [r["eval_step"] for r in records if "eval_step" in r] == [0, 2, 4]
    manifest = json.loads((runs["two"] / "ppo" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["world_size"] == 2
    assert sorted(p.name for p in (runs["two"] / "ppo" / "trainer").iterdir()) == ["checkpoint-2"]
    assert (runs["two"] / "ppo" / "checkpoint" / "model.safetensors").exists()


def test_online_rounds_on_two_processes_train_on_one_set_of_pairs_and_log_once(runs) -> None:
    """Every rank trains on rank 0's round data (the same pairs, so the same number of steps), and the round's
    record is written once, with rank 0's evaluation."""
    round_dir = Path("osp") / "rounds" / "round-0"
    one, two = (json.loads((runs[k] / round_dir / "pairs.json").read_text()) for k in ("one", "two"))
    assert two["rows"] and two == one
    records = [json.loads(line) for line in (runs["two"] / "osp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if "round" in r] == [0]
    assert json.loads((runs["two"] / round_dir / "manifest.json").read_text())["status"] == "complete"


def test_launch_commands_are_printed_and_use_the_cpu_config(runs) -> None:
    log = (runs["two"].parent.parent / "two.log").read_text()
    assert "accelerate.commands.launch --config_file" in log and "ddp-cpu.yaml --num_processes 2" in log
    assert "global batch 16 = 8 per device x 1 accumulation x 2 processes" in log


def test_collectives_and_dataloader_sharding_across_two_ranks(runs, tmp_path) -> None:
    """Whitening and score moments reduced over ranks equal those of the whole batch; gradients are averaged; rank 0
    alone verifies resume checkpoints and both ranks resume from its choice; the SFT dataloader gives the two ranks
    disjoint examples that together cover the dataset."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "recipes" / "accelerate" / "ddp-cpu.yaml"), "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", "29562", "--num_cpu_threads_per_process", "1",
               str(REPO / "tests" / "distributed" / "probe.py"), str(runs["one"] / "sft" / "checkpoint"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["world"] == 2 and report["accelerate_processes"] == 2
        assert report["whiten_max_error"] < 1e-5 and report["moments_error"] < 1e-5
        assert report["averaged_gradient"] == [1.5, 1.5, 1.5]
        found = "([nan])" if report["rank"] == 1 else "on another process"
        assert report["non_finite_elsewhere"].startswith(f"PPO policy loss is not finite {found} at iteration 0")
        assert report["resume_checkpoint"] == "checkpoint-2"
        assert report["set_aside"] == ["checkpoint-2", "invalid-checkpoint-4"]
        assert report["published_on_return"]  # rank 1 returned before rank 0 had published
    first, second = (set(r["examples"]) for r in ranks)
    assert len(ranks[0]["examples"]) == len(ranks[1]["examples"]) == 32
    assert not first & second and len(first | second) == 64
    # A reward ensemble whose batches split 2/1 and whose last batch (1 pair) leaves rank 0 nothing: both ranks end
    # on identical weights, log every step, and log what one process logs with the same global batches.
    sys.path.insert(0, str(REPO / "tests" / "distributed"))
    from probe import SMALL_ENSEMBLE_LR, small_ensemble_run

    alone = small_ensemble_run(str(runs["one"] / "sft" / "checkpoint"))
    zero, one = (r["small_ensemble"] for r in ranks)
    assert zero["weights"] == one["weights"] and zero["steps"] == one["steps"] == alone["steps"] == [1, 2, 3]
    for key in ("losses", "bt_losses", "accuracies"):
        assert zero[key] == one[key] and zero[key] == pytest.approx(alone[key], abs=1e-5), key
    # Adam's first steps move every weight by about the learning rate whatever its gradient's size, so float-order
    # noise in a near-zero gradient can move that one weight by up to a step (lr = 1e-2): how far depends on the
    # CPU's kernels (1 weight in 2,000 by 4e-3 on one machine, none over 2e-3 on another). Every weight must stay
    # within a step, and all but 0.1 % of them within 1e-4, which a wrong gradient average would break.
    gaps = sorted(abs(a - b) for a, b in zip(zero["weights"], alone["weights"]))
    assert gaps[-1] < SMALL_ENSEMBLE_LR and gaps[int(0.999 * len(gaps))] < 1e-4, gaps[-10:]
    # Resumed from rank 0's saved state, an ensemble with LoRA dropout (each rank's own RNG stream) ends where the
    # uninterrupted run ends, and logs what it logs (the step-2 record's window began before the resume).
    for report in ranks:
        whole, resumed = report["resumed_ensemble"]["whole"], report["resumed_ensemble"]["resumed"]
        assert resumed["weights"] == whole["weights"] and resumed["logs"] == whole["logs"]
    # The online rounds' sampling split over the ranks gives every rank one process's samples, in batch order.
    import torch
    from probe import sampled_across_ranks

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank samples
    try:
        alone = sampled_across_ranks(str(runs["one"] / "sft" / "checkpoint"))
    finally:
        torch.set_num_threads(threads)
    zero, one = (r["sampled_across_ranks"] for r in ranks)
    assert alone["batches"] == [0, 1, 2] and zero["batches"] == [0, 2] and one["batches"] == [1]
    assert len(alone["ids"]) == 10 and zero["ids"] == one["ids"] == alone["ids"]
    # UP-RLHF's running mean of the ensemble std is one number on every rank: the whole step's, as in one process.
    from probe import running_std_run

    alone = running_std_run(0, 1)
    zero, one = (r["running_std"] for r in ranks)
    assert zero["state"] == one["state"] and zero["state"]["count"] == alone["state"]["count"] == 8
    assert zero["state"]["mean"] == pytest.approx(alone["state"]["mean"], abs=1e-12)
    for step, whole in enumerate(alone["rewards"]):
        assert zero["rewards"][step] + one["rewards"][step] == pytest.approx(whole, abs=1e-6)


def _two_nodes(tmp_path: Path, recipe: Path, *options: str, main_port: int, timeout_s: float = 600) -> list[tuple]:
    """`alignpipe run` as node 0 and node 1 of a 2-node run on this machine (one CPU process each, one runs
    directory; node 1 started first): [(return code, log)] of node 0 and node 1. A node still running after
    ``timeout_s`` is killed with everything it started and reported with return code None (a hang fails the test)."""
    common = [sys.executable, "-m", "alignpipe.cli", "run", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--cpu",
              "--nodes", "2", "--main-addr", "127.0.0.1", "--main-port", str(main_port), "--control-timeout", "300",
              *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([*common, "--node-rank", str(rank)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for rank in (1, 0)][::-1]
    deadline = time.monotonic() + timeout_s
    results = []
    for node in nodes:
        try:
            log = node.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
            results.append((node.returncode, log))
        except subprocess.TimeoutExpired:
            results.append((None, ""))
    for node in nodes:
        if node.poll() is None:
            stage_processes = _descendants(node.pid)  # the stage's launcher has a session of its own
            os.killpg(node.pid, signal.SIGKILL)
            for pid in stage_processes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            node.communicate()
    return results


@pytest.mark.slow  # ~40 s; the default tier covers the control protocol with threads (tests/test_control.py)
def test_two_nodes_on_one_machine_node_zero_writes_and_node_one_follows(tmp_path) -> None:
    """Two `alignpipe run` commands with --nodes 2 (ranks 0 and 1, one CPU process each) over one runs directory:
    both join every stage's process group, node 0 alone writes, the result equals a 2-process single-node run."""
    recipe = write_recipe(tmp_path, {**RECIPE, "name": "nodes", "stages": RECIPE["stages"][:1]})
    (leader, leader_log), (follower, follower_log) = _two_nodes(tmp_path, recipe, main_port=29563)
    assert leader == 0, leader_log[-4000:]
    assert follower == 0, follower_log[-4000:]
    assert "--num_machines 2 --machine_rank 1 --main_process_ip 127.0.0.1" in follower_log
    run = tmp_path / "runs" / "nodes"
    records = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]  # written once, by node 0
    assert len(records) == 5  # the 4 loss records + the trainer's end-of-training summary
    assert json.loads((run / "sft" / "manifest.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_two_nodes_rerun_a_forced_stage_together_and_ignore_an_earlier_attempts_failure(tmp_path) -> None:
    """Re-runs over a run directory left by earlier attempts: node 1 does what node 0 decides, not what the manifests
    on disk say. --force sft re-runs the complete sft on both nodes (node 1 used to skip it and leave node 0 waiting in
    the rendezvous); a ``failed`` manifest of an earlier attempt is started over on both (node 1 used to stop at it)."""
    stage = {**RECIPE["stages"][0], "max_steps": 2, "logging_steps": 1}
    recipe = write_recipe(tmp_path, {**RECIPE, "name": "nodes", "stages": [stage]})
    manifest = tmp_path / "runs" / "nodes" / "sft" / "manifest.json"
    launch = "--num_machines 2 --machine_rank 1 --main_process_ip 127.0.0.1"
    for attempt, options in (("first", ()), ("forced", ("--force", "sft")), ("after a failure", ())):
        if attempt == "after a failure":
            manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "failed"}))
        (leader, leader_log), (follower, follower_log) = _two_nodes(tmp_path, recipe, *options, main_port=29565,
                                                                    timeout_s=400)
        assert leader == 0 and follower == 0, f"{attempt}: node 0 {leader}, node 1 {follower}\n{leader_log[-3000:]}" \
                                              f"\n{follower_log[-3000:]}"
        assert launch in follower_log and "[sft] ran on node 0's decision" in follower_log, attempt
        assert json.loads(manifest.read_text())["status"] == "complete", attempt
        if attempt != "first":
            assert f"[sft] ran on node 0's decision ({'forced' if options else 'previous attempt failed'}" \
                in follower_log, attempt


@pytest.mark.parametrize("backend, expected", [("nccl", "cuda:0"), ("gloo", "cpu"), ("cuda:nccl,cpu:gloo", "cpu")])
def test_collectives_reduce_on_the_device_the_process_group_takes(monkeypatch, backend, expected) -> None:
    """NCCL (GPU launches) reduces CUDA tensors only, so statistics built on the CPU travel there; gloo takes CPU
    tensors; a mixed group takes a tensor where it is. (The NCCL path itself needs GPUs; this checks the choice.)"""
    import torch

    from alignpipe.pipeline import distributed

    monkeypatch.setattr(distributed.dist, "get_backend", lambda: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert str(distributed.collective_device(torch.zeros(2))) == expected
