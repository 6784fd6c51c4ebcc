"""The slurm/ scripts submitted for real: a two-node Slurm cluster started on this machine (tests/slurm/cluster.sh:
slurmctld, and each slurmd in a network namespace of its own), `sbatch --wait` on CPU, each script changed only
through the sbatch options and variables its header documents. A run's results must equal a single plain process's
on the same prompts (itself checked against Transformers); a failing job must fail sbatch and say why in one line.

Where Slurm cannot run (not installed, not root, no network namespaces) the tests skip and say why; with
DISTLLAMA_REQUIRE_SLURM=1, which .ci/run sets, they fail instead."""

import fcntl
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from checkpoints import PROMPTS, build_checkpoint, hf_greedy

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
LOCK = Path("/tmp/distllama-slurm.lock")  # one test cluster per machine: its names and ports are fixed
TINY_RUN = ROOT / "configs" / "tiny-cpu.yaml"  # tp 2 x pp 2, float32, batch 4, 16 new tokens, two text prompts
JOB_TIMEOUT = 240  # seconds for one `sbatch --wait`; the job is cancelled past it
REQUIRED = os.environ.get("DISTLLAMA_REQUIRE_SLURM") == "1"
ERROR = "distllama: error: "


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"DISTLLAMA_REQUIRE_SLURM=1, but {reason}", pytrace=False)
    pytest.skip(reason)


def job_env(**extra) -> dict:
    """Our environment without what a launcher or an outer Slurm job left in it, this interpreter first on PATH."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES",
                "NODE_RANK", "NPROC_PER_NODE", "CONFIG", "MODEL", "OUTPUT", "SHARDS")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher and not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "TORCHELASTIC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **{k: str(v) for k, v in extra.items()}}


@pytest.fixture(scope="module")
def cluster():
    """Start the cluster (taking down one a crashed run left behind), yield the clients' environment, stop it."""
    needed = ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged"]
    missing = [p for p in needed if not os.access(p, os.X_OK)]
    missing += [b for b in ("sbatch", "scontrol", "sinfo", "scancel", "munge", "ip", "nsenter", "unshare", "setpriv")
                if shutil.which(b) is None]
    if missing:
        unavailable(f"Slurm is not installed (missing {', '.join(missing)}): "
                    "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        unavailable("the test cluster needs root, to start slurmd in network namespaces")
    with open(LOCK, "w") as lock:
        for _ in range(900):  # a concurrent test run holds the cluster: wait for it
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(1)
        else:
            unavailable(f"another test run has held the Slurm test cluster ({LOCK}) for 15 minutes")
        try:
            up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=120)
            if up.returncode != 0:
                unavailable(f"the test cluster did not start (tests/slurm/cluster.sh up):\n{up.stderr[-3000:]}")
            conf = up.stdout.strip().rsplit("SLURM_CONF=", 1)[1]
            yield {"SLURM_CONF": conf}
        finally:
            down = subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, f"tests/slurm/cluster.sh down failed: {down.stderr[-3000:]}"


class Job:
    def __init__(self, rc: int, job_id: str, log: str):
        self.rc, self.id, self.log = rc, job_id, log

    def errors(self) -> list[str]:
        return [line for line in self.log.splitlines() if line.startswith(ERROR)]


def sbatch(cluster, tmp_path, script: str, *options: str, args=(), **variables) -> Job:
    """`sbatch --wait [options] slurm/<script> [args]` from the repository root, with the variables set; the job's
    log goes to tmp_path. The job is cancelled if it outlives JOB_TIMEOUT."""
    log_pattern = tmp_path / "job-%j.out"
    cmd = ["sbatch", "--wait", "--parsable", f"--output={log_pattern}", *options, f"slurm/{script}", *map(str, args)]
    env = job_env(**cluster, **variables)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        job_id = (e.stdout or b"").decode().split(";")[0].strip()
        if job_id:
            subprocess.run(["scancel", job_id], env=env, timeout=30)
        pytest.fail(f"{script}: job {job_id or '?'} still ran after {JOB_TIMEOUT} s")
    job_id = proc.stdout.split(";")[0].strip()
    assert job_id.isdigit(), f"sbatch did not submit {script}: {proc.stderr}"
    logs = sorted(tmp_path.glob(f"job-{job_id}*.out")) or sorted(tmp_path.glob("job-*.out"))
    return Job(proc.returncode, job_id, "\n".join(p.read_text() for p in logs))


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_same_results(records: list[dict], reference: list[dict], keys=("index", "input_ids", "output_ids", "text",
                                                                          "finish_reason")) -> None:
    assert len(records) == len(reference)
    for record, expected in zip(records, reference):
        for key in keys:
            assert record[key] == expected[key], f"prompt {expected['index']}: {key} differs"
        worst = max(abs(a - b) for a, b in zip(record["token_logprobs"], expected["token_logprobs"], strict=True))
        assert worst < 1e-4, f"prompt {expected['index']}: token_logprobs differ by {worst}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny checkpoint (and a copy without its tokenizer), prompts as token ids, and the reference: configs/tiny-cpu
    .yaml's run of them as one plain process, which must itself be Transformers' greedy generate."""
    root = tmp_path_factory.mktemp("slurm")
    model_dir = root / "tiny"
    model = build_checkpoint(model_dir, seed=11)
    no_tokenizer = root / "tiny-no-tokenizer"
    no_tokenizer.mkdir()
    for file in model_dir.iterdir():
        if not file.name.startswith("tokenizer"):
            shutil.copy(file, no_tokenizer / file.name)
    prompts_file = root / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in PROMPTS))

    reference_file = root / "reference.jsonl"
    proc = subprocess.run([sys.executable, "-m", "distllama.generate", "--config", str(TINY_RUN), "--model",
                           str(model_dir), "--tp", "1", "--pp", "1", "--prompts-file", str(prompts_file),
                           "--output", str(reference_file)],
                          cwd=root, env=job_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = read_jsonl(reference_file)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [tokenizer(text).input_ids for text in ("hello world", "The quick brown fox")]  # the YAML's prompts
    prompts = texts + PROMPTS
    expected = [seq for first in range(0, len(prompts), 4) for seq in hf_greedy(model, prompts[first:first + 4], 16)]
    for record, ids, theirs in zip(reference, prompts, expected, strict=True):
        assert record["input_ids"] == ids and record["output_ids"] == theirs["output_ids"]
        assert record["text"] == tokenizer.decode(theirs["output_ids"], skip_special_tokens=True)
    return {"model": model_dir, "no_tokenizer": no_tokenizer, "prompts": prompts_file, "reference": reference,
            "hf_model": model}


def banner(job: Job) -> str:
    [line] = [line for line in job.log.splitlines() if line.startswith("distllama: job ")]
    return line


def test_cpu_test_one_node_checkpoint_without_tokenizer(cluster, run, tmp_path):
    """slurm/cpu_test.sbatch on one node: its arguments replace its default prompt, so a checkpoint without
    tokenizer.json runs prompts given as token ids."""
    out = tmp_path / "out.jsonl"
    job = sbatch(cluster, tmp_path, "cpu_test.sbatch", "--nodes=1",
                 args=["--prompts-file", run["prompts"], "--max-new-tokens", 16],
                 MODEL=run["no_tokenizer"], OUTPUT=out)
    assert job.rc == 0, job.log
    assert re.search(r"on node\d: 2 ranks of 1 thread\(s\)", banner(job)), banner(job)
    records = read_jsonl(out)
    reference = run["reference"][2:]  # the reference's first two prompts are the YAML's texts
    assert [r["text"] for r in records] == [None] * len(reference)  # no tokenizer, no text
    assert [r["index"] for r in records] == [r["index"] - 2 for r in reference]
    assert_same_results(records, reference, keys=("input_ids", "output_ids", "finish_reason"))


def test_generate_srun_two_nodes_tp2_pp2(cluster, run, tmp_path):
    """slurm/generate_srun.sbatch on a CPU partition: no GPUs, 2 ranks per node, the tiny YAML run (tp 2 x pp 2),
    so each node holds one pipeline stage and the hidden states cross between the namespaces."""
    out = tmp_path / "out.jsonl"
    job = sbatch(cluster, tmp_path, "generate_srun.sbatch", "--gpus-per-node=0", "--ntasks-per-node=2",
                 args=["--model", run["model"], "--prompts-file", run["prompts"], "--output", out], CONFIG=TINY_RUN)
    assert job.rc == 0, job.log
    assert "on node[1-2]: 4 ranks of 1 thread(s)" in banner(job)
    assert_same_results(read_jsonl(out), run["reference"])
    details = subprocess.run(["scontrol", "show", "job", job.id], env=job_env(**cluster), capture_output=True,
                             text=True, timeout=30).stdout
    assert "Requeue=1" in details  # the #SBATCH lines were read (sbatch ignores any after the first command)


def test_generate_torchrun_two_nodes_tp2_pp2(cluster, run, tmp_path):
    """slurm/generate.sbatch on a GPU partition: one torchrun per node, c10d rendezvous at the first node's address,
    a rank per GPU Slurm gave the node (the test nodes' GPUs are only names, so the ranks still run on CPU)."""
    out = tmp_path / "out.jsonl"
    job = sbatch(cluster, tmp_path, "generate.sbatch", "--gpus-per-node=2",
                 args=["--model", run["model"], "--prompts-file", run["prompts"], "--output", out], CONFIG=TINY_RUN)
    assert job.rc == 0, job.log
    assert "on node[1-2]: 2 rank(s) per node of 1 thread(s)" in banner(job)
    assert_same_results(read_jsonl(out), run["reference"])


def test_launch_torchrun_sh_on_two_nodes(cluster, run, tmp_path):
    """launch/torchrun.sh run on each node (here by srun, as by hand or ssh elsewhere) with MASTER_ADDR naming the
    first node: the c10d rendezvous across two network namespaces, 2 ranks per node, tp 2 x pp 2."""
    out = tmp_path / "out.jsonl"
    cmd = ["srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", "--kill-on-bad-exit=1",
           "bash", "-c", 'NODE_RANK=$SLURM_NODEID exec launch/torchrun.sh "$@"', "torchrun.sh",
           "--config", str(TINY_RUN), "--model", str(run["model"]), "--prompts-file", str(run["prompts"]),
           "--output", str(out)]
    env = job_env(**cluster, NNODES=2, MASTER_ADDR="node1", NPROC_PER_NODE=2, OMP_NUM_THREADS=1)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_results(read_jsonl(out), run["reference"])


@pytest.mark.parametrize("script, option, variables", [("generate_srun.sbatch", "--ntasks-per-node=2", {}),
                                                      ("generate.sbatch", "--nodes=2", {"NPROC_PER_NODE": 2})])
def test_failing_job_fails_sbatch_with_one_error_line(cluster, run, tmp_path, script, option, variables):
    """A bad --model on all 4 ranks of 2 nodes (2 per node): sbatch --wait fails, and the log says why once (not once
    per rank, and without torchrun's failure report)."""
    missing = tmp_path / "no-such-model"
    job = sbatch(cluster, tmp_path, script, "--gpus-per-node=0", option, args=["--model", missing], CONFIG=TINY_RUN,
                 **variables)
    assert job.rc != 0, job.log
    assert job.errors() == [f"{ERROR}{missing}: neither an existing folder nor a hub id of the form org/name"], job.log
    assert not [noise for noise in ("Traceback", "ChildFailedError", "frame #") if noise in job.log], job.log


def test_job_array_runs_one_shard_per_task(cluster, run, tmp_path):
    """slurm/generate_array.sbatch as a 2-task array: task I runs --shard I/2 on a node of its own and writes
    out.shard-I-of-2.jsonl; `distllama merge` joins them into the whole run, each prompt once, in input order."""
    out = tmp_path / "out.jsonl"
    job = sbatch(cluster, tmp_path, "generate_array.sbatch", "--array=0-1", "--gpus-per-node=0",
                 "--ntasks-per-node=2", args=["--model", run["model"], "--prompts-file", run["prompts"], "--tp", 2,
                                              "--pp", 1], CONFIG=TINY_RUN, OUTPUT=out)
    assert job.rc == 0, job.log
    shards = [read_jsonl(tmp_path / f"out.shard-{i}-of-2.jsonl") for i in range(2)]
    for i, shard in enumerate(shards):
        assert [r["index"] % 2 for r in shard] == [i] * len(shard)
    merge = subprocess.run([sys.executable, "-m", "distllama", "merge", str(out),
                            *(str(tmp_path / f"out.shard-{i}-of-2.jsonl") for i in range(2))],
                           capture_output=True, text=True, timeout=60)
    assert merge.returncode == 0, merge.stderr
    assert_same_results(read_jsonl(out), run["reference"])


def submit(cluster, tmp_path, script: str, *options: str, args=(), **variables) -> str:
    """sbatch without --wait: the job id."""
    cmd = ["sbatch", "--parsable", f"--output={tmp_path / 'job-%j.out'}", *options, f"slurm/{script}",
           *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(**cluster, **variables), capture_output=True, text=True,
                          timeout=30)
    job_id = proc.stdout.split(";")[0].strip()
    assert job_id.isdigit(), f"sbatch did not submit {script}: {proc.stderr}"
    return job_id


def job_state(cluster, job_id: str) -> str:
    details = subprocess.run(["scontrol", "show", "job", job_id], env=job_env(**cluster), capture_output=True,
                             text=True, timeout=30).stdout
    found = re.search(r"JobState=(\S+)", details)
    return found.group(1) if found else "GONE"  # forgotten MinJobAge seconds after it ended


def wait_for(condition, what: str, timeout: float = JOB_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    pytest.fail(f"waited {timeout} s for {what}")


def lines_of(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_cancelled_and_requeued_jobs_resume_to_the_uninterrupted_file(cluster, run, tmp_path):
    """200 prompts through slurm/generate_srun.sbatch, stopped midway twice: by scancel, then resubmitted with
    --resume; and by `scontrol requeue`, after which the requeued job resumes by itself (SLURM_RESTART_COUNT > 0).
    Both files end equal to an uninterrupted plain run's (itself Transformers' greedy generate on each prompt alone):
    every prompt once, in input order."""
    rng = random.Random(7)
    prompts = tmp_path / "prompts.jsonl"
    ids = [[1] + [rng.randrange(3, 300) for _ in range(rng.randint(2, 20))] for _ in range(200)]
    prompts.write_text("".join(json.dumps({"input_ids": prompt}) + "\n" for prompt in ids))
    args = ["--model", run["model"], "--prompts-file", prompts, "--tp", 1, "--pp", 1, "--max-batch-size", 2,
            "--max-new-tokens", 24]
    reference_file = tmp_path / "reference.jsonl"
    plain = subprocess.run([sys.executable, "-m", "distllama.generate", "--config", str(TINY_RUN),
                            *map(str, args), "--output", str(reference_file)],
                           cwd=tmp_path, env=job_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    reference = read_jsonl(reference_file)
    assert len(reference) == 202  # the YAML's two text prompts, then the file's
    expected = hf_greedy(run["hf_model"], [r["input_ids"] for r in reference], 24)  # each prompt alone
    assert [r["output_ids"] for r in reference] == [e["output_ids"] for e in expected]
    one_node = ("--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0")

    # scancel midway (SIGTERM to every rank: the finished results are written), then --resume
    out = tmp_path / "cancelled.jsonl"
    job_id = submit(cluster, tmp_path, "generate_srun.sbatch", *one_node, args=[*args, "--output", out],
                    CONFIG=TINY_RUN)
    wait_for(lambda: lines_of(out) >= 40, "40 results of the first job")
    subprocess.run(["scancel", job_id], env=job_env(**cluster), check=True, timeout=30)
    wait_for(lambda: job_state(cluster, job_id) in ("CANCELLED", "GONE"), "the cancelled job to end")
    kept = lines_of(out)
    assert 40 <= kept < 202, f"{kept} lines: the job was not stopped midway"
    job = sbatch(cluster, tmp_path, "generate_srun.sbatch", *one_node, args=[*args, "--output", out, "--resume"],
                 CONFIG=TINY_RUN)
    assert job.rc == 0, job.log
    assert_same_results(read_jsonl(out), reference)

    # requeued midway (as after a pre-emption): the job runs again and continues the file by itself
    out = tmp_path / "requeued.jsonl"
    job_id = submit(cluster, tmp_path, "generate_srun.sbatch", *one_node, args=[*args, "--output", out],
                    CONFIG=TINY_RUN)
    wait_for(lambda: lines_of(out) >= 40, "40 results of the second job")
    subprocess.run(["scontrol", "requeue", job_id], env=job_env(**cluster), check=True, timeout=30)
    # the requeued job starts again after its begin time (about 2 minutes in Slurm 22.05): forcing it sooner races
    # slurmd's revocation of the first run's credential ("Job credential revoked")
    wait_for(lambda: job_state(cluster, job_id) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"),
             "the requeued job to finish", timeout=400)
    log = "\n".join(p.read_text() for p in tmp_path.glob(f"job-{job_id}.out"))
    details = subprocess.run(["scontrol", "show", "job", job_id], env=job_env(**cluster), capture_output=True,
                             text=True, timeout=30).stdout
    assert job_state(cluster, job_id) in ("COMPLETED", "GONE"), log + details
    assert log.count("distllama: job ") == 2, log  # it ran twice, appending to its log
    assert_same_results(read_jsonl(out), reference)
