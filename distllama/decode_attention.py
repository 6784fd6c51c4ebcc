"""Decode attention on CPUs with AVX-512 or AVX2: a small C kernel (decode_attention.c), compiled once per machine.

In a decode step each slot's query heads read that slot's cached keys and values. SDPA's CPU kernel did so at about
half the memory bandwidth of a plain read (one small matmul per slot and kv head, the next one's data fetched only
when it starts), and every row read up to its step's (or run's) longest key length. The kernel reads each row's own
keys only, and prefetches the next block while it computes: on the demo's batch-32 decode step (30 layers, 32 slots,
keys 96-192) it took 19 against SDPA's 41 ms here.

It is used for float32 decode steps on the CPU with `--attn auto` (the default) where the CPU has AVX-512 or AVX2
and a C compiler is found (distllama.cpu_kernels builds it); elsewhere attention stays SDPA. Each row is computed on
its own in a fixed order, so a row's bits do not depend on the rest of the batch, the key lengths of others, the
thread count or the instruction set; they differ from SDPA's in the last bits (its own exp and summation order), as
SDPA's differ from eager attention's.
"""

import ctypes
from functools import cache

import torch

from distllama.cpu_kernels import function

MAX_GROUP = 64  # query heads per kv head the kernel takes (decode_attention.c)


@cache
def kernel():
    """The compiled kernel (distllama.cpu_kernels), or None where it cannot run here."""
    c_int, c_i64, c_ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    return function("decode_attention", [c_ptr, c_i64, c_ptr, c_ptr, c_i64, c_i64, c_ptr, c_ptr, c_int, c_int,
                                         c_int, c_int, ctypes.c_float, c_int])


def usable(dtype: torch.dtype, device: torch.device, group: int) -> bool:
    """Whether decode steps of this attention can take the kernel (builds it on first use)."""
    return device.type == "cpu" and dtype == torch.float32 and group <= MAX_GROUP and kernel() is not None


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q (n, kv_heads * group, hd): one token per row, heads contiguous; keys, values (n or more slots, kv_heads,
    positions, hd): row i reads slot i's keys [0, lengths[i]). Returns (n, kv_heads * group, hd)."""
    n, heads, hd = q.shape
    kv_heads = keys.shape[1]
    if q.stride(2) != 1 or q.stride(1) != hd or keys.stride() != values.stride() or keys.stride()[2:] != (hd, 1):
        raise ValueError("decode_attention: q rows, keys and values must have contiguous heads")
    lengths = lengths.contiguous()
    out = q.new_empty(n, heads, hd)
    failed = kernel()(q.data_ptr(), q.stride(0), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1),
                      lengths.data_ptr(), out.data_ptr(), n, kv_heads, heads // kv_heads, hd, scale,
                      torch.get_num_threads())
    if failed:
        raise MemoryError("decode_attention: no memory for the attention scores")
    return out
