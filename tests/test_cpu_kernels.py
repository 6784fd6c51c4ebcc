"""Building distllama's CPU kernels (distllama.cpu_kernels): the same bits from every instruction set; without a
working compiler, one line, then torch's kernels."""

import pytest
import torch
from conftest import INSTRUCTION_SETS, clear_kernel_caches

from distllama import cpu_kernels, cpu_matmul, decode_attention
from distllama.parallel import packed_weight


@pytest.mark.skipif(len(INSTRUCTION_SETS) < 2, reason="the CPU runs the kernels in one instruction set only")
def test_every_instruction_set_gives_the_same_bits(monkeypatch):
    """AVX-512's and AVX2's builds: the same bits for matmuls (each of the kernel's loops, column tails, bias) and for
    decode attention (head-size tails, GQA groups, key lengths around 16)."""
    results = {}
    for isa in INSTRUCTION_SETS:
        built = cpu_kernels.build(isa)
        monkeypatch.setattr(cpu_kernels, "library", lambda: built)
        clear_kernel_caches()
        generator = torch.Generator().manual_seed(0)
        results[isa] = []
        for rows, out_features, in_features in [(1, 17, 100), (3, 50, 257), (33, 97, 300), (200, 40, 129)]:
            weight = torch.randn(out_features, in_features, generator=generator)
            bias = torch.randn(out_features, generator=generator)
            x = torch.randn(rows, in_features, generator=generator)
            results[isa].append(cpu_matmul.cpu_matmul(x, cpu_matmul.pack(weight), out_features, bias))
        for group, hd in [(1, 8), (3, 64), (5, 100), (8, 200)]:
            q = torch.randn(6, 2 * group, hd, generator=generator)
            keys, values = torch.randn(2, 6, 2, 70, hd, generator=generator)
            lengths = torch.tensor([1, 15, 16, 17, 70, 40])
            results[isa].append(decode_attention.decode_attention(q, keys, values, lengths, hd ** -0.5))
    clear_kernel_caches()
    first, *others = results.values()
    for other in others:
        for ours, theirs in zip(first, other, strict=True):
            assert torch.equal(ours, theirs)


@pytest.mark.skipif(not INSTRUCTION_SETS, reason="the CPU has no AVX-512 or AVX2: nothing is built")
@pytest.mark.parametrize("environment,said", [
    ({"CC": "false"}, "false could not build decode_attention.c, cpu_matmul.c (exit 1)"),
    ({"CC": "", "PATH": ""}, "no C compiler found")])
def test_without_a_working_compiler_steps_take_torchs_kernels(environment, said, tmp_path, monkeypatch, capsys):
    """A compiler that fails, or none: one line on stderr says so, decode attention takes SDPA and matmuls oneDNN."""
    monkeypatch.setenv("DISTLLAMA_CACHE", str(tmp_path))  # no library built before
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    clear_kernel_caches()
    try:
        assert not decode_attention.usable(torch.float32, torch.device("cpu"), 3)
        weight = torch.randn(8, 16)
        packed = packed_weight(weight)
        assert packed is not None and not packed.own_kernel
    finally:
        clear_kernel_caches()  # the next use finds the real compiler again
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and said in lines[0] and lines[0].endswith("use torch's kernels (SDPA, oneDNN)"), lines
