"""distllama.options vs Transformers' GenerationConfig: checkpoint defaults, precedence, lengths, validation, CLI."""

import argparse
import json
import logging
import re

import pytest
import torch
from hf_oracle import tiny_llama
from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM

from distllama.options import (
    OPTION_FIELDS,
    GenerationOptions,
    add_option_flags,
    ignored_options,
    load_generation_defaults,
    option_values,
    resolve_lengths,
    resolve_options,
)


def hf_set_values(generation_config: GenerationConfig) -> dict:
    """The options a GenerationConfig sets (non-null), restricted to distllama's, eos as a list."""
    values = {k: v for k, v in generation_config.to_dict().items() if k in OPTION_FIELDS and v is not None}
    if isinstance(values.get("eos_token_id"), int):
        values["eos_token_id"] = [values["eos_token_id"]]
    return values


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    _, folder = tiny_llama(tmp_path_factory.mktemp("options"), pad_token_id=0)
    return folder


CUSTOM_GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": [2, 5],
    "do_sample": True,
    "temperature": 0.6,
    "top_p": 0.9,
    "max_length": 64,
    "use_cache": True,
    "transformers_version": "5.24.0",
}


def test_defaults_from_generation_config_json(checkpoint, tmp_path):
    assert load_generation_defaults(checkpoint) == hf_set_values(GenerationConfig.from_pretrained(checkpoint))
    assert load_generation_defaults(checkpoint) == hf_set_values(
        LlamaForCausalLM.from_pretrained(checkpoint).generation_config
    )

    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text((checkpoint / "config.json").read_text())
    (custom / "generation_config.json").write_text(json.dumps(CUSTOM_GENERATION_CONFIG))
    defaults = load_generation_defaults(custom)
    assert defaults == hf_set_values(GenerationConfig.from_pretrained(custom))
    assert defaults == {k: v for k, v in CUSTOM_GENERATION_CONFIG.items() if k in OPTION_FIELDS}


def test_defaults_from_config_json_without_generation_config(checkpoint, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config["eos_token_id"] = 2  # an int, normalized to a list
    (bare / "config.json").write_text(json.dumps(config))
    defaults = load_generation_defaults(bare)
    assert defaults == {"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": 0}
    assert defaults == hf_set_values(GenerationConfig.from_model_config(AutoConfig.from_pretrained(bare)))
    assert defaults == hf_set_values(
        GenerationConfig.from_pretrained(bare, config_file_name="config.json", _from_model_config=True)
    )


@pytest.mark.parametrize(
    "user_values",
    [{}, {"do_sample": True, "top_k": 0, "temperature": 0.7}, {"max_new_tokens": 5, "min_new_tokens": 2}],
)
@pytest.mark.parametrize("with_custom_config", [False, True])
def test_effective_options_match_transformers(checkpoint, tmp_path, user_values, with_custom_config):
    """resolve_options(defaults, {}, values) == the config HF's generate builds (_prepare_generation_config)."""
    folder = checkpoint
    if with_custom_config:
        folder = tmp_path / "custom"
        folder.mkdir()
        (folder / "config.json").write_text((checkpoint / "config.json").read_text())
        (folder / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
        (folder / "generation_config.json").write_text(json.dumps(CUSTOM_GENERATION_CONFIG))
    model = LlamaForCausalLM.from_pretrained(folder)
    hf_config, _ = model._prepare_generation_config(None, **user_values)
    options = resolve_options(load_generation_defaults(folder), {}, user_values)
    for name in OPTION_FIELDS:
        if name in ("seed", "max_length"):
            continue
        expected = getattr(hf_config, name)
        if name == "eos_token_id" and isinstance(expected, int):
            expected = [expected]
        assert getattr(options, name) == expected, name
    # HF fills max_length=20 but remembers whether it was set: unset means "20 new tokens"
    has_default_max_length = user_values.get("max_length") is None and model.generation_config.max_length is None
    assert (options.max_length is None) == has_default_max_length
    if not has_default_max_length:
        assert options.max_length == hf_config.max_length


def test_later_sources_win():
    defaults = {"temperature": 0.6, "top_p": 0.9, "eos_token_id": [2], "max_length": 50}
    yaml_values = {"temperature": 0.8, "top_k": 10, "max_length": None}
    cli_values = {"temperature": 1.2}
    options = resolve_options(defaults, yaml_values, cli_values)
    assert (options.temperature, options.top_p, options.top_k) == (1.2, 0.9, 10)
    assert options.max_length is None and options.eos_token_id == [2]
    assert resolve_options({}, {}, {}) == GenerationOptions()


def test_lists_accept_json_text_and_values():
    as_text = {
        "bad_words_ids": "[[5, 6], [7]]",
        "suppress_tokens": "[3, 4]",
        "eos_token_id": "[2, 7]",
        "stop_strings": '["\\n\\n", "END"]',
        "exponential_decay_length_penalty": "[3, 1.5]",
        "forced_eos_token_id": "9",
        "early_stopping": "never",
        "do_sample": "true",
        "top_k": "7",
    }
    as_values = {
        "bad_words_ids": [[5, 6], [7]],
        "suppress_tokens": [3, 4],
        "eos_token_id": [2, 7],
        "stop_strings": ["\n\n", "END"],
        "exponential_decay_length_penalty": (3, 1.5),
        "forced_eos_token_id": 9,
        "early_stopping": "never",
        "do_sample": True,
        "top_k": 7,
    }
    assert resolve_options({}, {}, as_text) == resolve_options({}, as_values, {})
    assert resolve_options({}, {}, {"eos_token_id": 4, "stop_strings": "END"}).eos_token_id == [4]
    assert resolve_options({}, {}, {"stop_strings": "END"}).stop_strings == ["END"]


def test_cli_flags_cover_every_option():
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    args = parser.parse_args(
        ["--do-sample", "--top-k", "5", "--top-p", "0.5", "--bad-words-ids", "[[5, 6], [7]]",
         "--eos-token-id", "[2, 7]", "--num-return-sequences", "2", "--stop-strings", '["\\n\\n"]']
    )
    values = option_values(args)
    assert set(values) == {"do_sample", "top_k", "top_p", "bad_words_ids", "eos_token_id", "num_return_sequences",
                           "stop_strings"}
    options = resolve_options({}, {}, values)
    assert (options.do_sample, options.top_k, options.top_p) == (True, 5, 0.5)
    assert options.bad_words_ids == [[5, 6], [7]] and options.eos_token_id == [2, 7]
    assert options.stop_strings == ["\n\n"]
    for name in OPTION_FIELDS:  # one flag per option, named like the HF option
        assert "--" + name.replace("_", "-") in parser._option_string_actions
    assert option_values(parser.parse_args(["--no-do-sample"])) == {"do_sample": False}


# (values, the option the message must name, whether Transformers' GenerationConfig rejects it too)
INVALID = [
    ({"top_p": 1.5}, "top_p", False),
    ({"top_p": -0.1}, "top_p", False),
    ({"temperature": -1.0}, "temperature", False),
    ({"temperature": 0.0, "do_sample": True}, "temperature", False),
    ({"top_k": -1}, "top_k", False),
    ({"num_beams": 0}, "num_beams", False),
    ({"num_return_sequences": 2}, "num_return_sequences", True),
    ({"num_return_sequences": 3, "num_beams": 2}, "num_return_sequences", True),
    ({"num_return_sequences": 0}, "num_return_sequences", False),
    ({"typical_p": 0.0}, "typical_p", False),
    ({"typical_p": 1.5}, "typical_p", False),
    ({"min_p": 1.5}, "min_p", False),
    ({"repetition_penalty": 0.0}, "repetition_penalty", False),
    ({"max_new_tokens": -1}, "max_new_tokens", True),
    ({"max_new_tokens": 0}, "max_new_tokens", True),
    ({"max_length": 0}, "max_length", False),
    ({"min_new_tokens": -1}, "min_new_tokens", False),
    ({"min_length": -1}, "min_length", False),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size", False),
    ({"epsilon_cutoff": 1.0}, "epsilon_cutoff", False),
    ({"eta_cutoff": -0.1}, "eta_cutoff", False),
    ({"early_stopping": "sometimes"}, "early_stopping", True),
    ({"suppress_tokens": [3], "forced_eos_token_id": 3}, "forced_eos_token_id", True),
    ({"suppress_tokens": [3], "forced_bos_token_id": 3}, "forced_bos_token_id", True),
    ({"num_beams": 4, "num_beam_groups": 3}, "num_beam_groups", False),
    ({"eos_token_id": [-1]}, "eos_token_id", False),
    ({"pad_token_id": -1}, "pad_token_id", False),
    ({"bad_words_ids": []}, "bad_words_ids", False),
    ({"bad_words_ids": [[]]}, "bad_words_ids", False),
    ({"bad_words_ids": "[1, 2]"}, "bad_words_ids", False),
    ({"bad_words_ids": "[[1"}, "bad_words_ids", False),
    ({"exponential_decay_length_penalty": [5]}, "exponential_decay_length_penalty", False),
    ({"stop_strings": [1, 2]}, "stop_strings", False),
    ({"stop_strings": [""]}, "stop_strings", False),
    # wrong types, unknown and null
    ({"top_k": "many"}, "top_k", False),
    ({"top_k": 2.5}, "top_k", False),
    ({"num_beams": True}, "num_beams", False),
    ({"temperature": [1.0]}, "temperature", False),
    ({"do_sample": "maybe"}, "do_sample", False),
    ({"do_sample": 1}, "do_sample", False),
    ({"do_sample": None}, "do_sample", False),
    ({"suppress_tokens": 3}, "suppress_tokens", False),
    ({"tempreature": 0.5}, "tempreature", False),
]


@pytest.mark.parametrize("values,option,hf_rejects", INVALID, ids=[str(v) for v, _, _ in INVALID])
def test_invalid_values_raise_naming_the_option(values, option, hf_rejects):
    with pytest.raises(ValueError, match=option) as error:
        resolve_options({}, {}, values)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError):  # wherever it comes from, YAML is checked alike
        resolve_options({}, values, {})
    if hf_rejects:
        with pytest.raises(ValueError):
            GenerationConfig(**values)


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"max_new_tokens": 5},
        {"max_length": 12},
        {"max_length": 30, "max_new_tokens": 4},
        {"min_new_tokens": 3},
        {"min_length": 9, "min_new_tokens": 2},
        {"min_length": 9},
    ],
)
@pytest.mark.parametrize("max_position_embeddings", [256, 16])
def test_lengths_resolve_as_transformers(tmp_path, values, max_position_embeddings):
    model, _ = tiny_llama(tmp_path, max_position_embeddings=max_position_embeddings)
    input_length = 6
    input_ids = torch.ones((1, input_length), dtype=torch.long)
    hf_config, _ = model._prepare_generation_config(None, **values)
    hf_config = model._prepare_generated_length(
        hf_config,
        has_default_max_length=values.get("max_length") is None and model.generation_config.max_length is None,
        has_default_min_length=values.get("min_length") is None and model.generation_config.min_length is None,
        model_input_name="input_ids",
        input_ids_length=input_length,
        inputs_tensor=input_ids,
    )
    options = resolve_lengths(resolve_options({}, {}, values), input_length, max_position_embeddings)
    assert (options.max_length, options.min_length) == (hf_config.max_length, hf_config.min_length)
    assert resolve_lengths(options, input_length, max_position_embeddings) == options  # idempotent


def test_prompt_filling_max_length_is_an_error():
    with pytest.raises(ValueError, match="max_length"):
        resolve_lengths(resolve_options({}, {}, {"max_length": 6}), 6)


# ---- where a bad value came from, what Transformers only warns about, ids against the vocabulary ------------------

def test_errors_name_the_flag_the_yaml_key_or_the_defaults_file():
    with pytest.raises(ValueError, match=r"^--top-p: top_p must be in \[0, 1\]"):
        resolve_options({}, {}, {"top_p": 1.5})
    with pytest.raises(ValueError, match=r"^run\.yaml: key top_p: "):
        resolve_options({}, {"top_p": 1.5}, {}, yaml_file="run.yaml")
    with pytest.raises(ValueError, match=r"^ckpt/generation_config\.json: temperature: "):
        resolve_options({"temperature": "hot"}, {}, {}, defaults_file="ckpt/generation_config.json")
    # a combination names every option involved, by where each came from
    with pytest.raises(ValueError, match=r"^--num-return-sequences, run\.yaml: key num_beams: "):
        resolve_options({}, {"num_beams": 2}, {"num_return_sequences": 3}, yaml_file="run.yaml")
    with pytest.raises(ValueError, match=r"^--seed: .*64 bits"):
        resolve_options({}, {}, {"seed": 2**64})


def test_boolean_flags_work_bare_with_a_value_and_negated():
    parser = argparse.ArgumentParser()
    add_option_flags(parser)

    def parsed(*argv):
        return resolve_options({}, {}, option_values(parser.parse_args(list(argv))))

    assert parsed("--early-stopping").early_stopping is True
    assert parsed("--early-stopping", "never").early_stopping == "never"
    assert parsed("--early-stopping", "false", "--num-beams", "2").early_stopping is False
    assert parsed("--no-early-stopping").early_stopping is False
    assert parsed("--do-sample", "--top-k", "3").do_sample is True
    assert parsed("--do-sample", "true").do_sample is True
    assert parsed("--do-sample=false").do_sample is False
    with pytest.raises(ValueError, match="--do-sample"):
        parsed("--do-sample", "yes please")


def hf_minor_issues(values: dict) -> set[str]:
    """The options GenerationConfig.validate reports as minor issues (warnings) for these user-set values."""
    config = GenerationConfig()
    for name, value in values.items():
        setattr(config, name, value)
    try:
        config.validate(strict=True, user_set_attributes=set(values))
    except ValueError as error:
        return set(re.findall(r"^- `(\w+)`", str(error), flags=re.M))
    return set()


@pytest.mark.parametrize("values", [
    {}, {"temperature": 0.7}, {"temperature": 0.7, "do_sample": True}, {"top_p": 0.9, "top_k": 5, "min_p": 0.1},
    {"typical_p": 0.5, "epsilon_cutoff": 0.1, "eta_cutoff": 0.1, "do_sample": False}, {"top_k": 50},
    {"early_stopping": True}, {"length_penalty": 2.0, "num_beams": 2},
    {"length_penalty": 2.0, "early_stopping": "never"},
])
def test_warns_where_transformers_only_warns(values, caplog):
    with caplog.at_level(logging.WARNING, logger="distllama"):
        options = resolve_options({}, {}, values)
    assert set(ignored_options(options, set(values))) == hf_minor_issues(values)
    warnings = [r.getMessage() for r in caplog.records if r.name == "distllama"]
    assert len(warnings) == (1 if hf_minor_issues(values) else 0)
    for name in hf_minor_issues(values):
        assert "--" + name.replace("_", "-") in warnings[0]


def test_checkpoint_defaults_are_not_warned_about_when_the_user_chose_the_mode():
    # Transformers' _should_warn: --no-do-sample over a generation_config.json temperature is no mistake
    assert ignored_options(resolve_options({"temperature": 0.6}, {}, {"do_sample": False}), {"do_sample"}) == {}
    assert set(ignored_options(resolve_options({"temperature": 0.6}, {}, {}), set())) == {"temperature"}


# (values, refused?) for a 301-token vocabulary: refused where Transformers' processors fail or refuse
VOCABULARY = [
    ({"forced_eos_token_id": 301}, True), ({"bad_words_ids": [[5, 301]]}, True),
    ({"exponential_decay_length_penalty": [1, 1.5], "eos_token_id": 1000}, True),
    ({"eos_token_id": 1000}, False), ({"pad_token_id": 1000}, False), ({"suppress_tokens": [301]}, False),
    ({"begin_suppress_tokens": [301]}, False), ({"forced_bos_token_id": 301}, False),
    ({"min_new_tokens": 2, "eos_token_id": 1000}, False),
]


@pytest.mark.parametrize("values,refused", VOCABULARY, ids=[str(v) for v, _ in VOCABULARY])
def test_token_ids_outside_the_vocabulary_as_transformers(values, refused):
    model = tiny_llama_for_generate()
    ids = torch.tensor([[0, 1, 17, 250], [1, 5, 99, 120]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    try:
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                       **{"pad_token_id": 0, **values})
        hf_refused = False
    except (ValueError, IndexError):
        hf_refused = True
    assert hf_refused == refused
    if refused:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            resolve_options({}, {}, values, vocab_size=301)
    else:
        resolve_options({}, {}, values, vocab_size=301)


_TINY = {}


def tiny_llama_for_generate():
    if not _TINY:
        from transformers import LlamaConfig
        torch.manual_seed(0)
        _TINY["model"] = LlamaForCausalLM(LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=48,
                                                      num_hidden_layers=1, num_attention_heads=4,
                                                      num_key_value_heads=2)).eval()
    return _TINY["model"]
