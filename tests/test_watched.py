"""A stage process the runner can stop: by a watch that raises, by Ctrl-C, and by SIGTERM (``kill <pid>``, a
scheduler stopping the job), whose Python default exits at once and orphaned the stage process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from alignpipe.pipeline.watched import run_watched

SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"


def _pid_from(path: Path, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, "the stage process never started"
        time.sleep(0.05)
    return int(path.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_watch_that_raises_stops_the_process(tmp_path) -> None:
    looks = []

    def watch() -> None:
        looks.append(time.monotonic())
        if len(looks) == 2:
            raise RuntimeError("node 1 stopped")

    pidfile = tmp_path / "pid"
    with pytest.raises(RuntimeError, match="node 1 stopped"):
        run_watched([sys.executable, "-c", SLEEPER, str(pidfile)], watch=watch)
    assert not _alive(_pid_from(pidfile))


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers where the container's first process reaps nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_launcher_that_does_not_pass_sigterm_on_leaves_no_worker_behind(tmp_path) -> None:
    """One-process ``accelerate launch`` waits on its worker and dies of SIGTERM without passing it on: the worker
    trained on while the run said it was stopped. The whole process group is stopped now."""
    pidfile = tmp_path / "pid"
    launcher = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, sys.argv[1]]).wait()"

    def watch() -> None:
        if pidfile.exists() and pidfile.read_text():
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run_watched([sys.executable, "-c", launcher, str(pidfile)], watch=watch)
    worker = _pid_from(pidfile)
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(worker)


def test_the_exit_status_of_a_process_left_alone() -> None:
    assert run_watched([sys.executable, "-c", "raise SystemExit(3)"], watch=lambda: None) == 3


def test_sigterm_stops_the_stage_process_and_exits_with_143(tmp_path) -> None:
    """Without the handler the runner died at once and its stage process trained on, holding its GPUs and port."""
    pidfile = tmp_path / "pid"
    script = ("import sys\nfrom alignpipe.pipeline.watched import Terminated, run_watched, sigterm_raises\n"
              "try:\n    with sigterm_raises():\n"
              f"        run_watched([sys.executable, '-c', {SLEEPER!r}, {str(pidfile)!r}])\n"
              "except Terminated:\n    sys.exit(143)\n")
    runner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    stage = _pid_from(pidfile)
    try:
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 143
        assert not _alive(stage)
    finally:
        runner.kill()
        if _alive(stage):
            os.kill(stage, signal.SIGKILL)


def test_the_previous_sigterm_handler_comes_back() -> None:
    from alignpipe.pipeline.watched import sigterm_raises

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_raises():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
