"""The (pp, tp) grid of ranks, built once from the launcher's environment, and the few collectives on it.

Global rank = pp_rank * tp + tp_rank, so a tensor-parallel group is tp consecutive ranks: with one node per
`tp` GPUs (torchrun --nproc-per-node tp), all-reduces stay inside a node and only hidden states cross nodes.
"""

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class LaunchError(ValueError):
    """The launch does not fit the requested parallel layout."""


class RankFailure(RuntimeError):
    """Another rank failed; this one stops too."""


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
    """This rank's coordinates in the (pp, tp) grid, its device, and the process groups it talks through."""

    def __init__(self, launch: Launch, tp: int, pp: int, device: torch.device, tp_group=None, control_group=None,
                 control_tp_group=None):
        self.rank, self.world_size, self.local_rank = launch.rank, launch.world_size, launch.local_rank
        self.tp, self.pp = tp, pp
        self.pp_rank, self.tp_rank = divmod(self.rank, tp)
        self.device = device
        self.tp_group = tp_group
        # Step plans and results (distllama.pipeline) travel on gloo, on the CPU, whatever the backend.
        self.control_group, self.control_tp_group = control_group, control_tp_group
        self.driver_rank = 0
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


def init_grid(tp: int | None, pp: int | None, device: str = "auto", timeout_s: float = 600.0,
              launch: Launch | None = None) -> Grid:
    """Start torch.distributed (when more than one process runs) and build the grid. Call once per process."""
    launch = launch or Launch.from_env()
    tp, pp = resolve_degrees(launch.world_size, tp, pp)
    torch_device = pick_device(device, launch.local_rank)
    if launch.world_size == 1:
        return Grid(launch, tp, pp, torch_device)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise LaunchError(f"{var} is not set: launch with torchrun, or export MASTER_ADDR/MASTER_PORT "
                              "before srun (see slurm/)")
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=torch_device if backend == "nccl" else None)
    # Every rank must create every group, in the same order, even the groups it is not part of.
    timeout = timedelta(seconds=timeout_s)
    control_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    tp_group = control_tp_group = None
    for stage in range(pp):
        ranks = list(range(stage * tp, (stage + 1) * tp))
        group = dist.new_group(ranks, timeout=timeout) if tp > 1 else None
        control = dist.new_group(ranks, backend="gloo", timeout=timeout) if tp > 1 and backend != "gloo" else group
        if launch.rank in ranks:
            tp_group, control_tp_group = group, control
    return Grid(launch, tp, pp, torch_device, tp_group, control_group, control_tp_group)


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


def on_every_rank(phase, grid: Grid):
    """Run one start-up phase (reading prompts, loading weights) on every rank, then learn whether it worked
    everywhere: if any rank failed, every rank raises (the failing ones their own error), so all exit together
    instead of the healthy ranks waiting in the next collective for a rank that is gone."""
    try:
        result, error = phase(), None
    except Exception as e:
        result, error = None, e
    if grid.world_size > 1:
        flags = torch.zeros(grid.world_size, dtype=torch.int32, device=grid.comm_device)
        flags[grid.rank] = error is not None
        dist.all_reduce(flags)
        failed = flags.nonzero().flatten().tolist()
        if failed and error is None:
            raise RankFailure(f"rank(s) {', '.join(map(str, failed))} failed (see their message); stopping")
    if error is not None:
        raise error
    return result


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
