"""The benchmark runs and reports its figures against the bandwidth baseline it measures (no timing asserted)."""

import os
import subprocess
import sys

from checkpoints import build_checkpoint


def test_bench_reports_decode_against_measured_bandwidth(tmp_path):
    build_checkpoint(tmp_path / "model")
    proc = subprocess.run([sys.executable, "-m", "distllama", "bench", "--model", str(tmp_path / "model"),
                           "--device", "cpu", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == [
        "prefill", "decode", "baseline (same process)", "decode step / weight-read floor"]
