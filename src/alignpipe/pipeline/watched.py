"""A stage process that the runner can stop while it runs.

Why: a stage that spans several nodes waits in torch's rendezvous (or a collective) for a node that has gone, for
up to the rendezvous or collective timeout (half an hour for NCCL). The node that runs the stage watches the control
channel meanwhile, and stops the process as soon as the run cannot go on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

WATCH_S = 1.0  # how often ``watch`` is called while the process runs (a store round trip: well under a millisecond)
STOP_GRACE_S = 30.0  # how long a SIGTERM'ed launcher gets to stop its workers before it is killed


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


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, each of ``STOPPING_SIGNALS`` raises :class:`Terminated` in the main thread (the only one that
    can set it). One that is ignored stays ignored: ``nohup`` ignores SIGHUP so that the run outlives its terminal."""
    def raise_terminated(signum, frame):
        raise Terminated(signum)

    previous = {signum: signal.signal(signum, raise_terminated) for signum in STOPPING_SIGNALS
                if signal.getsignal(signum) != signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_watched(command: list[str], env: dict[str, str] | None = None, *,
                watch: Callable[[], None] | None = None, pass_fds: tuple[int, ...] = (),
                started: Callable[[int], None] | None = None) -> int:
    """Run ``command`` to its end and return its exit status. Every ``WATCH_S`` seconds ``watch`` may raise to stop
    it; on any exception (Ctrl-C too) the process is stopped before the exception goes on. ``pass_fds``: descriptors
    the process inherits (the run directory's lock); ``started`` is told its pid."""
    # its own process group, which stop() signals whole: a launcher that waits on its worker without passing
    # SIGTERM on (``accelerate launch`` with one process) died and left the worker training on
    process = subprocess.Popen(command, env=env, start_new_session=True, pass_fds=pass_fds)
    try:
        if started is not None:
            started(process.pid)
        while True:
            try:
                return process.wait(timeout=WATCH_S)
            except subprocess.TimeoutExpired:
                if watch is not None:
                    watch()
    except BaseException:
        stop(process)
        raise


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process's whole group (the launcher and its workers), then SIGKILL to whatever of it is left
    after a grace: stopped means no stage process is left to write into the run."""
    group = process.pid  # start_new_session: the process leads its own group
    _signal_group(group, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_GRACE_S)  # a launcher that passes SIGTERM on returns once its workers have
    _signal_group(group, signal.SIGKILL)  # one that did not (or ran out of time) left workers behind
    process.wait()


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # none of the group is left
        os.killpg(group, signum)
