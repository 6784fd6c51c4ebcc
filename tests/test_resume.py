"""A batch job interrupted and resumed: SIGKILL of the whole job (nothing can be flushed) and SIGTERM (Slurm's scancel
and pre-emption: the finished results are flushed, the exit is non-zero with a message), each followed by --resume.
The final file holds every prompt once, in input order, and equals an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from checkpoints import build_checkpoint
from test_replicas import assert_same_results

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPTS = 200


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    build_checkpoint(root / "model", seed=9)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": [1] + [(7 * i + j) % 290 + 5 for j in range(3 + i % 9)]}) + "\n"
                               for i in range(PROMPTS)))
    return root


def command(root, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
            "distllama.generate", "--model", str(root / "model"), "--device", "cpu", "--pp", "2",
            "--prompts-file", str(root / "prompts.jsonl"), "--max-new-tokens", "40", "--max-batch-size", "4",
            "--output", str(out), *extra]


def lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def interrupt(cmd, out, at_least: int, sig: int) -> subprocess.CompletedProcess:
    """Start the job, and once out holds at_least lines: SIGKILL every one of its processes (as a node failure or
    Slurm's final kill does), or send SIGTERM to the launcher (as scancel does; torchrun passes it on)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while lines(out) < at_least and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()[1][-2000:]}"
    for pid in descendants(proc.pid) if sig == signal.SIGKILL else [proc.pid]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_killed_and_stopped_job_resumes_to_the_uninterrupted_file(job):
    reference = job / "reference.jsonl"
    done = subprocess.run(command(job, reference), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    out = job / "out.jsonl"
    killed = interrupt(command(job, out), out, 30, signal.SIGKILL)
    assert killed.returncode != 0
    kept = lines(out)
    assert 30 <= kept < PROMPTS

    stopped = interrupt(command(job, out, "--resume"), out, kept + 30, signal.SIGTERM)
    assert stopped.returncode != 0
    assert "distllama: stopped by SIGTERM" in stopped.stderr and "--resume" in stopped.stderr, stopped.stderr[-3000:]
    assert kept + 30 <= lines(out) < PROMPTS

    finished = subprocess.run(command(job, out, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().split("\n")[:-1]]  # JSON text may hold U+2028
    assert [r["index"] for r in records] == list(range(PROMPTS))  # each prompt once, in input order
    assert_same_results(records, [json.loads(line) for line in reference.read_text().split("\n")[:-1]])
