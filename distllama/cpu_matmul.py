"""Float32 matmuls on CPUs with AVX-512 or AVX2: a small C kernel (cpu_matmul.c), built with decode_attention.c.

A decode step with few rows is a read of every weight. oneDNN's kernels read the demo's weights at about 12 GB/s on
one row here, and F.linear's MKL rounds rows 1-15 differently from 16 and up. The kernel streams each weight once
per step from a panel layout (16 output columns, k-major), and keeps a block of it in L1 while every row of the step
passes, the next block coming into L2 meanwhile. On the demo's matmuls (30 layers and the lm_head, one thread, this
project's CPU, AVX-512): 34.8 against oneDNN's 48.2 ms for one row, 70.9 against 97.1 ms for 32 rows, 129 against
143 ms for 64; prefill (2048 rows) 166-186 against oneDNN's 172-190 GFLOP/s, where the down projection is about 10%
slower and the others within 3%.

Every output element is one chain of fused multiply-adds over the input in order, then the bias: a row's bits do not
depend on the other rows, their count, the thread count or the instruction set (the promise oneDNN kept only with a
lone row's copy beside it). They differ from F.linear's in the last bits, as oneDNN's do. Used for float32 weights on
the CPU with `--matmul auto` (the default) where the kernels build (distllama.cpu_kernels); elsewhere oneDNN or
F.linear.
"""

import ctypes
from functools import cache

import torch
import torch.nn.functional as F

from distllama.cpu_kernels import function

PANEL = 16  # output columns per panel: one AVX-512 register of float32, two of AVX2


@cache
def kernel():
    """The compiled kernel (distllama.cpu_kernels), or None where it cannot run here."""
    c_i64, c_ptr = ctypes.c_int64, ctypes.c_void_p
    return function("cpu_matmul", [c_ptr, c_i64, c_ptr, c_ptr, c_ptr, c_i64, c_i64, c_i64, ctypes.c_int])


def usable(weight: torch.Tensor) -> bool:
    """Whether this weight's matmuls can take the kernel (builds it on first use)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2 and kernel() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] as panels [ceil(out / 16), in, 16], zero columns past out."""
    out_features, in_features = weight.shape
    padded = F.pad(weight.detach(), (0, 0, 0, -out_features % PANEL))
    return padded.view(-1, PANEL, in_features).transpose(1, 2).contiguous()


def cpu_matmul(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] W^T (+ bias) for W packed by `pack`: [..., out_features]."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = rows.new_empty(rows.shape[0], out_features)
    if bias is not None:
        bias = bias.contiguous()
    if rows.shape[0] and kernel()(rows.data_ptr(), rows.stride(0), panels.data_ptr(),
                                  None if bias is None else bias.data_ptr(), out.data_ptr(), rows.shape[0],
                                  out_features, rows.shape[1], torch.get_num_threads()):
        raise MemoryError("cpu_matmul: no memory to lay out the rows")
    return out.view(*x.shape[:-1], out_features)
