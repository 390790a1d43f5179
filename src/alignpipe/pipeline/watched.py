"""A stage process that the runner can stop while it runs, and that stops by itself when its runner has gone.

Why: a stage that spans several nodes waits in torch's rendezvous (or a collective) for a node that has gone, for
up to the rendezvous or collective timeout (half an hour for NCCL). The node that runs the stage watches the control
channel meanwhile, and stops the process as soon as the run cannot go on.

The other way round: a runner killed with SIGKILL (``kill -9``, the OOM killer) runs no clean-up, and the stage,
in a session of its own, trained on: it held the run directory (a new run was refused as "in use"), its GPUs and
its port, and published a stage no runner would carry on from. Each stage process therefore watches the runner
that started it (:func:`stop_with_supervisor`) and ends itself once that is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

WATCH_S = 1.0  # how often ``watch`` is called while the process runs (a store round trip: well under a millisecond)
STOP_GRACE_S = 30.0  # how long a SIGTERM'ed launcher and its workers get to stop before they are killed
KILLED_S = 5.0  # how long stop() waits for SIGKILL'ed workers to be gone
POLL_S = 0.1  # how often stop() looks whether the workers are gone
# "<pid>:<start time>" of the process that runs a stage and watches it (run_watched's), in the stage's environment
SUPERVISOR_VARIABLE = "ALIGNPIPE_SUPERVISOR"

log = logging.getLogger("alignpipe")


# Signals whose default ends the runner at once, running no ``except`` or ``finally``: a scheduler's or ``kill``'s
# SIGTERM, SIGHUP from a closed terminal or a dropped ssh session, SIGQUIT (Ctrl-\). The stage process runs in its own
# session, so it gets none of them: the runner must stop it.
STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Terminated(KeyboardInterrupt):
    """One of ``STOPPING_SIGNALS``, raised like Ctrl-C so the same clean-up runs: Python's default exits at once,
    which orphaned the stage process (it kept training, holding its GPUs and port), told no other node and left the
    run's records saying ``running``."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Set by a stopping signal or Ctrl-C that comes while a stage is being stopped: the grace is cut short.
_hurry = threading.Event()
HURRY_SIGNALS = (*STOPPING_SIGNALS, signal.SIGINT)


def _note_hurry(signum, frame) -> None:
    _hurry.set()


def _handle_with(handler, signals=HURRY_SIGNALS) -> dict[int, object]:
    """Install ``handler`` for each of ``signals`` that is not ignored (main thread only); the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in signals if signal.getsignal(signum) != signal.SIG_IGN}


def _restore(previous: dict[int, object]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, each of ``STOPPING_SIGNALS`` raises :class:`Terminated` in the main thread (the only one that
    can set it), and Ctrl-C ``KeyboardInterrupt`` as usual. One that is ignored stays ignored: ``nohup`` ignores
    SIGHUP so that the run outlives its terminal.

    The first one also turns every later one (Ctrl-C too) into a request to hurry: a second signal (systemd sends
    SIGHUP right after SIGTERM) raising again inside :func:`stop` skipped its signals and left the stage training."""
    def raise_terminated(signum, frame):
        _handle_with(_note_hurry)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    _hurry.clear()
    previous = {signum: signal.getsignal(signum) for signum in HURRY_SIGNALS}
    _handle_with(raise_terminated)
    try:
        yield
    finally:
        _restore({signum: handler for signum, handler in previous.items() if handler is not None})


def run_watched(command: list[str], env: dict[str, str] | None = None, *,
                watch: Callable[[], None] | None = None, pass_fds: tuple[int, ...] = (),
                started: Callable[[int], None] | None = None) -> int:
    """Run ``command`` to its end and return its exit status. Every ``WATCH_S`` seconds ``watch`` may raise to stop
    it; on any exception (Ctrl-C too) the process is stopped before the exception goes on. ``pass_fds``: descriptors
    the process inherits (the run directory's lock); ``started`` is told its pid."""
    # its own process group, which stop() signals whole: a launcher that waits on its worker without passing
    # SIGTERM on (``accelerate launch`` with one process) died and left the worker training on
    env = {**(os.environ if env is None else env), SUPERVISOR_VARIABLE: supervisor_token(os.getpid())}
    process = subprocess.Popen(command, env=env, start_new_session=True, pass_fds=pass_fds)
    seen: dict[int, str] = {}  # its descendants so far: a launcher that dies (OOM-killed) orphans its workers
    try:
        if started is not None:
            started(process.pid)
        while True:
            try:
                returncode = process.wait(timeout=WATCH_S)
            except subprocess.TimeoutExpired:
                seen.update(_descendants(process.pid))
                if watch is not None:
                    watch()
                continue
            if _running(seen):  # workers left training by a launcher that ended: nothing may write on
                stop(process, seen)
            return returncode
    except BaseException:
        stop(process, seen)
        raise


def stop(process: subprocess.Popen, known: dict[int, str] | None = None) -> None:
    """SIGTERM to the process's group and to each of its descendants (the launcher and its workers), then SIGKILL to
    whatever of them is left after a grace: stopped means no stage process is left to write into the run.

    The descendants are found through ``/proc`` before any signal: torch elastic (``accelerate launch`` with several
    processes) starts each worker in a session of its own, which the launcher's group signal never reaches, and once
    the launcher has ended its workers are no longer its children (``known``: those seen while it ran). While it
    stops them, a stopping signal or Ctrl-C cuts the grace short instead of raising, so the SIGKILLs are always sent."""
    group = process.pid  # start_new_session: the process leads its own group
    previous = _handle_with(_note_hurry)  # a signal now shortens the grace; raising here would skip the SIGKILLs
    try:
        tree = {**(known or {}), **_descendants(group)}
        _signal_group(group, signal.SIGTERM)
        _signal_each(tree, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while (process.poll() is None or _running(tree)) and time.monotonic() < deadline and not _hurry.is_set():
            time.sleep(POLL_S)  # a launcher that passes SIGTERM on returns once its workers have
        _signal_group(group, signal.SIGKILL)  # a launcher that did not pass it on (or ran out of time) left workers
        _signal_each(tree, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + KILLED_S
        while _running(tree) and time.monotonic() < deadline:  # not our children: they cannot be waited for
            time.sleep(POLL_S)
    finally:
        _restore(previous)
        _hurry.clear()


def supervisor_token(pid: int) -> str:
    """``pid`` with its start time, so that another process given the same pid later is not taken for it."""
    fields = _stat(pid)
    return f"{pid}:{fields[19] if fields is not None else ''}"


def supervisor_gone(token: str) -> bool:
    """Whether the process ``token`` names has ended (a zombie has: it no longer runs). Without ``/proc`` (no start
    time recorded) only the pid is looked at."""
    pid, _, started = token.partition(":")
    if started:
        return not _running({int(pid): started})
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user holds the pid: ours has gone
        return True
    return False


def stop_with_supervisor(environ: dict[str, str] | None = None, *, poll_s: float = WATCH_S,
                         grace_s: float = STOP_GRACE_S) -> threading.Thread | None:
    """Watch, in a daemon thread, the process that started this one (``SUPERVISOR_VARIABLE``, set by
    :func:`run_watched`); once it has gone, SIGTERM this process, as the runner's :func:`stop` would, and SIGKILL it
    if it is still there ``grace_s`` later. The stage's records stay ``running``: the next run finds an interrupted
    stage and resumes it under ``--resume``. Nothing is watched without the variable (a stage started by hand or in
    a test's process); the thread, else None."""
    token = (os.environ if environ is None else environ).get(SUPERVISOR_VARIABLE, "")
    pid = token.partition(":")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return None

    def watch() -> None:
        while not supervisor_gone(token):
            time.sleep(poll_s)
        log.error("the run that started this stage (pid %s) has ended without stopping it: stopping this process "
                  "(%d); `alignpipe run ... --resume` carries the stage on", pid, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)  # a SIGTERM handler that did not end the process
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="alignpipe-supervisor-watch", daemon=True)
    thread.start()
    return thread


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # none of the group is left
        os.killpg(group, signum)


def _signal_each(processes: dict[int, str], signum: int) -> None:
    """Signal each of ``processes`` (pid -> start time) that is still the process it was (a pid can be reused)."""
    for pid in _running(processes):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...); None when there is no such
    process (or no ``/proc``)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(root: int) -> dict[int, str]:
    """Every process below ``root`` (pid -> start time), by their parent links in ``/proc``."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else ():
        if (fields := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = (int(fields[1]), fields[19])  # ppid; field 22 of proc(5), the start time
    found: dict[int, str] = {}
    below = {root}
    while below:
        below = {pid for pid, (parent, _) in parents.items() if parent in below and pid not in found}
        found.update({pid: parents[pid][1] for pid in below})
    return found


def _running(processes: dict[int, str]) -> list[int]:
    """Those of ``processes`` still alive and not zombies (a zombie no longer runs; an orphan's may linger)."""
    return [pid for pid, started in processes.items()
            if (fields := _stat(pid)) is not None and fields[19] == started and fields[0] != "Z"]
