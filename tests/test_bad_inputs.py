"""Bad input, as a table: flags, YAML, prompts files, checkpoint files and config.json values. Each case must end with
a non-zero exit, an error line naming the cause (the flag, the file and line or key, the shard, the tensor), no
traceback, and the results file a previous run left byte-for-byte as it was.

Most cases run in-process through distllama.generate.main (the real entry point, minus the interpreter start);
a few run as real processes, one of them under torchrun, to prove the exit codes and every rank's message."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import assert_matches_hf, build_checkpoint, hf_alone
from distllama import generate

YESTERDAY = b'{"index": 0, "input_ids": [1, 2], "output_ids": [3], "text": "yesterday\'s result"}\n' * 3
FOREIGN_ERROR = re.compile(r"^distllama: error: (\[rank \d+\] )?[A-Z]\w*(Error|Exception)\b")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_inputs") / "ckpt"
    return folder, build_checkpoint(folder, seed=5, num_hidden_layers=2)


class Case:
    """What a case may build in its own folder: files, and a copy of the checkpoint to damage."""

    def __init__(self, model_dir: Path, tmp: Path):
        self.model_dir, self.tmp = model_dir, tmp

    def file(self, name: str, content) -> str:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def checkpoint(self) -> Path:
        copy = self.tmp / "ckpt"
        if not copy.exists():
            shutil.copytree(self.model_dir, copy)
        return copy

    def shard_of(self, tensor: str) -> str:
        return json.loads((self.checkpoint() / "model.safetensors.index.json").read_text())["weight_map"][tensor]

    def replace(self, name: str, content: str) -> Path:
        """The checkpoint copy with one file's content replaced."""
        (self.checkpoint() / name).write_text(content)
        return self.checkpoint()

    def edit_config(self, name="config.json", **changes) -> Path:
        folder = self.checkpoint()
        values = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**values, **changes}))
        return folder

    def edit_header(self, tensor: str, **changes) -> str:
        """Rewrite one tensor's entry in its shard's safetensors header; returns the shard's file name."""
        shard = self.shard_of(tensor)
        path = self.checkpoint() / shard
        data = path.read_bytes()
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        header[tensor].update(changes)
        text = json.dumps(header).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])
        return shard


M = ["--device", "cpu"]  # every run starts with these; a case's own flags come after them
LAYER1 = "model.layers.1.mlp.down_proj.weight"


def model_arg(case, folder=None):
    return ["--model", str(folder or case.model_dir)]


# id -> case builder: (argv, fragments that one error line must hold)
CASES = {
    # ---- flags ----
    "top_p_range": lambda c: (model_arg(c) + ["--prompt", "hi", "--do-sample", "--top-p", "1.5"], ["--top-p"]),
    "temperature_negative": lambda c: (model_arg(c) + ["--prompt", "hi", "--temperature", "-1"], ["--temperature"]),
    "num_beams_zero": lambda c: (model_arg(c) + ["--prompt", "hi", "--num-beams", "0"], ["--num-beams"]),
    "top_k_not_int": lambda c: (model_arg(c) + ["--prompt", "hi", "--top-k", "many"], ["--top-k"]),
    "bad_words_not_json": lambda c: (model_arg(c) + ["--prompt", "hi", "--bad-words-ids", "[[5, oops"],
                                     ["--bad-words-ids"]),
    "do_sample_maybe": lambda c: (model_arg(c) + ["--prompt", "hi", "--do-sample", "maybe"], ["--do-sample"]),
    "early_stopping_sometimes": lambda c: (model_arg(c) + ["--prompt", "hi", "--num-beams", "2", "--early-stopping",
                                                           "sometimes"], ["--early-stopping"]),
    "batch_size_zero": lambda c: (model_arg(c) + ["--prompt", "hi", "--batch-size", "0"], ["--batch-size"]),
    "tp_not_int": lambda c: (model_arg(c) + ["--prompt", "hi", "--tp", "two"], ["--tp"]),
    "unknown_flag": lambda c: (model_arg(c) + ["--prompt", "hi", "--no-such-flag"], ["--no-such-flag"]),
    "dtype_choice": lambda c: (model_arg(c) + ["--prompt", "hi", "--dtype", "fp32"], ["--dtype"]),
    "greedy_many_sequences": lambda c: (model_arg(c) + ["--prompt", "hi", "--num-return-sequences", "3"],
                                        ["--num-return-sequences"]),
    "forced_and_suppressed": lambda c: (model_arg(c) + ["--prompt", "hi", "--suppress-tokens", "[3]",
                                                        "--forced-eos-token-id", "3"], ["--forced-eos-token-id"]),
    "eos_negative": lambda c: (model_arg(c) + ["--prompt", "hi", "--eos-token-id", "[-1]"], ["--eos-token-id"]),
    "empty_stop_string": lambda c: (model_arg(c) + ["--prompt", "hi", "--stop-strings", '[""]'], ["--stop-strings"]),
    "prompt_fills_max_length": lambda c: (model_arg(c) + ["--prompt", "hello world hello world", "--max-length", "3"],
                                          ["max_length 3"]),
    "max_new_tokens_zero": lambda c: (model_arg(c) + ["--prompt", "hi", "--max-new-tokens", "0"],
                                      ["--max-new-tokens"]),
    "kv_cache_too_big": lambda c: (model_arg(c) + ["--prompt", "hi", "--max-new-tokens", str(10**10)],
                                   ["KV cache", "needs", "free", "--max-new-tokens"]),
    "resume_without_output": lambda c: (model_arg(c) + ["--prompt", "hi", "--resume"], ["--resume", "--output"]),
    "resume_other_runs_file": lambda c: (model_arg(c) + ["--prompt", "a", "--prompt", "b", "--prompt", "c",
                                                         "--resume"], ["results.jsonl line 1", "input_ids"]),
    "resume_other_runs_index": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl", '{"input_ids": [1, 2]}\n'
                                                                                              * 3), "--resume"],
                                          ["results.jsonl line 2", "index 0"]),
    "output_folder_missing": lambda c: (model_arg(c) + ["--prompt", "hi", "--output", str(c.tmp / "no" / "o.jsonl")],
                                        [str(c.tmp / "no")]),
    # ---- YAML ----
    "yaml_unknown_key": lambda c: (["--config", c.file("run.yaml", f"model: {c.model_dir}\nmax_new_tokenz: 3\n"),
                                    "--prompt", "hi"], ["run.yaml", "max_new_tokenz"]),
    "yaml_syntax": lambda c: (["--config", c.file("run.yaml", "model: [unclosed\n"), "--prompt", "hi"],
                              ["run.yaml", "line 2"]),
    "yaml_dtype_choice": lambda c: (["--config", c.file("run.yaml", f"model: {c.model_dir}\ndtype: fp32\n"),
                                     "--prompt", "hi"], ["run.yaml", "key dtype"]),
    "yaml_stream_not_bool": lambda c: (["--config", c.file("run.yaml", f"model: {c.model_dir}\nstream: 'no'\n"),
                                        "--prompt", "hi"], ["run.yaml", "key stream"]),
    "yaml_batch_size_list": lambda c: (["--config", c.file("run.yaml", f"model: {c.model_dir}\nbatch_size: [2]\n"),
                                        "--prompt", "hi"], ["run.yaml", "key batch_size"]),
    "yaml_top_p_range": lambda c: (["--config", c.file("run.yaml", f"model: {c.model_dir}\ndo_sample: true\n"
                                                                   "top_p: 1.5\n"), "--prompt", "hi"],
                                   ["run.yaml", "key top_p"]),
    "yaml_top_k_type": lambda c: (["--config", c.file("run.yaml", f"model: {c.model_dir}\ntop_k: many\n"),
                                   "--prompt", "hi"], ["run.yaml", "key top_k"]),
    "yaml_not_utf8": lambda c: (["--config", c.file("run.yaml", f"model: {c.model_dir}\n# caf\xe9\n".encode("latin-1")),
                                 "--prompt", "hi"], ["run.yaml", "line 2"]),
    "yaml_not_mapping": lambda c: (["--config", c.file("run.yaml", "- model\n- demo\n"), "--prompt", "hi"],
                                   ["run.yaml"]),
    "yaml_missing": lambda c: (["--config", str(c.tmp / "nowhere.yaml"), "--prompt", "hi"], ["nowhere.yaml"]),
    # ---- prompts files ----
    "prompts_not_utf8": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl", b'{"prompt": "ok"}\n'
                                                                                      b'{"prompt": "caf\xc3("}\n')],
                                   ["p.jsonl line 2", "UTF-8"]),
    "prompts_bad_json": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl", '{"prompt": "a"}\n\n'
                                                                                       '{"prompt": \n')],
                                   ["p.jsonl line 3"]),
    "prompts_wrong_keys": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl", '{"text": "a"}\n')],
                                     ["p.jsonl line 1"]),
    "prompts_ids_not_ints": lambda c: (model_arg(c) + ["--prompts-file",
                                                       c.file("p.jsonl", '{"prompt": "a"}\n{"input_ids": [1, "2"]}\n')],
                                       ["p.jsonl line 2", "input_ids"]),
    "prompts_id_outside_vocab": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl",
                                                                                    '{"input_ids": [1, 301]}\n')],
                                           ["p.jsonl line 1", "301"]),
    "prompts_huge_id": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl", '{"input_ids": [1, 1%s]}\n'
                                                                                      % ("0" * 400))],
                                  ["p.jsonl line 1", "vocabulary"]),
    "prompts_text_not_string": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl", '{"prompt": 5}\n')],
                                          ["p.jsonl line 1", "prompt"]),
    "prompts_lone_surrogate": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl",
                                                                                  '{"prompt": "a\\ud800b"}\n')],
                                         ["p.jsonl line 1", "surrogate"]),
    "prompts_empty_text": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl", '{"prompt": ""}\n')],
                                     ["p.jsonl line 1", "empty"]),
    "prompts_nested_too_deep": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl", "[" * 100_000)],
                                          ["p.jsonl line 1"]),
    "prompts_missing": lambda c: (model_arg(c) + ["--prompts-file", str(c.tmp / "nowhere.jsonl")],
                                  ["nowhere.jsonl"]),
    "prompts_none": lambda c: (model_arg(c) + ["--prompts-file", c.file("p.jsonl", "\n\n")], ["no prompts"]),
    # ---- checkpoint files ----
    "shard_truncated": lambda c: (model_arg(c, truncate(c, LAYER1)) + ["--prompt", "hi"], [c.shard_of(LAYER1)]),
    "shard_header_too_large": lambda c: (model_arg(c, huge_header(c, LAYER1)) + ["--prompt", "hi"],
                                         [c.shard_of(LAYER1)]),
    "shard_unknown_dtype": lambda c: (model_arg(c, c.edit_header(LAYER1, dtype="X99") and c.checkpoint())
                                      + ["--prompt", "hi"], [c.shard_of(LAYER1)]),
    "shard_integer_weights": lambda c: (model_arg(c, c.edit_header(LAYER1, dtype="I32") and c.checkpoint())
                                        + ["--prompt", "hi"], [LAYER1, c.shard_of(LAYER1), "I32"]),
    "shard_missing": lambda c: (model_arg(c, remove_shard(c, LAYER1)) + ["--prompt", "hi"], [c.shard_of(LAYER1)]),
    "index_not_json": lambda c: (model_arg(c, c.replace("model.safetensors.index.json", "{oops")) + ["--prompt", "hi"],
                                 ["model.safetensors.index.json", "JSON"]),
    # ---- config.json / generation_config.json values ----
    "config_hidden_not_multiple": lambda c: (model_arg(c, c.edit_config(hidden_size=66)) + ["--prompt", "hi"],
                                             ["config.json", "hidden_size"]),
    "config_eps_int": lambda c: (model_arg(c, c.edit_config(rms_norm_eps=1)) + ["--prompt", "hi"],
                                 ["config.json", "rms_norm_eps"]),
    "config_vocab_null": lambda c: (model_arg(c, c.edit_config(vocab_size=None)) + ["--prompt", "hi"],
                                    ["config.json", "vocab_size"]),
    "config_dtype_unknown": lambda c: (model_arg(c, c.edit_config(dtype="float33")) + ["--prompt", "hi"],
                                       ["config.json", "dtype"]),
    "config_not_json": lambda c: (model_arg(c, c.replace("config.json", "{")) + ["--prompt", "hi"],
                                  ["config.json is not valid JSON"]),
    "config_shape_mismatch": lambda c: (model_arg(c, c.edit_config(intermediate_size=100)) + ["--prompt", "hi"],
                                        ["model.layers.0.mlp"]),
    "generation_config_bad_value": lambda c: (model_arg(c, c.edit_config("generation_config.json", temperature="hot"))
                                              + ["--prompt", "hi"], ["generation_config.json", "temperature"]),
}


def truncate(case, tensor):
    path = case.checkpoint() / case.shard_of(tensor)
    path.write_bytes(path.read_bytes()[:-64])
    return case.checkpoint()


def huge_header(case, tensor):
    path = case.checkpoint() / case.shard_of(tensor)
    path.write_bytes((10**12).to_bytes(8, "little") + path.read_bytes()[8:])
    return case.checkpoint()


def remove_shard(case, tensor):
    (case.checkpoint() / case.shard_of(tensor)).unlink()
    return case.checkpoint()


def assert_clean_failure(code, err: str, fragments, where=""):
    assert code != 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("distllama: error:")]
    assert errors, err[-3000:]
    assert not any(FOREIGN_ERROR.match(line) for line in errors), errors  # ours, not a stray exception's text
    for fragment in fragments:
        assert any(fragment in line for line in errors), (where, fragment, errors)


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(model, tmp_path, capfd, name):
    folder, _ = model
    case = Case(folder, tmp_path)
    argv, fragments = CASES[name](case)
    out = tmp_path / "results.jsonl"
    out.write_bytes(YESTERDAY)
    before = out.stat().st_mtime_ns
    if "--output" not in argv and not name.startswith("resume_without"):
        argv = [*argv, "--output", str(out)]
    code = generate.main([*M, *argv])
    captured = capfd.readouterr()
    assert_clean_failure(code, captured.err, fragments, name)
    assert out.read_bytes() == YESTERDAY and out.stat().st_mtime_ns == before
    assert not (tmp_path / "results.jsonl.partial").exists()  # no result was ready: no trace


# ---- real processes -------------------------------------------------------------------------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(args, nproc=1):
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([sys.executable, *launcher, "-m", "distllama.generate", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_real_process_exit_codes(model, tmp_path):
    folder, _ = model
    case = Case(folder, tmp_path)
    out = tmp_path / "results.jsonl"
    out.write_bytes(YESTERDAY)
    proc = run([*M, "--model", str(truncate(case, LAYER1)), "--prompt", "hi", "--output", str(out)])
    assert proc.returncode == 1
    assert_clean_failure(proc.returncode, proc.stderr, [case.shard_of(LAYER1)])
    # a typo in the model path: yesterday's results survive
    proc = run([*M, "--model", str(tmp_path / "ckpt-typo"), "--prompt", "hi", "--output", str(out)])
    assert_clean_failure(proc.returncode, proc.stderr, ["ckpt-typo"])
    assert out.read_bytes() == YESTERDAY


def test_torchrun_every_rank_fails_and_names_itself(model, tmp_path):
    """pp 2: only stage 1 reads layer 1, whose shard is damaged; rank 1 names the shard, rank 0 names rank 1, both
    exit non-zero and the results file is left alone."""
    folder, _ = model
    case = Case(folder, tmp_path)
    out = tmp_path / "results.jsonl"
    out.write_bytes(YESTERDAY)
    damaged = huge_header(case, LAYER1)
    proc = run([*M, "--model", str(damaged), "--pp", "2", "--prompt", "hi", "--output", str(out)], nproc=2)
    assert proc.returncode != 0
    shard = case.shard_of(LAYER1)
    assert f"distllama: error: [rank 1] shard file {shard}" in proc.stderr, proc.stderr[-3000:]
    assert not re.search(r'File ".*distllama/', proc.stderr), proc.stderr[-3000:]
    assert out.read_bytes() == YESTERDAY


# ---- what used to fail and must not ---------------------------------------------------------------------------------

def test_eos_outside_a_small_vocabulary_generates_like_transformers(model, tmp_path, capfd):
    """--eos-token-id 1000 on a 301-token vocabulary, prompts of unequal length: Transformers generates normally."""
    folder, hf_model = model
    prompts = [[1, 17, 250, 33, 9], [1, 77, 3]]
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    code = generate.main(["--model", str(folder), "--device", "cpu", "--prompts-file", str(prompts_file),
                          "--eos-token-id", "1000", "--max-new-tokens", "6", "--output", str(out)])
    assert code == 0, capfd.readouterr().err[-3000:]
    records = [json.loads(line) for line in out.read_text().split("\n")[:-1]]  # JSON text may hold U+2028
    for record, prompt in zip(records, prompts, strict=True):
        expected = hf_alone(hf_model, prompt, {"max_new_tokens": 6, "do_sample": False, "eos_token_id": 1000})
        assert_matches_hf(record, expected[0])


@pytest.mark.parametrize("flags,expected", [
    (["--early-stopping"], True), (["--early-stopping", "never"], "never"), (["--early-stopping", "false"], False),
    (["--early-stopping", "true"], True), (["--no-early-stopping"], False),
    (["--do-sample"], True), (["--do-sample", "true"], True), (["--do-sample", "false"], False),
    (["--no-do-sample"], False), (["--do-sample=false"], False),
])
def test_boolean_options_as_bare_flags_and_with_values(flags, expected):
    _, yaml_options, cli_options = generate.parse_args(["--prompt", "hi", *flags, "--num-beams", "2"])
    from distllama.options import resolve_options
    options = resolve_options({}, yaml_options, cli_options)
    name = "early_stopping" if "early" in flags[0] else "do_sample"
    assert getattr(options, name) == expected


def test_memory_helpers():
    from distllama.memory import OutOfMemory, allocating, check_memory, free_bytes, kv_cache_bytes
    # 2 (k, v) x 3 layers x 4 rows x 2 kv heads x 10 positions x 16 dims x 2 bytes
    assert kv_cache_bytes(4, 10, 3, 2, 16, torch.bfloat16) == 2 * 3 * 4 * 2 * 10 * 16 * 2
    free = free_bytes("cpu")
    assert free is not None and free > 0
    check_memory(1024, "cpu", "a small buffer")
    with pytest.raises(OutOfMemory, match=r"the KV cache needs .* GiB but cpu has .* free: .*--max-batch-size"):
        check_memory(free * 4, "cpu", "the KV cache")
    with pytest.raises(OutOfMemory, match="out of memory allocating the buffer"):
        with allocating("the buffer", 10**15, "cpu"):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 1000000000000000 bytes")
    with pytest.raises(RuntimeError, match="unrelated"):
        with allocating("the buffer", 10, "cpu"):
            raise RuntimeError("unrelated")
