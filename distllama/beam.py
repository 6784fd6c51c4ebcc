"""Beam search (and beam sampling), token-identical to Transformers 5's vectorized GenerationMixin._beam_search.

Owns the beam bookkeeping only: per prompt, `num_beams` running hypotheses and the `num_beams` best finished ones,
kept as [batch, beams, ...] tensors exactly like Transformers does, so that scores, ties and the order of the
returned sequences match. The model is driven through the StepModel protocol (start / forward / reorder); logits
processors and the eos / stop-string test come in as callables (distllama.processors, distllama.stopping).

Group (diverse) beam search is not supported: Transformers 5 moved it out of core to the Hub
(transformers-community/group-beam-search), so there is no in-library behaviour to match.
"""

import torch
import torch.nn.functional as F

from distllama.outputs import PromptOutput, SequenceOutput
from distllama.options import resolve_lengths

# Transformers' "minus infinity" for scores that must never win a top-k, kept finite so sums stay ordered.
NEVER = -1.0e9


def _gather_beams(tensor: torch.Tensor, beam_indices: torch.Tensor) -> torch.Tensor:
    """tensor [B, K, ...], beam_indices [B, k] -> tensor[b, beam_indices[b, j], ...] as [B, k, ...]."""
    while beam_indices.dim() < tensor.dim():
        beam_indices = beam_indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, beam_indices, dim=1)


def _check_options(options) -> None:
    if (options.num_beam_groups or 1) > 1:
        raise ValueError(
            "num_beam_groups > 1 (group / diverse beam search) is not supported: Transformers 5 moved it out of "
            "core to transformers-community/group-beam-search"
        )
    if options.num_return_sequences > options.num_beams:
        raise ValueError(
            f"num_return_sequences ({options.num_return_sequences}) must be <= num_beams ({options.num_beams})"
        )


def beam_search(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    options,
    logits_processor,
    stopping,
    generator: torch.Generator | None = None,
) -> list[PromptOutput]:
    """Beam search over a left-padded batch; one PromptOutput per prompt, in input order.

    model: a StepModel. input_ids / attention_mask: [B, T] left-padded prompts.
    options: GenerationOptions (num_beams, length_penalty, early_stopping, num_return_sequences, do_sample,
        eos_token_id, num_beam_groups, max_length / max_new_tokens are read here; lengths as resolve_lengths).
    logits_processor(input_ids [N, cur_len], scores [N, V]) -> processed scores, as build_logits_processor builds it
        (with do_sample it includes the warpers); it gets log_softmax of the logits, as in Transformers.
    stopping(sequences [N, cur_len]) -> BoolTensor [N]: True where the sequence just ended by an eos id or a stop
        string. max_length is applied here (it decides finish_reason "length"), so stopping must not include it.
    generator: the random source for beam sampling (do_sample=True); unused otherwise.
    """
    batch_size, prompt_len = input_ids.shape
    options = resolve_lengths(options, prompt_len)  # idempotent: max_length becomes the total length
    max_length = options.max_length
    _check_options(options)
    num_beams = options.num_beams
    length_penalty = options.length_penalty
    early_stopping = options.early_stopping
    device = input_ids.device
    max_new = max_length - prompt_len

    # Keep (eos count + 1) * num_beams candidates per step so that num_beams of them can continue even if the best
    # ones all end with an eos; only the first num_beams candidates may enter the finished set.
    eos = options.eos_token_id
    n_eos = 0 if eos is None else 1 if isinstance(eos, int) else len(eos)
    beams_to_keep = max(2, 1 + n_eos) * num_beams
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams

    # Running hypotheses: full sequences (prompt + generated), accumulated log-probs of the processed scores, and
    # the raw log-prob of each generated token (for token_logprobs). Only the first beam starts alive, so the first
    # step does not pick the same token num_beams times.
    running_seqs = input_ids.new_zeros((batch_size, num_beams, max_length))
    running_seqs[:, :, :prompt_len] = input_ids[:, None, :]
    running_scores = torch.zeros((batch_size, num_beams), dtype=torch.float32, device=device)
    running_scores[:, 1:] = NEVER
    running_logprobs = torch.zeros((batch_size, num_beams, max_new), dtype=torch.float32, device=device)

    # Finished hypotheses: the num_beams best, sorted by length-penalized score; empty slots score NEVER.
    done_seqs = running_seqs.clone()
    done_scores = torch.full((batch_size, num_beams), NEVER, dtype=torch.float32, device=device)
    done_logprobs = running_logprobs.clone()
    done_lengths = torch.zeros((batch_size, num_beams), dtype=torch.long, device=device)
    done_by_eos = torch.zeros((batch_size, num_beams), dtype=torch.bool, device=device)
    is_done = torch.zeros((batch_size, num_beams), dtype=torch.bool, device=device)
    # Per prompt: can a running beam still beat the worst finished one?
    can_improve = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
    batch_offset = torch.arange(batch_size, device=device)[:, None] * num_beams

    # Each prompt is expanded to num_beams identical rows, like Transformers' _expand_inputs_for_generation.
    mask = attention_mask.repeat_interleave(num_beams, dim=0)
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    step_ids = input_ids.repeat_interleave(num_beams, dim=0)
    model.start(batch_size * num_beams, max_length)

    cur_len = prompt_len
    while True:
        logits = model.forward(step_ids, mask, position_ids).to(torch.float32)  # [B*nb, V]
        vocab_size = logits.shape[-1]
        raw_logprobs = F.log_softmax(logits, dim=-1)
        flat_seqs = running_seqs[:, :, :cur_len].reshape(batch_size * num_beams, cur_len)
        scores = logits_processor(flat_seqs, raw_logprobs.clone())  # processors may write in place

        # Candidates: the best (or sampled) beams_to_keep continuations over all beams x vocab of each prompt.
        accumulated = (scores.view(batch_size, num_beams, vocab_size) + running_scores[:, :, None]).view(batch_size, -1)
        if options.do_sample:
            cand_flat = torch.multinomial(F.softmax(accumulated, dim=-1), beams_to_keep, generator=generator)
            cand_scores = torch.gather(accumulated, 1, cand_flat)
            cand_scores, order = cand_scores.sort(dim=-1, descending=True)
            cand_flat = cand_flat.gather(-1, order)
        else:
            cand_scores, cand_flat = torch.topk(accumulated, k=beams_to_keep)
        cand_beam = cand_flat // vocab_size
        cand_token = cand_flat % vocab_size
        cand_seqs = _gather_beams(running_seqs, cand_beam)
        cand_seqs[:, :, cur_len] = cand_token
        cand_logprobs = _gather_beams(running_logprobs, cand_beam)
        cand_logprobs[:, :, cur_len - prompt_len] = raw_logprobs.view(batch_size, -1).gather(1, cand_flat)

        cand_eos = stopping(cand_seqs[:, :, : cur_len + 1].reshape(-1, cur_len + 1)).view(batch_size, beams_to_keep)
        cand_stops = cand_eos | (cur_len + 1 >= max_length)

        # Next running beams: the best num_beams candidates that did not stop.
        alive_scores = cand_scores + cand_stops.to(torch.float32) * NEVER
        keep = torch.topk(alive_scores, k=num_beams)[1]
        running_seqs = _gather_beams(cand_seqs, keep)
        running_scores = _gather_beams(alive_scores, keep)
        running_logprobs = _gather_beams(cand_logprobs, keep)
        source_rows = _gather_beams(cand_beam, keep) + batch_offset

        # Finished set: merge candidates that just stopped (among the top num_beams) into it, keep the best
        # num_beams. The arithmetic follows Transformers' _update_finished_beams term by term so ties break alike.
        just_done = cand_stops & top_num_beam_mask[None, :]
        final_scores = cand_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
        batch_is_full = torch.all(is_done, dim=-1, keepdim=True) & (early_stopping is True)
        final_scores += batch_is_full.to(torch.float32) * NEVER
        final_scores += (~can_improve).to(torch.float32) * NEVER
        final_scores += (~just_done) * NEVER
        best = torch.topk(torch.cat((done_scores, final_scores), dim=1), k=num_beams)[1]
        done_seqs = _gather_beams(torch.cat((done_seqs, cand_seqs), dim=1), best)
        done_scores = _gather_beams(torch.cat((done_scores, final_scores), dim=1), best)
        done_logprobs = _gather_beams(torch.cat((done_logprobs, cand_logprobs), dim=1), best)
        cand_lengths = torch.full_like(cand_beam, cur_len + 1 - prompt_len)
        done_lengths = _gather_beams(torch.cat((done_lengths, cand_lengths), dim=1), best)
        done_by_eos = _gather_beams(torch.cat((done_by_eos, cand_eos), dim=1), best)
        is_done = _gather_beams(torch.cat((is_done, just_done), dim=1), best)

        # The cache follows the running beams (Transformers reorders it on every step, the last one included).
        model.reorder(source_rows.view(-1))
        cur_len += 1

        # Can a running beam still improve on the worst finished one? (Transformers' early-stop heuristic.)
        if early_stopping == "never" and length_penalty > 0.0:
            best_hypothetical_length = max_length - prompt_len
        else:
            best_hypothetical_length = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_hypothetical_length**length_penalty)
        worst_done = torch.where(is_done, torch.min(done_scores, dim=1, keepdim=True)[0], NEVER)
        can_improve = can_improve & torch.any(best_running > worst_done, dim=-1, keepdim=True)

        all_full = bool(torch.all(is_done)) and early_stopping is True
        if not bool(torch.any(can_improve)) or all_full or bool(torch.all(cand_stops)):
            break

        step_ids = running_seqs[:, :, cur_len - 1].reshape(-1, 1)
        mask = torch.cat((mask, mask.new_ones((mask.shape[0], 1))), dim=-1)
        position_ids = position_ids[:, -1:] + 1

    return [
        PromptOutput(
            sequences=[
                _sequence_output(done_seqs[b, r], done_lengths[b, r], done_logprobs[b, r], done_scores[b, r],
                                 done_by_eos[b, r], prompt_len)
                for r in range(options.num_return_sequences)
            ]
        )
        for b in range(batch_size)
    ]


def _sequence_output(seq, length, logprobs, score, by_eos, prompt_len: int) -> SequenceOutput:
    n = int(length)
    return SequenceOutput(
        output_ids=seq[prompt_len : prompt_len + n].tolist(),
        finish_reason="eos" if bool(by_eos) else "length",
        token_logprobs=logprobs[:n].tolist(),
        score=float(score),
    )
