"""OpenAI batch files: request lines in, response lines out, as OpenAI's Batch API and `vllm run-batch` write them.

Owns reading one request line (`{"custom_id", "method": "POST", "url", "body"}`) into a `BatchRequest`, mapping its
body onto distllama's generation options, and writing the matching output line. No model code: the caller
tokenizes (`prompt_ids`), generates with `request_options(run_options, request)`, and writes `response_line(...)`.

Reading
  `is_batch_line(obj)`               a JSON line that is meant as a batch line (has custom_id, method, url or body)
  `parse_batch_lines(entries, file)` every non-blank line of a --prompts-file: None for a plain {"prompt"} /
                                     {"input_ids"} file, else one BatchRequest per line; a file mixing the two kinds,
                                     or repeating a custom_id, is refused
  `parse_batch_line(obj, where)`     one line; every problem raises ValueError("FILE line N: body.field ...")
Running
  `request_options(base, request)`   the run's GenerationOptions with the line's fields on top, validated
  `prompt_ids(request, tokenizer, vocab_size)`  chat: the checkpoint's chat template with add_generation_prompt;
                                     completions: the text encoded with special tokens (as vLLM), or the ids as given
Writing
  `response_line(request, choices, prompt_tokens=, model=, stop_strings=)`  one output line (`Choice` per sequence)
  `error_line(request_or_custom_id, message, status_code=400)`             a failed request's output line

Endpoints: /v1/chat/completions (body.messages) and /v1/completions (body.prompt: one text or one list of token ids;
several prompts in one line are refused, write one line each). The method must be POST.

Body fields, and what they become (OpenAI's names first, then vLLM's extras):
  max_tokens, max_completion_tokens (chat)  -> max_new_tokens (both given: they must agree)
  temperature     -> decides do_sample: below 1e-5 greedy (vLLM's threshold), else sampling at that temperature
  top_p, top_k (-1 = off, as vLLM), min_p, repetition_penalty, seed, min_tokens -> min_new_tokens
  stop            -> stop_strings (a string or a list of strings; [] or null: none)
  n               -> num_return_sequences (n > 1 needs sampling, or beams from the run)
  model           -> recorded only: one model runs, any name is accepted and the response names the model that ran
                     (vLLM also writes its served name, but refuses unknown names; batch files written for OpenAI
                     name OpenAI models, so refusing would force editing every line)
  Fields the line does not give keep the run's value (command line > YAML > the checkpoint's generation_config.json),
  the way vLLM's server defaults come from generation_config.json. Two consequences a vLLM user should know:
  a line without temperature, top_p, top_k, min_p, seed or n > 1 decodes as the run does (greedy unless --do-sample
  or the checkpoint says do_sample), where vLLM would sample at temperature 1; and sampling keeps Transformers'
  top_k = 50 unless the run or the line sets top_k (0 = off), where vLLM's default is off. A line that gives any of
  top_p / top_k / min_p / seed / n > 1 but no temperature samples at the run's temperature, as vLLM would.
  A line without max_tokens gets the run's length (--max-new-tokens, else the checkpoint's max_length, else
  Transformers' 20 new tokens), not vLLM's "up to the context length"; finish_reason "length" says when it cut.
Accepted only at their default (anything else would change the output in a way distllama cannot produce, so it is
refused, naming the field): stream, stream_options, logprobs, top_logprobs, echo, suffix, best_of,
presence_penalty, frequency_penalty, logit_bias, tools, tool_choice, functions, function_call, response_format
({"type": "text"} allowed), audio, modalities (["text"] allowed), prediction, reasoning_effort, web_search_options,
and vLLM's use_beam_search, ignore_eos, skip_special_tokens, spaces_between_special_tokens,
include_stop_str_in_output, add_generation_prompt, continue_final_message, add_special_tokens, chat_template,
chat_template_kwargs, documents, stop_token_ids, bad_words, allowed_token_ids, prompt_logprobs, structured_outputs,
guided_*, truncate_prompt_tokens, length_penalty, return_tokens_as_token_ids, return_token_ids.
Ignored (they cannot change the generated text): user, metadata, store, service_tier, parallel_tool_calls, priority,
request_id, cache_salt, safety_identifier, prompt_cache_key. Any other body key is an error (vLLM logs and drops
unknown keys; a misspelt "temprature" silently changing nothing is worse than a refusal). A null value means absent.

Messages: a list of {"role", "content", ...} dicts passed to the chat template as given, except that content given
as a list of text parts ([{"type": "text", "text": ...}]) is joined with "\n" into one string, as vLLM does for
templates that expect string content (the Llama family); image / audio parts are refused. content may be null only
for an assistant turn (a tool-call turn).

Output lines follow OpenAI's batch output schema (vLLM writes the same keys):
  {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": <chat.completion | text_completion>},
   "error": null}
  body: {"id", "object", "created", "model", "choices": [{"index", "message": {"role": "assistant", "content",
  "refusal": null} | "text", "logprobs": null, "finish_reason": "stop" | "length", "stop_reason"}], "usage":
  {"prompt_tokens", "completion_tokens", "total_tokens"}, "system_fingerprint": null}
  As OpenAI and vLLM do, a stop string ends the text before it (finish_reason "stop", and vLLM's stop_reason holds
  the string; an eos token gives stop_reason null). Ids are derived from the custom_id, not random, so a resumed run
  writes the same lines as an uninterrupted one (only "created" differs).
  A failed request: {"id", "custom_id", "response": {"status_code": 400, "request_id", "body": null},
  "error": {"code", "message"}} (vLLM's layout, with the error as OpenAI's {code, message} object).
"""

import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from http import HTTPStatus

from distllama.options import GenerationOptions, parse_option, validate_options
from distllama.tokenizer import NO_CHAT_TEMPLATE, TokenizerError

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
LINE_KEYS = ("custom_id", "method", "url", "body")
GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it means greedy

# body field -> the distllama option it sets (temperature, stop and n are mapped by hand)
OPTION_OF_FIELD = {
    "max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
    "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "seed": "seed", "min_tokens": "min_new_tokens", "stop": "stop_strings", "n": "num_return_sequences",
}
# fields that only matter when sampling: a line giving one without a temperature samples (vLLM always would)
SAMPLING_FIELDS = ("top_p", "top_k", "min_p", "seed")
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "priority", "request_id",
                     "cache_salt", "safety_identifier", "prompt_cache_key"})
# field -> the values that leave the output as the default does (null is always allowed: it means absent)
ONLY_DEFAULT = {
    "stream": [False], "stream_options": [], "logprobs": [False], "top_logprobs": [0], "echo": [False],
    "presence_penalty": [0, 0.0], "frequency_penalty": [0, 0.0], "logit_bias": [{}], "tools": [[]],
    "tool_choice": ["none", "auto"], "functions": [[]], "function_call": ["none", "auto"],
    "response_format": [{"type": "text"}], "audio": [], "modalities": [["text"]], "prediction": [],
    "reasoning_effort": [], "web_search_options": [], "use_beam_search": [False], "ignore_eos": [False],
    "skip_special_tokens": [True], "spaces_between_special_tokens": [True], "include_stop_str_in_output": [False],
    "add_generation_prompt": [True], "continue_final_message": [False], "add_special_tokens": [False],
    "chat_template": [],
    "chat_template_kwargs": [{}], "documents": [], "stop_token_ids": [[]], "bad_words": [[]],
    "allowed_token_ids": [], "prompt_logprobs": [], "structured_outputs": [], "guided_json": [], "guided_regex": [],
    "guided_choice": [], "guided_grammar": [], "guided_decoding_backend": [], "truncate_prompt_tokens": [],
    "length_penalty": [1, 1.0], "return_tokens_as_token_ids": [False], "return_token_ids": [False],
    "suffix": [""], "best_of": [1],
}
# fields of one endpoint only (OpenAI's and vLLM's request schemas)
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
             "function_call", "audio", "modalities", "prediction", "reasoning_effort", "web_search_options",
             "add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs", "documents"}
COMPLETIONS_ONLY = {"prompt", "suffix", "best_of"}
# completions' logprobs is a count: any value (0 included) asks for logprobs; its prompt gets special tokens
COMPLETIONS_ONLY_DEFAULT = {**ONLY_DEFAULT, "logprobs": [], "add_special_tokens": [True]}
WHY_REFUSED = {
    "stream": "streaming does not apply to a batch file",
    "logprobs": "logprobs are not written in batch responses (--output's token_logprobs has them)",
    "top_logprobs": "logprobs are not written in batch responses (--output's token_logprobs has them)",
    "tools": "tool calling is not supported", "tool_choice": "tool calling is not supported",
    "functions": "tool calling is not supported", "function_call": "tool calling is not supported",
    "response_format": "structured output is not supported",
    "presence_penalty": "Transformers has no presence penalty (repetition_penalty is its penalty)",
    "frequency_penalty": "Transformers has no frequency penalty (repetition_penalty is its penalty)",
}


@dataclass
class BatchRequest:
    """One request line. options holds GenerationOptions names (e.g. {"max_new_tokens": 64, "do_sample": True,
    "temperature": 0.7}); only the fields the line gave are there."""

    custom_id: str
    endpoint: str  # CHAT or COMPLETIONS
    messages: list[dict] | None  # chat: turns for the chat template, content as strings
    prompt: str | list[int] | None  # completions: text, or token ids
    options: dict
    model: str | None  # as the line names it (not checked)
    where: str  # "FILE line N", for errors found later

    @property
    def is_chat(self) -> bool:
        return self.endpoint == CHAT


@dataclass
class Choice:
    """One generated sequence, in distllama's terms."""

    text: str  # tokenizer.decode(output_ids), special tokens skipped
    output_ids: list[int]  # generated ids, through the eos token
    finish_reason: str  # "eos" (eos token or stop string) | "length"


# ---- reading ------------------------------------------------------------------------------------------------------


def is_batch_line(obj) -> bool:
    """Whether a decoded JSON line is meant as an OpenAI batch line (any of custom_id, method, url, body)."""
    return isinstance(obj, dict) and any(key in obj for key in LINE_KEYS)


def parse_batch_lines(entries: Iterable[tuple[int, object]], filename: str) -> list[BatchRequest] | None:
    """entries: (line number, decoded JSON) of each non-blank line. None when no line is a batch line."""
    entries = list(entries)
    batch = [n for n, obj in entries if is_batch_line(obj)]
    if not batch:
        return None
    if len(batch) != len(entries):
        plain = next(n for n, obj in entries if not is_batch_line(obj))
        raise ValueError(f"{filename} line {plain}: not an OpenAI batch line (custom_id, method, url, body), but "
                         f"line {batch[0]} is; a prompts file holds batch lines or plain prompt lines, not both")
    requests, first_line_of = [], {}
    for n, obj in entries:
        request = parse_batch_line(obj, f"{filename} line {n}")
        if request.custom_id in first_line_of:
            raise ValueError(f"{request.where}: custom_id {request.custom_id!r} repeats line "
                             f"{first_line_of[request.custom_id]}; each request needs its own")
        first_line_of[request.custom_id] = n
        requests.append(request)
    return requests


def parse_batch_line(obj, where: str) -> BatchRequest:
    """One batch line -> BatchRequest; ValueError(f"{where}: ...") naming the key or body field at fault."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a batch line must be a JSON object")
    unknown = [key for key in obj if key not in LINE_KEYS]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (a batch line holds custom_id, method, url, body)")
    missing = [key for key in LINE_KEYS if key not in obj]
    if missing:
        raise ValueError(f"{where}: missing {missing[0]!r} (a batch line holds custom_id, method, url, body)")
    custom_id, method, url, body = (obj[key] for key in LINE_KEYS)
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError(f"{where}: custom_id must be a non-empty string, got {custom_id!r}")
    if method != "POST":
        raise ValueError(f"{where}: method must be \"POST\", got {method!r}")
    if url not in (CHAT, COMPLETIONS):
        raise ValueError(f"{where}: url {url!r} is not served; distllama serves {CHAT} and {COMPLETIONS}")
    if not isinstance(body, dict):
        raise ValueError(f"{where}: body must be a JSON object")

    chat = url == CHAT
    given = {key: value for key, value in body.items() if value is not None}  # null means absent, as in vLLM
    _check_fields(given, chat, where)
    model = given.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{where}: body.model must be a string, got {model!r}")
    messages = _messages(body.get("messages"), where) if chat else None
    prompt = None if chat else _prompt(body.get("prompt"), where)
    options = _options(given, where)
    return BatchRequest(custom_id, url, messages, prompt, options, model, where)


def _check_fields(given: dict, chat: bool, where: str) -> None:
    """Unknown fields, the other endpoint's fields, and non-default values of unsupported fields."""
    endpoint, other = (CHAT, COMPLETIONS) if chat else (COMPLETIONS, CHAT)
    wrong_side = COMPLETIONS_ONLY if chat else CHAT_ONLY
    known = {"model", *OPTION_OF_FIELD, *IGNORED, *ONLY_DEFAULT, *CHAT_ONLY, *COMPLETIONS_ONLY}
    only_default = ONLY_DEFAULT if chat else COMPLETIONS_ONLY_DEFAULT
    for field, value in given.items():
        if field not in known:
            raise ValueError(f"{where}: unknown field body.{field}")
        if field in wrong_side:
            raise ValueError(f"{where}: body.{field} belongs to {other}, but this line's url is {endpoint}")
        if field in only_default and not any(_same(value, default) for default in only_default[field]):
            why = WHY_REFUSED.get(field, "distllama does not support it")
            allowed = " or ".join(json.dumps(default) for default in [*only_default[field], None])
            raise ValueError(f"{where}: body.{field} = {json.dumps(value)} is refused: {why} (allowed: {allowed})")


def _same(value, default) -> bool:
    """Equal and of the same JSON type (so 0 is not False and logprobs: 0 is not logprobs: false)."""
    number = (int, float)
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, number) and isinstance(default, number):
        return value == default
    return type(value) is type(default) and value == default


def _messages(messages, where: str) -> list[dict]:
    if messages is None:
        raise ValueError(f"{where}: body.messages is required for {CHAT}")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: body.messages must be a non-empty list of messages")
    turns = []
    for i, message in enumerate(messages):
        at = f"{where}: body.messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{at} must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{at}.role must be a non-empty string, got {role!r}")
        content = message.get("content")
        if isinstance(content, list):
            content = _joined_text_parts(content, at)
        elif content is None and role != "assistant":
            raise ValueError(f"{at}.content is required (only an assistant turn may omit it)")
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"{at}.content must be a string or a list of text parts, got {content!r}")
        turns.append({**message, "content": content})
    return turns


def _joined_text_parts(parts: list, at: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(f"{at}.content[{j}] is not a text part ({kind!r}): only text content is supported")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{at}.content[{j}].text must be a string")
        texts.append(part["text"])
    return "\n".join(texts)  # vLLM's "string" content format


def _prompt(prompt, where: str) -> str | list[int]:
    if prompt is None:
        raise ValueError(f"{where}: body.prompt is required for {COMPLETIONS}")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # OpenAI's list form holding one prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise ValueError(f"{where}: body.prompt token ids must be >= 0")
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise ValueError(f"{where}: body.prompt holds {len(prompt)} prompts; write one request line per prompt")
    raise ValueError(f"{where}: body.prompt must be a string or a non-empty list of token ids")


def _options(given: dict, where: str) -> dict:
    """The generation options the body sets, each parsed as distllama parses its own, checked on its own."""
    fields = {field: value for field, value in given.items() if field in OPTION_OF_FIELD}
    if "max_tokens" in fields and "max_completion_tokens" in fields:
        if fields["max_tokens"] != fields["max_completion_tokens"]:
            raise ValueError(f"{where}: body.max_tokens ({fields['max_tokens']}) and body.max_completion_tokens "
                             f"({fields['max_completion_tokens']}) disagree; give one")
        del fields["max_tokens"]
    options = {}
    for field, value in fields.items():
        if field == "stop":
            value = [value] if isinstance(value, str) else value
            if value == []:
                continue  # vLLM's default: no stop strings
        if field == "top_k" and value == -1:
            value = 0  # vLLM's "off"
        try:
            options[OPTION_OF_FIELD[field]] = parse_option(OPTION_OF_FIELD[field], value)
        except ValueError as error:
            raise ValueError(f"{where}: {_in_body_terms(str(error), fields)}") from None

    if "temperature" in options:
        options["do_sample"] = options["temperature"] >= GREEDY_BELOW
        if not options["do_sample"]:
            if options["temperature"] < 0:
                raise ValueError(f"{where}: body.temperature must be >= 0, got {fields['temperature']}")
            del options["temperature"]  # greedy: no temperature to apply
    elif any(field in fields for field in SAMPLING_FIELDS) or options.get("num_return_sequences", 1) > 1:
        options["do_sample"] = True

    # The line's values on their own (ranges); combinations with the run's options are request_options' job, so
    # n > 1 is probed with as many beams here (the run may give beams to a greedy line).
    probe = {"do_sample": True, **options, "num_beams": max(1, options.get("num_return_sequences", 1))}
    try:
        validate_options(GenerationOptions(**probe))
    except ValueError as error:
        raise ValueError(f"{where}: {_in_body_terms(str(error), fields)}") from None
    return options


def _in_body_terms(message: str, fields: dict) -> str:
    """An options error message with the option names the line set replaced by their body field names."""
    message = re.sub(r"^option ", "", message)
    for field in fields:
        message = re.sub(rf"\b{OPTION_OF_FIELD[field]}\b", f"body.{field}", message)
    return message


# ---- running ------------------------------------------------------------------------------------------------------


def request_options(base: GenerationOptions, request: BatchRequest) -> GenerationOptions:
    """The run's options with the line's on top, validated together (e.g. n against the run's num_beams)."""
    options = replace(base, **request.options)
    try:
        validate_options(options)
    except ValueError as error:
        given = {field: None for field, option in OPTION_OF_FIELD.items() if option in request.options}
        given.pop("max_completion_tokens" if "max_tokens" in given else "max_tokens", None)
        raise ValueError(f"{request.where}: {_in_body_terms(str(error), given)} (this line's fields on top of the "
                         f"run's options)") from None
    return options


def prompt_ids(request: BatchRequest, tokenizer, vocab_size: int) -> list[int]:
    """The request's prompt as token ids: what vLLM feeds the model for the same line."""
    if request.is_chat or isinstance(request.prompt, str):
        if tokenizer is None:
            raise ValueError(f"{request.where}: a text prompt needs the checkpoint's tokenizer.json; "
                             f"give {COMPLETIONS} lines with token ids instead")
        try:
            if request.is_chat:
                ids = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
            else:
                ids = tokenizer.encode(request.prompt)  # with special tokens: vLLM's add_special_tokens default
        except TokenizerError as error:
            message = str(error)
            if message == NO_CHAT_TEMPLATE:
                message = f"this checkpoint has no chat template, so it cannot serve {CHAT}; use {COMPLETIONS}"
            raise ValueError(f"{request.where}: {message}") from None
    else:
        ids = request.prompt
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise ValueError(f"{request.where}: body.prompt token id {bad[0]} is outside the vocabulary "
                             f"(0..{vocab_size - 1})")
    if not ids:
        raise ValueError(f"{request.where}: the prompt is empty after tokenization")
    return ids


# ---- writing ------------------------------------------------------------------------------------------------------


def response_line(request: BatchRequest, choices: list[Choice], *, prompt_tokens: int, model: str,
                  stop_strings: list[str] | None = None, created: int | None = None) -> dict:
    """The output line of a finished request. stop_strings: those the request ran with (request_options(...)
    .stop_strings), so the text can end before the first one, as OpenAI and vLLM return it."""
    if not choices:
        raise ValueError("a response needs at least one choice")
    openai_choices = []
    for index, choice in enumerate(choices):
        text, finish_reason, stop_reason = _finished_text(choice, stop_strings or [])
        entry = {"index": index}
        if request.is_chat:
            entry["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            entry["text"] = text
        entry.update(logprobs=None, finish_reason=finish_reason, stop_reason=stop_reason)
        openai_choices.append(entry)
    completion_tokens = sum(len(choice.output_ids) for choice in choices)  # as vLLM counts n > 1
    tag = _tag(request.custom_id)
    body = {
        "id": f"chatcmpl-{tag}" if request.is_chat else f"cmpl-{tag}",
        "object": "chat.completion" if request.is_chat else "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": openai_choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": None,
    }
    return {"id": f"batch_req_{tag}", "custom_id": request.custom_id,
            "response": {"status_code": 200, "request_id": f"distllama-batch-{tag}", "body": body}, "error": None}


def _finished_text(choice: Choice, stop_strings: list[str]) -> tuple[str, str, str | None]:
    """(text, OpenAI finish_reason, vLLM stop_reason): the text ends before the first stop string it holds."""
    if choice.finish_reason not in ("eos", "length"):
        raise ValueError(f"unknown finish_reason {choice.finish_reason!r} (expected 'eos' or 'length')")
    found = [(choice.text.find(stop), stop) for stop in stop_strings if stop in choice.text]
    if found:
        start, stop = min(found)
        return choice.text[:start], "stop", stop
    return choice.text, "stop" if choice.finish_reason == "eos" else "length", None


def error_line(request_or_custom_id: BatchRequest | str, message: str, status_code: int = 400) -> dict:
    """The output line of a request that failed (e.g. a prompt longer than the context)."""
    custom_id = getattr(request_or_custom_id, "custom_id", request_or_custom_id)
    tag = _tag(custom_id)
    code = HTTPStatus(status_code).phrase.replace(" ", "")  # vLLM's error type: BadRequestError, NotFoundError
    code = code if code.endswith("Error") else code + "Error"
    return {"id": f"batch_req_{tag}", "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": f"distllama-batch-{tag}", "body": None},
            "error": {"code": code, "message": message}}


def _tag(custom_id: str) -> str:
    """A stable id part for a request: custom_ids are unique in a file, so ids are too."""
    return hashlib.sha256(custom_id.encode("utf-8")).hexdigest()[:24]
