"""The CPU decode-attention kernel (distllama/decode_attention.c) against attention computed in float64."""

import math

import pytest
import torch

from distllama import decode_attention as kernel_module
from distllama.decode_attention import decode_attention

# each test once per instruction set the CPU runs the kernels in (tests/conftest.py)
pytestmark = [pytest.mark.skipif(kernel_module.kernel() is None,
                                 reason="the CPU has no AVX-512 or AVX2, or no C compiler: decode steps use SDPA"),
              pytest.mark.usefixtures("instruction_set")]


def reference(q, keys, values, lengths, scale):
    """softmax(q k^T * scale) v per row over its own keys, in float64 (q (n, heads, hd); keys (n, kv, S, hd))."""
    n, heads, hd = q.shape
    group = heads // keys.shape[1]
    out = torch.empty(n, heads, hd, dtype=torch.float64)
    for i in range(n):
        k, v = keys[i, :, :lengths[i]].double(), values[i, :, :lengths[i]].double()
        qi = q[i].double().view(keys.shape[1], group, hd)
        out[i] = (torch.softmax(qi @ k.transpose(1, 2) * scale, dim=-1) @ v).view(heads, hd)
    return out


def case(seed, n, kv_heads, group, hd, positions=97):
    generator = torch.Generator().manual_seed(seed)
    qk = torch.randn(n, kv_heads * group + kv_heads, hd, generator=generator)  # q heads beside k heads, as the model
    q = qk[:, :kv_heads * group]
    keys = torch.randn(n + 2, kv_heads, positions + 1, hd, generator=generator) * 2
    values = torch.randn(n + 2, kv_heads, positions + 1, hd, generator=generator)
    lengths = torch.randint(1, positions + 1, (n,), generator=generator)
    return q, keys, values, lengths


@pytest.mark.parametrize("group,hd", [(1, 64), (3, 64), (4, 128), (8, 24), (2, 8), (5, 80), (3, 200)])
def test_it_is_attention_over_each_rows_own_keys(group, hd):
    """Close to float64 attention for GQA groups and head sizes with and without a 16-float tail; keys past a row's
    length (NaN here) are never read."""
    q, keys, values, lengths = case(group * 1000 + hd, 9, 2, group, hd)
    for i, length in enumerate(lengths.tolist()):
        keys[i, :, length:] = values[i, :, length:] = float("nan")
    scale = 1 / math.sqrt(hd)
    out = decode_attention(q, keys, values, lengths, scale)
    torch.testing.assert_close(out.double(), reference(q, keys, values, lengths, scale), rtol=0, atol=2e-6)


def test_a_rows_bits_do_not_depend_on_the_others_or_the_threads():
    """Each row alone, beside others in any slot range, and with 1 or 2 threads: the same bits."""
    q, keys, values, lengths = case(7, 12, 3, 3, 64, positions=300)
    together = decode_attention(q, keys, values, lengths, 0.125)
    for i in range(12):
        alone = decode_attention(q[i:i + 1], keys[i:i + 1], values[i:i + 1], lengths[i:i + 1], 0.125)
        assert torch.equal(alone[0], together[i]), i
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(decode_attention(q, keys, values, lengths, 0.125), together)
    finally:
        torch.set_num_threads(threads)


def test_a_row_of_one_key_returns_that_keys_value():
    q, keys, values, _ = case(3, 4, 2, 4, 64)
    out = decode_attention(q, keys, values, torch.ones(4, dtype=torch.long), 0.125)
    assert torch.equal(out.view(4, 2, 4, 64), values[:4, :, :1].expand(4, 2, 4, 64))
