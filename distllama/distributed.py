"""The (dp, pp, tp) grid of ranks, built once from the launcher's environment, the rendezvous store behind it, and
the few collectives on it.

Global rank = dp_rank * (pp * tp) + pp_rank * tp + tp_rank: a data-parallel replica is pp * tp consecutive ranks
(one model, its own driver: its first rank), and a tensor-parallel group is tp consecutive ranks. With one node per
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


def resolve_degrees(world_size: int, tp: int | None, pp: int | None, dp: int | None = None) -> tuple[int, int, int]:
    """Fill in dp = 1, pp = 1 and tp = world_size // (dp * pp) when not given; dp * pp * tp must equal the world
    size. Returns (tp, pp, dp)."""
    pp, dp = 1 if pp is None else pp, 1 if dp is None else dp
    if pp < 1 or dp < 1 or (tp is not None and tp < 1):
        raise LaunchError(f"--tp, --pp and --dp must be positive (got tp={tp}, pp={pp}, dp={dp})")
    if tp is None:
        if world_size % (pp * dp):
            raise LaunchError(f"world size {world_size} is not divisible by --dp {dp} x --pp {pp}")
        tp = world_size // (pp * dp)
    if dp * pp * tp != world_size:
        shown = f"dp={dp} x tp={tp} x pp={pp} = {dp * tp * pp}" if dp > 1 else f"tp={tp} x pp={pp} = {tp * pp}"
        what = "dp * tp * pp" if dp > 1 else "tp * pp"
        raise LaunchError(f"{what} must equal the world size: {shown}, but {world_size} process(es) were launched")
    return tp, pp, dp


class Grid:
    """This rank's coordinates in the (dp, pp, tp) grid, its device, and the process groups it talks through.

    store: the rendezvous store (keys under "distllama/"; None on one process) for whatever the ranks must share
    outside collectives. Its calls wait at most the --dist-timeout when the store answers, and forever when the
    process serving it is stopped: the watchdog ends every rank then.
    Groups: tp_group (the backend's) for the tensor-parallel collectives; on gloo, whatever the backend, the plans and
    results of the pipeline (control_group, control_tp_group: see distllama.pipeline) and the results replicas send
    rank 0 (results_group, with dp > 1).
    """

    def __init__(self, launch: Launch, tp: int, pp: int, device: torch.device, dp: int = 1, groups: dict | None = None,
                 store=None, watchdog: Watchdog | None = None, load_timeout_s: float = 1800.0):
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank
        self.tp, self.pp, self.dp = tp, pp, dp
        self.dp_rank, in_replica = divmod(self.rank, pp * tp)
        self.pp_rank, self.tp_rank = divmod(in_replica, tp)
        self.driver_rank = self.dp_rank * pp * tp  # the replica's first rank runs its engine
        self.device = device
        groups = groups or {}
        self.tp_group = groups.get("tp")
        self.control_group, self.control_tp_group = groups.get("control"), groups.get("control_tp")
        self.results_group = groups.get("results")
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
        """A replica's first rank reads the prompts and drives its engine; the other ranks of the replica follow it."""
        return self.rank == self.driver_rank

    @property
    def is_writer(self) -> bool:
        """Global rank 0 writes every result (its replica's and the others'), in input order."""
        return self.rank == 0

    def rank_of(self, pp_rank: int, tp_rank: int) -> int:
        """The global rank at (pp_rank, tp_rank) of this rank's replica."""
        return self.driver_rank + pp_rank * self.tp + tp_rank


def init_grid(tp: int | None, pp: int | None, device: str = "auto", timeout_s: float = 300.0,
              launch: Launch | None = None, *, dp: int | None = None, backend: str = "auto",
              load_timeout_s: float = 1800.0, peer_timeout_s: float = 30.0) -> Grid:
    """Join the rendezvous, start the watchdog and torch.distributed (when more than one process runs), and build
    the grid. Call once per process. backend: auto (nccl on cuda, gloo on cpu), nccl or gloo (gloo also moves cuda
    tensors: several ranks may then share one GPU, which nccl refuses)."""
    launch = launch or Launch.from_env()
    tp, pp, dp = resolve_degrees(launch.world_size, tp, pp, dp)
    if launch.world_size == 1:
        return Grid(launch, tp, pp, pick_device(device, launch.local_rank))
    base, address, on_rank0 = connect_store(launch, load_timeout_s)
    store = dist.PrefixStore("distllama", base)
    watchdog = Watchdog(dist.PrefixStore("liveness", store), launch.rank, launch.world_size, peer_timeout_s,
                        store_address=address, store_on_rank0=on_rank0).start()
    torch_device = pick_device(device, launch.local_rank)  # after the watchdog: a rank without its GPU stops them all
    watchdog.wait_joined(load_timeout_s)
    base.set_timeout(timedelta(seconds=timeout_s))
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if backend == "nccl" and torch_device.type != "cuda":
        raise LaunchError("--backend nccl needs --device cuda")
    if backend == "nccl":
        # A timed-out NCCL collective aborts its communicator and raises instead of hanging (torchrun sets this for
        # its workers; plain srun tasks need it too).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, store=base, rank=launch.rank, world_size=launch.world_size,
                            timeout=timedelta(seconds=timeout_s),
                            device_id=torch_device if backend == "nccl" else None)
    # Every rank must create every group, in the same order, even the groups it is not part of.
    timeout = timedelta(seconds=timeout_s)
    gloo = backend == "gloo"
    groups = {"control": None if gloo else dist.new_group(backend="gloo", timeout=timeout)}
    for replica in range(dp):
        for stage in range(pp):
            first = (replica * pp + stage) * tp
            ranks = list(range(first, first + tp))
            group = dist.new_group(ranks, timeout=timeout) if tp > 1 else None
            control = group if gloo or tp == 1 else dist.new_group(ranks, backend="gloo", timeout=timeout)
            if launch.rank in ranks:
                groups["tp"], groups["control_tp"] = group, control
    if dp > 1:
        groups["results"] = dist.new_group([r * pp * tp for r in range(dp)], backend="gloo", timeout=timeout)
    return Grid(launch, tp, pp, torch_device, dp, groups, store, watchdog, load_timeout_s)


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


# gloo's all-reduce of a decode step's activations costs ~1.7 ms on the 2-core test machine whatever their size up to
# a few hundred KB (tp 2, 32 x 576 floats: 1.9 ms), an all-gather of them and a local sum 0.5-0.7 ms; from a few MB
# on (a long prefill step) the all-reduce is faster
GATHER_SUM_BYTES = 1 << 20
# torch 2.13 renamed all_gather_into_tensor (deprecated there, with a warning in every tp run) to all_gather_single;
# the GPU machines' torch 2.11 has only the old name
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_reduce_tp(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Sum partial results over the tensor-parallel group (in place); nothing to do on one rank."""
    if grid.tp == 1:
        return x
    if x.device.type == "cpu" and x.numel() * x.element_size() <= GATHER_SUM_BYTES:
        # every rank sums the same gathered parts in rank order: the same bits everywhere (with tp 2, a + b as the
        # all-reduce gives)
        parts = x.new_empty((grid.tp, *x.shape))
        all_gather_single(parts.view(-1), x.contiguous().view(-1), group=grid.tp_group)
        return x.copy_(parts.sum(dim=0))
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
