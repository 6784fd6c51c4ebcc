"""The tensor-parallel sum on CPU: small tensors go through an all-gather and a local sum (gloo's all-reduce is
slower there), large ones through the all-reduce; every rank must get the same bits, and with tp 2 the bits of the
all-reduce itself (a + b)."""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from distllama.distributed import GATHER_SUM_BYTES, all_reduce_tp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    grid = SimpleNamespace(tp=world, tp_group=None)
    results = {}
    # a decode step's activations (gathered and summed) and a long prefill's (all-reduced)
    for name, shape in {"small": (32, 576), "large": (GATHER_SUM_BYTES // 4 // 576 + 1, 576)}.items():
        torch.manual_seed(rank)
        x = torch.randn(shape) * 10
        expected = x.clone()
        dist.all_reduce(expected)
        ours = all_reduce_tp(x, grid)
        assert ours.data_ptr() == x.data_ptr()  # in place
        gathered = [torch.empty_like(ours) for _ in range(world)]
        dist.all_gather(gathered, ours)
        results.update({f"{name}.ours": ours, f"{name}.all_reduce": expected})
        results.update({f"{name}.rank{i}": part for i, part in enumerate(gathered)})
    if rank == 0:
        save_file(results, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_all_reduce_tp_same_bits_on_every_rank(tmp_path, world):
    out = str(tmp_path / "results.safetensors")
    mp.start_processes(worker, args=(world, free_port(), out), nprocs=world, start_method="spawn")
    r = load_file(out)
    for name in ("small", "large"):
        ours = r[f"{name}.ours"]
        for i in range(world):
            assert torch.equal(r[f"{name}.rank{i}"], ours), (name, i)
        if world == 2 or name == "large":
            assert torch.equal(ours, r[f"{name}.all_reduce"]), name
        else:  # three parts summed in another order than gloo's: float rounding only
            torch.testing.assert_close(ours, r[f"{name}.all_reduce"], rtol=1e-6, atol=1e-5)
