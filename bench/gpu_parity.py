"""Parity on a GPU, against Transformers on the same GPU: what the CPU test suite proves, on cuda. Run by
bench/gpu_check.sh (which sets PYTHONPATH to the repository and tests/); --dry-run runs the same checks on the CPU.

  float32   tiny random models of several shapes, continuous batching (2 slots, 4-token prefill chunks): greedy tokens
            identical to Transformers' generate on each prompt alone, logprobs within 1e-4 (a token may differ only
            where Transformers' own two best scores are within 1e-4: checkpoints.assert_matches_hf)
  bfloat16  the same models in bfloat16 against Transformers in bfloat16: tokens identical up to the first step where
            Transformers' two best scores are within BF16_GAP, logprobs within BF16_LOGPROB until then
  compile   --compile (torch.compile; CUDA graphs on a GPU) gives the same tokens as eager
  ranks     the command line under torchrun: 2 ranks on the one GPU over gloo (tp 2, pp 2, and on cuda pp 2 with
            --compile), and nccl with 1 rank
Prints one line per check and exits non-zero if any fails.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from checkpoints import CASES, PROMPTS, assert_matches_hf, build_checkpoint, hf_alone
from distllama.checkpoint import resolve_checkpoint
from distllama.config import load_config
from distllama.distributed import init_grid
from distllama.engine import Engine
from distllama.generate import load_runner, make_requests
from distllama.options import resolve_options
from distllama.pipeline import Pipeline

BF16_GAP = 0.1  # logits: bfloat16 keeps about 3 significant digits, so near-ties below this may break either way
BF16_LOGPROB = 0.1
SHAPES = ["mha", "gqa_tied", "mqa", "head_dim", "bias", "rope_llama3", "rope_dynamic"]
MAX_NEW = 8


def engine_run(folder, device, dtype, compile=False, **values):
    ckpt = resolve_checkpoint(str(folder))
    config = load_config(ckpt.root)
    options = resolve_options({"eos_token_id": config.eos_token_ids}, {}, {"max_new_tokens": MAX_NEW, **values})
    runner, _ = load_runner(config, ckpt, GRIDS[device], dtype, options=options, compile=compile)
    engine = Engine(Pipeline(runner), 2, 4, static_decode=compile)
    finished = sorted(engine.generate(make_requests(PROMPTS, options, config, None)), key=lambda r: r.index)
    return [vars(r) for r in finished]


def check_bf16(ours: dict, theirs: dict, where: str) -> None:
    for step, (a, b) in enumerate(zip(ours["output_ids"], theirs["output_ids"])):
        if a != b:
            assert theirs["gaps"][step] < BF16_GAP, f"{where}: token {step} {a} vs {b}, gap {theirs['gaps'][step]}"
            return
        assert abs(ours["token_logprobs"][step] - theirs["token_logprobs"][step]) < BF16_LOGPROB, f"{where}: {step}"


def cli(args: list[str], nproc: int, env: dict) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([sys.executable, *launcher, "-m", "distllama.generate", *args], env=env,
                          capture_output=True, text=True, timeout=300)


GRIDS = {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run every check on the CPU (to test this script)")
    p.add_argument("--out", default=".", help="folder for the JSON summary")
    args = p.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_parity: no CUDA device (use --dry-run to run the checks on the CPU)")
        return 2
    GRIDS[device] = init_grid(1, 1, device)
    root = Path(tempfile.mkdtemp(prefix="gpu-parity-"))
    results, failed = {}, 0

    def check(name, fn):
        nonlocal failed
        started = time.perf_counter()
        try:
            fn()
            status = "ok"
        except Exception as e:  # report every check, then fail at the end
            status, failed = f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:300]}", failed + 1
        results[name] = status
        print(f"{name}: {status} ({time.perf_counter() - started:.1f} s)", flush=True)

    models = {}
    for shape in SHAPES:
        folder = root / shape
        models[shape] = (folder, build_checkpoint(folder, seed=len(models), **CASES[shape]))

    for dtype, compare in ((torch.float32, assert_matches_hf), (torch.bfloat16, check_bf16)):
        for shape, (folder, cpu_model) in models.items():
            def run(shape=shape, folder=folder, cpu_model=cpu_model, dtype=dtype, compare=compare):
                hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
                ours = engine_run(folder, device, dtype)
                for i, prompt in enumerate(PROMPTS):
                    theirs = hf_alone(hf, prompt, {"max_new_tokens": MAX_NEW})[0]
                    compare(ours[i], theirs, f"{shape} prompt {i}")
            check(f"{str(dtype).split('.')[-1]} {shape}", run)

    def compiled():
        folder = models["gqa_tied"][0]
        eager = engine_run(folder, device, torch.float32)
        graphs = engine_run(folder, device, torch.float32, compile=True)
        assert [r["output_ids"] for r in graphs] == [r["output_ids"] for r in eager]
    check("compile (CUDA graphs) = eager", compiled)

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launches = [("2 ranks on one GPU, gloo, tp 2", 2, ["--tp", "2", "--backend", "gloo"]),
                ("2 ranks on one GPU, gloo, pp 2", 2, ["--pp", "2", "--backend", "gloo"]),
                ("nccl, 1 rank", 1, [])]
    if device == "cuda":  # CUDA graphs replayed by two stages in turn (30 s of compiling on a CPU: not in the dry run)
        launches.append(("2 ranks on one GPU, gloo, pp 2, --compile", 2,
                         ["--pp", "2", "--backend", "gloo", "--compile"]))
    for name, nproc, flags in launches:
        def launched(nproc=nproc, flags=flags, name=name):
            folder, cpu_model = models["gqa_tied"]
            out = root / f"{name.replace(' ', '_').replace(',', '')}.jsonl"
            prompts = root / "prompts.jsonl"
            prompts.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
            proc = cli(["--model", str(folder), "--device", device, "--dtype", "float32", "--prompts-file",
                        str(prompts), "--max-new-tokens", str(MAX_NEW), "--max-batch-size", "2", "--output", str(out),
                        *(f for f in flags if device == "cuda" or f not in ("--backend", "gloo"))], nproc, env)
            assert proc.returncode == 0, proc.stderr[-1500:]
            for i, line in enumerate(out.read_text().splitlines()):
                assert_matches_hf(json.loads(line), hf_alone(cpu_model, PROMPTS[i], {"max_new_tokens": MAX_NEW})[0],
                                  f"prompt {i}")
        check(name, launched)

    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_parity.json").write_text(json.dumps({"device": device, "checks": results}, indent=2))
    print(f"gpu_parity: {len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
