"""The CPU matmul kernel (distllama/cpu_matmul.c) against float64 matmuls, and a row's bits on their own."""

import pytest
import torch

from distllama import cpu_matmul
from distllama.parallel import dense, packed_weight

# each test once per instruction set the CPU runs the kernels in (tests/conftest.py)
pytestmark = [pytest.mark.skipif(cpu_matmul.kernel() is None,
                                 reason="the CPU has no AVX-512 or AVX2, or no C compiler: matmuls use oneDNN"),
              pytest.mark.usefixtures("instruction_set")]

# 1-2 rows, 3-64 and more than 64 take three different loops in the kernel; 1500 rows of 300 inputs two chunks
ROWS = [1, 2, 3, 4, 5, 33, 64, 65, 200, 1500]


@pytest.mark.parametrize("out_features,in_features", [(1, 1), (15, 7), (17, 128), (100, 300), (96, 1536)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_it_is_x_times_w_transposed(out_features, in_features, with_bias):
    generator = torch.Generator().manual_seed(out_features * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    panels = cpu_matmul.pack(weight)
    for rows in ROWS:
        x = torch.randn(rows, in_features, generator=generator)
        expected = x.double() @ weight.double().T + (0 if bias is None else bias.double())
        got = cpu_matmul.cpu_matmul(x, panels, out_features, bias)
        assert got.shape == (rows, out_features)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_rows_bits_do_not_depend_on_the_others_or_the_threads():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(200, 300, generator=generator)
    x = torch.randn(1500, 300, generator=generator)
    packed = packed_weight(weight)
    assert packed.own_kernel
    alone = torch.cat([dense(x[i:i + 1], weight, packed) for i in range(0, 1500, 37)])
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            for rows in ROWS:
                among_others = dense(x[:rows], weight, packed)
                assert torch.equal(among_others[::37], alone[:len(among_others[::37])]), (rows, count)
    finally:
        torch.set_num_threads(threads)


def test_rows_that_are_views_and_leading_dimensions():
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 64, generator=generator)
    panels = cpu_matmul.pack(weight)
    wide = torch.randn(3, 7, 100, generator=generator)
    x = wide[..., 10:74]  # rows 100 floats apart
    expected = x.double() @ weight.double().T
    torch.testing.assert_close(cpu_matmul.cpu_matmul(x, panels, 40, None).double(), expected, rtol=1e-5, atol=1e-5)
    strided = torch.randn(5, 128, generator=generator)[:, ::2]  # inputs 2 floats apart
    torch.testing.assert_close(cpu_matmul.cpu_matmul(strided, panels, 40, None).double(),
                               strided.double() @ weight.double().T, rtol=1e-5, atol=1e-5)
    assert cpu_matmul.cpu_matmul(x[:0, 0], panels, 40, None).shape == (0, 40)
