"""Logits processors: what Transformers' generate() does to the next-token scores before picking a token.

Each class re-implements one LogitsProcessor / warper of transformers 5.x (generation/logits_process.py) op for op,
so its output is bit-for-bit Transformers' output. `build_logits_processor` assembles them in the order
GenerationMixin._get_logits_processor does, warpers (temperature, top-k, ...) only when sampling.

Every processor is `__call__(input_ids [N, W], scores [N, V], rows=None) -> new scores [N, V]` and never writes into
the caller's scores. input_ids is the whole row so far: prompt + generated tokens. Without `rows` every row is W long
(a left-padded batch, as generate() runs it). With `rows` (continuous batching: each row is one prompt on its own,
and rows differ in length) input_ids are right-aligned and the missing leading positions hold `V`, an id no
processor can match; `rows` then gives each row's length, prompt length and length limits, so every row is processed
exactly as Transformers processes that prompt alone.

Not here because Transformers 5 has them no more (group beam search and its diversity penalty moved to the Hub) or
because distllama has no option for them: sequence_bias, top_h, watermarking, renormalize_logits, prefix constraints.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from distllama.options import GenerationOptions, resolve_lengths

NEG_INF = -math.inf


@dataclass
class Rows:
    """Per-row facts for rows of different lengths (see the module docstring); every tensor is [N, 1]."""

    lengths: torch.Tensor  # tokens in the row so far: prompt + generated
    prompt_lengths: torch.Tensor
    max_lengths: torch.Tensor  # total length (prompt + new) at which the row stops
    min_lengths: torch.Tensor  # total length before which eos is suppressed
    # Knobs some requests set for themselves (each row holds its request's value, or the run's):
    temperatures: torch.Tensor | None = None
    top_p: torch.Tensor | None = None  # 1 - top_p, computed in float64 then cast, as Transformers compares
    top_k: torch.Tensor | None = None  # 0: off
    min_p: torch.Tensor | None = None  # 0: off
    repetition_penalty: torch.Tensor | None = None  # 1: off


def _row_lengths(input_ids: torch.Tensor, rows: Rows | None) -> torch.Tensor:
    """[N, 1] length of each row: all W without rows."""
    if rows is not None:
        return rows.lengths
    return torch.full((input_ids.shape[0], 1), input_ids.shape[-1], dtype=torch.long, device=input_ids.device)


def _ban_eos_where(applies: torch.Tensor, scores: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """scores with -inf at the eos columns of the rows where applies [N, 1] is true."""
    vocab = torch.arange(scores.shape[-1], device=scores.device)
    is_eos = torch.isin(vocab, eos_ids.to(scores.device))
    return torch.where(applies & is_eos, NEG_INF, scores)


def _eos_tensor(eos_token_ids: int | Iterable[int]) -> torch.Tensor:
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    if not ids or any(not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"eos token ids must be non-negative integers, got {eos_token_ids!r}")
    return torch.tensor(ids, dtype=torch.long)


def _check_min_tokens_to_keep(min_tokens_to_keep: int) -> None:
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Processors (applied in greedy, sampling and beam search alike)


class RepetitionPenalty:
    """Divide positive / multiply negative scores of every token already in the row (prompt included) by `penalty`.

    prompt_padding [N] = leading padding positions per row, which are skipped: generate() passes them so that pad
    tokens are not penalised. Rows follow the decoding rows, hence `reorder`."""

    def __init__(self, penalty: float, prompt_padding: torch.Tensor | None = None):
        if not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a strictly positive float, got {penalty!r}")
        if prompt_padding is not None and prompt_padding.dim() != 1:
            raise ValueError("prompt_padding must be 1D (one count per row)")
        self.penalty = float(penalty)
        self.prompt_padding = prompt_padding

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        vocab_size = scores.shape[-1]
        penalty = self.penalty if rows is None or rows.repetition_penalty is None else rows.repetition_penalty
        if self.prompt_padding is not None:
            if input_ids.shape[0] != self.prompt_padding.shape[0]:
                raise ValueError(
                    f"repetition penalty has padding for {self.prompt_padding.shape[0]} rows, got {input_ids.shape[0]}"
                )
            self.prompt_padding = self.prompt_padding.to(input_ids.device)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            # padding positions point at the spare column added below, which is dropped again
            input_ids = input_ids.masked_fill(positions[None, :] < self.prompt_padding[:, None], vocab_size)
        # ids past the lm_head (embedding vocab larger than the output) also go to the spare column
        input_ids = input_ids.clamp(max=vocab_size)
        padded_scores = torch.nn.functional.pad(scores, (0, 1))
        seen_scores = torch.gather(padded_scores, 1, input_ids)
        seen_scores = torch.where(seen_scores < 0, seen_scores * penalty, seen_scores / penalty)
        return padded_scores.scatter(1, input_ids, seen_scores)[..., :vocab_size]


class NoRepeatNGram:
    """Ban every token that would complete an n-gram already present in the row."""

    def __init__(self, ngram_size: int):
        if not isinstance(ngram_size, int) or ngram_size <= 0:
            raise ValueError(f"no_repeat_ngram_size must be a strictly positive integer, got {ngram_size!r}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        cur_len = input_ids.shape[-1]
        if cur_len < self.ngram_size:
            return scores
        # the next token completes an n-gram whose first n-1 tokens are the row's current suffix: find every window
        # starting with that suffix and ban the token that followed it
        suffix = input_ids[:, cur_len + 1 - self.ngram_size :]  # (N, n-1)
        windows = input_ids.unfold(dimension=1, size=self.ngram_size, step=1)  # (N, cur_len-n+1, n)
        matches = (windows[..., :-1] == suffix.unsqueeze(1)).all(dim=-1)
        vocab_size = scores.shape[-1]
        # non-matching windows write into a spare column, so they cannot unban another window's token
        banned = torch.zeros((scores.shape[0], vocab_size + 1), dtype=torch.bool, device=scores.device)
        banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=vocab_size), vocab_size), True)
        return scores.masked_fill(banned[:, :vocab_size], NEG_INF)


class BadWords:
    """Ban single tokens always, and a multi-token word's last token when the row ends with the rest of the word.

    Like Transformers, a bad word that is just one eos token is dropped (eos stays allowed)."""

    def __init__(self, bad_words_ids: list[list[int]], eos_token_ids: Iterable[int] | None = None):
        if not isinstance(bad_words_ids, list) or not bad_words_ids:
            raise ValueError(f"bad_words_ids must be a non-empty list of lists, got {bad_words_ids!r}")
        for word in bad_words_ids:
            if not isinstance(word, list) or not word or any(not isinstance(t, int) or t < 0 for t in word):
                raise ValueError(f"each bad word must be a non-empty list of non-negative token ids, got {word!r}")
        eos = set(eos_token_ids or [])
        words = {tuple(word) for word in bad_words_ids if not (len(word) == 1 and word[0] in eos)}
        self.single_tokens = [word[0] for word in words if len(word) == 1]
        # multi-token words grouped by prefix length, so each group is matched with one comparison
        by_prefix_length: dict[int, list[tuple[int, ...]]] = {}
        for word in words:
            if len(word) > 1:
                by_prefix_length.setdefault(len(word) - 1, []).append(word)
        self.multi_token_groups = [
            (torch.tensor([word[:-1] for word in group]), torch.tensor([word[-1] for word in group]))
            for group in by_prefix_length.values()
        ]
        self.max_token_id = max((t for word in words for t in word), default=-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        vocab_size = scores.shape[-1]
        if self.max_token_id >= vocab_size:
            raise ValueError(f"bad_words_ids holds token id {self.max_token_id}, outside a vocabulary of {vocab_size}")
        # an additive -inf bias, as Transformers' SequenceBiasLogitsProcessor computes it (same result on +inf/nan)
        single_token_bias = torch.zeros((vocab_size,), dtype=torch.float, device=scores.device)
        single_token_bias[self.single_tokens] = NEG_INF
        bias = torch.zeros_like(scores)
        bias += single_token_bias
        for prefixes, last_tokens in self.multi_token_groups:
            prefixes, last_tokens = prefixes.to(scores.device), last_tokens.to(scores.device)
            prefix_length = prefixes.shape[1]
            if prefix_length > input_ids.shape[1]:
                continue
            matching_rows = (input_ids[:, None, -prefix_length:] == prefixes).all(dim=-1)  # (N, words)
            word_bias = torch.where(matching_rows, NEG_INF, 0.0).to(bias.dtype)
            bias.index_add_(1, last_tokens, word_bias)
        return scores + bias


class MinLength:
    """Forbid eos while the row (prompt included) is shorter than min_length."""

    def __init__(self, min_length: int, eos_token_ids: int | Iterable[int]):
        if not isinstance(min_length, int) or min_length < 0:
            raise ValueError(f"min_length must be a non-negative integer, got {min_length!r}")
        self.min_length = min_length
        self.eos_token_ids = _eos_tensor(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        min_length = self.min_length if rows is None else rows.min_lengths
        return _ban_eos_where(_row_lengths(input_ids, rows) < min_length, scores, self.eos_token_ids)


class MinNewTokens:
    """Forbid eos until min_new_tokens tokens follow the prompt (prompt_length = padded prompt length)."""

    def __init__(self, prompt_length: int, min_new_tokens: int, eos_token_ids: int | Iterable[int]):
        for name, value in (("prompt length", prompt_length), ("min_new_tokens", min_new_tokens)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        self.prompt_length = prompt_length
        self.min_new_tokens = min_new_tokens
        self.eos_token_ids = _eos_tensor(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        prompt_length = self.prompt_length if rows is None else rows.prompt_lengths
        new_tokens = _row_lengths(input_ids, rows) - prompt_length
        return _ban_eos_where(new_tokens < self.min_new_tokens, scores, self.eos_token_ids)


class ForcedBOS:
    """Force `token_id` as the token after a one-token row (Transformers' encoder-decoder heritage)."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        forced = torch.full_like(scores, NEG_INF)
        forced[:, self.token_id] = 0
        return torch.where(_row_lengths(input_ids, rows) == 1, forced, scores)


class ForcedEOS:
    """Force an eos token as the last token, the one that makes the row max_length long."""

    def __init__(self, max_length: int, eos_token_ids: int | Iterable[int]):
        self.max_length = max_length
        self.eos_token_ids = _eos_tensor(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        max_length = self.max_length if rows is None else rows.max_lengths
        forced = torch.full_like(scores, NEG_INF)
        forced[:, self.eos_token_ids.to(scores.device)] = 0
        return torch.where(_row_lengths(input_ids, rows) == max_length - 1, forced, scores)


class ExponentialDecayLengthPenalty:
    """From `start` new tokens on, raise the eos scores by |score| * (factor ** tokens_past_start - 1)."""

    def __init__(self, start: int, factor: float, eos_token_ids: int | Iterable[int], prompt_length: int):
        self.start, self.prompt_length = start, prompt_length
        self.factor = factor
        self.eos_token_ids = _eos_tensor(eos_token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        prompt_length = self.prompt_length if rows is None else rows.prompt_lengths
        past_start = _row_lengths(input_ids, rows) - (self.start + prompt_length)  # [N, 1]
        if rows is None and int(past_start[0]) <= 0:
            return scores
        # factor ** steps - 1 in float64 (Python's pow in Transformers), 0 where the decay has not started
        growth = torch.pow(torch.tensor(self.factor, dtype=torch.float64), past_start.clamp(min=0).double()) - 1
        growth = growth.masked_fill(past_start <= 0, 0.0).to(scores.dtype)
        eos = self.eos_token_ids.to(scores.device)
        eos_scores = scores[:, eos]
        # the absolute value keeps the push towards eos for negative logits too; -inf (banned) eos stays banned
        penalty = torch.abs(eos_scores) * growth
        penalty = penalty.masked_fill(~torch.isfinite(eos_scores), 0.0)
        penalties = torch.zeros_like(scores)
        penalties[:, eos] = penalty
        return scores + penalties


class SuppressTokens:
    """Always forbid the given tokens."""

    def __init__(self, token_ids: Iterable[int]):
        self.token_ids = torch.tensor(list(token_ids), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        return torch.where(torch.isin(vocab, self.token_ids.to(scores.device)), NEG_INF, scores)


class SuppressTokensAtBegin:
    """Forbid the given tokens as the first generated token (the row is begin_index long)."""

    def __init__(self, token_ids: Iterable[int], begin_index: int, after_forced_bos: bool = False):
        self.token_ids = torch.tensor(list(token_ids), dtype=torch.long)
        self.begin_index = begin_index
        self.after_forced_bos = after_forced_bos  # with rows: 1-token prompts begin one later (forced bos first)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        if rows is None:
            begin_index = self.begin_index
        else:  # a one-token prompt followed by a forced bos starts one position later
            begin_index = rows.prompt_lengths + (self.after_forced_bos & (rows.prompt_lengths <= 1))
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        banned = torch.isin(vocab, self.token_ids.to(scores.device))
        return torch.where((_row_lengths(input_ids, rows) == begin_index) & banned, NEG_INF, scores)


# ---------------------------------------------------------------------------------------------------------------------
# Warpers (only when sampling). Filtered tokens get -inf; min_tokens_to_keep of the best always survive.


class Temperature:
    def __init__(self, temperature: float):
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a strictly positive float when sampling, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        return scores / (self.temperature if rows is None or rows.temperatures is None else rows.temperatures)


class TopK:
    """Keep the k best tokens (and every token tied with the k-th)."""

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        if not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a strictly positive integer, got {top_k!r}")
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        if rows is not None and rows.top_k is not None:  # each row its own k (0: keep every token)
            k = rows.top_k.clamp(max=scores.size(-1))
            best = torch.topk(scores, int(k.max().clamp(min=1)))[0]
            kth_best = best.gather(1, (k - 1).clamp(min=0))
            return scores.masked_fill((scores < kth_best) & (k > 0), NEG_INF)
        top_k = min(self.top_k, scores.size(-1))
        kth_best = torch.topk(scores, top_k)[0][..., -1, None]
        return scores.masked_fill(scores < kth_best, NEG_INF)


class TopP:
    """Keep the smallest set of best tokens whose probability adds up to more than top_p (nucleus sampling)."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if top_p < 0 or top_p > 1.0:
            raise ValueError(f"top_p must be a float in [0, 1], got {top_p!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.top_p = top_p
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        # ascending: drop the worst tokens while their total probability stays within 1 - top_p
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        sorted_to_remove = cumulative_probs <= (1 - self.top_p if rows is None or rows.top_p is None else rows.top_p)
        sorted_to_remove[..., -self.min_tokens_to_keep :] = False
        to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
        return scores.masked_fill(to_remove, NEG_INF)


class MinP:
    """Drop tokens less probable than min_p times the best token's probability."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1):
        if not 0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be a float in [0, 1], got {min_p!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.min_p = min_p
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        min_p = self.min_p if rows is None or rows.min_p is None else rows.min_p
        threshold = min_p * probs.amax(dim=-1, keepdim=True)
        to_remove = probs < threshold
        kept = torch.topk(probs, min(self.min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
        to_remove.scatter_(-1, kept, False)
        return scores.masked_fill(to_remove, NEG_INF)


class Typical:
    """Typical sampling: keep the tokens whose surprise is closest to the entropy, up to probability mass `mass`."""

    def __init__(self, mass: float, min_tokens_to_keep: int = 1):
        mass = float(mass)
        if not 0 < mass < 1:
            raise ValueError(f"typical_p must be a float in (0, 1), got {mass!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.mass = mass
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        log_probs = torch.nn.functional.log_softmax(scores, dim=-1)
        probs = torch.exp(log_probs)
        entropy = -(log_probs * probs).nansum(-1, keepdim=True)
        distance = torch.abs((-log_probs) - entropy)
        sorted_distance, sorted_indices = torch.sort(distance, descending=False)
        cumulative_probs = scores.gather(-1, sorted_indices).softmax(dim=-1).cumsum(dim=-1)
        last_kept = (cumulative_probs < self.mass).sum(dim=1)
        last_kept.clamp_(max=sorted_distance.shape[-1] - 1)
        sorted_to_remove = sorted_distance > sorted_distance.gather(1, last_kept.view(-1, 1))
        sorted_to_remove[..., : self.min_tokens_to_keep] = False
        to_remove = sorted_to_remove.scatter(1, sorted_indices, sorted_to_remove)
        return scores.masked_fill(to_remove, NEG_INF)


class EpsilonCutoff:
    """Drop tokens with probability below epsilon."""

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        epsilon = float(epsilon)
        if not 0 < epsilon < 1:
            raise ValueError(f"epsilon_cutoff must be a float in (0, 1), got {epsilon!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.epsilon = epsilon
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        to_remove = scores.softmax(dim=-1) < self.epsilon
        kth_best = torch.topk(scores, min(self.min_tokens_to_keep, scores.size(-1)))[0][..., -1, None]
        return scores.masked_fill(to_remove & (scores < kth_best), NEG_INF)


class EtaCutoff:
    """Drop tokens with probability below eta = min(epsilon, sqrt(epsilon) * exp(-entropy))."""

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        epsilon = float(epsilon)
        if not 0 < epsilon < 1:
            raise ValueError(f"eta_cutoff must be a float in (0, 1), got {epsilon!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.epsilon = torch.tensor(epsilon)
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        epsilon = self.epsilon.to(scores.device)
        probs = scores.softmax(dim=-1)
        # validate_args=False: the argument check reads a device tensor on the host, a sync per step on a GPU
        entropy = torch.distributions.Categorical(logits=scores, validate_args=False).entropy()
        eta = torch.min(epsilon, torch.sqrt(epsilon) * torch.exp(-entropy))[..., None]
        kth_best = torch.topk(scores, min(self.min_tokens_to_keep, scores.size(-1)))[0][..., -1, None]
        return scores.masked_fill((probs < eta) & (scores < kth_best), NEG_INF)


# ---------------------------------------------------------------------------------------------------------------------


class LogitsProcessorChain(list):
    """The processors in order; calling it applies each in turn."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: Rows | None = None) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores, rows)
        return scores


def _as_id_list(token_ids: int | list[int] | None) -> list[int] | None:
    if token_ids is None:
        return None
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def build_logits_processor(
    options: GenerationOptions, input_ids_seq_length: int, attention_mask: torch.Tensor | None = None
) -> LogitsProcessorChain:
    """The processors + (when do_sample) warpers Transformers' generate would build for these options, in its order.

    input_ids_seq_length: the (padded) prompt length T; the rows' input_ids at the first call are [N, T].
    attention_mask: the [N, T] prompt mask of the decoding rows (after expanding each prompt to num_beams /
    num_return_sequences rows, as generate() does); it tells the repetition penalty which leading positions are padding.
    """
    if options.num_beam_groups is not None and options.num_beam_groups > 1:
        raise ValueError("num_beam_groups > 1 (group beam search) is not supported: Transformers 5 moved it to the Hub")
    eos = _as_id_list(options.eos_token_id)
    # lengths counting the prompt, as generate() sets them (a no-op on options already resolved by the caller, which
    # is the only way to get the max_position_embeddings cap of an unset max_length)
    lengths = resolve_lengths(options, input_ids_seq_length)
    max_length, min_length = lengths.max_length, lengths.min_length

    chain = LogitsProcessorChain()
    if options.repetition_penalty is not None and options.repetition_penalty != 1.0:
        # leading padding per row = index of the first real token (all-ones mask: zeros, i.e. nothing skipped)
        padding = None if attention_mask is None else (attention_mask != 0).int().argmax(dim=1)
        chain.append(RepetitionPenalty(options.repetition_penalty, prompt_padding=padding))
    if options.no_repeat_ngram_size is not None and options.no_repeat_ngram_size > 0:
        chain.append(NoRepeatNGram(options.no_repeat_ngram_size))
    if options.bad_words_ids is not None:
        chain.append(BadWords(options.bad_words_ids, eos))
    if min_length is not None and eos is not None and min_length > 0:
        chain.append(MinLength(min_length, eos))
    if options.min_new_tokens is not None and eos is not None and options.min_new_tokens > 0:
        chain.append(MinNewTokens(input_ids_seq_length, options.min_new_tokens, eos))
    if options.forced_bos_token_id is not None:
        chain.append(ForcedBOS(options.forced_bos_token_id))
    if options.forced_eos_token_id is not None:
        chain.append(ForcedEOS(max_length, options.forced_eos_token_id))
    if options.exponential_decay_length_penalty is not None:
        if eos is None:
            raise ValueError("exponential_decay_length_penalty needs an eos_token_id")
        start, factor = options.exponential_decay_length_penalty
        chain.append(ExponentialDecayLengthPenalty(start, factor, eos, input_ids_seq_length))
    if options.suppress_tokens is not None:
        chain.append(SuppressTokens(options.suppress_tokens))
    if options.begin_suppress_tokens is not None:
        # a one-token prompt followed by a forced bos starts generating one position later
        begin_index = input_ids_seq_length
        if input_ids_seq_length <= 1 and options.forced_bos_token_id is not None:
            begin_index += 1
        chain.append(SuppressTokensAtBegin(options.begin_suppress_tokens, begin_index,
                                           after_forced_bos=options.forced_bos_token_id is not None))

    if options.do_sample:
        chain.extend(build_warpers(options))
    return chain


def build_warpers(options: GenerationOptions, per_row: frozenset = frozenset()) -> LogitsProcessorChain:
    """The warpers (temperature, top-k, ...) generate() adds when sampling, in its order.

    per_row: knobs ("temperature", "top_p", "top_k", "min_p") some rows set for themselves (through Rows): their
    warper is included even where the run's own value would leave it out."""
    eos = _as_id_list(options.eos_token_id)
    chain = LogitsProcessorChain()
    # beam sampling keeps enough candidates that some beam can continue past every eos token
    if options.num_beams is not None and options.num_beams > 1:
        min_tokens_to_keep = len(eos) + 1 if eos is not None else 2
    else:
        min_tokens_to_keep = 1
    if "temperature" in per_row or (options.temperature is not None and options.temperature != 1.0):
        chain.append(Temperature(options.temperature if options.temperature else 1.0))
    if "top_k" in per_row or (options.top_k is not None and options.top_k != 0):
        chain.append(TopK(options.top_k or 1, min_tokens_to_keep))
    if "top_p" in per_row or (options.top_p is not None and options.top_p < 1.0):
        chain.append(TopP(options.top_p, min_tokens_to_keep))
    if "min_p" in per_row or options.min_p is not None:  # after temperature, as llama.cpp does
        chain.append(MinP(options.min_p or 0.0, min_tokens_to_keep))
    if options.typical_p is not None and options.typical_p < 1.0:
        chain.append(Typical(options.typical_p, min_tokens_to_keep))
    if options.epsilon_cutoff is not None and 0.0 < options.epsilon_cutoff < 1.0:
        chain.append(EpsilonCutoff(options.epsilon_cutoff, min_tokens_to_keep))
    if options.eta_cutoff is not None and 0.0 < options.eta_cutoff < 1.0:
        chain.append(EtaCutoff(options.eta_cutoff, min_tokens_to_keep))
    return chain
