"""The engine: continuous batching over the pipeline, driven by rank 0.

A fixed number of cache slots, split into micro-batches of consecutive slots (one per pipeline stage, so every stage
has work at once). Waiting requests take free slots as soon as any frees up; their prompts are prefilled in chunks of
at most `max_prefill_tokens` per step while the running rows keep decoding. Each step of a micro-batch is one plan
(distllama.pipeline); its result (one token per row) comes back before that micro-batch's next step is planned, and
that result is the step's one host synchronisation.

Every request is computed on its own: its own slot, positions and cache rows, its own seeded random stream, its own
length limits. Its tokens are therefore what Transformers' generate gives for that prompt alone, whatever else runs.
The CLI, the benchmark and the tests all drive this class: `generate` for a known list of requests, or `start`, then
`add` and `step` for requests that arrive while others run (a server). Beam search has its own path (beam.py over
PipelineStepModel).
"""

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from distllama.pipeline import Pipeline, Plan
from distllama.sampling import SlotSettings, encode_admission
from distllama.signals import StopRequest
from distllama.stopping import StopCondition


@dataclass
class Request:
    """One sequence to generate, and all the engine tracks of it while it runs."""

    index: int  # the prompt's place in the input: results are written in this order
    prompt: list[int]
    settings: SlotSettings  # lengths, seed and sampling knobs (what the last stage needs)
    stop: StopCondition  # eos ids and stop strings
    sample: int = 0  # which of the prompt's num_return_sequences this is
    slot: int | None = None
    prefilled: int = 0  # prompt tokens already in the cache
    output_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "eos" | "length" once finished

    @property
    def decoding(self) -> bool:
        """Prefilled, with a sampled token waiting to be fed back."""
        return bool(self.output_ids) and self.finish_reason is None

    @property
    def position(self) -> int:
        """Cache position of the token fed at the next decode step."""
        return len(self.prompt) + len(self.output_ids) - 1


class Engine:
    def __init__(self, pipeline: Pipeline, max_batch_size: int, max_prefill_tokens: int | None,
                 micro_batches: int = 1, static_decode: bool = False, kv_bucket: int = 32,
                 run_cost: int | None = 100, stop: StopRequest | None = None):
        """max_prefill_tokens: prompt tokens per step; None: 2048, or 512 with pp > 1. static_decode: decode steps
        always cover every slot of their micro-batch and read key lengths rounded up to powers of two, so their
        shapes repeat (for torch.compile / CUDA graphs); else idle trailing slots are skipped and key lengths rounded
        up to kv_bucket. run_cost: see _kv_runs (None: every decode row reads up to the longest; so on a GPU and in
        static steps). stop: once it holds a signal, no new step is planned, the steps in flight are finished and
        step (so generate) raises Stopped."""
        if max_prefill_tokens is None:
            # With pp > 1 a step is one micro-batch's, and smaller steps keep the stages in step: a 2048-token step
            # holds the next stage for seconds while the other micro-batch waits behind it (measured on the demo's
            # pp 2 job: ranks busy 80% / 86% at 2048, 83% / 92% at 512).
            max_prefill_tokens = 2048 if pipeline.grid.pp == 1 else 512
        self.pipe, self.stop = pipeline, stop
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.micro_batches, self.static_decode, self.kv_bucket = micro_batches, static_decode, kv_bucket
        # On CPU one more attention call costs about what reading 100 more keys of one slot does (the demo, eager).
        # On a GPU an eager call costs more than the keys it saves, and compiled steps keep one shape.
        # (None also where decode rows read their own keys anyway: model.LlamaStage.decode_reads_own_keys)
        self.run_cost = run_cost if (pipeline.grid.device.type == "cpu" and not static_decode
                                     and not pipeline.runner.stage.decode_reads_own_keys) else None
        self.steps = 0  # plans submitted
        self.groups, self.max_len = 0, 0  # micro-batches and longest sequence, set by start
        self.occupant, self.waiting, self.in_flight = [], deque(), deque()

    def start(self, slots: int, max_len: int, per_row: frozenset = frozenset()) -> None:
        """Allocate `slots` cache slots of up to max_len tokens on every rank. Requests may then be added at any
        time, also while others run (a server keeps one started engine). per_row: the sampling knobs requests may
        set for themselves (see sampling.TokenSampler); for the others every request gets the run's options."""
        self.max_len = max_len
        groups = self.groups = min(self.micro_batches, slots)  # the first `groups` steps are one per micro-batch
        self.pipe.start(slots, max_len, per_row)
        self.bounds = [(m * slots // groups, (m + 1) * slots // groups) for m in range(groups)]
        self.group_of = [m for m, (lo, hi) in enumerate(self.bounds) for _ in range(lo, hi)]
        self.occupant: list[Request | None] = [None] * slots
        self.freed: list[list[int]] = [[] for _ in range(groups)]  # slots whose request ended, per micro-batch
        self.waiting: deque[Request] = deque()  # not yet in a slot, in arrival order
        self.prefilling: deque[Request] = deque()  # in a slot, prompt not fully in the cache, in admission order
        self.in_flight: deque = deque()  # (micro-batch, rows of its result) per submitted plan, oldest first
        self.busy = [False] * groups
        self.turn = 0

    def add(self, request: Request) -> None:
        """Queue a request; it takes the first slot that frees up."""
        if not self.occupant:
            raise RuntimeError("Engine.add before Engine.start")
        if request.settings.max_length > self.max_len:
            raise ValueError(f"request {request.index} needs {request.settings.max_length} positions; the engine "
                             f"was started with {self.max_len}")
        self.waiting.append(request)

    @property
    def idle(self) -> bool:
        """Nothing waiting, running or in flight."""
        return not (self.waiting or self.in_flight or any(self.occupant))

    def step(self, on_token: Callable[[Request, int], None] | None = None) -> list[Request]:
        """Plan every micro-batch that is not in flight and has something to do, then wait for the oldest step in
        flight: the requests it finished. on_token(request, token) after each new token. Once `stop` holds a
        signal, only the steps in flight are finished, and then Stopped is raised if any request is unfinished."""
        stopping = bool(self.stop)
        for _ in range(self.groups if not stopping else 0):
            m, self.turn = self.turn, (self.turn + 1) % self.groups
            if self.busy[m]:
                continue
            planned = self._plan(m)
            if planned is not None:
                plan, rows = planned
                self.pipe.submit(plan)
                self.steps += 1
                self.in_flight.append((m, rows))
                self.busy[m] = True
        if not self.in_flight:
            if stopping and not self.idle:
                self.stop.check()
            if not self.idle:
                raise RuntimeError("the engine has unfinished requests but nothing to run")  # a scheduler bug
            return []
        m, rows = self.in_flight.popleft()
        self.busy[m] = False
        tokens, logprobs = self.pipe.result()
        finished = []
        for request, token, logprob in zip(rows, tokens.tolist(), logprobs.tolist()):
            if request is not None and self._extend(request, token, logprob, on_token):
                self.occupant[request.slot] = None
                self.freed[self.group_of[request.slot]].append(request.slot)
                finished.append(request)
        return finished

    def generate(self, requests: Iterable[Request], on_token: Callable[[Request, int], None] | None = None,
                 per_row: frozenset = frozenset()) -> Iterator[Request]:
        """Run every request, on slots and a cache sized for them; yield each as it finishes (not in input
        order)."""
        requests = list(requests)
        if not requests:
            return
        self.start(min(self.max_batch_size, len(requests)), max(r.settings.max_length for r in requests), per_row)
        for request in requests:
            self.add(request)
        while not self.idle:
            yield from self.step(on_token)

    def _plan(self, group: int) -> tuple[Plan, list] | None:
        """The next step of micro-batch `group` (slots lo .. hi - 1), and the request behind each result row."""
        lo, hi = self.bounds[group]
        occupant, waiting, prefilling = self.occupant, self.waiting, self.prefilling
        plan = Plan(finished=self.freed[group])
        self.freed[group] = []
        for slot in range(lo, hi):
            if occupant[slot] is None and waiting:
                request = waiting.popleft()
                request.slot, occupant[slot] = slot, request
                plan.admissions.append(encode_admission(slot, request.settings))
                prefilling.append(request)
        if not waiting and not self.static_decode:
            self._compact(lo, hi, occupant, plan)

        decoding = [slot for slot in range(lo, hi) if occupant[slot] is not None and occupant[slot].decoding]
        rows: list[Request | None] = []
        if decoding:
            end = hi if self.static_decode else decoding[-1] + 1
            plan.decode_start, plan.n_decode = lo, end - lo
            for slot in range(lo, end):
                request = occupant[slot]
                live = request is not None and request.decoding
                if self.pipe.grid.pp > 1:  # the first stage is not the last: it gets the new tokens from here
                    plan.decode_tokens.append(request.output_ids[-1] if live else -1)
                rows.append(request if live else None)
            plan.kv_runs = self._kv_runs([self._kv_len(r.position + 1) if r is not None else 0 for r in rows])

        # prompts are prefilled in any micro-batch's step, whichever slot they wait in, so that every micro-batch
        # carries its share of the prefill and no stage waits behind one long step (the stages run steps in the
        # order they were submitted, so a prompt's chunks stay in order)
        budget = self.max_prefill_tokens
        for request in list(prefilling):
            if budget == 0:
                break
            length = min(len(request.prompt) - request.prefilled, budget)
            completes = request.prefilled + length == len(request.prompt)
            plan.chunks.append((request.slot, request.prefilled, length, completes))
            plan.chunk_tokens.extend(request.prompt[request.prefilled:request.prefilled + length])
            request.prefilled += length
            budget -= length
            if completes:
                prefilling.remove(request)
                rows.append(request)
        if not rows and not plan.chunks:
            self.freed[group] = plan.finished  # nothing to run: the events wait for the next step
            return None
        plan.sampling = any(r is not None and r.settings.do_sample for r in rows)
        return plan, rows

    @staticmethod
    def _compact(lo: int, hi: int, occupant, plan: Plan) -> None:
        """With nobody waiting, move the highest decoding requests into the lowest free slots, so that the decode
        rows (slots lo .. the last decoding one) shrink as the job's last requests finish."""
        free = [slot for slot in range(lo, hi) if occupant[slot] is None]
        for target in free:
            source = next((s for s in range(hi - 1, target, -1) if occupant[s] is not None and occupant[s].decoding),
                          None)
            if source is None:
                break
            request = occupant[source]
            occupant[source], occupant[target], request.slot = None, request, target
            plan.moves.append((source, target))

    def _kv_runs(self, needs: list[int]) -> list[tuple[int, int]]:
        """Split the decode rows (each needing keys [0, needs[i]); 0: idle) into runs of consecutive rows, each
        reading up to its longest row: the split that reads the fewest keys, counting run_cost keys per run. Read up
        to the step's longest row instead, masked or not, the demo's batch job read 43% more keys."""
        if self.run_cost is None:
            return [(len(needs), max(needs))]
        n = len(needs)
        cost, start = [0] * (n + 1), [0] * (n + 1)  # cost[j]: the best split of rows [0, j); its last run: start[j]
        for j in range(1, n + 1):
            top, cost[j] = 0, float("inf")
            for i in range(j - 1, -1, -1):
                top = max(top, needs[i])
                total = cost[i] + self.run_cost + (j - i) * top
                if total < cost[j]:
                    cost[j], start[j] = total, i
        runs, j = [], len(needs)
        while j:
            i = start[j]
            runs.append((j - i, max(max(needs[i:j]), 1)))  # a run of idle rows reads one key (a finite output)
            j = i
        return runs[::-1]

    def _kv_len(self, needed: int) -> int:
        if self.static_decode:
            size = 64
            while size < needed:
                size *= 2
            return min(size, self.max_len)
        # Masked padding keys still change attention's float rounding: whole buckets (capped at the run's longest
        # sequence) keep a row's logprobs the same whatever shares its step in short runs; exact lengths did not.
        return min(-(-needed // self.kv_bucket) * self.kv_bucket, self.max_len)

    @staticmethod
    def _extend(request: Request, token: int, logprob: float, on_token) -> bool:
        """Add the step's token; True when the request is finished."""
        request.output_ids.append(token)
        request.token_logprobs.append(logprob)
        if on_token is not None:
            on_token(request, token)
        out, need = request.output_ids, request.stop.tail_length
        tail = out[-need:] if len(out) >= need else request.prompt[len(out) - need:] + out
        if request.stop.ends(tail):
            request.finish_reason = "eos"
        elif len(request.prompt) + len(request.output_ids) >= request.settings.max_length:
            request.finish_reason = "length"
        return request.finish_reason is not None


class PipelineStepModel:
    """The step-model protocol beam search drives (start / forward / reorder), over the pipeline: one prompt's beams
    in slots [0, beams), the last stage returning logits instead of tokens."""

    def __init__(self, pipeline: Pipeline, max_position_embeddings: int | None = None):
        self.pipe = pipeline
        self.vocab_size = pipeline.vocab_size
        self.max_position_embeddings = max_position_embeddings
        self._reorder: list[int] = []
        self._started = False

    def start(self, batch_size: int, max_length: int) -> None:
        self.pipe.start(batch_size, max_length)
        self.rows, self._started, self._reorder = batch_size, False, []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        """input_ids [rows, T]: the whole prompt in every row at the first call (no padding), then one token."""
        if not bool((attention_mask != 0).all()):
            raise ValueError("beam search runs one prompt at a time, without padding")
        plan = Plan(return_logits=True, reorder=self._reorder)
        self._reorder = []
        ids = input_ids.tolist()
        if not self._started:
            settings = SlotSettings(len(ids[0]), 1 << 30, 0, 0, False, 1.0, 1.0)
            plan.admissions = [encode_admission(slot, settings) for slot in range(self.rows)]
            plan.chunks = [(slot, 0, len(row), True) for slot, row in enumerate(ids)]
            plan.chunk_tokens = [t for row in ids for t in row]
            self._started = True
        else:
            plan.n_decode, plan.decode_tokens = len(ids), [row[0] for row in ids]
            plan.kv_runs = [(len(ids), int(position_ids.max()) + 1)]
        self.pipe.submit(plan)
        return self.pipe.result()

    def reorder(self, index: torch.Tensor) -> None:
        self._reorder = index.tolist()
