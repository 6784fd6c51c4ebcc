"""The launchers in launch/, slurm/ and the run files in configs/: every YAML is a valid run, every script parses,
the srun-without-torchrun launch and launch/torchrun.sh (one node and two "nodes") run for real against
Transformers, and the sbatch scripts build the intended command lines (Slurm itself is stubbed by two tiny
scripts on PATH; the real scheduler smoke test is slurm/cpu_test.sbatch)."""

import json
import os
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
SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "slurm").glob("*.sbatch"))
TIMEOUT = 150  # seconds for one distributed run; a hang fails the test instead of stalling the suite

# What a launcher may have left in our own environment; each test says exactly what its processes see.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_ID", "CONFIG", "MODEL", "OUTPUT")


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


def test_scripts_exist():
    names = {f"{p.parent.name}/{p.name}" for p in SCRIPTS}
    assert {"launch/torchrun.sh", "slurm/generate.sbatch", "slurm/generate_srun.sbatch",
            "slurm/cpu_test.sbatch"} <= names


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
    """launch/torchrun.sh with its single-node defaults, over configs/tiny-cpu.yaml with flags winning."""
    out = tmp_path / "out.jsonl"
    cmd = [str(ROOT / "launch/torchrun.sh"), "--config", str(ROOT / "configs/tiny-cpu.yaml"), "--model",
           str(tiny[0]), "--tp", "1", "--pp", "2", "--prompt", "hi", "--max-new-tokens", "4", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
                          env=clean_env(NPROC_PER_NODE=2, MASTER_PORT=free_port()))
    assert proc.returncode == 0, proc.stderr[-3000:]  # the YAML's tp 2 x pp 2 would not fit 2 processes
    check_output(out, tiny, "hi", 4)


def test_torchrun_sh_two_nodes(tiny, tmp_path):
    """The multi-node path (c10d rendezvous): two copies of the script, one per "node", one process each."""
    out = tmp_path / "out.jsonl"
    cmd = [str(ROOT / "launch/torchrun.sh"), "--model", str(tiny[0]), "--device", "cpu", "--pp", "2",
           "--prompt", "hello world", "--max-new-tokens", "5", "--output", str(out)]
    port = free_port()
    procs = [subprocess.Popen(cmd, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=clean_env(NNODES=2, NODE_RANK=node, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1",
                                            MASTER_PORT=port, RDZV_ID=f"test-{port}"))
             for node in (0, 1)]
    for node, (rc, stderr) in enumerate(wait_all(procs)):
        assert rc == 0, f"node {node}: {stderr[-3000:]}"
    check_output(out, tiny, "hello world", 5)


# ---- sbatch scripts with Slurm stubbed -----------------------------------------------------------------------------

SCONTROL_STUB = """#!/bin/bash
# `scontrol show hostnames LIST` and `scontrol show node NAME`, as a 2-node cluster whose names are not DNS names.
case "$2" in
  hostnames) printf 'gpu-a1\\ngpu-a2\\n' ;;
  node) printf 'NodeName=%s Arch=x86_64 CoresPerSocket=8\\n   NodeAddr=%s NodeHostName=%s Version=22.05\\n' \\
          "$3" "$STUB_NODE_ADDR" "$3" ;;
  *) exit 2 ;;
esac
"""

SRUN_STUB = """#!/bin/bash
# Record the command line and rendezvous variables; with STUB_RUN_TASKS, start that many tasks as srun would.
printf '%s\\n' "$@" > "$STUB_LOG"
echo "MASTER_ADDR=${MASTER_ADDR:-} MASTER_PORT=${MASTER_PORT:-}" > "$STUB_LOG.env"
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

    def run_sbatch(script: str, *args, **env):
        job = dict(SLURM_JOB_ID=4242, SLURM_JOB_NODELIST="gpu-a[1-2]", SLURM_NNODES=2, STUB_NODE_ADDR="10.9.8.7")
        job_env = clean_env(**{**job, **env}, STUB_LOG=log)
        job_env["PATH"] = f"{bin_dir}{os.pathsep}{job_env['PATH']}"
        proc = subprocess.run(["bash", str(ROOT / script), *args], cwd=ROOT, env=job_env, capture_output=True,
                              text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return log.read_text().splitlines(), log.with_name("srun.log.env").read_text().split()

    return run_sbatch


def test_generate_sbatch_runs_torchrun_per_node(slurm_stubs):
    argv, _ = slurm_stubs("slurm/generate.sbatch", "--max-new-tokens", "3")
    command = " ".join(argv)
    assert argv[argv.index("torchrun") + 1:argv.index("-m")] == [
        "--nnodes", "2", "--nproc-per-node", "8", "--rdzv-id", "4242", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "10.9.8.7:29500"]  # the head node's NodeAddr, not its name
    assert command.endswith("-m distllama.generate --config configs/llama3-70b-2node.yaml --max-new-tokens 3")
    assert (ROOT / "configs/llama3-70b-2node.yaml").is_file()


def test_generate_srun_sbatch_exports_the_rendezvous(slurm_stubs):
    argv, rendezvous = slurm_stubs("slurm/generate_srun.sbatch", SLURM_NTASKS=16, CONFIG="configs/tiny-cpu.yaml")
    assert rendezvous == ["MASTER_ADDR=10.9.8.7", "MASTER_PORT=24242"]  # 20000 + job id % 10000
    assert "torchrun" not in argv
    assert " ".join(argv).endswith("python -m distllama.generate --config configs/tiny-cpu.yaml")


def test_cpu_test_sbatch_end_to_end(slurm_stubs, tiny, tmp_path):
    """slurm/cpu_test.sbatch with an srun stub that starts its 2 tasks for real: the scheduler's part aside, the
    same run a Slurm smoke test makes."""
    out = tmp_path / "cpu-test.jsonl"
    slurm_stubs("slurm/cpu_test.sbatch", SLURM_NTASKS=2, STUB_RUN_TASKS=2, STUB_NODE_ADDR="127.0.0.1",
                MASTER_PORT=free_port(), MODEL=tiny[0], OUTPUT=out, PYTHON=sys.executable)
    check_output(out, tiny, "hello world", 8)


def test_cpu_test_sbatch_needs_a_model(slurm_stubs):
    with pytest.raises(AssertionError, match="set MODEL"):
        slurm_stubs("slurm/cpu_test.sbatch", SLURM_NTASKS=2)
