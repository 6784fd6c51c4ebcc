"""One pipeline stage of a Llama decoder, sharded over its tensor-parallel group.

A stage owns a contiguous range of layers (keyed by their global index, so checkpoint names never change), the
embedding if it is the first stage, the final norm and lm_head if it is the last (Llama's `base_model_pp_plan`).
Shapes are this rank's from the start; `load_stage` then reads only this rank's slices.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distllama.cache import KVCache
from distllama.config import LlamaConfig
from distllama.decode_attention import decode_attention, usable
from distllama.distributed import Grid
from distllama.parallel import (ColumnParallelLinear, PackableLinear, PackedWeight, ParallelLMHead, RMSNorm,
                                RowParallelLinear, VocabParallelEmbedding, dense, packed_weight)
from distllama.rope import RotaryEmbedding, rotate


class ParallelLayoutError(ValueError):
    """The model cannot be split the way the launch asks."""


def check_layout(config: LlamaConfig, tp: int, pp: int) -> None:
    """Refuse, before any weight is read, a split the model cannot take. Same answer on every rank."""
    if config.num_attention_heads % tp:
        raise ParallelLayoutError(f"num_attention_heads ({config.num_attention_heads}) is not divisible by "
                                  f"tp ({tp}); choose a tp that divides it")
    if config.intermediate_size < tp:  # the MLP's columns are split over the tp ranks: each needs one at least
        raise ParallelLayoutError(f"intermediate_size ({config.intermediate_size}) is smaller than tp ({tp}): every "
                                  "tp rank needs at least one of the MLP's columns; choose a smaller tp")
    if pp > config.num_hidden_layers:
        raise ParallelLayoutError(f"pp ({pp}) is larger than num_hidden_layers ({config.num_hidden_layers}): "
                                  "every stage needs at least one layer")


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    """Contiguous layer range of a stage; the first `num_layers % pp` stages take one extra layer (the last stage
    already carries the norm and the lm_head)."""
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


@dataclass
class StepBatch:
    """The tokens of one forward, flat: first `n_decode` decode rows (one token each, for the consecutive slots
    decode_start ...), then prefill chunks (several tokens of one slot each). Built alike on every rank of a
    pipeline from the step plan (distllama.pipeline); all tensors are on the stage's device."""

    positions: torch.Tensor  # [N] cache position of each token (idle decode rows: the cache's scratch column)
    slots: torch.Tensor  # [N] cache slot of each token
    rope_lengths: torch.Tensor | None  # [N] sequence length each token's rotary uses (dynamic / longrope only)
    decode_start: int = 0
    n_decode: int = 0
    # [n_decode, 1, 1, the longest run's key length] additive: 0 where a key may be seen, -inf not
    decode_mask: torch.Tensor | None = None
    kv_runs: tuple = ()  # (first row, end row, key length) per run of decode rows: its slots read keys [0, length)
    decode_lengths: torch.Tensor | None = None  # [n_decode] keys each decode row reads (stages with decode_kernel)
    chunks: tuple = ()  # (slot, start, length) per prefill chunk, in token order
    logit_index: torch.Tensor | None = None  # [n_logits] tokens whose next-token logits are wanted (None: every one)
    shard_logits: bool = False  # last stage: return this tp rank's vocabulary shard of the logits, not all of them
    split_head: bool = False  # last stage: return the normed hidden states and the logits of ids [split, V) only


class Attention(nn.Module):
    """This rank's query heads, and the kv heads they read (kv heads are replicated when tp > kv heads)."""

    def __init__(self, config: LlamaConfig, layer_id: int, grid: Grid, dtype, device, sdpa: bool,
                 decode_kernel: bool = False):
        super().__init__()
        name = f"model.layers.{layer_id}.self_attn"
        hd, n_heads, n_kv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
        self.layer_id, self.head_dim, self.sdpa = layer_id, hd, sdpa
        self.heads_per_rank = n_heads // grid.tp
        first_head = grid.tp_rank * self.heads_per_rank
        group = n_heads // n_kv  # query heads per kv head
        first_kv = first_head // group
        self.kv_heads_held = (first_head + self.heads_per_rank - 1) // group - first_kv + 1
        # kv head (in this rank's held set) each local query head reads: GQA fan-out without assuming tp | kv heads
        kv_for_head = [(first_head + h) // group - first_kv for h in range(self.heads_per_rank)]
        self.register_buffer("kv_for_head", torch.tensor(kv_for_head, device=device), persistent=False)
        # Usually each held kv head serves the same number of consecutive query heads: attention then reads the
        # cache in place (a grouped view of the queries), with no copy of K/V per query head.
        self.group = self.heads_per_rank // self.kv_heads_held
        self.grouped = kv_for_head == [h // self.group for h in range(self.heads_per_rank)]
        # decode rows read only their own keys, in distllama.decode_attention (CPU, float32, AVX-512 or AVX2)
        self.decode_kernel = decode_kernel and self.grouped and usable(dtype, torch.device(device), self.group)
        q_rows = (first_head * hd, (first_head + self.heads_per_rank) * hd)
        kv_rows = (first_kv * hd, (first_kv + self.kv_heads_held) * hd)
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, [
            (f"{name}.q_proj", n_heads * hd, *q_rows),
            (f"{name}.k_proj", n_kv * hd, *kv_rows),
            (f"{name}.v_proj", n_kv * hd, *kv_rows),
        ], config.attention_bias, dtype, device)
        self.o_proj = RowParallelLinear(f"{name}.o_proj", n_heads * hd, q_rows, config.hidden_size,
                                        config.attention_bias, grid, dtype, device)
        self.scaling = hd ** -0.5

    def forward(self, x, cos, sin, batch: StepBatch, cache: KVCache):
        N, heads, kv_heads = x.shape[0], self.heads_per_rank, self.kv_heads_held
        qkv = self.qkv_proj.fused(x).view(N, heads + 2 * kv_heads, self.head_dim)
        qk = rotate(qkv[:, :heads + kv_heads], cos, sin)  # q and k heads side by side: one rotation for both
        q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads:]  # (N, heads or kv_heads, hd)
        cache.write(self.layer_id, batch.slots, batch.positions, k, v)
        keys, values = cache.keys[self.layer_id], cache.values[self.layer_id]  # (slots, kv_heads, S, hd)
        # each run of decode rows reads its own keys only (masked keys cost as much as the others)
        y = q.new_empty(q.shape) if batch.chunks or len(batch.kv_runs) > 1 else None
        for first, end, length in batch.kv_runs:
            slots = slice(batch.decode_start + first, batch.decode_start + end)
            if self.decode_kernel:
                decoded = decode_attention(q[first:end], keys[slots], values[slots], batch.decode_lengths[first:end],
                                           self.scaling)
            else:
                decoded = self._decode(q[first:end], keys[slots, :, :length], values[slots, :, :length],
                                       batch.decode_mask[first:end, :, :, :length])
            if y is None:  # a decode-only step of one run: no output buffer to assemble
                return self.o_proj(decoded.reshape(N, heads * self.head_dim))
            y[first:end] = decoded
        offset = batch.n_decode
        for slot, start, length in batch.chunks:
            end = start + length
            y[offset:offset + length] = self._prefill(q[offset:offset + length], keys[slot, :, :end],
                                                      values[slot, :, :end], start)
            offset += length
        return self.o_proj(y.view(N, heads * self.head_dim))

    def _decode(self, q, k, v, mask):
        """q (n, heads, hd), one token per slot; k, v (n, kv_heads, S, hd): that slot's cache. -> (n, heads, hd)"""
        n = q.shape[0]
        if self.grouped and self.sdpa:  # each kv head's query heads as rows of one query block: no K/V copy
            y = F.scaled_dot_product_attention(q.reshape(n, self.kv_heads_held, self.group, self.head_dim), k, v,
                                               attn_mask=mask, scale=self.scaling)
            return y.view(n, self.heads_per_rank, self.head_dim)
        return self._attend(q[:, :, None], k, v, mask).squeeze(2)

    def _prefill(self, q, k, v, start: int):
        """q (T, heads, hd): one slot's tokens at positions start ..; k, v (kv_heads, start + T, hd). -> (T, heads, hd)"""
        T, S = q.shape[0], k.shape[1]
        q, k, v = q.transpose(0, 1)[None], k[None], v[None]  # (1, heads, T, hd), (1, kv_heads, S, hd)
        if self.sdpa and self.grouped and start == 0:
            # Transformers' own call for an unpadded prompt: causal, GQA inside SDPA
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True)
        else:
            allowed = torch.arange(S, device=q.device)[None, :] <= torch.arange(start, start + T, device=q.device)[:, None]
            mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, float("-inf"))
            y = self._attend(q, k, v, mask)
        return y[0].transpose(0, 1)

    def _attend(self, q, k, v, mask):
        """q (B, heads, T, hd), k/v (B, kv_heads, S, hd), additive mask broadcastable to (B, heads, T, S)."""
        k, v = k.index_select(1, self.kv_for_head), v.index_select(1, self.kv_for_head)  # (B, heads, S, hd)
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        # eager, as Transformers' eager_attention_forward: for checking
        scores = (q @ k.transpose(2, 3)) * self.scaling + mask
        return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up fused in one column-parallel matmul."""

    def __init__(self, config: LlamaConfig, layer_id: int, grid: Grid, dtype, device):
        super().__init__()
        name = f"model.layers.{layer_id}.mlp"
        ff = config.intermediate_size
        cols = (grid.tp_rank * ff // grid.tp, (grid.tp_rank + 1) * ff // grid.tp)  # need not divide evenly
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [
            (f"{name}.gate_proj", ff, *cols), (f"{name}.up_proj", ff, *cols)], config.mlp_bias, dtype, device)
        self.down_proj = RowParallelLinear(f"{name}.down_proj", ff, cols, config.hidden_size, config.mlp_bias,
                                           grid, dtype, device)

    def forward(self, x):
        gate, up = self.gate_up_proj(x)
        return self.down_proj(F.silu(gate).mul_(up))  # in place: one temporary fewer, the same values


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int, grid: Grid, dtype, device, sdpa: bool,
                 decode_kernel: bool = False):
        super().__init__()
        name = f"model.layers.{layer_id}"
        self.input_layernorm = RMSNorm(f"{name}.input_layernorm", config.hidden_size, config.rms_norm_eps,
                                       dtype, device)
        self.self_attn = Attention(config, layer_id, grid, dtype, device, sdpa, decode_kernel)
        self.post_attention_layernorm = RMSNorm(f"{name}.post_attention_layernorm", config.hidden_size,
                                                config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, layer_id, grid, dtype, device)

    def forward(self, h, cos, sin, batch, cache):
        # residuals added in place: h is this stage's own (the embedding's output, or the buffer received)
        h += self.self_attn(self.input_layernorm(h), cos, sin, batch, cache)
        h += self.mlp(self.post_attention_layernorm(h))
        return h


class LlamaStage(nn.Module):
    def __init__(self, config: LlamaConfig, grid: Grid, dtype: torch.dtype, sdpa: bool = True,
                 split_head: bool = False, decode_kernel: bool = False):
        """split_head (takes effect with pp > 1, tp 1, tied embeddings): the first stage, whose embedding is the
        lm_head's weight, computes the logits of the vocabulary's lower half in the greedy steps whose token choice
        the pipeline splits between its two ends (pipeline.Pipeline.start); the last stage computes the rest.
        decode_kernel: decode steps take distllama.decode_attention where it runs (see Attention)."""
        super().__init__()
        check_layout(config, grid.tp, grid.pp)
        device = grid.device
        self.config, self.grid, self.dtype = config, grid, dtype
        self.layer_ids = stage_layers(config.num_hidden_layers, grid.pp, grid.pp_rank)
        self.embed_tokens = VocabParallelEmbedding("model.embed_tokens", config.vocab_size, config.hidden_size,
                                                   grid, dtype, device) if grid.is_first_stage else None
        split = split_head and grid.pp > 1 and grid.tp == 1 and config.tie_word_embeddings
        self.head_split = config.vocab_size // 2 if split else 0
        self.lower_head: PackedWeight | None = None  # first stage, split: the packed rows [0, head_split), if packed
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i, grid, dtype, device, sdpa, decode_kernel)
                                     for i in self.layer_ids})
        self.norm = self.lm_head = None
        if grid.is_last_stage:
            self.norm = RMSNorm("model.norm", config.hidden_size, config.rms_norm_eps, dtype, device)
            # Tied: lm_head reads the embedding's rows (also on a last stage that holds no embedding).
            head_source = "model.embed_tokens" if config.tie_word_embeddings else "lm_head"
            self.lm_head = ParallelLMHead(head_source, config.vocab_size, config.hidden_size, grid, dtype, device,
                                          split=self.head_split)
            if config.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight  # one tensor, loaded once
        self.rotary = RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings,
                                      config.hidden_size, config.num_attention_heads).to(device)
        first_attention = next(iter(self.layers.values())).self_attn
        self.kv_heads_held = first_attention.kv_heads_held
        # each decode row reads its own keys: no mask, and the engine plans no runs of rows (they would only add calls)
        self.decode_reads_own_keys = first_attention.decode_kernel

    def pack(self, own_kernel: bool = True) -> None:
        """After loading: matmul weights into the faster CPU layout where there is one (parallel.packed_weight;
        own_kernel: float32 may take distllama.cpu_matmul)."""
        for module in self.modules():
            if isinstance(module, PackableLinear):
                module.pack(own_kernel)
        if self.lm_head is not None:
            self.lm_head.pack(keep_plain=self.embed_tokens is not None and self.config.tie_word_embeddings,
                              own_kernel=own_kernel)
        if self.head_split and self.embed_tokens is not None:
            self.lower_head = packed_weight(self.embed_tokens.weight[:self.head_split], own_kernel)

    def lower_logits(self, h: torch.Tensor) -> torch.Tensor:
        """First stage, split_head: the logits of ids [0, head_split) of normed hidden states h [n, D]."""
        return dense(h, self.embed_tokens.weight[:self.head_split], self.lower_head)

    def new_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(self.layer_ids, slots, self.kv_heads_held, max_len, self.config.head_dim,
                       self.dtype, self.grid.device)

    def forward(self, x, batch: StepBatch, cache: KVCache):
        """x: token ids [N] on the first stage, else hidden states [N, D] from the previous stage.
        Returns hidden states [N, D], or on the last stage logits [n_logits, V] for batch.logit_index (with
        batch.shard_logits: this tp rank's vocabulary shard of them, see parallel.ParallelLMHead; with
        batch.split_head: the normed hidden states [n_logits, D] and the logits of ids [split, V))."""
        if self.embed_tokens is not None:
            h = self.embed_tokens(x)
        else:  # the layers add to the received hidden states in place, except in a compiled step: CUDA graphs do
            h = x.clone() if torch.compiler.is_compiling() else x  # not replay a step that writes one of its inputs
        cos, sin = self.rotary(batch.positions, h.dtype, batch.rope_lengths)
        for layer in self.layers.values():
            h = layer(h, cos, sin, batch, cache)
        if self.lm_head is None:
            return h
        if batch.logit_index is not None:
            h = h.index_select(0, batch.logit_index)  # norm is per token: selecting first is exact
        h = self.norm(h)
        if batch.split_head:
            return h, self.lm_head.upper(h)
        return self.lm_head(h, gather=not batch.shard_logits)


def stage_slices(stage: LlamaStage) -> list:
    """Every checkpoint slice this rank's stage needs, in module order; a tensor shared by two modules once."""
    slices, targets = [], set()
    for module in stage.modules():
        for s in module.slices() if hasattr(module, "slices") else ():
            if s.target.data_ptr() not in targets:
                targets.add(s.target.data_ptr())
                slices.append(s)
    return slices


def expected_names(config: LlamaConfig) -> set[str]:
    """Names of the whole model's checkpoint tensors (all stages), for reporting unexpected tensors."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        names |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{p}.self_attn.{proj}.weight")
            if config.attention_bias:
                names.add(f"{p}.self_attn.{proj}.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{p}.mlp.{proj}.weight")
            if config.mlp_bias:
                names.add(f"{p}.mlp.{proj}.bias")
    return names
