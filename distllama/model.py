"""One pipeline stage of a Llama decoder, sharded over its tensor-parallel group.

A stage owns a contiguous range of layers (keyed by their global index, so checkpoint names never change), the
embedding if it is the first stage, the final norm and lm_head if it is the last (Llama's `base_model_pp_plan`).
Shapes are this rank's from the start; `load_stage` then reads only this rank's slices.
"""

import torch
import torch.nn.functional as F
from torch import nn

from distllama.cache import KVCache
from distllama.config import LlamaConfig
from distllama.distributed import Grid
from distllama.parallel import (ColumnParallelLinear, ParallelLMHead, RMSNorm, RowParallelLinear,
                                VocabParallelEmbedding)
from distllama.rope import RotaryEmbedding, apply_rotary


class ParallelLayoutError(ValueError):
    """The model cannot be split the way the launch asks."""


def check_layout(config: LlamaConfig, tp: int, pp: int) -> None:
    """Refuse, before any weight is read, a split the model cannot take. Same answer on every rank."""
    if config.num_attention_heads % tp:
        raise ParallelLayoutError(f"num_attention_heads ({config.num_attention_heads}) is not divisible by "
                                  f"tp ({tp}); choose a tp that divides it")
    if pp > config.num_hidden_layers:
        raise ParallelLayoutError(f"pp ({pp}) is larger than num_hidden_layers ({config.num_hidden_layers}): "
                                  "every stage needs at least one layer")


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    """Contiguous layer range of a stage; the first `num_layers % pp` stages take one extra layer (the last stage
    already carries the norm and the lm_head)."""
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


class Attention(nn.Module):
    """This rank's query heads, and the kv heads they read (kv heads are replicated when tp > kv heads)."""

    def __init__(self, config: LlamaConfig, layer_id: int, grid: Grid, dtype, device, sdpa: bool):
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
        self.register_buffer("kv_for_head", torch.tensor(
            [(first_head + h) // group - first_kv for h in range(self.heads_per_rank)], device=device),
            persistent=False)
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

    def forward(self, x, cos, sin, mask, cache_position, cache: KVCache):
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x)
        q = q.view(B, T, self.heads_per_rank, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)
        k = k.view(B, T, self.kv_heads_held, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, hd)
        v = v.view(B, T, self.kv_heads_held, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        k, v = cache.update(self.layer_id, cache_position, k, v)  # (B, kv_heads, S, hd)
        k, v = k.index_select(1, self.kv_for_head), v.index_select(1, self.kv_for_head)  # (B, heads, S, hd)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        else:  # eager, as Transformers' eager_attention_forward: for checking
            scores = (q @ k.transpose(2, 3)) * self.scaling
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            y = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        y = y.transpose(1, 2).reshape(B, T, self.heads_per_rank * self.head_dim)
        return self.o_proj(y)


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
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int, grid: Grid, dtype, device, sdpa: bool):
        super().__init__()
        name = f"model.layers.{layer_id}"
        self.input_layernorm = RMSNorm(f"{name}.input_layernorm", config.hidden_size, config.rms_norm_eps,
                                       dtype, device)
        self.self_attn = Attention(config, layer_id, grid, dtype, device, sdpa)
        self.post_attention_layernorm = RMSNorm(f"{name}.post_attention_layernorm", config.hidden_size,
                                                config.rms_norm_eps, dtype, device)
        self.mlp = MLP(config, layer_id, grid, dtype, device)

    def forward(self, h, cos, sin, mask, cache_position, cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache_position, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaStage(nn.Module):
    def __init__(self, config: LlamaConfig, grid: Grid, dtype: torch.dtype, sdpa: bool = True):
        super().__init__()
        check_layout(config, grid.tp, grid.pp)
        device = grid.device
        self.config, self.grid, self.dtype = config, grid, dtype
        self.layer_ids = stage_layers(config.num_hidden_layers, grid.pp, grid.pp_rank)
        self.embed_tokens = VocabParallelEmbedding("model.embed_tokens", config.vocab_size, config.hidden_size,
                                                   grid, dtype, device) if grid.is_first_stage else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i, grid, dtype, device, sdpa)
                                     for i in self.layer_ids})
        self.norm = self.lm_head = None
        if grid.is_last_stage:
            self.norm = RMSNorm("model.norm", config.hidden_size, config.rms_norm_eps, dtype, device)
            # Tied: lm_head reads the embedding's rows (also on a last stage that holds no embedding).
            head_source = "model.embed_tokens" if config.tie_word_embeddings else "lm_head"
            self.lm_head = ParallelLMHead(head_source, config.vocab_size, config.hidden_size, grid, dtype, device)
            if config.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight  # one tensor, loaded once
        self.rotary = RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings,
                                      config.hidden_size, config.num_attention_heads).to(device)
        self.kv_heads_held = next(iter(self.layers.values())).self_attn.kv_heads_held

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.layer_ids, batch_size, self.kv_heads_held, max_len, self.config.head_dim,
                       self.dtype, self.grid.device)

    def forward(self, x, position_ids, attention_mask, cache_position, cache: KVCache, logits_to_keep: int = 1):
        """x: token ids [B, T] on the first stage, else hidden states [B, T, D] from the previous stage.
        attention_mask [B, S]: Transformers' 2D mask over every position so far (0 = padding).
        Returns hidden states [B, T, D], or on the last stage logits [B, logits_to_keep, V] (0 = all positions)."""
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        cos, sin = self.rotary(position_ids, h.dtype)
        mask = causal_mask(attention_mask, cache_position)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask, cache_position, cache)
        if self.lm_head is None:
            return h
        h = h[:, -logits_to_keep:] if logits_to_keep else h  # norm is per position: slicing first is exact
        return self.lm_head(self.norm(h))


def causal_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, S] (True = may attend): causal over cache positions, padding keys hidden.

    A padding query would see no key at all (and softmax would give NaN, which would then leak through the cache
    into later layers); it is allowed its own position. No real token ever sees a padding key."""
    S = attention_mask.shape[1]
    key_pos = torch.arange(S, device=attention_mask.device)
    causal = key_pos[None, :] <= cache_position[:, None]  # (T, S)
    allowed = causal[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    allowed |= key_pos[None, :] == cache_position[:, None]
    return allowed[:, None]  # (B, 1, T, S)


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
