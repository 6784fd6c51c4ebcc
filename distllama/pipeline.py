"""Step plans and how they travel: rank 0's end of the pipeline, and the loop every other rank runs.

Rank 0 decides each step (distllama.engine) and describes it in a small integer plan: which slots decode, the
prefill chunks' tokens, and slot events (requests admitted, requests finished, beam reorders). The plan is O(batch +
prefill tokens) and a decode-only step carries no per-row data at all: every rank keeps its slots' state on its own
device (lengths, which slots decode, and with pp 1 the token each slot feeds next, written there by the sampler), so
it derives positions and masks itself. With pp > 1 the first stage gets the new tokens in the plan instead (they come
back to rank 0 from the last stage).

Plans travel with the hidden states: rank 0 broadcasts a plan to its tensor-parallel group, and each stage's tp rank
i sends the plan and its output to tp rank i of the next stage. The last stage picks the tokens (distllama.sampling)
and its tp rank 0 sends rank 0 just the ids and their logprobs (or, for beam search, the logits). With pp > 1, tp 1
and tied embeddings, a greedy step without processors picks its tokens at both ends instead (Pipeline.start).

Stages run concurrently on different micro-batches: rank 0 may have several plans in flight, and every stage handles
plans in the order it gets them, so results come back in submission order.
Plans and results travel on gloo groups on the CPU (the control plane, also under nccl); hidden states on the
backend's default group.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist

from distllama.cache import KVCache
from distllama.distributed import Grid, all_gather_tp
from distllama.model import LlamaStage, StepBatch
from distllama.sampling import (ADMIT_FIELDS, PER_ROW, TokenSampler, decode_admission, pick_from_stats,
                                row_processors, shard_stats)

STOP, STEP, START = 0, 1, -1  # START: allocate caches (its header carries slots, max_len, the per-row knobs)
# header: op, n_decode, decode_start, n_kv_runs, n_decode_tokens, n_chunks, n_chunk_tokens, n_admit, n_finished,
# n_moves, n_reorder, flags
HEADER = 12
CHUNK_FIELDS = 4  # slot, start, length, completes the prompt (its last token is sampled)
RETURN_LOGITS, SAMPLING, SPLIT_HEAD = 1, 2, 4  # flags


@dataclass
class Plan:
    """One step of one micro-batch, as rank 0 decides it (tokens in the order of model.StepBatch)."""

    decode_start: int = 0
    n_decode: int = 0  # decode rows: slots decode_start ... (a slot not decoding computes nothing anyone reads)
    # the decode rows' tokens; empty: each slot's next token is already on the device (pp 1)
    decode_tokens: list[int] = field(default_factory=list)
    # (rows, key length) per run of consecutive decode rows, in row order: a run's slots read keys [0, key length)
    kv_runs: list[tuple[int, int]] = field(default_factory=list)
    chunks: list[tuple[int, int, int, bool]] = field(default_factory=list)  # (slot, start, length, completes)
    chunk_tokens: list[int] = field(default_factory=list)
    admissions: list[list[int]] = field(default_factory=list)  # sampling.encode_admission records
    finished: list[int] = field(default_factory=list)  # slots whose request ended (they stop decoding)
    moves: list[tuple[int, int]] = field(default_factory=list)  # (from, to): a request moves to a lower free slot
    reorder: list[int] = field(default_factory=list)  # beams: slot i takes slot reorder[i] before the step
    return_logits: bool = False  # beam search: the last stage returns logits, not tokens
    sampling: bool = False  # some row of this step samples
    split_head: bool = False  # greedy: the last stage returns its half of the token choice (Pipeline.result)
    op: int = STEP

    @property
    def kv_len(self) -> int:
        """Keys the longest-reading decode row reads."""
        return max((length for _, length in self.kv_runs), default=0)

    @property
    def n_results(self) -> int:
        """Rows whose next token (or logits) comes back: every decode row, and each chunk that ends a prompt."""
        return self.n_decode + sum(1 for c in self.chunks if c[3])

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        flags = RETURN_LOGITS * self.return_logits + SAMPLING * self.sampling + SPLIT_HEAD * self.split_head
        header = torch.tensor([self.op, self.n_decode, self.decode_start, len(self.kv_runs), len(self.decode_tokens),
                               len(self.chunks), len(self.chunk_tokens), len(self.admissions), len(self.finished),
                               len(self.moves), len(self.reorder), flags], dtype=torch.long)
        body = [*(x for run in self.kv_runs for x in run), *self.decode_tokens,
                *(int(x) for c in self.chunks for x in c), *self.chunk_tokens, *(x for a in self.admissions for x in a),
                *self.finished, *(x for m in self.moves for x in m), *self.reorder]
        return header, torch.tensor(body, dtype=torch.long)

    @staticmethod
    def sizes(header: list[int]) -> list[int]:
        """Lengths of the body's parts: kv runs, decode tokens, chunks, chunk tokens, admissions, finished, moves,
        reorder."""
        _, _, _, n_runs, n_tokens, n_chunks, n_chunk_tokens, n_admit, n_finished, n_moves, n_reorder, _ = header
        return [2 * n_runs, n_tokens, CHUNK_FIELDS * n_chunks, n_chunk_tokens, ADMIT_FIELDS * n_admit, n_finished,
                2 * n_moves, n_reorder]

    @classmethod
    def decode(cls, header: list[int], body: torch.Tensor) -> "Plan":
        op, n_decode, decode_start, *_, flags = header
        values, parts, at = body.tolist(), [], 0
        for size in cls.sizes(header):
            parts.append(values[at:at + size])
            at += size
        kv_runs, decode_tokens, chunks, chunk_tokens, admissions, finished, moves, reorder = parts
        return cls(decode_start=decode_start, n_decode=n_decode, decode_tokens=decode_tokens,
                   kv_runs=list(zip(kv_runs[::2], kv_runs[1::2])),
                   chunks=[tuple(chunks[i:i + CHUNK_FIELDS]) for i in range(0, len(chunks), CHUNK_FIELDS)],
                   chunk_tokens=chunk_tokens,
                   admissions=[admissions[i:i + ADMIT_FIELDS] for i in range(0, len(admissions), ADMIT_FIELDS)],
                   finished=finished, moves=list(zip(moves[::2], moves[1::2])), reorder=reorder,
                   return_logits=bool(flags & RETURN_LOGITS),
                   sampling=bool(flags & SAMPLING), split_head=bool(flags & SPLIT_HEAD), op=op)


class StageRunner:
    """One rank's stage, its KV cache, the slot state it tracks on its device, and (last stage) its token sampler."""

    def __init__(self, stage: LlamaStage, grid: Grid, options=None, compile: bool = False):
        """compile: decode-only steps run the stage under torch.compile (CUDA graphs on a GPU): their shapes repeat
        (engine.Engine with static_decode). Steps with prompt chunks always run eagerly."""
        self.stage, self.grid, self.options = stage, grid, options
        self.decode_forward = stage.forward
        self.cuda_graphs = compile and grid.device.type == "cuda"  # decode steps replay CUDA graphs
        if compile:
            if any(getattr(m, "packed", None) is not None for m in stage.modules()):
                raise ValueError("a stage packed for eager CPU matmuls cannot be compiled (load it with compile=True)")
            mode = "reduce-overhead" if self.cuda_graphs else None  # reduce-overhead = CUDA graphs
            # One compiled step per micro-batch and key-length bucket: past dynamo's default of 8 variants (pp 2 on
            # sequences longer than 512 tokens, pp 1 past 8192) the rest ran eagerly, after a warning.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
            self.decode_forward = torch.compile(stage.forward, dynamic=False, mode=mode)
        self.cache: KVCache | None = None
        self.sampler: TokenSampler | None = None
        self.busy_s, self.first_step, self.last_step = 0.0, None, None  # for the pipeline's bubble (bench)

    def start(self, slots: int, max_len: int, per_row: frozenset = frozenset()) -> None:
        """Allocate the cache (and sampler) for `slots` sequences of up to max_len tokens."""
        self.cache = self.sampler = None  # free the old ones first
        self.cache = self.stage.new_cache(slots, max_len)
        if self.cuda_graphs:
            # CUDA graphs replay fixed addresses: the cache, written in place, must be a static input
            for buffer in (*self.cache.keys.values(), *self.cache.values.values()):
                torch._dynamo.mark_static_address(buffer)
        device = self.grid.device
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens in each slot's cache
        self.decoding = torch.zeros(slots, dtype=torch.bool, device=device)  # the slot's request is past its prompt
        # pp 1: the token each slot feeds next; the extra last entry takes the writes of idle rows
        self.next_tokens = torch.zeros(slots + 1, dtype=torch.long, device=device)
        self.prompt_lengths = [0] * slots
        if self.grid.is_last_stage and self.options is not None:
            self.sampler = TokenSampler(self.options, self.stage.config.vocab_size, slots, max_len, device, per_row)

    @torch.inference_mode()
    def run(self, plan: Plan, x: torch.Tensor | None):
        """Run this stage's part of a step. x: the previous stage's hidden states (None on the first stage).
        Returns hidden states [N, D] (not last stage), else (ids, logprobs) [n_results] or logits [n_results, V]
        (plan.return_logits) or, for plan.split_head, [n_results, 3 + D] float64: the stats of this stage's part of
        the vocabulary (sampling.shard_stats) and the normed hidden states the first stage computes the rest from."""
        started = time.perf_counter()
        try:
            return self._run(plan, x)
        finally:
            self.last_step = time.perf_counter()
            self.first_step = self.first_step or started
            self.busy_s += self.last_step - started

    def _run(self, plan: Plan, x: torch.Tensor | None):
        self._apply_events(plan)
        device, rows = self.grid.device, slice(plan.decode_start, plan.decode_start + plan.n_decode)
        live = self.decoding[rows].clone()  # decode rows whose slot really decodes (before this step's changes)
        sent = torch.tensor(plan.decode_tokens, dtype=torch.long, device=device) if plan.decode_tokens else None
        if sent is not None:
            # pp > 1: rank 0 names the rows it decodes (-1: idle). A prompt completed by another micro-batch's step
            # decodes here already while rank 0 still waits for its first token: that row idles in this step.
            live &= sent >= 0
        chunk_tokens = torch.tensor(plan.chunk_tokens, dtype=torch.long, device=device) if plan.chunks else None
        if x is None:  # first stage: token ids
            decode_ids = sent.clamp(min=0) if sent is not None else self.next_tokens[rows]  # idle -1: any token
            x = decode_ids if chunk_tokens is None else torch.cat([decode_ids, chunk_tokens])
        batch = self._batch(plan, live)
        forward = self.decode_forward if not plan.chunks else self.stage.forward
        out = forward(x, batch, self.cache)

        # the slots' new state, identical on every rank
        self.lengths[rows] += live
        offset = plan.n_decode
        completed = []
        for slot, start, length, completes in plan.chunks:
            self.lengths[slot] = start + length
            if self.sampler is not None:
                self.sampler.add_prompt(slot, start, chunk_tokens[offset - plan.n_decode:][:length])
            if completes:
                completed.append(slot)
            offset += length
        if completed:
            self.decoding[completed] = True
        if not self.grid.is_last_stage:
            # A CUDA graph's output lives in the graph's memory, which the next replay (the other micro-batch's step)
            # overwrites while the send of this one may still be reading it: send a copy.
            return out.clone() if self.cuda_graphs and not plan.chunks else out
        if plan.return_logits:
            return out.float()
        slots = torch.arange(plan.decode_start, plan.decode_start + plan.n_decode, device=device)
        real = live
        if completed:
            slots = torch.cat([slots, torch.tensor(completed, device=device)])
            real = torch.cat([live, torch.ones(len(completed), dtype=torch.bool, device=device)])
        if batch.split_head:
            hidden, upper = out
            self.sampler.count(slots, real)
            return torch.cat([shard_stats(upper.float(), self.stage.head_split), hidden.double()], dim=1)
        if batch.shard_logits:
            gather = partial(all_gather_tp, grid=self.grid)
            tokens, logprobs = self.sampler.choose_from_shard(out.float(), self.stage.lm_head.start, gather, slots,
                                                              real)
        else:
            tokens, logprobs = self.sampler.choose(out.float(), slots, real, plan.sampling)
        if self.grid.is_first_stage:  # pp 1: the chosen tokens are fed back from here, not from rank 0
            # a slot can be both an idle decode row and the chunk that completes it: only real rows write
            self.next_tokens[torch.where(real, slots, len(self.next_tokens) - 1)] = tokens
        return tokens, logprobs

    def _apply_events(self, plan: Plan) -> None:
        """Finished requests stop decoding; requests move to lower slots; admissions reset their slots; a beam
        reorder moves slots."""
        if plan.finished:
            self.decoding[plan.finished] = False
        for source, target in plan.moves:
            self.cache.move(source, target)
            for state in (self.lengths, self.decoding, self.next_tokens):
                state[target] = state[source]
            self.decoding[source] = False
            self.prompt_lengths[target] = self.prompt_lengths[source]
            if self.sampler is not None:
                self.sampler.move(source, target)
        if plan.admissions:
            decoded = [decode_admission(fields) for fields in plan.admissions]
            slots = [slot for slot, _ in decoded]
            self.lengths[slots] = 0
            self.decoding[slots] = False
            for slot, settings in decoded:
                self.prompt_lengths[slot] = settings.prompt_length
            if self.sampler is not None:
                self.sampler.admit(slots, [settings for _, settings in decoded])
        if plan.reorder:
            index = torch.tensor(plan.reorder, device=self.grid.device)
            self.cache.reorder(index)
            for state in (self.lengths, self.decoding, self.next_tokens):
                state[:len(index)] = state[index].clone()
            if self.sampler is not None:
                self.sampler.reorder(index)

    def _batch(self, plan: Plan, live: torch.Tensor) -> StepBatch:
        device, n_decode = self.grid.device, plan.n_decode
        positions, slots = [], []
        if n_decode:
            decode_slots = torch.arange(plan.decode_start, plan.decode_start + n_decode, device=device)
            positions.append(torch.where(live, self.lengths[decode_slots], self.cache.scratch))
            slots.append(decode_slots)
        chunk_positions, chunk_slots, rope_lengths = [], [], []
        for slot, start, length, _ in plan.chunks:
            chunk_positions.extend(range(start, start + length))
            chunk_slots.extend([slot] * length)
            rope_lengths.extend([self.prompt_lengths[slot]] * length)  # a prompt's tokens all use its length
        if plan.chunks:
            positions.append(torch.tensor(chunk_positions, device=device))
            slots.append(torch.tensor(chunk_slots, device=device))
        positions = torch.cat(positions) if len(positions) > 1 else positions[0]
        batch = StepBatch(positions=positions, slots=torch.cat(slots) if len(slots) > 1 else slots[0],
                          rope_lengths=None, decode_start=plan.decode_start, n_decode=n_decode,
                          kv_runs=_row_ranges(plan.kv_runs), chunks=tuple(c[:3] for c in plan.chunks))
        if self.stage.rotary.length_dependent:
            # a decode token's sequence is its own position + 1 long (always past its prompt)
            decode_lengths = [positions[:n_decode] + 1] if n_decode else []
            batch.rope_lengths = torch.cat(decode_lengths + [torch.tensor(rope_lengths, dtype=torch.long,
                                                                          device=device)])
        if n_decode and self.stage.decode_reads_own_keys:  # no mask: each row's own length; an idle row reads one key
            batch.decode_lengths = torch.where(live, positions[:n_decode] + 1, 1)
        elif n_decode:
            keys = torch.arange(plan.kv_len, device=device)
            allowed = keys[None, :] <= positions[:n_decode, None]  # an idle row (scratch position) sees every key
            mask = torch.zeros(allowed.shape, dtype=self.stage.dtype, device=device)
            batch.decode_mask = mask.masked_fill_(~allowed, float("-inf"))[:, None, None, :]
        # greedy without processors, over tp > 1: the tp ranks reduce their vocabulary shards of the logits to a few
        # values per row for the token choice, and never gather the [rows, vocab] logits (sampling.greedy_from_shards)
        batch.shard_logits = (self.grid.tp > 1 and self.sampler is not None and self.sampler.greedy_only
                              and not plan.sampling and not plan.return_logits)
        batch.split_head = plan.split_head
        if self.grid.is_last_stage and plan.chunks:
            ends, offset = [], n_decode
            for _, _, length, completes in plan.chunks:
                offset += length
                if completes:
                    ends.append(offset - 1)
            batch.logit_index = torch.tensor(list(range(n_decode)) + ends, dtype=torch.long, device=device)
        return batch


def _row_ranges(kv_runs: list[tuple[int, int]]) -> tuple:
    """(first row, end row, key length) per run of decode rows."""
    ranges, first = [], 0
    for rows, length in kv_runs:
        ranges.append((first, first + rows, length))
        first += rows
    return tuple(ranges)


class ControlPlane:
    """Who this rank talks to: the gloo groups for plans and results, and its neighbours in the pipeline."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.first_tp_group = grid.control_tp_group if grid.is_first_stage else None
        self.control = grid.control_group
        self.prev = grid.rank_of(grid.pp_rank - 1, grid.tp_rank) if not grid.is_first_stage else None
        self.next = grid.rank_of(grid.pp_rank + 1, grid.tp_rank) if not grid.is_last_stage else None
        self.driver = grid.driver_rank
        self.pending: deque = deque()  # isends in flight (their tensors must outlive them)

    def send_async(self, tensor: torch.Tensor, dst: int, group=None) -> None:
        self.pending.append((dist.isend(tensor, dst, group=group), tensor))
        while len(self.pending) > 8:
            self.pending.popleft()[0].wait()

    def flush(self) -> None:
        while self.pending:
            self.pending.popleft()[0].wait()

    def forward(self, plan_tensors, hidden: torch.Tensor | None) -> None:
        """Pass a plan (and this stage's output) to the next stage."""
        header, body = plan_tensors
        self.send_async(header, self.next, self.control)
        self.send_async(body, self.next, self.control)
        if hidden is not None:
            self.send_async(hidden.contiguous(), self.next)

    def receive_header(self) -> torch.Tensor:
        header = torch.empty(HEADER, dtype=torch.long)
        self._receive(header)
        return header

    def receive_body(self, header: list[int]) -> torch.Tensor:
        body = torch.empty(sum(Plan.sizes(header)), dtype=torch.long)
        self._receive(body)
        return body

    def _receive(self, tensor: torch.Tensor) -> None:
        """From rank 0 by broadcast on the first stage, from the previous stage's same tp rank elsewhere."""
        if self.grid.is_first_stage:
            dist.broadcast(tensor, self.driver, group=self.first_tp_group)
        else:
            dist.recv(tensor, self.prev, group=self.control)

    def receive_hidden(self, plan: Plan, stage: LlamaStage) -> torch.Tensor:
        n_tokens = plan.n_decode + len(plan.chunk_tokens)
        x = torch.empty(n_tokens, stage.config.hidden_size, dtype=stage.dtype, device=self.grid.device)
        dist.recv(x, self.prev)
        return x


class Pipeline:
    """Rank 0's end: submit plans, take results back in submission order. With pp 1 every step runs right here."""

    def __init__(self, runner: StageRunner):
        self.runner, self.grid = runner, runner.grid
        self.control = ControlPlane(self.grid) if self.grid.world_size > 1 else None
        self.in_flight: deque = deque()  # per submitted plan: its result, or what to receive
        self.split_head = False  # greedy steps choose their tokens half on the last stage, half here (see start)

    @property
    def vocab_size(self) -> int:
        return self.runner.stage.config.vocab_size

    def start(self, slots: int, max_len: int, per_row: frozenset = frozenset()) -> None:
        """Every rank allocates its cache for this many slots (a START header carries the sizes)."""
        self._broadcast_start(slots, max_len, per_row)
        self.runner.start(slots, max_len, per_row)
        # The last stage also carries the lm_head, which makes its decode steps the pipeline's slowest: in a greedy
        # step without processors it computes only the upper half of the vocabulary, and rank 0 the lower half from
        # its embedding (the same weight, tied) before picking the token (model.LlamaStage's split_head).
        # (rank 0 runs the first stage, which holds the embedding)
        options = self.runner.options
        greedy_only = options is not None and not row_processors(options, per_row)
        self.split_head = bool(self.runner.stage.head_split) and greedy_only

    def submit(self, plan: Plan) -> None:
        plan.split_head = self.split_head and not plan.sampling and not plan.return_logits
        tensors = plan.encode() if self.control is not None else None
        if self.grid.tp > 1:
            for t in tensors:
                dist.broadcast(t, self.grid.driver_rank, group=self.control.first_tp_group)
        out = self.runner.run(plan, None)
        if self.grid.is_last_stage:
            self.in_flight.append(out)
        else:
            self.control.forward(tensors, out)
            self.in_flight.append(plan)

    def result(self):
        """The oldest submitted step's (ids, logprobs) on the host, or its logits [n, V] for return_logits."""
        item = self.in_flight.popleft()
        if not isinstance(item, Plan):
            if not isinstance(item, tuple):
                return item.cpu()
            both = torch.stack([item[0].double(), item[1].double()]).cpu()  # the step's one host synchronisation
            return both[0].long(), both[1]
        last = self.grid.rank_of(self.grid.pp - 1, 0)
        if item.return_logits:
            out = torch.empty(item.n_results, self.vocab_size, dtype=torch.float32)
        elif item.split_head:
            out = torch.empty(item.n_results, 3 + self.runner.stage.config.hidden_size, dtype=torch.float64)
        else:
            out = torch.empty(2, item.n_results, dtype=torch.float64)
        dist.recv(out, last, group=self.control.control)
        if item.split_head:
            return self._finish_split(out)
        return out if item.return_logits else (out[0].long(), out[1])

    @torch.inference_mode()
    def _finish_split(self, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A split greedy step: the last stage's stats of ids [split, V) and the normed hidden states -> the tokens
        and their logprobs over the whole vocabulary, as sampling.greedy_from_shards gives them."""
        stage = self.runner.stage
        hidden = received[:, 3:].to(device=self.grid.device, dtype=stage.dtype)
        lower = shard_stats(stage.lower_logits(hidden).float(), 0).cpu()
        tokens, logprobs = pick_from_stats(torch.stack([lower, received[:, :3]], dim=1))
        return tokens, logprobs.float().double()  # float32 logprobs, as every other path gives them

    def close(self) -> None:
        if self.control is not None:
            self.submit_stop()
            self.control.flush()

    def submit_stop(self) -> None:
        header = torch.zeros(HEADER, dtype=torch.long)  # op STOP
        if self.grid.tp > 1:
            dist.broadcast(header, self.grid.driver_rank, group=self.control.first_tp_group)
        if not self.grid.is_last_stage:
            self.control.send_async(header, self.control.next, self.control.control)

    def _broadcast_start(self, slots: int, max_len: int, per_row: frozenset) -> None:
        if self.control is None:
            return
        mask = sum(1 << i for i, knob in enumerate(PER_ROW) if knob in per_row)
        header = torch.tensor([START, slots, max_len, mask] + [0] * (HEADER - 4), dtype=torch.long)
        if self.grid.tp > 1:
            dist.broadcast(header, self.grid.driver_rank, group=self.control.first_tp_group)
        if not self.grid.is_last_stage:
            self.control.send_async(header, self.control.next, self.control.control)


def follow(runner: StageRunner) -> None:
    """Every rank but 0: run the plans that reach this rank until the STOP plan, passing each one on."""
    control, grid = ControlPlane(runner.grid), runner.grid
    try:
        while True:
            header = control.receive_header()
            values = header.tolist()
            if values[0] in (STOP, START):
                if control.next is not None:
                    control.send_async(header, control.next, control.control)
                if values[0] == STOP:
                    return
                runner.start(values[1], values[2], frozenset(k for i, k in enumerate(PER_ROW) if values[3] >> i & 1))
                continue
            body = control.receive_body(values)
            plan = Plan.decode(values, body)
            out = runner.run(plan, None if grid.is_first_stage else control.receive_hidden(plan, runner.stage))
            if not grid.is_last_stage:
                control.forward((header, body), out)
            elif grid.tp_rank == 0:
                result = out if plan.return_logits or plan.split_head else torch.stack([out[0].double(),
                                                                                         out[1].double()])
                control.send_async(result.cpu().contiguous(), control.driver, control.control)
    finally:
        control.flush()
