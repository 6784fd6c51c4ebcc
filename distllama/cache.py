"""Static KV cache for one pipeline stage: one preallocated [B, kv_heads_held, max_len, head_dim] pair per layer.

Preallocated so that decode steps write in place at `cache_position` (the shape CUDA graphs need later); rows are
reordered or dropped with `reorder` (beam search, finished sequences).
"""

import torch

from distllama.memory import allocating, check_memory, kv_cache_bytes


class KVCache:
    def __init__(self, layer_ids, batch_size: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch_size, kv_heads, max_len, head_dim)  # (B, kv_heads, S_max, hd)
        self.max_len = max_len
        # Checked first: on cpu an allocation past the free memory is not refused but ends in the OOM killer.
        what = f"the KV cache ({batch_size} sequences x {max_len} positions, {len(layer_ids)} layers)"
        needed = kv_cache_bytes(batch_size, max_len, len(layer_ids), kv_heads, head_dim, dtype)
        check_memory(needed, device, what)
        with allocating(what, needed, device):
            self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
            self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}

    def update(self, layer_id: int, cache_position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, kv_heads, T, hd] at cache_position [T]; return keys/values of positions [0, last + 1)."""
        end = int(cache_position[-1]) + 1
        if end > self.max_len:
            raise RuntimeError(f"KV cache holds {self.max_len} positions, position {end - 1} was asked for")
        keys, values = self.keys[layer_id], self.values[layer_id]
        keys.index_copy_(2, cache_position, k)
        values.index_copy_(2, cache_position, v)
        return keys[:, :, :end], values[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i]; index may be shorter than the batch (finished rows dropped)."""
        for store in (self.keys, self.values):
            for layer_id, buf in store.items():
                store[layer_id] = buf.index_select(0, index)
