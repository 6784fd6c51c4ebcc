"""distllama's C kernels for x86 CPUs with AVX-512 or AVX2 (decode_attention.c, cpu_matmul.c), compiled once per
machine.

On first use the machine's C compiler ($CC, split as a shell would, else cc or gcc) builds both sources into one
library in the cache folder (DISTLLAMA_CACHE/kernels), keyed by the sources, compiler and flags, and ctypes loads it.
The instruction set is the one torch's own CPU kernels use (`torch.backends.cpu.get_cpu_capability()`; the
ATEN_CPU_CAPABILITY variable lowers it). Both give the same bits (vec16.h). Where the CPU has neither, nothing is
built; where no compiler is found or the build fails, one line on stderr says so, and float32 CPU steps run on torch's
kernels (SDPA for decode attention, oneDNN for matmuls).
"""

import ctypes
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCES = [Path(__file__).with_name(name) for name in ("decode_attention.c", "cpu_matmul.c")]
HEADER = Path(__file__).with_name("vec16.h")
# the instruction sets by name, not -march=native: the library may sit in a home folder shared by several CPU kinds
# (widest first: a CPU runs its own set's build and those after it, as tests/conftest.py does)
ISA_FLAGS = {"AVX512": ["-mavx512f", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]


def _say(message: str) -> None:
    print(f"distllama: {message}; float32 CPU steps use torch's kernels (SDPA, oneDNN)", file=sys.stderr)


def instruction_set() -> str | None:
    """AVX512 or AVX2, as torch's CPU kernels run here, or None (other CPUs)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return next((isa for isa in ISA_FLAGS if capability.startswith(isa)), None)


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run here (said once on stderr where the CPU could run them
    but they cannot be built)."""
    isa = instruction_set()
    return None if isa is None else build(isa)


@cache
def build(isa: str) -> ctypes.CDLL | None:
    """The kernels built for `isa` (a key of ISA_FLAGS), or None (said once on stderr) where they cannot be."""
    flags = [*ISA_FLAGS[isa], *FLAGS]
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc")]  # CC may hold flags
    if compiler[0] is None:
        _say("no C compiler found for distllama's CPU kernels (set CC, or pass --attn sdpa --matmul torch)")
        return None
    from distllama.demo import cache_root  # (demo imports the GGUF converter: only when a kernel is wanted)

    digest = hashlib.sha256(" ".join([*compiler, *flags]).encode())
    for source in [*SOURCES, HEADER]:
        digest.update(source.read_bytes())
    folder = cache_root() / "kernels"
    built_library = folder / f"cpu_kernels-{digest.hexdigest()[:16]}.so"
    try:
        if not built_library.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as staging:  # ranks building at once: each renames its own
                built = Path(staging) / built_library.name
                subprocess.run([*compiler, *flags, *map(str, SOURCES), "-o", str(built)], check=True,
                               capture_output=True, text=True, timeout=300)
                os.replace(built, built_library)
        return ctypes.CDLL(str(built_library))
    except subprocess.CalledProcessError as e:
        last = (e.stderr or "").strip().splitlines()
        _say(f"{shlex.join(compiler)} could not build {', '.join(s.name for s in SOURCES)} "
             f"({last[-1] if last else f'exit {e.returncode}'})")
    except (OSError, subprocess.TimeoutExpired) as e:
        _say(f"cannot build or load distllama's CPU kernels in {folder} ({e})")
    return None


def function(name: str, argtypes: list):
    """The library's C function `name` (returning an int status) with its argument types, or None where the library
    cannot run here."""
    built = library()
    if built is None:
        return None
    c_function = getattr(built, name)
    c_function.argtypes, c_function.restype = argtypes, ctypes.c_int
    return c_function
