"""Rotary position embeddings (RoPE): the rope parameters of a config.json, the inverse frequencies of every rope type
Llama checkpoints use (default, linear, dynamic, yarn, llama3, longrope), the (cos, sin) tables for given positions,
and their application to queries and keys.

Numerically a mirror of Transformers 5 (modeling_rope_utils.py and LlamaRotaryEmbedding): the same float32
expressions in the same order, so the tables are bit-identical. Depends on torch only.
"""

import math

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
DEFAULT_ROPE_THETA = 10000.0

# Types that scale relative to the context length the model was pretrained with.
_TYPES_WITH_ORIGINAL_MAX = ("llama3", "yarn", "longrope")
# Keys each type must carry, as in Transformers' _validate_<type>_rope_parameters.
_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


# ---------------------------------------------------------------------------------------------------------------------
# Config: standardize and validate


def normalize_rope_parameters(raw: dict) -> dict:
    """Standardize the rope settings of a parsed config.json the way Transformers 5 does, then validate them.

    Accepts the Transformers-5 spelling (`rope_parameters`), the older one (`rope_theta` + `rope_scaling` with `type`
    or `rope_type`), or neither (default rope, theta 10000). The result always holds "rope_type" and "rope_theta"
    (the legacy "type" key is dropped once read); llama3/yarn/longrope also get "original_max_position_embeddings".
    Raises ValueError("rope_parameters: ...") naming the offending field.
    """
    # An old-style rope_scaling wins over rope_parameters, as in PreTrainedConfig.convert_rope_params_to_dict.
    given = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(given, dict):
        raise ValueError(f"rope_parameters: must be an object of rope settings, got {given!r}")
    params = dict(given)
    # Values inside the dict win over the top-level ones.
    params.setdefault("rope_theta", raw.get("rope_theta", DEFAULT_ROPE_THETA))
    if raw.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", raw["partial_rotary_factor"])
    legacy_type = params.pop("type", "default")
    params.setdefault("rope_type", legacy_type)

    if params["rope_type"] in _TYPES_WITH_ORIGINAL_MAX:
        # Phi3-style configs keep the pretraining length at top level; Transformers gives it priority.
        if "original_max_position_embeddings" in raw:
            params["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))

    head_dim = raw.get("head_dim")
    if not head_dim and raw.get("hidden_size") and raw.get("num_attention_heads"):
        head_dim = raw["hidden_size"] // raw["num_attention_heads"]
    validate_rope_parameters(params, head_dim)
    return params


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(params: dict, key: str, minimum: float | None = None, strict: bool = False, optional=False):
    """Raise unless params[key] is a number (>= minimum, or > minimum when strict); None passes when optional."""
    value = params.get(key)
    if value is None and optional:
        return
    if not _is_number(value) or (minimum is not None and (value <= minimum if strict else value < minimum)):
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum}"
        raise ValueError(f"rope_parameters: {key} must be a number{bound}, got {value!r}")


def validate_rope_parameters(params: dict, head_dim: int | None = None) -> None:
    """Check a standardized rope dict: type supported, its required keys present, values usable.

    Transformers raises only for missing keys and logs a warning for bad values; we refuse both, since a bad value
    silently gives a different model. head_dim, when known, checks the length of longrope's factor lists.
    """
    rope_type = params.get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_parameters: unknown rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    missing = [key for key in _REQUIRED_KEYS[rope_type] if key not in params]
    if missing:
        raise ValueError(f"rope_parameters: rope_type {rope_type!r} requires {', '.join(missing)}")

    _check_number(params, "rope_theta", minimum=0, strict=True)
    if "partial_rotary_factor" in params:
        _check_number(params, "partial_rotary_factor", minimum=0, strict=True)
        if params["partial_rotary_factor"] > 1:
            raise ValueError(
                f"rope_parameters: partial_rotary_factor must be <= 1, got {params['partial_rotary_factor']}"
            )
    if rope_type == "default":
        return

    # yarn and longrope may leave factor None: it is then max_position_embeddings / original_max_position_embeddings.
    _check_number(params, "factor", minimum=1, optional=rope_type in ("yarn", "longrope"))
    if rope_type in _TYPES_WITH_ORIGINAL_MAX:
        original_max = params["original_max_position_embeddings"]
        if not (isinstance(original_max, int) and not isinstance(original_max, bool) and original_max > 0):
            raise ValueError(
                f"rope_parameters: original_max_position_embeddings must be a positive int, got {original_max!r}"
            )

    if rope_type == "llama3":
        _check_number(params, "low_freq_factor")
        _check_number(params, "high_freq_factor")
        if params["high_freq_factor"] <= params["low_freq_factor"]:
            raise ValueError(
                f"rope_parameters: high_freq_factor ({params['high_freq_factor']}) must be greater than "
                f"low_freq_factor ({params['low_freq_factor']})"
            )
    elif rope_type == "yarn":
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            _check_number(params, key, optional=True)
        _check_number(params, "attention_factor", minimum=0, optional=True)
        beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1
        if beta_fast < beta_slow:
            raise ValueError(f"rope_parameters: beta_fast ({beta_fast}) must be >= beta_slow ({beta_slow})")
        if not isinstance(params.get("truncate", True), bool):
            raise ValueError(f"rope_parameters: truncate must be a bool, got {params['truncate']!r}")
    elif rope_type == "longrope":
        _check_number(params, "attention_factor", minimum=0, optional=True)
        rotary_dim = None if head_dim is None else int(head_dim * params.get("partial_rotary_factor", 1.0))
        for key in ("short_factor", "long_factor"):
            factors = params[key]
            if not (isinstance(factors, list) and all(_is_number(x) for x in factors)):
                raise ValueError(f"rope_parameters: {key} must be a list of numbers, got {factors!r}")
            if rotary_dim is not None and len(factors) != rotary_dim // 2:
                raise ValueError(f"rope_parameters: {key} must have length {rotary_dim // 2}, got {len(factors)}")


# ---------------------------------------------------------------------------------------------------------------------
# Inverse frequencies: one function per rope type, each (params, head_dim, max_position_embeddings, seq_len, device)
# -> (inv_freq [head_dim // 2] float32, attention_scaling). Expressions copied from Transformers, order included.


def _default_inv_freq(params, head_dim, max_position_embeddings, seq_len=None, device=None):
    # Llama's default rope ignores partial_rotary_factor (LlamaRotaryEmbedding.compute_default_rope_parameters).
    dim = head_dim
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    return inv_freq, 1.0


def _plain_inv_freq(base, dim, device):
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def _linear_inv_freq(params, head_dim, max_position_embeddings, seq_len=None, device=None):
    # Dividing the frequencies by factor is the same as dividing the positions by it.
    inv_freq = _plain_inv_freq(params["rope_theta"], head_dim, device)
    inv_freq /= params["factor"]
    return inv_freq, 1.0


def _dynamic_ntk_inv_freq(params, head_dim, max_position_embeddings, seq_len=None, device=None):
    """NTK-aware scaling: the base grows with the sequence length once it passes max_position_embeddings."""
    base, factor, dim = params["rope_theta"], params["factor"], head_dim
    if seq_len is None:  # at construction: Python floats, like Transformers
        seq_len = max_position_embeddings
    else:  # on growth, seq_len is a tensor, so the new base is computed in float32, like Transformers
        seq_len = torch.maximum(
            seq_len, torch.tensor(max_position_embeddings, dtype=seq_len.dtype, device=seq_len.device)
        )
    base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return _plain_inv_freq(base, dim, device), 1.0


def _yarn_inv_freq(params, head_dim, max_position_embeddings, seq_len=None, device=None):
    """YaRN: interpolate low frequencies, keep high ones, blend between with a linear ramp; scale attention."""
    base, dim = params["rope_theta"], head_dim
    original_max = params["original_max_position_embeddings"]
    factor = params["factor"]
    if factor is None:  # DeepSeek-style configs give the stretch through the two lengths
        factor = max_position_embeddings / original_max

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations):
        # the dimension whose wavelength makes num_rotations turns over the original context
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp.to(device=device, dtype=torch.float)
    inv_freq = (
        inv_freq_interpolation * (1 - extrapolation_weight) + inv_freq_extrapolation * extrapolation_weight
    )
    return inv_freq, attention_factor


def _longrope_inv_freq(params, head_dim, max_position_embeddings, seq_len=None, device=None):
    """LongRoPE: per-frequency rescale factors, the long set once the sequence passes the pretraining length."""
    base, dim = params["rope_theta"], head_dim
    original_max = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:  # Phi3-style configs give the stretch through the two lengths
        factor = max_position_embeddings / original_max
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))

    use_long = seq_len and seq_len > original_max
    ext_factors = params["long_factor" if use_long else "short_factor"]
    ext_factors = torch.tensor(ext_factors, dtype=torch.float32, device=device)
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (ext_factors * base**inv_freq_shape)
    return inv_freq, attention_factor


def _llama3_inv_freq(params, head_dim, max_position_embeddings, seq_len=None, device=None):
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend in between."""
    inv_freq = _plain_inv_freq(params["rope_theta"], head_dim, device)
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    inv_freq_llama = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    return inv_freq_llama, 1.0


_INV_FREQ_FUNCTIONS = {
    "default": _default_inv_freq,
    "linear": _linear_inv_freq,
    "dynamic": _dynamic_ntk_inv_freq,
    "yarn": _yarn_inv_freq,
    "llama3": _llama3_inv_freq,
    "longrope": _longrope_inv_freq,
}


# ---------------------------------------------------------------------------------------------------------------------
# The module


class RotaryEmbedding(torch.nn.Module):
    """(cos, sin) tables for positions, as LlamaRotaryEmbedding computes them for a sequence generated on its own.

    Two types depend on the sequence's length, through state Transformers keeps across calls (dynamic_rope_update):
    - dynamic: once a sequence passes max_position_embeddings, the base is stretched for its length;
    - longrope: the long factors apply once it passes original_max_position_embeddings, the short ones before.
    For one sequence generated alone that state amounts to each token using the longest length seen so far,
    L = max(prompt length, position + 1): the prompt's tokens all use the prompt's length (its one prefill call),
    each later token its own position + 1. The caller passes L per token (`lengths`), so every row of a batch gets
    what it would get alone. Keys already in the cache keep the rotation they got, as in Transformers.
    """

    def __init__(
        self,
        rope_parameters: dict,
        head_dim: int,
        max_position_embeddings: int,
        hidden_size: int,
        num_attention_heads: int,
    ):
        super().__init__()
        # Transformers derives head_dim from the widths when a config leaves it unset.
        head_dim = head_dim or hidden_size // num_attention_heads
        validate_rope_parameters(rope_parameters, head_dim)
        self.rope_type = rope_parameters["rope_type"]
        rotary_dim = int(head_dim * rope_parameters.get("partial_rotary_factor", 1.0))
        if self.rope_type != "default" and rotary_dim != head_dim:
            # Transformers would build tables narrower than the head, which its Llama attention cannot apply.
            raise ValueError("rope_parameters: partial_rotary_factor < 1 is not supported by Llama attention")
        self.rope_parameters = dict(rope_parameters)
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self._inv_freq_fn = _INV_FREQ_FUNCTIONS[self.rope_type]

        inv_freq, self.attention_scaling = self._inv_freq_fn(self.rope_parameters, head_dim, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if self.rope_type == "longrope":
            original_max = self.rope_parameters["original_max_position_embeddings"]
            long_inv_freq, _ = self._inv_freq_fn(
                self.rope_parameters, head_dim, max_position_embeddings, seq_len=original_max + 1
            )
            self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)

    @property
    def length_dependent(self) -> bool:
        """Whether forward needs each token's sequence length."""
        return self.rope_type in ("dynamic", "longrope")

    def _inv_freq_per_token(self, lengths: torch.Tensor) -> torch.Tensor:
        """[..., head_dim // 2] inverse frequencies for tokens of sequences lengths [...] long."""
        if self.rope_type == "longrope":
            use_long = lengths[..., None] > self.rope_parameters["original_max_position_embeddings"]
            return torch.where(use_long, self.long_inv_freq, self.inv_freq)
        # dynamic NTK: Transformers' expression, elementwise over the tokens' lengths (float32, as it computes)
        base, factor, dim = self.rope_parameters["rope_theta"], self.rope_parameters["factor"], self.head_dim
        seq_len = lengths.clamp(min=self.max_position_embeddings)
        ratio = (factor * seq_len / self.max_position_embeddings) - (factor - 1)
        # Transformers takes one sequence's power as a 0-d tensor, i.e. with the scalar pow; over a contiguous tensor of
        # tokens the CPU's vectorised pow rounds most of them differently (by an ulp): a strided view of them takes
        # the scalar loop, so that a token's frequencies do not depend on where it sits in the step
        strided = ratio.new_empty(ratio.shape + (2,))[..., 0].copy_(ratio)
        base = base * strided ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=lengths.device).float() / dim
        stretched = 1.0 / (base[..., None] ** exponents)
        return torch.where(lengths[..., None] > self.max_position_embeddings, stretched, self.inv_freq)

    @torch.no_grad()
    def forward(self, positions: torch.LongTensor, dtype: torch.dtype,
                lengths: torch.LongTensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] (and, for dynamic / longrope, lengths of the same shape) -> (cos, sin), each
        [..., head_dim] in dtype."""
        if self.length_dependent:
            if lengths is None:
                raise ValueError(f"{self.rope_type} rope needs each token's sequence length")
            inv_freq = self._inv_freq_per_token(lengths)
        else:
            inv_freq = self.inv_freq
        freqs = positions[..., None].float() * inv_freq  # (..., head_dim // 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., head_dim)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=dtype), sin.to(dtype=dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (N, H, D) by cos/sin (N, D), token by token, over any number of heads (the model rotates a token's
    query and key heads in one call). (Also (B, H, T, D) with cos/sin (B, T, D), as Transformers lays them out.)

    Transformers' x * cos + rotate_half(x) * sin (rotate_half: (x1, x2) -> (-x2, x1) over the last dim) with fewer
    temporaries, bit for bit: the first half gets x1 cos - x2 sin (a + (-b) s is a - b s exactly in IEEE
    arithmetic), the second x2 cos + x1 sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return out
