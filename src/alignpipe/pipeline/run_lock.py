"""One run per run directory: ``runs/<run>/.lock`` is ``flock``-ed by the run and by every process of its stages.

Why: two ``alignpipe run`` of one recipe into one ``runs/`` (a second terminal, a scheduler retrying a job that is
still alive) both decide that a stage must run, train into the same stage directory and overwrite each other's
manifest and checkpoints; the one that ends last "completes" a stage the other half-wrote.

How: a run takes the lock exclusively (so it is alone), then holds it shared; each stage process (every rank: the
worker that writes, not only the ``accelerate launch`` in front of it, which closes inherited descriptors when it
starts its workers) takes it shared too, and the launcher inherits the run's own (``pass_fds``) so that the
directory stays held while a worker starts. A new run's exclusive try fails while any of them lives: a stage left
training by a runner killed with SIGKILL keeps the directory, as it should. The kernel drops an ``flock`` when the
last process holding it ends, however it ends (SIGKILL and out-of-memory kills too), so a lock is never left stale.
Only node 0 of a multi-node run takes the run's lock; the other nodes write nothing in ``runs/`` (see
``pipeline.runner``), though their stage processes hold it shared like node 0's.
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
from alignpipe.processes import process_exists

log = logging.getLogger("alignpipe")

LOCK_FILE = ".lock"
# filesystems that have no flock (some parallel filesystems unless mounted with it): run unlocked, with a warning
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class RunInUse(RuntimeError):
    """Another run, or a stage process of one, holds the run directory's lock."""


class RunLock:
    """The held lock of one run directory; ``fd`` is what a stage's launcher inherits to hold it with the runner
    (None where the filesystem has no locks). Its file describes the holder, for the message another run gets."""

    def __init__(self, path: Path, fd: int | None):
        self.path = path
        self.fd = fd
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}
        if fd is not None:
            _write_holder(fd, self.holder)

    def note_stage(self, stage: str | None, pid: int | None = None) -> None:
        """Record the running stage and its process group (the launcher's pid: it leads its own group), or that
        none runs (``stage=None``)."""
        if self.fd is not None:
            _write_holder(self.fd, {**self.holder, **({"stage": stage, "stage_pid": pid} if stage else {})})

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return () if self.fd is None else (self.fd,)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[RunLock]:
    """Hold ``run_dir``'s lock for the block, or raise :class:`RunInUse` at once (never wait: the other run may
    take hours) naming what holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, run_dir, path):
            log.warning("the filesystem of %s has no file locks: nothing stops a second run from writing into it "
                        "while this one runs", run_dir)
            os.close(fd)
            fd = None
            yield RunLock(path, None)
            return
        lock = RunLock(path, fd)  # written while alone
        # shared from here, with this run's stage processes; another run that took it in between has it now
        _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, run_dir, path)
        yield lock
    finally:
        if fd is not None:
            os.close(fd)  # the run's hold ends; its stage processes' (a launcher's inherited copy too) end with them


def _flock(fd: int, operation: int, run_dir: Path, path: Path) -> bool:
    """``flock``; False where the filesystem has none, :class:`RunInUse` where another process holds it."""
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        raise RunInUse(_in_use_message(run_dir, path)) from None
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            raise
        return False
    return True


@contextlib.contextmanager
def stage_holds_run(run_dir: Path) -> Iterator[None]:
    """A stage process holds its run directory's lock, shared with its run and the other ranks, while the block runs.
    Nothing to hold for a stage directory no run made (one prepared by hand or by a test)."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # no locks on this filesystem: the run has warned
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a run starts or probes (an instant)
        yield
    finally:
        os.close(fd)


def run_in_use(run_dir: Path) -> str | None:
    """Why ``run_dir`` is in use (what :class:`RunInUse` would say), or None when no process holds it; takes nothing.
    For a dry run and the report, which only look."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at once, by the close below
    except BlockingIOError:
        return _in_use_message(run_dir, path)
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            raise
    finally:
        os.close(fd)
    return None


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
    fix = ("Two runs writing into one directory would overwrite each other's stages: wait for that run to end or "
           "stop it, or give this one another --runs-dir (or another recipe name).")
    if holder.get("host") == socket.gethostname() and not process_exists(holder.get("pid")):
        return (f"run directory {run_dir} is in use by a stage process of a run whose runner (process "
                f"{holder['pid']}, since {holder.get('since')}) has ended without stopping it: find it with "
                f"`fuser -v {path}` and stop it (`kill -TERM -- -PGID` stops a stage's launcher and workers "
                f"together{_last_stage(holder)}). {fix}")
    who = f"process {holder['pid']}" if "pid" in holder else "another process"
    if "host" in holder:
        who += f" on {holder['host']}"
    if "since" in holder:
        who += f" (since {holder['since']})"
    if "stage_pid" in holder:
        who += (f"; its stage '{holder.get('stage')}' runs as process group {holder['stage_pid']} "
                f"(`kill -TERM -- -{holder['stage_pid']}` stops its launcher and workers together)")
    return f"run directory {run_dir} is in use by {who}. {fix}"


def _last_stage(holder: dict) -> str:
    if "stage_pid" not in holder:
        return ""
    return f"; its last stage, '{holder.get('stage')}', ran as process group {holder['stage_pid']}"


