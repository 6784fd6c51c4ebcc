"""The launchers in launch/, slurm/ and the run files in configs/: every YAML is a valid run, every script parses,
the srun-without-torchrun launch and launch/torchrun.sh on one node run for real against Transformers,
launch/torchrun.sh refuses a multi-node run without a master address the nodes can reach, and the sbatch scripts
build the intended command lines from the allocation (Slurm stubbed by two tiny scripts on PATH). Real nodes:
tests/test_slurm.py submits the scripts to a two-node Slurm cluster and runs launch/torchrun.sh on both nodes."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from checkpoints import build_checkpoint, free_port, hf_greedy
from distllama.generate import RUN_KEYS, build_parser, parse_args, read_yaml
from distllama.options import resolve_options

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SCRIPTS = (sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "slurm").glob("*.sbatch"))
           + sorted((ROOT / "tests" / "slurm").glob("*.sh")))
TIMEOUT = 150  # seconds for one distributed run; a hang fails the test instead of stalling the suite

# What a launcher may have left in our own environment; each test says exactly what its processes see.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_ID", "CONFIG", "MODEL", "OUTPUT", "SHARDS")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    # torchrun and python must be this interpreter's, as the scripts call them by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **{k: str(v) for k, v in extra.items()}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("launch") / "tiny"
    model = build_checkpoint(folder, seed=5)
    return folder, model, AutoTokenizer.from_pretrained(folder)


def check_output(path: Path, tiny, text: str, max_new_tokens: int) -> None:
    """The JSONL rank 0 wrote holds Transformers' greedy continuation of text."""
    _, model, tokenizer = tiny
    prompt = tokenizer(text).input_ids
    expected = hf_greedy(model, [prompt], max_new_tokens)[0]
    [record] = [json.loads(line) for line in path.read_text().split("\n")[:-1]]
    assert record["input_ids"] == prompt
    assert record["output_ids"] == expected["output_ids"]
    assert max(abs(a - b) for a, b in zip(record["token_logprobs"], expected["token_logprobs"], strict=True)) < 1e-4
    assert record["text"] == tokenizer.decode(expected["output_ids"], skip_special_tokens=True)


def wait_all(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Return code and stderr of each process; kill every one of them if any outlives TIMEOUT."""
    results = []
    try:
        for p in procs:
            stderr = p.communicate(timeout=TIMEOUT)[1]
            results.append((p.returncode, stderr))
        return results
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a launched process hung")
    finally:
        for p in procs:
            p.wait()


# ---- configs/ ------------------------------------------------------------------------------------------------------

def test_the_documented_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny-cpu.yaml", "llama3-8b-tp8.yaml", "llama3-70b-2node.yaml"} <= names


def yaml_as_flags(values: dict) -> list[str]:
    """The run keys of a YAML file as the command line that means the same."""
    argv = []
    for key, value in values.items():
        if key not in RUN_KEYS:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_valid_run(path):
    values = read_yaml(str(path))  # unknown keys raise here
    _, yaml_options, cli_options = parse_args(["--config", str(path)])
    assert cli_options == {}
    resolve_options({}, yaml_options, {})  # generation options: types and ranges
    # Run keys: the same types and choices the flags accept (argparse exits on a bad one).
    try:
        build_parser().parse_args(yaml_as_flags(values))
    except SystemExit:
        pytest.fail(f"{path.name}: a run key has a value its flag would refuse (see the argparse message above)")


# ---- scripts -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_parses(path):
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert path.read_text().startswith("#!"), "scripts start with a shebang"
    assert "set -euo pipefail" in path.read_text()
    if path.suffix == ".sh":
        assert path.stat().st_mode & stat.S_IXUSR, f"{path.name} is run directly: it must be executable"
    else:  # sbatch reads #SBATCH lines only before the first command, and silently ignores any after it
        lines = path.read_text().splitlines()
        first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
        assert not [line for line in lines[first_command:] if line.startswith("#SBATCH")]
        assert "#SBATCH --requeue" in lines and any(line.startswith("#SBATCH --signal=USR1@") for line in lines)


def test_scripts_exist():
    names = {f"{p.parent.name}/{p.name}" for p in SCRIPTS}
    assert {"launch/torchrun.sh", "slurm/generate.sbatch", "slurm/generate_srun.sbatch", "slurm/cpu_test.sbatch",
            "slurm/generate_array.sbatch"} <= names


def test_sbatch_scripts_repeat_their_helpers_alike():
    """Each sbatch script stands alone (a cluster user copies one), so a few blocks repeat: they must not drift."""
    def helpers(path: Path) -> list[str]:
        text = path.read_text()
        output_filter = re.search(r"^# Slurm ends a job.*?^}$", text, flags=re.S | re.M).group()
        head_node = [line for line in text.splitlines() if line.startswith(("nodes=", "head_node=", "head_addr=$("))]
        return [output_filter, *head_node]

    sbatch_scripts = [p for p in SCRIPTS if p.suffix == ".sbatch"]
    first, *others = map(helpers, sbatch_scripts)
    for path, theirs in zip(sbatch_scripts[1:], others):
        assert theirs == first, f"{path.name} differs from {sbatch_scripts[0].name}"


# ---- real runs -----------------------------------------------------------------------------------------------------

def test_srun_style_launch_without_torchrun(tiny, tmp_path):
    """Two plain processes that only know their SLURM_* variables and MASTER_ADDR/PORT, as `srun python` starts them."""
    folder = tiny[0]
    out = tmp_path / "out.jsonl"
    port = free_port()
    args = [sys.executable, "-m", "distllama.generate", "--model", str(folder), "--pp", "2", "--device", "cpu",
            "--prompt", "hi", "--max-new-tokens", "4", "--output", str(out), "--dist-timeout", "60"]
    procs = [subprocess.Popen(args, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=clean_env(SLURM_PROCID=task, SLURM_NTASKS=2, SLURM_LOCALID=task,
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for task in (0, 1)]
    for task, (rc, stderr) in enumerate(wait_all(procs)):
        assert rc == 0, f"task {task}: {stderr[-3000:]}"
    check_output(out, tiny, "hi", 4)


def test_torchrun_sh_one_node(tiny, tmp_path):
    """launch/torchrun.sh with its single-node defaults (torchrun picks a free port), over configs/tiny-cpu.yaml
    with flags winning."""
    out = tmp_path / "out.jsonl"
    cmd = [str(ROOT / "launch/torchrun.sh"), "--config", str(ROOT / "configs/tiny-cpu.yaml"), "--model",
           str(tiny[0]), "--tp", "1", "--pp", "2", "--prompt", "hi", "--max-new-tokens", "4", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
                          env=clean_env(NPROC_PER_NODE=2))
    assert proc.returncode == 0, proc.stderr[-3000:]  # the YAML's tp 2 x pp 2 would not fit 2 processes
    check_output(out, tiny, "hi", 4)


@pytest.mark.parametrize("master_addr, node_rank, says", [
    (None, 0, "NNODES=2 needs MASTER_ADDR"),
    ("127.0.0.1", 0, "MASTER_ADDR=127.0.0.1 is a loopback address"),
    ("localhost", 1, "MASTER_ADDR=localhost is a loopback address"),
    ("no-such-host.invalid", 1, "MASTER_ADDR=no-such-host.invalid does not resolve"),
])
def test_torchrun_sh_refuses_a_master_other_nodes_cannot_reach(master_addr, node_rank, says):
    """Several nodes and no master address, or one only this node reaches: each node would rendezvous with itself
    and wait until the time limit, so the script refuses at once, before torchrun starts."""
    env = clean_env(NNODES=2, NODE_RANK=node_rank, NPROC_PER_NODE=1)
    if master_addr:
        env["MASTER_ADDR"] = master_addr
    env["PATH"] = os.pathsep.join(["/nonexistent", env["PATH"]])
    proc = subprocess.run([str(ROOT / "launch/torchrun.sh"), "--model", "x"], capture_output=True, text=True,
                          timeout=30, env=env)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith("launch/torchrun.sh: error: ") and says in line


# ---- sbatch scripts with Slurm stubbed -----------------------------------------------------------------------------

SCONTROL_STUB = """#!/bin/bash
# `scontrol show hostnames LIST` and `scontrol show node NAME`, as a cluster whose names are not DNS names. The
# node list is long: a script that reads only its first line through a pipe (`| head -n1`) would die of SIGPIPE.
case "$2" in
  hostnames) printf 'gpu-a1\ngpu-a2\n'; seq -f 'gpu-b%g' 100000 ;;
  node) printf 'NodeName=%s Arch=x86_64 CoresPerSocket=8\n   NodeAddr=%s NodeHostName=%s Version=22.05\n' \
          "$3" "$STUB_NODE_ADDR" "$3" ;;
  *) exit 2 ;;
esac
"""

SRUN_STUB = """#!/bin/bash
# Record the command line and the variables the ranks would see; with STUB_RUN_TASKS, start that many tasks as srun
# would.
printf '%s\\0' "$@" > "$STUB_LOG"  # NUL-separated: an argument may span lines
echo "MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-} OMP_NUM_THREADS=${OMP_NUM_THREADS:-}" > "$STUB_LOG.env"
[[ -n ${STUB_RUN_TASKS:-} ]] || exit 0
while [[ $1 == -* ]]; do shift; done  # srun's own options, all written --name=value
pids=()
for ((task = 0; task < STUB_RUN_TASKS; task++)); do
  SLURM_PROCID=$task SLURM_LOCALID=$task SLURM_NTASKS=$STUB_RUN_TASKS "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


@pytest.fixture
def slurm_stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", SCONTROL_STUB), ("srun", SRUN_STUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "srun.log"

    def run_sbatch(script: str, *args, expect_rc: int = 0, **env):
        """The script as a batch job would run it; srun's command line, and the variables srun passed on."""
        job = dict(SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="gpu-a[1-2]", SLURM_NNODES=2, STUB_NODE_ADDR="10.9.8.7")
        job_env = clean_env(**{**job, **env}, STUB_LOG=log)
        job_env["PATH"] = f"{bin_dir}{os.pathsep}{job_env['PATH']}"
        proc = subprocess.run(["bash", str(ROOT / script), *args], cwd=ROOT, env=job_env, capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
        if expect_rc:
            return proc.stdout + proc.stderr
        variables = dict(v.split("=", 1) for v in log.with_name("srun.log.env").read_text().split())
        return log.read_text().split("\0")[:-1], variables

    return run_sbatch


def torchrun_args(argv: list[str]) -> list[str]:
    """What slurm/generate.sbatch hands to torchrun (through its `python -c` wrapper), up to `-m`."""
    code = next(a for a in argv if "from torch.distributed.run import main" in a)
    return argv[argv.index(code) + 1:argv.index("-m")]


def test_generate_sbatch_runs_torchrun_per_node(slurm_stubs):
    argv, variables = slurm_stubs("slurm/generate.sbatch", "--max-new-tokens", "3", SLURM_GPUS_ON_NODE=8,
                                  SLURM_CPUS_PER_TASK=32)
    assert torchrun_args(argv) == [
        "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-id", "4242", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "10.9.8.7:24242"]  # the head node's NodeAddr, not its name; a port of this job's own
    assert "--cpus-per-task=32" in argv  # srun 22.05 does not take it over from sbatch
    assert variables["OMP_NUM_THREADS"] == "4"  # the node's 32 CPUs shared by its 8 ranks
    assert " ".join(argv).endswith("-m distllama.generate --config configs/llama3-70b-2node.yaml --max-new-tokens 3")
    assert (ROOT / "configs/llama3-70b-2node.yaml").is_file()


def test_generate_sbatch_without_gpus(slurm_stubs):
    """No GPUs: one rank per node unless NPROC_PER_NODE says more, and every rank at least one thread."""
    argv, variables = slurm_stubs("slurm/generate.sbatch", SLURM_GPUS_PER_NODE=0)
    assert torchrun_args(argv)[:4] == ["--nnodes", "2", "--nproc-per-node", "1"]
    assert variables["OMP_NUM_THREADS"] == "1"
    argv, variables = slurm_stubs("slurm/generate.sbatch", NPROC_PER_NODE=4, SLURM_CPUS_PER_TASK=2)
    assert torchrun_args(argv)[:4] == ["--nnodes", "2", "--nproc-per-node", "4"]
    assert variables["OMP_NUM_THREADS"] == "1"


def test_generate_srun_sbatch_exports_the_rendezvous(slurm_stubs):
    argv, variables = slurm_stubs("slurm/generate_srun.sbatch", SLURM_NTASKS=16, SLURM_CPUS_PER_TASK=6,
                                  CONFIG="configs/tiny-cpu.yaml")
    assert variables == {"MASTER_ADDR": "10.9.8.7", "MASTER_PORT": "24242",  # 20000 + job id % 10000
                         "OMP_NUM_THREADS": "6"}  # a thread per CPU Slurm gave the task
    assert "--cpus-per-task=6" in argv and "torchrun" not in argv
    assert " ".join(argv).endswith("python -m distllama.generate --config configs/tiny-cpu.yaml")
    _, variables = slurm_stubs("slurm/generate_srun.sbatch", SLURM_NTASKS=16, OMP_NUM_THREADS=8)
    assert variables["OMP_NUM_THREADS"] == "1"  # one CPU per task unless --cpus-per-task says more


ARRAY_TASK = dict(SLURM_ARRAY_JOB_ID=4240, SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_COUNT=4, SLURM_ARRAY_TASK_MIN=0,
                  SLURM_ARRAY_TASK_MAX=3, SLURM_NTASKS=8)


def test_generate_array_sbatch_runs_its_shard(slurm_stubs):
    argv, _ = slurm_stubs("slurm/generate_array.sbatch", "--prompts-file", "p.jsonl", **ARRAY_TASK,
                          OUTPUT="runs/out.jsonl")
    assert " ".join(argv).endswith("-m distllama.generate --config configs/llama3-8b-tp8.yaml --prompts-file p.jsonl"
                                   " --shard 1/4 --output runs/out.shard-1-of-4.jsonl")
    argv, _ = slurm_stubs("slurm/generate_array.sbatch", **ARRAY_TASK)
    assert argv[-4:] == ["--shard", "1/4", "--output", "distllama-4240.shard-1-of-4.jsonl"]
    # A rerun of some shards: the array's ids are no longer 0..N-1, so N must be given.
    rerun = {**ARRAY_TASK, "SLURM_ARRAY_TASK_ID": 5, "SLURM_ARRAY_TASK_MIN": 3, "SLURM_ARRAY_TASK_MAX": 5,
             "SLURM_ARRAY_TASK_COUNT": 2}
    assert "give the number of shards, e.g. SHARDS=N" in slurm_stubs("slurm/generate_array.sbatch", expect_rc=2,
                                                                      **rerun)
    argv, _ = slurm_stubs("slurm/generate_array.sbatch", **rerun, SHARDS=8)
    assert argv[-4:] == ["--shard", "5/8", "--output", "distllama-4240.shard-5-of-8.jsonl"]


def test_cpu_test_sbatch_end_to_end(slurm_stubs, tiny, tmp_path):
    """slurm/cpu_test.sbatch with an srun stub that starts its 2 tasks for real: the scheduler's part aside, the
    same run a Slurm smoke test makes (tests/test_slurm.py makes it under Slurm)."""
    out = tmp_path / "cpu-test.jsonl"
    slurm_stubs("slurm/cpu_test.sbatch", SLURM_NTASKS=2, STUB_RUN_TASKS=2, STUB_NODE_ADDR="127.0.0.1",
                MASTER_PORT=free_port(), MODEL=tiny[0], OUTPUT=out, PYTHON=sys.executable)
    check_output(out, tiny, "hello world", 8)


def test_cpu_test_sbatch_arguments_replace_its_default_run(slurm_stubs, tiny):
    argv, _ = slurm_stubs("slurm/cpu_test.sbatch", "--prompts-file", "ids.jsonl", SLURM_NTASKS=2, MODEL=tiny[0])
    assert "--prompt" not in argv and argv[-2:] == ["--prompts-file", "ids.jsonl"]


def test_cpu_test_sbatch_needs_a_model(slurm_stubs):
    assert "set MODEL" in slurm_stubs("slurm/cpu_test.sbatch", expect_rc=1, SLURM_NTASKS=2)
