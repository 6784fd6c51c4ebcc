"""`python -m distllama.generate`: the command line, the run configuration, and rank 0's generation loop.

Every rank parses the same flags and YAML, checks them, and loads its own slice of the model; rank 0 then
tokenizes, batches, decodes and writes results while the other ranks follow its commands (distllama.pipeline).
See the README for the flags and ../shared/reference/cli-contract.md for the contract they implement.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from distllama import decoding
from distllama.checkpoint import Checkpoint, resolve_checkpoint
from distllama.config import load_config
from distllama.distributed import Grid, Launch, init_grid, on_every_rank, resolve_degrees, shutdown
from distllama.loader import LoadReport, load_stage
from distllama.model import LlamaStage, check_layout
from distllama.options import (GenerationOptions, add_option_flags, load_generation_defaults, option_values,
                               resolve_options)
from distllama.pipeline import Driver, StageRunner, follow
from distllama.tokenizer import StreamDecoder, Tokenizer
from distllama.watchdog import error_line, leave_on_failure, say

log = logging.getLogger("distllama")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(ValueError):
    """Bad flags, YAML or prompts: reported in one line before any model work."""


# ---- flags and YAML ------------------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """Bad flags become a UsageError: one line on stderr, like every other error, instead of the usage block."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m distllama.generate", argument_default=argparse.SUPPRESS,
                                description="Generate text with a Llama checkpoint on one or many processes "
                                            "(run under torchrun for tensor / pipeline parallelism).")
    run = p.add_argument_group("run")
    run.add_argument("--config", help="YAML file whose keys are these flags with underscores (flags win)")
    run.add_argument("--model", help="checkpoint folder, hub id, or 'demo' (default: the bundled demo model)")
    run.add_argument("--revision", help="hub revision (branch, tag or commit) for a hub id")
    run.add_argument("--tp", type=int, help="tensor-parallel degree (default: world size // pp)")
    run.add_argument("--pp", type=int, help="pipeline-parallel degree (default 1)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: cuda when available")
    run.add_argument("--dtype", choices=["auto", *DTYPES], help="default auto: checkpoint dtype on cuda, float32 on cpu")
    run.add_argument("--attn", choices=["sdpa", "eager"], help="attention kernel (default sdpa; eager for checking)")
    run.add_argument("--dist-timeout", type=float,
                     help="seconds a collective may wait for a live but busy rank (default 300)")
    run.add_argument("--peer-timeout", type=float,
                     help="seconds without a heartbeat before a rank is declared dead or hung (default 30)")
    run.add_argument("--load-timeout", type=float,
                     help="seconds start-up (joining, prompts, loading weights) may take on any rank (default 1800)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="rank 0's log level (default info); other ranks log warnings only unless this is debug")
    io = p.add_argument_group("prompts and results")
    io.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    io.add_argument("--prompts-file", help='JSONL, one {"prompt": "..."} or {"input_ids": [...]} a line')
    io.add_argument("--output", help="write one JSON result per prompt (JSONL, input order)")
    io.add_argument("--batch-size", type=int, help="prompts decoded together, left-padded (default 8)")
    io.add_argument("--chat", action=argparse.BooleanOptionalAction, help="apply the checkpoint's chat template")
    io.add_argument("--system-prompt", help="system message for --chat")
    io.add_argument("--stream", action=argparse.BooleanOptionalAction, help="print text as it is generated")
    add_option_flags(p.add_argument_group("generation (Transformers GenerationConfig options)"))
    return p


@dataclass
class RunConfig:
    """What the run decides (the architecture comes from the checkpoint's config.json)."""

    model: str | None = None
    revision: str | None = None
    tp: int | None = None
    pp: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "sdpa"
    dist_timeout: float = 300.0
    peer_timeout: float = 30.0
    load_timeout: float = 1800.0
    log_level: str = "info"
    prompt: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    output: str | None = None
    batch_size: int = 8
    chat: bool = False
    system_prompt: str | None = None
    stream: bool = False
    with_sequences: bool = False  # num_return_sequences was given: every line carries "sequences"


RUN_KEYS = set(RunConfig.__dataclass_fields__) - {"with_sequences"}

# `python -m distllama.generate` with no arguments; configs/demo.yaml holds the same (a test keeps them equal).
DEMO_RUN = {
    "model": "demo",
    "chat": True,
    "stream": True,
    "prompt": ["What is the capital of France?"],
    "max_new_tokens": 128,
}


def parse_args(argv) -> tuple[RunConfig, dict, dict]:
    """Flags over YAML. Returns the run config, the YAML's generation options and the flags' generation options."""
    args = vars(build_parser().parse_args(argv))
    yaml_values = read_yaml(args.pop("config")) if "config" in args else {}
    if not argv:
        yaml_values = dict(DEMO_RUN)  # no arguments at all: the demo run, as configs/demo.yaml spells it
    yaml_run = parse_yaml_run({k: v for k, v in yaml_values.items() if k in RUN_KEYS})
    yaml_options = {k: v for k, v in yaml_values.items() if k not in RUN_KEYS}
    cli_options = option_values(argparse.Namespace(**args))
    cli_run = {k: v for k, v in args.items() if k in RUN_KEYS}
    run = RunConfig(**{**yaml_run, **cli_run})
    run.with_sequences = "num_return_sequences" in {**yaml_options, **cli_options}
    if run.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {run.batch_size}")
    for flag in ("dist_timeout", "peer_timeout", "load_timeout"):
        if getattr(run, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(run, flag)}")
    if run.peer_timeout >= run.dist_timeout:  # else a hung rank shows up as a timed-out collective, unnamed
        raise UsageError(f"--peer-timeout ({run.peer_timeout:g}) must be shorter than --dist-timeout "
                         f"({run.dist_timeout:g}), so that a rank that stops responding is found before a "
                         "collective gives up on it")
    return run, yaml_options, cli_options


def parse_yaml_run(values: dict) -> dict:
    """The YAML's run keys, checked and typed by the same parser as the flags (so `dtype: fp32` is refused the
    way `--dtype fp32` is)."""
    argv = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(RunConfig.__dataclass_fields__[key].default, bool):
            if not isinstance(value, bool):
                raise UsageError(f"--config: {key} must be true or false, got {value!r}")
            argv.append(flag if value else flag.replace("--", "--no-", 1))
            continue
        for item in value if key == "prompt" and isinstance(value, list) else [value]:
            if isinstance(item, (dict, list, bool)) or item is None:
                raise UsageError(f"--config: {key} must be a single value, got {item!r}")
            argv += [flag, str(item)]
    parsed = vars(build_parser().parse_args(argv))
    return {k: v for k, v in parsed.items() if k in RUN_KEYS}


def read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of option: value, got {type(values).__name__}")
    known = RUN_KEYS | set(vars(GenerationOptions()))
    for key in values:
        if key == "config" or key not in known:
            raise UsageError(f"--config {path}: unknown key {key!r}")
    return values


# ---- prompts --------------------------------------------------------------------------------------------------------

def read_prompts(run: RunConfig, tokenizer: Tokenizer | None, vocab_size: int) -> list[list[int]]:
    """Token ids of every prompt in input order: --prompt flags first, then --prompts-file lines."""
    entries = [{"prompt": text} for text in run.prompt]
    if run.prompts_file:
        try:
            lines = Path(run.prompts_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UsageError(f"cannot read --prompts-file {run.prompts_file}: {e.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{run.prompts_file} line {n} is not JSON: {e.msg}") from None
            if not isinstance(entry, dict) or ("prompt" in entry) == ("input_ids" in entry):
                raise UsageError(f'{run.prompts_file} line {n}: expected {{"prompt": "..."}} or {{"input_ids": [...]}}')
            entries.append(entry)
    if not entries:
        raise UsageError("no prompts: give --prompt TEXT or --prompts-file FILE.jsonl")
    prompts = []
    for i, entry in enumerate(entries):
        if "input_ids" in entry:
            ids = entry["input_ids"]
            if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                raise UsageError(f"prompt {i}: input_ids must be a list of integers")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise UsageError(f"prompt {i}: token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        elif not isinstance(entry["prompt"], str):
            raise UsageError(f"prompt {i}: \"prompt\" must be a string")
        elif tokenizer is None:
            raise UsageError(f"prompt {i} is text, but the checkpoint has no tokenizer.json: give input_ids instead")
        elif run.chat:
            messages = [{"role": "user", "content": entry["prompt"]}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, system_prompt=run.system_prompt)
        else:
            ids = tokenizer.encode(entry["prompt"])
        if not ids:
            raise UsageError(f"prompt {i} is empty after tokenization")
        prompts.append(ids)
    return prompts


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, padded on the left as Transformers' tokenizer(padding_side='left') does."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


# ---- the run --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launch = Launch.from_env()
    setup_logging("info", launch.rank)
    try:
        return run_generation(argv, launch)
    except KeyboardInterrupt:
        print("distllama: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure ends as one line on stderr and a non-zero exit, on every rank
        log.debug("traceback", exc_info=True)
        leave_on_failure(e)  # after the rendezvous: also tells the other ranks, and exits
        where = f"[rank {launch.rank}] " if launch.world_size > 1 else ""
        say(f"distllama: error: {where}{error_line(e)}")
        return 1
    finally:
        shutdown()


def run_generation(argv, launch: Launch) -> int:
    started = time.perf_counter()
    run, yaml_options, cli_options = parse_args(argv)
    setup_logging(run.log_level, launch.rank)
    tp, pp = resolve_degrees(launch.world_size, run.tp, run.pp)
    # From here on a failure on any rank, or a rank that dies or hangs, stops every rank (distllama.watchdog).
    grid = init_grid(tp, pp, run.device, run.dist_timeout, launch, load_timeout_s=run.load_timeout,
                     peer_timeout_s=run.peer_timeout)

    # Everything checked here is checked identically on every rank, so a bad value stops all of them at once.
    ckpt = open_checkpoint(run.model, run.revision, progress=launch.rank == 0)
    config = load_config(ckpt.root)
    check_layout(config, tp, pp)
    options = resolve_options(load_generation_defaults(ckpt.root), yaml_options, cli_options)
    log.info("config: %s | %d layers, hidden %d, %d heads / %d kv heads, vocab %d | tp %d x pp %d = %d ranks",
             ckpt.hub_id or ckpt.root, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
             config.num_key_value_heads, config.vocab_size, tp, pp, launch.world_size)

    dtype = pick_dtype(run.dtype, config.torch_dtype, grid.device)

    # Rank 0 reads and tokenizes the prompts and opens the output; all ranks hear whether that worked before
    # any weight is read.
    def read_inputs():
        if not grid.is_driver:
            return None, None, None
        # A checkpoint without tokenizer.json can still run prompts given as input_ids.
        tokenizer = Tokenizer.from_folder(ckpt.root) if (ckpt.root / "tokenizer.json").is_file() else None
        prompts = read_prompts(run, tokenizer, config.vocab_size)
        if tokenizer is None and (run.stream or options.stop_strings):
            raise UsageError(f"--stream and --stop-strings need a tokenizer, and {ckpt.root} has no tokenizer.json")
        try:
            out = open(run.output, "w", encoding="utf-8") if run.output else None
        except OSError as e:
            raise UsageError(f"cannot write --output {run.output}: {e.strerror}") from None
        return tokenizer, prompts, out
    tokenizer, prompts, out = on_every_rank(read_inputs, grid, "reading the prompts")

    t0 = time.perf_counter()
    runner, report = load_runner(config, ckpt, grid, dtype, sdpa=run.attn == "sdpa", progress=grid.is_driver)
    log_load(report, ckpt.total_bytes(), grid, time.perf_counter() - t0)
    if not grid.is_driver:
        follow(runner)
        return 0
    driver = Driver(runner)
    try:
        generate_all(run, options, prompts, tokenizer, driver, config, out)
    finally:
        if out:
            out.close()
    driver.close()  # only after success: after a failure the others hear it from the watchdog, not in a collective
    log.info("done in %.1f s", time.perf_counter() - started)
    return 0


def open_checkpoint(model: str | None, revision: str | None, progress: bool) -> Checkpoint:
    """A folder or hub id; 'demo' (or nothing) is the bundled demo model, converted on first use."""
    if model in (None, "demo"):
        from distllama import demo  # imports gguf: only when the demo is asked for
        model = str(demo.demo_checkpoint(progress=progress))
    return resolve_checkpoint(model, revision)


def load_runner(config, ckpt: Checkpoint, grid: Grid, dtype, sdpa: bool = True,
                progress: bool = False) -> tuple[StageRunner, LoadReport]:
    """This rank's stage, loaded on every rank before any goes on (see on_every_rank)."""
    stage = LlamaStage(config, grid, dtype, sdpa=sdpa)
    report = on_every_rank(lambda: load_stage(stage, ckpt, progress=progress), grid, "loading the weights")
    return StageRunner(stage, grid), report


def generate_all(run: RunConfig, options: GenerationOptions, prompts, tokenizer: Tokenizer, driver: Driver,
                 config, out) -> None:
    pad_id = first_of(tokenizer and tokenizer.pad_token_id, options.pad_token_id, options.eos_token_id, 0)
    vocab = tokenizer.get_vocab() if tokenizer else None
    # Dropping finished rows is exact unless the rope frequencies depend on the longest row in the batch.
    drop_finished = config.rope_parameters["rope_type"] not in ("dynamic", "longrope") and options.num_beams == 1
    show_text = run.stream or not out  # results go to stdout unless they go to --output only
    # Beam search settles its sequences only at the end (Transformers refuses a streamer there too).
    printer = StreamPrinter(tokenizer) if run.stream and options.num_beams == 1 else None
    timing = StepTimer(driver)
    for first in range(0, len(prompts), run.batch_size):
        batch = prompts[first:first + run.batch_size]
        ids, mask = left_pad(batch, pad_id)
        if printer:
            printer.begin(len(batch) * options.num_return_sequences)
        results = decoding.generate(timing, ids, mask, options, vocab=vocab,
                                    on_step=printer.step if printer else None, drop_finished=drop_finished)
        if printer:
            printer.end()
        for offset, (prompt, result) in enumerate(zip(batch, results)):
            record = result_record(first + offset, prompt, result, tokenizer, run.with_sequences)
            if out:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
            if show_text and not printer:
                print(record["text"] if tokenizer else record["output_ids"], flush=True)
    timing.report()


def result_record(index: int, prompt: list[int], result, tokenizer: Tokenizer | None,
                  with_sequences: bool = False) -> dict:
    def text(ids):  # null without a tokenizer
        return tokenizer.decode(ids) if tokenizer else None

    # Beam search scores and orders its sequences as Transformers does; samples carry no score there, so theirs is
    # their log-likelihood (sum of raw-logit logprobs), best first.
    sequences = [(s, s.score if s.score is not None else sum(s.token_logprobs)) for s in result.sequences]
    if any(s.score is None for s in result.sequences):
        sequences.sort(key=lambda pair: -pair[1])
    best = sequences[0][0]
    record = {"index": index, "input_ids": prompt, "output_ids": best.output_ids, "text": text(best.output_ids),
              "finish_reason": best.finish_reason, "token_logprobs": best.token_logprobs}
    if with_sequences or len(sequences) > 1:
        record["sequences"] = [{"output_ids": s.output_ids, "text": text(s.output_ids), "score": score,
                                "finish_reason": s.finish_reason} for s, score in sequences]
    return record


class StreamPrinter:
    """--stream: prints rows in order; the lowest unfinished row streams live, later rows are held until it ends."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def begin(self, rows: int) -> None:
        self.decoders = [StreamDecoder(self.tokenizer) for _ in range(rows)]
        self.pending = [""] * rows
        self.done = [False] * rows
        self.shown = 0  # rows before this one are printed in full

    def step(self, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        """tokens, finished: [rows], every row of the batch (rows that ended earlier carry padding)."""
        for row, (token, fin) in enumerate(zip(tokens.tolist(), finished.tolist())):
            if not self.done[row]:
                self.pending[row] += self.decoders[row].push([token])
                if fin:
                    self.pending[row] += self.decoders[row].finish()
                    self.done[row] = True
        self._flush()

    def _flush(self) -> None:
        while self.shown < len(self.pending):
            sys.stdout.write(self.pending[self.shown])
            self.pending[self.shown] = ""
            if not self.done[self.shown]:
                break
            sys.stdout.write("\n")
            self.shown += 1
        sys.stdout.flush()

    def end(self) -> None:
        for row in range(len(self.done)):
            if not self.done[row]:
                self.pending[row] += self.decoders[row].finish()
                self.done[row] = True
        self._flush()


class StepTimer:
    """A StepModel wrapper that times prefill and decode on rank 0 for the closing summary."""

    def __init__(self, model):
        self.model, self.vocab_size = model, model.vocab_size
        self.max_position_embeddings = model.max_position_embeddings
        self.prefill_s = self.decode_s = 0.0
        self.prefill_tokens = self.decode_tokens = 0
        self._fresh = False

    def start(self, batch_size, max_length):
        self._fresh = True
        self.model.start(batch_size, max_length)

    def forward(self, input_ids, attention_mask, position_ids):
        t0 = time.perf_counter()
        logits = self.model.forward(input_ids, attention_mask, position_ids)
        elapsed = time.perf_counter() - t0
        if self._fresh:
            self.prefill_s += elapsed
            self.prefill_tokens += int((attention_mask[:, -input_ids.shape[1]:] != 0).sum())
            self._fresh = False
        else:
            self.decode_s += elapsed
            self.decode_tokens += input_ids.shape[0]
        return logits

    def reorder(self, index):
        self.model.reorder(index)

    def report(self):
        log.info("prefill: %d tokens in %.2f s (%.1f tokens/s)", self.prefill_tokens, self.prefill_s,
                 self.prefill_tokens / max(self.prefill_s, 1e-9))
        log.info("decode: %d tokens in %.2f s (%.1f tokens/s)", self.decode_tokens, self.decode_s,
                 self.decode_tokens / max(self.decode_s, 1e-9))


# ---- small helpers ---------------------------------------------------------------------------------------------------

def pick_dtype(requested: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    if device.type == "cuda" and checkpoint_dtype in DTYPES:
        return DTYPES[checkpoint_dtype]
    return torch.float32


def log_load(report, total_bytes: int, grid: Grid, seconds: float) -> None:
    per_rank = torch.zeros(grid.world_size, dtype=torch.float64, device=grid.comm_device)
    per_rank[grid.rank] = report.bytes_read
    if grid.world_size > 1:
        torch.distributed.all_reduce(per_rank)
    shares = ", ".join(f"r{r} {b / 2**20:.1f} MiB ({100 * b / max(total_bytes, 1):.0f}%)"
                       for r, b in enumerate(per_rank.tolist()))
    log.info("load: %.1f s, %d tensors, %d shard file(s) on rank 0 | read per rank of the %.1f MiB checkpoint: %s",
             seconds, report.tensors, len(report.files_opened), total_bytes / 2**20, shares)


def first_of(*values):
    for v in values:
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return v
    return None


def setup_logging(level: str, rank: int) -> None:
    # Other ranks stay quiet (warnings only) unless debug was asked for.
    effective = level if rank == 0 or level == "debug" else "warning"
    logging.basicConfig(format="[distllama] %(message)s" if rank == 0 else f"[distllama rank {rank}] %(message)s",
                        stream=sys.stderr, force=True)
    log.setLevel(effective.upper())


if __name__ == "__main__":
    sys.exit(main())
