"""Run under torchrun by the parity tests: one process group, then every checkpoint of a list through the real
runtime (grid, sharded stage, per-rank loading, rank-0 driver + followers, decoding loop).

usage: torchrun --standalone --nproc-per-node N tests/dist_worker.py PLAN.json
PLAN: {"tp": int, "pp": int, "cases": [{"name", "folder", "prompts", "options": {generation options}}], "out": folder}
Writes out/rank{R}.json (bytes read, files opened per case) and, on rank 0, out/results.json.
"""

import json
import sys
from pathlib import Path

import torch

from distllama import decoding
from distllama.checkpoint import resolve_checkpoint
from distllama.config import load_config
from distllama.distributed import init_grid, shutdown
from distllama.generate import left_pad, load_runner
from distllama.model import ParallelLayoutError, check_layout, stage_layers
from distllama.options import resolve_options
from distllama.pipeline import Driver, follow


def main(plan_path: str) -> None:
    torch.set_num_threads(1)
    plan = json.loads(Path(plan_path).read_text())
    grid = init_grid(plan["tp"], plan["pp"], "cpu", timeout_s=120)
    out = Path(plan["out"])
    per_rank, results = {}, {}
    for case in plan["cases"]:
        ckpt = resolve_checkpoint(case["folder"])
        config = load_config(ckpt.root)
        try:
            check_layout(config, grid.tp, grid.pp)
        except ParallelLayoutError as e:  # same answer on every rank: all skip together
            results[case["name"]] = {"skipped": str(e)}
            continue
        runner, report = load_runner(config, ckpt, grid, torch.float32, sdpa=case.get("sdpa", True))
        per_rank[case["name"]] = {"bytes_read": report.bytes_read, "files_opened": report.files_opened,
                                  "total_bytes": ckpt.total_bytes(),
                                  "layers": list(stage_layers(config.num_hidden_layers, grid.pp, grid.pp_rank))}
        if grid.is_driver:
            driver = Driver(runner)
            options = resolve_options({"eos_token_id": config.eos_token_ids}, {}, case["options"])
            ids, mask = left_pad(case["prompts"], 0)
            outputs = decoding.generate(driver, ids, mask, options, drop_finished=case.get("drop_finished", False))
            driver.close()
            results[case["name"]] = [[vars(s) for s in o.sequences] for o in outputs]
        else:
            follow(runner)
        ckpt.close()
    (out / f"rank{grid.rank}.json").write_text(json.dumps(per_rank))
    if grid.is_driver:
        (out / "results.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
