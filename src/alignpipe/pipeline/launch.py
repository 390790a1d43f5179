"""How a stage process is started: the ``accelerate launch`` command for a topology (CPU, GPUs, nodes, DeepSpeed).

Why a plan object: the runner, ``--dry-run`` and the tests all need the same answer to "what exactly runs?", so the
topology -> (accelerate config, command line) mapping is one pure function. The configs live in
``recipes/accelerate/`` (recipes never hold the world size). Choices that are not obvious:

* CPU with several processes uses ``ddp-cpu.yaml`` (accelerate's torchrun launcher + ``use_cpu``): ``accelerate
  launch --cpu --num_processes N`` starts a single process; one CPU process gets ``--cpu``, from which accelerate's
  one-process launcher sets ``ACCELERATE_USE_CPU`` (without it, a visible GPU was used);
* DeepSpeed configs point at a JSON file; its absolute path is passed as ``--deepspeed_config_file`` so the run does
  not depend on the working directory;
* multi-node runs need a shared filesystem for ``runs/``; every node runs the same command with its own node rank,
  and node 0 tells the others what to run over a control channel on ``control_port`` (``pipeline.control``), a port
  of its own beside the stage launches' ``main_port``.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from alignpipe.locations import ACCELERATE_DIR

DeepSpeedStage = Literal["zero2", "zero3"]


class LaunchError(ValueError):
    """A topology that cannot be launched (bad counts, missing GPUs, DeepSpeed on CPU ...)."""


@dataclass(frozen=True)
class LaunchOptions:
    """What the user asked for on the command line (``launch.sh`` / ``alignpipe run``)."""

    gpus: int | None = None  # GPUs per node; None = every visible GPU, or the CPU when there is none
    processes: int = 1  # CPU processes per node (with cpu, or on a machine without GPUs)
    nodes: int = 1
    node_rank: int = 0
    main_addr: str | None = None
    main_port: int = 29500
    control_port: int | None = None  # node 0's control channel (multi-node); None = main_port + 1
    deepspeed: DeepSpeedStage | None = None
    cpu: bool = False


@dataclass(frozen=True)
class Topology:
    """The resolved layout: where processes run and which accelerate config describes them."""

    device: Literal["cpu", "cuda"]
    processes_per_node: int
    nodes: int
    node_rank: int
    main_addr: str | None
    main_port: int
    control_port: int
    config: Path
    deepspeed_json: Path | None

    @property
    def world_size(self) -> int:
        return self.processes_per_node * self.nodes

    @property
    def is_main_node(self) -> bool:
        return self.node_rank == 0

    @property
    def deepspeed(self) -> DeepSpeedStage | None:
        """The ZeRO stage its DeepSpeed config runs (``ds_<stage>.json``), None without DeepSpeed."""
        return self.deepspeed_json.stem.removeprefix("ds_") if self.deepspeed_json else None

    def describe(self) -> str:
        nodes = (f" x {self.nodes} nodes (this is node {self.node_rank}; control channel on "
                 f"{self.main_addr}:{self.control_port})" if self.nodes > 1 else "")
        zero = f", DeepSpeed {self.deepspeed}" if self.deepspeed else ""
        unit = "GPU(s)" if self.device == "cuda" else "CPU process(es)"
        return f"{self.processes_per_node} {unit}{nodes}{zero} (accelerate config {self.config.name})"


def resolve_topology(options: LaunchOptions, *, visible_gpus: int) -> Topology:
    """Check the options against each other and the machine and pick the accelerate config.

    ``visible_gpus`` is passed in (not read here) so dry runs and tests can describe a cluster from any machine.
    """
    o = options
    if o.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {o.nodes}")
    if not 0 <= o.node_rank < o.nodes:
        raise LaunchError(f"--node-rank must be in [0, {o.nodes - 1}] for --nodes {o.nodes}, got {o.node_rank}")
    if o.processes < 1:
        raise LaunchError(f"--processes must be >= 1, got {o.processes}")
    if o.gpus is not None and o.gpus < 1:
        raise LaunchError(f"--gpus must be >= 1, got {o.gpus} (use --cpu to run on the CPU)")
    if o.nodes > 1 and not o.main_addr:
        raise LaunchError(f"--nodes {o.nodes} needs --main-addr: the address of node 0, reachable from every node")
    if not 0 < o.main_port < 65536:
        raise LaunchError(f"--main-port must be a TCP port (1-65535), got {o.main_port}")
    control_port = o.main_port + 1 if o.control_port is None else o.control_port
    if o.nodes > 1 and not 0 < control_port < 65536:
        given = f"{control_port}" if o.control_port is not None else f"{control_port} (--main-port + 1)"
        raise LaunchError(f"--control-port must be a TCP port (1-65535), got {given}; pass --control-port P")
    if o.nodes > 1 and control_port == o.main_port:
        raise LaunchError(f"--control-port {control_port} is --main-port, which the stage launches use; pick another")
    if o.cpu and o.gpus is not None:
        raise LaunchError("--cpu and --gpus exclude each other; use --cpu --processes N for several CPU processes")

    on_cpu = o.cpu or (o.gpus is None and visible_gpus == 0)
    if on_cpu:
        if o.deepspeed:
            raise LaunchError(f"--deepspeed {o.deepspeed} needs GPUs; run without --deepspeed on the CPU")
        per_node = o.processes
    else:
        if o.processes != 1:
            raise LaunchError("--processes counts CPU processes; on GPUs use --gpus N")
        per_node = o.gpus if o.gpus is not None else visible_gpus
        if per_node > visible_gpus:
            raise LaunchError(f"--gpus {per_node} but this machine has {visible_gpus} visible GPU(s); use --cpu (or "
                              "leave out --gpus) to run on the CPU, or --dry-run to print the commands for a cluster")

    device = "cpu" if on_cpu else "cuda"
    if o.deepspeed:
        config, json_file = ACCELERATE_DIR / f"{o.deepspeed}.yaml", ACCELERATE_DIR / f"ds_{o.deepspeed}.json"
    else:
        config, json_file = _data_parallel_config(device, per_node, o.nodes), None
    return Topology(device=device, processes_per_node=per_node, nodes=o.nodes, node_rank=o.node_rank,
                    main_addr=o.main_addr, main_port=o.main_port, control_port=control_port, config=config,
                    deepspeed_json=json_file)


def _data_parallel_config(device: str, processes_per_node: int, nodes: int) -> Path:
    """The accelerate config without DeepSpeed: one process, CPU processes over gloo, GPUs on one or more nodes."""
    if processes_per_node * nodes == 1:
        name = "single.yaml"
    elif device == "cpu":
        name = "ddp-cpu.yaml"
    else:
        name = "multi-node.yaml" if nodes > 1 else "ddp.yaml"
    return ACCELERATE_DIR / name


def stage_command(topology: Topology, script: list[str], *, python: str = "python") -> list[str]:
    """``accelerate launch`` + the options for ``topology`` + the stage script and its arguments.

    ``script`` is ``[path/to/pipelines/<type>.py, --stage-dir, ...]``; ``python`` the interpreter whose
    ``accelerate`` module runs it (``python -m accelerate.commands.launch``: no reliance on PATH).
    """
    t = topology
    command = [python, "-m", "accelerate.commands.launch", "--config_file", str(t.config),
               "--num_processes", str(t.world_size), "--num_machines", str(t.nodes)]
    if t.nodes > 1:
        command += ["--machine_rank", str(t.node_rank), "--main_process_ip", str(t.main_addr)]
    if t.world_size > 1:
        command += ["--main_process_port", str(t.main_port)]
    if t.deepspeed_json:
        command += ["--deepspeed_config_file", str(t.deepspeed_json)]
    if t.device == "cpu":  # accelerate would otherwise pin a single-process CPU run to OMP_NUM_THREADS=1
        command += ["--num_cpu_threads_per_process", str(cpu_threads_per_process(t.processes_per_node))]
    if t.device == "cpu" and t.world_size == 1:  # its one-process launcher sets ACCELERATE_USE_CPU from this flag
        command += ["--cpu"]
    return command + script


# What a launcher tells its workers (torchrun's rendezvous, MPI's ranks, accelerate's mode flags). Inherited by a
# stage from whatever started the run (a torchrun or SLURM wrapper, a Kubeflow pod, a shell used for an earlier run),
# they describe that launch, not the stage's: a one-process stage waited forever in a rendezvous of WORLD_SIZE
# processes, and a stale ACCELERATE_USE_CPU=true trained a --gpus run on the CPU.
LAUNCH_VARIABLES = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                              "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                              # what torchrun tells its workers; TORCHELASTIC_ENABLE_FILE_TIMER, _HEALTH_CHECK_PORT
                              # and the like configure the launcher itself and are kept
                              "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                              "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE"})
LAUNCH_PREFIXES = ("PMI_", "OMPI_COMM_WORLD_", "MV2_COMM_WORLD_", "ACCELERATE_USE_", "ACCELERATE_DEEPSPEED_",
                   "ACCELERATE_SAGEMAKER_")


def stage_environment(environ: dict[str, str], device: str) -> dict[str, str]:
    """The environment a stage's launcher starts from: the caller's, without the variables of the launch that started
    the run (``LAUNCH_VARIABLES``; ``accelerate launch`` sets its own), and with ``ACCELERATE_USE_CPU`` saying the
    stage's device, which every rank of a CPU launch must know (``stage.init_distributed``)."""
    env = {key: value for key, value in environ.items()
           if key not in LAUNCH_VARIABLES and not key.startswith(LAUNCH_PREFIXES)}
    return {**env, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "true" if device == "cpu" else "false"}


def cpu_threads_per_process(processes: int) -> int:
    """OpenMP threads for each CPU process: the user's ``OMP_NUM_THREADS`` when set (the launch flag would override
    it), else the cores this process may use (its CPU affinity, which containers and ``taskset`` narrow, not the
    machine's count) shared among the node's processes."""
    user = os.environ.get("OMP_NUM_THREADS", "").strip()
    if user.isdigit() and int(user) > 0:
        return int(user)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // processes)


def format_command(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in command)


# Stage types whose work is not split over processes: they run as ONE process on node 0 whatever the topology
# (evaluation and best-of-n generate and score a fixed prompt set; splitting them is future work).
SINGLE_PROCESS_STAGES = frozenset({"eval", "bon"})
# Stage types with their own training loop over accelerate's process group (gradients averaged across ranks by
# hand), which DeepSpeed's engine does not wrap: under --deepspeed they run plain data parallel.
NO_DEEPSPEED_STAGES = frozenset({"ppo", "reward"})


def stage_topology(topology: Topology, stage_type: str) -> Topology:
    """The topology one stage type actually runs with (see SINGLE_PROCESS_STAGES and NO_DEEPSPEED_STAGES)."""
    if stage_type in SINGLE_PROCESS_STAGES:
        return replace(topology, processes_per_node=1, nodes=1, node_rank=0, deepspeed_json=None,
                       config=_data_parallel_config(topology.device, 1, 1))
    if stage_type in NO_DEEPSPEED_STAGES and topology.deepspeed_json is not None:
        return replace(topology, deepspeed_json=None,
                       config=_data_parallel_config(topology.device, topology.processes_per_node, topology.nodes))
    return topology
