"""GGUF -> Hugging Face checkpoint folder, for Llama models.

Owns the one-way translation of a llama.cpp GGUF file (metadata, quantized tensors, embedded
tokenizer) into the files any Hugging Face checkpoint reader loads: config.json, float32
safetensors under HF parameter names, tokenizer.json + tokenizer_config.json +
special_tokens_map.json, generation_config.json. Needs gguf, tokenizers, numpy and safetensors,
never transformers.

    python -m distllama.convert model.gguf out_dir [--force]
"""

import argparse
import json
import mmap
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

# Largest safetensors file we write; bigger models get HF-style shards plus an index.
MAX_SHARD_BYTES = 5 * 1024**3

# llama.cpp's per-layer tensor names -> HF LlamaForCausalLM names (".weight"/".bias" kept as is).
LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

# GGUF metadata value types (GGUFValueType) -> struct format; 8 is STRING, 9 is ARRAY.
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY, GGUF_FLOAT32 = 8, 9, 6


@dataclass
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple  # (rows, cols) in HF/numpy order
    data: np.ndarray  # raw bytes, (rows, bytes per row), a view of the mapped file


class GGUFFile:
    """Metadata and tensor views of a little-endian GGUF (v2/v3) file.

    gguf.GGUFReader parses every one of the ~100k vocabulary strings through np.memmap slicing,
    which takes 20-30 s here; struct on a plain mmap takes well under a second.
    """

    def __init__(self, path: Path):
        with open(path, "rb") as file:
            self.buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self.offset = 0
        magic, version = self.unpack("<II")
        if magic != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} of {path} is not supported (2 and 3 are)")
        n_tensors, n_keys = self.unpack("<QQ")
        self.metadata = {}
        for _ in range(n_keys):
            key = self.read_string()
            (value_type,) = self.unpack("<I")
            self.metadata[key] = self.read_value(value_type)
        infos = []
        for _ in range(n_tensors):
            name = self.read_string()
            (n_dims,) = self.unpack("<I")
            dims = self.unpack(f"<{n_dims}Q")
            qtype, data_offset = self.unpack("<IQ")
            infos.append((name, tuple(reversed(dims)), GGMLQuantizationType(qtype), data_offset))
        alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        data_start = -(-self.offset // alignment) * alignment
        file_bytes = np.frombuffer(self.buffer, dtype=np.uint8)
        self.tensors = []
        for name, shape, qtype, data_offset in infos:
            byte_shape = quant_shape_to_byte_shape(shape, qtype)
            start, n_bytes = data_start + data_offset, int(np.prod(byte_shape))
            if start + n_bytes > file_bytes.size:
                raise ValueError(f"GGUF file {path} is truncated (tensor {name!r} runs past its end)")
            data = file_bytes[start:start + n_bytes].reshape(byte_shape)
            self.tensors.append(GGUFTensor(name, qtype, shape, data))

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.buffer, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def read_string(self) -> str:
        (length,) = self.unpack("<Q")
        self.offset += length
        return self.buffer[self.offset - length:self.offset].decode("utf-8")

    def read_value(self, value_type: int):
        if value_type == GGUF_STRING:
            return self.read_string()
        if value_type == GGUF_ARRAY:
            item_type, count = self.unpack("<IQ")
            if item_type in SCALAR_FORMATS:
                dtype = np.dtype("<" + SCALAR_FORMATS[item_type])
                items = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
                self.offset += items.nbytes
                if item_type == GGUF_FLOAT32:
                    return [shortest_float(item) for item in items]
                return items.tolist()
            return [self.read_value(item_type) for _ in range(count)]
        if value_type not in SCALAR_FORMATS:
            raise ValueError(f"unknown GGUF metadata value type {value_type}")
        (value,) = self.unpack("<" + SCALAR_FORMATS[value_type])
        return shortest_float(value) if value_type == GGUF_FLOAT32 else value


def shortest_float(value: float) -> float:
    """A float32 as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def rope_parameters(metadata: dict, arch: str) -> dict:
    """HF rope_parameters from llama.{rope.freq_base, rope.scaling.*}."""
    params = {"rope_type": "default", "rope_theta": metadata.get(f"{arch}.rope.freq_base", 10000.0)}
    scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = metadata.get(f"{arch}.rope.scaling.factor")
    if scaling_type == "none" or factor in (None, 0.0, 1.0):
        return params
    if scaling_type == "linear":
        return {**params, "rope_type": "linear", "factor": factor}
    if scaling_type == "yarn":
        params.update(rope_type="yarn", factor=factor)
        optional = {
            "original_max_position_embeddings": f"{arch}.rope.scaling.original_context_length",
            "beta_fast": f"{arch}.rope.scaling.yarn_beta_fast",
            "beta_slow": f"{arch}.rope.scaling.yarn_beta_slow",
        }
        params.update({name: metadata[key] for name, key in optional.items() if key in metadata})
        return params
    raise ValueError(f"unsupported GGUF rope scaling type {scaling_type!r}")


def llama_config(metadata: dict, tensor_shapes: dict) -> dict:
    """config.json for LlamaForCausalLM, from the llama.* architecture keys and the tensor shapes."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' can be converted")
    if "rope_freqs.weight" in tensor_shapes:
        # Llama 3.1-style scaling is stored as a precomputed frequency table, not as parameters.
        raise ValueError("GGUF has a rope_freqs.weight table (llama3 rope scaling), which cannot be converted")

    def required(key: str):
        if f"{arch}.{key}" not in metadata:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return metadata[f"{arch}.{key}"]

    hidden_size = required("embedding_length")
    n_heads = required("attention.head_count")
    n_kv_heads = metadata.get(f"{arch}.attention.head_count_kv", n_heads)
    head_dim = metadata.get(f"{arch}.attention.key_length", hidden_size // n_heads)
    rotary_dim = metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"GGUF rotates {rotary_dim} of {head_dim} head dims; Llama rotates all of them")
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError("GGUF has no token_embd.weight tensor")
    vocab_size = tensor_shapes["token_embd.weight"][0]  # (vocab, hidden)
    rope = rope_parameters(metadata, arch)
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    eos_id = metadata.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": required("feed_forward_length"),
        "num_hidden_layers": required("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": metadata.get(f"{arch}.context_length", 2048),
        "rms_norm_eps": metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": rope,
        # Readers older than Transformers 5 take rope_theta / rope_scaling at the top level.
        "rope_theta": rope["rope_theta"],
        "rope_scaling": None if rope["rope_type"] == "default" else rope,
        "attention_bias": any(".attn_q.bias" in name for name in tensor_shapes),
        "attention_dropout": 0.0,
        "mlp_bias": any(".ffn_up.bias" in name for name in tensor_shapes),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def hf_tensor_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in GLOBAL_TENSOR_NAMES:
        return f"{GLOBAL_TENSOR_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_TENSOR_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_TENSOR_NAMES[parts[2]]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, back to HF's rotate-half layout.

    llama.cpp's converter reorders each head's rows from [first half, second half] to interleaved
    pairs (its RoPE rotates adjacent pairs); this is the inverse of its `permute`.
    """
    rows_per_half = weight.shape[0] // n_heads // 2
    by_head = weight.reshape(n_heads, rows_per_half, 2, *weight.shape[1:])  # (H, D/2, 2, ...)
    return by_head.swapaxes(1, 2).reshape(weight.shape)  # (H, 2, D/2, ...) -> rows


def hf_tensor(tensor: GGUFTensor, config: dict) -> np.ndarray:
    """One GGUF tensor, dequantized to float32, in HF row layout."""
    weight = dequantize(tensor.data, tensor.qtype).astype(np.float32, copy=False).reshape(tensor.shape)
    if ".attn_q." in tensor.name:
        weight = unpermute_rotary_rows(weight, config["num_attention_heads"])
    elif ".attn_k." in tensor.name:
        weight = unpermute_rotary_rows(weight, config["num_key_value_heads"])
    return np.ascontiguousarray(weight)


def plan_shards(tensors) -> list:
    """Group tensors (in file order) into safetensors files of at most MAX_SHARD_BYTES."""
    shards, shard_bytes = [[]], 0
    for tensor in tensors:
        n_bytes = 4 * int(np.prod(tensor.shape))  # float32 once dequantized
        if shards[-1] and shard_bytes + n_bytes > MAX_SHARD_BYTES:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(tensor)
        shard_bytes += n_bytes
    return shards


def write_weights(tensors: list, config: dict, out_dir: Path, progress: bool) -> None:
    """model.safetensors (or shards + index), float32, HF names; one shard in memory at a time."""
    shards = plan_shards(tensors)
    weight_map, total_bytes = {}, 0
    with tqdm(total=len(tensors), desc="converting GGUF tensors", unit="tensor", disable=not progress) as bar:
        for index, shard in enumerate(shards):
            filename = "model.safetensors"
            if len(shards) > 1:
                filename = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            arrays = {}
            for tensor in shard:
                name = hf_tensor_name(tensor.name)
                arrays[name] = hf_tensor(tensor, config)
                weight_map[name] = filename
                total_bytes += arrays[name].nbytes
                bar.update(1)
            save_file(arrays, str(out_dir / filename), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4

# Split regexes of the byte-level pre-tokenizers we can rebuild, keyed by tokenizer.ggml.pre.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_pre_tokenizer(pre_type: str):
    """The pre-tokenizer the vocabulary's merges were learned with (llama.cpp's llm_tokenizer_bpe)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre_type in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp runs "\p{N}" before the GPT-2 regex: every digit is its own piece. The original
        # tokenizer.json writes the same rule as Digits(individual_digits=True) before ByteLevel.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre_type == "gpt-2":
        return byte_level
    if pre_type in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre_type!r} (tokenizer.ggml.pre)")


def build_tokenizer(metadata: dict) -> Tokenizer:
    """The byte-level BPE tokenizer the GGUF describes, as a `tokenizers` Tokenizer."""
    tokenizer_model = metadata.get("tokenizer.ggml.model")
    if tokenizer_model != "gpt2":
        raise ValueError(f"GGUF tokenizer model is {tokenizer_model!r}; only byte-level BPE ('gpt2') is supported")
    tokens = metadata["tokenizer.ggml.tokens"]
    token_types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in metadata["tokenizer.ggml.merges"]]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer(metadata.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are special; user-defined ones are matched whole but are text.
    # Both are kept out of the byte-level step, as llama.cpp matches them before pre-tokenizing.
    tokenizer.add_tokens([
        AddedToken(token, special=token_type == TOKEN_TYPE_CONTROL, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ])
    tokenizer.post_processor = post_processor(metadata, tokens)
    return tokenizer


def post_processor(metadata: dict, tokens: list):
    """BOS/EOS around each sequence exactly when the GGUF says llama.cpp adds them."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    prefix, suffix = [], []
    if metadata.get("tokenizer.ggml.add_bos_token", False):
        prefix = [tokens[metadata["tokenizer.ggml.bos_token_id"]]]
    if metadata.get("tokenizer.ggml.add_eos_token", False):
        suffix = [tokens[metadata["tokenizer.ggml.eos_token_id"]]]
    if not prefix and not suffix:
        return byte_level
    specials = [(token, tokens.index(token)) for token in dict.fromkeys(prefix + suffix)]
    template = processors.TemplateProcessing(
        single=" ".join(prefix + ["$A:0"] + suffix),
        pair=" ".join(prefix + ["$A:0"] + suffix + [f"{t}:1" for t in prefix] + ["$B:1"] + [f"{t}:1" for t in suffix]),
        special_tokens=specials,
    )
    return processors.Sequence([byte_level, template])


def special_tokens(metadata: dict) -> dict:
    """{'bos_token': '<|im_start|>', ...} for the special ids the GGUF names."""
    tokens = metadata["tokenizer.ggml.tokens"]
    ids = {
        "bos_token": "tokenizer.ggml.bos_token_id",
        "eos_token": "tokenizer.ggml.eos_token_id",
        "unk_token": "tokenizer.ggml.unknown_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
    }
    return {name: tokens[metadata[key]] for name, key in ids.items() if key in metadata}


def write_tokenizer(tokenizer: Tokenizer, metadata: dict, config: dict, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    specials = special_tokens(metadata)
    tokenizer_config = {
        # The generic fast class reads tokenizer.json as written; a model-specific class
        # (GPT2Tokenizer) would rebuild its own pre-tokenizer and lose rules like the digit split.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": metadata.get("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": metadata.get("tokenizer.ggml.add_eos_token", False),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in metadata:
        tokenizer_config["chat_template"] = metadata["tokenizer.chat_template"]
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "special_tokens_map.json", specials)


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(gguf_path, out_dir, progress: bool = True) -> Path:
    """Write the HF checkpoint of a Llama GGUF file into out_dir (created if needed); return out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"no GGUF file at {gguf_path}")
    gguf_file = GGUFFile(gguf_path)
    metadata = gguf_file.metadata
    tensor_shapes = {tensor.name: tensor.shape for tensor in gguf_file.tensors}
    # Everything that can refuse the file runs before anything is written.
    config = llama_config(metadata, tensor_shapes)
    for name in tensor_shapes:
        hf_tensor_name(name)
    tokenizer = build_tokenizer(metadata)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tokenizer, metadata, config, out_dir)
    write_weights(gguf_file.tensors, config, out_dir, progress)
    write_json(out_dir / "config.json", config)
    special_ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    generation = {key: config[key] for key in special_ids if config[key] is not None}
    write_json(out_dir / "generation_config.json", generation)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distllama.convert", description=__doc__.splitlines()[0])
    parser.add_argument("gguf_file", help="Llama GGUF file to convert")
    parser.add_argument("out_dir", help="folder to write the Hugging Face checkpoint into")
    parser.add_argument("--force", action="store_true", help="write into out_dir even if it is not empty")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not args.force:
        print(f"error: {out_dir} is not empty (use --force to write into it)", file=sys.stderr)
        return 1
    try:
        convert_gguf(args.gguf_file, out_dir, progress=not args.quiet)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
