"""Fill a stage's parameters from a checkpoint: only this rank's shard files, only its slices, strictly.

Strict means: a tensor the model needs and the checkpoint lacks, a tensor the checkpoint has and no stage of the
model uses, a shape that disagrees with config.json, or a weight stored as integers is an error naming the tensor.
"""

import logging
import re
from dataclasses import dataclass

from tqdm import tqdm

from distllama.checkpoint import Checkpoint, CheckpointError
from distllama.model import LlamaStage, expected_names, stage_slices

log = logging.getLogger("distllama")

# Tensors old checkpoints carry that hold nothing a model needs (recomputed rotary frequencies).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


@dataclass
class LoadReport:
    bytes_read: int
    files_opened: list[str]
    tensors: int


def load_stage(stage: LlamaStage, ckpt: Checkpoint, progress: bool = False) -> LoadReport:
    config = stage.config
    slices = stage_slices(stage)
    weight_map = ckpt.weight_map()

    known = expected_names(config)
    if config.tie_word_embeddings:
        known.add("lm_head.weight")  # tied checkpoints may still store it; Transformers ignores it then
    unexpected = sorted(n for n in weight_map if n not in known and not _IGNORED.search(n))
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensor(s) this Llama config does not use: "
                              f"{_list(unexpected)} (does config.json match the weights?)")
    missing = sorted({s.name for s in slices if s.name not in weight_map})
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {_list(missing)}")

    files = ckpt.files_for(s.name for s in slices)
    ckpt.ensure_files(files)  # hub ids: downloads just these shards
    for s in tqdm(slices, desc="loading", unit="tensor", disable=not progress, leave=False):
        stored = ckpt.dtype(s.name)
        if not stored.startswith(("F", "BF")):  # F64, F32, F16, BF16, F8_*: copy_ casts them; ints and bools no
            raise CheckpointError(f"tensor {s.name} in shard file {weight_map[s.name]} is stored as {stored}, not a "
                                  "floating-point type (a quantized or damaged checkpoint?)")
        s.load(ckpt)
    return LoadReport(ckpt.bytes_read, sorted(ckpt.files_opened), len(slices))


def _list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
