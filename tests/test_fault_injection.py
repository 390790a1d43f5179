"""Fault injection: SIGKILL a run in the middle of a stage, ``--resume`` it, and get the uninterrupted run's result.

Every run here goes through the real command line (``python -m alignpipe.cli run``), so the runner, ``accelerate
launch`` and the stage process are separate processes, as for a user; the whole process group is SIGKILLed (no
``finally`` blocks, no atexit: a lost node). The kill comes when the stage's ``metrics.jsonl`` shows a step drawn at
random (seeded per trial), so it lands before, between or during checkpoint saves. The resumed stage must publish
the same weights, bit for bit, and log the same metrics as a run that was never interrupted.

Equality is asserted exactly for the weights and every logged number except wall-clock fields (runtime, samples
per second) and, for TRL stages, the run-average ``train_loss`` of the last record, which transformers averages over
the steps of the *current process* only (a resumed process saw fewer steps); it is compared with the mean of the
logged per-step losses instead.

Default suite: SFT, DPO and PPO, two trials each. ``slow``: the reward ensemble, GRPO, RLOO and OSP (iterative rounds),
plus more trials of the default three.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE
from safetensors.torch import load_file

from alignpipe.pipeline.rundir import StageDir

TRIALS = 2  # per stage type in the default suite
SLOW_TRIALS = 3
VOLATILE = ("runtime", "per_second", "wall_time", "total_flos")

SFT = {"name": "sft", "type": "sft", "learning_rate": 3e-3, "max_steps": 12, "per_device_train_batch_size": 16,
       "save_steps": 3, "max_length": 48, "logging_steps": 1, "lr_scheduler_type": "linear", "warmup_ratio": 0.25}
DPO = {"name": "dpo", "type": "dpo", "inputs": ["sft"], "beta": 0.5, "learning_rate": 2e-3, "max_steps": 12,
       "per_device_train_batch_size": 16, "save_steps": 3, "max_length": 48, "logging_steps": 1}
PPO = {"name": "ppo", "type": "ppo", "inputs": ["sft"], "reward": {"source": "gold"}, "total_steps": 8,
       "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2, "learning_rate": 1e-3, "max_new_tokens": 10,
       "eval_every": 4, "eval_prompts": 16, "save_steps": 2}
REWARD = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 3, "top_layers": 1, "learning_rate": 3e-3,
          "num_train_epochs": 2, "per_device_train_batch_size": 16, "max_length": 48, "logging_steps": 1,
          "save_steps": 3, "heldout_fraction": 0.25, "diversity_weight": 0.1,
          "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}
ONLINE = {"inputs": ["sft"], "reward": {"source": "gold"}, "learning_rate": 1e-3, "max_steps": 8,
          "per_device_train_batch_size": 8, "num_generations": 4, "prompts": 64, "max_completion_length": 10,
          "max_length": 48, "logging_steps": 1, "save_steps": 2, "eval_prompts": 16}
OSP = {"name": "osp", "type": "osp", "inputs": ["sft"], "judge": "gold", "rounds": 2, "prompts_per_round": 16,
       "samples_per_prompt": 4, "learning_rate": 2e-3, "per_device_train_batch_size": 8, "max_length": 48,
       "logging_steps": 1, "max_new_tokens": 10, "eval_prompts": 16, "save_steps": 2}

STAGES = {"sft": SFT, "dpo": DPO, "ppo": PPO, "rm": REWARD, "grpo": {"name": "grpo", "type": "grpo", **ONLINE},
          "rloo": {"name": "rloo", "type": "rloo", **ONLINE}, "osp": OSP}
# Steps the kill may come at (metrics record "step" values; OSP's trainer steps restart each round).
KILL_STEPS = {"sft": range(1, 12), "dpo": range(1, 12), "ppo": range(1, 8), "rm": range(1, 12),
              "grpo": range(1, 8), "rloo": range(1, 8), "osp": range(1, 12)}


def _recipe(*names: str) -> dict:
    return {**TINY_RECIPE, "name": "faults", "data": {**TINY_RECIPE["data"], "n_pairs": 256},
            "stages": [STAGES[n] for n in names]}


def _cli(recipe: Path, runs: Path, *flags: str) -> subprocess.Popen:
    """``alignpipe run`` in its own process group, its output to a log file beside the runs directory."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = runs.parent / f"{recipe.stem}{'-resume' if flags else ''}.log"
    with log.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "run", str(recipe), "--runs-dir",
                                    str(runs), *flags], env=env, start_new_session=True, stdout=handle,
                                   stderr=subprocess.STDOUT)
    process.log = log
    return process


def _finish(process: subprocess.Popen, timeout: float = 900) -> str:
    process.wait(timeout=timeout)
    output = process.log.read_text()
    assert process.returncode == 0, output[-4000:]
    return output


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            continue  # a line being written
    return steps


def _kill_at(process: subprocess.Popen, stage: StageDir, step: int, timeout: float = 600) -> bool:
    """SIGKILL the run's process group once ``stage`` has logged ``step``; False if the run finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        if any(s >= step for s in _logged_steps(stage.metrics)):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    raise TimeoutError(f"{stage.name} never logged step {step}")


def _records(stage: StageDir) -> list[dict]:
    records = [json.loads(line) for line in stage.metrics.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(word in k for word in VOLATILE)} for r in records]


def _tensors(checkpoint: Path) -> dict:
    tensors = {}
    for path in sorted(checkpoint.rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            tensors[f"{path.relative_to(checkpoint)}:{name}"] = tensor
    return tensors


def _compare_records(resumed: list[dict], reference: list[dict]) -> None:
    assert len(resumed) == len(reference), ([r.get("step") for r in resumed], [r.get("step") for r in reference])
    for got, want in zip(resumed, reference):
        if "train_loss" in want:  # run average over this process's steps only (module docstring)
            got, want = {k: v for k, v in got.items() if k != "train_loss"}, {
                k: v for k, v in want.items() if k != "train_loss"}
        assert got == want


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each stage type run once, uninterrupted, through the command line."""
    directory = tmp_path_factory.mktemp("reference")
    runs = directory / "runs"
    recipe = directory / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe("sft", "dpo", "ppo"), sort_keys=False))
    _finish(_cli(recipe, runs))
    return runs / "faults"


def _trial(reference_run: Path, tmp_path: Path, target: str, trial: int, extra: tuple[str, ...] = ()) -> dict:
    """Copy the reference run without ``target``, run up to it, kill it at a random step, resume, compare."""
    runs = tmp_path / f"runs-{trial}"
    shutil.copytree(reference_run, runs / "faults")
    shutil.rmtree(runs / "faults" / target)
    names = ["sft", *extra, target] if target != "sft" else ["sft"]
    recipe = tmp_path / f"recipe-{trial}.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(*names), sort_keys=False))
    step = random.Random(f"{target}:{trial}").choice(list(KILL_STEPS[target]))
    stage = StageDir(runs / "faults" / target)
    killed = _kill_at(_cli(recipe, runs), stage, step)
    assert killed, f"{target} finished before step {step}; nothing was interrupted"
    assert stage.read_manifest()["status"] == "running"  # SIGKILL: nobody marked it failed
    output = _finish(_cli(recipe, runs, "--resume"))
    expected = StageDir(reference_run / target)
    got, want = _tensors(stage.checkpoint), _tensors(expected.checkpoint)
    assert got.keys() == want.keys() and got
    different = [name for name in want if not (got[name] == want[name]).all()]
    assert not different, f"killed at step {step}: {len(different)} tensors differ, e.g. {different[:3]}"
    _compare_records(_records(stage), _records(expected))
    return {"step": step, "resumed": "resumed" in output, "checkpoints": stage.read_manifest().get("checkpoints")}


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("target", ["sft", "dpo", "ppo"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(reference, tmp_path, target, trial):
    _trial(reference, tmp_path, target, trial)
