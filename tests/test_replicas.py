"""Data-parallel replicas (--dp): dp 2 x tp 1 and dp 2 x pp 2 (4 processes) on CPU give what one process gives (itself
Transformers' greedy generate on each prompt alone), with rank 0 writing every result in input order; each replica
really runs its share."""

import json
import os
import subprocess
import sys

import pytest

from checkpoints import assert_matches_hf, build_checkpoint, hf_alone
from distllama.replicas import share

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    model = build_checkpoint(root / "model", seed=13)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": [1] + [(11 * i + j) % 290 + 5 for j in range(2 + i % 13)]})
                               + "\n" for i in range(24)))
    # as eos, the token the model emits most often in the middle of its output: rows then end at different steps
    run(root, root / "probe.jsonl", 1)
    middles = [t for r in read(root / "probe.jsonl") for t in r["output_ids"][2:8]]
    eos = max(set(middles), key=middles.count)
    # the reference, one plain process, is Transformers' greedy generate on each prompt alone
    run(root, root / "single.jsonl", 1, eos=f"[{eos}]")
    for record in read(root / "single.jsonl"):
        theirs = hf_alone(model, record["input_ids"], {"max_new_tokens": 10, "do_sample": False, "eos_token_id": eos})
        assert_matches_hf(record, theirs[0], f"prompt {record['index']}")
    return root, f"[{eos}]"


def run(root, out, nproc: int, *flags, eos: str = "[2]") -> None:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "distllama.generate", "--model", str(root / "model"), "--device", "cpu",
           "--prompts-file", str(root / "prompts.jsonl"), "--max-new-tokens", "10", "--max-batch-size", "3",
           "--eos-token-id", eos, "--output", str(out), *flags]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("flags", [["--dp", "2"], ["--dp", "2", "--pp", "2"]], ids=["dp2-tp1", "dp2-pp2"])
def test_replicas_give_one_process_results_in_input_order(job, flags):
    root, eos = job
    single, split = root / "single.jsonl", root / f"split-{'-'.join(flags)}.jsonl"
    run(root, split, 2 * (2 if "--pp" in flags else 1), *flags, eos=eos)
    records, expected = read(split), read(single)
    assert [r["index"] for r in records] == list(range(24))
    assert_same_results(records, expected)
    assert len({len(r["output_ids"]) for r in records}) > 1  # rows ended at different steps


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


def assert_same_results(records: list[dict], expected: list[dict]) -> None:
    """Tokens, texts and finish reasons identical; logprobs equal to float rounding (a batched matmul may round a
    row's last bits differently with other rows beside it)."""
    assert len(records) == len(expected)
    for ours, theirs in zip(records, expected):
        assert {k: v for k, v in ours.items() if k != "token_logprobs"} == \
            {k: v for k, v in theirs.items() if k != "token_logprobs"}
        assert max(map(abs, (a - b for a, b in zip(ours["token_logprobs"], theirs["token_logprobs"]))),
                   default=0) < 1e-5


def test_replicas_share_by_length():
    lengths = {i: n for i, n in enumerate([5, 50, 7, 40, 9, 30, 11, 20])}
    parts = [share(list(lengths), lengths, 2, r) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(lengths) and parts[0] == sorted(parts[0])
    assert sum(lengths[i] for i in parts[0]) == sum(lengths[i] for i in parts[1]) == 86
