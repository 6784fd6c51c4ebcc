"""Decode attention on CPUs with AVX-512: a small C kernel (decode_attention.c), compiled once per machine.

In a decode step each slot's query heads read that slot's cached keys and values. SDPA's CPU kernel did so at about
half the memory bandwidth of a plain read (one small matmul per slot and kv head, the next one's data fetched only
when it starts), and every row read up to its step's (or run's) longest key length. The kernel reads each row's own
keys only, and prefetches the next block while it computes: on the demo's batch-32 decode step (30 layers, 32 slots,
keys 96-192) it took 19 against SDPA's 41 ms here.

It is used for float32 decode steps on the CPU with `--attn auto` (the default) where the CPU has AVX-512 and a C
compiler is found ($CC, else cc or gcc); elsewhere attention stays SDPA. Each row is computed on its own in a fixed
order, so a row's bits do not depend on the rest of the batch, the key lengths of others, or the thread count; they
differ from SDPA's in the last bits (its own exp and summation order), as SDPA's differ from eager attention's.
"""

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_attention.c")
# AVX-512F and FMA only (not -march=native): the library may sit in a home folder shared by nodes of several CPU kinds
FLAGS = ["-O3", "-mavx512f", "-mfma", "-fopenmp", "-fPIC", "-shared"]
MAX_GROUP = 64  # query heads per kv head the kernel takes (decode_attention.c)


def _say(message: str) -> None:
    print(f"distllama: {message}; decode attention uses SDPA", file=sys.stderr)


@cache
def kernel():
    """The compiled kernel, or None where it cannot run here (said once on stderr where the CPU could run it but it
    cannot be built)."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc")]  # CC may hold flags
    if compiler[0] is None:
        _say("no C compiler found for the CPU decode-attention kernel (set CC, or pass --attn sdpa)")
        return None
    from distllama.demo import cache_root  # (demo imports the GGUF converter: only when a kernel is wanted)

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([*compiler, *FLAGS]).encode()).hexdigest()[:16]
    folder = cache_root() / "kernels"
    library = folder / f"decode_attention-{key}.so"
    try:
        if not library.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as staging:  # ranks building at once: each renames its own
                built = Path(staging) / library.name
                subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                               text=True, timeout=300)
                os.replace(built, library)
        function = ctypes.CDLL(str(library)).decode_attention
    except subprocess.CalledProcessError as e:
        last = (e.stderr or "").strip().splitlines()
        _say(f"{shlex.join(compiler)} could not build {SOURCE.name} ({last[-1] if last else f'exit {e.returncode}'})")
        return None
    except (OSError, subprocess.TimeoutExpired) as e:
        _say(f"cannot build or load the CPU decode-attention kernel in {folder} ({e})")
        return None
    c_int, c_i64, c_ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    function.argtypes = [c_ptr, c_i64, c_ptr, c_ptr, c_i64, c_i64, c_ptr, c_ptr, c_int, c_int, c_int, c_int,
                         ctypes.c_float, c_int]
    function.restype = c_int
    return function


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
