"""The KV cache of one pipeline stage: a fixed number of slots, each one sequence's keys and values.

Per layer one preallocated [slots, kv_heads_held, max_len + 1, head_dim] pair. Every token is written in place at its
(slot, position), so a decode step has the same shapes every time (what torch.compile and CUDA graphs need). Column
`max_len` is scratch: idle decode rows write there, and no query ever reads it.
"""

import torch

from distllama.memory import allocating, check_memory, kv_cache_bytes


class KVCache:
    def __init__(self, layer_ids, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, max_len + 1, head_dim)  # (slots, kv_heads, positions + scratch, hd)
        self.slots, self.max_len = slots, max_len
        # Checked first: on cpu an allocation past the free memory is not refused but ends in the OOM killer.
        what = f"the KV cache ({slots} sequences x {max_len} positions, {len(layer_ids)} layers)"
        needed = kv_cache_bytes(slots, max_len + 1, len(layer_ids), kv_heads, head_dim, dtype)
        check_memory(needed, device, what)
        with allocating(what, needed, device):
            self.keys = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}
            self.values = {i: torch.zeros(shape, dtype=dtype, device=device) for i in layer_ids}

    @property
    def scratch(self) -> int:
        return self.max_len

    def write(self, layer_id: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v [N, kv_heads, hd] go to (slots[i], positions[i]); no two tokens share a place."""
        self.keys[layer_id][slots, :, positions] = k
        self.values[layer_id][slots, :, positions] = v

    def move(self, source: int, target: int) -> None:
        """Slot target takes slot source's contents (a request moving to a lower slot)."""
        for store in (self.keys, self.values):
            for buf in store.values():
                buf[target] = buf[source]

    def reorder(self, index: torch.Tensor) -> None:
        """Slots [0, len(index)) take the contents of slots index (beam search follows its beams)."""
        n = len(index)
        for store in (self.keys, self.values):
            for buf in store.values():
                buf[:n] = buf.index_select(0, index)
