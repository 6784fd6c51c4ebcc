"""The (pp, tp) grid of ranks, built once from the launcher's environment, the rendezvous store behind it, and the
few collectives on it.

Global rank = pp_rank * tp + tp_rank, so a tensor-parallel group is tp consecutive ranks: with one node per
`tp` GPUs (torchrun --nproc-per-node tp), all-reduces stay inside a node and only hidden states cross nodes.

Three budgets bound every wait (see distllama.watchdog for the first): a rank that dies or stops responding is
found within peer_timeout_s; start-up phases (joining, reading prompts, loading weights) synchronise through the
store within load_timeout_s; a collective or send/recv waits at most timeout_s for a live but busy peer.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distllama.watchdog import RankFailure, Watchdog, error_line
from distllama.watchdog import active as active_watchdog


class LaunchError(ValueError):
    """The launch does not fit the requested parallel layout."""


@dataclass
class Launch:
    """Where this process sits, as the launcher (torchrun, srun, or nothing) told it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, env=os.environ) -> "Launch":
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or anything that speaks its variables
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # plain `srun python -m distllama.generate`
            return cls(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        return cls()


def resolve_degrees(world_size: int, tp: int | None, pp: int | None) -> tuple[int, int]:
    """Fill in tp = world_size // pp and pp = 1 when not given; tp * pp must equal the world size."""
    pp = 1 if pp is None else pp
    if pp < 1 or (tp is not None and tp < 1):
        raise LaunchError(f"--tp and --pp must be positive (got tp={tp}, pp={pp})")
    if tp is None:
        if world_size % pp:
            raise LaunchError(f"world size {world_size} is not divisible by --pp {pp}")
        tp = world_size // pp
    if tp * pp != world_size:
        raise LaunchError(f"tp * pp must equal the world size: tp={tp} x pp={pp} = {tp * pp}, "
                          f"but {world_size} process(es) were launched")
    return tp, pp


class Grid:
    """This rank's coordinates in the (pp, tp) grid, its device, and the process groups it talks through.

    store: the rendezvous store (keys under "distllama/"; None on one process) for whatever the ranks must share
    outside collectives. Its calls wait at most the --dist-timeout when the store answers, and forever when the
    process serving it is stopped: the watchdog ends every rank then.
    """

    def __init__(self, launch: Launch, tp: int, pp: int, device: torch.device, tp_group=None, store=None,
                 watchdog: Watchdog | None = None, load_timeout_s: float = 1800.0):
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank
        self.tp, self.pp = tp, pp
        self.pp_rank, self.tp_rank = divmod(self.rank, tp)
        self.device = device
        self.tp_group = tp_group
        self.store, self.watchdog, self.load_timeout_s = store, watchdog, load_timeout_s
        self.phases = 0  # on_every_rank calls so far: each synchronises under its own keys
        # Where tensors handed to collectives must live: nccl only moves cuda tensors (device is cuda exactly
        # when the backend is nccl, see init_grid).
        self.comm_device = device if self.world_size > 1 and device.type == "cuda" else torch.device("cpu")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_driver(self) -> bool:
        """Global rank 0 tokenizes, samples and writes results; every other rank follows it."""
        return self.rank == 0

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp + tp_rank


def init_grid(tp: int | None, pp: int | None, device: str = "auto", timeout_s: float = 300.0,
              launch: Launch | None = None, *, load_timeout_s: float = 1800.0, peer_timeout_s: float = 30.0) -> Grid:
    """Join the rendezvous, start the watchdog and torch.distributed (when more than one process runs), and build
    the grid. Call once per process."""
    launch = launch or Launch.from_env()
    tp, pp = resolve_degrees(launch.world_size, tp, pp)
    if launch.world_size == 1:
        return Grid(launch, tp, pp, pick_device(device, launch.local_rank))
    base, address, on_rank0 = connect_store(launch, load_timeout_s)
    store = dist.PrefixStore("distllama", base)
    watchdog = Watchdog(dist.PrefixStore("liveness", store), launch.rank, launch.world_size, peer_timeout_s,
                        store_address=address, store_on_rank0=on_rank0).start()
    torch_device = pick_device(device, launch.local_rank)  # after the watchdog: a rank without its GPU stops them all
    watchdog.wait_joined(load_timeout_s)
    base.set_timeout(timedelta(seconds=timeout_s))
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if backend == "nccl":
        # A timed-out NCCL collective aborts its communicator and raises instead of hanging (torchrun sets this for
        # its workers; plain srun tasks need it too).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, store=base, rank=launch.rank, world_size=launch.world_size,
                            timeout=timedelta(seconds=timeout_s),
                            device_id=torch_device if backend == "nccl" else None)
    # Every rank must create every group, in the same order, even the groups it is not part of.
    tp_group = None
    for stage in range(pp):
        ranks = list(range(stage * tp, (stage + 1) * tp))
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s)) if tp > 1 else None
        if launch.rank in ranks:
            tp_group = group
    return Grid(launch, tp, pp, torch_device, tp_group, store, watchdog, load_timeout_s)


def connect_store(launch: Launch, timeout_s: float) -> tuple[dist.Store, str, bool]:
    """The c10d TCPStore on MASTER_ADDR:MASTER_PORT, as torch's env:// rendezvous makes it: torchrun's agent already
    serves one there (TORCHELASTIC_USE_AGENT_STORE), else rank 0 does. Returns it, its address, and whether rank 0
    serves it."""
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise LaunchError(f"{var} is not set: launch with torchrun, or export MASTER_ADDR/MASTER_PORT "
                              "before srun (see slurm/)")
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    on_rank0 = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    serve = on_rank0 and launch.rank == 0
    try:
        store = dist.TCPStore(host, port, launch.world_size, is_master=serve, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=False, multi_tenant=serve,
                              use_libuv=os.environ.get("USE_LIBUV", "1") == "1")
    except (RuntimeError, ValueError) as e:
        doing = "serve" if serve else "reach"
        raise LaunchError(f"cannot {doing} the rendezvous store at {host}:{port} (MASTER_ADDR:MASTER_PORT): "
                          f"{error_line(e)[:300]}") from None
    return store, f"{host}:{port}", on_rank0


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise LaunchError(f"--device must be auto, cpu or cuda, got {device!r}")
    if not torch.cuda.is_available():
        raise LaunchError("--device cuda was asked for, but torch sees no CUDA device")
    if local_rank >= torch.cuda.device_count():
        raise LaunchError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def all_reduce_tp(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Sum partial results over the tensor-parallel group (in place); nothing to do on one rank."""
    if grid.tp > 1:
        dist.all_reduce(x, group=grid.tp_group)
    return x


def all_gather_tp(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Concatenate each tp rank's last-dim shard, in tp-rank order: [.., n] -> [.., tp * n]."""
    if grid.tp == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(grid.tp)]
    dist.all_gather(shards, x.contiguous(), group=grid.tp_group)
    return torch.cat(shards, dim=-1)


def on_every_rank(phase, grid: Grid, what: str = "start-up"):
    """Run one start-up phase (reading prompts, loading weights) on every rank, then learn through the store whether
    it worked everywhere: if any rank failed, every rank raises (the failing one its own error, at once; the others
    a RankFailure naming it), so all exit together instead of the healthy ranks waiting for a rank that is gone.
    The wait is bounded by the start-up budget (--load-timeout), not the collective timeout: loading may take
    minutes on one rank and seconds on another."""
    try:
        result, error = phase(), None
    except Exception as e:
        result, error = None, e
    if grid.world_size > 1:
        grid.phases += 1
        keys = [f"phase/{grid.phases}/{r}" for r in range(grid.world_size)]
        grid.store.set(keys[grid.rank], "ok" if error is None else f"failed: {error_line(error)}")
    if error is not None:
        raise error  # at once: the others read it here, or from the watchdog once this rank has left
    if grid.world_size > 1:
        try:
            grid.store.wait(keys, timedelta(seconds=grid.load_timeout_s))
        except dist.DistStoreError:
            late = [r for r, key in enumerate(keys) if not grid.store.check([key])]
            raise RankFailure(f"stopping: rank(s) {', '.join(map(str, late))} did not finish {what} within "
                              f"--load-timeout {grid.load_timeout_s:g} s") from None
        reports = {r: v.decode() for r, v in enumerate(grid.store.multi_get(keys))}
        failed = {r: v.removeprefix("failed: ") for r, v in reports.items() if v != "ok"}
        if failed:
            first = min(failed)
            others = [r for r in failed if r != first]
            also = f" (rank(s) {', '.join(map(str, others))} failed too)" if others else ""
            raise RankFailure(f"stopping: rank {first} failed: {failed[first]}{also}")
    return result


def shutdown() -> None:
    """Normal end: mark this rank done for the watchdog (the rank serving the store waits for the others), then
    close torch.distributed."""
    if active_watchdog() is not None:
        active_watchdog().finish()
    if dist.is_initialized():
        dist.destroy_process_group()
