"""distllama.beam.beam_search against Transformers' generate(num_beams > 1) on a tiny random Llama.

The model side is Transformers' own forward (tests/hf_oracle.HFStepModel), so a difference here is a difference in
the beam bookkeeping: candidate selection, eos handling, length penalty, early stopping, cache reordering, the order
of the returned sequences and their scores.
"""

import itertools
from collections import Counter

import pytest
import torch

from distllama.beam import beam_search
from distllama.options import GenerationOptions
from distllama.processors import build_logits_processor
from hf_oracle import HFStepModel, tiny_llama

MAX_NEW_TOKENS = 10
PROMPT_LENGTHS = (6, 3, 8)  # left-padded to 8


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    model, _ = tiny_llama(tmp_path_factory.mktemp("beam"))
    return model


@pytest.fixture(scope="module")
def prompts():
    """A left-padded batch of prompts of different lengths: (input_ids [B, T], attention_mask [B, T])."""
    gen = torch.Generator().manual_seed(1234)
    width = max(PROMPT_LENGTHS)
    input_ids = torch.zeros((len(PROMPT_LENGTHS), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        input_ids[row, width - length :] = torch.randint(3, 128, (length,), generator=gen)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def emitted_tokens(hf_model, prompts):
    """The two tokens HF's beam search emits most often without an eos: used as eos ids the model really emits."""
    input_ids, attention_mask = prompts
    out = hf_model.generate(
        input_ids, attention_mask=attention_mask, num_beams=4, num_return_sequences=4,
        max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None, pad_token_id=0,
    )
    counts = Counter(out[:, input_ids.shape[1] :].flatten().tolist())
    return [token for token, _ in counts.most_common(2)]


def hf_beam_generate(hf_model, input_ids, attention_mask, **config):
    return hf_model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS,
        return_dict_in_generate=True, output_scores=True, output_logits=True, **config,
    )


def our_beam_search(hf_model, input_ids, attention_mask, generator=None, **config):
    options = GenerationOptions(max_new_tokens=MAX_NEW_TOKENS, **config)
    rows_mask = attention_mask.repeat_interleave(options.num_beams, dim=0)
    processor = build_logits_processor(options, input_ids.shape[1], rows_mask)
    eos_ids = torch.tensor(options.eos_token_id or [], dtype=torch.long)

    def stopping(sequences):
        return torch.isin(sequences[:, -1], eos_ids)

    model = HFStepModel(hf_model)
    return beam_search(model, input_ids, attention_mask, options, processor, stopping, generator=generator)


def assert_same_as_hf(ours, hf_out, input_ids, num_return_sequences, eos_ids, pad_token_id):
    """Ours (per prompt, best first) == HF's flat [B * num_return_sequences] sequences and sequences_scores."""
    prompt_len = input_ids.shape[1]
    # what HF writes after a finished sequence (its own expression, operator precedence included)
    fill = pad_token_id or eos_ids[0] if eos_ids is not None else -1
    assert len(ours) == input_ids.shape[0]
    for b, prompt_output in enumerate(ours):
        assert len(prompt_output.sequences) == num_return_sequences
        for r, seq in enumerate(prompt_output.sequences):
            row = b * num_return_sequences + r
            hf_generated = hf_out.sequences[row, prompt_len:].tolist()
            n = len(seq.output_ids)
            assert seq.output_ids == hf_generated[:n], f"prompt {b} sequence {r}"
            assert all(token == fill for token in hf_generated[n:]), f"prompt {b} sequence {r}: HF is longer"
            assert seq.score == pytest.approx(hf_out.sequences_scores[row].item(), abs=1e-4)
            ended_by_eos = eos_ids is not None and n > 0 and seq.output_ids[-1] in eos_ids
            assert seq.finish_reason == ("eos" if ended_by_eos else "length")
            if not ended_by_eos:
                assert n == MAX_NEW_TOKENS
            assert len(seq.token_logprobs) == n


def _beam_cases():
    """num_beams x early_stopping x eos kind, with length penalty, num_return_sequences and processors rotating."""
    length_penalties = (0.5, 1.0, 2.0)
    processor_options = ({}, {"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2})
    grid = itertools.product((2, 3, 4), (True, False, "never"), ("none", "one", "two"))
    for i, (num_beams, early_stopping, eos_kind) in enumerate(grid):
        config = dict(
            num_beams=num_beams,
            early_stopping=early_stopping,
            length_penalty=length_penalties[i % 3],
            num_return_sequences=num_beams if i % 2 else 1,
            **processor_options[(i // 3) % 3],
        )
        yield pytest.param(eos_kind, config, id=f"{eos_kind}-eos-" + "-".join(f"{k}={v}" for k, v in config.items()))


@pytest.mark.parametrize("eos_kind, config", list(_beam_cases()))
def test_beam_search_matches_transformers(hf_model, prompts, emitted_tokens, eos_kind, config):
    input_ids, attention_mask = prompts
    eos_ids = {"none": None, "one": emitted_tokens[:1], "two": emitted_tokens}[eos_kind]
    pad_token_id = 0
    hf_out = hf_beam_generate(hf_model, input_ids, attention_mask, eos_token_id=eos_ids, pad_token_id=pad_token_id,
                              **config)
    ours = our_beam_search(hf_model, input_ids, attention_mask, eos_token_id=eos_ids, pad_token_id=pad_token_id,
                           **config)
    assert_same_as_hf(ours, hf_out, input_ids, config["num_return_sequences"], eos_ids, pad_token_id)


@pytest.mark.parametrize("early_stopping, length_penalty", [(False, 1.0), ("never", 2.0), (True, 0.5)])
def test_most_likely_tokens_as_eos(hf_model, prompts, early_stopping, length_penalty):
    """eos ids = the three likeliest first tokens of every prompt: most top candidates end at once, so beam search
    must keep (eos count + 1) * num_beams candidates to still have num_beams beams to continue."""
    input_ids, attention_mask = prompts
    with torch.no_grad():
        first_logits = hf_model(input_ids, attention_mask=attention_mask).logits[:, -1]
    eos_ids = sorted(set(first_logits.topk(3, dim=-1).indices.flatten().tolist()))
    config = dict(num_beams=2, num_return_sequences=2, early_stopping=early_stopping, length_penalty=length_penalty,
                  eos_token_id=eos_ids, pad_token_id=0)
    hf_out = hf_beam_generate(hf_model, input_ids, attention_mask, **config)
    ours = our_beam_search(hf_model, input_ids, attention_mask, **config)
    assert_same_as_hf(ours, hf_out, input_ids, 2, eos_ids, 0)


def test_eos_cases_really_end_early(hf_model, prompts, emitted_tokens):
    """Guard for the test above: with the chosen eos, some returned beams do stop on it before max length."""
    input_ids, attention_mask = prompts
    ours = our_beam_search(hf_model, input_ids, attention_mask, num_beams=4, num_return_sequences=4,
                           eos_token_id=emitted_tokens[:1], pad_token_id=0)
    reasons = [seq.finish_reason for prompt_output in ours for seq in prompt_output.sequences]
    assert "eos" in reasons


def test_token_logprobs_follow_the_beam_history(hf_model, prompts, emitted_tokens):
    """token_logprobs = log_softmax of HF's raw logits at each token, on the row (beam) that produced it."""
    input_ids, attention_mask = prompts
    config = dict(num_beams=3, num_return_sequences=3, length_penalty=1.0, repetition_penalty=1.3,
                  eos_token_id=emitted_tokens[:1], pad_token_id=0)
    hf_out = hf_beam_generate(hf_model, input_ids, attention_mask, **config)
    ours = our_beam_search(hf_model, input_ids, attention_mask, **config)
    prompt_len = input_ids.shape[1]
    for b, prompt_output in enumerate(ours):
        for r, seq in enumerate(prompt_output.sequences):
            row = b * 3 + r
            expected = []
            for step, token in enumerate(seq.output_ids):
                beam_row = hf_out.beam_indices[row, step]
                assert token == hf_out.sequences[row, prompt_len + step]
                expected.append(torch.log_softmax(hf_out.logits[step][beam_row], dim=-1)[token].item())
            assert seq.token_logprobs == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 7])
def test_beam_sampling_matches_transformers(hf_model, prompts, emitted_tokens, seed):
    """do_sample with beams: HF draws from the global RNG, we from a Generator with the same seed (same stream)."""
    input_ids, attention_mask = prompts
    config = dict(num_beams=3, num_return_sequences=2, do_sample=True, temperature=0.8, top_k=20,
                  eos_token_id=emitted_tokens[:1], pad_token_id=0)
    torch.manual_seed(seed)
    hf_out = hf_beam_generate(hf_model, input_ids, attention_mask, **config)
    ours = our_beam_search(hf_model, input_ids, attention_mask, generator=torch.Generator().manual_seed(seed),
                           **config)
    assert_same_as_hf(ours, hf_out, input_ids, 2, emitted_tokens[:1], 0)


def test_cache_is_reordered_every_step(hf_model, prompts):
    """Beam search drives the model through StepModel only: one prefill of B * num_beams rows, then one token each."""
    input_ids, attention_mask = prompts
    calls = []

    class RecordingModel(HFStepModel):
        def reorder(self, index):
            calls.append(index.clone())
            super().reorder(index)

    options = GenerationOptions(num_beams=2, max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    model = RecordingModel(hf_model)
    beam_search(model, input_ids, attention_mask, options, lambda ids, scores: scores,
                lambda seqs: torch.zeros(seqs.shape[0], dtype=torch.bool))
    assert model.rows_seen == [6, 6, 6, 6]
    assert len(calls) == 4 and all(index.shape == (6,) for index in calls)
    # rows of prompt b only ever come from prompt b's beams
    for index in calls:
        assert torch.equal(index // 2, torch.arange(6) // 2)


def test_group_beam_search_is_refused(hf_model, prompts):
    input_ids, attention_mask = prompts
    options = GenerationOptions(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="num_beam_groups"):
        beam_search(HFStepModel(hf_model), input_ids, attention_mask, options, lambda ids, scores: scores,
                    lambda seqs: torch.zeros(seqs.shape[0], dtype=torch.bool))


def test_more_return_sequences_than_beams_is_refused(hf_model, prompts):
    input_ids, attention_mask = prompts
    options = GenerationOptions(num_beams=2, num_return_sequences=3, max_new_tokens=4)
    with pytest.raises(ValueError, match="num_return_sequences"):
        beam_search(HFStepModel(hf_model), input_ids, attention_mask, options, lambda ids, scores: scores,
                    lambda seqs: torch.zeros(seqs.shape[0], dtype=torch.bool))
