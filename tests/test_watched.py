"""A stage process the runner can stop: by a watch that raises, by Ctrl-C, and by SIGTERM (``kill <pid>``, a
scheduler stopping the job), whose Python default exits at once and orphaned the stage process."""

from __future__ import annotations

import json
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


def _stopping_signals_at_default() -> None:
    """A runner subprocess's signals as an interactive shell leaves them: the suite itself may run under nohup or as
    a background job (SIGHUP, SIGINT, SIGQUIT ignored), and an ignored signal stays ignored by design."""
    for signum in (signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)


def _runner_of(stage: str, pidfile: Path) -> tuple[subprocess.Popen, int]:
    """A runner in a process of its own (``run_watched`` of the Python code ``stage`` under ``sigterm_raises``) that
    exits with 128 + the signal that stopped it, and its stage process's pid once that has started."""
    script = ("import signal, sys\nfrom alignpipe.pipeline.watched import Terminated, run_watched, sigterm_raises\n"
              "try:\n    with sigterm_raises():\n"
              f"        run_watched([sys.executable, '-c', {stage!r}, {str(pidfile)!r}])\n"
              "except Terminated as error:\n    sys.exit(128 + getattr(error, 'signum', signal.SIGTERM))\n")
    runner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, preexec_fn=_stopping_signals_at_default)
    return runner, _pid_from(pidfile)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_a_stopping_signal_stops_the_stage_process_and_exits_with_128_plus_it(tmp_path, signum) -> None:
    """Without the handler the runner died at once and its stage process (in its own session: it gets no hangup from
    a closed terminal) trained on, holding its GPUs and port."""
    pidfile = tmp_path / "pid"
    runner, stage = _runner_of(SLEEPER, pidfile)
    try:
        runner.send_signal(signum)
        assert runner.wait(timeout=60) == 128 + signum
        assert not _alive(stage)
    finally:
        runner.kill()
        if _alive(stage):
            os.kill(stage, signal.SIGKILL)


def test_a_hangup_stops_the_run_and_its_records_say_interrupted(tiny_recipe_path, tmp_path) -> None:
    """SIGHUP (the terminal closed, ssh dropped) left the stage training and run.json saying ``running``."""
    pidfile, runs = tmp_path / "pid", tmp_path / "runs"
    script = ("import sys\nfrom alignpipe.cli import main\nfrom alignpipe.pipeline.runner import Runner\n"
              "spawn = Runner._spawn\n"
              "Runner._spawn = lambda self, command, env=None, **options: spawn(\n"
              f"    self, [sys.executable, '-c', {SLEEPER!r}, {str(pidfile)!r}], env, **options)\n"
              f"sys.exit(main(['run', {str(tiny_recipe_path)!r}, '--runs-dir', {str(runs)!r}]))\n")
    runner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_stopping_signals_at_default)
    stage = _pid_from(pidfile)
    try:
        runner.send_signal(signal.SIGHUP)
        assert runner.wait(timeout=60) == 128 + signal.SIGHUP
        assert "stopped: terminated (SIGHUP); stage 'sft' was stopped and marked interrupted" in runner.stderr.read()
        assert not _alive(stage)
        run = json.loads((runs / "tiny" / "run.json").read_text())
        assert (run["status"], run["stopped_at"]) == ("interrupted", "sft")
        assert json.loads((runs / "tiny" / "sft" / "manifest.json").read_text())["status"] == "interrupted"
    finally:
        runner.kill()
        if _alive(stage):
            os.kill(stage, signal.SIGKILL)


def test_the_previous_handlers_come_back_and_an_ignored_hangup_stays_ignored() -> None:
    """``nohup alignpipe run ...`` ignores SIGHUP so the run outlives its terminal: it must not stop on one."""
    from alignpipe.pipeline.watched import STOPPING_SIGNALS, sigterm_raises

    outer = {signum: signal.getsignal(signum) for signum in STOPPING_SIGNALS}  # the suite may run under nohup
    try:
        for signum in STOPPING_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        before = {signum: signal.getsignal(signum) for signum in STOPPING_SIGNALS}
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
            assert signal.getsignal(signal.SIGQUIT) is not before[signal.SIGQUIT]
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with sigterm_raises():
            assert signal.getsignal(signal.SIGHUP) is not before[signal.SIGHUP]
        assert {signum: signal.getsignal(signum) for signum in STOPPING_SIGNALS} == before
    finally:
        for signum, handler in outer.items():
            signal.signal(signum, handler)


# a stage worker that takes its time to stop: it notes the SIGTERM in its file and goes on (as one finishing a write)
STUBBORN = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: open(sys.argv[1], 'a').write(' SIGTERM'))\n"
            "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
            "time.sleep(120)\n")


def test_workers_in_sessions_of_their_own_are_signalled_and_killed_after_the_grace(tmp_path, monkeypatch) -> None:
    """torch elastic starts each worker in a new session: the launcher's group signal never reached it, and a worker
    that outlived the grace was left training, orphaned."""
    import alignpipe.pipeline.watched as watched

    monkeypatch.setattr(watched, "STOP_GRACE_S", 1.0)
    pidfile = tmp_path / "pid"
    launcher = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {STUBBORN!r}, sys.argv[1]], "
                "start_new_session=True).wait()")

    def watch() -> None:
        if pidfile.exists() and pidfile.read_text():
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run_watched([sys.executable, "-c", launcher, str(pidfile)], watch=watch)
    worker = int(pidfile.read_text().split()[0])
    try:
        assert pidfile.read_text() == f"{worker} SIGTERM"  # asked first
        assert not _running(worker)  # then killed
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_second_sigterm_while_the_stage_stops_kills_it_at_once(tmp_path) -> None:
    """The second signal ended the runner in the middle of the grace and the stage process was never killed."""
    pidfile = tmp_path / "pid"
    runner, stage = _runner_of(STUBBORN, pidfile)
    try:
        runner.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "SIGTERM" not in pidfile.read_text():  # the runner is in its grace
            assert time.monotonic() < deadline, "the stage never got the first SIGTERM"
            time.sleep(0.05)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=20) == 128 + signal.SIGTERM
        assert not _running(stage)
    finally:
        runner.kill()
        if _running(stage):
            os.kill(stage, signal.SIGKILL)


@pytest.mark.parametrize("second", [signal.SIGHUP, signal.SIGINT])
def test_two_signals_at_once_still_stop_the_stage(tmp_path, second) -> None:
    """systemd sends SIGHUP right after SIGTERM: the second raised again at the start of stop(), before any signal
    was sent, and the run said the stage was stopped while it trained on."""
    pidfile = tmp_path / "pid"
    runner, stage = _runner_of(STUBBORN, pidfile)
    try:
        runner.send_signal(signal.SIGTERM)
        runner.send_signal(second)
        assert runner.wait(timeout=20) in (128 + signal.SIGTERM, 128 + second, -second)  # whichever is handled first
        assert not _running(stage)
    finally:
        runner.kill()
        if _running(stage):
            os.kill(stage, signal.SIGKILL)


def test_workers_a_dying_launcher_leaves_behind_are_stopped(tmp_path) -> None:
    """A launcher killed on its own (the OOM killer) left its workers, in sessions of their own, training into the
    stage directory while the run reported the stage failed."""
    pidfile = tmp_path / "pid"
    launcher = (f"import os, signal, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {SLEEPER!r}, "
                "sys.argv[1]], start_new_session=True)\n"
                "while not (os.path.exists(sys.argv[1]) and open(sys.argv[1]).read()): time.sleep(0.05)\n"
                "time.sleep(2.5)\nos.kill(os.getpid(), signal.SIGKILL)")
    returncode = run_watched([sys.executable, "-c", launcher, str(pidfile)])
    worker = int(pidfile.read_text())
    try:
        assert returncode == -signal.SIGKILL
        assert not _running(worker)
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)


# a stage process that watches its supervisor as pipelines/<type>.py does, polling often so the test is quick
WATCHER = ("import os, signal, sys, time\nfrom alignpipe.pipeline.watched import stop_with_supervisor\n"
           "if len(sys.argv) > 2:  # slow to stop: notes the SIGTERM and goes on\n"
           "    signal.signal(signal.SIGTERM, lambda *a: open(sys.argv[1], 'a').write(' SIGTERM'))\n"
           "stop_with_supervisor(poll_s=0.05, grace_s=1.0)\n"
           "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
           "time.sleep(120)\n")


def _gone_within(pids: dict[int, str] | int, seconds: float) -> bool:
    from alignpipe.pipeline.watched import _running as running

    watched = pids if isinstance(pids, dict) else {pids: Path(f"/proc/{pids}/stat").read_text().rsplit(")", 1)[1]
                                                   .split()[19]}
    deadline = time.monotonic() + seconds
    while running(watched) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(watched)


@pytest.mark.parametrize("stubborn", [False, True], ids=["stops-on-sigterm", "killed-after-the-grace"])
def test_a_stage_process_whose_runner_was_killed_stops_itself(tmp_path, stubborn) -> None:
    """SIGKILL runs no clean-up in the runner, and the stage process, in a session of its own, trained on: it held
    the run directory and its GPUs, and published a stage no runner carried on from."""
    pidfile = tmp_path / "pid"
    arguments = [str(pidfile), *(["stubborn"] if stubborn else [])]
    script = (f"import sys\nfrom alignpipe.pipeline.watched import run_watched\n"
              f"run_watched([sys.executable, '-c', {WATCHER!r}, *{arguments!r}])")
    runner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    stage = _pid_from(pidfile)
    try:
        time.sleep(0.3)  # the stage keeps running while its runner lives
        assert _running(stage)
        runner.kill()
        runner.wait()
        assert _gone_within(stage, 10)
        assert pidfile.read_text() == (f"{stage} SIGTERM" if stubborn else str(stage))  # asked first, then killed
    finally:
        if _running(stage):
            os.kill(stage, signal.SIGKILL)


def test_the_supervisor_is_told_apart_from_a_process_given_its_pid_later() -> None:
    from alignpipe.pipeline.watched import SUPERVISOR_VARIABLE, stop_with_supervisor, supervisor_gone, supervisor_token

    assert not supervisor_gone(supervisor_token(os.getpid()))
    pid, _, started = supervisor_token(os.getpid()).partition(":")
    assert supervisor_gone(f"{pid}:{int(started) + 1}")  # the same pid, started at another time
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    token = supervisor_token(finished.pid)
    finished.wait()
    assert supervisor_gone(token)
    assert stop_with_supervisor({}) is None  # started by hand: nothing to watch
    assert stop_with_supervisor({SUPERVISOR_VARIABLE: supervisor_token(os.getpid())}) is None  # itself
    assert stop_with_supervisor({SUPERVISOR_VARIABLE: "x:1"}) is None


def test_a_real_stage_stops_when_its_runner_is_killed_and_frees_the_run(tmp_path) -> None:
    """The whole path: ``alignpipe run`` launches pipelines/sft.py through accelerate; the runner alone is killed."""
    import yaml
    from conftest import TINY_RECIPE, write_recipe

    from alignpipe.pipeline.run_lock import run_in_use
    from alignpipe.pipeline.watched import _descendants

    sft = {**TINY_RECIPE["stages"][0], "max_steps": 5000, "save_steps": 5000, "logging_steps": 1}
    recipe = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft]})
    runs = tmp_path / "runs"
    metrics = runs / "tiny" / "sft" / "metrics.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with (tmp_path / "run.log").open("w") as log:
        runner = subprocess.Popen([sys.executable, "-m", "alignpipe.cli", "run", str(recipe), "--runs-dir", str(runs)],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    tree: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert runner.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sft stage never logged a step"
            time.sleep(0.1)
        tree = _descendants(runner.pid)
        assert tree  # the stage's launcher and its worker
        runner.kill()
        runner.wait()
        assert _gone_within(tree, 20), (tmp_path / "run.log").read_text()[-3000:]
        assert run_in_use(runs / "tiny") is None  # a new run may start
        manifest = yaml.safe_load((runs / "tiny" / "sft" / "manifest.json").read_text())
        assert manifest["status"] == "running"  # as a lost machine leaves it: the next run resumes it
        assert "the run that started this stage" in (tmp_path / "run.log").read_text()
    finally:
        runner.kill()
        for pid in tree:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
