"""One writer per run directory: a second run is refused at once, naming the first; a stage process holds the lock
with its runner, so a stage that outlives a killed runner still keeps other runs out; no lock is ever left stale."""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignpipe.cli import main
from alignpipe.pipeline import run_lock as run_lock_module
from alignpipe.pipeline.run_lock import LOCK_FILE, RunInUse, run_in_use, run_lock
from alignpipe.pipeline.runner import RUN_FILE, Runner
from alignpipe.recipe import load_recipe

HOLDER = """
import sys, time
from pathlib import Path
from alignpipe.pipeline.run_lock import run_lock
with run_lock(Path(sys.argv[1])):
    Path(sys.argv[2]).write_text("held")
    time.sleep(120)
"""


def _hold_in_another_process(run_dir: Path, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert holder.poll() is None, "the holding process died"
        assert time.monotonic() < deadline, "the holding process never took the lock"
        time.sleep(0.05)
    return holder


def test_a_second_run_is_refused_at_once_naming_the_first_and_writes_nothing(tiny_recipe_path, tmp_path) -> None:
    runs = tmp_path / "runs"
    run_dir = runs / "tiny"
    holder = _hold_in_another_process(run_dir, tmp_path)
    try:
        runner = Runner(load_recipe(tiny_recipe_path), runs_dir=runs, recipe_path=tiny_recipe_path, in_process=True)
        started = time.monotonic()
        with pytest.raises(RunInUse, match=rf"run directory {run_dir} is in use by process {holder.pid} on "):
            runner.run()
        assert time.monotonic() - started < 30  # refused, not waited for
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # no run record, no stage directory
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: nothing stale is left to clear by hand
    with run_lock(run_dir) as lock:
        assert json.loads(lock.path.read_text())["pid"] != holder.pid


def test_alignpipe_run_into_a_directory_in_use_is_a_one_line_error_with_exit_code_1(tiny_recipe_path, tmp_path,
                                                                                   capsys) -> None:
    runs = tmp_path / "runs"
    holder = _hold_in_another_process(runs / "tiny", tmp_path)
    try:
        assert main(["run", str(tiny_recipe_path), "--runs-dir", str(runs), "--in-process"]) == 1
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: run directory {runs / 'tiny'} is in use by process {holder.pid}")
    assert "another --runs-dir" in err[-1]


def test_the_lock_is_released_when_the_run_ends_so_the_next_run_goes_on(tmp_path) -> None:
    run_dir = tmp_path / "runs" / "tiny"
    with run_lock(run_dir):
        with pytest.raises(RunInUse):  # a second holder in this process too: flock locks an open file, not a pid
            with run_lock(run_dir):
                pass
    with run_lock(run_dir):
        pass
    with pytest.raises(ZeroDivisionError):
        with run_lock(run_dir):
            raise ZeroDivisionError
    with run_lock(run_dir):  # released by a run that failed as well
        pass


def test_a_stage_process_holds_the_lock_after_its_runner_let_go(tmp_path) -> None:
    """What a runner killed with SIGKILL leaves: its stage process, still training, keeps other runs out (and the
    message names it) until it ends."""
    run_dir = tmp_path / "runs" / "tiny"
    with run_lock(run_dir) as lock:
        stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=lock.pass_fds)
        lock.note_stage("sft", stage.pid)
    try:
        with pytest.raises(RunInUse, match=rf"its stage 'sft' runs as process group {stage.pid} "):
            with run_lock(run_dir):
                pass
    finally:
        stage.kill()
        stage.wait()
    with run_lock(run_dir):
        pass


def test_the_runner_passes_its_lock_to_the_stage_process(tiny_recipe_path, tmp_path, monkeypatch) -> None:
    """The stage command (here a probe in its place) inherits the runner's open lock file."""
    probe = ("import os, sys\n"
             "links = []\n"
             "for fd in os.listdir('/proc/self/fd'):\n"
             "    try:\n"
             "        links.append(os.readlink(f'/proc/self/fd/{fd}'))\n"
             "    except OSError:\n"
             "        pass  # listdir's own descriptor, closed by now\n"
             "open(sys.argv[1], 'w').write('\\n'.join(links))\n")
    seen = tmp_path / "fds.txt"
    spawn = Runner._spawn

    def probe_then_stop(self, command, env=None, **options) -> int:
        spawn(self, [sys.executable, "-c", probe, str(seen)], env, **options)
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "_spawn", probe_then_stop)
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        Runner(load_recipe(tiny_recipe_path), runs_dir=runs, recipe_path=tiny_recipe_path).run()
    assert str((runs / "tiny" / LOCK_FILE).resolve()) in seen.read_text().splitlines()
    assert (runs / "tiny" / RUN_FILE).exists()
    assert "stage" not in json.loads((runs / "tiny" / LOCK_FILE).read_text())  # its process has ended
    with run_lock(runs / "tiny"):  # the stopped run let go
        pass


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock_module.fcntl, "flock", no_locks)
    with run_lock(tmp_path / "run") as lock:
        assert lock.pass_fds == ()
        lock.note_stage("sft", 1)  # nothing to note it in
    assert "has no file locks" in caplog.text
    with pytest.raises(ZeroDivisionError) as raised:  # the run's own errors say nothing of the missing locks
        with run_lock(tmp_path / "run"):
            raise ZeroDivisionError
    assert raised.value.__context__ is None
    assert run_in_use(tmp_path / "run") is None


def test_a_dry_run_says_the_run_would_be_refused_and_takes_nothing(tiny_recipe_path, tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    holder = _hold_in_another_process(runs / "tiny", tmp_path)
    try:
        Runner(load_recipe(tiny_recipe_path), runs_dir=runs, dry_run=True).run()
        assert f"[dry-run] note: this run would be refused now: run directory {runs / 'tiny'} is in use by process " \
               f"{holder.pid}" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert run_in_use(runs / "tiny") is None
    Runner(load_recipe(tiny_recipe_path), runs_dir=runs, dry_run=True).run()
    assert "note:" not in capsys.readouterr().out


def test_a_stage_worker_left_by_a_killed_runner_and_launcher_keeps_the_directory(tmp_path) -> None:
    """The real stage command: `accelerate launch` starts the worker with the launcher's descriptors closed, so the
    worker holds the lock itself. SIGKILL the runner and the launcher (not the group): the worker trains on, and a
    new run is refused, told the runner has ended, until the worker is stopped."""
    import os
    import signal

    from conftest import TINY_RECIPE, write_recipe

    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [{**TINY_RECIPE["stages"][0], "max_steps": 100_000,
                                                                "save_steps": 100_000}]})
    runs = tmp_path / "runs"
    run_dir = runs / "tiny"
    runner = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "run", str(recipe), "--runs-dir", str(runs)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = run_dir / "sft" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while not (metrics.exists() and metrics.read_text().strip()):  # the worker trains
            assert runner.poll() is None, "the run ended before its stage trained"
            assert time.monotonic() < deadline, "the stage never logged"
            time.sleep(0.5)
        launcher = json.loads((run_dir / LOCK_FILE).read_text())["stage_pid"]
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        os.kill(launcher, signal.SIGKILL)
        while _running(launcher):  # its descriptors close when it exits
            time.sleep(0.05)
        with pytest.raises(RunInUse, match=rf"whose runner \(process {runner.pid}, since .*\) has ended without "
                                           rf"stopping it: find it with `fuser -v {run_dir / LOCK_FILE}`"):
            with run_lock(run_dir):
                pass
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(runner.pid, signal.SIGKILL)  # the runner's session: its own processes
        with contextlib.suppress(ProcessLookupError, NameError):
            os.killpg(launcher, signal.SIGKILL)  # the stage's group: the worker
    deadline = time.monotonic() + 60
    while run_in_use(run_dir) is not None:
        assert time.monotonic() < deadline, "the worker kept the lock after it was killed"
        time.sleep(0.2)


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, exited but not yet reaped, holds no descriptors)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status
