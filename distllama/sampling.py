"""Token choice on the last pipeline stage: logits processors, greedy or sampled tokens, raw-logit logprobs.

Runs where the logits are, over all rows of a step at once (with tp > 1, a greedy step without processors reads
only each rank's vocabulary shard of them: greedy_from_shards): the last stage keeps, per cache slot, the row's tokens
so far (prompt + generated, on the device) and its settings (lengths, seed, sampling knobs, on the host), so only
the chosen ids and their logprobs go back to rank 0. Each row is processed exactly as Transformers processes that
prompt generated on its own (distllama.processors with Rows).

Sampling is reproducible per request: request i of a run seeded S draws its j-th token with the uniform number
u = hash(S, i, j) (splitmix64), by inverting the cumulative distribution of the processed probabilities. The tokens
therefore depend only on the prompt, S, its index and the options, never on the batch, the slot or the split.
"""

import struct
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from distllama.options import GenerationOptions
from distllama.processors import (BadWords, MinLength, NoRepeatNGram, RepetitionPenalty, Rows,
                                  build_logits_processor, build_warpers)

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One step of splitmix64: a well-mixed 64-bit value of x (Steele, Lea & Flood 2014)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def request_seed(run_seed: int, index: int, sample: int = 0) -> int:
    """The seed of request `index` (its `sample`-th sequence with num_return_sequences) in a run seeded run_seed."""
    return splitmix64(splitmix64(splitmix64(run_seed & _MASK64) ^ index) ^ sample)


def uniform(seed: int, step: int) -> float:
    """The uniform number in [0, 1) with which a request of this seed draws its step-th generated token (`uniforms`
    computes the same on a device)."""
    return (splitmix64(seed ^ splitmix64(step)) >> 11) * 2.0**-53


@dataclass
class SlotSettings:
    """What the last stage knows of the request in a slot, from its admission."""

    prompt_length: int
    max_length: int  # total length (prompt + new) at which it stops
    min_length: int  # total length before which eos is suppressed
    seed: int
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0
    length: int = 0  # tokens of the row so far (prompt + generated)

    @classmethod
    def of(cls, prompt_length: int, max_length: int, min_length: int, seed: int, options) -> "SlotSettings":
        """A request's settings from its (resolved) generation options."""
        return cls(prompt_length, max_length, min_length, seed, options.do_sample, options.temperature,
                   options.top_p, options.top_k or 0, options.min_p or 0.0, options.repetition_penalty)


# Knobs a request may set for itself (OpenAI batch lines), applied per row on the last stage.
ROW_KNOBS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
PER_ROW = ROW_KNOBS + ("min_length",)  # what TokenSampler's per_row may name
# The admission record a step plan carries per new request (distllama.pipeline), floats as their IEEE-754 bits.
ADMIT_FIELDS = 11


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", b))[0]


def encode_admission(slot: int, s: SlotSettings) -> list[int]:
    seed = s.seed - (1 << 64) if s.seed >= 1 << 63 else s.seed  # int64 on the wire
    return [slot, s.prompt_length, s.max_length, s.min_length, seed, int(s.do_sample), _bits(s.temperature),
            _bits(s.top_p), s.top_k, _bits(s.min_p), _bits(s.repetition_penalty)]


def decode_admission(fields: list[int]) -> tuple[int, SlotSettings]:
    slot, prompt_length, max_length, min_length, seed, do_sample, temperature, top_p, top_k, min_p, penalty = fields
    return slot, SlotSettings(prompt_length, max_length, min_length, seed & _MASK64, bool(do_sample),
                              _float(temperature), _float(top_p), top_k, _float(min_p), _float(penalty))


def uniforms(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """uniform(seed, step) for tensors of them, on their device: splitmix64 in int64 arithmetic (a multiplication
    wraps around as in uint64; a logical right shift is an arithmetic one with the sign bits masked off)."""
    def shift(x, k):
        return (x >> k) & ((1 << (64 - k)) - 1)

    def mix(x):
        x = x + _signed(0x9E3779B97F4A7C15)
        x = (x ^ shift(x, 30)) * _signed(0xBF58476D1CE4E5B9)
        x = (x ^ shift(x, 27)) * _signed(0x94D049BB133111EB)
        return x ^ shift(x, 31)

    return shift(mix(seeds ^ mix(steps)), 11).double() * 2.0**-53


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def row_processors(options: GenerationOptions, per_row: frozenset = frozenset()):
    """The logits processors every row of a run goes through (TokenSampler's; empty: greedy is the raw argmax)."""
    # Built for "rows" mode: lengths come per row, so the prompt length given here is unused.
    processors = build_logits_processor(replace(options, do_sample=False, max_length=None, max_new_tokens=2), 1)
    if "repetition_penalty" in per_row and not any(isinstance(p, RepetitionPenalty) for p in processors):
        processors.insert(0, RepetitionPenalty(1.0))  # first, as generate() orders them
    eos = options.eos_token_id
    if "min_length" in per_row and eos and not any(isinstance(p, MinLength) for p in processors):
        after = sum(isinstance(p, (RepetitionPenalty, NoRepeatNGram, BadWords)) for p in processors)
        processors.insert(after, MinLength(0, eos))
    return processors


class TokenSampler:
    """The last stage's per-slot token history and settings, all on its device, and the step's token choice for its
    rows: no per-step host-to-device copy, and no host synchronisation but the caller's one read of the results."""

    def __init__(self, options: GenerationOptions, vocab_size: int, slots: int, max_len: int, device,
                 per_row: frozenset = frozenset()):
        """per_row: the ROW_KNOBS some requests set for themselves ("min_length" too, for per-request minimums):
        their processors are always in the chain, each row holding its own value."""
        self.options, self.vocab_size, self.device, self.per_row = options, vocab_size, device, per_row
        self.processors = row_processors(options, per_row)
        self.warpers = build_warpers(options, per_row)
        self.needs_history = any(isinstance(p, (RepetitionPenalty, NoRepeatNGram, BadWords)) for p in self.processors)
        self.scratch = max_len  # the history column idle rows write to
        # (slots, max_len + 1): token j of the row in column j; read right-aligned by _history
        self.history = torch.zeros((slots, max_len + 1), dtype=torch.long, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens of the row so far
        # each slot's settings (SlotSettings), one tensor per field; an empty slot holds harmless values
        idle = SlotSettings(0, 1 << 30, 0, 0, False)
        self.settings = {name: torch.full((slots,), 1 - value if name == "top_p" else value, dtype=self._dtype(name),
                                          device=device)
                         for name, value in vars(idle).items() if name != "length"}

    @staticmethod
    def _dtype(name: str) -> torch.dtype:
        return {"do_sample": torch.bool, "temperature": torch.float32, "top_p": torch.float32,
                "min_p": torch.float32, "repetition_penalty": torch.float32}.get(name, torch.long)

    def admit(self, slots: list[int], settings: list[SlotSettings]) -> None:
        index = torch.tensor(slots, device=self.device)
        for name, values in self.settings.items():
            column = [getattr(s, name) for s in settings]
            if name == "seed":
                column = [_signed(v) for v in column]
            elif name == "top_p":  # what the processors compare with: 1 - top_p in float64, then float32
                column = [1 - v for v in column]
            values[index] = torch.tensor(column, dtype=values.dtype).to(self.device)
        self.lengths[index] = 0

    def add_prompt(self, slot: int, start: int, tokens: torch.Tensor) -> None:
        """A prefill chunk of the slot's prompt passed this stage: tokens [length] on the device."""
        self.history[slot, start:start + len(tokens)] = tokens
        self.lengths[slot] = start + len(tokens)

    def move(self, source: int, target: int) -> None:
        """A request moved from slot source to slot target."""
        for tensor in (self.history, self.lengths, *self.settings.values()):
            tensor[target] = tensor[source]

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search moved rows: slot i takes slot index[i]."""
        n = len(index)
        for tensor in (self.history, self.lengths, *self.settings.values()):
            tensor[:n] = tensor[index].clone()

    @torch.no_grad()
    def choose(self, logits: torch.Tensor, slots: torch.Tensor, active: torch.Tensor,
               any_sampling: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [n, V] float32 of the rows of slots [n] (device); only active [n] rows are real (an idle decode row
        gets a token nobody reads). Returns token ids [n] and their raw-logit logprobs [n]; extends the active rows."""
        if len(slots) == 0:  # a step of prompt chunks none of which ends its prompt
            return torch.empty(0, dtype=torch.long, device=logits.device), logits.new_empty(0)
        lengths = self.lengths[slots]
        rows = self._rows(slots, lengths, any_sampling)
        ids = self._history(slots, lengths) if self.needs_history else lengths.new_empty((len(slots), 0))
        raw_logprobs = F.log_softmax(logits, dim=-1)
        scores = self.processors(ids, logits, rows)
        tokens = first_max(scores)[1]
        if any_sampling:
            probs = F.softmax(self.warpers(ids, scores, rows), dim=-1)
            steps = lengths - self.settings["prompt_length"][slots]  # tokens the request generated so far
            sampled = inverse_cdf(probs, uniforms(self.settings["seed"][slots], steps))
            tokens = torch.where(self.settings["do_sample"][slots], sampled, tokens)
        token_logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        self._record(tokens, slots, lengths, active)
        return tokens, token_logprobs

    @property
    def greedy_only(self) -> bool:
        """No processor changes the logits: a greedy step is the argmax of the raw logits (choose_from_shard)."""
        return len(self.processors) == 0

    @torch.no_grad()
    def choose_from_shard(self, shard_logits: torch.Tensor, first_id: int, gather, slots: torch.Tensor,
                          active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """choose for a greedy step with greedy_only, from this tp rank's vocabulary shard of the logits (ids
        first_id ..): see greedy_from_shards. Every tp rank gets the same tokens."""
        if len(slots) == 0:  # as in choose; every tp rank skips the all-gather alike
            return self.choose(shard_logits, slots, active, False)
        tokens, token_logprobs = greedy_from_shards(shard_logits, first_id, gather)
        self._record(tokens, slots, self.lengths[slots], active)
        return tokens, token_logprobs

    def count(self, slots: torch.Tensor, active: torch.Tensor) -> None:
        """The active rows grow by one token. Alone for a greedy step whose token the first stage picks (pipeline's
        split head): the history is not written then, as with greedy_only no processor reads it."""
        # index_add: a slot may appear twice (an idle decode row and the chunk completing its prompt)
        self.lengths.index_add_(0, slots, active.long())

    def _record(self, tokens: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor) -> None:
        self.history[slots, torch.where(active, lengths, self.scratch)] = tokens
        self.count(slots, active)

    def _rows(self, slots: torch.Tensor, lengths: torch.Tensor, any_sampling: bool) -> Rows:
        def column(name):
            return self.settings[name][slots][:, None]

        rows = Rows(lengths=lengths[:, None], prompt_lengths=column("prompt_length"),
                    max_lengths=column("max_length"), min_lengths=column("min_length"))
        if "repetition_penalty" in self.per_row:
            rows.repetition_penalty = column("repetition_penalty")
        if any_sampling:
            rows.temperatures, rows.top_p = column("temperature"), column("top_p")
            if "top_k" in self.per_row:
                rows.top_k = column("top_k")
            if "min_p" in self.per_row:
                rows.min_p = column("min_p")
        return rows

    def _history(self, slots: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[n, W] right-aligned rows so far; positions before a row's start hold vocab_size (matches nothing)."""
        width = self.history.shape[1]
        columns = torch.arange(width, device=self.device)[None, :] - (width - lengths[:, None])  # source column
        rows = self.history[slots].gather(1, columns.clamp(min=0))
        return rows.masked_fill(columns < 0, self.vocab_size)


def greedy_from_shards(shard_logits: torch.Tensor, first_id: int, gather) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [n] and their raw logprobs [n] from vocabulary-parallel logits: this rank holds [n, V / tp] of
    them (ids first_id ..). Each rank reduces its shard to three values per row (shard_stats), and gather (an
    all-gather over the tp group, concatenating the last dim) brings every rank those [n, 3 x tp] values instead of
    the [n, V] logits."""
    stats = shard_stats(shard_logits, first_id)
    tokens, token_logprobs = pick_from_stats(gather(stats).view(len(stats), -1, 3))
    return tokens, token_logprobs.to(shard_logits.dtype)


def first_max(scores: torch.Tensor, keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's maximum and the first id at it, as torch.argmax picks it (NaN counts as the maximum). max(dim)
    returns the same index in one vectorised pass: 0.7 against argmax's 2.0 ms for [32, 49152] on a CPU."""
    return scores.max(dim=-1, keepdim=keepdim)


def shard_stats(shard_logits: torch.Tensor, first_id: int) -> torch.Tensor:
    """[n, 3] float64 per row of a vocabulary shard (ids first_id ..): its max, the first id at the max, and the
    log-sum-exp of the shard's logits relative to its max."""
    best, first = first_max(shard_logits, keepdim=True)
    # log sum exp(logit - shard max) is minus log_softmax at the max (relative to the max: no float32 rounding of a
    # large logsumexp; and log_softmax is the fastest pass over the row); a shard of padding only gives -inf
    spread = -F.log_softmax(shard_logits, dim=-1).gather(1, first).nan_to_num(nan=float("-inf"))
    return torch.cat([best, first + first_id, spread], dim=1).double()  # float64: ids stay exact


def pick_from_stats(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """stats [n, shards, 3] (shard_stats of the shards in id order) -> the greedy tokens [n] and their raw logprobs
    [n] (float64) over the whole rows. As torch.argmax of the whole row, the first maximum wins."""
    top = stats[..., 0].amax(dim=1, keepdim=True)
    winner = (stats[..., 0] == top).int().argmax(dim=1, keepdim=True)  # lower shards hold lower ids
    tokens = stats[..., 1].gather(1, winner).squeeze(1).long()
    # log_softmax at the max: -log(sum over the row of exp(logit - max)), summed shard by shard
    return tokens, -torch.log(torch.exp(stats[..., 0] - top + stats[..., 2]).sum(dim=1))


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row: the first whose cumulative probability exceeds u [n] (times the row's total, so rounding in
    the sum never points past the last token). A zero-probability token is never chosen."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp(max=probs.shape[-1] - 1)
