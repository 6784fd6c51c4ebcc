"""Building distllama's CPU kernels (distllama.cpu_kernels): without a working compiler, one line, then torch's
kernels."""

import pytest
import torch

from distllama import cpu_kernels, cpu_matmul, decode_attention
from distllama.parallel import packed_weight


def clear_caches():
    for cached in (cpu_kernels.library, decode_attention.kernel, cpu_matmul.kernel):
        cached.cache_clear()


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="the CPU has no AVX-512: nothing is built")
@pytest.mark.parametrize("environment,said", [
    ({"CC": "false"}, "false could not build decode_attention.c, cpu_matmul.c (exit 1)"),
    ({"CC": "", "PATH": ""}, "no C compiler found")])
def test_without_a_working_compiler_steps_take_torchs_kernels(environment, said, tmp_path, monkeypatch, capsys):
    """A compiler that fails, or none: one line on stderr says so, decode attention takes SDPA and matmuls oneDNN."""
    monkeypatch.setenv("DISTLLAMA_CACHE", str(tmp_path))  # no library built before
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    clear_caches()
    try:
        assert not decode_attention.usable(torch.float32, torch.device("cpu"), 3)
        weight = torch.randn(8, 16)
        packed = packed_weight(weight)
        assert packed is not None and not packed.own_kernel
    finally:
        clear_caches()  # the next use finds the real compiler again
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and said in lines[0] and lines[0].endswith("use torch's kernels (SDPA, oneDNN)"), lines
