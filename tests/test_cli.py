"""The command line as ../shared/reference/cli-contract.md writes it: torchrun and plain runs against Transformers,
YAML + flag precedence, and one-line errors with a non-zero exit (never a hang) for bad input."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from checkpoints import assert_matches_hf, build_checkpoint, free_port, hf_greedy, populate_hub_cache
from distllama.config import LlamaConfig
from distllama.model import ParallelLayoutError, check_layout

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "gqa"
    model = build_checkpoint(folder, seed=3, num_hidden_layers=3)
    return folder, model


def run_cli(args, nproc: int = 1, timeout: float = 240, module: str = "distllama.generate",
            env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", module, *args]
    return subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().split("\n")[:-1]]  # not splitlines: U+2028


def check_against_transformers(records, model, tokenizer, prompts_ids, max_new):
    """Each record is Transformers' greedy generate on that prompt alone."""
    expected = hf_greedy(model, prompts_ids, max_new)
    for record, ids, theirs in zip(records, prompts_ids, expected, strict=True):
        assert record["input_ids"] == ids
        assert_matches_hf(record, theirs, f"prompt {record['index']}")
        assert record["finish_reason"] == ("eos" if record["output_ids"][-1:] == [2] else "length")
        assert record["text"] == tokenizer.decode(record["output_ids"], skip_special_tokens=True)


def test_torchrun_tp2_pp2_matches_transformers(model_dir, tmp_path):
    folder, model = model_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["hello world", "The quick brown fox jumps over", "def add(a, b):"]
    prompts_file = tmp_path / "prompts.jsonl"
    raw_ids = [1, 40, 41, 42, 43, 44, 45]
    prompts_file.write_text("\n".join([json.dumps({"prompt": t}) for t in texts] +
                                      [json.dumps({"input_ids": raw_ids})]) + "\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli(["--model", str(folder), "--tp", "2", "--pp", "2", "--device", "cpu", "--prompts-file",
                    str(prompts_file), "--output", str(out), "--max-new-tokens", "10", "--max-batch-size", "3"],
                   nproc=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # e.g. torch's deprecation of a collective we call
    ids = [tokenizer(t).input_ids for t in texts] + [raw_ids]
    records = read_jsonl(out)
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    # three slots for four prompts: the last one takes the first slot that frees up
    check_against_transformers(records, model, tokenizer, ids, 10)


def test_yaml_config_and_flag_precedence(model_dir, tmp_path):
    folder, model = model_dir
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {folder}\ndevice: cpu\nmax_new_tokens: 3\nbatch_size: 2\n"
                      "prompt:\n  - hello world\n  - The quick brown fox\n")
    out = tmp_path / "out.jsonl"
    proc = run_cli(["--config", str(config), "--max-new-tokens", "6", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out)
    assert all(len(r["output_ids"]) == 6 or r["finish_reason"] == "eos" for r in records)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["hello world", "The quick brown fox"]
    check_against_transformers(records, model, tokenizer, [tokenizer(t).input_ids for t in texts], 6)
    # phases are reported on stderr by rank 0
    for phase in ("config:", "load:", "prefill:", "decode:"):
        assert phase in proc.stderr


def assert_clean_failure(proc, *fragments):
    """Non-zero exit, the reason in a one-line error, no traceback through our code. (Under torchrun the launcher
    stops the other ranks as soon as one fails, so not every rank gets to print: see test_every_rank_reports.)"""
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distllama: error:")]
    assert errors, proc.stderr[-3000:]
    # no traceback through our code (torchrun's launcher prints its own when a child fails)
    assert not re.search(r'File ".*distllama/', proc.stderr), proc.stderr[-3000:]
    for fragment in fragments:
        assert any(fragment in line for line in errors), (fragment, errors)


def test_heads_not_divisible_by_tp(model_dir):
    folder, _ = model_dir
    t0 = time.time()
    proc = run_cli(["--model", str(folder), "--tp", "3", "--device", "cpu", "--prompt", "hi"], nproc=3)
    assert_clean_failure(proc, "num_attention_heads (4) is not divisible by tp (3)")
    assert time.time() - t0 < 120


def test_an_mlp_narrower_than_tp_is_refused_before_loading():
    """tp ranks split the MLP's columns, unevenly where they must; with fewer columns than ranks one would hold none
    (a random config of the parity hunt: intermediate_size 1 at tp 2)."""
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=1, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(ParallelLayoutError, match=r"intermediate_size \(1\) is smaller than tp \(2\)"):
        check_layout(config, 2, 1)
    check_layout(config, 1, 1)
    check_layout(dataclasses.replace(config, intermediate_size=3), 2, 1)  # uneven, but every rank holds a column


def test_tp_times_pp_must_equal_world_size(model_dir):
    folder, _ = model_dir
    proc = run_cli(["--model", str(folder), "--tp", "2", "--pp", "2", "--device", "cpu", "--prompt", "hi"], nproc=2)
    assert_clean_failure(proc, "tp * pp must equal the world size")


def test_missing_shard_stops_every_rank(model_dir, tmp_path):
    folder, _ = model_dir
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    last_layer_file = index["model.layers.2.mlp.down_proj.weight"]  # only pp stage 1 needs it
    (broken / last_layer_file).unlink()
    proc = run_cli(["--model", str(broken), "--pp", "2", "--device", "cpu", "--prompt", "hi"], nproc=2)
    assert_clean_failure(proc, f"missing shard file {last_layer_file}")

    # Without torchrun (plain srun), nobody kills the healthy rank: it must learn of the failure and stop by itself.
    port = free_port()
    started = time.time()
    ranks = [subprocess.Popen([sys.executable, "-m", "distllama.generate", "--model", str(broken), "--pp", "2",
                               "--device", "cpu", "--prompt", "hi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**ENV, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
                                              "SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1",
                                              "MASTER_PORT": str(port)}) for r in range(2)]
    results = [rank.communicate(timeout=120) for rank in ranks]
    assert time.time() - started < 60
    assert [rank.returncode for rank in ranks] == [1, 1]
    assert results[0][1].strip().splitlines()[-1].startswith(
        f"distllama: error: [rank 0] stopping: rank 1 failed: missing shard file {last_layer_file}")
    assert f"distllama: error: [rank 1] missing shard file {last_layer_file}" in results[1][1]


@pytest.mark.parametrize("content,fragment", [
    ("{not json", "config.json is not valid JSON"),
    ('{"model_type": "llama", "hidden_size": "big"}', "hidden_size must be an integer"),
    ('{"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 3}', "num_key_value_heads"),
])
def test_malformed_config(model_dir, tmp_path, content, fragment):
    folder, _ = model_dir
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "config.json").write_text(content)
    proc = run_cli(["--model", str(broken), "--device", "cpu", "--prompt", "hi"])
    assert_clean_failure(proc, fragment)


@pytest.mark.parametrize("args,fragment", [
    (["--top-p", "1.5", "--do-sample"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--num-beams", "0"], "num_beams"),
    (["--bad-words-ids", "[[5, oops"], "bad_words_ids"),
    (["--batch-size", "0"], "batch-size"),
    (["--tp", "two"], "argument --tp: invalid int value: 'two'"),
    (["--num-beams", "4", "--num-beam-groups", "2"], "num_beam_groups > 1 (group / diverse beam search) is not"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags(model_dir, args, fragment):
    folder, _ = model_dir
    proc = run_cli(["--model", str(folder), "--device", "cpu", "--prompt", "hi", *args])
    assert_clean_failure(proc, fragment)
    assert "load:" not in proc.stderr  # refused before any model work


def test_bad_yaml(model_dir, tmp_path):
    folder, _ = model_dir
    config = tmp_path / "bad.yaml"
    config.write_text(f"model: {folder}\nmax_new_tokenz: 3\n")
    assert_clean_failure(run_cli(["--config", str(config), "--prompt", "hi"]), "unknown key 'max_new_tokenz'")
    config.write_text("model: [unclosed\n")
    assert_clean_failure(run_cli(["--config", str(config), "--prompt", "hi"]), "not valid YAML")
    # run keys get the flags' own checks
    for line, fragment in [("dtype: fp32", f"{config}: key dtype: invalid choice: 'fp32'"),
                           ("stream: 'no'", f"{config}: key stream must be true or false"),
                           ("batch_size: [2]", f"{config}: key batch_size must be a single value")]:
        config.write_text(f"model: {folder}\n{line}\n")
        assert_clean_failure(run_cli(["--config", str(config), "--prompt", "hi"]), fragment)


def test_bad_prompts_file(model_dir, tmp_path):
    folder, _ = model_dir
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"input_ids": [1, 99999]}\n')
    proc = run_cli(["--model", str(folder), "--device", "cpu", "--prompts-file", str(prompts)])
    assert_clean_failure(proc, f"{prompts} line 2: token id 99999 is outside the vocabulary")
    assert_clean_failure(run_cli(["--model", str(tmp_path / "nope"), "--prompt", "hi"]), "nope")


def test_console_entry_point_runs_generate(model_dir, tmp_path):
    folder, model = model_dir
    out = tmp_path / "out.jsonl"
    proc = run_cli(["generate", "--model", str(folder), "--device", "cpu", "--prompt", "hello world",
                    "--max-new-tokens", "3", "--output", str(out)], module="distllama")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_against_transformers(read_jsonl(out), model, tokenizer, [tokenizer("hello world").input_ids], 3)


def test_hub_id_offline_under_torchrun(model_dir, tmp_path):
    """A hub id through huggingface_hub's real cache code (HF_HUB_OFFLINE=1, a pre-populated cache), pp 2."""
    folder, model = model_dir
    cache = tmp_path / "hub"
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    populate_hub_cache(cache, "org/tiny-llama", folder, files)
    out = tmp_path / "out.jsonl"
    proc = run_cli(["--model", "org/tiny-llama", "--pp", "2", "--device", "cpu", "--prompt", "hello world",
                    "--max-new-tokens", "5", "--output", str(out)], nproc=2,
                   env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_against_transformers(read_jsonl(out), model, tokenizer, [tokenizer("hello world").input_ids], 5)


def test_checkpoint_without_tokenizer_takes_input_ids(model_dir, tmp_path):
    folder, model = model_dir
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input_ids": [1, 40, 41, 42]}\n')
    out = tmp_path / "out.jsonl"
    proc = run_cli(["--model", str(bare), "--device", "cpu", "--prompts-file", str(prompts), "--max-new-tokens", "4",
                    "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = read_jsonl(out)
    assert record["output_ids"] == hf_greedy(model, [[1, 40, 41, 42]], 4)[0]["output_ids"]
    assert record["text"] is None
    assert_clean_failure(run_cli(["--model", str(bare), "--prompt", "hi"]), "no tokenizer.json")


def test_sampled_sequences_are_reproducible_and_best_first(model_dir, tmp_path):
    """Seeded samples: the same whatever the batch (each prompt draws from its own stream), each one allowed by
    Transformers' processors, listed best first by log-likelihood."""
    folder, model = model_dir
    tokenizer = AutoTokenizer.from_pretrained(folder)
    records = []
    for batch in ("1", "8"):
        out = tmp_path / f"out{batch}.jsonl"
        proc = run_cli(["--model", str(folder), "--device", "cpu", "--prompt", "hello world", "--prompt", "fox",
                        "--max-new-tokens", "6", "--do-sample", "--num-return-sequences", "3", "--seed", "1",
                        "--top-k", "5", "--max-batch-size", batch, "--output", str(out)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        records.append(read_jsonl(out))
    assert records[0] == records[1]
    record = records[0][0]
    assert len({tuple(s["output_ids"]) for s in record["sequences"]}) > 1
    scores = [s["score"] for s in record["sequences"]]
    assert scores == sorted(scores, reverse=True)
    assert record["output_ids"] == record["sequences"][0]["output_ids"]
    assert abs(sum(record["token_logprobs"]) - scores[0]) < 1e-6
    prompt = tokenizer("hello world").input_ids
    for sequence in record["sequences"]:  # every token among the 5 best at its step
        ids = torch.tensor([prompt + sequence["output_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1]
        for step, token in enumerate(sequence["output_ids"]):
            assert token in logits[step].topk(5).indices.tolist()
