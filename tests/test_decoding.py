"""distllama.decoding.generate vs Transformers' generate() on a tiny random Llama (HF's forward under both loops)."""

import math

import pytest
import torch
from hf_oracle import HFStepModel, tiny_llama
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StopStringCriteria

from distllama.decoding import StopCondition, generate, token_bytes_from_vocab
from distllama.options import load_generation_defaults, resolve_options

PROMPT_LEN = 7
PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, folder = tiny_llama(tmp_path_factory.mktemp("decoding"))
    return model, load_generation_defaults(folder)


@pytest.fixture(scope="module")
def prompts():
    """Three left-padded prompts: no padding, 2 and 4 pad positions."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(3, 128, (3, PROMPT_LEN), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, n_pad in enumerate([0, 2, 4]):
        attention_mask[row, :n_pad] = 0
        input_ids[row, :n_pad] = PAD
    return input_ids, attention_mask


def hf_run(model, input_ids, attention_mask, **kwargs):
    """HF generate -> (per row: generated ids up to its end, per row: raw logits of each generated step)."""
    out = model.generate(
        input_ids, attention_mask=attention_mask, return_dict_in_generate=True, output_logits=True, **kwargs
    )
    eos = kwargs.get("eos_token_id", model.generation_config.eos_token_id)
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    rows, logits = [], []
    for row in range(out.sequences.shape[0]):
        generated = out.sequences[row, input_ids.shape[1] :].tolist()
        end = next((i + 1 for i, t in enumerate(generated) if t in eos), len(generated))
        rows.append(generated[:end])
        logits.append([step[row] for step in out.logits[:end]])
    return rows, logits


def ours(model, defaults, input_ids, attention_mask, vocab=None, **kwargs):
    options = resolve_options(defaults, {}, {k: v for k, v in kwargs.items() if k not in ("drop_finished",)})
    step_model = HFStepModel(model)
    outputs = generate(step_model, input_ids, attention_mask, options, vocab=vocab,
                       drop_finished=kwargs.get("drop_finished", False))
    return [seq for prompt in outputs for seq in prompt.sequences], step_model


def emitted_eos_ids(model, input_ids, attention_mask):
    """Two token ids the model really emits mid-sequence (greedy, no eos), so that eos handling is exercised:
    tokens no row emits before step >= 2, so that rows end at different steps."""
    rows, _ = hf_run(model, input_ids, attention_mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                     pad_token_id=PAD)
    fresh = sorted(
        (step, token)
        for row in rows
        for step, token in enumerate(row)
        if step >= 2 and all(token not in other[:step] for other in rows)
    )
    first_step, first = fresh[0]
    later = [token for step, token in fresh if token != first and step > first_step] or [fresh[-1][1]]
    return [first, later[0]], rows


@pytest.fixture(scope="module")
def baseline(tiny, prompts):
    """(eos ids the model emits, greedy rows without eos)."""
    return emitted_eos_ids(tiny[0], *prompts)


def check_logprobs(sequences, hf_logits):
    for seq, steps in zip(sequences, hf_logits):
        expected = [torch.log_softmax(step, dim=-1)[t].item() for step, t in zip(steps, seq.output_ids)]
        assert seq.token_logprobs == pytest.approx(expected, abs=1e-5)


def greedy_cases(baseline, eos_ids):
    first_tokens = [row[0] for row in baseline]
    return {
        "plain": {},
        "repetition_penalty": dict(repetition_penalty=1.5),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "bad_words_ids": dict(bad_words_ids=[[baseline[0][0]], [baseline[1][1], baseline[1][2]]]),
        "suppress_tokens": dict(suppress_tokens=first_tokens),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[first_tokens[0], first_tokens[2]]),
        "forced_eos_token_id": dict(forced_eos_token_id=5),
        "several_eos_ids": dict(eos_token_id=eos_ids),
        "eos_default_pad": dict(eos_token_id=eos_ids, pad_token_id=None),
        "min_new_tokens": dict(eos_token_id=eos_ids, min_new_tokens=6),
        "min_length": dict(eos_token_id=eos_ids, min_length=PROMPT_LEN + 5),
        "exponential_decay": dict(eos_token_id=eos_ids, exponential_decay_length_penalty=(2, 3.0)),
        "max_length": dict(max_new_tokens=None, max_length=PROMPT_LEN + 5),
        "max_new_tokens_wins": dict(max_new_tokens=4, max_length=PROMPT_LEN + 9),
        "default_length": dict(max_new_tokens=None),  # HF: 20 new tokens
    }


CASE_NAMES = ["plain", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
              "begin_suppress_tokens", "forced_eos_token_id", "several_eos_ids", "eos_default_pad",
              "min_new_tokens", "min_length", "exponential_decay", "max_length", "max_new_tokens_wins",
              "default_length"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_greedy_matches_transformers(tiny, prompts, baseline, case):
    model, defaults = tiny
    eos_ids, rows = baseline
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    kwargs.update(greedy_cases(rows, eos_ids)[case])
    hf_kwargs = {k: v for k, v in kwargs.items() if v is not None or k in ("eos_token_id",)}

    expected, hf_logits = hf_run(model, *prompts, **hf_kwargs)
    sequences, _ = ours(model, defaults, *prompts, **kwargs)

    assert [s.output_ids for s in sequences] == expected
    check_logprobs(sequences, hf_logits)
    if case in ("several_eos_ids", "eos_default_pad", "exponential_decay"):
        assert any(s.finish_reason == "eos" for s in sequences)
    for seq in sequences:
        expected_reason = "eos" if seq.output_ids[-1] in set(kwargs.get("eos_token_id") or [2]) else "length"
        assert seq.finish_reason == expected_reason


def test_baseline_output_is_not_degenerate(tiny, prompts, baseline):
    """The greedy cases only test something if suppressing / banning tokens changes the output."""
    model, defaults = tiny
    cases = greedy_cases(baseline[1], [])
    plain, _ = ours(model, defaults, *prompts, max_new_tokens=12, pad_token_id=PAD)
    for case in ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                 "begin_suppress_tokens"):
        changed, _ = ours(model, defaults, *prompts, max_new_tokens=12, pad_token_id=PAD, **cases[case])
        assert [s.output_ids for s in changed] != [s.output_ids for s in plain], case


def test_forced_bos_on_one_token_prompts(tiny):
    model, defaults = tiny
    input_ids = torch.tensor([[7], [9]])
    attention_mask = torch.ones_like(input_ids)
    kwargs = dict(max_new_tokens=5, forced_bos_token_id=11, begin_suppress_tokens=[3, 4])
    expected, _ = hf_run(model, input_ids, attention_mask, **kwargs)
    sequences, _ = ours(model, defaults, input_ids, attention_mask, **kwargs)
    assert [s.output_ids for s in sequences] == expected
    assert all(s.output_ids[0] == 11 for s in sequences)


def test_drop_finished_gives_the_same_tokens(tiny, prompts, baseline):
    model, defaults = tiny
    eos_ids, _ = baseline
    kwargs = dict(max_new_tokens=12, eos_token_id=eos_ids, pad_token_id=PAD, repetition_penalty=1.2)
    kept, kept_model = ours(model, defaults, *prompts, **kwargs)
    dropped, dropped_model = ours(model, defaults, *prompts, drop_finished=True, **kwargs)
    assert [(s.output_ids, s.finish_reason) for s in dropped] == [(s.output_ids, s.finish_reason) for s in kept]
    for a, b in zip(dropped, kept):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)
    assert min(dropped_model.rows_seen) < 3 == max(kept_model.rows_seen)  # rows really left the batch


def test_on_step_streams_every_token(tiny, prompts, baseline):
    model, defaults = tiny
    eos_ids, _ = baseline
    options = resolve_options(defaults, {}, dict(max_new_tokens=10, eos_token_id=eos_ids, pad_token_id=PAD))
    streamed = [[] for _ in range(3)]
    done = [False] * 3

    def on_step(new_tokens, finished):
        for row in range(3):
            if not done[row]:
                streamed[row].append(int(new_tokens[row]))
            done[row] = bool(finished[row])

    outputs = generate(HFStepModel(model), *prompts, options, on_step=on_step, drop_finished=True)
    assert streamed == [p.sequences[0].output_ids for p in outputs]
    assert all(done)


SAMPLING = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95, max_new_tokens=10, pad_token_id=PAD)


def test_sampling_is_reproducible_with_a_seed(tiny, prompts):
    model, defaults = tiny
    first, _ = ours(model, defaults, *prompts, seed=7, **SAMPLING)
    again, _ = ours(model, defaults, *prompts, seed=7, **SAMPLING)
    other, _ = ours(model, defaults, *prompts, seed=8, **SAMPLING)
    assert [s.output_ids for s in first] == [s.output_ids for s in again]
    assert [s.output_ids for s in first] != [s.output_ids for s in other]


@pytest.mark.parametrize("drop_finished", [False, True])
def test_sampling_matches_transformers_with_the_same_seed(tiny, prompts, baseline, drop_finished):
    """Equal by construction: one CPU generator seeded like torch.manual_seed, the same multinomial calls, and
    sampling always draws for every row (dropped rows too), as HF does."""
    model, defaults = tiny
    eos_ids, _ = baseline
    kwargs = dict(SAMPLING, eos_token_id=eos_ids, num_return_sequences=2)
    torch.manual_seed(21)
    expected, hf_logits = hf_run(model, *prompts, **kwargs)
    sequences, _ = ours(model, defaults, *prompts, seed=21, drop_finished=drop_finished, **kwargs)
    assert [s.output_ids for s in sequences] == expected
    check_logprobs(sequences, hf_logits)
    assert any(s.finish_reason == "eos" for s in sequences)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic over bins with expected count >= 5; the rare bins are merged into one."""
    expected = probs * n
    common = expected >= 5
    observed_bins = counts[common].tolist() + [counts[~common].sum().item()]
    expected_bins = expected[common].tolist() + [expected[~common].sum().item()]
    if expected_bins[-1] < 5:  # too rare to be a bin of its own: fold into the last common bin
        observed_bins[-2] += observed_bins.pop()
        expected_bins[-2] += expected_bins.pop()
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed_bins, expected_bins))
    return statistic, len(expected_bins) - 1


def test_first_token_histogram_matches_processed_softmax(tiny):
    model, defaults = tiny
    input_ids = torch.tensor([[5, 17, 33, 2, 90, 64]])
    attention_mask = torch.ones_like(input_ids)
    n = 3000
    kwargs = dict(do_sample=True, temperature=1.5, top_k=40, top_p=0.9, max_new_tokens=1, eos_token_id=None)
    sequences, _ = ours(model, defaults, input_ids, attention_mask, seed=3, num_return_sequences=n, **kwargs)
    counts = torch.bincount(torch.tensor([s.output_ids[0] for s in sequences]), minlength=model.config.vocab_size)

    with torch.no_grad():
        logits = model(input_ids).logits[:, -1].float()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(1.5), TopKLogitsWarper(40), TopPLogitsWarper(0.9)])
    probs = torch.softmax(warpers(input_ids, logits.clone()), dim=-1)[0]
    statistic, dof = _chi_square(counts.double(), probs.double(), n)
    # generous: mean dof, sd sqrt(2 dof); a wrong distribution lands far beyond
    critical = dof + 6 * math.sqrt(2 * dof) + 10
    assert dof >= 5
    assert statistic < critical
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn

    # the test can fail: the same draws are far from the distribution without the temperature
    plain = torch.softmax(LogitsProcessorList([TopKLogitsWarper(40), TopPLogitsWarper(0.9)])(input_ids, logits), -1)[0]
    wrong_statistic, wrong_dof = _chi_square(counts.double(), plain.double() + 1e-12, n)
    assert wrong_statistic > wrong_dof + 6 * math.sqrt(2 * wrong_dof) + 10


# ---- stop strings -------------------------------------------------------------------------------------------------


def _byte_level_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog", "stop here, then go on; the end is near"] * 50
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def _sentencepiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xC3>", "<0xA9>", "▁", "a", "b", "c", "d", "e", "f", "s", "t",
              "o", "p", "▁s", "to", "op", "▁stop", "ab", "abc", "def"]
    merges = [("▁", "s"), ("t", "o"), ("o", "p"), ("▁s", "top"), ("a", "b"), ("ab", "c"), ("de", "f")]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.mark.parametrize("make_tokenizer", [lambda: _byte_level_tokenizer(300), _sentencepiece_tokenizer])
def test_vocab_cleaning_matches_transformers(make_tokenizer):
    tokenizer = make_tokenizer()
    mode = StopStringCriteria._get_stop_string_matching_mode(tokenizer)
    assert mode in ("byte_level", "byte_fallback")
    hf_tokens, hf_ids = StopStringCriteria.clean_tokenizer_vocab(tokenizer, stop_string_matching_mode=mode)
    ours_table = token_bytes_from_vocab(tokenizer.get_vocab())
    assert {i: ours_table[i] for i in hf_ids} == dict(zip(hf_ids, hf_tokens))


def test_stop_condition_matches_stop_string_criteria():
    """Every (row tail, stop string) case of HF's docstring family, on random token sequences of a real vocab."""
    tokenizer = _byte_level_tokenizer(300)
    vocab = tokenizer.get_vocab()
    stop_strings = ["stop", "e, t", "x", "the end"]
    hf = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
    ours_stop = StopCondition(None, stop_strings, vocab)
    text_ids = tokenizer("stop here, then go on; the end is near the box", add_special_tokens=False)["input_ids"]
    generator = torch.Generator().manual_seed(0)
    rows = [torch.tensor(text_ids[:end]) for end in range(1, len(text_ids) + 1)]
    rows += [torch.randint(0, len(vocab), (9,), generator=generator) for _ in range(200)]
    for row in rows:
        assert bool(ours_stop(row[None])[0]) == bool(hf(row[None], None)[0]), tokenizer.decode(row)
    assert sum(bool(hf(row[None], None)[0]) for row in rows) >= 5


def test_stop_strings_match_transformers(tmp_path, prompts):
    tokenizer = _byte_level_tokenizer(300)
    model, folder = tiny_llama(tmp_path, vocab_size=len(tokenizer))
    defaults = load_generation_defaults(folder)
    baseline, _ = hf_run(model, *prompts, max_new_tokens=12, pad_token_id=PAD, eos_token_id=None)
    # a stop string across a token boundary of what row 0 generates (two plain-text tokens from step 2 on)
    pieces = [tokenizer.decode([t]) for t in baseline[0]]
    step = next(i for i in range(2, len(pieces) - 1) if all(p.isascii() and p for p in pieces[i : i + 2]))
    stop = pieces[step][-2:] + pieces[step + 1][:1]
    kwargs = dict(max_new_tokens=12, pad_token_id=PAD, eos_token_id=[2], stop_strings=[stop])

    input_ids, attention_mask = prompts
    out = model.generate(input_ids, attention_mask=attention_mask, tokenizer=tokenizer, **kwargs)
    sequences, _ = ours(model, defaults, *prompts, vocab=tokenizer.get_vocab(), **kwargs)
    for row, seq in enumerate(sequences):
        n = len(seq.output_ids)
        generated = out[row, PROMPT_LEN:].tolist()
        assert seq.output_ids == generated[:n]
        assert all(t == PAD for t in generated[n:])  # HF kept going only with padding
    assert sequences[0].finish_reason == "eos" and len(sequences[0].output_ids) <= step + 2


def test_num_beams_dispatches_to_beam_search(tiny, prompts, baseline):
    model, defaults = tiny
    eos_ids, _ = baseline
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, pad_token_id=PAD, eos_token_id=eos_ids)
    out = model.generate(*prompts[:1], attention_mask=prompts[1], return_dict_in_generate=True, output_scores=True,
                         **kwargs)
    sequences, _ = ours(model, defaults, *prompts, **kwargs)
    for row, seq in enumerate(sequences):
        generated = out.sequences[row, PROMPT_LEN:].tolist()
        assert seq.output_ids == generated[: len(seq.output_ids)]
        # HF fills the rest of a finished beam with the first eos id (5.24), with pad in other versions
        assert all(t in (PAD, eos_ids[0]) for t in generated[len(seq.output_ids) :])
        assert seq.score == pytest.approx(out.sequences_scores[row].item(), abs=1e-5)
