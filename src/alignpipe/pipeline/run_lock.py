"""One writer per run directory: a run holds ``runs/<run>/.lock`` (an ``flock``) for as long as it writes there.

Why: two ``alignpipe run`` of one recipe into one ``runs/`` (a second terminal, a scheduler retrying a job that is
still alive) both decide that a stage must run, train into the same stage directory and overwrite each other's
manifest and checkpoints; the one that ends last "completes" a stage the other half-wrote. The kernel releases an
``flock`` when the last process holding it ends, however it ends (SIGKILL and out-of-memory kills included), so a
lock is never left stale. The stage processes inherit it (``pass_fds``): a stage left running by a runner killed
with SIGKILL still holds the directory. Only node 0 takes it; the other nodes of a multi-node run write nothing in
``runs/`` (see ``pipeline.runner``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from alignpipe.pipeline.rundir import utc_now

log = logging.getLogger("alignpipe")

LOCK_FILE = ".lock"
# filesystems that have no flock (some parallel filesystems unless mounted with it): run unlocked, with a warning
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunInUse(RuntimeError):
    """Another process holds the run directory's lock."""


class RunLock:
    """The held lock of one run directory; ``fd`` is what stage processes inherit to hold it with the runner
    (None where the filesystem has no locks)."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self.fd = fd
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}
        if fd is not None:
            _write_holder(fd, self.holder)

    def note_stage(self, stage: str, pid: int) -> None:
        """Record the running stage's process in the lock file, for the message another run gets."""
        if self.fd is not None:
            _write_holder(self.fd, {**self.holder, "stage": stage, "stage_pid": pid})

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[RunLock]:
    """Hold ``run_dir``'s lock for the block, or raise :class:`RunInUse` at once (never wait: the other run may
    take hours) naming the process that holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(_in_use_message(run_dir, path)) from None
        except OSError as error:
            if error.errno not in _NO_LOCKS:
                raise
            log.warning("the filesystem of %s has no file locks (%s): nothing stops a second run from writing into "
                        "it while this one runs", run_dir, error.strerror)
            os.close(fd)
            fd = None
            yield RunLock(path, None)
            return
        yield RunLock(path, fd)
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock unless a stage process still holds an inherited copy


def _write_holder(fd: int, holder: dict) -> None:
    """Best effort: the lock is the flock, the contents only describe its holder."""
    data = (json.dumps(holder) + "\n").encode()
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)


def _in_use_message(run_dir: Path, path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        holder = {}
    if not isinstance(holder, dict):
        holder = {}
    who = f"process {holder['pid']}" if "pid" in holder else "another process"
    if "host" in holder:
        who += f" on {holder['host']}"
    if "since" in holder:
        who += f" (since {holder['since']})"
    if "stage_pid" in holder:
        who += f"; its stage '{holder.get('stage')}' runs as process {holder['stage_pid']}"
    return (f"run directory {run_dir} is in use by {who}. Two runs writing into one directory would overwrite each "
            "other's stages: wait for that run to end or stop it, or give this one another --runs-dir "
            "(or another recipe name).")
