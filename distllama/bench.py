"""`python -m distllama.bench`: the engine's speed, against baselines measured in the same run.

Workloads (the engine exactly as the CLI drives it; greedy, float32 on CPU unless --dtype says otherwise):
  decode  --batch-size prompts of --prompt-len random tokens, --new-tokens each without early stop: prefill tokens/s,
          decode ms/step and tokens/s, and the step against the floor of reading the weights once at the copy
          bandwidth measured in this process.
  job     a batch job: --num-prompts prompts of random lengths in [--min-prompt, --max-prompt], up to --new-tokens
          new tokens, ending at eos ids the model really emits (picked by a short greedy probe) so rows end at
          different steps: generated tokens/s, and the prefill alone (the same prompts, one new token).
Baselines (each printed as a ratio; all on rank 0, in this process):
  --compare-hf      Transformers on the same weights: generate (dynamic cache) in static batches of the same size,
                    static cache + torch.compile, and generate_batch (its continuous batching), where each runs.
                    generate runs in each of the --repeats rounds, between ours (a job under torchrun: after ours),
                    and both sides report medians.
  --compare-single  under torchrun: the same workload on rank 0 alone, one process (for the speedup of the split).
Works under torchrun (tp / pp as in generate). --json FILE writes every figure.

    python -m distllama.bench --model demo --batch-size 32 --prompt-len 128 --new-tokens 128 --compare-hf
    torchrun --nproc-per-node 2 -m distllama.bench --model demo --pp 2 --workload job --compare-single
"""

import argparse
import json
import logging
import resource
import sys
import time

import torch

from distllama.config import load_config
from distllama.distributed import Launch, init_grid, resolve_degrees, shutdown
from distllama.engine import Engine
from distllama.generate import DTYPES, load_runner, make_requests, open_checkpoint, pick_dtype
from distllama.model import check_layout
from distllama.options import resolve_options
from distllama.parallel import PackableLinear, ParallelLMHead, RMSNorm
from distllama.pipeline import Pipeline, follow
from distllama.replicas import share
from distllama.watchdog import error_line, leave_on_failure, say

log = logging.getLogger("distllama")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distllama.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="checkpoint folder, hub id, or 'demo'")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--dp", type=int, help="data-parallel replicas (job workload), each with its share of the prompts")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--workload", default="decode", choices=["decode", "job"])
    p.add_argument("--batch-size", default="1",
                   help="decode: prompts decoded together (a comma list runs each, e.g. 1,32); job: the max batch "
                        "size of both sides")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=128, help="job: prompts")
    p.add_argument("--min-prompt", type=int, default=10, help="job: shortest prompt")
    p.add_argument("--max-prompt", type=int, default=300, help="job: longest prompt")
    p.add_argument("--max-prefill-tokens", type=int,
                   help="job: the engine's prefill budget per step (default: generate's, 2048 or 512 with pp > 1)")
    p.add_argument("--compile", action="store_true", help="the engine's decode step under torch.compile")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa"],
                   help="decode attention: auto (distllama's CPU kernel where it runs, else SDPA) or sdpa")
    p.add_argument("--matmul", default="auto", choices=["auto", "torch"],
                   help="matmuls: auto (distllama's CPU kernel for float32 where it runs, else torch's) or torch")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed rounds after one warm-up; each figure is the median over them (with one process, "
                        "each round also runs the Transformers baselines of --compare-hf generate)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--seed", type=int, default=0, help="for the random prompts")
    p.add_argument("--compare-hf", nargs="?", const="generate,static,batch", default=None,
                   help="Transformers baselines to run, of generate,static,batch (default: all three)")
    p.add_argument("--compare-single", action="store_true")
    p.add_argument("--json", help="write the figures to this file")
    return p


# ---- measuring ------------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(n_bytes: int, device: torch.device, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy moves (read + written), over n_bytes (capped at 1 GiB)."""
    n = max(1, min(n_bytes, 2**30) // 4)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4 * n / best


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def random_prompts(n: int, lengths: tuple[int, int], vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (n,), generator=generator).tolist()
    return [torch.randint(0, vocab, (size,), generator=generator).tolist() for size in sizes]


class Runner:
    """Runs a workload through the engine on this grid and times it (a replica's driver)."""

    def __init__(self, pipeline: Pipeline, config, args, grid=None):
        self.pipe, self.config, self.args, self.grid = pipeline, config, args, grid

    def run(self, prompts, new_tokens: int, eos: list[int] | None, max_batch_size: int,
            max_prefill: int | None) -> dict:
        options = resolve_options({}, {}, {"max_new_tokens": new_tokens, "eos_token_id": eos})
        self.pipe.runner.options = options
        requests = make_requests(prompts, options, self.config, None)
        engine = Engine(self.pipe, max_batch_size, max_prefill, micro_batches=self.pipe.grid.pp,
                        static_decode=self.args.compile)
        stamps, result = [], self.pipe.result
        self.pipe.result = lambda: (out := result(), stamps.append(time.perf_counter()))[0]
        started = time.perf_counter()
        finished = list(engine.generate(requests))
        elapsed = time.perf_counter() - started
        self.pipe.result = result
        generated = [len(r.output_ids) for r in finished]
        return {"seconds": elapsed, "generated": sum(generated), "steps": engine.steps,
                "first_results_s": stamps[engine.groups - 1] - started,  # each micro-batch's first step done
                "lengths": sorted(generated),
                "outputs": {r.index: r.output_ids for r in finished}}

    def warm_up(self, prompts, *args) -> None:
        self.run(prompts[:8], *args)  # a few prompts are enough to touch every code path and weight


# ---- Transformers, the baseline -------------------------------------------------------------------------------------

class HFBaselines:
    """Transformers' LlamaForCausalLM on the same checkpoint, same dtype and device, run on rank 0."""

    def __init__(self, root, dtype, device):
        from transformers import LlamaForCausalLM  # only here: Transformers is a benchmark baseline, not a dependency

        self.model = LlamaForCausalLM.from_pretrained(root, dtype=dtype).to(device).eval()
        self.device = device

    def generate_batches(self, prompts, new_tokens: int, eos, batch: int, **extra) -> dict:
        """generate() on left-padded static batches of `batch` prompts, in input order."""
        generated, started = 0, time.perf_counter()
        for first in range(0, len(prompts), batch):
            chunk = prompts[first:first + batch]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                          do_sample=False, eos_token_id=eos, pad_token_id=0, **extra)
            for row in out[:, width:].tolist():
                generated += next((i + 1 for i, t in enumerate(row) if eos and t in eos), len(row))
        sync(self.device)
        return {"seconds": time.perf_counter() - started, "generated": generated}

    def job(self, prompts, new_tokens: int, eos, batch: int) -> dict:
        """The batch job in static batches, and its prefill alone (one new token)."""
        prefill = self.generate_batches(prompts, 1, eos, batch)
        job = self.generate_batches(prompts, new_tokens, eos, batch)
        return {**job, "prefill_s": prefill["seconds"], "tokens_per_s": job["generated"] / job["seconds"]}

    def generate_batch(self, prompts, new_tokens: int, eos, batch: int) -> dict:
        """Transformers' own continuous batching (generate_batch)."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
        started = time.perf_counter()
        out = self.model.generate_batch(prompts, generation_config=config, progress_bar=False,
                                        continuous_batching_config=ContinuousBatchingConfig(
                                            max_requests_per_batch=batch))
        return {"seconds": time.perf_counter() - started,
                "generated": sum(len(o.generated_tokens) for o in out.values())}

    def compiled(self, prompts, new_tokens: int, batch: int) -> dict:
        """Static cache and torch.compile, as Transformers documents it; the first (compiling) call is not timed."""
        plain = self.model.forward
        if getattr(self, "compiled_forward", None) is None:  # compiled once, for every call that follows
            self.compiled_forward = torch.compile(plain, mode="reduce-overhead", fullgraph=True)
        self.model.forward = self.compiled_forward
        try:
            self.generate_batches(prompts[:batch], new_tokens, None, batch, cache_implementation="static")
            return self.generate_batches(prompts, new_tokens, None, batch, cache_implementation="static")
        finally:
            self.model.forward = plain


def try_baseline(name: str, fn, *args) -> dict | None:
    try:
        return fn(*args)
    except Exception as e:  # a baseline that does not run here is reported, not fatal
        print(f"{name}: does not run here ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
        return None


# ---- the run --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    launch = Launch.from_env()
    torch.set_num_threads(args.threads)
    logging.basicConfig(format="[distllama] %(message)s", stream=sys.stderr)
    try:
        return run(args, launch)
    except Exception as e:
        leave_on_failure(e)  # after the rendezvous: also tells the other ranks, and exits
        say(f"distllama.bench: error: {error_line(e)}")
        return 1
    finally:
        shutdown()


def matmul_kind(stage) -> str:
    """Which kernel this rank's matmuls take: kernel (distllama.cpu_matmul), onednn, or torch (F.linear)."""
    packed = next((m.packed for m in stage.modules() if getattr(m, "packed", None) is not None), None)
    return "torch" if packed is None else "kernel" if packed.own_kernel else "onednn"


def load(args, launch, tp: int, pp: int, dp: int = 1):
    grid = init_grid(tp, pp, args.device, launch=launch, dp=dp)
    ckpt = open_checkpoint(args.model, None, progress=launch.rank == 0)
    config = load_config(ckpt.root)
    check_layout(config, tp, pp)
    dtype = pick_dtype(args.dtype, config.torch_dtype, grid.device)
    runner, _ = load_runner(config, ckpt, grid, dtype, options=resolve_options({}, {}, {}), compile=args.compile,
                            decode_kernel=args.attn == "auto", matmul_kernel=args.matmul == "auto")
    return ckpt, config, grid, dtype, runner


def run(args, launch: Launch) -> int:
    tp, pp, dp = resolve_degrees(launch.world_size, args.tp, args.pp, args.dp)
    if dp > 1 and args.workload != "job":
        raise ValueError("--dp applies to --workload job (each replica takes its share of the prompts)")
    ckpt, config, grid, dtype, runner = load(args, launch, tp, pp, dp)
    # A decode step reads each stage's weights in turn, each stage's tp ranks in parallel: the floor is the weight
    # bytes of all ranks / tp. (Packed CPU weights are opaque: count the parameters the config implies.)
    weight_bytes = torch.tensor([float(weight_bytes_of(runner.stage))], device=grid.comm_device)
    if grid.world_size > 1:
        torch.distributed.all_reduce(weight_bytes)
    path_bytes = weight_bytes.item() / tp
    figures, measured = {}, {}
    if grid.is_driver:
        pipeline = Pipeline(runner)
        ours = Runner(pipeline, config, args, grid)
        if args.workload == "decode":
            hf = HFBaselines(ckpt.root, dtype, grid.device) if args.compare_hf and grid.is_writer else None
            measured, work, prompts = decode_workload(ours, config, args, path_bytes, grid.device,
                                                      hf if hf and "generate" in args.compare_hf else None)
        else:
            # One process: Transformers' rounds interleave with ours (under torchrun the other ranks would wait on
            # rank 0 through them: its baselines run after ours).
            hf = HFBaselines(ckpt.root, dtype, grid.device) if (args.compare_hf and "generate" in args.compare_hf
                                                                and grid.world_size == 1) else None
            measured, work, prompts = job_workload(ours, config, args, path_bytes, grid.device, hf)
        pipeline.close()  # only after success: after a failure the others hear it from the watchdog
    else:
        follow(runner)
    stages = pipeline_figures(runner, grid, measured)
    if not grid.is_writer:
        return 0

    figures = {"model": str(ckpt.hub_id or ckpt.root), "device": str(grid.device), "dtype": str(dtype).split(".")[-1],
               "dp": dp, "tp": tp, "pp": pp, "workload": args.workload, "threads": args.threads,
               "compile": args.compile, "decode_attention": "kernel" if runner.stage.decode_reads_own_keys else "sdpa",
               "matmul": matmul_kind(runner.stage),
               **measured, **stages, "peak_memory_mib": peak_memory_mib(grid.device)}
    # Transformers' runs interleaved with ours: its copy of the model counts in this process's peak
    shared = figures["peak_memory_includes_transformers"] = hf is not None
    print(f"model {figures['model']} | {grid.device}, {figures['dtype']} | {f'dp {dp} x ' if dp > 1 else ''}"
          f"tp {tp} x pp {pp} | {args.workload} | decode attention: {figures['decode_attention']} "
          f"| matmul: {figures['matmul']} "
          f"| peak memory {figures['peak_memory_mib']:.0f} MiB on rank 0"
          + (" (Transformers' copy of the model included)" if shared else ""))
    report(figures, args.workload)
    if grid.world_size > 1:
        print("ranks busy (the rest is the pipeline's bubble): " + ", ".join(
            f"r{r} {100 * b:.0f}%" for r, b in enumerate(figures["busy_fraction"])))

    if args.compare_single and grid.world_size > 1:
        single = Launch()
        _, _, solo_grid, _, solo_runner = load(args, single, 1, 1)
        solo = Runner(Pipeline(solo_runner), config, args)
        figures["single"] = work(solo)
        key = "tokens_per_s" if args.workload == "job" else "decode_tokens_per_s"  # decode: the last batch size
        print(f"one process alone: {figures['single'][key]:,.1f} tokens/s -> this split is "
              f"{figures[key] / figures['single'][key]:.2f}x")
    if args.compare_hf:
        compare_hf(figures, prompts, hf or HFBaselines(ckpt.root, dtype, grid.device), args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


def pipeline_figures(runner, grid, measured: dict) -> dict:
    """Every rank's busy fraction while it ran steps (the rest: waiting on the others, the pipeline's bubble), and
    with --dp the replicas' tokens/s together (all of them over the slowest one's time)."""
    span = (runner.last_step or 0) - (runner.first_step or 0)
    mine = torch.zeros(grid.world_size, 3, dtype=torch.float64, device=grid.comm_device)
    mine[grid.rank] = torch.tensor([runner.busy_s / max(span, 1e-9), measured.get("generated", 0),
                                    measured.get("seconds", 0)])
    if grid.world_size > 1:
        torch.distributed.all_reduce(mine)
    figures = {"busy_fraction": mine[:, 0].tolist()}
    if grid.dp > 1:
        generated, slowest = mine[:, 1].sum().item(), mine[:, 2].max().item()
        figures.update(generated=int(generated), seconds=slowest, tokens_per_s=generated / slowest,
                       replicas_tokens_per_s=[measured_row[1] / max(measured_row[2], 1e-9)
                                              for measured_row in mine.tolist() if measured_row[2]])
    return figures


def weight_bytes_of(stage) -> int:
    """Bytes a decode step reads: every matmul weight (packed or plain), bias and norm; not the embedding table,
    of which a step reads one row per token."""
    total = 0
    for module in stage.modules():
        if isinstance(module, (PackableLinear, ParallelLMHead, RMSNorm)):
            weight = module.packed.tensor if getattr(module, "packed", None) is not None else module.weight
            total += weight.numel() * weight.element_size()
            upper = getattr(module, "packed_upper", None)  # a split lm_head's other part
            total += 0 if upper is None else upper.tensor.numel() * upper.tensor.element_size()
            bias = getattr(module, "bias", None)
            total += 0 if bias is None else bias.numel() * bias.element_size()
    if stage.lower_head is not None:  # the first stage's part of a split lm_head (model.LlamaStage)
        total += stage.lower_head.tensor.numel() * stage.lower_head.tensor.element_size()
    return total


def decode_workload(ours: Runner, config, args, path_bytes: float, device, hf: "HFBaselines | None" = None):
    """Per batch size: prefill, decode ms/step. With hf (--compare-hf generate), Transformers' generate on the same
    prompts runs between our runs, round after round, so both see the same machine (medians are reported)."""
    batch_sizes = [int(b) for b in str(args.batch_size).split(",")]
    prompts = {b: random_prompts(b, (args.prompt_len, args.prompt_len), config.vocab_size, args.seed)
               for b in batch_sizes}
    n = args.new_tokens

    def ours_once(runner: Runner, b: int) -> dict:
        # the prompts are prefilled in the first step (one per micro-batch with pp > 1); then every row decodes one
        # token per step: n - 1 steps of the whole batch (with pp > 1, each of them one plan per micro-batch)
        r = runner.run(prompts[b], n, None, b, b * args.prompt_len)
        return {"prefill_s": r["first_results_s"],
                "decode_ms_per_step": 1e3 * (r["seconds"] - r["first_results_s"]) / max(n - 1, 1)}

    def hf_once(b: int) -> dict:
        # one new token = the prefill; the difference to n tokens = n - 1 decode steps
        short = hf.generate_batches(prompts[b], 1, None, b)
        full = hf.generate_batches(prompts[b], n, None, b)
        return {"prefill_s": short["seconds"],
                "decode_ms_per_step": 1e3 * (full["seconds"] - short["seconds"]) / (n - 1)}

    def work(runner: Runner, with_hf: bool = False) -> dict:
        cases = []
        for b in batch_sizes:
            runner.run(prompts[b], 4, None, b, b * args.prompt_len)  # warm-up
            if with_hf:
                hf.generate_batches(prompts[b], 2, None, b)
            rounds = [(ours_once(runner, b), hf_once(b) if with_hf else None) for _ in range(args.repeats)]
            case = {"batch_size": b, **median([r[0] for r in rounds])}
            case.update(prefill_tokens_per_s=b * args.prompt_len / case["prefill_s"],
                        decode_tokens_per_s=b * 1e3 / case["decode_ms_per_step"],
                        decode_ms_spread=[min(r[0]["decode_ms_per_step"] for r in rounds),
                                          max(r[0]["decode_ms_per_step"] for r in rounds)])
            if with_hf:
                case["hf_generate"] = median([r[1] for r in rounds])
            cases.append(case)
        return {"cases": cases, "decode_tokens_per_s": cases[-1]["decode_tokens_per_s"]}

    figures = work(ours, with_hf=hf is not None)
    bandwidth = copy_bandwidth(int(path_bytes), device)
    floor_s = path_bytes / bandwidth
    for case in figures["cases"]:
        case["bandwidth_fraction"] = floor_s * 1e3 / case["decode_ms_per_step"]
    figures.update(copy_bandwidth_gbs=bandwidth / 1e9, weight_read_floor_ms=floor_s * 1e3,
                   prompt_len=args.prompt_len, new_tokens=n, repeats=args.repeats)
    return figures, work, prompts


def median(runs: list[dict]) -> dict:
    """The median of each figure over the runs; a rate (tokens_per_s) is the one of the median time, so that the
    figures of an even number of runs (the middle two averaged) still fit together."""
    figures = {key: _middle([r[key] for r in runs]) for key in runs[0]}
    if "tokens_per_s" in figures:
        figures["tokens_per_s"] = figures["generated"] / figures["seconds"]
    return figures


def _middle(values: list):
    values, half = sorted(values), len(values) // 2
    if len(values) % 2 or values[half - 1] == values[half]:
        return values[half]
    return (values[half - 1] + values[half]) / 2


def job_workload(ours: Runner, config, args, path_bytes: float, device, hf: "HFBaselines | None" = None):
    """Generated tokens/s of the job and the time of its prefill alone. With hf (--compare-hf generate, one process),
    each round runs Transformers' static batches on the same prompts right after ours, so both see the same machine;
    every figure is the median over the rounds."""
    args.batch_size = int(args.batch_size)
    prompts = random_prompts(args.num_prompts, (args.min_prompt, args.max_prompt), config.vocab_size, args.seed)
    eos = pick_eos(ours, prompts, args)

    def work(runner: Runner, with_hf: bool = False) -> dict:
        mine = prompts
        if runner.grid is not None and runner.grid.dp > 1:  # this replica's share, as generate --dp deals them
            indices = share(list(range(len(prompts))), {i: len(p) for i, p in enumerate(prompts)},
                            runner.grid.dp, runner.grid.dp_rank)
            mine = [prompts[i] for i in indices]
        # max_prefill_tokens None: each side (this split, --compare-single's one process) takes the engine's default
        shape = (eos, args.batch_size, args.max_prefill_tokens)
        runner.warm_up(mine, args.new_tokens, *shape)
        if with_hf:
            hf.generate_batches(mine[:args.batch_size], 2, eos, args.batch_size)  # warm-up
        rounds = []
        for _ in range(args.repeats):
            prefill, job = runner.run(mine, 1, *shape), runner.run(mine, args.new_tokens, *shape)
            rounds.append({"seconds": job["seconds"], "prefill_s": prefill["seconds"], "lengths": job["lengths"],
                           "generated": job["generated"], "hf": hf.job(mine, args.new_tokens, eos, args.batch_size)
                           if with_hf else None})
        seconds = [r["seconds"] for r in rounds]
        lengths = rounds[0]["lengths"]  # greedy: the same in every round
        figures = {**median([{"seconds": r["seconds"], "prefill_s": r["prefill_s"]} for r in rounds]),
                   "seconds_spread": [min(seconds), max(seconds)], "generated": rounds[0]["generated"],
                   "generated_lengths": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]}}
        figures["tokens_per_s"] = figures["generated"] / figures["seconds"]
        if with_hf:
            figures["hf_generate"] = median([r["hf"] for r in rounds])
            figures["hf_generate"]["round_ratios"] = [r["generated"] / r["seconds"] / r["hf"]["tokens_per_s"]
                                                      for r in rounds]
        return figures

    figures = work(ours, with_hf=hf is not None)
    figures.update(num_prompts=args.num_prompts, prompt_lengths=[args.min_prompt, args.max_prompt],
                   max_new_tokens=args.new_tokens, max_batch_size=args.batch_size, eos_token_id=eos,
                   prompt_tokens=sum(map(len, prompts)), repeats=args.repeats)
    return figures, work, prompts


def pick_eos(ours: Runner, prompts, args) -> list[int]:
    """Eos ids the model really emits in the middle of its greedy output, so that rows end at different steps, as
    the rows of a real job do: up to three tokens, each added while it brings the median row's end (over a probe of
    32 prompts) nearer half the new tokens."""
    probe = list(ours.run(prompts[:32], args.new_tokens, None, 32, 1 << 30)["outputs"].values())
    candidates = sorted({t for row in probe for t in row[2:]}) or [0]

    def median_end(eos: set) -> int:
        ends = sorted(next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in probe)
        return ends[len(ends) // 2]

    eos: set[int] = set()
    for _ in range(3):
        best = min(candidates, key=lambda t: abs(median_end(eos | {t}) - args.new_tokens / 2))
        if abs(median_end(eos | {best}) - args.new_tokens / 2) >= abs(median_end(eos) - args.new_tokens / 2):
            break
        eos.add(best)
    return sorted(eos) or [candidates[0]]


def report(f: dict, workload: str) -> None:
    if workload == "decode":
        print(f"prompt {f['prompt_len']}, {f['new_tokens']} new tokens; baseline (same process): copy bandwidth "
              f"{f['copy_bandwidth_gbs']:.1f} GB/s -> reading the weights once takes {f['weight_read_floor_ms']:.2f} ms")
        for c in f["cases"]:
            low, high = c["decode_ms_spread"]
            print(f"batch {c['batch_size']}: prefill {c['prefill_tokens_per_s']:,.0f} tokens/s "
                  f"({c['prefill_s'] * 1e3:.1f} ms); decode {c['decode_ms_per_step']:.2f} ms/step (median of "
                  f"{f['repeats']}, {low:.2f}-{high:.2f}) = {c['decode_tokens_per_s']:,.1f} tokens/s = "
                  f"{100 * c['bandwidth_fraction']:.0f}% of the bandwidth limit")
    else:
        lengths = f["generated_lengths"]
        print(f"job: {f['num_prompts']} prompts of {f['prompt_lengths'][0]}-{f['prompt_lengths'][1]} tokens "
              f"({f['prompt_tokens']} in all), up to {f['max_new_tokens']} new, max batch {f['max_batch_size']}, "
              f"eos {f['eos_token_id']}; generated {lengths['min']}/{lengths['median']}/{lengths['max']} "
              f"(min/median/max)")
        low, high = f["seconds_spread"]
        print(f"job: {f['generated']} tokens in {f['seconds']:.1f} s (median of {f['repeats']}, {low:.1f}-{high:.1f}) "
              f"= {f['tokens_per_s']:,.1f} generated tokens/s; its prefill alone {f['prefill_s']:.1f} s")


def compare_hf(figures: dict, prompts, hf: HFBaselines, args) -> None:
    baselines = figures["hf"] = {}
    if args.workload == "decode":
        n = args.new_tokens
        for i, case in enumerate(figures["cases"]):
            b, batch_prompts = case["batch_size"], prompts[case["batch_size"]]
            if "hf_generate" in case:
                baselines[f"generate b{b}"] = theirs = case.pop("hf_generate")
                print(f"Transformers generate, batch {b} (runs interleaved with ours): decode "
                      f"{theirs['decode_ms_per_step']:.2f} ms/step, prefill {theirs['prefill_s'] * 1e3:.1f} ms -> "
                      f"distllama decode is {theirs['decode_ms_per_step'] / case['decode_ms_per_step']:.2f}x, prefill "
                      f"{theirs['prefill_s'] / case['prefill_s']:.2f}x")
            if "static" in args.compare_hf and i == 0:  # the first batch size only: each shape compiles anew
                short = try_baseline("static+compile", hf.compiled, batch_prompts, 1, b)
                full = short and try_baseline("static+compile", hf.compiled, batch_prompts, n, b)
                if short and full:
                    step_ms = 1e3 * (full["seconds"] - short["seconds"]) / (n - 1)
                    baselines[f"static+compile b{b}"] = {"prefill_s": short["seconds"], "decode_ms_per_step": step_ms}
                    print(f"Transformers static cache + torch.compile, batch {b}: decode {step_ms:.2f} ms/step -> "
                          f"distllama decode is {step_ms / case['decode_ms_per_step']:.2f}x")
        return
    eos, n, batch = figures["eos_token_id"], args.new_tokens, args.batch_size
    if "generate" in args.compare_hf:
        theirs, how = figures.pop("hf_generate", None), f"runs interleaved with ours, median of {args.repeats}"
        if theirs is None:  # under torchrun: after ours
            theirs, how = median([hf.job(prompts, n, eos, batch) for _ in range(args.repeats)]), "run after ours"
        baselines["generate"] = theirs
        rounds = theirs.get("round_ratios")
        spread = f" (rounds {min(rounds):.2f}x-{max(rounds):.2f}x)" if rounds and len(rounds) > 1 else ""
        print(f"Transformers generate, static batches of {batch} ({how}): {theirs['generated']} tokens in "
              f"{theirs['seconds']:.1f} s = {theirs['tokens_per_s']:,.1f} tokens/s, prefill {theirs['prefill_s']:.1f} "
              f"s -> distllama is {figures['tokens_per_s'] / theirs['tokens_per_s']:.2f}x{spread}, its prefill "
              f"{theirs['prefill_s'] / figures['prefill_s']:.2f}x")
    cb = "batch" in args.compare_hf and try_baseline("generate_batch", hf.generate_batch, prompts, n, eos, batch)
    if cb:
        baselines["generate_batch"] = {**cb, "tokens_per_s": cb["generated"] / cb["seconds"]}
        print(f"Transformers generate_batch: {cb['generated']} tokens in {cb['seconds']:.1f} s = "
              f"{baselines['generate_batch']['tokens_per_s']:,.1f} tokens/s -> distllama is "
              f"{figures['tokens_per_s'] / baselines['generate_batch']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
