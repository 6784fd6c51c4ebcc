"""The benchmark runs its workloads through the engine and reports them against the baselines it measures in the same
run (no timing asserted): the copy-bandwidth floor, Transformers, and one process alone under torchrun."""

import json
import os
import subprocess
import sys

import pytest

from checkpoints import build_checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "model"
    build_checkpoint(folder)
    return folder


def bench(*args, nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([sys.executable, *launcher, "-m", "distllama", "bench", *args], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_decode_against_bandwidth_and_transformers(model, tmp_path):
    out = tmp_path / "decode.json"
    proc = bench("--model", str(model), "--device", "cpu", "--batch-size", "2", "--prompt-len", "8",
                 "--new-tokens", "4", "--repeats", "1", "--compare-hf", "generate", "--json", str(out))
    figures = json.loads(out.read_text())
    [case] = figures["cases"]
    assert case["decode_ms_per_step"] > 0 and case["prefill_tokens_per_s"] > 0
    assert 0 < case["bandwidth_fraction"] and figures["peak_memory_mib"] > 0
    assert figures["hf"]["generate b2"]["decode_ms_per_step"] > 0
    assert "Transformers generate, batch 2 (runs interleaved with ours): decode" in proc.stdout


def test_job_against_transformers_in_interleaved_rounds(model, tmp_path):
    out = tmp_path / "job.json"
    proc = bench("--model", str(model), "--device", "cpu", "--workload", "job", "--batch-size", "4",
                 "--num-prompts", "10", "--min-prompt", "3", "--max-prompt", "20", "--new-tokens", "6",
                 "--repeats", "2", "--compare-hf", "generate", "--json", str(out))
    figures = json.loads(out.read_text())
    theirs = figures["hf"]["generate"]
    # one paired ratio per round, and the medians of both sides
    assert len(theirs["round_ratios"]) == 2 and all(r > 0 for r in theirs["round_ratios"])
    low, high = figures["seconds_spread"]
    assert low <= figures["seconds"] <= high and figures["prefill_s"] > 0
    assert theirs["seconds"] > 0 and theirs["prefill_s"] > 0 and theirs["generated"] > 0
    assert figures["peak_memory_includes_transformers"]
    assert "static batches of 4 (runs interleaved with ours, median of 2)" in proc.stdout
    assert "job: " in proc.stdout and "(median of 2, " in proc.stdout


def test_job_under_torchrun_against_one_process(model, tmp_path):
    out = tmp_path / "job.json"
    proc = bench("--model", str(model), "--device", "cpu", "--pp", "2", "--workload", "job", "--batch-size", "4",
                 "--num-prompts", "10", "--min-prompt", "3", "--max-prompt", "20", "--new-tokens", "6",
                 "--repeats", "1", "--compare-single", "--json", str(out), nproc=2)
    figures = json.loads(out.read_text())
    assert figures["pp"] == 2 and figures["num_prompts"] == 10
    # eos ids the model emits: rows end at different steps, and both runs generate the same tokens
    assert figures["generated_lengths"]["min"] < figures["generated_lengths"]["max"]
    assert figures["single"]["generated"] == figures["generated"]
    assert "one process alone" in proc.stdout


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh, the one-go check for a lent GPU, runs every step on the CPU with a tiny model."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu-check"
    proc = subprocess.run(["bash", os.path.join(root, "bench", "gpu_check.sh"), "--dry-run", str(out)], env={
        **ENV, "MODEL": str(tmp_path / "tiny")}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "FAILED" not in proc.stdout
    checks = json.loads((out / "gpu_parity.json").read_text())["checks"]
    assert len(checks) >= 10 and set(checks.values()) == {"ok"}, checks
    for name in ("decode.json", "compiled.json", "prefill.json"):
        assert json.loads((out / name).read_text()), name


def test_the_median_of_an_even_number_of_rounds_averages_the_middle_two():
    from distllama.bench import median

    rounds = [{"seconds": 20.0, "generated": 100, "tokens_per_s": 5.0},
              {"seconds": 10.0, "generated": 100, "tokens_per_s": 10.0}]
    assert median(rounds) == {"seconds": 15.0, "generated": 100, "tokens_per_s": 100 / 15.0}
    assert median(rounds + [{"seconds": 12.0, "generated": 100, "tokens_per_s": 100 / 12}])["seconds"] == 12.0
