"""distllama.batch_api: OpenAI batch request lines in, OpenAI batch response lines out.

The output schema below is written from OpenAI's Batch API reference (BatchRequestOutput: id, custom_id, response
{status_code, request_id, body}, error {code, message}) and its chat.completion / text_completion objects; the
validator is first checked against OpenAI's own documented example lines, then run on ours. Prompts are checked
against Transformers' AutoTokenizer, and the round trip generates with Transformers' LlamaForCausalLM.
"""

import json
import shutil

import pytest
from checkpoints import build_checkpoint, hf_alone
from transformers import AutoTokenizer

from distllama import generate
from distllama.batch_api import (CHAT, COMPLETIONS, BatchRequest, Choice, error_line, is_batch_line,
                                 parse_batch_line, parse_batch_lines, prompt_ids, request_options, response_line)
from distllama.options import GenerationOptions
from distllama.tokenizer import Tokenizer

WHERE = "batch.jsonl line 7"


def line(body: dict, url: str = CHAT, custom_id: str = "req-1") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


USER = [{"role": "user", "content": "Hi"}]

# ---- parsing ------------------------------------------------------------------------------------------------------


def test_chat_line_with_every_accepted_field():
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One."}]},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another.", "name": "ann"},
        ],
        "max_completion_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "repetition_penalty": 1.1, "seed": 5, "stop": ["\n\n", "END"], "n": 2, "min_tokens": 2,
        # ignored: they cannot change the text
        "user": "u-1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True,
        # accepted at their defaults
        "stream": False, "logprobs": False, "top_logprobs": 0, "presence_penalty": 0, "frequency_penalty": 0.0,
        "logit_bias": {}, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
        "modalities": ["text"], "skip_special_tokens": True, "echo": False, "stream_options": None,
    }
    request = parse_batch_line(line(body), WHERE)
    assert request == BatchRequest(
        custom_id="req-1", endpoint=CHAT, prompt=None, model="gpt-4o-mini", where=WHERE,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Name a colour.\nOne."},  # text parts joined as vLLM does
                  {"role": "assistant", "content": "Red."},
                  {"role": "user", "content": "Another.", "name": "ann"}],
        options={"max_new_tokens": 12, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                 "min_p": 0.05, "repetition_penalty": 1.1, "seed": 5, "stop_strings": ["\n\n", "END"],
                 "num_return_sequences": 2, "min_new_tokens": 2})
    assert request.is_chat
    assert body["messages"][1]["content"][0] == {"type": "text", "text": "Name a colour."}  # input left as it was


def test_completion_line_with_every_accepted_field():
    body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0, "top_p": 0.5,
            "seed": 1, "stop": "\n", "n": 1, "best_of": 1, "echo": False, "suffix": None, "logprobs": None,
            "add_special_tokens": True, "user": "x"}
    request = parse_batch_line(line(body, COMPLETIONS), WHERE)
    assert (request.endpoint, request.prompt, request.messages, request.model) == (COMPLETIONS, "Once upon a time",
                                                                                   None, "m")
    # temperature 0 is greedy: no temperature is applied, whatever else the line says
    assert request.options == {"max_new_tokens": 16, "do_sample": False, "top_p": 0.5, "seed": 1,
                               "stop_strings": ["\n"], "num_return_sequences": 1}
    assert not request.is_chat


@pytest.mark.parametrize("prompt, expected", [
    ([5, 6, 7], [5, 6, 7]),
    ([[5, 6, 7]], [5, 6, 7]),  # OpenAI's list form holding one prompt
    (["text"], "text"),
    ("", ""),
])
def test_completion_prompt_forms(prompt, expected):
    assert parse_batch_line(line({"prompt": prompt}, COMPLETIONS), WHERE).prompt == expected


@pytest.mark.parametrize("body, options", [
    ({}, {}),  # nothing given: the run decides everything
    ({"temperature": 1.0}, {"do_sample": True, "temperature": 1.0}),
    ({"temperature": 0.000001}, {"do_sample": False}),  # below vLLM's 1e-5: greedy
    ({"top_p": 0.8}, {"do_sample": True, "top_p": 0.8}),  # sampling-only fields sample, as vLLM would
    ({"top_k": -1}, {"do_sample": True, "top_k": 0}),  # vLLM's "off" is Transformers' 0
    ({"seed": 3}, {"do_sample": True, "seed": 3}),
    ({"n": 3}, {"do_sample": True, "num_return_sequences": 3}),
    ({"temperature": 0, "n": 3}, {"do_sample": False, "num_return_sequences": 3}),  # only with beams from the run
    ({"repetition_penalty": 1.2}, {"repetition_penalty": 1.2}),  # not a sampling field
    ({"stop": []}, {}),  # vLLM's default: no stop strings
    ({"max_tokens": 8, "max_completion_tokens": 8}, {"max_new_tokens": 8}),
    ({"max_tokens": "8"}, {"max_new_tokens": 8}),  # parsed as distllama parses its own options
    ({"temperature": None, "top_p": None, "stream": None, "tools": None}, {}),  # null means absent
])
def test_options_of_a_line(body, options):
    assert parse_batch_line(line({"messages": USER, **body}), WHERE).options == options


def test_messages_keep_assistant_tool_turns_as_given():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                       "function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "content": "Sunny", "tool_call_id": "c1"}]
    assert parse_batch_line(line({"messages": messages}), WHERE).messages == messages


REFUSALS = [
    # the line itself
    (["not", "an", "object"], "a batch line must be a JSON object"),
    ({**line({"messages": USER}), "extra": 1}, "unknown key 'extra'"),
    ({k: v for k, v in line({"messages": USER}).items() if k != "url"}, "missing 'url'"),
    (line({"messages": USER}, custom_id=""), "custom_id must be a non-empty string"),
    (line({"messages": USER}, custom_id=7), "custom_id must be a non-empty string"),
    ({**line({"messages": USER}), "method": "GET"}, "method must be \"POST\""),
    (line({"input": "x"}, "/v1/embeddings"), "url '/v1/embeddings' is not served"),
    ({**line({}), "body": "x"}, "body must be a JSON object"),
    # body fields
    (line({"messages": USER, "temprature": 0.5}), "unknown field body.temprature"),
    (line({"messages": USER, "stream": True}), r"body.stream = true is refused: streaming"),
    (line({"messages": USER, "logprobs": True}), "body.logprobs = true is refused"),
    (line({"messages": USER, "top_logprobs": 3}), "body.top_logprobs = 3 is refused"),
    (line({"prompt": "x", "logprobs": 0}, COMPLETIONS), "body.logprobs = 0 is refused"),
    (line({"prompt": "x", "echo": True}, COMPLETIONS), "body.echo = true is refused"),
    (line({"prompt": "x", "best_of": 2}, COMPLETIONS), "body.best_of = 2 is refused"),
    (line({"prompt": "x", "suffix": "end"}, COMPLETIONS), "body.suffix = \"end\" is refused"),
    (line({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}), "body.tools = .* tool"),
    (line({"messages": USER, "tool_choice": "required"}), "body.tool_choice = \"required\" is refused"),
    (line({"messages": USER, "response_format": {"type": "json_object"}}), "body.response_format = .* structured"),
    (line({"messages": USER, "presence_penalty": 0.5}), "body.presence_penalty = 0.5 is refused"),
    (line({"messages": USER, "frequency_penalty": 1}), "body.frequency_penalty = 1 is refused"),
    (line({"messages": USER, "logit_bias": {"5": 10}}), "body.logit_bias = .* is refused"),
    (line({"messages": USER, "stop_token_ids": [7]}), "body.stop_token_ids = \\[7\\] is refused"),
    (line({"messages": USER, "ignore_eos": True}), "body.ignore_eos = true is refused"),
    (line({"messages": USER, "chat_template": "{{ x }}"}), "body.chat_template = .* is refused"),
    (line({"messages": USER, "add_special_tokens": True}), "body.add_special_tokens = true is refused"),
    (line({"prompt": "x", "add_special_tokens": False}, COMPLETIONS), "body.add_special_tokens = false is refused"),
    (line({"messages": USER, "prompt": "x"}), f"body.prompt belongs to {COMPLETIONS}"),
    (line({"prompt": "x", "max_completion_tokens": 5}, COMPLETIONS), f"body.max_completion_tokens belongs to {CHAT}"),
    (line({"prompt": "x", "messages": USER}, COMPLETIONS), f"body.messages belongs to {CHAT}"),
    # option values, checked as distllama checks its own
    (line({"messages": USER, "max_tokens": 0}), r"body.max_tokens must be > 0, got 0"),
    (line({"messages": USER, "max_tokens": "many"}), "body.max_tokens must be an integer"),
    (line({"messages": USER, "max_tokens": 4.5}), "body.max_tokens must be an integer"),
    (line({"messages": USER, "max_tokens": 8, "max_completion_tokens": 9}), "body.max_tokens .* disagree"),
    (line({"messages": USER, "temperature": -1}), "body.temperature must be >= 0"),
    (line({"messages": USER, "temperature": "hot"}), "body.temperature must be a number"),
    (line({"messages": USER, "top_p": 1.5}), r"body.top_p must be in \[0, 1\]"),
    (line({"messages": USER, "min_p": 2}), r"body.min_p must be in \[0, 1\]"),
    (line({"messages": USER, "top_k": -2}), "body.top_k must be >= 0"),
    (line({"messages": USER, "repetition_penalty": 0}), "body.repetition_penalty must be > 0"),
    (line({"messages": USER, "seed": "x"}), "body.seed must be an integer"),
    (line({"messages": USER, "n": 0}), "body.n must be >= 1"),
    (line({"messages": USER, "stop": [1]}), "body.stop must be a list of strings"),
    (line({"messages": USER, "stop": [""]}), "body.stop must be non-empty strings"),
    (line({"messages": USER, "model": 3}), "body.model must be a string"),
    # messages
    (line({}), f"body.messages is required for {CHAT}"),
    (line({"messages": []}), "body.messages must be a non-empty list"),
    (line({"messages": ["hi"]}), r"body.messages\[0\] must be an object"),
    (line({"messages": [{"content": "hi"}]}), r"body.messages\[0\].role must be a non-empty string"),
    (line({"messages": [{"role": "user"}]}), r"body.messages\[0\].content is required"),
    (line({"messages": [{"role": "user", "content": 5}]}), r"body.messages\[0\].content must be a string"),
    (line({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
     r"body.messages\[0\].content\[0\] is not a text part \('image_url'\)"),
    # prompts
    (line({}, COMPLETIONS), f"body.prompt is required for {COMPLETIONS}"),
    (line({"prompt": ["a", "b"]}, COMPLETIONS), "body.prompt holds 2 prompts; write one request line per prompt"),
    (line({"prompt": [1, -2]}, COMPLETIONS), "body.prompt token ids must be >= 0"),
    (line({"prompt": []}, COMPLETIONS), "body.prompt must be a string or a non-empty list of token ids"),
    (line({"prompt": 5}, COMPLETIONS), "body.prompt must be a string or a non-empty list of token ids"),
]


@pytest.mark.parametrize("obj, message", REFUSALS)
def test_refusals_name_the_line_and_field(obj, message):
    with pytest.raises(ValueError, match=f"^{WHERE}: {message}") as caught:
        parse_batch_line(obj, WHERE)
    assert "\n" not in str(caught.value)  # one line on stderr


def test_is_batch_line():
    assert is_batch_line(line({"messages": USER}))
    assert is_batch_line({"custom_id": "a"})  # a broken batch line still gets batch-line errors
    assert not is_batch_line({"prompt": "x"})
    assert not is_batch_line({"input_ids": [1, 2]})
    assert not is_batch_line(["custom_id"])


def test_parse_batch_lines():
    plain = [(1, {"prompt": "a"}), (3, {"input_ids": [1]})]
    assert parse_batch_lines(plain, "p.jsonl") is None
    batch = [(1, line({"messages": USER}, custom_id="a")), (2, line({"prompt": "x"}, COMPLETIONS, custom_id="b"))]
    requests = parse_batch_lines(batch, "p.jsonl")
    assert [(r.custom_id, r.endpoint, r.where) for r in requests] == [("a", CHAT, "p.jsonl line 1"),
                                                                       ("b", COMPLETIONS, "p.jsonl line 2")]
    with pytest.raises(ValueError, match=r"^p.jsonl line 4: not an OpenAI batch line .* but line 1 is"):
        parse_batch_lines([*batch, (4, {"prompt": "a"})], "p.jsonl")
    with pytest.raises(ValueError, match=r"^p.jsonl line 2: not an OpenAI batch line .* but line 5 is"):
        parse_batch_lines([(2, {"prompt": "a"}), (5, line({"messages": USER}))], "p.jsonl")
    with pytest.raises(ValueError, match=r"^p.jsonl line 9: custom_id 'a' repeats line 1"):
        parse_batch_lines([*batch, (9, line({"messages": USER}, custom_id="a"))], "p.jsonl")


# ---- the line's options on top of the run's -------------------------------------------------------------------------


def test_request_options_keep_the_run_values_a_line_does_not_give():
    base = GenerationOptions(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=32, seed=1)
    merged = request_options(base, parse_batch_line(line({"messages": USER, "max_tokens": 4}), WHERE))
    assert merged == GenerationOptions(do_sample=True, temperature=0.6, top_p=0.9, max_new_tokens=4, seed=1)
    greedy = request_options(base, parse_batch_line(line({"messages": USER, "temperature": 0}), WHERE))
    assert greedy.do_sample is False and greedy.max_new_tokens == 32
    sampled = request_options(GenerationOptions(), parse_batch_line(line({"messages": USER, "top_p": 0.5}), WHERE))
    assert (sampled.do_sample, sampled.temperature, sampled.top_p) == (True, 1.0, 0.5)


def test_request_options_check_the_line_against_the_run():
    greedy_n = parse_batch_line(line({"messages": USER, "temperature": 0, "n": 3}), WHERE)
    with pytest.raises(ValueError, match=rf"^{WHERE}: body.n \(3\) > 1 needs do_sample .* run's options\)$"):
        request_options(GenerationOptions(), greedy_n)
    beams = request_options(GenerationOptions(num_beams=4), greedy_n)  # n best beams, as Transformers returns
    assert (beams.num_beams, beams.num_return_sequences, beams.do_sample) == (4, 3, False)
    with pytest.raises(ValueError, match=rf"^{WHERE}: body.n \(5\) must be <= num_beams \(4\)"):
        request_options(GenerationOptions(num_beams=4), parse_batch_line(line({"messages": USER, "n": 5}), WHERE))


# ---- response lines -------------------------------------------------------------------------------------------------

STR, INT, NULL = str, int, type(None)
MESSAGE = {"role": STR, "content": (STR, NULL), "refusal": (STR, NULL)}
CHAT_CHOICE = {"index": INT, "message": MESSAGE, "logprobs": (dict, NULL), "finish_reason": STR}
TEXT_CHOICE = {"index": INT, "text": STR, "logprobs": (dict, NULL), "finish_reason": STR}
USAGE = {"prompt_tokens": INT, "completion_tokens": INT, "total_tokens": INT}
BODY = {"id": STR, "object": STR, "created": INT, "model": STR, "choices": list, "usage": USAGE,
        "system_fingerprint": (STR, NULL)}
OUTPUT_LINE = {"id": STR, "custom_id": STR, "response": {"status_code": INT, "request_id": STR, "body": dict},
               "error": NULL}
ERROR_LINE = {"id": STR, "custom_id": STR, "response": {"status_code": INT, "request_id": STR, "body": NULL},
              "error": {"code": STR, "message": STR}}
OPTIONAL = {"refusal", "system_fingerprint"}  # OpenAI's examples leave these out at times


def check_shape(value, shape, path="line"):
    """value has every key of shape (OPTIONAL ones may be missing), each of the given type or nested shape."""
    if isinstance(shape, dict):
        assert isinstance(value, dict), path
        for key, inner in shape.items():
            assert key in value or key in OPTIONAL, f"{path}.{key} missing"
            if key in value:
                check_shape(value[key], inner, f"{path}.{key}")
    else:
        assert isinstance(value, shape) and not isinstance(value, bool), f"{path}: {value!r} is not {shape}"


def check_output_line(out: dict):
    """A successful line as OpenAI's Batch API writes it (the docs' schema; extra keys such as vLLM's allowed)."""
    json.loads(json.dumps(out))  # plain JSON
    check_shape(out, OUTPUT_LINE)
    body = out["response"]["body"]
    check_shape(body, BODY)
    assert out["response"]["status_code"] == 200
    chat = body["object"] == "chat.completion"
    assert body["object"] in ("chat.completion", "text_completion")
    assert body["choices"]
    for index, choice in enumerate(body["choices"]):
        check_shape(choice, CHAT_CHOICE if chat else TEXT_CHOICE, f"choices[{index}]")
        assert choice["index"] == index
        assert choice["finish_reason"] in ("stop", "length")
        if chat:
            assert choice["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# OpenAI's documented examples (Batch API guide; legacy completions object inside a batch line)
OPENAI_CHAT_EXAMPLE = (
    '{"id": "batch_req_123", "custom_id": "request-2", "response": {"status_code": 200, "request_id": "req_123", '
    '"body": {"id": "chatcmpl-123", "object": "chat.completion", "created": 1711652795, "model": '
    '"gpt-3.5-turbo-0125", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello."}, '
    '"logprobs": null, "finish_reason": "stop"}], "usage": {"prompt_tokens": 22, "completion_tokens": 2, '
    '"total_tokens": 24}, "system_fingerprint": "fp_123"}}, "error": null}')
OPENAI_COMPLETION_EXAMPLE = (
    '{"id": "batch_req_456", "custom_id": "request-1", "response": {"status_code": 200, "request_id": "req_789", '
    '"body": {"id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7", "object": "text_completion", "created": 1589478378, '
    '"model": "gpt-3.5-turbo-instruct", "system_fingerprint": "fp_44709d6fcb", "choices": [{"text": '
    '"\\n\\nThis is indeed a test", "index": 0, "logprobs": null, "finish_reason": "length"}], "usage": '
    '{"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}}, "error": null}')
OPENAI_ERROR_EXAMPLE = (
    '{"id": "batch_req_789", "custom_id": "request-3", "response": {"status_code": 400, "request_id": "req_1", '
    '"body": null}, "error": {"code": "invalid_request", "message": "bad"}}')


def test_the_schema_check_accepts_openai_examples():
    check_output_line(json.loads(OPENAI_CHAT_EXAMPLE))
    check_output_line(json.loads(OPENAI_COMPLETION_EXAMPLE))
    check_shape(json.loads(OPENAI_ERROR_EXAMPLE), ERROR_LINE)
    with pytest.raises(AssertionError):  # and refuses a line that lacks a key
        bad = json.loads(OPENAI_CHAT_EXAMPLE)
        del bad["response"]["body"]["usage"]
        check_output_line(bad)


def test_chat_response_line():
    request = parse_batch_line(line({"messages": USER}, custom_id="c-1"), WHERE)
    out = response_line(request, [Choice("Hello there.", [11, 12, 2], "eos")], prompt_tokens=9, model="my-llama",
                        created=1700000000)
    check_output_line(out)
    body = out["response"]["body"]
    assert out["custom_id"] == "c-1" and out["error"] is None
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert (body["model"], body["created"]) == ("my-llama", 1700000000)  # the model that ran, not the line's
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello there.",
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": "stop", "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def test_completion_response_line_with_several_choices():
    request = parse_batch_line(line({"prompt": "x", "n": 2}, COMPLETIONS), WHERE)
    out = response_line(request, [Choice("ab", [5, 6, 7, 8], "length"), Choice("c", [9, 2], "eos")],
                        prompt_tokens=3, model="m")
    check_output_line(out)
    body = out["response"]["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [(0, "ab", "length"),
                                                                                     (1, "c", "stop")]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}  # all choices count


def test_stop_strings_end_the_text_as_openai_returns_it():
    request = parse_batch_line(line({"prompt": "x", "stop": ["\n\n", "END"]}, COMPLETIONS), WHERE)

    def choice(text, finish):
        out = response_line(request, [Choice(text, [1, 2, 3], finish)], prompt_tokens=1, model="m",
                            stop_strings=request.options["stop_strings"])
        c = out["response"]["body"]["choices"][0]
        return c["text"], c["finish_reason"], c["stop_reason"]

    assert choice("one\n\ntwo", "eos") == ("one", "stop", "\n\n")
    assert choice("aENDb\n\n", "eos") == ("a", "stop", "END")  # the first stop string in the text
    assert choice("one END", "length") == ("one ", "stop", "END")  # a stop string wins over the length, as in vLLM
    assert choice("no stop here", "eos") == ("no stop here", "stop", None)  # the eos token
    assert choice("no stop here", "length") == ("no stop here", "length", None)
    with pytest.raises(ValueError, match="unknown finish_reason 'stop'"):
        choice("x", "stop")


def test_ids_are_stable_per_custom_id():
    a = parse_batch_line(line({"messages": USER}, custom_id="a"), WHERE)
    b = parse_batch_line(line({"messages": USER}, custom_id="b"), WHERE)
    first = response_line(a, [Choice("x", [1], "eos")], prompt_tokens=1, model="m", created=1)
    assert first == response_line(a, [Choice("x", [1], "eos")], prompt_tokens=1, model="m", created=1)
    other = response_line(b, [Choice("x", [1], "eos")], prompt_tokens=1, model="m", created=1)
    assert first["id"] != other["id"]
    assert first["response"]["request_id"] != other["response"]["request_id"]
    assert error_line(a, "x")["id"] == first["id"]


def test_error_line():
    request = parse_batch_line(line({"messages": USER}, custom_id="e-1"), WHERE)
    for out, status, code in ((error_line(request, "prompt too long"), 400, "BadRequestError"),
                              (error_line("e-1", "prompt too long", 500), 500, "InternalServerError")):
        check_shape(out, ERROR_LINE)
        json.loads(json.dumps(out))
        assert out["custom_id"] == "e-1"
        assert out["response"]["status_code"] == status
        assert out["error"] == {"code": code, "message": "prompt too long"}


# ---- prompts: the chat template as Transformers applies it -----------------------------------------------------------

# A Llama-3-style template: an optional system turn, then alternating turns, then the assistant header
TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = 'You are helpful.' %}{% endif %}"
    "{{ '<|system|>\n' + system | trim + '\n' }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] | trim + '</s>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

CHAT_LINES = [
    line({"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    line({"messages": [{"role": "system", "content": "Answer in one word."},
                       {"role": "user", "content": [{"type": "text", "text": "Capital of France?"},
                                                    {"type": "text", "text": "Be brief."}]},
                       {"role": "assistant", "content": "Paris"},
                       {"role": "user", "content": "And of Spain?"}]}),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model = build_checkpoint(folder)
    return folder, model


def with_template(source, folder, how):
    """A copy of the checkpoint's tokenizer files with TEMPLATE, stored as Transformers writes it."""
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    if how == "tokenizer_config":  # older Transformers and many hub checkpoints: a key of tokenizer_config.json
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = TEMPLATE
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    else:  # Transformers 5 save_pretrained: chat_template.jinja
        hf = AutoTokenizer.from_pretrained(folder)
        hf.chat_template = TEMPLATE
        hf.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("how", ["tokenizer_config", "save_pretrained"])
def test_chat_prompts_match_transformers(checkpoint, tmp_path, how):
    folder = with_template(checkpoint[0], tmp_path, how)
    if how == "tokenizer_config":
        assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    ours, hf = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    for n, obj in enumerate(CHAT_LINES, 1):
        request = parse_batch_line(obj, f"b.jsonl line {n}")
        expected = hf.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
        assert prompt_ids(request, ours, len(hf)) == expected
    rendered = hf.apply_chat_template(parse_batch_line(CHAT_LINES[1], WHERE).messages, add_generation_prompt=True,
                                      tokenize=False)
    assert "<|system|>\nAnswer in one word.\n<|user|>\nCapital of France?\nBe brief.</s>" in rendered

    text = parse_batch_line(line({"prompt": "The quick brown fox"}, COMPLETIONS), WHERE)
    assert prompt_ids(text, ours, len(hf)) == hf("The quick brown fox").input_ids

    # the template's own errors name the line
    not_alternating = parse_batch_line(line({"messages": [{"role": "user", "content": "a"},
                                                          {"role": "user", "content": "b"}]}), WHERE)
    with pytest.raises(ValueError, match=f"^{WHERE}: chat template: Conversation roles must alternate"):
        prompt_ids(not_alternating, ours, len(hf))


def test_chat_without_a_template_names_the_line(checkpoint):
    ours = Tokenizer.from_folder(checkpoint[0])  # build_checkpoint writes no chat template
    request = parse_batch_line(CHAT_LINES[0], WHERE)
    with pytest.raises(ValueError, match=f"^{WHERE}: this checkpoint has no chat template, so it cannot serve "
                                         f"{CHAT}; use {COMPLETIONS}$"):
        prompt_ids(request, ours, ours.vocab_size)
    with pytest.raises(ValueError, match=f"^{WHERE}: a text prompt needs the checkpoint's tokenizer.json"):
        prompt_ids(request, None, 301)


def test_token_id_prompts(checkpoint):
    ours = Tokenizer.from_folder(checkpoint[0])
    ids = parse_batch_line(line({"prompt": [1, 17, 250]}, COMPLETIONS), WHERE)
    assert prompt_ids(ids, ours, 301) == [1, 17, 250]
    assert prompt_ids(ids, None, 301) == [1, 17, 250]  # no tokenizer needed
    outside = parse_batch_line(line({"prompt": [1, 301]}, COMPLETIONS), WHERE)
    with pytest.raises(ValueError, match=rf"^{WHERE}: body.prompt token id 301 is outside the vocabulary \(0..300\)"):
        prompt_ids(outside, ours, 301)


# ---- a small file, end to end, with Transformers generating ----------------------------------------------------------

RUN_MAX_NEW_TOKENS = 7
FILE_LINES = [
    line({"model": "gpt-4o-mini", "messages": CHAT_LINES[1]["body"]["messages"], "max_tokens": 6,
          "temperature": 0}, custom_id="chat-greedy"),
    line({"prompt": "Paris is the"}, COMPLETIONS, custom_id="text-run-defaults"),
    line({"messages": [{"role": "user", "content": "hello world"}], "max_completion_tokens": 4,
          "temperature": 0.8, "top_p": 0.9, "seed": 7, "n": 2}, custom_id="chat-sampled"),
    line({"prompt": [1, 17, 250, 33], "max_tokens": 3, "top_k": 5, "seed": 3}, COMPLETIONS, custom_id="ids"),
]


def test_round_trip_through_the_command_line(checkpoint, tmp_path, capfd):
    """The file as --prompts-file through distllama.generate: one valid response line per request, in input order;
    the greedy chat line is Transformers' greedy continuation of Transformers' own chat prompt; sampled lines are
    reproducible and each choice draws on its own."""
    source, model = checkpoint
    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    with_template(source, folder, "tokenizer_config")
    batch_file = tmp_path / "batch.jsonl"
    batch_file.write_text("\n".join(json.dumps(obj) for obj in FILE_LINES) + "\n\n")
    outputs = []
    for run, batch in enumerate(("1", "8")):
        out_file = tmp_path / f"out{run}.jsonl"
        code = generate.main(["--model", str(folder), "--device", "cpu", "--prompts-file", str(batch_file),
                              "--max-new-tokens", str(RUN_MAX_NEW_TOKENS), "--max-batch-size", batch,
                              "--output", str(out_file)])
        assert code == 0, capfd.readouterr().err[-3000:]
        outputs.append([json.loads(text) for text in out_file.read_text().split("\n")[:-1]])
    read_back = outputs[0]
    strip = lambda out: {**out, "response": {**out["response"], "body": {**out["response"]["body"], "created": 0}}}
    assert [strip(o) for o in outputs[0]] == [strip(o) for o in outputs[1]]  # any batch: the same lines

    requests = [parse_batch_line(obj, WHERE) for obj in FILE_LINES]
    assert [out["custom_id"] for out in read_back] == [obj["custom_id"] for obj in FILE_LINES]
    assert len({out["id"] for out in read_back}) == len(FILE_LINES)
    hf_tok = AutoTokenizer.from_pretrained(folder)
    for obj, out, request in zip(FILE_LINES, read_back, requests):
        check_output_line(out)
        body = out["response"]["body"]
        assert body["object"] == ("chat.completion" if obj["url"] == CHAT else "text_completion")
        assert body["model"] == folder.name
        assert len(body["choices"]) == obj["body"].get("n", 1)
        limit = obj["body"].get("max_tokens", obj["body"].get("max_completion_tokens", RUN_MAX_NEW_TOKENS))
        assert 0 < body["usage"]["completion_tokens"] <= limit * len(body["choices"])
        if obj["url"] == CHAT:
            prompt = hf_tok.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
        else:
            prompt = obj["body"]["prompt"] if isinstance(obj["body"]["prompt"], list) else \
                hf_tok(obj["body"]["prompt"]).input_ids
        assert body["usage"]["prompt_tokens"] == len(prompt)
    sampled = [c["message"]["content"] for c in read_back[2]["response"]["body"]["choices"]]
    assert sampled[0] != sampled[1]

    # the greedy chat line is Transformers' greedy continuation of Transformers' own chat prompt
    prompt = hf_tok.apply_chat_template(requests[0].messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    expected_ids = hf_alone(model, prompt, {"max_new_tokens": 6, "do_sample": False})[0]["output_ids"]
    choice = read_back[0]["response"]["body"]["choices"][0]
    assert choice["message"]["content"] == hf_tok.decode(expected_ids, skip_special_tokens=True)
    assert read_back[0]["response"]["body"]["usage"]["completion_tokens"] == len(expected_ids)
    # the line that gives no max_tokens runs with the run's length
    assert "max_new_tokens" not in requests[1].options
    assert read_back[1]["response"]["body"]["usage"]["completion_tokens"] <= RUN_MAX_NEW_TOKENS
