"""The rank-0 driver and the ranks that follow it, running the stages as one pipeline.

Rank 0 owns the generation loop. Each model call is broadcast as a small command (start / forward / reorder /
stop) so every rank runs the same step; hidden states then travel stage to stage by point-to-point send/recv
(tp rank i of one stage to tp rank i of the next: after the row-parallel all-reduce every tp rank holds the whole
hidden state), and tp rank 0 of the last stage sends the full-vocabulary logits of the last position to rank 0.
"""

import torch
import torch.distributed as dist

from distllama.cache import KVCache
from distllama.distributed import Grid
from distllama.model import LlamaStage

STOP, START, FORWARD, REORDER = 0, 1, 2, 3
_HEADER = 5  # op, rows, new tokens, total length, extra


class StageRunner:
    """What every rank does for one command: its own stage, its own KV cache, and the sends/recvs around them."""

    def __init__(self, stage: LlamaStage, grid: Grid):
        self.stage, self.grid = stage, grid
        self.cache: KVCache | None = None

    def start(self, rows: int, max_len: int) -> None:
        self.cache = None  # free the old cache before allocating the new one
        self.cache = self.stage.new_cache(rows, max_len)

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index.to(self.grid.device))

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, attention_mask) -> torch.Tensor | None:
        """Returns the last position's float32 logits [N, V] on rank 0, None elsewhere."""
        grid, device = self.grid, self.grid.device
        input_ids, position_ids, attention_mask = (t.to(device) for t in (input_ids, position_ids, attention_mask))
        rows, new, total = input_ids.shape[0], input_ids.shape[1], attention_mask.shape[1]
        cache_position = torch.arange(total - new, total, device=device)
        if grid.is_first_stage:
            x = input_ids
        else:
            x = torch.empty(rows, new, self.stage.config.hidden_size, dtype=self.stage.dtype, device=device)
            dist.recv(x, grid.rank_of(grid.pp_rank - 1, grid.tp_rank))
        out = self.stage(x, position_ids, attention_mask, cache_position, self.cache, logits_to_keep=1)
        if not grid.is_last_stage:
            dist.send(out.contiguous(), grid.rank_of(grid.pp_rank + 1, grid.tp_rank))
            out = None
        else:
            out = out[:, -1].float().contiguous()  # [N, V]
        last_stage_head = grid.rank_of(grid.pp - 1, 0)
        if grid.pp > 1 and grid.rank == last_stage_head:
            dist.send(out, 0)
        elif grid.pp > 1 and grid.is_driver:
            out = torch.empty(rows, self.stage.config.vocab_size, dtype=torch.float32, device=device)
            dist.recv(out, last_stage_head)
        return out if grid.is_driver else None


class Driver:
    """Rank 0's view of the whole distributed model: the StepModel the decoding loops drive."""

    def __init__(self, runner: StageRunner):
        self.runner, self.grid = runner, runner.grid
        self.vocab_size = runner.stage.config.vocab_size
        self.max_position_embeddings = runner.stage.config.max_position_embeddings  # HF's default-length cap

    def start(self, batch_size: int, max_length: int) -> None:
        self._send(START, batch_size, 0, 0, max_length)
        self.runner.start(batch_size, max_length)

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        (rows, new), total = input_ids.shape, attention_mask.shape[1]
        self._send(FORWARD, rows, new, total, 0,
                   payload=torch.cat([input_ids.flatten(), position_ids.flatten(), attention_mask.flatten()]))
        return self.runner.forward(input_ids, position_ids, attention_mask).cpu()

    def reorder(self, index: torch.Tensor) -> None:
        self._send(REORDER, len(index), 0, 0, 0, payload=index)
        self.runner.reorder(index)

    def close(self) -> None:
        self._send(STOP, 0, 0, 0, 0)

    def _send(self, op, rows, new, total, extra, payload=None):
        if self.grid.world_size == 1:
            return
        dev = self.grid.comm_device
        dist.broadcast(torch.tensor([op, rows, new, total, extra], dtype=torch.int64, device=dev), src=0)
        if payload is not None:
            dist.broadcast(payload.to(device=dev, dtype=torch.int64).contiguous(), src=0)


def follow(runner: StageRunner) -> None:
    """Every rank but 0: run the commands rank 0 broadcasts until it says stop."""
    dev = runner.grid.comm_device
    header = torch.empty(_HEADER, dtype=torch.int64, device=dev)
    while True:
        dist.broadcast(header, src=0)
        op, rows, new, total, extra = header.tolist()
        if op == STOP:
            return
        if op == START:
            runner.start(rows, extra)
        elif op == FORWARD:
            payload = torch.empty(2 * rows * new + rows * total, dtype=torch.int64, device=dev)
            dist.broadcast(payload, src=0)
            ids, pos, mask = payload.split([rows * new, rows * new, rows * total])
            runner.forward(ids.view(rows, new), pos.view(rows, new), mask.view(rows, total))
        elif op == REORDER:
            index = torch.empty(rows, dtype=torch.int64, device=dev)
            dist.broadcast(index, src=0)
            runner.reorder(index)
        else:
            raise RuntimeError(f"unknown command {op} from rank 0")
