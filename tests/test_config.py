"""config.json validation against Transformers' own: what LlamaConfig refuses is refused, naming the file and the
key; what it only warns about is one warning line; what it accepts and distllama runs is accepted alike."""

import json
import logging

import pytest
from transformers import AutoConfig

from distllama.config import ConfigError, load_config

BASE = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)

# (overrides, the key the message must name); Transformers 5 refuses each of these too (checked below)
REFUSED_BY_BOTH = [
    (dict(hidden_size=30), "hidden_size"),  # not a multiple of the heads
    (dict(hidden_size=50, head_dim=16), "hidden_size"),  # ... even with an explicit head_dim
    (dict(hidden_size=True), "hidden_size"),
    (dict(hidden_size=64.0), "hidden_size"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(vocab_size=None), "vocab_size"),
    (dict(num_attention_heads="4"), "num_attention_heads"),
    (dict(rms_norm_eps="x"), "rms_norm_eps"),
    (dict(rms_norm_eps=1), "rms_norm_eps"),
    (dict(eos_token_id=[2, "x"]), "eos_token_id"),
    (dict(bos_token_id=1.5), "bos_token_id"),
    (dict(hidden_act=5), "hidden_act"),
    (dict(attention_bias="yes"), "attention_bias"),
    (dict(tie_word_embeddings=1), "tie_word_embeddings"),
    (dict(use_cache="x"), "use_cache"),
    (dict(dtype="float33"), "dtype"),
    (dict(torch_dtype="float33"), "torch_dtype"),
    (dict(initializer_range=2.0), "initializer_range"),
    (dict(head_dim=7), "head_dim"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0}), "factor"),
]

# Accepted by Transformers' config, but no model of it can run here (or at all): refused, naming the key.
REFUSED_BY_DISTLLAMA = [
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(max_position_embeddings=-5), "max_position_embeddings"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="mistral"), "model_type"),
]

# Transformers only warns (PreTrainedConfig.validate_token_ids): one warning line naming the key.
WARNED = [(dict(pad_token_id=-1), "pad_token_id"), (dict(eos_token_id=[2, 500]), "eos_token_id"),
          (dict(bos_token_id=128), "bos_token_id")]


def write_config(tmp_path, overrides):
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**BASE, **overrides}))
    return folder


@pytest.mark.parametrize("overrides,key", REFUSED_BY_BOTH, ids=[str(o) for o, _ in REFUSED_BY_BOTH])
def test_refused_like_transformers(tmp_path, overrides, key):
    folder = write_config(tmp_path, overrides)
    with pytest.raises(Exception):  # noqa: B017 -- Transformers raises several types
        AutoConfig.from_pretrained(folder)
    with pytest.raises(ConfigError, match=key) as error:
        load_config(folder)
    assert str(folder / "config.json") in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides,key", REFUSED_BY_DISTLLAMA, ids=[str(o) for o, _ in REFUSED_BY_DISTLLAMA])
def test_refused_because_it_cannot_run(tmp_path, overrides, key):
    folder = write_config(tmp_path, overrides)
    with pytest.raises(ConfigError, match=key) as error:
        load_config(folder)
    assert "config.json" in str(error.value)


@pytest.mark.parametrize("overrides,key", WARNED, ids=[str(o) for o, _ in WARNED])
def test_warned_like_transformers(tmp_path, caplog, overrides, key):
    folder = write_config(tmp_path, overrides)
    AutoConfig.from_pretrained(folder)  # Transformers accepts it (with a warning)
    with caplog.at_level(logging.WARNING, logger="distllama"):
        load_config(folder)
    warnings = [r.getMessage() for r in caplog.records if r.name == "distllama"]
    assert len(warnings) == 1 and key in warnings[0] and "config.json" in warnings[0]


@pytest.mark.parametrize("overrides", [{}, dict(head_dim=16), dict(num_key_value_heads=None, head_dim=None),
                                       dict(dtype="bfloat16", torch_dtype="float16"), dict(attention_dropout=0),
                                       dict(unknown_key=3), dict(eos_token_id=[])])
def test_accepted_like_transformers(tmp_path, caplog, overrides):
    folder = write_config(tmp_path, overrides)
    theirs = AutoConfig.from_pretrained(folder)
    with caplog.at_level(logging.WARNING, logger="distllama"):
        ours = load_config(folder)
    assert not [r for r in caplog.records if r.name == "distllama"]
    assert (ours.head_dim, ours.num_key_value_heads) == (theirs.head_dim, theirs.num_key_value_heads)
    if "dtype" in overrides:
        assert ours.torch_dtype == "bfloat16" and str(theirs.dtype) == "torch.bfloat16"


def test_unreadable_config_names_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes(b'{"hidden_size": "\xc3"}')
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_config(folder)
    (folder / "config.json").write_text("[" * 100_000)
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_config(folder)
