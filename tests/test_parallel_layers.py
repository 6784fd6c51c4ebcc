"""The CPU matmul through packed weights (oneDNN's layout, or distllama.cpu_matmul's panels): the same values as
F.linear, and a row's bits do not depend on the rows beside it (the engine's answer does not depend on the batch)."""

import pytest
import torch

from distllama.parallel import dense, packed_weight


@pytest.mark.parametrize("own_kernel", [False, True])
@pytest.mark.parametrize("in_features", [64, 576, 1536])
def test_a_packed_matmul_gives_a_row_the_same_bits_alone_and_among_others(in_features, own_kernel):
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(96, in_features, generator=generator) / in_features**0.5
    x = torch.randn(40, in_features, generator=generator)
    packed = packed_weight(weight, own_kernel)
    assert packed is not None  # oneDNN is in every CPU build of torch this project installs
    if own_kernel and not packed.own_kernel:
        pytest.skip("the CPU has no AVX-512 or AVX2, or no C compiler: matmuls use oneDNN")
    among_others = dense(x, weight, packed)
    torch.testing.assert_close(among_others, x @ weight.T)
    for rows in (1, 2, 3, 17):
        assert torch.equal(dense(x[:rows], weight, packed), among_others[:rows]), rows
