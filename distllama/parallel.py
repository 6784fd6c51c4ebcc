"""Tensor-parallel layers. Each is built with this rank's shapes and loads only its own slice of the checkpoint.

Following Llama's `base_model_tp_plan`:
  column-parallel  Y = X [A_1 ... A_p]          each rank holds some output rows of A (q/k/v, gate/up), no comm;
  row-parallel     Y = sum_i X_i A_i  (+ b)     each rank holds input columns (o, down), one all-reduce, bias once;
  vocab-parallel   embedding and lm_head rows split by vocabulary, padded up so every rank holds the same count.

On CPU the matmul weights are repacked once after loading (`pack`): float32 into the panels of distllama's own kernel
(cpu_matmul) where it runs, else into oneDNN's blocked layout (about 1.4x faster than F.linear at decode batch sizes
on this project's CPUs). The same weights either way.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from distllama import cpu_matmul
from distllama.checkpoint import Checkpoint
from distllama.distributed import Grid, all_gather_tp, all_reduce_tp

# How many rows the packed layout is tuned for; it stays correct for any count.
PACK_BATCH_HINT = 32


@dataclass(frozen=True)
class PackedWeight:
    """A weight [out, in] in a faster CPU layout: cpu_matmul's panels, or oneDNN's blocks."""

    tensor: torch.Tensor
    out_features: int
    own_kernel: bool  # distllama.cpu_matmul's panels (float32, AVX-512 or AVX2); else oneDNN's layout
    # oneDNN takes another kernel for a lone row with some weights (on this project's CPUs: rows longer than 1024),
    # which rounds differently from the kernel for several rows; such a row is computed beside a copy of itself, so
    # that a row's bits never depend on how many rows share its matmul.
    pad_lone_row: bool = False


_LONE_ROW_ROUNDS_APART: dict[tuple, bool] = {}  # (out, in, dtype) -> PackedWeight.pad_lone_row


def packed_weight(weight: torch.Tensor, own_kernel: bool = True) -> PackedWeight | None:
    """weight [out, in] in the faster CPU layout, or None where none applies. own_kernel: float32 takes
    distllama.cpu_matmul where it runs."""
    if own_kernel and cpu_matmul.usable(weight):
        return PackedWeight(cpu_matmul.pack(weight), weight.shape[0], own_kernel=True)
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
    shape = (*weight.shape, weight.dtype)
    if shape not in _LONE_ROW_ROUNDS_APART:  # oneDNN picks its kernels by shape: probed once per shape
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(2, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
        lone, among_others = _packed_matmul(probe[:1], packed), _packed_matmul(probe, packed)[:1]
        _LONE_ROW_ROUNDS_APART[shape] = not torch.equal(lone, among_others)
    return PackedWeight(packed, weight.shape[0], own_kernel=False, pad_lone_row=_LONE_ROW_ROUNDS_APART[shape])


def _packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias=None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def dense(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight | None, bias=None) -> torch.Tensor:
    """x W^T (+ b), through the packed weight when there is one."""
    if packed is None:
        return torch.nn.functional.linear(x, weight, bias)
    if packed.own_kernel:
        return cpu_matmul.cpu_matmul(x, packed.tensor, packed.out_features, bias)
    if packed.pad_lone_row and x.dim() == 2 and x.shape[0] == 1:
        return _packed_matmul(x.expand(2, -1), packed.tensor, bias)[:1]
    return _packed_matmul(x, packed.tensor, bias)


class PackableLinear(nn.Module):
    """A weight that `pack` may replace by its packed form once loading is done (the plain one is then freed)."""

    packed: PackedWeight | None = None

    def pack(self, own_kernel: bool = True) -> None:
        packed = packed_weight(self.weight, own_kernel)
        if packed is not None:
            self.packed = packed
            self.weight = nn.Parameter(self.weight.new_empty((0,) + self.weight.shape[1:]), requires_grad=False)


class ColumnParallelLinear(PackableLinear):
    """One matmul over several checkpoint matrices' row ranges stacked together (fused q/k/v, fused gate/up).

    parts: [(checkpoint tensor name without .weight, its full row count, first row, end row)], in output order.
    forward returns one tensor per part."""

    def __init__(self, in_features: int, parts: list[tuple[str, int, int, int]], bias: bool, dtype, device):
        super().__init__()
        self.parts = parts
        self.sizes = [stop - start for _, _, start, stop in parts]
        self.weight = nn.Parameter(torch.empty(sum(self.sizes), in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.sizes), dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.fused(x).split(self.sizes, dim=-1)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """The parts side by side in one tensor [..., sum(sizes)]."""
        return dense(x, self.weight, self.packed, self.bias)

    def slices(self) -> list["Slice"]:
        out, row = [], 0
        for (name, full_rows, start, stop), size in zip(self.parts, self.sizes):
            out.append(Slice(self.weight[row:row + size], f"{name}.weight", (full_rows, self.weight.shape[1]),
                             0, start, stop))
            if self.bias is not None:
                out.append(Slice(self.bias[row:row + size], f"{name}.bias", (full_rows,), 0, start, stop))
            row += size
        return out


class RowParallelLinear(PackableLinear):
    """Y = sum over tp ranks of X_i A_i, then + b: the input arrives split (heads or MLP columns), the output is whole."""

    def __init__(self, name: str, in_features: int, cols: tuple[int, int], out_features: int, bias: bool,
                 grid: Grid, dtype, device):
        super().__init__()
        self.name, self.in_features, self.cols, self.grid = name, in_features, cols, grid
        self.weight = nn.Parameter(torch.empty(out_features, cols[1] - cols[0], dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce_tp(dense(x, self.weight, self.packed), self.grid)
        # The bias joins after the sum, so it is added once, not tp times.
        return y if self.bias is None else y + self.bias

    def slices(self) -> list["Slice"]:
        out = [Slice(self.weight, f"{self.name}.weight", (self.weight.shape[0], self.in_features), 1, *self.cols)]
        if self.bias is not None:
            out.append(Slice(self.bias, f"{self.name}.bias", tuple(self.bias.shape)))
        return out


def vocab_range(vocab_size: int, grid: Grid) -> tuple[int, int, int]:
    """(first id, end id, rows per rank) of this rank's vocabulary shard; the last shard may be partly padding."""
    per_rank = math.ceil(vocab_size / grid.tp)
    start = grid.tp_rank * per_rank
    return start, min(start + per_rank, vocab_size), per_rank


class VocabParallelEmbedding(nn.Module):
    """Each rank embeds the ids in its vocabulary shard and zeros elsewhere; the all-reduce assembles the rows."""

    def __init__(self, name: str, vocab_size: int, hidden_size: int, grid: Grid, dtype, device):
        super().__init__()
        self.name, self.grid, self.vocab_size = name, grid, vocab_size
        self.start, self.end, per_rank = vocab_range(vocab_size, grid)
        self.weight = nn.Parameter(torch.zeros(per_rank, hidden_size, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.grid.tp == 1:
            return nn.functional.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local_ids = (ids - self.start).masked_fill(outside, 0)
        x = nn.functional.embedding(local_ids, self.weight).masked_fill(outside[..., None], 0.0)
        return all_reduce_tp(x, self.grid)  # exactly one rank holds each id: the sum is exact

    def slices(self) -> list["Slice"]:
        # `name` is where the rows come from: lm_head reads the embedding's when embeddings are tied.
        return [Slice(self.weight[:self.end - self.start], f"{self.name}.weight",
                      (self.vocab_size, self.weight.shape[1]), 0, self.start, self.end)]


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h W^T with W split by vocabulary rows; shards are gathered so every tp rank has all logits (or kept
    apart for a caller that reduces each shard first: sampling.greedy_from_shards).

    split (tp 1, tied embeddings): the first pipeline stage computes the logits of ids [0, split) from its embedding
    (model.LlamaStage.lower_logits) and a greedy step computes only ids [split, V) here (upper); the weight is then
    packed as those two parts, and full logits put them side by side."""

    packed: PackedWeight | None = None
    packed_upper: PackedWeight | None = None

    def __init__(self, name: str, vocab_size: int, hidden_size: int, grid: Grid, dtype, device, split: int = 0):
        super().__init__(name, vocab_size, hidden_size, grid, dtype, device)
        self.split = split

    def pack(self, keep_plain: bool = False, own_kernel: bool = True) -> None:
        """keep_plain: the weight is also this rank's embedding (tied), which reads it in the plain layout."""
        if self.split:
            self.packed = packed_weight(self.weight[:self.split], own_kernel)
            self.packed_upper = packed_weight(self.weight[self.split:], own_kernel)
        else:
            self.packed = packed_weight(self.weight, own_kernel)
        if self.packed is not None and not keep_plain:
            self.weight = nn.Parameter(self.weight.new_empty((0,) + self.weight.shape[1:]), requires_grad=False)

    def forward(self, h: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """Logits [.., V]; gather=False: this rank's shard [.., rows per rank] (ids start ..), padding rows at -inf."""
        if self.split:
            return torch.cat([dense(h, self.weight[:self.split], self.packed), self.upper(h)], dim=-1)
        logits = dense(h, self.weight, self.packed)
        if not gather:
            logits[..., max(0, self.end - self.start):] = float("-inf")  # the last shard's padding: never chosen
            return logits
        return all_gather_tp(logits, self.grid)[..., :self.vocab_size]  # drop the padding rows of the last shard

    def upper(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of ids [split, V) alone."""
        return dense(h, self.weight[self.split:], self.packed_upper)


class RMSNorm(nn.Module):
    """Replicated on every rank. Normalizes in float32 and casts back before the weight, as Transformers does."""

    def __init__(self, name: str, hidden_size: int, eps: float, dtype, device):
        super().__init__()
        self.name, self.eps = name, eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def slices(self) -> list["Slice"]:
        return [Slice(self.weight, f"{self.name}.weight", tuple(self.weight.shape))]


@dataclass
class Slice:
    """Where one checkpoint tensor's slice goes: `target` gets `name`[start:stop] along `dim` (all of it if dim is
    None); `full_shape` is what config.json says the whole tensor must be."""

    target: torch.Tensor
    name: str
    full_shape: tuple
    dim: int | None = None
    start: int = 0
    stop: int | None = None

    def load(self, ckpt: Checkpoint) -> None:
        found = tuple(ckpt.shape(self.name))
        if found != tuple(self.full_shape):
            raise ValueError(f"checkpoint tensor {self.name} has shape {list(found)}, but config.json implies "
                             f"{list(self.full_shape)}")
        self.target.copy_(ckpt.read(self.name, self.dim, self.start, self.stop))  # copy_ also casts the dtype
