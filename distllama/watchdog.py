"""Liveness across ranks: every rank learns within a bounded time that another rank failed, died or stopped
responding, whatever collective or point-to-point call its main thread is blocked in, and then exits non-zero with
one line on stderr naming the rank at fault.

Beside the main thread each rank runs two daemon threads:
- the beat, every `interval` seconds: adds 1 to this rank's heartbeat counter in the rendezvous store, reads every
  rank's counter in one multi_get, and polls the "abort" key. A peer whose counter has not moved for
  `peer_timeout` seconds is hung (stopped, swapped out, wedged in C++); a peer on this host whose process is gone
  died; a rank whose own code failed publishes the cause under "abort". Each of these ends every rank.
- the guard: TCPStore calls never time out when the process serving the store is stopped (rank 0 without torchrun),
  so the guard ends this rank when a store call of the beat has not returned for `peer_timeout` seconds.
A rank ends with os._exit(1): its main thread may be blocked in a C++ collective that nothing can interrupt. A hung
process never exits by itself, so the ranks on its host SIGKILL it; one alone on its host is left to the launcher
(srun --kill-on-bad-exit, torchrun's agent). A rank that leaves first adds DONE to its counter, so a finished rank is
never taken for a dead one, then waits (bounded) until every other rank has left too: the store may live in its
process, and under torchrun the first exit makes the agent kill the others before they could say why. Under
torchrun the store lives in node 0's agent, which takes it down once one of its ranks has gone: there the ranks of
node 0 leave last, after the others' last calls.
"""

import json
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

DONE = 1 << 40  # added to a rank's heartbeat counter when it leaves: a larger counter belongs to a rank that is done
LINE = "distllama: error: [rank {rank}] {text}"

_active = None  # this process's running Watchdog (one per process, like its process group)


class RankFailure(RuntimeError):
    """This rank stops because another one failed; the message names it."""


def say(line: str) -> None:
    """One line to stderr in a single write, so lines from ranks sharing a terminal or pipe never interleave."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode())


def is_lost_connection(text: str) -> bool:
    """gloo's way of saying another process went away mid-collective."""
    return any(lost in text for lost in ("Connection reset by peer", "Connection closed by peer"))


def is_timeout(text: str) -> bool:
    """A collective or send/recv gave up waiting for another rank (--dist-timeout)."""
    return re.search(r"timed out|timing out", text, re.IGNORECASE) is not None


def error_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if is_lost_connection(text):
        return f"lost the connection to another rank, which has probably failed (see its message): {text[:200]}"
    # Our own errors are written for users; anything else also names its type, which may be all it says.
    ours = isinstance(e, (ValueError, RankFailure)) or type(e).__module__.startswith("distllama")
    return text if ours else f"{type(e).__name__}: {text}"


def active():
    """The watchdog of this process, or None (one process, or before the rendezvous)."""
    return _active


def leave_on_failure(e: BaseException) -> None:
    """In a distributed run: print this rank's one line for e, tell the other ranks and exit (never returns).
    Returns at once when no watchdog runs; the caller then reports e itself."""
    if _active is not None:
        _active.fail(e)


@dataclass
class Stop:
    """Why this rank leaves: the text of its line, the cause to tell the others (None: they know already, or the
    store is gone), and the ranks that will never say they are done (dead or hung: the hung are killed by whoever
    shares their host)."""

    text: str
    cause: str | None = None
    lost: list[int] = field(default_factory=list)
    store_ok: bool = True


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "machine": machine_id()}


def machine_id() -> str | None:
    """Boot id + pid namespace: two processes that agree on it can signal each other's pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{f.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")  # a zombie has exited; only its parent has not collected it yet


class Watchdog:
    """This rank's heartbeat and its watch over every other rank, through the rendezvous store (see module doc).

    store: a store only the watchdog writes to (keys who/R, hb/R, done, abort); the beat thread talks through its
    own connection (store.clone()), so a main thread blocked in the store never delays the heartbeat.
    """

    def __init__(self, store, rank: int, world_size: int, peer_timeout: float, *, store_address: str,
                 store_on_rank0: bool, interval: float | None = None, clock=time.monotonic, exit=os._exit,
                 kill=os.kill, identity: dict | None = None, store_here: bool | None = None):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.peer_timeout = peer_timeout
        self.interval = interval or min(1.0, peer_timeout / 5)
        self.store_address, self.store_on_rank0 = store_address, store_on_rank0  # else torchrun's agent serves it
        # torchrun's store lives in the agent of its node 0 (GROUP_RANK 0), static or c10d rendezvous alike
        self.store_here = os.environ.get("GROUP_RANK", "0") == "0" if store_here is None else store_here
        self.clock, self._exit, self._kill = clock, exit, kill
        self.identity = identity or this_process()
        self.peers: dict[int, dict] = {}  # rank -> {"host", "pid", "machine"} once every rank joined
        self.joined = threading.Event()
        self._beat_store = store.clone()
        self._hb_keys = [f"hb/{r}" for r in range(world_size)]
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (last counter, clock when it last moved)
        self._lock = threading.Lock()
        self._said = False
        self._request: Stop | str | None = None  # from the main thread: a Stop, or "finish"
        self._wake = threading.Event()
        self._leaving = threading.Event()
        self._finished = threading.Event()
        self._pending_since: float | None = None  # when the beat's store call now in flight started
        self._last_call_started = clock()

    @property
    def hosts_store(self) -> bool:
        return self.store_on_rank0 and self.rank == 0

    # ---- main thread -------------------------------------------------------------------------------------------

    def start(self) -> "Watchdog":
        global _active
        _active = self
        threading.Thread(target=self._beat_loop, name="distllama-beat", daemon=True).start()
        threading.Thread(target=self._guard_loop, name="distllama-guard", daemon=True).start()
        return self

    def wait_joined(self, timeout_s: float) -> None:
        """Until every rank has published who it is (bounded by the start-up budget)."""
        if self.joined.wait(timeout_s):
            return
        missing = [r for r in range(self.world_size) if not self.store.check([f"who/{r}"])]
        raise RankFailure(f"rank(s) {', '.join(map(str, missing))} did not join the rendezvous at "
                          f"{self.store_address} within --load-timeout {timeout_s:g} s")

    def fail(self, e: BaseException) -> None:
        """The main thread failed with e: print this rank's line, let the beat tell the others, exit."""
        text = error_line(e)
        if isinstance(e, RankFailure):
            stop = Stop(text)  # the others learnt it where this rank did
        elif is_lost_connection(text) or is_timeout(text):
            self._wake.set()  # look now: the beat may name the rank at fault, which this error cannot
            if self._leaving.wait(max(2.0, 2 * self.interval)):
                self._block()
            what = "lost the connection to" if is_lost_connection(text) else "timed out waiting for"
            stop = Stop(text, f"rank {self.rank} {what} another rank")
        else:
            stop = Stop(text, f"rank {self.rank} failed: {text}")
        self._say(stop.text)
        with self._lock:
            if not self._leaving.is_set() and self._request is None:
                self._request = stop
        self._wake.set()
        self._block()

    def finish(self) -> None:
        """Normal end: mark this rank done; the rank serving the store waits (bounded) for the others first."""
        with self._lock:
            busy = self._leaving.is_set() or self._request is not None
            if not busy:
                self._request = "finish"
        if busy:
            self._block()
        self._wake.set()
        self._finished.wait(self.peer_timeout + 10 * self.interval)

    def _block(self) -> None:
        """Wait for the beat (or the guard) to end the process; exit anyway if neither does."""
        time.sleep(2 * self.peer_timeout + 10 * self.interval)
        self._exit(1)

    # ---- the beat ----------------------------------------------------------------------------------------------

    def _beat_loop(self) -> None:
        try:
            self.publish()
            while True:
                request = self._request
                if request == "finish":
                    return self._finish()
                stop = request or self.check()
                if stop:
                    self._leave(stop)
                self._wake.wait(self.interval)
                self._wake.clear()
        except Exception as e:  # the store failed under the beat
            self._leave(self._store_failed(e, self.clock() - self._last_call_started))

    def publish(self) -> None:
        """Say who this rank is (for the others: its host and pid) and start its heartbeat."""
        self._call(self._beat_store.set, f"who/{self.rank}", json.dumps(self.identity))
        self._call(self._beat_store.add, f"hb/{self.rank}", 1)

    def check(self) -> Stop | None:
        """One heartbeat and one look at every other rank: a Stop when this rank must leave."""
        store = self._beat_store
        if not self.joined.is_set() and not self._join():
            return self._read_abort()
        # Processes first, counters second: a rank marks itself done before it exits, so a gone process whose
        # counter is still live died.
        gone = {r for r in self._local_peers() if process_gone(self.peers[r]["pid"])}
        self._call(store.add, f"hb/{self.rank}", 1)
        counters = [int(v) for v in self._call(store.multi_get, self._hb_keys)]
        stop = self._read_abort()
        if stop:
            return stop
        now = self.clock()
        dead, hung = [], []
        for r, count in enumerate(counters):
            if r == self.rank or count >= DONE:
                continue
            last, since = self._seen[r]
            if r in gone:
                dead.append(r)
            elif count != last:
                self._seen[r] = (count, now)
            elif now - since > self.peer_timeout:
                hung.append(r)
        if dead:
            cause = "; ".join(f"rank {r} died (its process, {self._where(r)}, is gone)" for r in dead)
        elif hung:
            silent = max(now - self._seen[r][1] for r in hung)
            cause = f"{_ranks(hung)} stopped responding (no heartbeat for {silent:.0f} s)"
        else:
            return None
        return Stop(f"stopping: {cause}{self._kill_note(hung)}", cause, dead + hung)

    def _join(self) -> bool:
        keys = [f"who/{r}" for r in range(self.world_size)]
        if not self._call(self._beat_store.check, keys):
            return False
        values = self._call(self._beat_store.multi_get, keys)
        self.peers = {r: json.loads(v) for r, v in enumerate(values)}
        now = self.clock()
        self._seen = {r: (-1, now) for r in range(self.world_size)}
        self.joined.set()
        return True

    def _read_abort(self) -> Stop | None:
        if not self._call(self._beat_store.check, ["abort"]):
            return None
        record = json.loads(self._call(self._beat_store.get, "abort"))
        return Stop(f"stopping: {record['cause']}{self._kill_note(record['lost'])}", None, record["lost"])

    def _leave(self, stop: Stop) -> None:
        """Tell the others (first cause wins), print the line, mark this rank done, wait for the others, kill the
        hung ranks on this host, exit 1."""
        self._leaving.set()
        try:
            if stop.store_ok and stop.cause:
                self._call(self._beat_store.compare_set, "abort", "",
                           json.dumps({"cause": stop.cause, "lost": stop.lost}))
            self._say(stop.text)
            if stop.store_ok:
                self._mark_done()
                # The rank serving the store keeps it up until the others are done with it; under torchrun every
                # rank waits for the others to print their line, as the first process to go makes the agent stop
                # the rest. (Without torchrun, nothing stops the others, and the store may go as soon as they
                # are all done: they must not touch it after that.)
                if self.hosts_store or not self.store_on_rank0:
                    leaving = self.world_size - len(set(stop.lost))
                    self._wait_for_others(leaving)
                    if not self.store_on_rank0:
                        # The agent takes its store down as soon as one of its own ranks has gone: the ranks on
                        # its host go last, after every other rank's last call (a call to a store that has gone
                        # prints torch's C++ stack trace).
                        self._call(self._beat_store.add, "left", 1)
                        if self.store_here:
                            self._wait_for_others(leaving, "left")
        except Exception:
            pass  # the store failed on the way out: nobody else can be told
        finally:
            self._kill_local(stop.lost)
            self._flush_and_exit()

    def _finish(self) -> None:
        try:
            self._mark_done()
            if self.hosts_store and not self._wait_for_others(self.world_size):
                late = [r for r, v in enumerate(self._call(self._beat_store.multi_get, self._hb_keys))
                        if int(v) < DONE]
                say(f"[distllama] warning: {_ranks(late)} had not finished {self.peer_timeout:g} s after rank 0; "
                    "exiting anyway")
        finally:
            self._finished.set()

    def _mark_done(self) -> None:
        self._call(self._beat_store.add, f"hb/{self.rank}", DONE)
        self._call(self._beat_store.add, "done", 1)

    def _wait_for_others(self, ranks_leaving: int, counter: str = "done") -> bool:
        deadline = self.clock() + self.peer_timeout
        while self._call(self._beat_store.add, counter, 0) < ranks_leaving:
            if self.clock() > deadline:
                return False
            time.sleep(min(self.interval, 0.1))
        return True

    def _store_failed(self, e: Exception, pending_s: float) -> Stop:
        """The store's connection broke after the call had waited pending_s."""
        if self.store_on_rank0 and 0 in self.peers:
            if pending_s > 2 * self.interval:  # it hung first (another rank has just killed it, say)
                return Stop(f"stopping: rank 0 stopped responding (the rendezvous store it serves at "
                            f"{self.store_address} did not answer for {pending_s:.0f} s), and is gone now",
                            store_ok=False)
            for _ in range(10):  # the connection drops while the process exits, just before it is gone
                if self._is_local(0) and process_gone(self.peers[0]["pid"]):
                    return Stop(f"stopping: rank 0 died (its process, {self._where(0)}, is gone), and with it the "
                                "rendezvous store it served", store_ok=False)
                time.sleep(0.05)
        return Stop(f"stopping: lost the rendezvous store at {self.store_address}: {error_line(e)}", store_ok=False)

    # ---- the guard ---------------------------------------------------------------------------------------------

    def _guard_loop(self) -> None:
        while True:
            time.sleep(self.interval)
            started = self._pending_since
            if started is not None and self.clock() - started > self.peer_timeout:
                return self._store_silent(self.clock() - started)

    def _store_silent(self, seconds: float) -> None:
        if self.store_on_rank0:
            lost = [0]
            text = (f"stopping: rank 0 stopped responding (the rendezvous store it serves at {self.store_address} "
                    f"has not answered for {seconds:.0f} s){self._kill_note(lost)}")
        else:
            lost = []
            text = (f"stopping: the rendezvous store at {self.store_address} (torchrun's agent) has not answered "
                    f"for {seconds:.0f} s")
        self._leaving.set()
        self._say(text)
        self._kill_local(lost)
        self._flush_and_exit()

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _call(self, fn, *args):
        """A store call of the beat, watched by the guard: it never returns if the store's process is stopped."""
        self._pending_since = self._last_call_started = self.clock()
        try:
            return fn(*args)
        finally:
            self._pending_since = None

    def _say(self, text: str) -> None:
        with self._lock:
            first, self._said = not self._said, True
        if first:
            say(LINE.format(rank=self.rank, text=text))

    def _is_local(self, r: int) -> bool:
        peer = self.peers.get(r)
        return (r != self.rank and peer is not None and peer["machine"] is not None
                and peer["machine"] == self.identity["machine"])

    def _local_peers(self) -> list[int]:
        return [r for r in self.peers if self._is_local(r)]

    def _where(self, r: int) -> str:
        return f"pid {self.peers[r]['pid']} on {'this host' if self._is_local(r) else self.peers[r]['host']}"

    def _kill_note(self, ranks: list[int]) -> str:
        local = [r for r in ranks if self._is_local(r) and not process_gone(self.peers[r]["pid"])]
        return "".join(f"; killing rank {r} ({self._where(r)})" for r in local)

    def _kill_local(self, ranks: list[int]) -> None:
        """SIGKILL the hung ranks on this host: a stopped process never exits by itself."""
        for r in ranks:
            if self._is_local(r) and not process_gone(self.peers[r]["pid"]):
                try:
                    self._kill(self.peers[r]["pid"], signal.SIGKILL)
                except OSError:
                    pass

    def _flush_and_exit(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        self._exit(1)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
