"""The control channel of a multi-node run: node 0 tells the other nodes what it decided and how each stage ended.

Why not the manifests: a follower reading ``runs/<run>/<stage>/manifest.json`` cannot tell this attempt's from an
earlier one's (a ``failed`` or ``running`` left by a crash or a kill, a ``complete`` that node 0 re-runs under
``--force``), and only node 0 knows its ``--force`` and ``--resume``. So node 0 hosts a small key-value store
(``torch.distributed.TCPStore``; a store, not a process group) on ``--main-addr:--control-port`` for as long as its
``alignpipe run`` lives, and publishes there, per stage, its decision once the stage directory is ready and then the
stage's outcome. The store lives and dies with one attempt, so nothing in it is stale, and a follower started before
or after node 0 reads the same decisions; a follower can join only until the run begins (every node has joined), so
one restarted mid-run (or after the end, while node 0 waits for the others to read it) is told to start the run
again on every node instead of being handed decisions that no node 0 acts on any more.

Keys: ``run`` (node 0's recipe), ``state`` (``started`` once every node has joined, ``finished`` after the last
stage), ``joined/<rank>`` (a follower passed its checks and follows; a counter, so a second one is refused),
``base`` (the name and hash of node 0's copy of the recipe's model, which a follower checks its own against, and
the commit node 0 pinned a hub model to, which a follower fetches when its own resolution found another),
``beat/<rank>`` (a follower's heartbeat: a counter it adds to every ``HEARTBEAT_S`` from when it has joined),
``unjoined/<rank>`` (why a follower stopped before it joined: node 0 reads it only while it waits for the nodes to
join, so a stray node of a rank already in the run cannot stop the run), ``failed/<stage>/<rank>`` (a follower's
part of a stage exited non-zero; node 0 stops the stage it runs, whose collectives would wait for the lost ranks),
``decision/<stage>`` (``{"action": "skip" | "run" | "resume", "reason": ...}``), ``outcome/<stage>``
(``{"output_sha256": ...}``, once the stage is complete), ``abort`` (why node 0 stopped: a follower looks while its
part of a stage runs, and stops it), ``left/<rank>`` (why a follower stopped: node 0 looks before each decision and
while a stage that spans the nodes runs, and stops), ``done/<rank>`` (a follower read the last outcome; node 0 keeps
the store up until every follower has said one of the two, or for ``END_GRACE_S``).

A follower that is killed outright (SIGKILL, its machine lost) says nothing; its heartbeat stops. Node 0 counts it as
gone when its counter has not moved for ``SILENCE_S`` (or the control timeout, if shorter), judged by node 0's own
clock (the machines' clocks need not agree), and stops the stage it runs instead of waiting in a collective for up
to half an hour. The other way round, a node 0 that is frozen (SIGSTOP, Ctrl-Z, a hung machine whose kernel still
acknowledges TCP) keeps the connection but never replies, and the store's client waits for a reply without a deadline
(its timeout bounds only the wait for a key): a follower asks in a helper thread and stops, its stage part with it,
once a request has gone unanswered for as long (a key node 0 has not set yet is a prompt answer, so a follower waits
through a stage of hours).
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, TypeVar

from alignpipe.pipeline.decision import Action
from alignpipe.pipeline.watched import Terminated

log = logging.getLogger("alignpipe")
T = TypeVar("T")

CONTROL_TIMEOUT_S = 600.0  # how long the nodes wait for each other to start, and for an answer (--control-timeout)
MAX_CONTROL_TIMEOUT_S = 7 * 24 * 3600.0  # a week; the store's timedelta overflows near 1e14 s, inf crashes it
POLL_S = 0.2  # how often a waiting node looks at the store (a local round trip of well under a millisecond)
RECONNECT_S = 10.0  # how long a follower whose connection broke tries to reach node 0's port before giving up
END_GRACE_S = 30.0  # how long node 0 keeps the store up at the end for followers to read how the run ended
HEARTBEAT_S = 5.0  # how often a follower that has joined adds to its ``beat/<rank>`` counter
SILENCE_S = 120.0  # how long a follower's counter may stand still before node 0 counts the follower as gone
RUN, BASE, STATE, ABORT = "run", "base", "state", "abort"
STARTED, FINISHED = "started", "finished"  # values of STATE
INTERRUPTED = "interrupted"  # the ``abort`` or ``left/<rank>`` of a node stopped by Ctrl-C


class ControlError(RuntimeError):
    """The nodes cannot agree: one did not show up in time, went away, stopped, or runs another recipe."""


def _joined(rank: int) -> str:
    return f"joined/{rank}"


def _left(rank: int) -> str:
    return f"left/{rank}"


def _done(rank: int) -> str:
    return f"done/{rank}"


def _beat(rank: int) -> str:
    return f"beat/{rank}"


def _unjoined(rank: int) -> str:
    return f"unjoined/{rank}"


def _part_failed(stage: str, rank: int) -> str:
    return f"failed/{stage}/{rank}"


def _silence_limit(timeout_s: float) -> float:
    """How long a node may go unheard before the other counts it as gone: ``SILENCE_S``, or the control timeout if
    shorter, but at least three heartbeats (a follower is never blamed for one late beat)."""
    return max(3 * HEARTBEAT_S, min(SILENCE_S, timeout_s))


def check_control_timeout(seconds: float) -> float:
    """``seconds`` if it is a usable ``--control-timeout``: a finite number of seconds, > 0 and at most a week (inf
    made the store overflow and nan compares false with every deadline, so a node waited for ever)."""
    if not 0 < seconds <= MAX_CONTROL_TIMEOUT_S:  # false for nan too
        raise ValueError(f"--control-timeout must be a number of seconds > 0 and at most {MAX_CONTROL_TIMEOUT_S:.0f} "
                         f"(a week), got {seconds:g}")
    return seconds


def why_it_stopped(error: BaseException) -> str:
    """One line for the other nodes: the error's message, or what happened when there is none."""
    if isinstance(error, Terminated):  # SIGTERM (``kill``, a scheduler), SIGHUP (a closed terminal), SIGQUIT
        return f"terminated ({error})"
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED
    return str(error).strip() or type(error).__name__


def mismatch(ours: dict, theirs: dict) -> list[str]:
    """The run-identity fields (recipe name and hash, topology) on which two nodes disagree, described."""
    return [f"{key}: node 0 has {theirs.get(key)!r}, this node {ours.get(key)!r}"
            for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]


def check_host_address(address: str, port: int) -> None:
    """Node 0's ``--main-addr`` and ``--control-port``, checked by binding them: the store listens on every address
    and then connects to ``address``, so a wrong one only timed out (after one to three timeouts) and was blamed on
    the port. A ControlError that says which is wrong: the name, the address (not this machine's), or the port."""
    try:
        candidates = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ControlError(f"--main-addr {address!r} does not resolve on node 0 ({error.strerror}): pass an address "
                           "of node 0 that the other nodes reach, the same on every node") from error
    failures: list[tuple[str, OSError]] = []
    for family, kind, protocol, _, socket_address in candidates:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store's own socket
            try:
                probe.bind(socket_address)
                return
            except OSError as error:
                failures.append((socket_address[0], error))
    if any(error.errno == errno.EADDRINUSE for _, error in failures):
        raise ControlError(
            f"node 0 cannot open its control channel on port {port}: it is in use; is another `alignpipe run "
            "--node-rank 0` still running on this machine? Stop it, or pass another --control-port to every node")
    addresses = ", ".join(sorted({ip for ip, _ in failures}))
    if all(error.errno == errno.EADDRNOTAVAIL for _, error in failures):
        raise ControlError(f"--main-addr {address!r} ({addresses}) is not an address of this machine, which hosts "
                           "the control channel as node 0: run --node-rank 0 on the machine --main-addr names, or "
                           "pass one of this machine's addresses on every node")
    raise ControlError(f"node 0 cannot open its control channel at {address}:{port} ({failures[0][1]})")


class Alone:
    """A single-node run: nobody to wait for or to tell."""

    def __enter__(self) -> Alone:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def wait_for_followers(self) -> None:
        return None

    def check_followers(self) -> None:
        return None

    def publish_base(self, path: str, sha256: str | None, commit: str | None = None) -> None:
        return None

    def publish_decision(self, stage: str, action: Action, reason: str) -> None:
        return None

    def publish_outcome(self, stage: str, output_sha256: str | None) -> None:
        return None


class ControlHost:
    """Node 0's end. ``with`` it around the whole run: on the way out it publishes why the run stopped (if it did) and
    keeps the store up until the followers have read it."""

    def __init__(self, address: str, port: int, *, nodes: int, identity: dict, timeout_s: float):
        self.address, self.port, self.timeout_s = address, port, timeout_s
        self.followers = range(1, nodes)
        self.identity = identity
        self.silence_s = _silence_limit(timeout_s)
        self._store = None
        self._heard: dict[int, tuple[int, float]] = {}  # rank -> (its beat count, node 0's clock when it changed)
        self._running: str | None = None  # the stage whose parts run on every node, between decision and outcome

    def __enter__(self) -> ControlHost:
        from torch.distributed import DistError, TCPStore

        check_host_address(self.address, self.port)
        try:
            self._store = TCPStore(self.address, self.port, None, True, timedelta(seconds=self.timeout_s),
                                   wait_for_workers=False)
        except DistError as error:
            raise ControlError(
                f"node 0 cannot open its control channel at {self.address}:{self.port} ({error}); check that "
                "--main-addr is an address of this machine and that nothing else holds --control-port") from error
        self._store.set(RUN, json.dumps(self.identity))
        log.info("control channel open on %s:%d for node(s) %s", self.address, self.port, list(self.followers))
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            self._store.set(ABORT, why_it_stopped(error))
        else:
            self._store.set(STATE, FINISHED)
        joined = [r for r in self.followers if self._store.check([_joined(r)])]
        news = "that the run finished" if error is None else "why the run stopped"
        self._wait_for_acknowledgements(joined, min(self.timeout_s, END_GRACE_S), news)
        self._store = None  # the server stops with its last reference

    def wait_for_followers(self) -> None:
        """Block until every follower has joined, before node 0 decides or writes anything."""
        deadline = time.monotonic() + self.timeout_s
        missing = list(self.followers)
        while missing:
            for rank in missing:
                if (reason := self._text(_left(rank)) or self._text(_unjoined(rank))) is not None:
                    raise ControlError(f"node {rank} stopped before the run began: {reason}")
            missing = [r for r in missing if not self._store.check([_joined(r)])]
            if missing and time.monotonic() > deadline:
                raise ControlError(
                    f"node(s) {missing} did not join within {self.timeout_s:.0f}s: start the same `alignpipe run` "
                    f"(same recipe and overrides, --nodes {len(self.followers) + 1}, --main-addr, --control-port) "
                    "with --node-rank R on each, or give them longer with --control-timeout")
            if missing:
                time.sleep(POLL_S)
        self._store.set(STATE, STARTED)  # from now on, no node joins
        log.info("all %d node(s) joined", len(self.followers) + 1)

    def check_followers(self) -> None:
        """Raise a ControlError when a follower has stopped (it said why): the next stage that spans the nodes
        would wait for it in torch's rendezvous until that times out. Before each decision, and while a stage
        runs (``pipeline.watched``)."""
        for rank in self.followers:
            if (reason := self._text(_left(rank))) is not None:
                raise ControlError(f"node {rank} stopped: {reason}; the run cannot go on without it. Fix the cause "
                                   "there and start the run again on every node (add --resume to continue)")
            if self._running is not None and (code := self._text(_part_failed(self._running, rank))) is not None:
                raise ControlError(
                    f"node {rank}'s part of stage '{self._running}' exited with {code}, so this node's part would "
                    f"wait for its ranks in a collective until that timed out; see node {rank}'s log for the cause, "
                    "fix it and start the run again on every node (add --resume to continue)")
            if (silent := self._silence(rank)) > self.silence_s:
                raise ControlError(
                    f"node {rank} has not been heard from for {silent:.0f}s: its `alignpipe run` was killed, or its "
                    "machine is down or cut off from node 0's; the run cannot go on without it. See that node's log "
                    "and system log (an out-of-memory kill?), then start the run again on every node (add --resume "
                    "to continue)")

    def _silence(self, rank: int) -> float:
        """For how long ``rank``'s heartbeat counter has stood still, by node 0's clock, as far as node 0 has looked:
        the first look, and a counter that moved since the last, count as heard now. So a look after a long gap
        (a stage node 0 ran alone) never blames a follower that kept beating."""
        count = int(self._store.get(_beat(rank))) if self._store.check([_beat(rank)]) else 0
        now = time.monotonic()
        last = self._heard.get(rank)
        if last is None or last[0] != count:
            self._heard[rank] = (count, now)
            return 0.0
        return now - last[1]

    def _text(self, key: str) -> str | None:
        """``key``'s value, or None while nobody has set it."""
        return self._store.get(key).decode() if self._store.check([key]) else None

    def publish_base(self, path: str, sha256: str | None, commit: str | None = None) -> None:
        """Tell the followers which model node 0 prepared (its folder's name and hash: the path is node 0's), and the
        commit it pinned a hub model to, which they load too."""
        self._store.set(BASE, json.dumps({"name": Path(path).name, "sha256": sha256, "commit": commit}))

    def publish_decision(self, stage: str, action: Action, reason: str) -> None:
        """Tell the followers what to do with ``stage``; for ``run``/``resume`` only once its directory is ready (its
        config written: their stage processes read it). A ControlError instead when a follower has stopped."""
        self.check_followers()
        self._store.set(f"decision/{stage}", json.dumps({"action": action, "reason": reason}))
        self._running = stage if action != "skip" else None

    def publish_outcome(self, stage: str, output_sha256: str | None) -> None:
        """Tell the followers ``stage`` is complete; a follower's part that failed after node 0's completed no longer
        stops the run (its outputs are node 0's)."""
        self._running = None
        self._store.set(f"outcome/{stage}", json.dumps({"output_sha256": output_sha256}))

    def _wait_for_acknowledgements(self, ranks: list[int], timeout_s: float, news: str) -> None:
        def pending(among: list[int]) -> list[int]:  # neither said it is done or why it stopped, nor fell silent
            return [r for r in among if not self._store.check([_done(r)]) and not self._store.check([_left(r)])
                    and self._silence(r) <= self.silence_s]

        deadline = time.monotonic() + timeout_s
        if waiting := pending(ranks):
            log.info("waiting up to %.0fs for node(s) %s to read %s", timeout_s, waiting, news)
        while waiting and time.monotonic() < deadline:
            time.sleep(POLL_S)
            waiting = pending(waiting)
        if waiting:
            log.warning("node(s) %s did not confirm the end of the run within %.0fs; closing the control channel",
                        waiting, timeout_s)


class ControlFollower:
    """A follower's end. ``with`` it around the whole run: on the way out it tells node 0 it is done, or why not."""

    def __init__(self, address: str, port: int, *, rank: int, identity: dict, timeout_s: float):
        self.address, self.port, self.rank, self.timeout_s = address, port, rank, timeout_s
        self.identity = identity
        self.silence_s = _silence_limit(timeout_s)  # how long a request to node 0 may go unanswered
        self._store = None
        self._joined = False  # True once node 0 counts this node in: from then on it says how it ends (``left``)
        self._refused = False  # refused as a node of a rank taken, or of a run under way: node 0 must not hear it
        self._node_zero_gone = False  # nobody to tell how this node ends
        self._outcomes: dict[str, dict] = {}  # read while this node's part of a stage ran (see ``watch``)
        self._base: dict | None = None  # node 0's record of the recipe's model (see ``node_zero_base``)
        self._heartbeat: _Heartbeat | None = None

    def __enter__(self) -> ControlFollower:
        from torch.distributed import DistError

        self._wait_for_node_zero()
        try:
            self._store = self._connect("connecting")
        except DistError as error:
            raise self._lost("connecting") from error
        log.info("following node 0 through its control channel at %s:%d", self.address, self.port)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        from torch.distributed import DistError

        if self._heartbeat is not None:  # one waiting for a frozen node 0's reply would keep this node waiting too
            self._heartbeat.stop(wait=not self._node_zero_gone)
        try:
            if self._refused or self._node_zero_gone:
                pass
            elif not self._joined:  # only node 0's wait for the nodes to join reads this
                self._tell(_unjoined(self.rank), why_it_stopped(error) if error else "it stopped")
            elif error is None:
                self._tell(_done(self.rank), "1")
            else:
                self._tell(_left(self.rank), why_it_stopped(error))
        except (DistError, ControlError):
            pass  # node 0 is gone already, or frozen: there is nobody left to tell
        self._store = None

    def join(self) -> None:
        """Check that node 0's run has not begun and runs the same recipe over as many nodes, then tell it this node
        follows (once per rank). A refusal for a run under way or a rank taken is not told to node 0: the node that
        took part, if it still runs, goes on."""
        from torch.distributed import DistError

        theirs = self._await(RUN, "node 0's recipe")
        try:
            state = self._ask(lambda: self._store.get(STATE).decode() if self._store.check([STATE]) else None,
                              "joining")
        except DistError as error:
            raise self._lost("joining") from error
        if state is not None:
            self._refused = True
            raise ControlError(
                f"node 0's run at {self.address}:{self.port} has {'finished' if state == FINISHED else 'begun'} "
                f"(node {self.rank} took part): a node cannot join a run once every node has joined. If node "
                f"{self.rank} stopped, stop node 0 too and start the run again on every node (add --resume to "
                "continue); otherwise check --node-rank")
        if differences := mismatch(self.identity, theirs):
            raise ControlError(f"node {self.rank} and node 0 run different things ({'; '.join(differences)}); start "
                               "every node with the same recipe file, overrides, --nodes and topology options "
                               "(--gpus or --cpu --processes, --deepspeed, --main-port)")
        if self._ask(lambda: self._store.add(_joined(self.rank), 1), "joining") > 1:
            self._refused = True
            raise ControlError(f"node {self.rank} has joined node 0's run already: is another `alignpipe run "
                               f"--node-rank {self.rank}` running? Give each node its own --node-rank")
        self._joined = True
        self._heartbeat = _Heartbeat(self.address, self.port, self.rank, self.timeout_s)

    def node_zero_base(self) -> dict:
        """Node 0's record of the recipe's model (see ``ControlHost.publish_base``), once it has prepared it."""
        if self._base is None:
            self._base = self._await(BASE, "node 0's model")
        return self._base

    def check_base(self, path: str, sha256: str | None) -> None:
        """Check this node's copy of the recipe's model (``path``, hashed as the run hashes it) against node 0's: a
        GGUF package of another version, say, converts into another model."""
        theirs = self.node_zero_base()
        if theirs["sha256"] != sha256:
            raise ControlError(
                f"node {self.rank} prepared another model than node 0: node 0 has {theirs['name']!r}, this node "
                f"{Path(path).name!r} ({path}); install the same model (package version) on every node")

    def decision(self, stage: str) -> dict:
        """Node 0's decision for ``stage`` (``action`` and ``reason``), once it has made it."""
        return self._await(f"decision/{stage}", f"node 0's decision for stage '{stage}'")

    def outcome(self, stage: str) -> dict:
        """``stage``'s outcome once node 0 has it (``output_sha256``); a ControlError when node 0 stopped instead."""
        if stage in self._outcomes:
            return self._outcomes.pop(stage)
        return self._await(f"outcome/{stage}", f"stage '{stage}' to complete on node 0")

    def report_part_failed(self, stage: str, returncode: int) -> None:
        """Tell node 0 this node's part of ``stage`` exited with ``returncode``: its own ranks would wait for this
        node's in a collective until that timed out (up to half an hour), while this node's `alignpipe run`, still
        alive and beating, said nothing."""
        from torch.distributed import DistError

        try:
            self._tell(_part_failed(stage, self.rank), str(returncode), f"reporting that its part of '{stage}' failed")
        except DistError as error:
            raise self._lost(f"reporting that its part of '{stage}' failed") from error

    def watch(self, stage: str) -> Callable[[], None]:
        """What ``pipeline.watched`` calls while this node's part of ``stage`` runs: a ControlError once node 0 has
        stopped, so the part stops too (it would wait for node 0's processes in a collective, up to half an hour),
        where the follower learnt it only after its part ended and node 0 had closed the channel; node 0's outcome,
        read as soon as it is there, is kept for ``outcome``."""
        def look() -> None:
            if stage not in self._outcomes and (answer := self._poll(f"outcome/{stage}", f"running '{stage}'")):
                self._outcomes[stage] = answer

        return look

    def _await(self, key: str, what: str) -> dict:
        """Wait, without a deadline while node 0 answers (a stage may train for hours), for ``key``."""
        while (answer := self._poll(key, f"waiting for {what}")) is None:
            time.sleep(POLL_S)
        return answer

    def _poll(self, key: str, doing: str) -> dict | None:
        """``key``'s value if node 0 has published it, else None; a stop of node 0 (``abort``) comes first, so a
        follower never acts on a decision node 0 gave up on. A broken connection is made again once before node 0
        counts as lost: node 0 may still listen (a network blip, a firewall that dropped the connection)."""
        from torch.distributed import DistError

        try:
            return self._ask(lambda: self._read(key), doing)
        except DistError as error:
            if not self._reconnect(doing):
                raise self._lost(doing) from error
        try:
            return self._ask(lambda: self._read(key), doing)
        except DistError as error:
            raise self._lost(doing) from error

    def _read(self, key: str) -> dict | None:
        if self._store.check([ABORT]):
            raise self._node_zero_stopped(self._store.get(ABORT).decode())
        return json.loads(self._store.get(key)) if self._store.check([key]) else None

    def _connect(self, doing: str):
        """A new client of node 0's store; making one asks node 0 and waits for its reply."""
        from torch.distributed import TCPStore

        return self._ask(lambda: TCPStore(self.address, self.port, None, False, timedelta(seconds=self.timeout_s)),
                         doing)

    def _tell(self, key: str, value: str, doing: str = "saying how it ends") -> None:
        self._ask(lambda: self._store.set(key, value), doing)

    def _ask(self, request: Callable[[], T], doing: str) -> T:
        """``request()``'s result (one or a few calls to node 0's store), or its exception; a ControlError when node 0
        has not answered it within ``silence_s``. Why a helper thread: the store's client waits for a reply in C++
        (recv) without a deadline, where Python cannot interrupt it, so a frozen node 0 held this node (and its stage
        part, and its GPUs) for ever. The thread left waiting is a daemon: it ends with the connection or the
        process."""
        box: dict = {}

        def ask() -> None:
            try:
                box["answer"] = request()
            except BaseException as error:  # noqa: BLE001 - raised again in the asking thread
                box["error"] = error

        helper = threading.Thread(target=ask, name=f"alignpipe-control-request-{self.rank}", daemon=True)
        helper.start()
        helper.join(self.silence_s)
        if helper.is_alive():
            self._node_zero_gone = True  # nobody to tell how this node ends: a request would wait for ever too
            raise ControlError(
                f"node 0 at {self.address}:{self.port} has not answered node {self.rank} for {self.silence_s:.0f}s "
                f"while {doing}: its `alignpipe run` is stopped (SIGSTOP, Ctrl-Z) or its machine hangs, so this node "
                "stops. See node 0's machine (is the process stopped? its system log), stop its run there and start "
                "the run again on every node (add --resume to continue)")
        if "error" in box:
            raise box["error"]
        return box["answer"]

    def _reconnect(self, doing: str) -> bool:
        """A new connection to node 0's store if its port still answers; False if not. A plain socket first: the
        store's own client retries, logging each try, until its timeout."""
        from torch.distributed import DistError

        try:
            socket.create_connection((self.address, self.port), timeout=min(RECONNECT_S, self.timeout_s)).close()
            self._store = self._connect(doing)
        except (OSError, DistError):
            return False
        log.warning("the connection to node 0's control channel at %s:%d broke; connected again", self.address,
                    self.port)
        return True

    @staticmethod
    def _node_zero_stopped(reason: str) -> ControlError:
        if reason == INTERRUPTED:
            return ControlError("node 0 was interrupted (Ctrl-C): start the run again on every node (add --resume to "
                                "continue)")
        return ControlError(f"node 0 stopped the run: {reason}")

    def _wait_for_node_zero(self) -> None:
        """Wait until node 0's control port accepts connections (it may start after this node). A plain socket: the
        store's own client logs every failed try."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                socket.create_connection((self.address, self.port), timeout=min(5.0, self.timeout_s)).close()
                return
            except OSError as error:
                if time.monotonic() > deadline:
                    raise self._unreachable(error) from error
                time.sleep(min(1.0, self.timeout_s / 10))

    def _unreachable(self, error: OSError) -> ControlError:
        """Why node 0's control channel could not be reached, by the last error: a name that does not resolve and
        an address that does not answer are a wrong --main-addr (or a firewall); a refused connection is a node 0
        that has not started."""
        where = f"{self.address}:{self.port}"
        if isinstance(error, socket.gaierror):
            return ControlError(f"--main-addr {self.address!r} does not resolve on node {self.rank} "
                                f"({error.strerror}): pass node 0's address, the same on every node")
        if isinstance(error, ConnectionRefusedError):
            return ControlError(
                f"node 0 did not open its control channel at {where} within {self.timeout_s:.0f}s ({error}): start "
                "the same `alignpipe run` with --node-rank 0 on --main-addr (every node with the same "
                "--control-port), or give it longer with --control-timeout")
        return ControlError(
            f"no answer from node 0's control channel at {where} within {self.timeout_s:.0f}s ({error}): check that "
            f"--main-addr is node 0's address as this node reaches it and that no firewall drops port {self.port}")

    def _lost(self, doing: str) -> ControlError:
        self._node_zero_gone = True
        return ControlError(f"node {self.rank} lost node 0's control channel at {self.address}:{self.port} while "
                            f"{doing}: node 0's `alignpipe run` stopped or cannot be reached; see its log")


class _Heartbeat:
    """A follower's heartbeat: a daemon thread that adds 1 to ``beat/<rank>`` every ``HEARTBEAT_S`` through its own
    connection (the main thread's store client is not shared across threads). It stops on ``stop``, or quietly
    when node 0 is gone (the main thread finds that out itself, and says so); one left waiting for a frozen node 0's
    reply is a daemon, and ends with the process."""

    def __init__(self, address: str, port: int, rank: int, timeout_s: float) -> None:
        self._where = (address, port, timeout_s)
        self._key = _beat(rank)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"alignpipe-heartbeat-{rank}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Beat until stopped. A broken connection is made again at the next beat once node 0's port answers (a
        network blip resets this connection as well as the main thread's, which reconnects too): a heartbeat that
        gave up would have node 0 stop a live run. A plain socket first, as the store's client logs every try."""
        from torch.distributed import DistError, TCPStore

        address, port, timeout_s = self._where
        store = None
        while True:
            try:
                if store is None:
                    socket.create_connection((address, port), timeout=HEARTBEAT_S).close()
                    store = TCPStore(address, port, None, False, timedelta(seconds=timeout_s))
                store.add(self._key, 1)
            except (OSError, DistError):
                store = None
            if self._stopped.wait(HEARTBEAT_S):
                return

    def stop(self, wait: bool = True) -> None:
        self._stopped.set()
        if wait:
            self._thread.join(timeout=HEARTBEAT_S)
