"""The decoding loop: greedy and sampling over a StepModel, step for step as Transformers' generate() / _sample.

Owns the per-row bookkeeping of a batch of left-padded prompts: expansion for num_return_sequences, the attention
mask and position ids of each step, token choice (argmax, or torch.multinomial with one seeded generator), the stop
conditions (max_length, eos ids, stop strings), finish reasons and raw-logit logprobs. Beam search lives in
distllama.beam; `generate` dispatches to it.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distllama.options import GenerationOptions, resolve_lengths
from distllama.processors import build_logits_processor


@dataclass
class SequenceOutput:
    output_ids: list[int]  # generated tokens only, up to and including the eos / stop token; no padding after
    finish_reason: str  # "eos" (eos token or stop string) or "length"
    token_logprobs: list[float]  # log_softmax of the model's raw logits (before processors) at each output id
    score: float | None = None  # beam search: the sequence score, as HF's sequences_scores


@dataclass
class PromptOutput:
    sequences: list[SequenceOutput] = field(default_factory=list)  # num_return_sequences entries, best first


def generate(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    options: GenerationOptions,
    vocab: dict[str, int] | None = None,
    on_step: Callable[[torch.LongTensor, torch.BoolTensor], None] | None = None,
    drop_finished: bool = False,
) -> list[PromptOutput]:
    """Generate for a batch of left-padded prompts input_ids / attention_mask [B, T]; one PromptOutput per prompt.

    model: a StepModel (start / forward / reorder; an optional max_position_embeddings caps the default max_length).
    vocab: token string -> id, as tokenizer.get_vocab(); needed for stop_strings.
    on_step(new_tokens [N], finished [N]) after every step, N = B * num_return_sequences rows (prompt-major):
        the token each row got this step (pad_token_id for rows that had already finished) and whether it is done.
    drop_finished: remove finished rows from the running batch (model.reorder); results are unchanged.
    num_beams > 1 goes to distllama.beam.beam_search, which takes neither on_step nor drop_finished.
    """
    if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be [batch, length], got "
                         f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
    prompt_len = input_ids.shape[1]
    options = resolve_lengths(options, prompt_len, getattr(model, "max_position_embeddings", None))
    stopping = StopCondition(options.eos_token_id, options.stop_strings, vocab)
    generator = _generator(options, input_ids.device) if options.do_sample else None

    # Each prompt becomes consecutive identical rows, as HF's _expand_inputs_for_generation.
    expand = max(options.num_beams, options.num_return_sequences)
    row_ids = input_ids.repeat_interleave(expand, dim=0)
    row_mask = attention_mask.repeat_interleave(expand, dim=0)
    logits_processor = build_logits_processor(options, prompt_len, row_mask)

    if options.num_beams > 1:
        from distllama import beam  # here, not at the top: beam imports this module's output classes

        return beam.beam_search(model, input_ids, attention_mask, options, logits_processor, stopping, generator)
    return _sample(model, row_ids, row_mask, options, logits_processor, stopping, generator, on_step, drop_finished)


def _generator(options: GenerationOptions, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    if options.seed is None:
        generator.seed()  # a fresh non-deterministic seed
    else:
        generator.manual_seed(options.seed)
    return generator


def _sample(model, input_ids, attention_mask, options, logits_processor, stopping, generator, on_step, drop_finished):
    """HF's _sample loop over N rows; `running` holds the rows still in the model's batch."""
    n_rows, prompt_len = input_ids.shape
    device = input_ids.device
    eos_ids = options.eos_token_id or []
    # HF pads finished rows with pad_token_id, else the first eos id; without eos no row ends early
    pad_id = options.pad_token_id if options.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)

    sequences = input_ids
    mask = attention_mask
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # HF: cumsum - 1, padding at 0
    running = torch.arange(n_rows, device=device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    outputs = [SequenceOutput(output_ids=[], finish_reason="length", token_logprobs=[]) for _ in range(n_rows)]

    model.start(n_rows, options.max_length)
    step_ids, step_positions = input_ids, position_ids
    while True:
        logits = model.forward(step_ids, mask[running], step_positions).to(torch.float32)  # [running, V]
        raw_logprobs = F.log_softmax(logits, dim=-1)
        scores = logits_processor(sequences[running], logits)
        if options.do_sample:
            tokens = _multinomial(F.softmax(scores, dim=-1), running, n_rows, generator)
        else:
            tokens = torch.argmax(scores, dim=-1)
        token_logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)

        # rows that finished in an earlier step get padding, as in HF
        was_finished = finished[running]
        tokens = torch.where(was_finished, pad_id, tokens)
        new_tokens = torch.full((n_rows,), pad_id, dtype=torch.long, device=device)
        new_tokens[running] = tokens
        sequences = torch.cat([sequences, new_tokens[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones((n_rows, 1))], dim=-1)

        ended = stopping(sequences[running]) & ~was_finished
        at_max_length = sequences.shape[1] >= options.max_length
        for i, row in enumerate(running.tolist()):
            if not was_finished[i]:
                outputs[row].output_ids.append(int(tokens[i]))
                outputs[row].token_logprobs.append(float(token_logprobs[i]))
                if ended[i]:
                    outputs[row].finish_reason = "eos"
        finished[running] = was_finished | ended | at_max_length
        if on_step is not None:
            on_step(new_tokens, finished.clone())
        if bool(finished.all()):
            break

        if drop_finished and bool(finished[running].any()):
            keep = torch.nonzero(~finished[running]).squeeze(1)
            model.reorder(keep)
            if hasattr(logits_processor, "reorder"):
                logits_processor.reorder(keep)  # per-row processor state (e.g. prompt padding) follows the rows
            running = running[keep]
        step_ids = sequences[running, -1:]
        step_positions = position_ids[running, -1:] + (sequences.shape[1] - prompt_len)

    per_prompt = options.num_return_sequences
    return [PromptOutput(sequences=outputs[start : start + per_prompt]) for start in range(0, n_rows, per_prompt)]


def _multinomial(probs, running, n_rows: int, generator) -> torch.LongTensor:
    """One sample per running row, drawing the random numbers for all n_rows rows.

    torch.multinomial consumes the generator per row of its input, so sampling the full batch (dropped rows get a
    dummy uniform distribution) keeps every row's draws, and so the tokens, identical to HF's and to
    drop_finished=False.
    """
    if probs.shape[0] == n_rows:
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    full = torch.ones((n_rows, probs.shape[1]), dtype=probs.dtype, device=probs.device)
    full[running] = probs
    return torch.multinomial(full, num_samples=1, generator=generator).squeeze(1)[running]


# ---- stop conditions ----------------------------------------------------------------------------------------------


class StopCondition:
    """Which rows just ended: last token is an eos id, or a stop string ends in the last token.

    Stop strings follow HF's StopStringCriteria: a match must overlap the last token (it may start inside an earlier
    one or stick out before the window), and the whole row, prompt included, is the text searched. Call with
    sequences [N, cur_len] -> BoolTensor [N]. max_length is not checked here.
    """

    def __init__(self, eos_token_id: list[int] | int | None, stop_strings: list[str] | None = None,
                 vocab: dict[str, int] | None = None):
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.eos_ids = torch.tensor(eos, dtype=torch.long)
        self.stop_strings = [s.encode("utf-8") for s in (stop_strings or [])]
        self.token_bytes = []
        if self.stop_strings:
            if vocab is None:
                raise ValueError("stop_strings need the tokenizer vocabulary (vocab=tokenizer.get_vocab())")
            self.token_bytes = token_bytes_from_vocab(vocab)
            # HF looks at most one token per character of the longest stop string
            self.window = max(len(s) for s in self.stop_strings)

    def __call__(self, sequences: torch.LongTensor) -> torch.BoolTensor:
        ended = torch.isin(sequences[:, -1], self.eos_ids.to(sequences.device))
        if self.stop_strings:
            tails = sequences[:, -self.window :].tolist()
            for row, tail in enumerate(tails):
                if not ended[row] and self._ends_with_stop_string(tail):
                    ended[row] = True
        return ended

    def _ends_with_stop_string(self, token_ids: list[int]) -> bool:
        pieces = [self.token_bytes[t] if 0 <= t < len(self.token_bytes) else b"" for t in token_ids]
        text = b"".join(pieces)
        last_start = len(text) - len(pieces[-1])
        # an occurrence counts when it ends inside the last token, i.e. starts after this offset
        return any(text.find(stop, max(0, last_start - len(stop) + 1)) != -1 for stop in self.stop_strings)


# GPT-2 byte-level BPE writes each byte as a printable character; this inverts that table.
def _byte_level_decoder() -> dict[str, int]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def token_bytes_from_vocab(vocab: dict[str, int]) -> list[bytes]:
    """The text (UTF-8 bytes) each token id stands for, as HF's StopStringCriteria cleans the vocabulary.

    Byte-level BPE ("Ġ" for space; Llama 3, SmolLM): map characters back to bytes. SentencePiece ("▁" for space;
    Llama 2): "▁" is a space and "<0xNN>" the byte NN. Anything else: the token's own text.
    """
    tokens = list(vocab)
    byte_level = any("Ġ" in t for t in tokens) and not any("▁" in t for t in tokens)
    sentencepiece = any("▁" in t for t in tokens)
    byte_decoder = _byte_level_decoder()
    table = [b""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        if byte_level and all(c in byte_decoder for c in token):
            text = bytes(byte_decoder[c] for c in token)
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            text = bytes([int(token[3:5], 16)])
        elif sentencepiece:
            text = token.replace("▁", " ").encode("utf-8")
        else:
            text = token.encode("utf-8")
        table[token_id] = text
    return table
