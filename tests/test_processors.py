"""distllama.processors against Transformers' logits processors (the oracle), one processor at a time and as the
whole list generate() builds for a GenerationConfig."""

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation import logits_process as hf

from distllama import processors as dp
from distllama.options import GenerationOptions

VOCAB = 97
ROWS = 6


def random_scores(seed: int, rows: int = ROWS, vocab: int = VOCAB, ties: bool = False) -> torch.Tensor:
    """Seeded float32 logits with some -inf entries (never a whole row); `ties` rounds them so values repeat."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, vocab, generator=gen) * 3
    if ties:
        scores = (scores * 2).round() / 2
    banned = torch.rand(rows, vocab, generator=gen) < 0.1
    banned[:, 0] = False
    return scores.masked_fill(banned, -float("inf"))


def random_ids(seed: int, length: int, rows: int = ROWS, alphabet: int = VOCAB) -> torch.Tensor:
    """Seeded token ids; a small alphabet makes repeated n-grams and bad-word prefixes likely."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, alphabet, (rows, length), generator=gen)


def assert_same(ours, theirs, input_ids, scores):
    """Same output as Transformers (bitwise, -inf where it has -inf), and the caller's scores left untouched."""
    before = scores.clone()
    expected = theirs(input_ids.clone(), scores.clone())
    got = ours(input_ids, scores)
    assert torch.equal(scores, before), "processor wrote into the caller's scores"
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(expected))
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------------------------------------------------------
# warpers


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5, 2.0])
def test_temperature(temperature):
    ids, scores = random_ids(0, 5), random_scores(1)
    assert_same(dp.Temperature(temperature), hf.TemperatureLogitsWarper(temperature), ids, scores)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("min_keep", [1, 3])
@pytest.mark.parametrize("top_k", [1, 2, 10, 50, 500])
def test_top_k(top_k, min_keep, ties):
    ids, scores = random_ids(0, 5), random_scores(top_k, ties=ties)
    assert_same(dp.TopK(top_k, min_keep), hf.TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep), ids, scores)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("min_keep", [1, 3])
@pytest.mark.parametrize("top_p", [0.0, 0.3, 0.8, 0.95, 0.999])
def test_top_p(top_p, min_keep, ties):
    ids, scores = random_ids(0, 5), random_scores(int(top_p * 100), ties=ties)
    assert_same(dp.TopP(top_p, min_keep), hf.TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep), ids, scores)


@pytest.mark.parametrize("top_p", [0.25, 0.5, 0.75])
def test_top_p_at_exact_cumulative_boundaries(top_p):
    # uniform rows of 4 or 8 tokens: cumulative probabilities are exact multiples of 1/8, so some equal 1 - top_p
    scores = torch.zeros(2, 8)
    scores[0, 4:] = -float("inf")
    assert_same(dp.TopP(top_p), hf.TopPLogitsWarper(top_p), random_ids(0, 3, rows=2), scores)


@pytest.mark.parametrize("min_keep", [1, 3])
@pytest.mark.parametrize("min_p", [0.0, 0.02, 0.1, 0.5, 1.0])
def test_min_p(min_p, min_keep):
    ids, scores = random_ids(0, 5), random_scores(7)
    assert_same(dp.MinP(min_p, min_keep), hf.MinPLogitsWarper(min_p, min_tokens_to_keep=min_keep), ids, scores)


@pytest.mark.parametrize("min_keep", [1, 3])
@pytest.mark.parametrize("mass", [0.1, 0.5, 0.9, 0.99])
def test_typical_p(mass, min_keep):
    ids, scores = random_ids(0, 5), random_scores(8)
    assert_same(dp.Typical(mass, min_keep), hf.TypicalLogitsWarper(mass, min_tokens_to_keep=min_keep), ids, scores)


@pytest.mark.parametrize("min_keep", [1, 3])
@pytest.mark.parametrize("epsilon", [1e-4, 3e-3, 0.02, 0.3])
def test_epsilon_cutoff(epsilon, min_keep):
    ids, scores = random_ids(0, 5), random_scores(9)
    ours = dp.EpsilonCutoff(epsilon, min_keep)
    assert_same(ours, hf.EpsilonLogitsWarper(epsilon, min_tokens_to_keep=min_keep), ids, scores)


@pytest.mark.parametrize("min_keep", [1, 3])
@pytest.mark.parametrize("epsilon", [1e-4, 3e-3, 0.02, 0.3])
def test_eta_cutoff(epsilon, min_keep):
    ids, scores = random_ids(0, 5), random_scores(10)
    assert_same(dp.EtaCutoff(epsilon, min_keep), hf.EtaLogitsWarper(epsilon, min_tokens_to_keep=min_keep), ids, scores)


# ---------------------------------------------------------------------------------------------------------------------
# processors


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("penalty", [0.5, 1.2, 2.0])
def test_repetition_penalty(penalty, with_padding):
    ids, scores = random_ids(11, 12, alphabet=30), random_scores(12)
    ids[0, 3] = VOCAB + 4  # an id past the lm_head is ignored, not an error
    padding = torch.tensor([0, 3, 5, 0, 12, 1]) if with_padding else None
    ours = dp.RepetitionPenalty(penalty, prompt_padding=padding)
    theirs = hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=padding)
    assert_same(ours, theirs, ids, scores)


@pytest.mark.parametrize("length", [1, 3, 8, 20])
@pytest.mark.parametrize("ngram_size", [1, 2, 3, 4])
def test_no_repeat_ngram(ngram_size, length):
    ids, scores = random_ids(length, length, alphabet=4), random_scores(13)
    assert_same(dp.NoRepeatNGram(ngram_size), hf.NoRepeatNGramLogitsProcessor(ngram_size), ids, scores)


@pytest.mark.parametrize(
    "bad_words, eos",
    [
        ([[3]], None),
        ([[3], [5, 7]], [2]),
        ([[1, 2], [4, 1, 2], [9], [2, 2, 2, 3]], [8]),
        ([[2], [4, 5], [0, 1, 3]], [2, 6]),  # the single-eos word is not banned
        ([[6]], [6]),  # nothing left to ban
    ],
)
def test_bad_words(bad_words, eos):
    ids, scores = random_ids(14, 10, alphabet=6), random_scores(15)
    ids[0, -3:] = torch.tensor([4, 1, 2])  # row 0 ends with every multi-token prefix of the third case
    ids[1, -1] = 4
    ids[2, -2:] = torch.tensor([0, 1])
    ours = dp.BadWords(bad_words, eos)
    theirs = hf.NoBadWordsLogitsProcessor(bad_words, eos_token_id=eos)
    assert_same(ours, theirs, ids, scores)
    assert_same(ours, theirs, ids[:, :2], scores)  # a row shorter than some words


def test_bad_words_rejects_bad_input():
    with pytest.raises(ValueError):
        dp.BadWords([])
    with pytest.raises(ValueError):
        dp.BadWords([[1, -1]])
    with pytest.raises(ValueError):
        dp.BadWords([[VOCAB + 1]])(random_ids(0, 3), random_scores(0))


@pytest.mark.parametrize("eos", [2, [2, 7, 50]])
@pytest.mark.parametrize("length", [3, 9, 10, 14])
def test_min_length(length, eos):
    ids, scores = random_ids(16, length), random_scores(17)
    assert_same(dp.MinLength(10, eos), hf.MinLengthLogitsProcessor(10, eos), ids, scores)


@pytest.mark.parametrize("eos", [2, [2, 7, 50]])
@pytest.mark.parametrize("length", [5, 7, 8, 12])
def test_min_new_tokens(length, eos):
    ids, scores = random_ids(18, length), random_scores(19)
    ours, theirs = dp.MinNewTokens(5, 3, eos), hf.MinNewTokensLengthLogitsProcessor(5, 3, eos)
    assert_same(ours, theirs, ids, scores)


@pytest.mark.parametrize("length", [1, 2])
def test_forced_bos(length):
    ids, scores = random_ids(20, length), random_scores(21)
    assert_same(dp.ForcedBOS(5), hf.ForcedBOSTokenLogitsProcessor(5), ids, scores)


@pytest.mark.parametrize("eos", [2, [2, 7]])
@pytest.mark.parametrize("length", [8, 9, 10])
def test_forced_eos(length, eos):
    ids, scores = random_ids(22, length), random_scores(23)
    assert_same(dp.ForcedEOS(10, eos), hf.ForcedEOSTokenLogitsProcessor(10, eos), ids, scores)


@pytest.mark.parametrize("eos", [[2], [2, 7, 0]])  # token 0 is never -inf in random_scores; 7 sometimes is
@pytest.mark.parametrize("start, factor", [(0, 1.5), (2, 1.01), (4, 3.0)])
@pytest.mark.parametrize("length", [5, 8, 12])
def test_exponential_decay_length_penalty(length, start, factor, eos):
    ids, scores = random_ids(24, length), random_scores(25)
    scores[1, 7] = -float("inf")
    ours = dp.ExponentialDecayLengthPenalty(start, factor, eos, prompt_length=5)
    theirs = hf.ExponentialDecayLengthPenalty((start, factor), eos, input_ids_seq_length=5)
    assert_same(ours, theirs, ids, scores)


def test_suppress_tokens():
    ids, scores = random_ids(26, 4), random_scores(27)
    assert_same(dp.SuppressTokens([1, 5, 96]), hf.SuppressTokensLogitsProcessor([1, 5, 96]), ids, scores)


@pytest.mark.parametrize("length", [3, 4, 5])
def test_suppress_tokens_at_begin(length):
    ids, scores = random_ids(28, length), random_scores(29)
    ours, theirs = dp.SuppressTokensAtBegin([0, 2, 9], 4), hf.SuppressTokensAtBeginLogitsProcessor([0, 2, 9], 4)
    assert_same(ours, theirs, ids, scores)


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: dp.Temperature(0.0), lambda: hf.TemperatureLogitsWarper(0.0)),
        (lambda: dp.TopK(-1), lambda: hf.TopKLogitsWarper(-1)),
        (lambda: dp.TopP(1.5), lambda: hf.TopPLogitsWarper(1.5)),
        (lambda: dp.MinP(-0.1), lambda: hf.MinPLogitsWarper(-0.1)),
        (lambda: dp.Typical(0.0), lambda: hf.TypicalLogitsWarper(0.0)),
        (lambda: dp.EtaCutoff(1.0), lambda: hf.EtaLogitsWarper(1.0)),
        (lambda: dp.RepetitionPenalty(0.0), lambda: hf.RepetitionPenaltyLogitsProcessor(0.0)),
        (lambda: dp.NoRepeatNGram(0), lambda: hf.NoRepeatNGramLogitsProcessor(0)),
        (lambda: dp.MinLength(-1, 2), lambda: hf.MinLengthLogitsProcessor(-1, 2)),
        (lambda: dp.ForcedEOS(5, [-1]), lambda: hf.ForcedEOSTokenLogitsProcessor(5, [-1])),
    ],
)
def test_invalid_parameters_raise_like_transformers(ours, theirs):
    with pytest.raises(ValueError):
        theirs()
    with pytest.raises(ValueError):
        ours()


# ---------------------------------------------------------------------------------------------------------------------
# the whole list, against what generate() builds for the same GenerationConfig

# our class -> the Transformers class it re-implements
HF_NAME = {
    dp.RepetitionPenalty: "RepetitionPenaltyLogitsProcessor",
    dp.NoRepeatNGram: "NoRepeatNGramLogitsProcessor",
    dp.BadWords: "NoBadWordsLogitsProcessor",
    dp.MinLength: "MinLengthLogitsProcessor",
    dp.MinNewTokens: "MinNewTokensLengthLogitsProcessor",
    dp.ForcedBOS: "ForcedBOSTokenLogitsProcessor",
    dp.ForcedEOS: "ForcedEOSTokenLogitsProcessor",
    dp.ExponentialDecayLengthPenalty: "ExponentialDecayLengthPenalty",
    dp.SuppressTokens: "SuppressTokensLogitsProcessor",
    dp.SuppressTokensAtBegin: "SuppressTokensAtBeginLogitsProcessor",
    dp.Temperature: "TemperatureLogitsWarper",
    dp.TopK: "TopKLogitsWarper",
    dp.TopP: "TopPLogitsWarper",
    dp.MinP: "MinPLogitsWarper",
    dp.Typical: "TypicalLogitsWarper",
    dp.EpsilonCutoff: "EpsilonLogitsWarper",
    dp.EtaCutoff: "EtaLogitsWarper",
}


@pytest.fixture(scope="module")
def hf_model():
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def hf_logits_processor(model, input_ids, attention_mask, **generate_kwargs):
    """The LogitsProcessorList generate(input_ids, attention_mask, **generate_kwargs) builds, the rows it decodes
    (prompts expanded to num_beams / num_return_sequences) and its max_length, following GenerationMixin.generate."""
    has_default_max_length = "max_length" not in generate_kwargs and model.generation_config.max_length is None
    has_default_min_length = "min_length" not in generate_kwargs and model.generation_config.min_length is None
    generation_config, _ = model._prepare_generation_config(None, **generate_kwargs)
    model._prepare_special_tokens(generation_config, True, device="cpu", batch_size=input_ids.shape[0])
    expand = max(generation_config.num_beams, generation_config.num_return_sequences)
    rows_ids, rows_mask = input_ids.repeat_interleave(expand, 0), attention_mask.repeat_interleave(expand, 0)
    generation_config = model._prepare_generated_length(
        generation_config, has_default_max_length, has_default_min_length, "input_ids", input_ids.shape[1], input_ids
    )
    processors = model._get_logits_processor(
        generation_config,
        input_ids_seq_length=input_ids.shape[1],
        encoder_input_ids=input_ids,
        device="cpu",
        # generate() drops a mask without padding before building the processors
        model_kwargs={"attention_mask": None if bool((rows_mask == 1).all()) else rows_mask},
    )
    return processors, rows_ids, rows_mask, generation_config.max_length


def left_padded_prompts(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = random_ids(seed, width, rows=len(lengths), alphabet=12)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : width - length] = 0  # pad id 0 is a real token in the alphabet: only the mask says it is padding
        mask[row, width - length :] = 1
    return ids, mask


GENERATE_KWARGS = {
    "greedy, defaults": dict(max_new_tokens=8),
    "greedy, sampling knobs ignored": dict(max_new_tokens=8, temperature=0.5, top_k=3, top_p=0.5, min_p=0.1),
    "greedy with penalties": dict(
        max_new_tokens=8, repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[5], [7, 9], [3, 4, 8]],
        min_new_tokens=3, suppress_tokens=[11, 40], begin_suppress_tokens=[6], forced_eos_token_id=[2, 3],
        exponential_decay_length_penalty=(2, 1.4), eos_token_id=[2, 3],
    ),
    "greedy, min_length counts the prompt": dict(max_length=16, min_length=12, repetition_penalty=0.7),
    "greedy, default max_length (20 new tokens) for forced eos": dict(forced_eos_token_id=3, min_new_tokens=0),
    "greedy, max_length for forced eos": dict(max_length=12, forced_eos_token_id=[3, 4], no_repeat_ngram_size=3),
    "sampling, defaults (top_k 50)": dict(do_sample=True, max_new_tokens=8),
    "sampling, neutral values add nothing": dict(do_sample=True, max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0),
    "sampling with temperature, top_k, top_p, min_p": dict(
        do_sample=True, max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, num_return_sequences=2,
    ),
    "sampling with typical_p, epsilon, eta": dict(
        do_sample=True, max_new_tokens=8, temperature=1.3, top_k=0, typical_p=0.9, epsilon_cutoff=3e-3,
        eta_cutoff=1e-3, repetition_penalty=1.1,
    ),
    "beam search": dict(num_beams=3, max_new_tokens=8, repetition_penalty=1.5, min_new_tokens=2, length_penalty=0.8),
    "beam sampling keeps len(eos) + 1": dict(
        num_beams=3, do_sample=True, max_new_tokens=8, top_k=1, top_p=0.05, min_p=0.9, eos_token_id=[2, 3, 4],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", GENERATE_KWARGS)
def test_build_logits_processor_matches_generate(hf_model, name):
    kwargs = {"eos_token_id": [2], **GENERATE_KWARGS[name]}
    prompt_ids, prompt_mask = left_padded_prompts([5, 3], seed=30)
    theirs, rows_ids, rows_mask, max_length = hf_logits_processor(hf_model, prompt_ids, prompt_mask, **kwargs)
    ours = dp.build_logits_processor(GenerationOptions(**kwargs), prompt_ids.shape[1], attention_mask=rows_mask)

    assert [HF_NAME[type(p)] for p in ours] == [type(p).__name__ for p in theirs]
    # every decoding step up to max_length: thresholds (min length, forced eos, decay start) are crossed on the way
    input_ids = rows_ids
    for step in range(max_length - prompt_ids.shape[1]):
        scores = random_scores(100 + step, rows=input_ids.shape[0], ties=step % 2 == 1)
        assert_same(ours, theirs, input_ids, scores)
        input_ids = torch.cat([input_ids, random_ids(200 + step, 1, rows=input_ids.shape[0], alphabet=12)], dim=1)


def test_begin_suppress_after_forced_bos_on_one_token_prompt(hf_model):
    kwargs = dict(max_new_tokens=4, eos_token_id=[2], forced_bos_token_id=1, begin_suppress_tokens=[3, 5])
    prompt_ids, prompt_mask = torch.tensor([[7], [8]]), torch.ones(2, 1, dtype=torch.long)
    theirs, rows_ids, _, _ = hf_logits_processor(hf_model, prompt_ids, prompt_mask, **kwargs)
    ours = dp.build_logits_processor(GenerationOptions(**kwargs), 1)
    assert [HF_NAME[type(p)] for p in ours] == [type(p).__name__ for p in theirs]
    input_ids = rows_ids
    for step in range(3):
        assert_same(ours, theirs, input_ids, random_scores(300 + step, rows=2))
        input_ids = torch.cat([input_ids, torch.tensor([[1], [1]])], dim=1)


def test_group_beam_search_is_refused():
    with pytest.raises(ValueError, match="num_beam_groups"):
        dp.build_logits_processor(GenerationOptions(num_beams=4, num_beam_groups=2, diversity_penalty=0.5), 5)


# ---------------------------------------------------------------------------------------------------------------------
# rows of different lengths (continuous batching): each row exactly as Transformers processes that prompt alone

ROW_PROMPTS = [[5, 3, 9, 9, 1], [7], [2, 8, 8, 3, 5, 5, 6, 1, 4], [4, 4, 9]]


@pytest.mark.parametrize("name", [n for n in GENERATE_KWARGS if "beam" not in n])
def test_rows_of_different_lengths_match_each_prompt_alone(hf_model, name):
    kwargs = {"eos_token_id": [2], **GENERATE_KWARGS[name]}
    options = GenerationOptions(**kwargs)
    # the engine's chain: processors in rows mode, then the warpers when sampling
    ours = dp.build_logits_processor(replace(options, do_sample=False, max_length=None, max_new_tokens=2), 1)
    if options.do_sample:
        ours.extend(dp.build_warpers(options))
    theirs = []
    for prompt in ROW_PROMPTS:
        prompt_ids = torch.tensor([prompt])
        processors, _, _, max_length = hf_logits_processor(hf_model, prompt_ids, torch.ones_like(prompt_ids), **kwargs)
        min_length = options.min_length if options.min_new_tokens is None else options.min_new_tokens + len(prompt)
        theirs.append((processors, max_length, min_length))
    # every row continues with tokens of its own; rows are right-aligned, padded with the vocabulary size
    rows = [list(p) for p in ROW_PROMPTS]
    for step in range(10):
        width = max(map(len, rows))
        ids = torch.tensor([[VOCAB] * (width - len(r)) + r for r in rows])
        scores = random_scores(400 + step, rows=len(rows), ties=step % 2 == 1)

        def column(values):
            return torch.tensor(values)[:, None]

        state = dp.Rows(lengths=column([len(r) for r in rows]), prompt_lengths=column(list(map(len, ROW_PROMPTS))),
                        max_lengths=column([t[1] for t in theirs]), min_lengths=column([t[2] for t in theirs]))
        got = ours(ids, scores.clone(), state)
        for i, (processors, max_length, _) in enumerate(theirs):
            if len(rows[i]) >= max_length:
                continue
            expected = processors(torch.tensor([rows[i]]), scores[i:i + 1].clone())
            assert torch.equal(got[i:i + 1], expected), (name, step, i)
        new = random_ids(500 + step, 1, rows=len(rows), alphabet=12)[:, 0].tolist()
        rows = [r + [t] for r, t in zip(rows, new)]


def test_per_row_knobs_match_each_prompt_alone(hf_model):
    """Rows that bring their own temperature, top_p, top_k, min_p and repetition penalty (OpenAI batch lines): each
    row processed exactly as Transformers processes that prompt with those values."""
    knobs = [dict(temperature=0.7, top_p=0.9, top_k=5, min_p=0.05, repetition_penalty=1.3),
             dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0),
             dict(temperature=1.6, top_p=0.5, top_k=40, min_p=0.2, repetition_penalty=0.8),
             dict(temperature=0.3, top_p=0.95, top_k=1, min_p=0.0, repetition_penalty=1.1)]
    run = GenerationOptions(do_sample=True, max_new_tokens=8, eos_token_id=[2])
    per_row = frozenset({"temperature", "top_p", "top_k", "min_p", "repetition_penalty"})
    # what TokenSampler builds: the processors with a repetition penalty first, then every per-row warper
    ours = dp.build_logits_processor(replace(run, do_sample=False), 1)
    ours.insert(0, dp.RepetitionPenalty(1.0))
    ours.extend(dp.build_warpers(run, per_row))
    width = max(map(len, ROW_PROMPTS))
    ids = torch.tensor([[VOCAB] * (width - len(p)) + p for p in ROW_PROMPTS])
    scores = random_scores(600, rows=len(ROW_PROMPTS))

    def column(values, dtype=torch.long):
        return torch.tensor(values, dtype=dtype)[:, None]

    lengths = column(list(map(len, ROW_PROMPTS)))
    state = dp.Rows(lengths=lengths, prompt_lengths=lengths, max_lengths=lengths + 8, min_lengths=lengths * 0,
                    temperatures=column([k["temperature"] for k in knobs], torch.float32),
                    top_p=column([1 - k["top_p"] for k in knobs], torch.float32),
                    top_k=column([k["top_k"] for k in knobs]), min_p=column([k["min_p"] for k in knobs], torch.float32),
                    repetition_penalty=column([k["repetition_penalty"] for k in knobs], torch.float32))
    got = ours(ids, scores.clone(), state)
    for i, (prompt, k) in enumerate(zip(ROW_PROMPTS, knobs)):
        prompt_ids = torch.tensor([prompt])
        processors, _, _, _ = hf_logits_processor(hf_model, prompt_ids, torch.ones_like(prompt_ids), do_sample=True,
                                                  max_new_tokens=8, eos_token_id=[2], **k)
        expected = processors(prompt_ids, scores[i:i + 1].clone())
        assert torch.equal(got[i:i + 1], expected), i


def test_first_max_picks_the_id_torch_argmax_picks():
    """Greedy steps take max(dim)'s index (faster than argmax on a CPU): on ties, NaN, infinities, rows of -inf
    (a shard of padding) and strided rows it must be the id torch.argmax returns, and its value the row's max."""
    from distllama.sampling import first_max
    generator = torch.Generator().manual_seed(0)
    for case in range(300):
        rows, vocab = int(torch.randint(1, 40, (1,), generator=generator)), int(torch.randint(1, 70000, (1,),
                                                                                        generator=generator))
        scores = torch.randint(-3, 4, (rows, vocab), generator=generator).float()  # many ties
        kind = case % 5
        if kind == 1:
            scores[0, int(torch.randint(0, vocab, (1,), generator=generator))] = float("nan")
        elif kind == 2:
            scores[:] = float("-inf")
        elif kind == 3:
            scores[0, [0, -1]] = float("inf")
        elif kind == 4:
            scores = scores[:, ::2]
        best, first = first_max(scores)
        assert torch.equal(first, scores.argmax(dim=-1)), (case, rows, vocab)
        torch.testing.assert_close(best, scores.gather(1, first[:, None]).squeeze(1), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_greedy_from_shards_is_argmax_and_log_softmax_of_the_whole_row(tp):
    """tp > 1 greedy: each rank reduces its vocabulary shard and only those values travel; the tokens must be
    torch.argmax of the whole row (the first maximum on ties, also across shards) and the logprobs log_softmax's."""
    from distllama.sampling import greedy_from_shards
    torch.manual_seed(tp)
    logits = torch.randn(6, VOCAB) * 4
    per_rank = -(-VOCAB // tp)
    logits[0, [per_rank - 1, per_rank]] = 50.0  # a tie across the first two shards
    logits[1, [3, 7]] = 50.0  # a tie inside a shard
    logits[2, VOCAB - 1] = 50.0  # the max is the last real id, beside the last shard's padding
    logits[3] = 0.0  # every id ties
    padded = torch.nn.functional.pad(logits, (0, per_rank * tp - VOCAB), value=float("-inf"))  # as ParallelLMHead
    shards = [padded[:, r * per_rank:(r + 1) * per_rank] for r in range(tp)]
    sent = []  # what each rank contributes to the all-gather
    for r, shard in enumerate(shards):
        greedy_from_shards(shard, r * per_rank, lambda stats: sent.append(stats) or stats.repeat(1, tp))
    gathered = torch.cat(sent, dim=-1)
    expected = logits.argmax(dim=-1)
    expected_logprobs = torch.log_softmax(logits.double(), dim=-1).gather(1, expected[:, None]).squeeze(1).float()
    for r, shard in enumerate(shards):
        tokens, logprobs = greedy_from_shards(shard, r * per_rank, lambda stats: gathered)
        assert tokens.tolist() == expected.tolist()
        assert tokens.tolist()[:4] == [per_rank - 1, 3, VOCAB - 1, 0]
        torch.testing.assert_close(logprobs, expected_logprobs, rtol=0, atol=1e-6)
