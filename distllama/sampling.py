"""Token choice on the last pipeline stage: logits processors, greedy or sampled tokens, raw-logit logprobs.

Runs where the logits are, over all rows of a step at once: the last stage keeps, per cache slot, the row's tokens
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
    """The uniform number in [0, 1) with which a request of this seed draws its step-th generated token."""
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


class TokenSampler:
    """The last stage's per-slot token history and settings, and the step's token choice for its rows."""

    def __init__(self, options: GenerationOptions, vocab_size: int, slots: int, max_len: int, device,
                 per_row: frozenset = frozenset()):
        """per_row: the ROW_KNOBS some requests set for themselves ("min_length" too, for per-request minimums):
        their processors are always in the chain, each row holding its own value."""
        self.options, self.vocab_size, self.device, self.per_row = options, vocab_size, device, per_row
        # Processors are built for "rows" mode: lengths come per row, so the prompt length given here is unused.
        self.processors = build_logits_processor(replace(options, do_sample=False, max_length=None,
                                                         max_new_tokens=2), 1)
        if "repetition_penalty" in per_row and not any(isinstance(p, RepetitionPenalty) for p in self.processors):
            self.processors.insert(0, RepetitionPenalty(1.0))  # first, as generate() orders them
        eos = options.eos_token_id
        if "min_length" in per_row and eos and not any(isinstance(p, MinLength) for p in self.processors):
            after = sum(isinstance(p, (RepetitionPenalty, NoRepeatNGram, BadWords)) for p in self.processors)
            self.processors.insert(after, MinLength(0, eos))
        self.warpers = build_warpers(options, per_row)
        self.needs_history = any(isinstance(p, (RepetitionPenalty, NoRepeatNGram, BadWords)) for p in self.processors)
        # (slots, max_len + 1): token j of the row in column j; read right-aligned by _history
        self.history = torch.zeros((slots, max_len + 1), dtype=torch.long, device=device)
        self.settings: list[SlotSettings | None] = [None] * slots

    def admit(self, slot: int, settings: SlotSettings) -> None:
        self.settings[slot] = settings

    def add_prompt(self, slot: int, start: int, tokens: torch.Tensor) -> None:
        """A prefill chunk of the slot's prompt passed this stage: tokens [length] on the device."""
        self.history[slot, start:start + len(tokens)] = tokens
        self.settings[slot].length = start + len(tokens)

    def reorder(self, index: list[int]) -> None:
        """Beam search moved rows: slot i takes slot index[i]."""
        self.settings[:len(index)] = [self.settings[i] and replace(self.settings[i]) for i in index]
        self.history[:len(index)] = self.history[index]

    @torch.no_grad()
    def choose(self, logits: torch.Tensor, slots: list[int], active: list[bool],
               any_sampling: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [n, V] float32 of the rows in `slots`; only `active` rows are real (idle decode rows get a token
        that nobody reads). Returns (token ids [n], their raw-logit logprobs [n]) and extends the active rows."""
        n = len(slots)
        if n == 0:  # a step of prompt chunks none of which ends its prompt
            return torch.empty(0, dtype=torch.long, device=logits.device), logits.new_empty(0)
        settings = [self.settings[s] or _IDLE for s in slots]
        rows = self._rows(settings, any_sampling)
        ids = self._history(slots, rows.lengths) if self.needs_history else torch.empty((n, 0), dtype=torch.long)
        raw_logprobs = F.log_softmax(logits, dim=-1)
        scores = self.processors(ids, logits, rows)
        tokens = torch.argmax(scores, dim=-1)
        if any_sampling:
            probs = F.softmax(self.warpers(ids, scores, rows), dim=-1)
            u = [uniform(s.seed, s.length - s.prompt_length) for s in settings]
            sampled = inverse_cdf(probs, torch.tensor(u, dtype=torch.float64, device=logits.device))
            do_sample = torch.tensor([s.do_sample for s in settings], device=logits.device)
            tokens = torch.where(do_sample, sampled, tokens)
        token_logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)

        live = [i for i, a in enumerate(active) if a]
        if live:
            index = torch.tensor(live, device=logits.device)
            lengths = torch.tensor([settings[i].length for i in live], device=logits.device)
            self.history[torch.tensor([slots[i] for i in live], device=logits.device), lengths] = tokens[index]
            for i in live:
                settings[i].length += 1
        return tokens, token_logprobs

    def _rows(self, settings: list[SlotSettings], any_sampling: bool) -> Rows:
        def column(values, dtype=torch.long):
            return torch.tensor(values, dtype=dtype, device=self.device)[:, None]

        rows = Rows(lengths=column([s.length for s in settings]),
                    prompt_lengths=column([s.prompt_length for s in settings]),
                    max_lengths=column([s.max_length for s in settings]),
                    min_lengths=column([s.min_length for s in settings]))
        if "repetition_penalty" in self.per_row:
            rows.repetition_penalty = column([s.repetition_penalty for s in settings], torch.float32)
        if any_sampling:
            rows.temperatures = column([s.temperature for s in settings], torch.float32)
            # 1 - top_p in float64, then float32: what Transformers' comparison with a Python float amounts to
            rows.top_p = column([1 - s.top_p for s in settings], torch.float32)
            if "top_k" in self.per_row:
                rows.top_k = column([s.top_k for s in settings])
            if "min_p" in self.per_row:
                rows.min_p = column([s.min_p for s in settings], torch.float32)
        return rows

    def _history(self, slots: list[int], lengths: torch.Tensor) -> torch.Tensor:
        """[n, W] right-aligned rows so far; positions before a row's start hold vocab_size (matches nothing)."""
        width = self.history.shape[1]
        columns = torch.arange(width, device=self.device)[None, :] - (width - lengths)  # (n, W): source column
        rows = self.history[torch.tensor(slots, device=self.device)].gather(1, columns.clamp(min=0))
        return rows.masked_fill(columns < 0, self.vocab_size)


_IDLE = SlotSettings(prompt_length=0, max_length=1 << 30, min_length=0, seed=0, do_sample=False, length=1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row: the first whose cumulative probability exceeds u [n] (times the row's total, so rounding in
    the sum never points past the last token). A zero-probability token is never chosen."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp(max=probs.shape[-1] - 1)
