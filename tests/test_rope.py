"""distllama.rope against Transformers (the oracle): the standardized rope dict against LlamaConfig's, the (cos, sin)
tables against LlamaRotaryEmbedding over stateful call sequences for every rope type, and rotate against
apply_rotary_pos_emb."""

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from distllama.rope import RotaryEmbedding, normalize_rope_parameters, rotate

HEAD_DIM = 16
MAX_POSITIONS = 256
BASE_CONFIG = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=MAX_POSITIONS)  # head_dim 16

LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)
SHORT_FACTOR = [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)]
LONG_FACTOR = [1.0 + 0.6 * i for i in range(HEAD_DIM // 2)]
LONGROPE = dict(
    rope_type="longrope", short_factor=SHORT_FACTOR, long_factor=LONG_FACTOR, original_max_position_embeddings=64
)


# --- position ids, shaped as a generate() call produces them -----------------------------------------------------


def left_padded(prompt_len: int, pads: list[int], start: int = 0) -> torch.Tensor:
    """Rows of one batch, row b left-padded by pads[b]; padded slots get position 1, as HF generate() gives them."""
    mask = torch.ones(len(pads), prompt_len, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    position_ids = mask.cumsum(-1) - 1 + start
    return position_ids.masked_fill(mask == 0, 1)


def decode_step(next_positions: list[int]) -> torch.Tensor:
    return torch.tensor(next_positions, dtype=torch.long)[:, None]  # (B, 1)


def span(start: int, length: int, rows: int = 2) -> torch.Tensor:
    return torch.arange(start, start + length).expand(rows, length)


# A generation: left-padded prefill, decode steps where rows sit at different positions, then a long chunked prefill
# that passes max_position_embeddings.
GENERATION_CALLS = [
    left_padded(12, [0, 3, 7]),
    decode_step([12, 9, 5]),
    decode_step([13, 10, 6]),
    span(0, 200),
    span(200, 140),
    decode_step([340, 17]),
]


# --- helpers ------------------------------------------------------------------------------------------------------


def make_pair(raw: dict) -> tuple[LlamaRotaryEmbedding, RotaryEmbedding]:
    config = LlamaConfig(**copy.deepcopy(raw))
    hf_rope = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(
        normalize_rope_parameters(raw),
        config.head_dim,
        config.max_position_embeddings,
        config.hidden_size,
        config.num_attention_heads,
    )
    return hf_rope, ours


def assert_same_tables(hf_rope, ours, position_ids: torch.Tensor, dtype=torch.float32) -> None:
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=dtype), position_ids)
    cos, sin = ours(position_ids, dtype)
    assert cos.shape == sin.shape == (*position_ids.shape, HEAD_DIM)
    assert cos.dtype == sin.dtype == dtype
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-6)


def run_calls(raw: dict, calls: list[torch.Tensor]) -> tuple[LlamaRotaryEmbedding, RotaryEmbedding]:
    hf_rope, ours = make_pair(raw)
    for position_ids in calls:
        assert_same_tables(hf_rope, ours, position_ids)
    return hf_rope, ours


# --- tables for the stateless types -------------------------------------------------------------------------------

STATELESS_CASES = {
    "default": {},
    "default-theta-500k-old-spelling": dict(rope_theta=500000.0, rope_scaling=None),
    "linear-old-type-key": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "linear-new": dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}),
    "llama3": dict(rope_parameters={**LLAMA3, "rope_theta": 500000.0}),
    "llama3-old-spelling": dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3)),
    "yarn-factor4": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn-attention-factor": dict(
        rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.3
        }
    ),
    "yarn-mscale": dict(
        rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 1.0, "mscale_all_dim": 0.7,
        }
    ),
    # theta 10000 and these lengths put fractional ramp bounds inside the head, so truncation changes the ramp
    "yarn-no-truncate": dict(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "truncate": False}
    ),
    "yarn-betas": dict(
        rope_parameters={
            "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
            "beta_fast": 16, "beta_slow": 2, "truncate": False,
        }
    ),
    "yarn-factor-from-lengths": dict(
        rope_parameters={"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 64}
    ),
    "yarn-old-type-key-no-original": dict(rope_scaling={"type": "yarn", "factor": 2.0}),
}


@pytest.mark.parametrize("case", STATELESS_CASES)
def test_tables_match_transformers(case):
    run_calls({**BASE_CONFIG, **STATELESS_CASES[case]}, GENERATION_CALLS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tables_cast_like_transformers(dtype):
    hf_rope, ours = make_pair({**BASE_CONFIG, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    for position_ids in GENERATION_CALLS:
        assert_same_tables(hf_rope, ours, position_ids, dtype)


def test_llama3_case_reaches_all_three_bands():
    # Guards the test above: with head_dim 16, theta 500000 and original length 64, some frequencies are kept, some
    # divided by factor and some blended; otherwise a bug in one branch could go unseen.
    _, ours = make_pair({**BASE_CONFIG, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    plain = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    ratio = plain / ours.inv_freq
    kept = torch.isclose(ratio, torch.tensor(1.0))
    divided = torch.isclose(ratio, torch.tensor(8.0))
    assert kept.any() and divided.any() and (~kept & ~divided).any()


# --- dynamic and longrope: one sequence generated alone, against Transformers' stateful module ----------------------
#
# Transformers keeps state across calls; for one sequence generated on its own (a fresh module, one prefill call,
# then one call per new token) that amounts to each token using L = max(prompt length, position + 1). distllama
# takes L per token, so a sequence's tables do not depend on what else is in the batch.

SEQUENCES = [  # (prompt length, new tokens), relative to max_position_embeddings 256 / original length 64
    (20, 10),  # short throughout
    (60, 10),  # passes 64 while decoding
    (64, 3),  # exactly the original length, then beyond
    (250, 12),  # passes 256 while decoding
    (300, 4),  # the prompt alone is past 256
]


def check_alone(raw: dict, prompt_len: int, new: int, chunk: int | None = None) -> None:
    """Transformers' fresh module over [0, prompt_len) then each new position, against ours with per-token lengths
    (the prompt optionally in chunks of `chunk` tokens: its tables must not change)."""
    hf_rope, ours = make_pair(raw)
    prompt = torch.arange(prompt_len)[None]
    hf_cos, hf_sin = hf_rope(torch.zeros(1), prompt)
    parts = [prompt[:, i:i + (chunk or prompt_len)] for i in range(0, prompt_len, chunk or prompt_len)]
    tables = [ours(part, torch.float32, torch.full_like(part, prompt_len)) for part in parts]
    torch.testing.assert_close(torch.cat([c for c, _ in tables], 1), hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([s for _, s in tables], 1), hf_sin, rtol=0, atol=1e-6)
    for position in range(prompt_len, prompt_len + new):
        step = torch.tensor([[position]])
        hf_cos, hf_sin = hf_rope(torch.zeros(1), step)
        cos, sin = ours(step, torch.float32, step + 1)
        torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-6)


DYNAMIC = [
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 500000.0}},
]


@pytest.mark.parametrize("rope", DYNAMIC)
@pytest.mark.parametrize("prompt_len, new", SEQUENCES)
def test_dynamic_ntk_matches_transformers_alone(rope, prompt_len, new):
    check_alone({**BASE_CONFIG, **rope}, prompt_len, new)


def test_dynamic_ntk_chunked_prompt_uses_the_prompt_length():
    check_alone({**BASE_CONFIG, **DYNAMIC[0]}, 300, 3, chunk=64)


def test_dynamic_ntk_tables_of_a_step_are_each_sequences_own_to_the_bit():
    """A step's tokens of many sequences (one tensor of them) get the very bits Transformers computes for each sequence
    alone (there the stretch is a 0-d tensor's scalar pow; the CPU's vectorised pow rounds it differently)."""
    raw = {**BASE_CONFIG, **DYNAMIC[1]}
    _, ours = make_pair(raw)
    lengths = torch.tensor([300 + 7 * i for i in range(40)])
    positions = lengths - 1 - torch.arange(40) % 3  # a decode token (the last position) or a prompt's
    cos, sin = ours(positions, torch.float32, lengths)
    for i, (position, length) in enumerate(zip(positions.tolist(), lengths.tolist())):
        hf_rope, _ = make_pair(raw)  # fresh: Transformers' module keeps state
        hf_cos, hf_sin = hf_rope(torch.zeros(1), torch.arange(length)[None])
        assert torch.equal(cos[i], hf_cos[0, position]) and torch.equal(sin[i], hf_sin[0, position]), i


def test_dynamic_ntk_really_stretches():
    _, ours = make_pair({**BASE_CONFIG, **DYNAMIC[0]})
    positions = torch.tensor([10, 10])
    short, _ = ours(positions, torch.float32, torch.tensor([100, 256]))
    long, _ = ours(positions, torch.float32, torch.tensor([100, 400]))
    assert torch.equal(short[0], short[1]) and torch.equal(short[0], long[0]) and not torch.equal(long[0], long[1])


LONGROPE_CASES = [
    {"rope_parameters": {**LONGROPE, "factor": 4.0}},
    {"rope_parameters": dict(LONGROPE)},  # factor derived from 256 / 64
    {"rope_parameters": {**LONGROPE, "factor": 4.0, "attention_factor": 1.1}},
    # Phi3 style: the pretraining length at top level wins over the dict's
    {"original_max_position_embeddings": 64, "rope_parameters": {**LONGROPE, "original_max_position_embeddings": 32}},
    {"rope_theta": 500000.0, "rope_scaling": {**LONGROPE, "type": "longrope"}},
]


@pytest.mark.parametrize("raw", LONGROPE_CASES)
@pytest.mark.parametrize("prompt_len, new", SEQUENCES[:3])
def test_longrope_matches_transformers_alone(raw, prompt_len, new):
    check_alone({**BASE_CONFIG, **raw}, prompt_len, new)


def test_longrope_scales_attention_and_has_two_sets():
    _, ours = make_pair({**BASE_CONFIG, **LONGROPE_CASES[0]})
    assert ours.attention_scaling != 1.0
    assert not torch.equal(ours.long_inv_freq, ours.inv_freq)


def test_length_dependent_types_need_lengths():
    _, ours = make_pair({**BASE_CONFIG, **DYNAMIC[0]})
    with pytest.raises(ValueError, match="length"):
        ours(torch.arange(4), torch.float32)


# --- normalize_rope_parameters against LlamaConfig(**raw).rope_parameters -------------------------------------------


NORMALIZE_CASES = {
    "neither": {},
    "theta-only": dict(rope_theta=500000.0),
    "theta-with-null-scaling": dict(rope_theta=1e6, rope_scaling=None),
    "old-type-key": dict(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}),
    "old-rope-type-key": dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3)),
    "old-yarn-no-original": dict(rope_scaling={"type": "yarn", "factor": 4.0}),
    "new": dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                 "rope_theta": 1e6, "beta_fast": 16}),
    "new-llama3-theta-top-level": dict(rope_theta=500000.0, rope_parameters=dict(LLAMA3)),
    "dict-theta-wins": dict(rope_theta=5.0, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 7.0}),
    "rope-scaling-wins": dict(rope_scaling={"type": "dynamic", "factor": 2.0},
                              rope_parameters={"rope_type": "linear", "factor": 3.0}),
    "rope-type-beats-type": dict(rope_scaling={"type": "linear", "rope_type": "dynamic", "factor": 2.0}),
    "top-level-original-max-wins": dict(original_max_position_embeddings=64,
                                        rope_parameters={**LONGROPE, "original_max_position_embeddings": 32}),
    "top-level-original-max-ignored-for-linear": dict(original_max_position_embeddings=64,
                                                      rope_parameters={"rope_type": "linear", "factor": 2.0}),
    "partial-rotary-factor-default": dict(partial_rotary_factor=1.0),
    "unknown-keys-kept": dict(rope_parameters={**LLAMA3, "rope_theta": 500000.0, "extra": 3}),
}


@pytest.mark.parametrize("case", NORMALIZE_CASES)
def test_normalize_matches_llama_config(case):
    raw = {**BASE_CONFIG, **copy.deepcopy(NORMALIZE_CASES[case])}
    raw_before = copy.deepcopy(raw)
    config = LlamaConfig(**copy.deepcopy(raw))
    # The rope init functions standardize again once all config attributes exist (a top-level
    # original_max_position_embeddings only takes effect then); that is the dict the embedding uses.
    config.standardize_rope_params()
    expected = {key: value for key, value in config.rope_parameters.items() if key != "type"}
    assert normalize_rope_parameters(raw) == expected
    assert raw == raw_before  # the caller's dict is left alone


# --- bad input -----------------------------------------------------------------------------------------------------


BAD_ROPE_PARAMETERS = [
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, "ntk-by-parts"),
    ({"rope_type": "linear"}, "factor"),
    ({"rope_type": "linear", "factor": 0.5}, "factor"),
    ({"rope_type": "dynamic", "factor": "2"}, "factor"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": -1.0}, "rope_theta"),
    ({k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}, "low_freq_factor"),
    ({**LLAMA3, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "high_freq_factor"),
    ({**LLAMA3, "factor": 0.9}, "factor"),
    ({"rope_type": "yarn", "original_max_position_embeddings": 64}, "factor"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 32}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0}, "attention_factor"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64.5}, "original_max_position_embed"),
    ({**LONGROPE, "short_factor": SHORT_FACTOR[:-1]}, "short_factor"),
    ({**LONGROPE, "long_factor": 2.0}, "long_factor"),
    ({k: v for k, v in LONGROPE.items() if k != "long_factor"}, "long_factor"),
    ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.5}, "partial_rotary_factor"),
]


@pytest.mark.parametrize("rope, field", BAD_ROPE_PARAMETERS)
def test_bad_rope_parameters_raise_naming_the_field(rope, field):
    with pytest.raises(ValueError, match=f"^rope_parameters: .*{field}"):
        normalize_rope_parameters({**BASE_CONFIG, "rope_parameters": rope})


def test_rope_settings_must_be_an_object():
    with pytest.raises(ValueError, match="^rope_parameters: must be an object"):
        normalize_rope_parameters({**BASE_CONFIG, "rope_scaling": "linear"})


def test_unknown_rope_type_lists_supported_types():
    with pytest.raises(ValueError) as error:
        normalize_rope_parameters({**BASE_CONFIG, "rope_scaling": {"type": "su", "factor": 2.0}})
    for rope_type in ("default", "linear", "dynamic", "yarn", "llama3", "longrope"):
        assert rope_type in str(error.value)


def test_embedding_checks_longrope_factors_against_head_dim():
    # normalize cannot check lengths when the config gives no widths; the embedding knows head_dim
    params = normalize_rope_parameters({"max_position_embeddings": 256, "rope_parameters": dict(LONGROPE)})
    with pytest.raises(ValueError, match="^rope_parameters: short_factor must have length 16"):
        RotaryEmbedding(params, head_dim=32, max_position_embeddings=256, hidden_size=128, num_attention_heads=4)


# --- rotate ----------------------------------------------------------------------------------------------------------


def test_rotate_matches_transformers():
    torch.manual_seed(0)
    position_ids = left_padded(5, [0, 2])
    hf_rope, ours = make_pair({**BASE_CONFIG, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    cos, sin = ours(position_ids, torch.float32)
    q = torch.randn(2, 4, 5, HEAD_DIM)  # (B, Hq, T, D)
    k = torch.randn(2, 2, 5, HEAD_DIM)  # (B, Hk, T, D): grouped-query heads
    hf_q, hf_k = apply_rotary_pos_emb(q, k, *hf_rope(q, position_ids))
    q_rotated, k_rotated = rotate(q, cos, sin), rotate(k, cos, sin)
    torch.testing.assert_close(q_rotated, hf_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(k_rotated, hf_k, rtol=0, atol=1e-6)
