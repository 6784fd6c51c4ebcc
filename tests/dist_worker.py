"""Run under torchrun by the parity tests: one process group, then every checkpoint of a list through the real
runtime (grid, sharded stage, per-rank loading, pipeline plans, the engine's continuous batching or beam search).

usage: torchrun --standalone --nproc-per-node N tests/dist_worker.py PLAN.json
PLAN: {"tp": int, "pp": int, "cases": [{"name", "folder", "prompts", "options": {generation options},
       "max_batch_size"?, "max_prefill_tokens"?, "sdpa"?}], "out": folder}
Writes out/rank{R}.json (bytes read, files opened per case) and, on rank 0, out/results.json: per case, per prompt,
its sequences ({output_ids, token_logprobs, finish_reason, score}).
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from distllama.checkpoint import resolve_checkpoint
from distllama.config import load_config
from distllama.distributed import init_grid, shutdown
from distllama.engine import Engine
from distllama.generate import Job, Prompts, beam_all, load_runner, make_requests
from distllama.model import ParallelLayoutError, check_layout, stage_layers
from distllama.options import resolve_options
from distllama.pipeline import Pipeline, follow
from distllama.tokenizer import Tokenizer


class Collected:
    """Stands in for the CLI's ordered results: keeps every prompt's sequences."""

    def __init__(self):
        self.outputs = {}

    def add_output(self, index, output):
        self.outputs[index] = [asdict(s) for s in output.sequences]


def run_case(case: dict, grid, config, ckpt) -> tuple:
    """-> (this rank's load report, rank 0: every prompt's sequences, rank 0: whether greedy steps split the lm_head
    between the pipeline's ends)"""
    options = resolve_options({"eos_token_id": config.eos_token_ids}, {}, case["options"])
    runner, report = load_runner(config, ckpt, grid, torch.float32, sdpa=case.get("sdpa", True), options=options)
    if not grid.is_driver:
        follow(runner)
        return report, None, None
    pipeline = Pipeline(runner)
    tokenizer = Tokenizer.from_folder(ckpt.root) if options.stop_strings else None
    requests = make_requests(case["prompts"], options, config, tokenizer)
    collected = Collected()
    if options.num_beams > 1:
        beam_all(options, Job(Prompts(case["prompts"]), None, requests, tokenizer, None, ""), pipeline, config,
                 collected)
    else:
        engine = Engine(pipeline, case.get("max_batch_size", 32), case.get("max_prefill_tokens", 2048),
                        micro_batches=grid.pp)
        finished = sorted(engine.generate(requests), key=lambda r: (r.index, r.sample))
        for r in finished:
            collected.outputs.setdefault(r.index, []).append(
                {"output_ids": r.output_ids, "token_logprobs": r.token_logprobs, "finish_reason": r.finish_reason,
                 "score": None})
    pipeline.close()
    return report, [collected.outputs[i] for i in range(len(case["prompts"]))], pipeline.split_head


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
        report, outputs, split_head = run_case(case, grid, config, ckpt)
        per_rank[case["name"]] = {"bytes_read": report.bytes_read, "files_opened": report.files_opened,
                                  "total_bytes": ckpt.total_bytes(),
                                  "layers": list(stage_layers(config.num_hidden_layers, grid.pp, grid.pp_rank)),
                                  "split_head": split_head}
        if outputs is not None:
            results[case["name"]] = outputs
        ckpt.close()
    (out / f"rank{grid.rank}.json").write_text(json.dumps(per_rank))
    if grid.is_driver:
        (out / "results.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
