"""Liveness (distllama.watchdog): a rank that stops responding (SIGSTOP) or dies (SIGKILL), at start-up or
mid-decode, ends every process of a 4-process run (tp 2 x pp 2 on CPU), under torchrun and as plain srun-style
processes, within the documented bound (--peer-timeout plus a few seconds), every surviving rank naming the rank at
fault in its one error line. Then the watchdog's rules on an in-memory store, and on_every_rank's agreement.

The real runs share one checkpoint and run a few at a time: most of their wall time is start-up and the detection
wait, not CPU."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist

from checkpoints import build_checkpoint, free_port
from distllama.distributed import Grid, Launch, RankFailure, on_every_rank
from distllama.generate import UsageError, parse_args
from distllama import watchdog
from distllama.watchdog import Stop, Watchdog, machine_id, process_gone


@pytest.fixture(autouse=True)
def no_watchdog_left():
    """A watchdog started here must not stay this process's watchdog for the tests that follow (they call
    generate.main in process)."""
    yield
    watchdog._active = None

PEER_TIMEOUT = 5.0
# Documented: a hung rank is found within --peer-timeout plus a couple of 1 s heartbeats, and every rank has left a
# moment later; a dead rank on the same host is found within a heartbeat. The slack is for a loaded 2-core machine.
STOP_BOUND = PEER_TIMEOUT + 8
KILL_BOUND = 8
# torchrun's agent exits on its own after its workers: alone it takes under a second, but on 2 cores busy with other
# runs starting up its interpreter teardown has taken up to 12 s.
AGENT_SLACK = 15
START_TIMEOUT = 150  # for a run to reach the point where the signal is sent

ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
       and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
ENV["OMP_NUM_THREADS"] = "1"


@dataclass
class Scenario:
    launcher: str  # "torchrun" or "srun" (plain processes with SLURM_* variables, as `srun python` starts them)
    signal: str  # SIGSTOP: the rank hangs; SIGKILL: it dies
    victim: int
    when: str  # "decode" (text is streaming) or "start-up" (rank 0 reads a prompts file nobody writes)

    @property
    def id(self):
        return f"{self.launcher}-{self.signal}-rank{self.victim}-{self.when}"


SCENARIOS = [Scenario(launcher, "SIGSTOP", victim, "decode")
             for launcher, victims in (("srun", (0, 1, 3)), ("torchrun", (0, 2, 3))) for victim in victims] + [
    Scenario("srun", "SIGSTOP", 2, "start-up"),
    Scenario("srun", "SIGKILL", 3, "start-up"),
    Scenario("srun", "SIGKILL", 0, "decode"),  # rank 0 serves the store: it goes with it
    Scenario("torchrun", "SIGKILL", 1, "decode"),
]


@dataclass
class Outcome:
    seconds: float  # from the signal until every rank's process is gone
    launcher_seconds: float  # ... until the launcher too (torchrun's agent, or the last srun-style rank)
    codes: list[int]  # srun: every rank's exit status; torchrun: the agent's
    stderr: str
    pids: dict[int, int] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)  # processes still there at the end
    arrivals: list[str] = field(default_factory=list)  # stderr lines after the signal, each with its time

    def error_lines(self) -> dict[int, list[str]]:
        lines = {}
        for line in self.stderr.splitlines():
            m = re.match(r"distllama: error: \[rank (\d+)\] (.*)", line)
            if m:
                lines.setdefault(int(m[1]), []).append(m[2])
        return lines


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def rank_of(pid: int) -> int:
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    return int(env[b"RANK"])


def run_scenario(scenario: Scenario, model, workdir) -> Outcome:
    args = ["-m", "distllama.generate", "--model", str(model), "--tp", "2", "--pp", "2", "--device", "cpu",
            "--peer-timeout", str(PEER_TIMEOUT), "--max-new-tokens", "3000", "--min-new-tokens", "3000"]
    fifo = workdir / f"{scenario.id}.fifo"
    if scenario.when == "start-up":
        os.mkfifo(fifo)  # rank 0 blocks opening it, mid start-up, while the others wait for it
        args += ["--prompts-file", str(fifo)]
    else:
        args += ["--prompt", "hello", "--stream"]
    if scenario.launcher == "torchrun":
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node", "4", *args], env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)]
    else:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**ENV, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": "4",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                 for r in range(4)]
    errors = [[] for _ in procs]
    ready = threading.Event()
    sent = None

    def drain_stderr(proc, chunks):
        for line in iter(proc.stderr.readline, b""):
            chunks.append(line)
            if sent is not None:
                arrivals.append(f"{time.monotonic() - sent:5.1f} s {line.decode(errors='replace').rstrip()[:160]}")
            if b"config:" in line and scenario.when == "start-up":
                ready.set()  # rank 0 is past the rendezvous, about to read the prompts

    def drain_stdout(proc):
        while chunk := proc.stdout.read1(4096):
            if scenario.when == "decode" and chunk.strip():
                ready.set()  # rank 0 streams text: decoding has started

    gone_at = {}  # process -> seconds after the signal
    arrivals = []  # stderr lines after the signal, with their time: for the failure messages
    readers = [threading.Thread(target=drain_stderr, args=(p, e), daemon=True) for p, e in zip(procs, errors)]
    readers += [threading.Thread(target=drain_stdout, args=(p,), daemon=True) for p in procs]
    for t in readers:
        t.start()
    try:
        if not ready.wait(START_TIMEOUT):
            pytest.fail(f"{scenario.id}: the run did not get going: {b''.join(sum(errors, [])).decode()[-2000:]}")
        if scenario.launcher == "torchrun":
            pids = {rank_of(c): c for c in children(procs[0].pid)}
        else:
            pids = {r: p.pid for r, p in enumerate(procs)}
        assert sorted(pids) == [0, 1, 2, 3]
        time.sleep(1.0)  # the others reach their start-up wait; a few decode steps pass
        os.kill(pids[scenario.victim], getattr(signal, scenario.signal))
        sent = time.monotonic()
        watched = {f"rank {r}": pid for r, pid in pids.items()}
        if scenario.launcher == "torchrun":
            watched["torchrun"] = procs[0].pid
        while len(gone_at) < len(watched) and time.monotonic() - sent < 60:
            for name, pid in watched.items():
                if name not in gone_at and (process_gone(pid) or p_done(procs, pid)):
                    gone_at[name] = round(time.monotonic() - sent, 1)
            time.sleep(0.05)
        seconds = max((t for name, t in gone_at.items() if name.startswith("rank")), default=float("inf"))
        launcher_seconds = max(gone_at.values(), default=float("inf"))
        leftovers = [name for name in watched if name not in gone_at]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if scenario.launcher == "torchrun":
            for pid in locals().get("pids", {}).values():
                if not process_gone(pid):
                    os.kill(pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        for t in readers:
            t.join(timeout=5)
        fifo.unlink(missing_ok=True)
    stderr = b"".join(sum(errors, [])).decode(errors="replace")
    return Outcome(seconds, launcher_seconds, [p.returncode for p in procs], stderr, pids, leftovers,
                   arrivals + [f"gone: {gone_at}"])


def p_done(procs, pid) -> bool:
    """A process we started is gone once it has exited (poll reaps it)."""
    return any(p.pid == pid and p.poll() is not None for p in procs)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("liveness")
    model = workdir / "tiny"
    build_checkpoint(model, seed=11, max_position_embeddings=4096)  # room for a long decode
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {s.id: pool.submit(run_scenario, s, model, workdir) for s in SCENARIOS}
        results = {name: f.result() for name, f in futures.items()}
    summary = ", ".join(f"{name} {o.seconds:.1f} s ({o.launcher_seconds:.1f} s)" for name, o in results.items())
    print(f"\nliveness: signal to every rank gone (and the launcher): {summary}")
    if os.environ.get("DEBUG_LIVENESS"):
        for name, o in results.items():
            print(name, *o.arrivals, sep="\n  ")
    return results


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
def test_every_process_gone_in_time_naming_the_rank(outcomes, scenario):
    outcome = outcomes[scenario.id]
    context = (f"{outcome.seconds:.1f} s, exit {outcome.codes}, after the signal:\n" + "\n".join(outcome.arrivals)
               + f"\nstderr:\n{outcome.stderr[-3000:]}")
    assert not outcome.leftovers, f"still running: {outcome.leftovers}; {context}"
    bound = STOP_BOUND if scenario.signal == "SIGSTOP" else KILL_BOUND
    assert outcome.seconds < bound, context
    assert outcome.launcher_seconds < bound + (AGENT_SLACK if scenario.launcher == "torchrun" else 0), context
    assert all(code != 0 for code in outcome.codes), context
    lines = outcome.error_lines()
    if scenario.launcher == "srun":
        assert outcome.codes[scenario.victim] == -signal.SIGKILL, context  # a stopped rank is killed by a peer
        survivors = [r for r in range(4) if r != scenario.victim]
    else:
        # torchrun ends its other workers as soon as one dies: after a SIGKILL, not every rank gets to speak.
        survivors = [r for r in range(4) if r != scenario.victim] if scenario.signal == "SIGSTOP" else list(lines)
    assert survivors, context
    for rank in survivors:
        assert len(lines.get(rank, [])) == 1, f"rank {rank} must say one line; {context}"
        line = lines[rank][0]
        assert re.search(rf"\brank {scenario.victim}\b", line), (line, context)
        if scenario.signal == "SIGSTOP":
            assert "stopped responding" in line, line
    assert scenario.victim not in lines or scenario.signal == "SIGKILL", context
    assert not re.search(r'File ".*distllama/', outcome.stderr), context  # no Python traceback through our code


def test_a_hung_rank_must_be_found_before_a_collective_gives_up():
    with pytest.raises(UsageError, match=r"--peer-timeout \(30\) must be shorter than --dist-timeout \(30\)"):
        parse_args(["--dist-timeout", "30"])
    run, _, _ = parse_args(["--dist-timeout", "30", "--peer-timeout", "10"])
    assert (run.dist_timeout, run.peer_timeout, run.load_timeout) == (30, 10, 1800)


# ---- the watchdog's rules, on an in-memory store -------------------------------------------------------------------

class Exited(Exception):
    pass


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def exit_raises(code):
    raise Exited(code)


def watchdogs(world: int, clock, store=None, identities=None, store_on_rank0=True, **kw) -> list[Watchdog]:
    store = store or dist.HashStore()
    dogs = [Watchdog(store, r, world, PEER_TIMEOUT, store_address="127.0.0.1:1", store_on_rank0=store_on_rank0,
                     interval=0.01, clock=clock, exit=exit_raises,
                     identity=(identities or {}).get(r, {"host": "h", "pid": 10**7 + r, "machine": None}), **kw)
            for r in range(world)]
    for dog in dogs:
        dog.publish()
    return dogs


def test_a_silent_peer_is_hung_after_peer_timeout_and_a_finished_one_never():
    clock = Clock()
    a, b, c = watchdogs(3, clock)
    assert a.check() is None  # joins: everyone has published
    clock.now += 3
    b.check(), c.check()
    assert a.check() is None
    c._mark_done()  # c finished: its silence means nothing
    clock.now += PEER_TIMEOUT - 1
    assert a.check() is None  # b silent for less than the peer timeout
    clock.now += 2
    stop = a.check()
    assert stop.lost == [1] and stop.cause == "rank 1 stopped responding (no heartbeat for 6 s)"
    assert stop.text == "stopping: " + stop.cause
    clock.now += 100
    b.check()  # b moves again: no longer hung
    assert a.check() is None


def test_the_first_cause_reaches_every_rank_and_the_store_host_waits_for_them(capfd):
    clock = Clock()
    a, b, c = watchdogs(3, clock)
    for dog in (a, b, c):
        dog.check()
    with pytest.raises(Exited):  # rank 2 failed (the main thread's request): it tells the others and leaves
        c._leave(Stop("boom", "rank 2 failed: boom"))
    assert capfd.readouterr().err == "distllama: error: [rank 2] boom\n"
    stop = b.check()
    assert stop.text == "stopping: rank 2 failed: boom" and stop.cause is None  # the first cause stays
    with pytest.raises(Exited):
        b._leave(stop)
    assert capfd.readouterr().err == "distllama: error: [rank 1] stopping: rank 2 failed: boom\n"
    # rank 0 serves the store: it leaves only once the others are done (here they are)
    with pytest.raises(Exited):
        a._leave(a.check())
    assert int(a.store.add("done", 0)) == 3
    assert capfd.readouterr().err == "distllama: error: [rank 0] stopping: rank 2 failed: boom\n"


class Recorded:
    """A store whose calls are logged as (rank, method, key)."""

    def __init__(self, store, rank: int, log: list):
        self.store, self.rank, self.log = store, rank, log

    def __getattr__(self, name):
        def call(*args):
            self.log.append((self.rank, name, args[0] if args else None))
            return getattr(self.store, name)(*args)
        return call


def test_under_torchrun_the_ranks_on_the_stores_host_leave_last(capfd):
    """torchrun's agent serves the store and takes it down as soon as one of its ranks exits: every rank waits until
    all have said why they stop, and the ranks on the agent's host leave only after every other rank's last call."""
    log, world = [], 3
    dogs = watchdogs(world, time.monotonic, store_on_rank0=False)
    for dog in dogs:
        dog.check()
        dog.store_here = dog.rank == 0  # rank 0 shares the agent's host
        dog._beat_store = Recorded(dog._beat_store, dog.rank, log)

    def leave(dog):
        dog._exit = lambda code: (log.append((dog.rank, "exit", code)), exit_raises(code))
        with pytest.raises(Exited):
            dog._leave(Stop(f"stop {dog.rank}"))

    threads = [threading.Thread(target=leave, args=(dog,)) for dog in dogs]  # rank 0 starts leaving first
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=2 * PEER_TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    exits = {entry[0]: log.index(entry) for entry in log if entry[1] == "exit"}
    assert sorted(exits) == [0, 1, 2]
    for r in (1, 2):
        calls = [entry for entry in log if entry[0] == r and entry[1] != "exit"]
        assert calls[-1] == (r, "add", "left"), calls
        assert log.index(calls[-1]) < exits[0]
    assert log[exits[0] - 1] == (0, "add", "left")  # rank 0's last call: it read that every rank had made its last
    assert int(dogs[0].store.add("left", 0)) == world
    assert sorted(capfd.readouterr().err.splitlines()) == [f"distllama: error: [rank {r}] stop {r}" for r in range(3)]


def test_a_dead_process_on_this_host_is_found_at_once_and_a_hung_one_is_killed():
    dead = subprocess.Popen(["true"])
    dead.wait()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        here = machine_id()
        clock = Clock()
        killed = []
        identities = {1: {"host": "h", "pid": dead.pid, "machine": here},
                      2: {"host": "h", "pid": sleeper.pid, "machine": here},
                      0: {"host": "h", "pid": os.getpid(), "machine": here}}
        a, b, c = watchdogs(3, clock, identities=identities, kill=lambda pid, sig: killed.append((pid, sig)))
        stop = a.check()
        assert stop.cause == f"rank 1 died (its process, pid {dead.pid} on this host, is gone)" and stop.lost == [1]
        b._mark_done()  # rank 1 said goodbye: then its exit is a normal one
        assert a.check() is None
        clock.now += PEER_TIMEOUT + 1
        stop = a.check()
        assert stop.lost == [2]
        assert stop.text.endswith(f"; killing rank 2 (pid {sleeper.pid} on this host)")
        with pytest.raises(Exited):
            a._leave(stop)
        assert killed == [(sleeper.pid, signal.SIGKILL)]
    finally:
        sleeper.kill()
        sleeper.wait()


class FreezingStore:
    """A store that stops answering once frozen, as a TCPStore does when the process serving it is stopped."""

    def __init__(self, store):
        self.store, self.frozen = store, threading.Event()

    def clone(self):
        return self

    def __getattr__(self, name):
        def call(*args):
            if self.frozen.is_set():
                threading.Event().wait()  # forever
            return getattr(self.store, name)(*args)
        return call


def test_a_store_that_stops_answering_ends_the_rank_and_its_stopped_host(capfd):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        store = FreezingStore(dist.HashStore())
        exits, killed = [], []

        def record_exit(code):
            exits.append(code)
            threading.Event().wait()  # as if the process had ended: the (daemon) thread goes no further

        identity0 = {"host": "h", "pid": sleeper.pid, "machine": machine_id()}
        Watchdog(store, 0, 2, 0.5, store_address="10.0.0.1:29500", store_on_rank0=True,
                 identity=identity0).publish()
        dog = Watchdog(store, 1, 2, 0.5, store_address="10.0.0.1:29500", store_on_rank0=True,
                       kill=lambda pid, sig: killed.append((pid, sig)), exit=record_exit).start()
        assert dog.joined.wait(5)
        store.frozen.set()
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exits == [1]
        assert killed == [(sleeper.pid, signal.SIGKILL)]
        err = capfd.readouterr().err
        assert re.fullmatch(r"distllama: error: \[rank 1\] stopping: rank 0 stopped responding \(the rendezvous "
                            r"store it serves at 10\.0\.0\.1:29500 has not answered for \d+ s\); killing rank 0 "
                            rf"\(pid {sleeper.pid} on this host\)\n", err), err
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_main_threads_failure_is_told_and_a_lost_connection_is_named_by_the_beat(capfd):
    here = machine_id()

    def start(store, rank, pid, exits):
        def record_exit(code):
            exits.append(code)
            threading.Event().wait()  # as if the process had ended
        return Watchdog(store, rank, 2, 30.0, store_address="127.0.0.1:1", store_on_rank0=True, interval=0.5,
                        exit=record_exit, identity={"host": "h", "pid": pid, "machine": here}).start()

    # rank 1's code fails: its own line, and the cause for the others
    store, exits = dist.HashStore(), []
    failing = start(store, 1, os.getpid(), exits)
    Watchdog(store, 0, 2, 30.0, store_address="127.0.0.1:1", store_on_rank0=True,
             identity={"host": "h", "pid": os.getpid(), "machine": here}).publish()
    assert failing.joined.wait(5)
    threading.Thread(target=failing.fail, args=(ValueError("cannot write --output x"),), daemon=True).start()
    wait_for(lambda: exits == [1])
    assert capfd.readouterr().err == "distllama: error: [rank 1] cannot write --output x\n"
    assert json.loads(store.get("abort")) == {"cause": "rank 1 failed: cannot write --output x", "lost": []}

    # a lost connection says nothing about who is gone: the beat looks at once, and names the dead rank instead
    store, exits = dist.HashStore(), []
    doomed = subprocess.Popen(["sleep", "60"])
    Watchdog(store, 1, 2, 30.0, store_address="127.0.0.1:1", store_on_rank0=True,
             identity={"host": "h", "pid": doomed.pid, "machine": here}).publish()
    survivor = start(store, 0, os.getpid(), exits)
    assert survivor.joined.wait(5)
    doomed.kill()
    doomed.wait()
    error = RuntimeError("[gloo/transport/tcp/pair.cc:538] Connection closed by peer [127.0.0.1]:4711")
    threading.Thread(target=survivor.fail, args=(error,), daemon=True).start()
    wait_for(lambda: exits == [1])
    assert capfd.readouterr().err == ("distllama: error: [rank 0] stopping: rank 1 died (its process, "
                                      f"pid {doomed.pid} on this host, is gone)\n")


def wait_for(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- on_every_rank through the store ----------------------------------------------------------------------------

def grids(world: int, load_timeout_s: float = 30.0) -> list[Grid]:
    store = dist.HashStore()
    return [Grid(Launch(r, world, r), world, 1, torch.device("cpu"), store=dist.PrefixStore("distllama", store),
                 load_timeout_s=load_timeout_s) for r in range(world)]


def on_ranks(grid_list, phases):
    """Run on_every_rank on every grid at once; each rank's result or exception."""
    results = [None] * len(grid_list)

    def run(rank):
        try:
            results[rank] = on_every_rank(phases[rank], grid_list[rank], "loading the weights")
        except Exception as e:
            results[rank] = e
    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(grid_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_on_every_rank_agrees_through_the_store():
    g = grids(3)
    assert on_ranks(g, [lambda r=r: r * 10 for r in range(3)]) == [0, 10, 20]

    def boom():
        raise ValueError("missing shard file x.safetensors")
    results = on_ranks(g, [lambda: 1, boom, lambda: 3])  # the same grids: a second phase, its own keys
    assert isinstance(results[1], ValueError)
    for rank in (0, 2):
        assert isinstance(results[rank], RankFailure)
        assert str(results[rank]) == "stopping: rank 1 failed: missing shard file x.safetensors"


def test_on_every_rank_waits_only_the_start_up_budget():
    g = grids(2, load_timeout_s=0.3)
    started = time.monotonic()
    [result] = on_ranks(g[:1], [lambda: 1])  # rank 1 never gets there
    assert time.monotonic() - started < 5
    assert str(result) == "stopping: rank(s) 1 did not finish loading the weights within --load-timeout 0.3 s"
