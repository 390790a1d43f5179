"""One writer per run directory: a second run is refused at once, naming the first; a stage process holds the lock
with its runner, so a stage that outlives a killed runner still keeps other runs out; no lock is ever left stale."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignpipe.cli import main
from alignpipe.pipeline import run_lock as run_lock_module
from alignpipe.pipeline.run_lock import LOCK_FILE, RunInUse, run_lock
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
        with pytest.raises(RunInUse, match=rf"its stage 'sft' runs as process {stage.pid}"):
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
    with run_lock(runs / "tiny"):  # the stopped run let go
        pass


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock_module.fcntl, "flock", no_locks)
    with run_lock(tmp_path / "run") as lock:
        assert lock.pass_fds == ()
        lock.note_stage("sft", 1)  # nothing to note it in
    assert "has no file locks (No locks available)" in caplog.text
