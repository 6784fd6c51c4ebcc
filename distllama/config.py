"""The model architecture, read from a checkpoint's config.json into a typed, validated object.

Architecture comes from the checkpoint; the run (tp, pp, dtype, prompts) is decided elsewhere.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distllama.rope import normalize_rope_parameters

log = logging.getLogger("distllama")


class ConfigError(ValueError):
    """A config.json that cannot describe a Llama model; the message names the field."""


@dataclass
class LlamaConfig:
    """The LlamaConfig fields distllama uses, with Transformers' defaults."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: MHA, as many kv heads as query heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    attention_dropout: float = 0.0  # inference: never applied
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in ("dtype" in Transformers 5)
    rope_parameters: dict = field(default_factory=dict)  # normalized: always rope_type and rope_theta

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


# Expected Python types per field, as Transformers' strict LlamaConfig checks them (bool is checked before int: json
# true is not a head count; rms_norm_eps must be a float there, 1 is refused).
_INT = (int,)
_FLOAT = (float,)
_NUMBER = (int, float)
_TYPES = {
    "vocab_size": _INT, "hidden_size": _INT, "intermediate_size": _INT, "num_hidden_layers": _INT,
    "num_attention_heads": _INT, "num_key_value_heads": _INT, "head_dim": _INT, "max_position_embeddings": _INT,
    "hidden_act": (str,), "rms_norm_eps": _FLOAT, "attention_bias": (bool,), "attention_dropout": _NUMBER,
    "mlp_bias": (bool,), "tie_word_embeddings": (bool,), "use_cache": (bool,), "bos_token_id": _INT,
    "eos_token_id": (int, list), "pad_token_id": _INT, "torch_dtype": (str,),
}
# Fields Transformers' LlamaConfig refuses as null; the others fall back to their default.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "hidden_act", "max_position_embeddings", "rms_norm_eps", "attention_bias", "mlp_bias",
             "tie_word_embeddings", "use_cache")
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
_SUPPORTED_ACT = ("silu",)


def config_from_dict(raw: dict, source: str = "config.json") -> LlamaConfig:
    """Validate a parsed config.json and build the config; every problem is a ConfigError naming the file (source)
    and the key. Refuses what Transformers' LlamaConfig refuses (and what distllama cannot run); warns, in one log
    line, where Transformers only warns (special token ids outside the vocabulary)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a JSON object")
    model_type = raw.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{source}: model_type is {model_type!r}, distllama runs 'llama' models only")
    values = {}
    for name, types in _TYPES.items():
        key = name
        if name == "torch_dtype" and raw.get("dtype") is not None:
            key = "dtype"  # Transformers 5 writes "dtype"; it wins over the old "torch_dtype"
        value = raw.get(key)
        if value is None:
            if key in raw and name in _REQUIRED:
                raise ConfigError(f"{source}: {key} must be {_type_name(types)}, got null")
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise ConfigError(f"{source}: {key} must be {_type_name(types)}, got {_shown(value)}")
        if name == "eos_token_id" and isinstance(value, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{source}: eos_token_id must be an int or a list of ints, got {_shown(value)}")
        if name == "torch_dtype" and not isinstance(getattr(torch, value, None), torch.dtype):
            raise ConfigError(f"{source}: {key} {value!r} is not a torch dtype (e.g. 'bfloat16')")
        values[name] = float(value) if types is _NUMBER else value
    for name in _POSITIVE:
        if name in values and values[name] <= 0:
            raise ConfigError(f"{source}: {name} must be positive, got {values[name]}")
    if values.get("rms_norm_eps", 1.0) <= 0:
        raise ConfigError(f"{source}: rms_norm_eps must be positive, got {values['rms_norm_eps']}")
    if values.get("hidden_act", "silu") not in _SUPPORTED_ACT:
        raise ConfigError(f"{source}: hidden_act {values['hidden_act']!r} is not supported (only silu)")
    initializer_range = raw.get("initializer_range")  # unused here, but Transformers refuses a bad one
    if initializer_range is not None and not (isinstance(initializer_range, float) and 0 <= initializer_range <= 1):
        raise ConfigError(f"{source}: initializer_range must be a float in [0, 1], got {_shown(initializer_range)}")
    try:
        values["rope_parameters"] = normalize_rope_parameters(raw)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    config = LlamaConfig(**values)
    # Transformers' LlamaConfig.validate_architecture, even when head_dim is given
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"{source}: hidden_size ({config.hidden_size}) is not a multiple of num_attention_heads "
                          f"({config.num_attention_heads})")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(f"{source}: num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                          f"num_key_value_heads ({config.num_key_value_heads})")
    if config.head_dim % 2:
        raise ConfigError(f"{source}: head_dim must be even for rotary embeddings, got {config.head_dim}")
    # Transformers' PreTrainedConfig.validate_token_ids only warns: several hub configs hold e.g. pad_token_id -1.
    for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
        ids = getattr(config, name)
        for token in [ids] if isinstance(ids, int) else ids or []:
            if not 0 <= token < config.vocab_size:
                log.warning("%s: %s %d is outside the vocabulary (0..%d); generation may misbehave where it is used",
                            source, name, token, config.vocab_size - 1)
                break
    return config


def load_config(checkpoint_dir) -> LlamaConfig:
    path = Path(checkpoint_dir) / "config.json"
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"no config.json in {checkpoint_dir}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path} is not valid JSON: nested too deeply") from None
    return config_from_dict(raw, str(path))


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(types) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    if types is _FLOAT:
        return "a float (e.g. 1e-05; Transformers refuses an integer here)"
    return " or ".join(dict.fromkeys(names[t] for t in types))


__all__ = ["ConfigError", "LlamaConfig", "config_from_dict", "load_config"]
