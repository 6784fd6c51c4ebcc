"""`instruction_set`: runs a kernel test once per instruction set this CPU runs distllama's C kernels in (an AVX-512
CPU runs the AVX2 build too), with distllama.cpu_kernels' library built for it."""

import pytest

from distllama import cpu_kernels, cpu_matmul, decode_attention

_here = cpu_kernels.instruction_set()
INSTRUCTION_SETS = list(cpu_kernels.ISA_FLAGS)[list(cpu_kernels.ISA_FLAGS).index(_here):] if _here else []


def clear_kernel_caches():
    for cached in (cpu_kernels.build, decode_attention.kernel, cpu_matmul.kernel):
        cached.cache_clear()


@pytest.fixture(params=INSTRUCTION_SETS)
def instruction_set(request, monkeypatch):
    built = cpu_kernels.build(request.param)
    if built is None:
        pytest.skip("no C compiler builds distllama's CPU kernels here")
    monkeypatch.setattr(cpu_kernels, "library", lambda: built)
    clear_kernel_caches()
    yield request.param
    clear_kernel_caches()  # the next use finds this CPU's own build
