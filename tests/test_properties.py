"""Property-based tests (hypothesis) of the command line on a tiny model: random generation options (valid and
invalid values, types and combinations, as flags or YAML keys) and random prompts files (valid and invalid lines,
unicode, empty, huge ids). Every run either succeeds, writing one result line per prompt, or fails with exactly one
`distllama: error:` line of our own and a non-zero exit; never a traceback or a stray exception."""

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from checkpoints import build_checkpoint
from distllama import generate
from distllama.options import BOOL, DECAY, EARLY_STOPPING, FLOAT, INT, INT_LIST, INT_LIST_LIST, INT_OR_INT_LIST, \
    OPTION_FIELDS, STR_LIST

FOREIGN_ERROR = re.compile(r"^distllama: error: (\[rank \d+\] )?[A-Z]\w*(Error|Exception)\b")
# 40 fixed examples per property in the suite; PROPERTY_EXAMPLES=3000 hunts with fresh random ones.
SETTINGS = settings(max_examples=int(os.environ.get("PROPERTY_EXAMPLES", "40")), deadline=None,
                    derandomize=not os.environ.get("PROPERTY_EXAMPLES"), database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("properties") / "ckpt"
    build_checkpoint(folder, seed=7, num_hidden_layers=2)
    return folder


def run_main(argv) -> tuple[int, str]:
    """generate.main in-process with stderr captured: sys.stderr (the log, the error line) and fd 2 alike."""
    with tempfile.TemporaryFile() as err:
        stream = open(err.fileno(), "w", encoding="utf-8", errors="replace", closefd=False)
        saved_fd, saved_stream = os.dup(2), sys.stderr
        os.dup2(err.fileno(), 2)
        sys.stderr = stream
        try:
            code = generate.main(argv)
        finally:
            stream.flush()
            sys.stderr = saved_stream
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        err.seek(0)
        return code, err.read().decode("utf-8", errors="replace")


def check_outcome(code: int, err: str, out: Path, n_prompts: int | None):
    assert "Traceback" not in err, err[-3000:]
    event("ran" if code == 0 else "refused")
    errors = [line for line in err.splitlines() if line.startswith("distllama: error:")]
    if code == 0:
        assert not errors, err[-3000:]
        records = [json.loads(line) for line in out.read_bytes().split(b"\n")[:-1]]
        assert [r["index"] for r in records] == list(range(n_prompts if n_prompts is not None else len(records)))
    else:
        assert len(errors) == 1, err[-3000:]
        assert not FOREIGN_ERROR.match(errors[0]), errors[0]  # a message of ours, not an exception's text
        assert not out.exists()  # nothing is created before a result is ready


# ---- generation options --------------------------------------------------------------------------------------------

WEIRD = st.sampled_from(["", "nan", "inf", "-inf", "true", "never", "[", "[[", "null", "[1, [2]]", '["a"]', "1e999",
                         "\u00e9", "0x10", " 3 ", "-0"])
INTS = st.integers(-3, 6) | st.sampled_from([10**12, 2**64, -(2**63)])
FLOATS = st.floats(-0.5, 2.0) | st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, 1.0, 1e-300])
TOKEN_IDS = st.integers(0, 300) | st.sampled_from([-1, 301, 1000, 10**30])
IDS = st.integers(0, 300)

# Mostly valid values for each kind of option (so that many runs get to generate) ...
VALID = {
    INT: st.integers(0, 4), FLOAT: st.floats(0.05, 1.0), BOOL: st.booleans() | st.none(),
    EARLY_STOPPING: st.sampled_from([True, False, "never", None]), INT_LIST: st.lists(IDS, min_size=1, max_size=3),
    INT_OR_INT_LIST: IDS | st.lists(IDS, min_size=1, max_size=3),
    INT_LIST_LIST: st.lists(st.lists(IDS, min_size=1, max_size=2), min_size=1, max_size=2),
    STR_LIST: st.lists(st.text(min_size=1, max_size=3), min_size=1, max_size=2),
    DECAY: st.tuples(st.integers(0, 5), st.floats(0.5, 2.0)).map(list),
}
# ... and anything else: out of range, wrong type, not JSON, too large.
INVALID = {
    INT: INTS, FLOAT: FLOATS, BOOL: WEIRD, EARLY_STOPPING: WEIRD, INT_LIST: st.lists(TOKEN_IDS, max_size=3),
    INT_OR_INT_LIST: TOKEN_IDS | st.lists(TOKEN_IDS, max_size=3),
    INT_LIST_LIST: st.lists(st.lists(TOKEN_IDS, max_size=3), max_size=3),
    STR_LIST: st.lists(st.text(max_size=4), max_size=2) | st.text(max_size=4),
    DECAY: st.tuples(st.integers(-1, 5), FLOATS).map(list) | st.lists(INTS, max_size=3),
}


def value_for(kind: str):
    anything = WEIRD | INTS | FLOATS | st.lists(st.integers(-1, 5), max_size=2) | INVALID[kind]
    return st.one_of(VALID[kind], VALID[kind], VALID[kind], anything)


OPTION = st.sampled_from(sorted(OPTION_FIELDS)).flatmap(
    lambda name: st.tuples(st.just(name), value_for(OPTION_FIELDS[name]["kind"]), st.booleans()))


def as_flag(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is None and OPTION_FIELDS[name]["kind"] in (BOOL, EARLY_STOPPING):
        return [flag]  # bare boolean flag
    if value is False and OPTION_FIELDS[name]["kind"] == BOOL:
        return ["--no-" + flag[2:]]
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, bool)) else str(value)
    return [f"{flag}={text}"]  # "=": a value starting with "-" stays a value


@given(options=st.lists(OPTION, max_size=3), beams=st.sampled_from([None, 1, 2]))
@SETTINGS
def test_any_generation_options_run_or_fail_cleanly(model_dir, options, beams):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        argv = ["--model", str(model_dir), "--device", "cpu", "--prompt", "hello world", "--prompt", "The quick brown",
                "--max-new-tokens", "3", "--output", str(out), "--log-level", "error"]
        if beams:
            argv += ["--num-beams", str(beams)]
        yaml_values = {}
        for name, value, in_yaml in options:
            if in_yaml:
                yaml_values[name] = value
            else:
                argv += as_flag(name, value)
        if yaml_values:
            config = Path(tmp) / "run.yaml"
            config.write_text(yaml.safe_dump(yaml_values, allow_unicode=True))
            argv += ["--config", str(config)]
        code, err = run_main(argv)
        check_outcome(code, err, out, 2)


# ---- prompts files -------------------------------------------------------------------------------------------------

TEXT = st.text(max_size=12) | st.sampled_from(["hello world", "", " ", "\u2028", "\x00", "caf\u00e9 \U0001f600"])
JSON_LINE = st.one_of(
    TEXT.map(lambda t: json.dumps({"prompt": t}, ensure_ascii=False)),
    TEXT.map(lambda t: json.dumps({"prompt": t})),  # \u escapes, lone surrogates among them
    st.lists(TOKEN_IDS, max_size=5).map(lambda ids: json.dumps({"input_ids": ids})),
    st.sampled_from(['{"input_ids": [1, 2.0]}', '{"input_ids": [true]}', '{"input_ids": "1 2"}', '{"prompt": null}',
                     '{"prompt": "a", "input_ids": [1]}', "[]", "3", '"text"', '{"prompt": "\\ud800"}',
                     '{"input_ids": [NaN]}', '{"prompt": ["a"]}', "{", '{"prompt": "a"} x']),
).map(lambda line: line.encode("utf-8", errors="surrogatepass"))
VALID_LINE = st.one_of(
    st.text(min_size=1, max_size=12).map(lambda t: json.dumps({"prompt": t}, ensure_ascii=False)),
    st.lists(IDS, min_size=1, max_size=5).map(lambda ids: json.dumps({"input_ids": ids})),
).map(str.encode)
LINE = st.one_of(VALID_LINE, VALID_LINE, VALID_LINE, JSON_LINE, st.binary(max_size=12),
                 st.sampled_from([b"", b"\r", b"\xef\xbb\xbf{}", b"\xc3(", b"\xff"]))


@given(lines=st.lists(LINE, max_size=5), newline=st.sampled_from([b"\n", b"\r\n"]),
       chat=st.booleans(), batch=st.integers(1, 3))
@SETTINGS
def test_any_prompts_file_runs_or_fails_cleanly(model_dir, lines, newline, chat, batch):
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_bytes(newline.join(lines))
        out = Path(tmp) / "out.jsonl"
        argv = ["--model", str(model_dir), "--device", "cpu", "--prompts-file", str(prompts), "--max-new-tokens", "2",
                "--batch-size", str(batch), "--output", str(out), "--log-level", "error"]
        code, err = run_main(argv + (["--chat"] if chat else []))
        check_outcome(code, err, out, None)
        if code != 0:
            # a bad line is named by file and line (or the run says there were no prompts at all)
            line = next(line for line in err.splitlines() if line.startswith("distllama: error:"))
            assert re.search(r"prompts\.jsonl line \d+|no prompts|chat template|max_length", line), line
