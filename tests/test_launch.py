"""The launcher: global batch splits, topology checks, the exact `accelerate launch` commands, --dry-run, --help."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO, TINY_RECIPE, write_recipe

from alignpipe.cli import build_parser, main
from alignpipe.pipeline.batching import (
    BatchSizeError,
    BatchSplit,
    split_global_batch,
    stage_batch_split,
    too_few_prompts,
)
from alignpipe.pipeline.launch import LaunchError, LaunchOptions, resolve_topology, stage_command, stage_topology
from alignpipe.pipeline.rundir import StageDir


@pytest.mark.parametrize(("global_batch", "world", "max_per_device", "expected"), [
    (64, 1, 8, (8, 8)), (64, 2, 8, (8, 4)), (64, 16, 8, (4, 1)), (48, 2, 16, (12, 2)), (7, 1, 4, (1, 7)),
    (16, 2, 16, (8, 1)),
])
def test_global_batch_splits_exactly(global_batch, world, max_per_device, expected) -> None:
    split = split_global_batch(global_batch, world, max_per_device)
    assert (split.per_device, split.accumulation) == expected
    assert split.per_device * split.accumulation * world == global_batch
    assert split.per_device <= max_per_device


@pytest.mark.parametrize(("rows", "per_device", "world"), [(120, 8, 2), (128, 8, 2), (7, 4, 2), (33, 4, 3),
                                                         (33, 4, 1)])
def test_repeated_rows_are_those_accelerate_adds_to_even_the_batches(rows, per_device, world) -> None:
    """What the stage's warning counts is what accelerate's sharded dataloader yields beyond the rows, over all the
    processes of an epoch (one process yields each row once)."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from alignpipe.pipeline.batching import repeated_per_epoch

    yielded = sum(len(batch) for rank in range(world) for batch in prepare_data_loader(
        DataLoader(list(range(rows)), batch_size=per_device), num_processes=world, process_index=rank,
        put_on_device=False))
    assert repeated_per_epoch(rows, per_device, world) == yielded - rows


def test_a_stage_on_several_processes_warns_of_the_rows_its_epochs_repeat(monkeypatch) -> None:
    from types import SimpleNamespace

    from alignpipe.pipeline import distributed
    from alignpipe.recipe import GRPOStage, SFTStage
    from alignpipe.trainers.common import _repeated_rows

    trainer = SimpleNamespace(train_dataset=list(range(120)), args=SimpleNamespace(per_device_train_batch_size=8,
                                                                                   dataloader_drop_last=False))
    ctx = SimpleNamespace(stage=SFTStage(name="sft"), dir=SimpleNamespace(name="sft"))
    assert _repeated_rows(trainer, ctx) is None  # one process
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert _repeated_rows(trainer, ctx) == (
        "[sft] 120 rows do not fill whole batches of 8 per device x 2 processes: each epoch's last batch repeats 8 "
        "rows from its start (accelerate evens the processes' batches), where one process would train a smaller last "
        "batch; a multiple of 16 rows trains as one process does")
    trainer.train_dataset = list(range(128))
    assert _repeated_rows(trainer, ctx) is None
    grpo = SimpleNamespace(stage=GRPOStage(name="grpo", inputs=["sft"], reward={"source": "gold"}), dir=ctx.dir)
    assert _repeated_rows(SimpleNamespace(train_dataset=list(range(120)), args=trainer.args), grpo) is None


def test_global_batch_that_does_not_split_names_the_stage_and_a_fix() -> None:
    with pytest.raises(BatchSizeError, match=r"stages.sft: global_batch_size 16 does not split over 3 processes; "
                                             r"use a multiple of 3 \(e.g. 15, 18\)"):
        split_global_batch(16, 3, 8, where="stages.sft")
    with pytest.raises(BatchSizeError, match="must be positive"):
        split_global_batch(16, 0, 8)


@pytest.mark.parametrize("sizes", [(0, 2, 8), (16, 2, 0), (-4, 2, 8)])
def test_a_global_batch_or_device_batch_below_one_is_refused_before_any_split(sizes) -> None:
    with pytest.raises(BatchSizeError, match="sizes must be positive"):
        split_global_batch(*sizes)


def test_a_global_batch_below_the_process_count_is_offered_only_positive_multiples() -> None:
    with pytest.raises(BatchSizeError, match=r"use a multiple of 4 \(e\.g\. 4\) or change"):
        split_global_batch(2, 4, 8)


def _grpo(**sizes) -> SimpleNamespace:
    fields = {"name": "grpo", "global_batch_size": None, "per_device_train_batch_size": 4,
              "gradient_accumulation_steps": 2, "num_generations": 4, "prompts": 4}
    return SimpleNamespace(**(fields | sizes))


def test_per_device_sizes_make_the_global_batch_grow_with_the_processes_and_a_global_batch_does_not() -> None:
    assert stage_batch_split(_grpo(), 3) == BatchSplit(24, 3, 4, 2)
    assert stage_batch_split(_grpo(global_batch_size=24), 3) == BatchSplit(24, 3, 4, 2)
    assert stage_batch_split(_grpo(global_batch_size=24), 2) == BatchSplit(24, 2, 4, 3)


def test_prompts_fill_a_generation_batch_exactly_at_its_size() -> None:
    """8 completions per optimizer step over 1 process, 4 per prompt: 2 prompts fill one generation batch."""
    assert too_few_prompts(_grpo(prompts=2), 1) is None
    assert too_few_prompts(_grpo(prompts=2), 2).startswith("2 cannot fill one generation batch of 4 prompts (global "
                                                            "batch 16 = 4 per device x 2 accumulation x 2 processes")


def test_recipe_rejects_accumulation_next_to_a_global_batch(tmp_path) -> None:
    from alignpipe.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="gradient_accumulation_steps: is derived from global_batch_size"):
        load_recipe(write_recipe(tmp_path, TINY_RECIPE),
                    ["stages.sft.global_batch_size=32", "stages.sft.gradient_accumulation_steps=2"])


def test_run_refuses_a_global_batch_that_does_not_split_before_anything_runs(tmp_path, capsys) -> None:
    recipe = write_recipe(tmp_path, TINY_RECIPE)
    code = main(["run", str(recipe), "stages.sft.global_batch_size=16", "--cpu", "--processes", "3",
                 "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert "stages.sft: global_batch_size 16 does not split over 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("options", "visible", "message"), [
    (LaunchOptions(nodes=2), 8, "--nodes 2 needs --main-addr"),
    (LaunchOptions(nodes=2, node_rank=2, main_addr="h"), 8, r"--node-rank must be in \[0, 1\]"),
    (LaunchOptions(cpu=True, deepspeed="zero3"), 0, "--deepspeed zero3 needs GPUs"),
    (LaunchOptions(gpus=4), 2, "--gpus 4 but this machine has 2 visible GPU"),
    (LaunchOptions(cpu=True, gpus=2), 2, "--cpu and --gpus exclude each other"),
    (LaunchOptions(processes=2), 8, "--processes counts CPU processes"),
    (LaunchOptions(main_port=0), 0, "--main-port must be a TCP port"),
    (LaunchOptions(nodes=2, main_addr="h", main_port=65535), 8,
     r"--control-port must be a TCP port \(1-65535\), got 65536 \(--main-port \+ 1\); pass --control-port P"),
    (LaunchOptions(nodes=2, main_addr="h", control_port=29500), 8, "--control-port 29500 is --main-port"),
])
def test_bad_topologies_are_refused_with_the_fix(options, visible, message) -> None:
    with pytest.raises(LaunchError, match=message):
        resolve_topology(options, visible_gpus=visible)


def test_the_control_channel_takes_the_port_after_the_rendezvous_unless_told() -> None:
    two_nodes = {"nodes": 2, "main_addr": "10.0.0.1", "main_port": 29600}
    topology = resolve_topology(LaunchOptions(**two_nodes), visible_gpus=8)
    assert topology.control_port == 29601 and "control channel on 10.0.0.1:29601" in topology.describe()
    assert resolve_topology(LaunchOptions(**two_nodes, control_port=40000), visible_gpus=8).control_port == 40000
    assert resolve_topology(LaunchOptions(main_port=65535), visible_gpus=0).main_port == 65535  # one node: no channel


def test_no_gpu_falls_back_to_the_cpu() -> None:
    topology = resolve_topology(LaunchOptions(), visible_gpus=0)
    assert topology.device == "cpu" and topology.world_size == 1 and topology.config.name == "single.yaml"
    assert resolve_topology(LaunchOptions(processes=2), visible_gpus=0).config.name == "ddp-cpu.yaml"
    assert resolve_topology(LaunchOptions(), visible_gpus=4).config.name == "ddp.yaml"


def test_cpu_launches_keep_the_users_thread_count_and_share_the_usable_cores(monkeypatch) -> None:
    import os

    topology = resolve_topology(LaunchOptions(processes=2), visible_gpus=0)

    def threads() -> str:
        command = stage_command(topology, ["pipelines/sft.py"], python="py")
        return command[command.index("--num_cpu_threads_per_process") + 1]

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads() == "3"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine's count; this process may use 4 of them
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert threads() == "2"


def test_two_nodes_of_eight_gpus_with_zero3() -> None:
    topology = resolve_topology(LaunchOptions(gpus=8, nodes=2, node_rank=1, main_addr="10.0.0.1",
                                              deepspeed="zero3"), visible_gpus=8)
    command = stage_command(topology, ["pipelines/dpo.py", "--stage-dir", "runs/x/dpo"], python="py")
    assert command == ["py", "-m", "accelerate.commands.launch", "--config_file", str(topology.config),
                       "--num_processes", "16", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip",
                       "10.0.0.1", "--main_process_port", "29500", "--deepspeed_config_file",
                       str(REPO / "recipes" / "accelerate" / "ds_zero3.json"), "pipelines/dpo.py", "--stage-dir",
                       "runs/x/dpo"]
    # own-loop stages run plain data parallel under --deepspeed; evaluation runs as one process on node 0
    assert stage_topology(topology, "ppo").config.name == "multi-node.yaml"
    assert stage_topology(topology, "ppo").deepspeed_json is None
    assert stage_topology(topology, "eval").world_size == 1


def test_accelerate_configs_exist_and_deepspeed_ones_leave_precision_to_the_json() -> None:
    import json

    import yaml

    folder = REPO / "recipes" / "accelerate"
    for name in ("single", "ddp", "ddp-cpu", "zero2", "zero3", "multi-node"):
        config = yaml.safe_load((folder / f"{name}.yaml").read_text())
        assert config["compute_environment"] == "LOCAL_MACHINE"
        if name.startswith("zero"):
            assert "mixed_precision" not in config
            ds = json.loads((folder / config["deepspeed_config"]["deepspeed_config_file"]).read_text())
            assert ds["bf16"] == {"enabled": "auto"} and ds["zero_optimization"]["stage"] == int(name[-1])
    assert yaml.safe_load((folder / "ddp-cpu.yaml").read_text())["use_cpu"] is True


ULTRAFEEDBACK = sorted((REPO / "recipes" / "ultrafeedback").glob("*.yaml"))


@pytest.mark.parametrize("recipe", ULTRAFEEDBACK, ids=lambda p: p.name)
def test_dry_run_prints_the_two_node_deepspeed_commands_and_writes_nothing(recipe: Path, tmp_path, capsys) -> None:
    """ZeRO-3, or ZeRO-2 for a QLoRA recipe (refused under ZeRO-3, see the test below)."""
    from alignpipe.recipe import load_recipe

    runs = tmp_path / "runs"
    zero = "zero2" if load_recipe(recipe).model.quantization else "zero3"
    code = main(["run", str(recipe), "--nodes", "2", "--node-rank", "0", "--main-addr", "10.0.0.1", "--gpus", "8",
                 "--deepspeed", zero, "--dry-run", "--runs-dir", str(runs)])
    out = capsys.readouterr().out
    assert code == 0
    assert not runs.exists()  # nothing written, no model or dataset touched
    stages = load_recipe(recipe).stages
    assert out.count("[dry-run] ") == len(stages)
    for stage in stages:
        line = out.split(f"[dry-run] {stage.name} ({stage.type}): run (new)\n  ", 1)[1].splitlines()[0]
        assert f"pipelines/{stage.type}.py --stage-dir {runs / load_recipe(recipe).name / stage.name}" in line
        if stage.type in ("eval", "bon"):
            assert "single.yaml --num_processes 1 --num_machines 1" in line
        elif stage.type in ("ppo", "reward"):
            assert "multi-node.yaml --num_processes 16 --num_machines 2 --machine_rank 0" in line
        else:
            assert f"{zero}.yaml --num_processes 16 --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 " \
                   "--main_process_port 29500 --deepspeed_config_file" in line and line.count(f"ds_{zero}.json") == 1


def test_dry_run_without_gpus_shows_the_launch_this_machine_would_make(tiny_recipe_path, tmp_path, capsys,
                                                                       monkeypatch) -> None:
    """No --gpus: the real run uses every visible GPU, so the dry run must describe that launch, not a CPU one."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    code = main(["run", str(tiny_recipe_path), "--dry-run", "--runs-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    sft = out.split("[dry-run] sft (sft): run (new)\n  ", 1)[1].splitlines()[0]
    assert "--num_processes 4" in sft and "cpu" not in sft


def test_launch_sh_help_documents_every_run_option() -> None:
    help_text = subprocess.run(["bash", str(REPO / "launch.sh"), "--help"], capture_output=True, text=True,
                               check=True).stdout
    run_parser = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "run")[1]
    options = [o for action in run_parser._actions for o in action.option_strings
               if o.startswith("--") and o not in ("--help", "--in-process")]
    missing = [o for o in options if o not in help_text]
    assert not missing, f"launch.sh --help does not mention {missing}"
    assert "--test" in help_text and "KEY=VALUE" in help_text


@pytest.fixture
def launcher_copy(tmp_path) -> Path:
    """launch.sh in a copy of the project whose venv is installed and whose `alignpipe`/python print cwd and args."""
    root = tmp_path / "main"
    (root / "recipes").mkdir(parents=True)
    for name in ("launch.sh", "pyproject.toml", "constraints.txt", "recipes/quickstart.yaml"):
        (root / name).write_bytes((REPO / name).read_bytes())
    (root / "launch.sh").chmod(0o755)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("alignpipe", "python"):
        (bin_dir / name).write_text('#!/usr/bin/env bash\necho "cwd=$PWD"; printf "arg=%s\\n" "$@"\n')
        (bin_dir / name).chmod(0o755)
    assert _launch(root, "./launch.sh", "--test")  # installs once (the fake python), which writes the stamp
    return root


def _launch(cwd: Path, *args: str) -> list[str]:
    done = subprocess.run(["bash", "-c", 'exec "$@"', "launch", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_launch_sh_reads_the_users_paths_from_their_directory(launcher_copy) -> None:
    """It runs from the project root, so the recipe, --runs-dir and test paths must mean what they meant where typed."""
    parent, root = launcher_copy.parent, launcher_copy
    (parent / "my.yaml").write_text("name: mine\n")
    out = _launch(parent, "main/launch.sh", "main/recipes/quickstart.yaml", "--runs-dir", "out", "--cpu")
    assert f"cwd={root}" in out
    assert out[-5:] == ["arg=run", f"arg={parent}/main/recipes/quickstart.yaml", "arg=--runs-dir", f"arg={parent}/out",
                        "arg=--cpu"]
    out = _launch(parent, "main/launch.sh", "my.yaml", "--runs-dir=/abs/runs")
    assert out[-2:] == [f"arg={parent}/my.yaml", "arg=--runs-dir=/abs/runs"]
    out = _launch(parent, "main/launch.sh", "--test", "-k", "x", "main/launch.sh::t")
    assert out[-3:] == ["arg=-k", "arg=x", f"arg={parent}/main/launch.sh::t"]
    # from the project root, as the README runs it, the arguments pass through unchanged
    assert _launch(root, "./launch.sh", "recipes/quickstart.yaml")[-2:] == ["arg=run", "arg=recipes/quickstart.yaml"]
    assert _launch(parent, "main/launch.sh", "--help")[0].startswith("alignpipe launcher")


def _installs(root: Path, **env: str) -> list[str]:
    """``launch.sh --test`` in ``launcher_copy`` from its parent directory, with ``env`` and no
    ALIGNPIPE_CONSTRAINTS otherwise: the arguments of each ``pip install -e`` it made (the fake python prints them)."""
    environ = {k: v for k, v in os.environ.items() if k != "ALIGNPIPE_CONSTRAINTS"}
    done = subprocess.run(["bash", "-c", 'exec "$@"', "launch", str(root / "launch.sh"), "--test"], cwd=root.parent,
                          capture_output=True, text=True, env={**environ, **env})
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.split("cwd=") if "arg=-e" in line]


def test_launch_sh_installs_the_tested_versions_unless_told_otherwise(launcher_copy) -> None:
    """A fresh machine gets constraints.txt's versions (a release since the last green CI cannot change what the
    tests run on); ALIGNPIPE_CONSTRAINTS names another file, from the caller's directory, or none when empty. The
    venv installs again whenever the constraints differ from those it was installed with, and only then."""
    root = launcher_copy
    assert _installs(root) == []  # installed with the default constraints (the fixture): nothing to do
    (installed,) = _installs(root, ALIGNPIPE_CONSTRAINTS="")
    assert "arg=-c" not in installed  # empty: pip chooses within pyproject.toml's ranges
    assert _installs(root, ALIGNPIPE_CONSTRAINTS="") == []
    mine = root.parent / "mine.txt"
    mine.write_text("trl==1.16.0\n")
    (installed,) = _installs(root, ALIGNPIPE_CONSTRAINTS="mine.txt")
    assert f"arg=-c\narg={mine}\n" in installed
    assert _installs(root, ALIGNPIPE_CONSTRAINTS=str(mine)) == []  # the same file, named another way
    (root / "copy.txt").write_text(mine.read_text())
    assert _installs(root, ALIGNPIPE_CONSTRAINTS=str(root / "copy.txt")) == []  # the same pins
    mine.write_text("trl==1.16.0\npeft==0.21.2\n")
    assert len(_installs(root, ALIGNPIPE_CONSTRAINTS="mine.txt")) == 1  # its pins changed
    (installed,) = _installs(root)
    assert "arg=-c\narg=constraints.txt\n" in installed  # back to the default, in the project root
    done = subprocess.run(["bash", "-c", 'exec "$@"', "launch", str(root / "launch.sh"), "--test"], cwd=root.parent,
                          capture_output=True, text=True, env={**os.environ, "ALIGNPIPE_CONSTRAINTS": "absent.txt"})
    assert done.returncode == 2
    assert f"ALIGNPIPE_CONSTRAINTS names {root.parent}/absent.txt, which is not a file" in done.stderr


def test_a_failed_install_under_constraints_says_how_to_install_without_them(launcher_copy) -> None:
    """An older torch build (TORCH_SPEC) may require a version the constraints pin otherwise: pip's own error says
    which, and the launcher says what to do about it."""
    root = launcher_copy
    python = root / ".venv" / "bin" / "python"
    python.write_text('#!/usr/bin/env bash\nfor a in "$@"; do [ "$a" = -e ] && exit 1; done; exit 0\n')
    (root / "constraints.txt").write_text("trl==1.16.0\n")  # new pins: it installs again
    done = subprocess.run(["bash", "-c", 'exec "$@"', "launch", str(root / "launch.sh"), "--test"], cwd=root.parent,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert "pip could not install alignpipe (its error above says why)" in done.stderr
    assert "clashes with a pin in constraints.txt" in done.stderr
    assert "set ALIGNPIPE_CONSTRAINTS= (empty)" in done.stderr


def test_constraints_pin_every_dependency_within_its_declared_range() -> None:
    """Each direct dependency (and dev extra) has exactly one pin in constraints.txt, and the pin satisfies
    pyproject.toml's range: a range bumped without the lock (or the reverse) would install something untested."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]
    pins: dict[str, list[str]] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pinned = Requirement(line)
            (version,) = [spec.version for spec in pinned.specifier if spec.operator == "=="]
            pins.setdefault(canonicalize_name(pinned.name), []).append(version)
    assert all(len(versions) == 1 for versions in pins.values()), pins
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        if name == "torch":  # TORCH_SPEC installs it, a CPU or CUDA build
            assert name not in pins
            continue
        assert name in pins, f"constraints.txt has no pin for {requirement}"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), (requirement, pins[name])
    # torch 2.6 (within torch's range) requires sympy==1.13.1: a sympy pin would refuse to install beside it
    assert "sympy" not in pins


def test_launch_sh_leaves_an_option_after_runs_dir_to_alignpipe(launcher_copy) -> None:
    """`--runs-dir --dry-run` took --dry-run for the directory (rebased to <caller>/--dry-run) and started a real run;
    passed on as they are, argparse refuses --runs-dir without a value."""
    parent = launcher_copy.parent
    out = _launch(parent, "main/launch.sh", "my.yaml", "--runs-dir", "--dry-run")
    assert out[-3:] == [f"arg={parent}/my.yaml", "arg=--runs-dir", "arg=--dry-run"]
    assert _launch(parent, "main/launch.sh", "my.yaml", "--cpu", "--runs-dir")[-2:] == ["arg=--cpu", "arg=--runs-dir"]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "my.yaml", "--runs-dir", "--dry-run"])
    assert exit_.value.code == 2


def test_a_qlora_recipe_is_refused_under_zero3_before_anything_runs(tmp_path) -> None:
    """ZeRO-3 cannot shard the loader's 4-bit weights (transformers refuses the load once a trainer exists): the run
    stops at once naming the stage and the way out, where it failed in the second round of an online stage."""
    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "ultrafeedback" / "llama-3.1-8b-qlora-dpo.yaml")
    assert recipe.model.quantization is not None

    def topology(zero):
        return resolve_topology(LaunchOptions(gpus=8, nodes=2, node_rank=0, main_addr="10.0.0.1", deepspeed=zero),
                                visible_gpus=8)

    with pytest.raises(ValueError, match=r"stages\.sft: model\.quantization \(QLoRA\) cannot run under --deepspeed "
                                         r"zero3.*use --deepspeed zero2"):
        Runner(recipe, runs_dir=tmp_path, topology=topology("zero3"), dry_run=True)
    for allowed in ("zero2", None):
        Runner(recipe, runs_dir=tmp_path, topology=topology(allowed), dry_run=True)
    unquantized = load_recipe(REPO / "recipes" / "ultrafeedback" / "qwen2.5-0.5b-dpo.yaml")
    Runner(unquantized, runs_dir=tmp_path, topology=topology("zero3"), dry_run=True)


def test_full_weights_in_explicit_half_precision_are_refused_unless_deepspeed_keeps_float32_masters(tmp_path,
                                                                                                    capsys) -> None:
    """Without DeepSpeed nothing keeps float32 masters of weights loaded in bf16, so a full fine-tune would step them
    in bf16 and lose most updates; auto loads them in float32, and LoRA stages keep the bf16 base."""
    from alignpipe.pipeline.launch_checks import check_full_weight_precision
    from alignpipe.recipe import load_recipe

    recipe = write_recipe(tmp_path, TINY_RECIPE)
    code = main(["run", str(recipe), "model.dtype=bfloat16", "--cpu", "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    assert ("stages.sft: trains full weights (lora: null) that model.dtype bfloat16 would load and step in bfloat16"
            in capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()
    half = load_recipe(recipe, ["model.dtype=float16"])
    zero2 = resolve_topology(LaunchOptions(gpus=1, deepspeed="zero2"), visible_gpus=1)
    check_full_weight_precision(half, zero2)  # DeepSpeed's optimizer keeps float32 masters
    plain = resolve_topology(LaunchOptions(gpus=1), visible_gpus=1)
    with pytest.raises(ValueError, match="stages.sft: trains full weights"):
        check_full_weight_precision(half, plain)
    for fine in (load_recipe(recipe, ["model.dtype=auto"]), load_recipe(recipe, ["model.dtype=float32"]),
                 load_recipe(recipe, ["model.dtype=bfloat16", "stages.sft.lora={r: 4, alpha: 8}",
                                      "stages.dpo.lora={r: 4, alpha: 8}"])):
        check_full_weight_precision(fine, plain)


def test_a_stage_does_not_inherit_the_launch_that_started_the_run(tiny_recipe_path, tmp_path, monkeypatch) -> None:
    """A torchrun/SLURM wrapper's or a pod's rendezvous variables made a one-process stage wait forever for
    WORLD_SIZE processes, and a shell's stale ACCELERATE_USE_CPU=true trained a --gpus launch on the CPU."""
    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    leaked = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
              "MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x", "PMI_SIZE": "2",
              "OMPI_COMM_WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "true"}
    kept = {"HF_HOME": "/kept", "TORCHELASTIC_ENABLE_FILE_TIMER": "1"}  # the launcher's own settings stay
    for key, value in {**leaked, **kept}.items():
        monkeypatch.setenv(key, value)
    recipe = load_recipe(tiny_recipe_path)
    for options, gpus, use_cpu in ((LaunchOptions(), 0, "true"), (LaunchOptions(gpus=2), 2, "false")):
        runner = Runner(recipe, runs_dir=tmp_path, topology=resolve_topology(options, visible_gpus=gpus))
        env = runner._stage_env()
        assert not (set(leaked) - {"ACCELERATE_USE_CPU"}) & set(env)
        assert env["ACCELERATE_USE_CPU"] == use_cpu and kept.items() <= env.items()


def test_an_in_process_stage_runs_without_the_launch_that_started_the_run(tiny_recipe_path, tmp_path,
                                                                         monkeypatch) -> None:
    """In-process, a leftover WORLD_SIZE made the stage wait for ever in the rendezvous (in C++, where no signal
    handler runs); it now sees the environment a stage process would get, and the runner's is restored after."""
    import os

    from alignpipe.pipeline import stage as stage_module
    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29400")
    seen = {}
    monkeypatch.setattr(stage_module, "execute", lambda root, resume: seen.update(os.environ))
    recipe = load_recipe(tiny_recipe_path, ["stages.sft.max_steps=1"])
    runner = Runner(recipe, runs_dir=tmp_path, in_process=True)
    runner._launch("sft", StageDir(tmp_path / "sft"), resume=False)
    assert "WORLD_SIZE" not in seen and "MASTER_PORT" not in seen and seen["ACCELERATE_USE_CPU"] == "true"
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["MASTER_PORT"] == "29400"


@pytest.mark.parametrize(("options", "config"), [(LaunchOptions(cpu=True), "single.yaml"),
                                                 (LaunchOptions(cpu=True, processes=2), "ddp-cpu.yaml")])
def test_accelerate_tells_a_cpu_stage_it_runs_on_the_cpu_on_a_machine_with_gpus(options, config, monkeypatch) -> None:
    """accelerate's one-process launcher sets ACCELERATE_USE_CPU from its own flags (False under single.yaml), so a
    one-process --cpu stage (or an eval stage of a --cpu run) trained on a visible GPU."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    topology = resolve_topology(options, visible_gpus=1)
    command = stage_command(topology, ["pipelines/sft.py"])
    assert topology.config.name == config
    args, *_ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what the runner hands the launcher (stage_environment)
    if topology.world_size == 1:
        assert not args.multi_gpu and prepare_simple_launcher_cmd_env(args)[1]["ACCELERATE_USE_CPU"] == "True"
    else:
        assert args.multi_gpu and not args.cpu and prepare_multi_gpu_env(args)["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_multi_node_deepspeed_launch_runs_torchrun_on_each_node_with_its_rank(zero) -> None:
    """accelerate's default multi-node DeepSpeed launcher (pdsh) runs `deepspeed --hostfile None --launcher pdsh`
    from one node over ssh, without --machine_rank: every node running the same command could not work."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    topology = resolve_topology(LaunchOptions(gpus=8, nodes=2, node_rank=1, main_addr="10.0.0.1", deepspeed=zero),
                                visible_gpus=8)
    command = stage_command(topology, ["pipelines/dpo.py", "--stage-dir", "runs/x/dpo"])
    try:
        args, *_ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    except ImportError as error:  # an accelerate that wants DeepSpeed installed to read its options
        pytest.skip(f"accelerate cannot prepare a DeepSpeed launch here: {error}")
    assert args.use_deepspeed and args.deepspeed_multinode_launcher == "standard"
    args.deepspeed_fields_from_accelerate_config = ""  # as accelerate's launch_command sets it
    deepspeed_command, env = prepare_deepspeed_cmd_env(args)
    assert deepspeed_command is None  # no `deepspeed --launcher pdsh ...`: torch.distributed.run, on this node
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    endpoint = args.rdzv_endpoint if hasattr(args, "rdzv_endpoint") else f"{args.master_addr}:{args.master_port}"
    assert endpoint == "10.0.0.1:29500"
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(REPO / "recipes" / "accelerate" / f"ds_{zero}.json")


def test_in_process_is_refused_with_more_than_one_process(tiny_recipe_path, tmp_path, capsys, monkeypatch) -> None:
    """--in-process ran one process while the log and the stage records said the batch split of N."""
    import torch

    from alignpipe.pipeline.runner import Runner
    from alignpipe.recipe import load_recipe

    runs = ["--runs-dir", str(tmp_path / "runs"), "--dry-run"]
    for options, named in ((["--cpu", "--processes", "2"], "2 processes (--processes 2)"),
                           (["--cpu", "--nodes", "2", "--main-addr", "10.0.0.1"],
                            "2 processes (--processes 1, --nodes 2)"),
                           (["--gpus", "2"], "2 processes (2 GPUs per node (--gpus, default: every visible one))")):
        assert main(["run", str(tiny_recipe_path), "--in-process", *options, *runs]) == 2
        err = capsys.readouterr().err
        assert f"--in-process runs every stage inside this one process, but this launch has {named}; drop " \
               "--in-process, or launch one process" in err
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # a Runner without a topology: one process
    assert Runner(load_recipe(tiny_recipe_path), runs_dir=tmp_path, in_process=True).topology.world_size == 1
