"""Text in and out: a checkpoint folder's tokenizer and chat template, as Transformers 5 AutoTokenizer reads them.

Owns loading (tokenizer.json + tokenizer_config.json + special_tokens_map.json + chat template files), encode/decode,
chat rendering, and incremental detokenization for streaming. Built on the `tokenizers` and `jinja2` packages only:
where Transformers rebuilds the Rust tokenizer for a declared class (LlamaTokenizer, GPT2Tokenizer) we rebuild it
the same way, because that, not tokenizer.json alone, is what AutoTokenizer encodes with.
"""

import json
import re
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE

# Named special tokens, in the order Transformers lists them (this order is the chat template's variable order too)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Defaults the rebuilt classes put in their __init__ signatures: a token missing from the config gets these
CLASS_DEFAULT_TOKENS = {
    "llama": {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    "gpt2": {"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"},
}

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

NO_CHAT_TEMPLATE = "this checkpoint has no chat template; drop --chat"


class TokenizerError(ValueError):
    """A tokenizer folder or chat request that cannot be served; the message says what is missing."""


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _added_token(value) -> AddedToken | str:
    """tokenizer_config.json stores AddedTokens as dicts (older files tag them with "__type")."""
    if isinstance(value, dict):
        fields = {key: item for key, item in value.items() if key not in ("__type", "id")}
        return AddedToken(**fields)
    return value


# ---- which tokenizer Transformers builds -------------------------------------------------------------------------


def _tokenizer_kind(folder: Path, tokenizer_config: dict, tokenizer_json_text: str) -> str:
    """'llama' / 'gpt2' when AutoTokenizer rebuilds the backend as that class, else 'as_is' (tokenizer.json verbatim).

    Mirrors AutoTokenizer's class choice for Llama checkpoints: the declared tokenizer_class wins; without one a
    llama config.json means LlamaTokenizer; a declared LlamaTokenizer over a ByteLevel tokenizer.json (Llama 3)
    loads verbatim. Other declared classes are not rebuilt here (tokenizer.json is used as written).
    """
    model_config = _read_json(folder / "config.json") or {}
    declared = tokenizer_config.get("tokenizer_class") or model_config.get("tokenizer_class")
    if declared is None:
        declared = "LlamaTokenizer" if model_config.get("model_type") == "llama" else None
    elif declared.removesuffix("Fast") == "LlamaTokenizer" and '"ByteLevel"' in tokenizer_json_text:
        return "as_is"
    model_type = json.loads(tokenizer_json_text).get("model", {}).get("type")
    if declared is None or model_type != "BPE":
        return "as_is"
    return {"LlamaTokenizer": "llama", "GPT2Tokenizer": "gpt2"}.get(declared.removesuffix("Fast"), "as_is")


def _rebuild_backend(kind: str, tokenizer_json: dict, settings: dict) -> RustTokenizer:
    """The Rust tokenizer LlamaTokenizer / GPT2Tokenizer construct from tokenizer.json's vocab and merges.

    Only the vocab, merges and post-processor come from the file; normalizer, pre-tokenizer and decoder are the
    class's own (so e.g. a Digits pre-tokenizer in tokenizer.json is dropped, exactly as Transformers drops it).
    """
    model = tokenizer_json["model"]
    vocab = model["vocab"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model.get("merges", [])]
    if kind == "llama":
        add_prefix_space = settings.get("add_prefix_space")
        add_prefix_space = True if add_prefix_space is None else add_prefix_space
        legacy = settings.get("legacy", False)
        backend = RustTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        backend.normalizer = None
        prepend_scheme = ("always" if legacy else "first") if add_prefix_space else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix_space:
            steps.append(decoders.Strip(content=" ", left=1))
        backend.decoder = decoders.Sequence(steps)
    else:  # gpt2
        bpe = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                  fuse_unk=False)
        backend = RustTokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(settings.get("add_prefix_space", False)))
        backend.decoder = decoders.ByteLevel()
    # the post-processor (which adds BOS/EOS) is the file's; an empty model is enough to parse it cheaply
    shell = dict(tokenizer_json, model={**model, "vocab": {}, "merges": []}, added_tokens=[])
    backend.post_processor = RustTokenizer.from_str(json.dumps(shell)).post_processor
    return backend


# ---- settings: tokenizer_config.json as Transformers' _from_pretrained prepares it -------------------------------


def _load_settings(folder: Path, tokenizer_json: dict, kind: str) -> tuple[dict, dict[int, AddedToken]]:
    """tokenizer_config.json merged with the legacy files; returns (settings, added_tokens_decoder)."""
    # add_bos_token / add_eos_token are not read: with a tokenizer.json, Transformers 5 drops them and BOS/EOS come
    # only from the file's post-processor
    settings = dict(_read_json(folder / "tokenizer_config.json") or {})
    if "additional_special_tokens" in settings and not settings.get("extra_special_tokens"):
        settings["extra_special_tokens"] = settings.pop("additional_special_tokens")

    if "added_tokens_decoder" in settings:
        added_tokens_decoder = {int(i): _added_token(token) for i, token in settings["added_tokens_decoder"].items()}
    else:
        # legacy folders: special_tokens_map.json names the tokens, tokenizer.json lists the added ones
        for key, value in (_read_json(folder / "special_tokens_map.json") or {}).items():
            if isinstance(value, dict):
                value = _added_token({**value, "special": True})
            elif isinstance(value, list):
                value = [_added_token({**item, "special": True}) if isinstance(item, dict) else item for item in value]
            settings[key] = value
        if map_extras := settings.pop("additional_special_tokens", None):
            settings.setdefault("extra_special_tokens", map_extras)
        added_tokens_decoder = {entry["id"]: _added_token(entry) for entry in tokenizer_json.get("added_tokens", [])}

    for key in list(settings):  # named tokens refer to the added token of the same text, flags included
        if key.endswith("_token"):
            settings[key] = _added_token(settings[key])
    by_text = {str(token): token for token in added_tokens_decoder.values()}
    for name in SPECIAL_TOKEN_NAMES:
        if settings.get(name) is not None and by_text:
            settings[name] = by_text.get(str(settings[name]), settings[name])

    for name, default in CLASS_DEFAULT_TOKENS.get(kind, {}).items():
        settings.setdefault(name, default)
    if (padding := tokenizer_json.get("padding")) is not None:
        settings.setdefault("pad_token", padding["pad_token"])
    return settings, added_tokens_decoder


def _special_tokens(settings: dict) -> dict[str, AddedToken | str]:
    """Named special tokens (standard names first, then model-specific *_token keys), None ones left out."""
    named = {name: settings.get(name) for name in SPECIAL_TOKEN_NAMES}
    for key, value in settings.items():
        if key.endswith("_token") and key not in named and isinstance(value, (str, AddedToken)):
            named[key] = value
    extra = settings.get("extra_special_tokens")
    if isinstance(extra, dict):
        named.update(extra)
    return {name: value for name, value in named.items() if value is not None}


def _register_added_tokens(backend: RustTokenizer, added_tokens_decoder: dict, special: dict, extra: list) -> None:
    """Add the config's added tokens, then any special token the backend lacks (TokenizersBackend.__init__)."""
    tokens_to_add = [token for _, token in sorted(added_tokens_decoder.items())]
    known_text = [token.content for token in backend.get_added_tokens_decoder().values()]
    known_text += [str(token) for token in tokens_to_add]
    for value in [*special.values(), *extra]:
        if str(value) not in known_text and value not in tokens_to_add:
            tokens_to_add.append(value)
    special_text = [str(value) for value in special.values()]
    tokens = []
    for token in tokens_to_add:
        if isinstance(token, str):
            token = AddedToken(token, special=True)
        elif not token.special and str(token) in special_text:
            token.special = True
        tokens.append(token)
    if tokens:
        backend.add_tokens(tokens)


# ---- chat templates -------------------------------------------------------------------------------------------------


def _load_chat_template(folder: Path, settings: dict) -> str | dict[str, str] | None:
    """The template(s): chat_template.jinja and additional_chat_templates/*.jinja win over tokenizer_config.json.

    chat_template.json (a processor file AutoTokenizer ignores) is used only when nothing else names a template.
    """
    from_files = {}
    if (folder / "chat_template.jinja").is_file():
        from_files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for path in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        from_files[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    template = settings.get("chat_template")
    if from_files:
        template = from_files["default"] if list(from_files) == ["default"] else from_files
    if isinstance(template, list):
        template = {entry["name"]: entry["template"] for entry in template}
    if template is None and (processor_file := _read_json(folder / "chat_template.json")):
        template = processor_file.get("chat_template")
    return template


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes, as Transformers' sandbox does."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _TemplateDict:
    """dict() for templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache
def _compile_chat_template(source: str) -> jinja2.Template:
    """The sandboxed environment of transformers.utils.chat_template_utils, same options, filters and globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _plain(value):
    """A copy of template data made of plain containers, so the template cannot touch the caller's objects."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return value


def _alias_reasoning(message: dict) -> dict:
    # Templates read a message's reasoning as `reasoning_content` (and gpt-oss ones as `thinking`)
    reasoning = next((message[key] for key in ("reasoning_content", "thinking", "reasoning") if key in message), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


# ---- the tokenizer --------------------------------------------------------------------------------------------------


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode/chat equal to Transformers' AutoTokenizer for the same folder."""

    def __init__(self, backend: RustTokenizer, special_tokens: dict, chat_template, clean_up_spaces: bool,
                 model_max_length: int | None):
        self.backend = backend
        self.special_tokens = special_tokens  # name -> token text, e.g. {"bos_token": "<s>", ...}
        self.chat_template = chat_template  # str, {name: str}, or None
        self.clean_up_spaces = clean_up_spaces
        self.model_max_length = model_max_length
        self.bos_token_id = self.token_id(special_tokens.get("bos_token"))
        self.eos_token_id = self.token_id(special_tokens.get("eos_token"))
        self.pad_token_id = self.token_id(special_tokens.get("pad_token"))
        self.unk_token_id = self.token_id(special_tokens.get("unk_token"))

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder}: distllama needs a fast-tokenizer file")
        tokenizer_json_text = tokenizer_file.read_text(encoding="utf-8")
        tokenizer_json = json.loads(tokenizer_json_text)
        config = _read_json(folder / "tokenizer_config.json") or {}
        kind = _tokenizer_kind(folder, config, tokenizer_json_text)
        settings, added_tokens_decoder = _load_settings(folder, tokenizer_json, kind)

        if kind == "as_is":
            backend = RustTokenizer.from_str(tokenizer_json_text)
        else:
            backend = _rebuild_backend(kind, tokenizer_json, settings)
        # encode() is always one unpadded, untruncated sequence, as AutoTokenizer's __call__ without options
        backend.no_truncation()
        backend.no_padding()

        special = _special_tokens(settings)
        extra = settings.get("extra_special_tokens")
        extra = [_added_token(token) for token in extra] if isinstance(extra, list) else []
        _register_added_tokens(backend, added_tokens_decoder, special, extra)
        backend.encode_special_tokens = bool(settings.get("split_special_tokens", False))

        # Transformers skips the clean-up for BPE models unless told to corrupt the output anyway
        clean_up = bool(settings.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"
            or settings.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
        )
        max_length = settings.get("model_max_length")
        max_length = int(max_length) if isinstance(max_length, (int, float)) and max_length < 2**63 else None
        return cls(backend, {name: str(value) for name, value in special.items()},
                   _load_chat_template(folder, settings), clean_up, max_length)

    # -- vocabulary

    def token_id(self, token: str | None) -> int | None:
        """Id of a token text (unk id when unknown, as Transformers' convert_tokens_to_ids); None for None."""
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None and self.special_tokens.get("unk_token") is not None:
            token_id = self.backend.token_to_id(self.special_tokens["unk_token"])
        return token_id

    @cached_property
    def byte_piece_ids(self) -> frozenset[int]:
        """Ids of sentencepiece byte-fallback pieces (<0x41>), when the decoder joins runs of them into text."""
        if "ByteFallback" not in repr(self.backend.decoder):
            return frozenset()
        return frozenset(i for token, i in self.get_vocab().items() if BYTE_PIECE.fullmatch(token))

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (len(AutoTokenizer))."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    # -- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_spaces else text

    # -- chat

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat as text, rendered by the checkpoint's template with Transformers' jinja environment."""
        template = self.chat_template
        if isinstance(template, dict):
            if "default" not in template:
                raise TokenizerError(f"this checkpoint has several chat templates and no default: {sorted(template)}")
            template = template["default"]
        if template is None:
            raise TokenizerError(NO_CHAT_TEMPLATE)
        if not messages:
            raise TokenizerError("cannot render an empty conversation")
        if not all(isinstance(message, dict) for message in messages):
            raise TokenizerError("chat messages must be dicts with 'role' and 'content'")
        # keys set to None are dropped (APIs send content=None; templates handle a missing key better)
        chat = [_alias_reasoning({k: v for k, v in _plain(message).items() if v is not None}) for message in messages]
        try:
            return _compile_chat_template(template).render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as error:  # raise_exception() in the template, or a broken template
            raise TokenizerError(f"chat template: {error}") from error

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            system_prompt: str | None = None) -> list[int]:
        """Token ids of the rendered chat; the template writes its own special tokens, so none are added."""
        if system_prompt is not None:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _clean_up_tokenization(text: str) -> str:
    """Transformers' clean_up_tokenization (for WordPiece-style tokenizers only)."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


class StreamDecoder:
    """Incremental detokenization for streaming one sequence: push(ids) -> new text; finish() -> the remainder.

    Each push decodes the whole sequence so far and emits what extends the text already emitted, so byte-level
    joins and sentencepiece's leading-space handling come out as decode(all ids) does. Held back until more ids
    arrive (or finish()): text ending in U+FFFD (half a multi-byte character), and a trailing run of byte-fallback
    pieces, because ByteFallback decodes a run as a whole: <0x68> alone is "h", but <0x68><0xC3> is two U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""  # text handed out so far, always a prefix of decode(self.ids) when emitted

    def push(self, ids) -> str:
        self.ids.extend([ids] if isinstance(ids, int) else [int(i) for i in ids])
        settled = len(self.ids)
        while settled > 0 and self.ids[settled - 1] in self.tokenizer.byte_piece_ids:
            settled -= 1
        text = self.tokenizer.decode(self.ids[:settled], skip_special_tokens=self.skip_special_tokens)
        stable = text.rstrip("\ufffd")
        if len(stable) <= len(self.emitted) or not stable.startswith(self.emitted):
            return ""  # nothing new, or earlier text still in flux: wait for more ids
        new_text = stable[len(self.emitted):]
        self.emitted = stable
        return new_text

    def finish(self) -> str:
        """Everything not yet emitted, held-back replacement characters included."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        remainder = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return remainder
