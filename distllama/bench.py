"""`python -m distllama.bench`: prefill and decode speed, as a ratio of what memory bandwidth allows.

Decode at small batch reads every weight once per token, so its ceiling is (weight bytes per rank) / (memory
bandwidth). The bandwidth is measured in the same process, by a device-to-device copy of the same size, so the
printed ratio compares like with like on any machine. Runs under torchrun too (tp / pp as in generate);
rank 0 reports.

    python -m distllama.bench --model demo --batch-size 1 --prompt-len 128 --new-tokens 128
"""

import argparse
import sys
import time

import torch

from distllama.config import load_config
from distllama.distributed import Launch, init_grid, resolve_degrees, shutdown
from distllama.generate import DTYPES, load_runner, open_checkpoint, pick_dtype
from distllama.model import check_layout
from distllama.pipeline import Driver, follow
from distllama.watchdog import error_line, leave_on_failure, say


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distllama.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="checkpoint folder, hub id, or 'demo'")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the best is reported")
    return p


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(driver: Driver, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """Seconds for one prefill of [batch, prompt_len] random ids and for new_tokens greedy decode steps."""
    ids = torch.randint(0, driver.vocab_size, (batch, prompt_len))
    mask = torch.ones(batch, prompt_len + new_tokens, dtype=torch.long)
    driver.start(batch, prompt_len + new_tokens)
    t0 = time.perf_counter()
    logits = driver.forward(ids, mask[:, :prompt_len], torch.arange(prompt_len).expand(batch, -1))
    t1 = time.perf_counter()
    for step in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)
        total = prompt_len + step + 1
        logits = driver.forward(token, mask[:, :total], torch.full((batch, 1), total - 1))
    return t1 - t0, time.perf_counter() - t1  # Driver.forward returns host logits: each step is synchronous


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    launch = Launch.from_env()
    try:
        return run(args, launch)
    except Exception as e:
        leave_on_failure(e)  # after the rendezvous: also tells the other ranks, and exits
        say(f"distllama.bench: error: {error_line(e)}")
        return 1
    finally:
        shutdown()


def run(args, launch: Launch) -> int:
    tp, pp = resolve_degrees(launch.world_size, args.tp, args.pp)
    ckpt = open_checkpoint(args.model, None, progress=launch.rank == 0)
    config = load_config(ckpt.root)
    check_layout(config, tp, pp)
    grid = init_grid(tp, pp, args.device, launch=launch)
    runner, _ = load_runner(config, ckpt, grid, pick_dtype(args.dtype, config.torch_dtype, grid.device))
    stage = runner.stage
    # A decode step reads each stage's weights in turn, each stage's tp ranks in parallel: the floor is the
    # weight bytes of all ranks / tp.
    weight_bytes = torch.tensor([float(sum(p.numel() * p.element_size() for p in stage.parameters()))],
                                device=grid.comm_device)
    if grid.world_size > 1:
        torch.distributed.all_reduce(weight_bytes)
    path_bytes = weight_bytes.item() / tp
    if not grid.is_driver:
        follow(runner)
        return 0

    driver = Driver(runner)
    bandwidth = copy_bandwidth(int(path_bytes), grid.device)
    timed_generation(driver, args.batch_size, args.prompt_len, 2)  # warm-up
    runs = [timed_generation(driver, args.batch_size, args.prompt_len, args.new_tokens) for _ in range(args.repeats)]
    driver.close()  # only after success: after a failure the others hear it from the watchdog
    prefill_s = min(r[0] for r in runs)
    step_s = min(r[1] for r in runs) / args.new_tokens
    roofline_s = path_bytes / bandwidth  # reading the weights once at the measured copy bandwidth
    print(f"model {ckpt.hub_id or ckpt.root} | {grid.device}, {stage.dtype} | tp {tp} x pp {pp} | batch {args.batch_size}, "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeats}")
    print(f"prefill: {args.batch_size * args.prompt_len / prefill_s:,.0f} tokens/s ({prefill_s * 1e3:.1f} ms)")
    print(f"decode: {step_s * 1e3:.2f} ms/step = {args.batch_size / step_s:,.1f} tokens/s")
    print(f"baseline (same process): copy bandwidth {bandwidth / 1e9:.1f} GB/s -> reading the "
          f"{path_bytes / 2**20:.0f} MiB of weights on a step's path takes {roofline_s * 1e3:.2f} ms")
    print(f"decode step / weight-read floor: {step_s / roofline_s:.2f}x "
          f"({100 * roofline_s / step_s:.0f}% of the bandwidth limit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
