"""Fault injection: SIGKILL a run in the middle of a stage, ``--resume`` it, and get the uninterrupted run's result.

Every run here goes through the real command line (``python -m alignpipe.cli run``), so the runner, ``accelerate
launch`` and the stage process are separate processes, as for a user; all of them are SIGKILLed (no ``finally``
blocks, no atexit: a lost node), the stage's launcher in its own session included. The kill comes once the stage's
``metrics.jsonl`` holds a number of records drawn at random (seeded per trial; trial 0 half way), so it lands before,
between or during checkpoint saves.
The resumed stage must publish the same weights, bit for bit, and log the same metrics as a run never interrupted.

Equality is exact for every tensor of the published checkpoint and every logged number, except wall-clock fields
(``step_time``, ``train_runtime``, samples per second) and the run-average ``train_loss`` of TRL's end-of-training
record: transformers divides the loss summed in the *current process* by the global step, so a resumed process
reports a smaller average (a display value; the per-step losses it averages are compared exactly).

Default suite: SFT, DPO and PPO, one trial each (killed half way, so the resume path always runs; ~30 s a trial on 2
cores). ``slow``: four more trials of each at seeded random records, and three trials each of the reward ensemble
(with LoRA dropout), GRPO, RLOO and OSP (iterative rounds).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
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
from alignpipe.pipeline.watched import _descendants, _running

TRIALS = 1  # per stage type in the default suite
MORE_TRIALS = 4  # of SFT, DPO and PPO in the slow tier
SLOW_TRIALS = 3  # of the other stage types, in the slow tier
VOLATILE = ("runtime", "per_second", "time", "total_flos")  # wall-clock fields (step_time, train_runtime ...)

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
          "logging_steps": 1, "save_steps": 2, "eval_prompts": 16}
OSP = {"name": "osp", "type": "osp", "inputs": ["sft"], "judge": "gold", "rounds": 2, "prompts_per_round": 16,
       "samples_per_prompt": 4, "learning_rate": 2e-3, "per_device_train_batch_size": 8, "max_length": 48,
       "logging_steps": 1, "max_new_tokens": 10, "eval_prompts": 16, "save_steps": 2}

STAGES = {"sft": SFT, "dpo": DPO, "ppo": PPO, "rm": REWARD, "grpo": {"name": "grpo", "type": "grpo", **ONLINE},
          "rloo": {"name": "rloo", "type": "rloo", **ONLINE}, "osp": OSP}
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


def _lines(metrics: Path) -> int:
    """Complete records in a metrics file (a line being written does not count)."""
    return metrics.read_text().count("\n") if metrics.exists() else 0


def _kill_all(process: subprocess.Popen) -> None:
    """SIGKILL the run and every process below it, as a lost machine stops them all. The stage's launcher runs in a
    session of its own (``pipeline.watched``), which a signal to the runner's group does not reach: it trained on and
    published the stage, so the resume had nothing to do. All are stopped first, so none sees another die (a runner
    whose stage ended would mark it failed)."""
    os.killpg(process.pid, signal.SIGSTOP)
    tree: dict[int, str] = {}
    while new := {pid: started for pid, started in _descendants(process.pid).items() if pid not in tree}:
        for pid in new:  # until no stopped process had started another before it was stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        tree.update(new)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while _running(tree):  # not the test's children: they cannot be waited for
        assert time.monotonic() < deadline, f"processes {_running(tree)} outlived SIGKILL"
        time.sleep(0.05)


def _kill_at(process: subprocess.Popen, stage: StageDir, records: int, timeout: float = 900) -> bool:
    """SIGKILL the run once ``stage`` has logged ``records`` records; False if it finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        if _lines(stage.metrics) >= records:
            _kill_all(process)
            return True
        time.sleep(0.02)
    _kill_all(process)
    raise TimeoutError(f"{stage.name} never logged {records} records")


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


def _reference(directory: Path, names: tuple[str, ...], *, in_process: bool = False) -> Path:
    """Each stage type in ``names`` run once, uninterrupted: through the command line, or ``in_process`` in this
    process on one thread, as a launched stage runs (OMP_NUM_THREADS=1). A stage run in process publishes the weights
    and logs the records a launched one does, bit for bit (tests/test_distributed.py compares with it too), so the
    killed and resumed launches below are held to the same reference, and three stage launches are spared."""
    runs = directory / "runs"
    recipe = directory / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(*names), sort_keys=False))
    if not in_process:
        _finish(_cli(recipe, runs))
        return runs / "faults"
    import torch

    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Runner(load_recipe(recipe), runs_dir=runs, recipe_path=recipe, in_process=True).run()
    finally:
        torch.set_num_threads(threads)
    return runs / "faults"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("reference"), ("sft", "dpo", "ppo"), in_process=True)


@pytest.fixture(scope="module")
def slow_reference(tmp_path_factory):
    return _reference(tmp_path_factory.mktemp("slow-reference"), ("sft", "rm", "grpo", "rloo", "osp"))


def _trial(reference_run: Path, tmp_path: Path, target: str, trial: int) -> dict:
    """Copy the reference run without ``target``, run up to it, kill it after a random number of its metric records
    (seeded by stage and trial), resume, and compare with the reference."""
    runs = tmp_path / f"runs-{trial}"
    shutil.copytree(reference_run, runs / "faults")
    shutil.rmtree(runs / "faults" / target)
    recipe = tmp_path / f"recipe-{trial}.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(*dict.fromkeys(["sft", target])), sort_keys=False))
    expected = StageDir(reference_run / target)
    total = _lines(expected.metrics)
    # trial 0 kills half way (past the first checkpoint in these recipes, so the resume path always runs);
    # the others at a seeded uniformly random record, which may come before any checkpoint (a restart)
    records = total // 2 + 1 if trial == 0 else random.Random(f"{target}:{trial}").randrange(1, total)
    stage = StageDir(runs / "faults" / target)
    killed = _kill_at(_cli(recipe, runs), stage, records)
    assert killed, f"{target} finished before logging {records} records; nothing was interrupted"
    assert stage.read_manifest()["status"] == "running"  # SIGKILL: nobody marked it failed
    output = _finish(_cli(recipe, runs, "--resume"))
    got, want = _tensors(stage.checkpoint), _tensors(expected.checkpoint)
    assert got.keys() == want.keys() and got
    different = [name for name in want if not (got[name] == want[name]).all()]
    assert not different, f"killed after {records} records: {len(different)} tensors differ, e.g. {different[:3]}"
    _compare_records(_records(stage), _records(expected))
    resumed = re.search(r"\[%s\] running \((.*)\)$" % target, output, re.MULTILINE)
    print(f"{target} trial {trial}: killed after {records} of {total} records; "
          f"{resumed.group(1) if resumed else 'no resume line'}; identical weights and metrics")
    return {"records": records, "resumed": resumed.group(1) if resumed else None}


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("target", ["sft", "dpo", "ppo"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(reference, tmp_path, target, trial):
    _trial(reference, tmp_path, target, trial)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS, TRIALS + MORE_TRIALS))
@pytest.mark.parametrize("target", ["sft", "dpo", "ppo"])
def test_more_sigkill_trials(reference, tmp_path, target, trial):
    _trial(reference, tmp_path, target, trial)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(SLOW_TRIALS))
@pytest.mark.parametrize("target", ["rm", "grpo", "rloo", "osp"])
def test_sigkill_then_resume_other_stage_types(slow_reference, tmp_path, target, trial):
    _trial(slow_reference, tmp_path, target, trial)
