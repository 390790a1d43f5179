"""``alignpipe``: run, validate, inspect the data of, and evaluate staged alignment recipes."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import logging
import signal
import sys
from pathlib import Path

from alignpipe.locations import suite_names
from alignpipe.seeds import EVAL_SEED

log = logging.getLogger("alignpipe")

EPILOG_RUN = """\
examples:
  alignpipe run recipes/quickstart.yaml                       # sft, reward, dpo, osp, ppo, eval on the tiny task
  alignpipe run recipes/quickstart.yaml stages.dpo.beta=0.2   # re-runs only dpo and eval
  alignpipe run recipes/quickstart.yaml --force sft           # re-run a stage even if complete
  alignpipe run recipes/quickstart.yaml --resume              # continue an interrupted stage from its last checkpoint
  alignpipe run recipes/quickstart.yaml --cpu --processes 2   # 2 data-parallel CPU processes (gloo)
  alignpipe run recipes/ultrafeedback/qwen2.5-0.5b-dpo.yaml --gpus 8 --deepspeed zero3
  alignpipe run R.yaml --nodes 2 --node-rank 0 --main-addr 10.0.0.1 --gpus 8 --deepspeed zero3 --dry-run

Each stage runs as `accelerate launch --config_file recipes/accelerate/<topology>.yaml pipelines/<type>.py`; the
command is printed before it runs. Without --gpus/--cpu: every visible GPU, or one CPU process when there is none.
Stages with global_batch_size get per-device batch and gradient accumulation from it and the world size.

Each stage writes runs/<recipe name>/<stage>/ (config.yaml, manifest.json, metrics.jsonl, checkpoint/);
the eval stage writes runs/<recipe name>/leaderboard.{json,md,csv}. Completed stages with the same config and
inputs are skipped.

Several nodes (--nodes M): start the same command on every node, each with its own --node-rank, over one shared
runs directory. Node 0 decides which stages to skip, run or resume (its --force and --resume count, the other nodes'
are ignored), writes every file, and tells the other nodes over a control channel it hosts on --main-addr at
--control-port (TCP; default --main-port + 1, which must be reachable from every node too).
"""

EPILOG_VALIDATE = """\
examples:
  alignpipe validate recipes/quickstart.yaml
  alignpipe validate recipes/quickstart.yaml stages.dpo.beta=0.2 --print

Checks keys, types, value ranges, stage references and cross-field rules, then makes the checks `run` makes before
it writes anything: the local model's and reward backbones' files, configs and tokenizers (chat template, pad or EOS
token, vocabulary size, LoRA target modules), and each dataset as its stage reads it: a local file's rows (columns,
types, soft labels, chat templates that refuse a row, a reward stage's held-out split, prompts that leave no room
within max_length), a hub dataset's revision (offline: its rows must be in the datasets cache), and that the task's
longest prompt and each sampling stage's generation budget fit the model's positions. Tokenizers, configs and rows
are read, never weights, and nothing is written.
Checks that depend on where the run goes (processes, GPUs, --deepspeed) are left to `run`, which makes them before
anything is written: a global_batch_size that does not split over the processes, and an explicit bf16/fp16
model.dtype with full weights outside DeepSpeed. `alignpipe run RECIPE --dry-run [topology options]` makes them too.
Exit status 0 when valid, 2 when not (every problem found, one line each under its recipe key).
"""

EPILOG_DATA = """\
examples:
  alignpipe data recipes/quickstart.yaml                         # every stage that reads data, 2 example rows each
  alignpipe data recipes/quickstart.yaml --stage dpo --show 5 stages.dpo.max_length=32
  alignpipe data recipes/alpaca-eval/soft-dpo-tiny.yaml --json > data.json
  alignpipe data recipes/quickstart.yaml --export /tmp/rows      # /tmp/rows/sft.jsonl, reward.jsonl, dpo.jsonl

For each stage that reads a dataset (sft, dpo, reward), the rows are built by the functions the stage itself calls:
the source (a hub dataset at the commit the run would pin), the rows read and those skipped with why, the limit,
hard or soft labels (soft: the strengths' mean, min and max), a reward stage's held-out share, and, with the model's
tokenizer when one is at hand without weights (the tiny model's, a local or cached one), prompt and reply lengths
(p50 / p95 / max) and what max_length cuts, counted as the stage's own length report counts. The online stages
(osp, sppo, ppo, grpo, ...) read no dataset: they draw prompts of the synthetic task while they train, so they are
only listed. Nothing is written but --export's files (all or none; an existing one only with --force).
Exit status 0, or 2 for a bad recipe, override, stage name or dataset.
"""

EPILOG_EVAL = """\
examples:
  alignpipe eval runs/quickstart                                   # every policy of a run, reference = its base
  alignpipe eval a=runs/quickstart b=other/runs/quickstart         # two runs: rows a/<stage> and b/<stage>
  alignpipe eval runs/quickstart/dpo/checkpoint --reference runs/quickstart/sft/checkpoint --out /tmp/lb
  alignpipe eval runs/quickstart --suite synthetic --reference runs/quickstart/sft/checkpoint

Without --suite: the built-in synthetic held-out prompts (gold judge), sized and seeded by the options above, with
pinned sampling settings; writes leaderboard.{json,md,csv} to --out (default ./eval-out/<run>, or ./eval-out).
With --suite: the suite file's prompts, sampling and judge, nothing else; --out defaults to ./eval-out/<suite>.
A run directory gives its policy stages in the order they finished, after its tiny base model (a run on a hub or
local model has none); the first of them is the reference unless --reference names one.
Synthetic prompts (and pairs) of run directories come from their recipe's task space (data: families, min_items,
max_items), as their eval stage's do; runs of different task spaces are refused.
"""

EPILOG_LEADERBOARD = """\
examples:
  alignpipe leaderboard runs/quickstart runs/selfplay --out leaderboard-merged
  alignpipe leaderboard runs/quickstart runs/selfplay --out leaderboard-merged --plots

--plots writes, beside leaderboard.{json,md,csv} and with them (all new files or, after a failure, all old):
  gold_vs_kl.png          gold_reward (the gold judge's reward; a suite judged by a reward model, or against its
                          dataset's reference outputs, records its judge's as judge_reward) ± 95% CI vs sqrt of the
                          k1 KL to the reference, one point per checkpoint coloured by run, and the Pareto frontier
                          (no other checkpoint has both lower-or-equal KL and higher-or-equal reward, one of them
                          strictly); a k1 estimate below 0 (Monte-Carlo noise) is drawn at 0
  win_rate_vs_length.png  win rate vs the reference (raw and length-controlled) vs mean response length
A plot with no checkpoint to draw is skipped and the log says why (a file of that name left by an earlier merge is
removed, as are both plots when a merge runs without --plots); checkpoints lacking a plot's metrics are left out of it
and named in the log.
"""

# `alignpipe eval` without --suite: the synthetic prompts and sampling, each settable on the command line
SYNTHETIC_EVAL = {"n_prompts": 256, "max_new_tokens": 24, "batch_size": 64, "seed": EVAL_SEED}


def _overrides_help() -> str:
    return ("dotted overrides applied after `extends` (a stage by its name, a list whole), e.g. stages.dpo.beta=0.2 "
            "'data.families=[copy, sort]' (quoted: brackets are shell patterns)")


def build_parser() -> argparse.ArgumentParser:
    from alignpipe.pipeline.control import CONTROL_TIMEOUT_S, END_GRACE_S, HEARTBEAT_S, SILENCE_S

    parser = argparse.ArgumentParser(
        prog="alignpipe",
        description="Staged RLHF / preference-alignment pipeline: a recipe (YAML) runs SFT, preference optimisation "
        "and a shared evaluation that writes a leaderboard.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with: alignpipe run recipes/quickstart.yaml   (see `alignpipe <command> --help`)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a recipe's stages in order (skipping completed ones)",
                              description="Run every stage of RECIPE in order, each as its own process.",
                              epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", type=Path, help="recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_overrides_help())
    run.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go (default: runs)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="re-run STAGE even if it is complete (repeatable; an unfinished one resumes with "
                          "--resume)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted stage from its latest trainer checkpoint instead of starting over "
                          "(one whose global batch another process count would change starts over)")
    run.add_argument("--in-process", action="store_true",
                     help="run stages inside this process instead of one subprocess per stage (debugging, tests; "
                          "one process only)")
    topology = run.add_argument_group("topology (each stage runs under accelerate launch)")
    topology.add_argument("--gpus", type=int, metavar="N", help="GPUs per node (default: all visible; none -> CPU)")
    topology.add_argument("--cpu", action="store_true", help="run on the CPU even if GPUs are visible")
    topology.add_argument("--processes", type=int, default=1, metavar="N",
                          help="CPU processes per node, data parallel over gloo (default: 1)")
    topology.add_argument("--nodes", type=int, default=1, metavar="M", help="machines (default: 1); every node runs "
                          "the same command with its own --node-rank over a shared runs directory")
    topology.add_argument("--node-rank", type=int, default=0, metavar="R", help="this machine's rank, 0..M-1")
    topology.add_argument("--main-addr", metavar="A", help="address of node 0 (needed with --nodes > 1)")
    topology.add_argument("--main-port", type=int, default=29500, metavar="P", help="rendezvous port (default: 29500)")
    topology.add_argument("--control-port", type=int, metavar="P",
                          help="with --nodes > 1: port on node 0 through which it tells the other nodes which stages "
                          "to skip, run or resume and when each is complete (default: --main-port + 1; the same "
                          "on every node)")
    topology.add_argument("--control-timeout", type=float, default=CONTROL_TIMEOUT_S, metavar="S",
                          help="with --nodes > 1: seconds the nodes wait for each other to start (default: "
                          f"{CONTROL_TIMEOUT_S:.0f}; at most a week). It also caps how long a node that has gone "
                          f"silent is waited for before it counts as gone ({SILENCE_S:.0f}s, or this if shorter, but "
                          f"at least {3 * HEARTBEAT_S:.0f}s), and how long node 0 waits at the end for the others to "
                          f"read how the run ended ({END_GRACE_S:.0f}s, or this if shorter)")
    topology.add_argument("--deepspeed", choices=["zero2", "zero3"], help="DeepSpeed ZeRO stage (GPUs only)")
    topology.add_argument("--dry-run", action="store_true",
                          help="print what the run would do with each stage (skip, run or resume, and why), its "
                          "launch command and batch split; run nothing, write nothing")

    validate = commands.add_parser("validate", help="check a recipe without running anything",
                                   description="Validate RECIPE (and overrides) and the local files it names "
                                   "(model configs, tokenizers, dataset rows) without loading any weights or writing "
                                   "anything.",
                                   epilog=EPILOG_VALIDATE, formatter_class=argparse.RawDescriptionHelpFormatter)
    validate.add_argument("recipe", type=Path, help="recipe YAML file")
    validate.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_overrides_help())
    validate.add_argument("--print", action="store_true", help="print the resolved recipe with all defaults")

    data = commands.add_parser("data", help="show what each stage of a recipe will train on, before training",
                               description="Show the rows each data-reading stage of RECIPE will train on (counts, "
                               "skipped rows and why, labels, token lengths, examples) without loading model weights "
                               "or writing anything.", epilog=EPILOG_DATA,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_argument("recipe", type=Path, help="recipe YAML file")
    data.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_overrides_help())
    data.add_argument("--stage", action="append", default=[], metavar="NAME",
                      help="only this stage (repeatable; default: every stage that reads data)")
    data.add_argument("--show", type=_count, default=2, metavar="N", help="example rows per stage (default: 2)")
    data.add_argument("--json", action="store_true", help="print one JSON document instead of the text (for scripts)")
    data.add_argument("--export", type=Path, metavar="DIR",
                      help="also write each stage's rows, as the stage builds them, to DIR/<stage>.jsonl (a reward "
                      "stage's with \"heldout\": true on the pairs it keeps out of training)")
    data.add_argument("--force", action="store_true", help="with --export: replace files that exist")

    merge = commands.add_parser("leaderboard", help="merge leaderboards of several runs into one table",
                                description="Merge leaderboard.json files (run directories or files) of one suite "
                                "into one ranked table, rows named <run directory>/<checkpoint>. Refuses sources "
                                "evaluated differently (suite file, reference, prompt set, generation settings, "
                                "judge, KL k3 estimator, or diversity sampling and implicit-reward pairs where both "
                                "drew them; proxy columns of runs with different proxies are left out). With --plots, "
                                "also draws the checkpoints of every run as PNGs beside it.",
                                epilog=EPILOG_LEADERBOARD, formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("sources", nargs="+", type=Path, help="run directories or leaderboard.json files")
    merge.add_argument("--out", type=Path, default=Path("leaderboard-merged"),
                       help="directory for the merged leaderboard.{json,md,csv}, not a source's (default: "
                       "leaderboard-merged)")
    merge.add_argument("--plots", action="store_true",
                       help="also write gold_vs_kl.png (reward vs sqrt KL to the reference, with the Pareto "
                       "frontier) and win_rate_vs_length.png into --out")
    evaluate = commands.add_parser("eval", help="evaluate checkpoints on a suite, or on synthetic prompts set by its "
                                   "options",
                                   description="Evaluate checkpoints (run directories, local paths or hub ids) with "
                                   "the shared harness.", epilog=EPILOG_EVAL,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("checkpoints", nargs="+",
                          help="run directory, checkpoint path or hub id (ORG/NAME, ORG/NAME@REVISION to pin a "
                          "branch, tag or commit; NAME=PATH to label)")
    evaluate.add_argument("--reference", help="win-rate/KL reference (default: the first checkpoint; a run "
                          "directory's first is its tiny base model, else its first stage to finish)")
    evaluate.add_argument("--out", type=Path, help="directory for leaderboard.{json,md,csv}")
    evaluate.add_argument("--suite", help=f"an eval/suites/<name>.yaml suite ({', '.join(suite_names())}) or a suite "
                          "file; it pins prompts and sampling. Without it: the synthetic prompts with the options "
                          "below")
    synthetic = evaluate.add_argument_group("synthetic prompts without --suite (a suite pins these: edit a copy of "
                                            "its file instead)")
    synthetic.add_argument("--n-prompts", type=_positive, help=f"held-out prompts (default: {SYNTHETIC_EVAL['n_prompts']})")
    synthetic.add_argument("--max-new-tokens", type=_positive, help=f"default: {SYNTHETIC_EVAL['max_new_tokens']}")
    synthetic.add_argument("--batch-size", type=_positive, help=f"default: {SYNTHETIC_EVAL['batch_size']}")
    synthetic.add_argument("--seed", type=_seed, help=f"sampling and prompt seed (default: {SYNTHETIC_EVAL['seed']})")
    evaluate.add_argument("--judge", help="saved reward model directory, for suites judged by a reward model (refused "
                          "otherwise)")
    evaluate.add_argument("--cache-dir", type=Path, help="generation/log-prob cache, reused across runs (default: "
                          "$ALIGNPIPE_CACHE/eval or ~/.cache/alignpipe/eval)")

    report = commands.add_parser("report", help="write a self-contained HTML report of a run directory",
                                 description="Write RUN_DIR/report.html: leaderboard with flags, reward vs sqrt(KL) "
                                 "with Gao fits, the gold-vs-KL Pareto frontier, win rate vs length, reward-model "
                                 "calibration and training curves, plots inlined (no other files, no JavaScript). The "
                                 "eval stage writes it too.")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="run directory, e.g. runs/quickstart")
    report.add_argument("--kl-budget", type=float, default=10.0,
                        help="flag checkpoints whose KL to the reference exceeds this many nats (default: 10)")
    return parser


def _count(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _seed(text: str) -> int:
    """An argparse type: a seed numpy takes (and a recipe's, MAX_SEED), checked before anything is sampled."""
    from alignpipe.recipe import MAX_SEED

    if not text.isdigit() or int(text) > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, {MAX_SEED}], got {text!r}")
    return int(text)


def _file_errors_in_one_line(handler):
    """A path that cannot be read or written is a mistake in the command line, not a bug: say which, exit code 2."""
    @functools.wraps(handler)
    def wrapped(args) -> int:
        try:
            return handler(args)
        except UnicodeDecodeError as error:
            byte = error.object[error.start]
            print(f"error: a file given (or one in a directory given) is not UTF-8 text (byte 0x{byte:02x} at offset "
                  f"{error.start}); pass UTF-8 text", file=sys.stderr)
        except OSError as error:
            if error.filename:
                print(f"error: {error.filename}: {error.strerror}; check the paths given on the command line",
                      file=sys.stderr)
            else:  # e.g. a hub id that cannot be fetched: transformers' message says why, over several lines
                print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return wrapped


def _not_a_file(path: Path | None, option: str) -> bool:
    """True, after saying so, when a directory option names an existing file (caught before any work is done)."""
    if path is not None and path.exists() and not path.is_dir():
        print(f"error: {option} {path} is a file; pass a directory (it is created if missing)", file=sys.stderr)
        return True
    return False


@_file_errors_in_one_line
def _cmd_validate(args) -> int:

    from alignpipe.pipeline.preflight import PreflightError, preflight
    from alignpipe.recipe import RecipeError, load_recipe, recipe_to_dict
    from alignpipe.strict_yaml import dump_yaml

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        preflight(recipe)  # the same file checks `run` makes before it writes anything
    except (RecipeError, PreflightError) as error:
        print(error, file=sys.stderr)
        return 2
    if args.print:
        print(dump_yaml(recipe_to_dict(recipe)), end="")
    stages = " -> ".join(f"{s.name}({s.type})" for s in recipe.stages)
    # beside --print's YAML the verdict goes to stderr, so `validate --print > resolved.yaml` writes a recipe
    print(f"{args.recipe}: valid recipe '{recipe.name}': {stages}", file=sys.stderr if args.print else sys.stdout)
    return 0


@_file_errors_in_one_line
def _cmd_data(args) -> int:
    from alignpipe.data.preview import PreviewError, data_stages, preview_recipe
    from alignpipe.data.preview_export import ExportError, export_rows, export_targets
    from alignpipe.data.preview_render import render_json, render_text
    from alignpipe.recipe import RecipeError, load_recipe

    if _not_a_file(args.export, "--export"):
        return 2
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.export:  # refused before any rows are built
            export_targets([s.name for s in data_stages(recipe, args.stage)], args.export, force=args.force)
        preview = preview_recipe(recipe, args.stage, show=args.show)
        exported = export_rows(preview.stages, args.export, force=args.force) if args.export else []
    except RecipeError as error:
        print(error, file=sys.stderr)
        return 2
    except (PreviewError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render_json(preview, exported) if args.json else render_text(preview, exported))
    return 0


def _stopped(how: str, runner) -> str:
    """The run's last words after a signal: which stage it stopped, or that none was running (a stop during the
    preflight, a model's conversion or between stages leaves every stage as it was)."""
    if runner.stopped_stage is None:
        return f"stopped: {how} while no stage was running; the stages already complete are kept"
    if runner.follower:
        return (f"stopped: {how}; this node's part of stage '{runner.stopped_stage}' was stopped, which stops the "
                "stage on every node (start the run again on every node, with --resume to continue it)")
    return (f"stopped: {how}; stage '{runner.stopped_stage}' was stopped and marked interrupted (add --resume to "
            "continue it)")


def _cmd_run(args) -> int:
    import torch

    from alignpipe.pipeline.control import ControlError
    from alignpipe.pipeline.launch import LaunchOptions, resolve_topology
    from alignpipe.pipeline.run_lock import RunInUse
    from alignpipe.pipeline.runner import Runner, StageFailed
    from alignpipe.pipeline.watched import Terminated, sigterm_raises
    from alignpipe.recipe import RecipeError, load_recipe

    if _not_a_file(args.runs_dir, "--runs-dir"):
        return 2
    options = LaunchOptions(gpus=args.gpus, processes=args.processes, nodes=args.nodes, node_rank=args.node_rank,
                            main_addr=args.main_addr, main_port=args.main_port, control_port=args.control_port,
                            deepspeed=args.deepspeed, cpu=args.cpu)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        # a dry run with --gpus describes that cluster from any machine; otherwise both use this machine's GPUs, so a
        # dry run shows (and checks the batch splits of) the launch the real run would make
        visible = args.gpus if args.dry_run and args.gpus is not None else torch.cuda.device_count()
        topology = resolve_topology(options, visible_gpus=visible)
        runner = Runner(recipe, runs_dir=args.runs_dir, recipe_path=args.recipe, overrides=args.overrides,
                        force=args.force, resume=args.resume, in_process=args.in_process, topology=topology,
                        dry_run=args.dry_run, control_timeout_s=args.control_timeout)
    except (RecipeError, ValueError) as error:
        print(error, file=sys.stderr)
        return 2
    try:
        with sigterm_raises():
            outcomes = runner.run()
    except Terminated as error:
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone: the exit status still says it
            print(_stopped(f"terminated ({signal.Signals(error.signum).name})", runner), file=sys.stderr)
        return 128 + error.signum
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            print(_stopped("interrupted (Ctrl-C)", runner), file=sys.stderr)
        return 128 + signal.SIGINT
    except (StageFailed, ControlError, RunInUse) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, ImportError) as error:  # e.g. a model package that is not installed
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.filename is None:
            raise
        print(f"error: {_run_file_error(error)}", file=sys.stderr)
        return 2
    if not args.dry_run and not runner.follower:
        _print_summary(runner, outcomes)
    return 0


def _run_file_error(error: OSError) -> str:
    """What a file the runner could not read or write in the run directory means (a full disk, a directory or an
    unreadable file where one of its files goes), and the fix; stages already complete are kept."""
    where = error.filename2 or error.filename  # a rename: the target is the run's file
    fix = ("free some space" if error.errno == errno.ENOSPC else
           f"move aside what stands at {where}, or fix its permissions")
    return (f"{where}: {error.strerror} (while the run read or wrote its run directory); {fix}, then run the same "
            "command again (complete stages are kept)")


def _print_summary(runner, outcomes) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run '{runner.recipe.name}' in {runner.run_dir}")
    for column in ("stage", "action", "seconds", "why"):
        table.add_column(column)
    for o in outcomes:
        table.add_row(o.name, o.action, f"{o.seconds:.1f}", o.reason)
    console = Console()
    console.print(table)
    board = runner.run_dir / "leaderboard.md"
    if board.is_file():
        print(board.read_text())


@_file_errors_in_one_line
def _cmd_eval(args) -> int:
    from alignpipe.evaluation.leaderboard import LEADERBOARD_FILES
    from alignpipe.evaluation.standalone import evaluate_paths, evaluate_suite

    given = {key: value for key in SYNTHETIC_EVAL if (value := getattr(args, key)) is not None}
    if args.suite and given:
        options = ", ".join(f"--{key.replace('_', '-')}" for key in given)
        print(f"error: {options} set the synthetic prompts used without --suite; suite {args.suite!r} pins its own "
              "prompts and sampling. Drop them, or edit a copy of the suite file and pass its path to --suite",
              file=sys.stderr)
        return 2
    if args.judge and not args.suite:
        print(f"error: --judge {args.judge}: without --suite the synthetic prompts are judged by their gold reward, "
              "and no judge model is read; drop --judge, or pass --suite with a suite judged by a reward model "
              "(e.g. alpaca-eval, hh-harmless)", file=sys.stderr)
        return 2
    if _not_a_file(args.out, "--out") or _not_a_file(args.cache_dir, "--cache-dir"):
        return 2
    from alignpipe.pipeline.rundir import RUN_FILE

    if args.out is not None and (args.out / RUN_FILE).is_file():
        print(f"error: --out {args.out} is a run directory: its leaderboard is its eval stage's record of the run, "
              "which this would overwrite (and the next run would evaluate again); pass another directory (default: "
              "eval-out/<run>)", file=sys.stderr)
        return 2
    try:
        if args.suite:
            json_path, md_path = evaluate_suite(args.checkpoints, suite=args.suite, reference=args.reference,
                                                judge=args.judge, out=args.out, cache_dir=args.cache_dir)
            print(md_path.read_text())
            print(f"wrote {', '.join(LEADERBOARD_FILES)} to {json_path.parent}")
            return 0
        json_path, md_path = evaluate_paths(args.checkpoints, reference=args.reference, out=args.out,
                                            cache_dir=args.cache_dir, **{**SYNTHETIC_EVAL, **given})
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(md_path.read_text())
    print(f"wrote {', '.join(LEADERBOARD_FILES)} to {json_path.parent}")
    return 0


@_file_errors_in_one_line
def _cmd_leaderboard(args) -> int:
    from alignpipe.evaluation.leaderboard import LEADERBOARD_PLOTS, merge_leaderboards, write_leaderboard

    paths = [p / "leaderboard.json" if p.is_dir() else p for p in args.sources]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"error: no leaderboard at {', '.join(missing)} (run the recipe's eval stage or `alignpipe eval` first)",
              file=sys.stderr)
        return 2
    if _not_a_file(args.out, "--out"):
        return 2
    # never a source's directory: a run's leaderboard is its eval stage's record of the run
    if any(args.out.resolve() == p.resolve().parent for p in paths):
        print(f"error: --out {args.out} holds one of the leaderboards being merged (a run's leaderboard is its eval "
              "stage's record of the run); pass another directory (default: leaderboard-merged)", file=sys.stderr)
        return 2
    plots = None
    earlier_merge = _holds_a_merge(args.out)  # only then can plots in --out be an earlier merge's
    try:
        board = merge_leaderboards(paths)
        if args.plots:  # drawn before anything is written; matplotlib is imported only when plots are asked for
            from alignpipe.evaluation.report_plots import leaderboard_plots

            plots = leaderboard_plots(board)
            for note in plots.notes:
                log.warning("%s", note)
        # tables and plots replace the old ones together: never new tables beside plots of other rows
        _, md_path = write_leaderboard(board, args.out, drawn=plots.pngs if plots else None)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(md_path.read_text())
    for name in plots.pngs if plots else ():
        log.info("wrote %s", args.out / name)
    if earlier_merge:  # a plot not drawn this time would show an earlier merge's rows beside this table
        for stale in (args.out / name for name in LEADERBOARD_PLOTS if not plots or name not in plots.pngs):
            if stale.is_file():
                stale.unlink()
                log.info("removed %s: an earlier merge drew it from other rows%s", stale,
                         "" if plots else " (pass --plots to draw it anew)")
    return 0


def _holds_a_merge(directory: Path) -> bool:
    """Whether ``directory`` holds a merged leaderboard (one that records its sources), i.e. a merge wrote there."""
    try:
        return isinstance(json.loads((directory / "leaderboard.json").read_text())["config"]["sources"], list)
    except (OSError, ValueError, KeyError, TypeError):
        return False


@_file_errors_in_one_line
def _cmd_report(args) -> int:
    from alignpipe.evaluation.report import write_report
    from alignpipe.pipeline.rundir import RUN_FILE

    if not any((args.run_dir / name).is_file() for name in (RUN_FILE, "leaderboard.json")):
        # any other directory got an empty report.html written into it
        print(f"error: {args.run_dir} is not a run directory (it has neither {RUN_FILE} nor leaderboard.json); pass "
              "runs/<recipe name> or an alignpipe eval --out directory", file=sys.stderr)
        return 2
    print(f"wrote {write_report(args.run_dir, kl_budget=args.kl_budget)}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but KEY=VALUE overrides may also come after options (``run R --force sft a.b=1``)."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    stray = [e for e in extras if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    handler = {"run": _cmd_run, "validate": _cmd_validate, "data": _cmd_data, "eval": _cmd_eval,
               "leaderboard": _cmd_leaderboard, "report": _cmd_report}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
