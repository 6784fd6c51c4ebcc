"""Generation options: what Transformers' GenerationConfig holds, for the options distllama supports.

Owns the GenerationOptions dataclass (HF names, HF 5 defaults), reading a checkpoint's generation defaults the way
Transformers does, merging defaults < YAML < command line with validation, the per-option CLI flags, and the
max/min length resolution of HF's generate (_prepare_generated_length).
"""

import argparse
import json
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

# What a field holds; drives both parsing (CLI strings, YAML values) and the CLI flag type.
INT, FLOAT, BOOL, EARLY_STOPPING = "int", "float", "bool", "early_stopping"
INT_LIST, INT_OR_INT_LIST, INT_LIST_LIST = "int_list", "int_or_int_list", "int_list_list"
STR_LIST, DECAY = "str_list", "decay"

log = logging.getLogger("distllama")


class OptionError(ValueError):
    """A bad generation option; `names` are the options the message is about, so the caller can say where each
    came from (the flag, the YAML key and file, or the checkpoint's generation_config.json)."""

    def __init__(self, message: str, *names: str):
        super().__init__(message)
        self.names = names


def _option(default, kind: str, help: str, optional: bool = False):
    return field(default=default, metadata={"kind": kind, "help": help, "optional": optional})


@dataclass
class GenerationOptions:
    """Transformers' GenerationConfig fields that distllama supports, with the values generate() falls back to."""

    # None = HF's "default max_length": 20 new tokens, capped at the model's max_position_embeddings. A max_length
    # that is set (by the checkpoint or the user) counts the prompt, as in HF.
    max_length: int | None = _option(None, INT, "maximum total length (prompt + new tokens)", optional=True)
    max_new_tokens: int | None = _option(None, INT, "maximum number of new tokens (wins over max_length)", True)
    min_length: int = _option(0, INT, "minimum total length before eos is allowed")
    min_new_tokens: int | None = _option(None, INT, "minimum number of new tokens before eos", optional=True)
    do_sample: bool = _option(False, BOOL, "sample instead of greedy / beam search")
    temperature: float = _option(1.0, FLOAT, "sampling temperature")
    top_k: int | None = _option(50, INT, "keep the k most likely tokens when sampling (0 = off)", optional=True)
    top_p: float = _option(1.0, FLOAT, "nucleus sampling mass")
    min_p: float | None = _option(None, FLOAT, "min-p sampling threshold", optional=True)
    typical_p: float = _option(1.0, FLOAT, "typical sampling mass")
    epsilon_cutoff: float = _option(0.0, FLOAT, "epsilon sampling cutoff")
    eta_cutoff: float = _option(0.0, FLOAT, "eta sampling cutoff")
    repetition_penalty: float = _option(1.0, FLOAT, "repetition penalty (1.0 = off)")
    no_repeat_ngram_size: int = _option(0, INT, "forbid repeating n-grams of this size (0 = off)")
    bad_words_ids: list[list[int]] | None = _option(None, INT_LIST_LIST, "token sequences never generated", True)
    suppress_tokens: list[int] | None = _option(None, INT_LIST, "tokens never generated", optional=True)
    begin_suppress_tokens: list[int] | None = _option(None, INT_LIST, "tokens not generated first", optional=True)
    forced_bos_token_id: int | None = _option(None, INT, "token forced as the first new token", optional=True)
    forced_eos_token_id: int | list[int] | None = _option(None, INT_OR_INT_LIST, "token(s) forced at max_length", True)
    exponential_decay_length_penalty: tuple[int, float] | None = _option(
        None, DECAY, "[start_index, decay_factor]: boost eos after start_index new tokens", optional=True
    )
    num_beams: int = _option(1, INT, "beam search width (1 = no beam search)")
    num_beam_groups: int = _option(1, INT, "diverse beam search groups")
    diversity_penalty: float = _option(0.0, FLOAT, "diverse beam search penalty")
    length_penalty: float = _option(1.0, FLOAT, "beam score = logprob sum / length ** length_penalty")
    early_stopping: bool | str = _option(False, EARLY_STOPPING, "beam search stop rule: true, false or never")
    num_return_sequences: int = _option(1, INT, "sequences returned per prompt")
    bos_token_id: int | None = _option(None, INT, "beginning-of-sequence token id", optional=True)
    eos_token_id: list[int] | None = _option(None, INT_OR_INT_LIST, "end-of-sequence token id(s)", optional=True)
    pad_token_id: int | None = _option(None, INT, "id written after a sequence ends (default: first eos)", True)
    stop_strings: list[str] | None = _option(None, STR_LIST, "strings that end a sequence", optional=True)
    seed: int | None = _option(None, INT, "sampling seed (unset: random)", optional=True)


OPTION_FIELDS: dict[str, dict] = {f.name: dict(f.metadata, default=f.default) for f in fields(GenerationOptions)}


# ---- reading a checkpoint's defaults ------------------------------------------------------------------------------


def load_generation_defaults(checkpoint_dir) -> dict:
    """The options Transformers would take as the model's generation_config, as a dict of the set values.

    generation_config.json when present (GenerationConfig.from_pretrained), else the generation keys of config.json
    (GenerationConfig.from_model_config: its non-null top-level values, then those of a decoder/text sub-config for
    keys still unset). Keys distllama does not support (use_cache, output_*, ...) are left out; eos is a list.
    """
    source = generation_defaults_file(checkpoint_dir)
    if source.name == "generation_config.json":
        values = {k: v for k, v in _read_json(source).items() if v is not None}
    else:
        model_config = _read_json(source)
        values = {k: v for k, v in model_config.items() if v is not None}
        for sub_name in ("decoder", "generator", "text_config"):
            if isinstance(model_config.get(sub_name), dict):
                sub_values = {k: v for k, v in model_config[sub_name].items() if v is not None}
                values = {**sub_values, **values}
                break
    defaults = {name: value for name, value in values.items() if name in OPTION_FIELDS}
    if isinstance(defaults.get("eos_token_id"), int):
        defaults["eos_token_id"] = [defaults["eos_token_id"]]
    return defaults


def generation_defaults_file(checkpoint_dir) -> Path:
    """Where a checkpoint's generation defaults come from: generation_config.json, else config.json."""
    generation_file = Path(checkpoint_dir) / "generation_config.json"
    return generation_file if generation_file.is_file() else Path(checkpoint_dir) / "config.json"


def _read_json(path: Path) -> dict:
    try:
        values = json.loads(path.read_bytes())
    except OSError as e:
        raise OptionError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise OptionError(f"{path} is not valid JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(values, dict):
        raise OptionError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values


# ---- merging and validation ---------------------------------------------------------------------------------------


def resolve_options(defaults: dict, yaml_values: dict, cli_values: dict, yaml_file: str | None = None,
                    defaults_file: str | None = None, vocab_size: int | None = None) -> GenerationOptions:
    """Checkpoint defaults, then the YAML file, then the command line (later wins); parsed and validated.

    An error names where the offending value came from: the flag (--top-p), the YAML key and file, or the
    checkpoint's defaults file. What Transformers' GenerationConfig.validate only warns about (sampling options
    without do_sample, beam options without beams) is one warning line, for options the user set. With vocab_size,
    token ids Transformers' processors would index the scores with must lie inside the vocabulary."""
    merged, origin = {}, {}
    sources = [(defaults, lambda n: f"{defaults_file or 'the checkpoint generation defaults'}: {n}"),
               (yaml_values, lambda n: f"{yaml_file or 'YAML'}: key {n}"),
               (cli_values, lambda n: "--" + n.replace("_", "-"))]
    for values, where in sources:
        for name, value in (values or {}).items():
            if name not in OPTION_FIELDS:
                raise OptionError(f"{where(name)}: unknown generation option {name!r}")
            merged[name], origin[name] = value, where(name)
    parsed = {}
    for name, value in merged.items():
        try:
            parsed[name] = parse_option(name, value)
        except ValueError as e:
            raise OptionError(f"{origin[name]}: {e}", name) from None
    options = GenerationOptions(**parsed)
    try:
        validate_options(options, vocab_size)
    except OptionError as e:
        given = [origin[name] for name in e.names if name in origin]
        raise OptionError(f"{', '.join(given)}: {e}" if given else str(e), *e.names) from None
    user_set = set(yaml_values or {}) | set(cli_values or {})
    ignored = ignored_options(options, user_set)
    if ignored:
        log.warning("generation options that have no effect here, as Transformers warns: %s",
                    "; ".join(f"{origin[name]} ({why})" for name, why in ignored.items()))
    return options


def parse_option(name: str, value):
    """One option's value in its canonical type; accepts JSON text for lists (as the CLI passes them)."""
    spec = OPTION_FIELDS[name]
    kind = spec["kind"]
    if value is None:
        if not spec["optional"]:
            raise ValueError(f"option {name} cannot be null")
        return None
    if isinstance(value, str) and kind in (INT_LIST, INT_OR_INT_LIST, INT_LIST_LIST, DECAY):
        value = _json(name, value)
    if isinstance(value, str) and kind == STR_LIST and value.lstrip().startswith("["):
        value = _json(name, value)

    if kind == INT:
        return _int(name, value)
    if kind == FLOAT:
        return _float(name, value)
    if kind == BOOL:
        return _bool(name, value)
    if kind == EARLY_STOPPING:
        if isinstance(value, str) and value.strip().lower() == "never":
            return "never"
        return _bool(name, value)
    if kind == INT_LIST:
        return [_int(name, v) for v in _list(name, value)]
    if kind == INT_OR_INT_LIST:
        if isinstance(value, (list, tuple)):
            return [_int(name, v) for v in value]
        token = _int(name, value)
        return [token] if name == "eos_token_id" else token
    if kind == INT_LIST_LIST:
        return [[_int(name, v) for v in _list(name, inner)] for inner in _list(name, value)]
    if kind == STR_LIST:
        if isinstance(value, str):
            return [value]
        items = _list(name, value)
        if not all(isinstance(v, str) for v in items):
            raise ValueError(f"option {name} must be a list of strings, got {value!r}")
        return items
    if kind == DECAY:
        items = _list(name, value)
        if len(items) != 2:
            raise ValueError(f"option {name} must be [start_index, decay_factor], got {value!r}")
        return (_int(name, items[0]), _float(name, items[1]))
    raise AssertionError(kind)


def _json(name, text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"option {name} must be JSON, got {text!r}") from None


def _list(name, value) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"option {name} must be a list, got {value!r}")
    return list(value)


def _int(name, value) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"option {name} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"option {name} must be an integer, got {value!r}")
    if not -(2**63) <= value < 2**63:  # token ids, lengths and seeds all end up in int64 tensors
        raise ValueError(f"option {name} must fit in 64 bits, got {value}")
    return value


def _float(name, value) -> float:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise ValueError(f"option {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"option {name} must be a number, got {value!r}")
    return float(value)


def _bool(name, value) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"option {name} must be true or false, got {value!r}")
    return value


def validate_options(options: GenerationOptions, vocab_size: int | None = None) -> None:
    """HF's GenerationConfig.validate and its processors' argument checks, plus range checks of our own.
    Raises OptionError naming the options involved."""
    o = options

    def require(ok: bool, message: str, *names: str):
        if not ok:
            raise OptionError(message, *(names or (message.split()[0],)))  # default: the option the message opens with

    # lengths
    require(o.max_length is None or o.max_length > 0, f"max_length must be > 0, got {o.max_length}")
    require(o.max_new_tokens is None or o.max_new_tokens > 0, f"max_new_tokens must be > 0, got {o.max_new_tokens}")
    require(o.min_length >= 0, f"min_length must be >= 0, got {o.min_length}")
    require(o.min_new_tokens is None or o.min_new_tokens >= 0, f"min_new_tokens must be >= 0, got {o.min_new_tokens}")
    # sampling
    require(o.temperature >= 0, f"temperature must be >= 0, got {o.temperature}")
    require(
        not (o.do_sample and o.temperature == 0),
        "temperature must be > 0 when do_sample is set (for greedy decoding unset do_sample)",
        "temperature", "do_sample",
    )
    require(o.top_k is None or o.top_k >= 0, f"top_k must be >= 0, got {o.top_k}")
    require(0 <= o.top_p <= 1, f"top_p must be in [0, 1], got {o.top_p}")
    require(o.min_p is None or 0 <= o.min_p <= 1, f"min_p must be in [0, 1], got {o.min_p}")
    require(0 < o.typical_p <= 1, f"typical_p must be in (0, 1], got {o.typical_p}")
    require(0 <= o.epsilon_cutoff < 1, f"epsilon_cutoff must be in [0, 1), got {o.epsilon_cutoff}")
    require(0 <= o.eta_cutoff < 1, f"eta_cutoff must be in [0, 1), got {o.eta_cutoff}")
    # logits processors
    require(o.repetition_penalty > 0, f"repetition_penalty must be > 0, got {o.repetition_penalty}")
    require(o.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size must be >= 0, got {o.no_repeat_ngram_size}")
    if o.bad_words_ids is not None:
        require(len(o.bad_words_ids) > 0, "bad_words_ids must be a non-empty list of token id lists")
        require(all(len(word) > 0 for word in o.bad_words_ids), "bad_words_ids must not hold an empty list")
        require(all(t >= 0 for word in o.bad_words_ids for t in word), "bad_words_ids must hold token ids >= 0")
    for name in ("suppress_tokens", "begin_suppress_tokens", "eos_token_id"):
        ids = getattr(o, name)
        require(ids is None or all(t >= 0 for t in ids), f"{name} must hold token ids >= 0, got {ids}", name)
    for name in ("forced_bos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(o, name)
        require(value is None or value >= 0, f"{name} must be >= 0, got {value}", name)
    forced_eos = [o.forced_eos_token_id] if isinstance(o.forced_eos_token_id, int) else (o.forced_eos_token_id or [])
    require(all(t >= 0 for t in forced_eos), f"forced_eos_token_id must hold token ids >= 0, got {forced_eos}")
    if o.suppress_tokens is not None:
        # HF: forcing a token that is also suppressed leaves only -inf logits (nan probabilities)
        for name, forced in (("forced_bos_token_id", o.forced_bos_token_id), ("forced_eos_token_id", forced_eos)):
            forced_set = {forced} if isinstance(forced, int) else set(forced or [])
            require(not forced_set or not forced_set <= set(o.suppress_tokens), f"every {name} is in suppress_tokens",
                    name, "suppress_tokens")
    if o.exponential_decay_length_penalty is not None:
        require(o.exponential_decay_length_penalty[0] >= 0, "exponential_decay_length_penalty start must be >= 0")
    if o.stop_strings is not None:
        require(len(o.stop_strings) > 0 and all(o.stop_strings), "stop_strings must be non-empty strings")
    if vocab_size is not None:
        # Ids Transformers' processors index the scores with (it fails there, or refuses bad_words_ids); others,
        # like an eos id outside the vocabulary, are fine: it is never generated.
        def outside(ids):
            return [t for t in ids if t >= vocab_size]
        within = f"the vocabulary (0..{vocab_size - 1})"
        require(not outside(forced_eos), f"forced_eos_token_id {outside(forced_eos)} is outside {within}")
        bad_word_ids = [t for word in o.bad_words_ids or [] for t in word]
        require(not outside(bad_word_ids), f"bad_words_ids {outside(bad_word_ids)} are outside {within}")
        if o.exponential_decay_length_penalty is not None:
            require(not outside(o.eos_token_id or []), f"exponential_decay_length_penalty boosts eos_token_id "
                    f"{outside(o.eos_token_id)}, which is outside {within}", "exponential_decay_length_penalty",
                    "eos_token_id")
    # beams and returned sequences
    require(o.num_beams >= 1, f"num_beams must be >= 1, got {o.num_beams}")
    require(o.num_beam_groups >= 1, f"num_beam_groups must be >= 1, got {o.num_beam_groups}")
    require(
        o.num_beams % o.num_beam_groups == 0,
        f"num_beams ({o.num_beams}) must be divisible by num_beam_groups ({o.num_beam_groups})",
        "num_beams", "num_beam_groups",
    )
    require(o.num_beam_groups == 1 or not o.do_sample, "num_beam_groups > 1 (diverse beam search) cannot sample",
            "num_beam_groups", "do_sample")
    # Transformers 5 moved group beam search out of its core (to a Hub repo): there is no behaviour to match.
    require(o.num_beam_groups == 1, "num_beam_groups > 1 (group / diverse beam search) is not supported: "
                                    "Transformers 5 moved it out of its core")
    require(o.diversity_penalty >= 0, f"diversity_penalty must be >= 0, got {o.diversity_penalty}")
    require(o.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {o.num_return_sequences}")
    if o.num_beams == 1:
        require(
            o.num_return_sequences == 1 or o.do_sample,
            f"num_return_sequences ({o.num_return_sequences}) > 1 needs do_sample or num_beams > 1",
            "num_return_sequences", "do_sample", "num_beams",
        )
    else:
        require(
            o.num_return_sequences <= o.num_beams,
            f"num_return_sequences ({o.num_return_sequences}) must be <= num_beams ({o.num_beams})",
            "num_return_sequences", "num_beams",
        )


# Options GenerationConfig.validate calls "minor issues" (a warning, never an error) when their mode is off.
_SAMPLING_ONLY = {"temperature": 1.0, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "top_k": 50,
                  "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
_BEAM_ONLY = {"early_stopping": False, "length_penalty": 1.0}


def ignored_options(options: GenerationOptions, user_set: set[str]) -> dict[str, str]:
    """name -> why it has no effect, as GenerationConfig.validate's minor issues: sampling options without do_sample,
    beam options without num_beams > 1. Like Transformers (_should_warn), an option the checkpoint set is not
    reported when the user set the mode (e.g. --no-do-sample over a generation_config.json temperature)."""
    def should_warn(mode: str, name: str) -> bool:
        return not (mode in user_set and name not in user_set)

    ignored = {}
    if not options.do_sample:
        for name, neutral in _SAMPLING_ONLY.items():
            if getattr(options, name) not in (neutral, None) and should_warn("do_sample", name):
                ignored[name] = "only used with do_sample"
    if options.num_beams == 1:
        for name, neutral in _BEAM_ONLY.items():
            if getattr(options, name) not in (neutral, None) and should_warn("num_beams", name):
                ignored[name] = "only used with num_beams > 1"
    return ignored


# ---- lengths as HF's generate resolves them ------------------------------------------------------------------------


def resolve_lengths(options: GenerationOptions, input_length: int, max_position_embeddings: int | None = None):
    """Options with max_length / min_length as totals, as HF's generate sets them (_prepare_generated_length).

    max_new_tokens wins over max_length; an unset max_length is 20 new tokens capped at max_position_embeddings;
    min_new_tokens wins over min_length. Idempotent. Raises when the prompt already fills max_length (as HF does).
    """
    if options.max_new_tokens is not None:
        max_length = options.max_new_tokens + input_length
    elif options.max_length is None:
        max_length = 20 + input_length
        if max_position_embeddings is not None:
            max_length = min(max_length, max_position_embeddings)
    else:
        max_length = options.max_length
    min_length = options.min_length
    if options.min_new_tokens is not None:
        min_length = options.min_new_tokens + input_length
    if input_length >= max_length:
        raise ValueError(
            f"prompt length {input_length} already reaches max_length {max_length}: set max_new_tokens instead"
        )
    return replace(options, max_length=max_length, min_length=min_length)


# ---- command line ------------------------------------------------------------------------------------------------


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One `--name-with-dashes` flag per option; unset flags stay out of the namespace (see option_values).

    Boolean options work bare (`--do-sample`, `--early-stopping`: true), with a value (`--do-sample false`,
    `--early-stopping never`) and negated (`--no-do-sample`); resolve_options checks the value."""
    for name, spec in OPTION_FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if spec["kind"] in (BOOL, EARLY_STOPPING):
            values = "true|false" + ("|never" if spec["kind"] == EARLY_STOPPING else "")
            parser.add_argument(flag, nargs="?", const=True, default=argparse.SUPPRESS, metavar=values,
                                help=f"{spec['help']} (alone: true)")
            parser.add_argument("--no-" + flag[2:], dest=name, action="store_const", const=False,
                                default=argparse.SUPPRESS, help=f"same as {flag} false")
        else:
            value_type = {INT: int, FLOAT: float}.get(spec["kind"], str)  # lists arrive as JSON text
            parser.add_argument(flag, type=value_type, default=argparse.SUPPRESS, help=spec["help"])


def option_values(namespace: argparse.Namespace) -> dict:
    """The generation options given on the command line, as a dict for resolve_options."""
    return {name: value for name, value in vars(namespace).items() if name in OPTION_FIELDS}
