"""Memory a rank needs against memory its device has: KV cache sizes, a free-memory check before allocating, and
out-of-memory failures turned into one line with the numbers and what to change.

    kv_cache_bytes(batch, max_len, layers, kv_heads, head_dim, dtype)  # keys + values of one stage on one rank
    check_memory(needed_bytes, device, what)                           # OutOfMemory if the device lacks it
    with allocating(what, needed_bytes, device): ...                   # an allocation failure as OutOfMemory
"""

import ctypes
import sys
from contextlib import contextmanager

import torch

HINT = ("use a smaller --batch-size / --max-batch-size, more --tp or --pp ranks, or a shorter --max-new-tokens / "
        "--max-length")


class OutOfMemory(RuntimeError):
    """Not enough device memory for what the run asks; one line with needed vs free and the hint."""


def kv_cache_bytes(batch: int, max_len: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of a static KV cache: a key and a value tensor [batch, kv_heads, max_len, head_dim] per layer."""
    return 2 * layers * batch * kv_heads * max_len * head_dim * dtype.itemsize


def free_bytes(device) -> int | None:
    """What this process can still allocate on device: on cuda the driver's free memory plus what torch's caching
    allocator holds unused; on cpu the kernel's MemAvailable. None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def check_memory(needed_bytes: int, device, what: str) -> None:
    """Refuse, before allocating, what cannot fit: OutOfMemory naming what, the bytes needed and free, and the hint."""
    free = free_bytes(device)
    if free is not None and needed_bytes > free:
        raise OutOfMemory(f"{what} needs {size(needed_bytes)} but {torch.device(device)} has {size(free)} free: "
                          f"{HINT}")


@contextmanager
def allocating(what: str, needed_bytes: int, device):
    """An allocation that fails anyway (the free-memory check is a snapshot; other processes share the device)."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError) as error:
        raise _oom(what, needed_bytes, device) from error
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):  # torch's CPU allocator failing
            raise
        raise _oom(what, needed_bytes, device) from error


def _oom(what: str, needed_bytes: int, device) -> OutOfMemory:
    free = free_bytes(device)
    free_text = f"{size(free)} free" if free is not None else "free memory unknown"
    return OutOfMemory(f"out of memory allocating {what} ({size(needed_bytes)}; {free_text} on "
                       f"{torch.device(device)}): {HINT}")


def size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def keep_freed_memory() -> bool:
    """On Linux with glibc: keep freed memory in the process (mallopt), so that the large temporaries of every step
    reuse pages instead of mapping fresh ones and faulting them in (a prefill step of 1,500 tokens on the demo model:
    560,000 page faults and 18% of its time). The process keeps its peak memory instead of returning it.
    Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 31))
