"""`python -m distllama.generate`: the command line, the run configuration, and what rank 0 does with results.

Every rank parses the same flags and YAML, checks them, and loads its own slice of the model; rank 0 then
tokenizes the prompts, runs them through the engine (distllama.engine) and writes results in input order while the
other ranks follow its plans (distllama.pipeline). See the README for the flags and
../shared/reference/cli-contract.md for the contract they implement.
"""

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from distllama import batch_api, beam
from distllama.checkpoint import Checkpoint, resolve_checkpoint
from distllama.config import load_config
from distllama.distributed import Grid, Launch, init_grid, on_every_rank, resolve_degrees, shutdown
from distllama.loader import LoadReport, load_stage
from distllama.memory import check_memory, keep_freed_memory, kv_cache_bytes, size
from distllama.model import LlamaStage, check_layout
from distllama.engine import Engine, PipelineStepModel, Request
from distllama.options import (GenerationOptions, add_option_flags, generation_defaults_file,
                               load_generation_defaults, option_values, resolve_lengths, resolve_options)
from distllama.outputs import PromptOutput, SequenceOutput
from distllama.pipeline import Pipeline, StageRunner, follow
from distllama.processors import build_logits_processor
from distllama.replicas import ResultReceiver, ResultSender, share
from distllama.results import ResultWriter, json_line
from distllama.signals import Stopped, StopRequest
from distllama.sampling import ROW_KNOBS, SlotSettings, request_seed
from distllama.stopping import StopCondition, token_bytes_from_vocab
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
    run.add_argument("--attn", choices=["auto", "sdpa", "eager"],
                     help="attention kernel (default auto: SDPA, and on a CPU with AVX-512 or AVX2 float32 decode "
                          "steps in distllama's own kernel; eager for checking)")
    run.add_argument("--matmul", choices=["auto", "torch"],
                     help="matmul kernel (default auto: on a CPU with AVX-512 or AVX2 float32 weights in distllama's "
                          "own kernel, else torch's; torch: oneDNN on the CPU)")
    run.add_argument("--dp", type=int, help="data-parallel replicas, each tp x pp ranks with its share of the prompts "
                                            "(default 1)")
    run.add_argument("--backend", choices=["auto", "nccl", "gloo"],
                     help="torch.distributed backend (default auto: nccl on cuda, gloo on cpu; gloo lets several ranks "
                          "share one GPU)")
    run.add_argument("--dist-timeout", type=float,
                     help="seconds a collective may wait for a live but busy rank (default 300)")
    run.add_argument("--peer-timeout", type=float,
                     help="seconds without a heartbeat before a rank is declared dead or hung (default 30)")
    run.add_argument("--load-timeout", type=float,
                     help="seconds start-up (joining, prompts, loading weights) may take on any rank (default 1800)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction,
                     help="run decode steps under torch.compile (CUDA graphs on a GPU); same tokens as without")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                     help="rank 0's log level (default info); other ranks log warnings only unless this is debug")
    io = p.add_argument_group("prompts and results")
    io.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    io.add_argument("--prompts-file", help='JSONL, one {"prompt": "..."} or {"input_ids": [...]} a line')
    io.add_argument("--output", help="write one JSON result per prompt (JSONL, input order)")
    io.add_argument("--shard", help="I/N: run only part I (0-based) of N interleaved parts of the prompts, prompts "
                                    "I, I+N, I+2N, ... (Slurm job arrays; merge the parts with distllama merge)")
    io.add_argument("--resume", action=argparse.BooleanOptionalAction,
                    help="with --output: skip prompts whose result is already a complete line of it, append the rest "
                         "(default: on inside a requeued Slurm job)")
    io.add_argument("--max-batch-size", "--batch-size", dest="max_batch_size", type=int,
                    help="sequences decoding at once (continuous batching: a finished sequence's slot takes the next "
                         "waiting prompt at once); --batch-size is another name for it (default 32 per pipeline stage: "
                         "32 x pp)")
    io.add_argument("--max-prefill-tokens", type=int,
                    help="prompt tokens prefilled per step at most; longer prompts go in chunks while the running "
                         "sequences keep decoding (default 2048; 512 per micro-batch step with pp > 1, which keeps the "
                         "stages in step)")
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
    attn: str = "auto"
    matmul: str = "auto"
    dp: int | None = None
    backend: str = "auto"
    dist_timeout: float = 300.0
    peer_timeout: float = 30.0
    load_timeout: float = 1800.0
    log_level: str = "info"
    prompt: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    output: str | None = None
    resume: bool = False
    shard: str | None = None
    max_batch_size: int | None = None  # None: 32 per pipeline stage (batch_slots)
    max_prefill_tokens: int | None = None  # None: the engine's default (2048, or 512 with pp > 1)
    compile: bool = False
    chat: bool = False
    system_prompt: str | None = None
    stream: bool = False
    with_sequences: bool = False  # num_return_sequences was given: every line carries "sequences"
    config_file: str | None = None  # the --config YAML, named in errors about its keys


RUN_KEYS = set(RunConfig.__dataclass_fields__) - {"with_sequences", "config_file"}
RUN_ALIASES = {"batch_size": "max_batch_size"}  # YAML keys that are another name for a run key, as the flags are

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
    config_file = args.pop("config", None)
    yaml_values = read_yaml(config_file) if config_file else {}
    if not argv:
        yaml_values = dict(DEMO_RUN)  # no arguments at all: the demo run, as configs/demo.yaml spells it
    yaml_run = parse_yaml_run({k: v for k, v in yaml_values.items() if k in RUN_KEYS or k in RUN_ALIASES},
                              config_file or "YAML")
    yaml_options = {k: v for k, v in yaml_values.items() if k not in RUN_KEYS and k not in RUN_ALIASES}
    cli_options = option_values(argparse.Namespace(**args))
    cli_run = {k: v for k, v in args.items() if k in RUN_KEYS}
    run = RunConfig(**{**yaml_run, **cli_run})
    run.config_file = config_file
    run.with_sequences = "num_return_sequences" in {**yaml_options, **cli_options}
    if "resume" not in {**yaml_run, **cli_run}:
        run.resume = requeued_slurm_job() and run.output is not None
    if run.resume and not run.output:
        raise UsageError("--resume needs --output FILE (the results file to continue)")
    shard_of(run)  # checked now
    if run.max_batch_size is not None and run.max_batch_size < 1:
        raise UsageError(f"--max-batch-size (--batch-size) must be at least 1, got {run.max_batch_size}")
    if run.max_prefill_tokens is not None and run.max_prefill_tokens < 1:
        raise UsageError(f"--max-prefill-tokens must be at least 1, got {run.max_prefill_tokens}")
    for flag in ("dist_timeout", "peer_timeout", "load_timeout"):
        if getattr(run, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(run, flag)}")
    if run.peer_timeout >= run.dist_timeout:  # else a hung rank shows up as a timed-out collective, unnamed
        raise UsageError(f"--peer-timeout ({run.peer_timeout:g}) must be shorter than --dist-timeout "
                         f"({run.dist_timeout:g}), so that a rank that stops responding is found before a "
                         "collective gives up on it")
    return run, yaml_options, cli_options


def parse_yaml_run(values: dict, path: str = "YAML") -> dict:
    """The YAML's run keys, checked and typed by the same parser as the flags (so `dtype: fp32` is refused the
    way `--dtype fp32` is), one key at a time so that an error names the file and the key."""
    parser = build_parser()
    parser.exit_on_error = False  # bad values raise argparse.ArgumentError, whose message names no flag
    parsed = {}
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        argv = []
        if isinstance(RunConfig.__dataclass_fields__[RUN_ALIASES.get(key, key)].default, bool):
            if not isinstance(value, bool):
                raise UsageError(f"{path}: key {key} must be true or false, got {value!r}")
            argv.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            for item in value if key == "prompt" and isinstance(value, list) else [value]:
                if isinstance(item, (dict, list, bool)) or item is None:
                    raise UsageError(f"{path}: key {key} must be a single value, got {item!r}")
                argv += [flag, str(item)]
        try:
            parsed.update(vars(parser.parse_args(argv)))
        except argparse.ArgumentError as e:
            raise UsageError(f"{path}: key {key}: {e.message}") from None
    return {k: v for k, v in parsed.items() if k in RUN_KEYS}


def read_yaml(path: str) -> dict:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"--config {path} line {line} is not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise UsageError(f"--config {path} is not valid YAML: nested too deeply") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of option: value, got {type(values).__name__}")
    known = RUN_KEYS | set(RUN_ALIASES) | set(vars(GenerationOptions()))
    for key in values:
        if key == "config" or key not in known:
            raise UsageError(f"--config {path}: unknown key {key!r}")
    return values


def batch_slots(run: RunConfig, grid: Grid) -> int:
    """--max-batch-size, by default 32 per pipeline stage: with pp > 1 the slots form pp micro-batches, and a
    micro-batch of 32 keeps each stage's matmuls as full as one process's; the KV cache per rank stays that of one
    process with 32 slots, as each stage holds only its own layers (vLLM keeps max_num_seqs per pipeline stage too)."""
    return run.max_batch_size or 32 * grid.pp


def shard_of(run: RunConfig) -> tuple[int, int]:
    """--shard I/N as (I, N); (0, 1) without it."""
    if run.shard is None:
        return 0, 1
    part, _, parts = run.shard.partition("/")
    try:
        part, parts = int(part), int(parts)
    except ValueError:
        part = parts = -1
    if not 0 <= part < parts:
        raise UsageError(f"--shard must be I/N with 0 <= I < N, e.g. 0/4, got {run.shard!r}")
    return part, parts


def requeued_slurm_job() -> bool:
    """Inside a Slurm job that was requeued (preempted or failed, then restarted): --resume is the default."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


# ---- prompts --------------------------------------------------------------------------------------------------------

@dataclass
class Prompts:
    """The run's prompts in input order, as token ids; from an OpenAI batch file also each line's request."""

    ids: list[list[int]]
    batch: list[batch_api.BatchRequest] | None = None


def read_prompts(run: RunConfig, tokenizer: Tokenizer | None, vocab_size: int) -> Prompts:
    """Token ids of every prompt in input order: --prompt flags first, then --prompts-file lines (plain prompt lines,
    or OpenAI batch-API lines, see distllama.batch_api). Every error names where the prompt came from: "FILE line N"
    or "prompt I (--prompt)"."""
    entries = [(f"prompt {i} (--prompt)", {"prompt": text}) for i, text in enumerate(run.prompt)]
    lines = []  # (line number, JSON) of the file's lines
    if run.prompts_file:
        try:
            data = Path(run.prompts_file).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read --prompts-file {run.prompts_file}: {e.strerror}") from None
        # Split bytes on b"\n" (not str.splitlines, which also splits inside JSON strings at U+2028 and friends),
        # and decode line by line so that bad bytes are reported with their line.
        for n, raw in enumerate(data.split(b"\n"), 1):
            where = f"{run.prompts_file} line {n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a leading byte-order mark is fine
            except UnicodeDecodeError as e:
                raise UsageError(f"{where} is not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                                 ) from None
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where} is not JSON: {e.msg} (column {e.colno})") from None
            except RecursionError:
                raise UsageError(f"{where} is not JSON: nested too deeply") from None
            lines.append((n, entry))
        try:
            batch = batch_api.parse_batch_lines(lines, run.prompts_file)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if batch is not None:
            return batch_prompts(run, batch, tokenizer, vocab_size)
        for n, entry in lines:
            where = f"{run.prompts_file} line {n}"
            if not isinstance(entry, dict) or ("prompt" in entry) == ("input_ids" in entry):
                raise UsageError(f'{where}: expected {{"prompt": "..."}} or {{"input_ids": [...]}}')
            entries.append((where, entry))
    if not entries:
        raise UsageError("no prompts: give --prompt TEXT or --prompts-file FILE.jsonl")
    prompts = []
    for where, entry in entries:
        if "input_ids" in entry:
            ids = entry["input_ids"]
            if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                raise UsageError(f"{where}: input_ids must be a list of integers")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                shown = str(bad[0]) if len(str(bad[0])) <= 30 else f"{str(bad[0])[:12]}... ({len(str(bad[0]))} digits)"
                raise UsageError(f"{where}: token id {shown} is outside the vocabulary (0..{vocab_size - 1})")
        elif not isinstance(entry["prompt"], str):
            raise UsageError(f"{where}: \"prompt\" must be a string")
        elif not entry["prompt"].isascii() and not _encodable(entry["prompt"]):
            raise UsageError(f"{where}: the prompt is not valid Unicode text (it holds a lone surrogate)")
        elif tokenizer is None:
            raise UsageError(f"{where}: the prompt is text, but the checkpoint has no tokenizer.json: "
                             "give input_ids instead")
        elif run.chat:
            messages = [{"role": "user", "content": entry["prompt"]}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, system_prompt=run.system_prompt)
        else:
            ids = tokenizer.encode(entry["prompt"])
        if not ids:
            raise UsageError(f"{where}: the prompt is empty after tokenization")
        prompts.append(ids)
    return Prompts(prompts)


def batch_prompts(run: RunConfig, batch: list, tokenizer: Tokenizer | None, vocab_size: int) -> Prompts:
    """An OpenAI batch file: each line says itself whether it is a chat, so the run's own prompt flags do not mix."""
    for flag, given in (("--prompt", run.prompt), ("--chat", run.chat), ("--system-prompt", run.system_prompt)):
        if given:
            raise UsageError(f"{flag} does not apply to {run.prompts_file}: it holds OpenAI batch lines, each "
                             "naming its endpoint (chat or completions) and its own messages")
    try:
        return Prompts([batch_api.prompt_ids(r, tokenizer, vocab_size) for r in batch], batch)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates: JSON "\\ud800", or bytes of a command line that were not UTF-8
        return False


# ---- the run --------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    launch = Launch.from_env()
    setup_logging("info", launch.rank)
    stop = StopRequest().install()
    try:
        return run_generation(argv, launch, stop)
    except Stopped as e:  # rank 0: the finished results are written; the other ranks stopped with it
        say(f"distllama: {e} before every prompt was done{'; ' + e.note if getattr(e, 'note', '') else ''}")
        return e.exit_code
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


def run_generation(argv, launch: Launch, stop: StopRequest | None = None) -> int:
    started = time.perf_counter()
    run, yaml_options, cli_options = parse_args(argv)
    setup_logging(run.log_level, launch.rank)
    tp, pp, dp = resolve_degrees(launch.world_size, run.tp, run.pp, run.dp)
    # From here on a failure on any rank, or a rank that dies or hangs, stops every rank (distllama.watchdog).
    grid = init_grid(tp, pp, run.device, run.dist_timeout, launch, dp=dp, backend=run.backend,
                     load_timeout_s=run.load_timeout, peer_timeout_s=run.peer_timeout)

    # Everything checked here is checked identically on every rank, so a bad value stops all of them at once.
    ckpt = open_checkpoint(run.model, run.revision, progress=launch.rank == 0)
    config = load_config(ckpt.root)
    check_layout(config, tp, pp)
    options = resolve_options(load_generation_defaults(ckpt.root), yaml_options, cli_options,
                              yaml_file=run.config_file, defaults_file=str(generation_defaults_file(ckpt.root)),
                              vocab_size=config.vocab_size)
    log.info("config: %s | %d layers, hidden %d, %d heads / %d kv heads, vocab %d | %stp %d x pp %d = %d ranks",
             ckpt.hub_id or ckpt.root, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
             config.num_key_value_heads, config.vocab_size, f"dp {dp} x " if dp > 1 else "", tp, pp,
             launch.world_size)
    dtype = pick_dtype(run.dtype, config.torch_dtype, grid.device)

    # Each replica's driver reads and tokenizes the prompts and checks them against the options; rank 0 also checks
    # the output (a --resume reads it). All ranks hear whether that worked before any weight is read. Nothing is
    # written to the output before the first result.
    def read_inputs():
        return read_job(run, options, config, ckpt, grid) if grid.is_driver else None
    job = on_every_rank(read_inputs, grid, "reading the prompts")
    if job is not None and dp > 1:
        job.requests = replica_requests(job, grid)

    t0 = time.perf_counter()
    runner, report = load_runner(config, ckpt, grid, dtype, sdpa=run.attn != "eager", progress=grid.is_driver,
                                 options=options, compile=run.compile, decode_kernel=run.attn == "auto",
                                 matmul_kernel=run.matmul == "auto")
    log_load(report, ckpt.total_bytes(), grid, time.perf_counter() - t0)
    check_kv_cache(run, options, job.requests if job else [], runner.stage, grid)
    if not grid.is_driver:
        follow(runner)
        return stop.signum + 128 if stop else 0  # stopped by a signal with rank 0, which said so
    pipeline = Pipeline(runner)
    writer = job.writer
    try:
        generate_all(run, options, job, pipeline, config, grid, stop)
        if writer:
            writer.finish()
    except Stopped as e:
        pipeline.close()  # a clean stop: the replica's other ranks end with it
        e.note = writer.abort() if writer else ""
        raise
    except BaseException:
        # after a failure the others hear it from the watchdog, not in a collective that may never complete
        note = writer.abort() if writer else ""
        if note:
            log.warning("%s", note)
        raise
    pipeline.close()
    if grid.is_writer:
        elapsed = time.perf_counter() - started
        log.info("done: %d prompts, %d generated tokens in %.1f s (%.1f generated tokens/s, load included)",
                 job.prompts_done, job.tokens_done, elapsed, job.tokens_done / max(elapsed, 1e-9))
    return 0


def read_job(run: RunConfig, options: GenerationOptions, config, ckpt, grid: Grid) -> "Job":
    """A replica driver's start: the prompts as requests, and on rank 0 the results file (with --resume, the prompts
    it already holds are done; the other drivers learn how many through the store)."""
    # A checkpoint without tokenizer.json can still run prompts given as input_ids.
    tokenizer = Tokenizer.from_folder(ckpt.root) if (ckpt.root / "tokenizer.json").is_file() else None
    prompts = read_prompts(run, tokenizer, config.vocab_size)
    if tokenizer is None and (run.stream or options.stop_strings):
        raise UsageError(f"--stream and --stop-strings need a tokenizer, and {ckpt.root} has no tokenizer.json")
    try:  # an OpenAI batch line's fields on top of the run's options
        prompt_options = [batch_api.request_options(options, r) for r in prompts.batch or ()] or None
    except ValueError as e:
        raise UsageError(str(e)) from None
    if tokenizer is None and any(o.stop_strings for o in prompt_options or ()):
        raise UsageError(f"stop strings need a tokenizer, and {ckpt.root} has no tokenizer.json")
    part, parts = shard_of(run)
    order = list(range(part, len(prompts.ids), parts))  # this run's prompts (all of them without --shard)
    if not order:
        raise UsageError(f"--shard {run.shard}: part {part} of {parts} holds none of the {len(prompts.ids)} prompts")
    requests = make_requests(prompts.ids, options, config, tokenizer, prompt_options)
    writer = open_results(run, prompts, order) if run.output and grid.is_writer else None
    if grid.is_writer and grid.dp > 1:
        grid.store.set("resumed", str(len(writer.done) if writer else 0))
    job = Job(prompts, prompt_options, requests, tokenizer, writer, ckpt.hub_id or ckpt.root.name, order)
    job.order = order[len(writer.done):] if writer else order  # --resume: the prompts already in the file are done
    in_order = set(job.order)
    job.requests = [r for r in requests if r.index in in_order]
    return job


def replica_requests(job: "Job", grid: Grid) -> list[Request]:
    """With --dp: this replica's share of the run's prompts (rank 0 still writes them all)."""
    resumed = int(grid.store.get("resumed"))  # rank 0 set it before the start-up phase ended
    if not grid.is_writer:
        job.order = job.order[resumed:]
    lengths = {i: len(job.prompts.ids[i]) for i in job.order}
    mine = set(share(job.order, lengths, grid.dp, grid.dp_rank))
    return [r for r in job.requests if r.index in mine]


@dataclass
class Job:
    """What rank 0 runs: the prompts, each prompt's own options (batch lines), the requests, and where results go."""

    prompts: Prompts
    prompt_options: list[GenerationOptions] | None
    requests: list[Request]
    tokenizer: Tokenizer | None
    writer: ResultWriter | None  # rank 0 only
    model_name: str
    order: list[int] = field(default_factory=list)  # the prompts this run still has to write, in output order
    prompts_done: int = 0  # handed on (written / printed)
    tokens_done: int = 0  # generated for them


def open_results(run: RunConfig, prompts: Prompts, order: list[int]) -> ResultWriter:
    """--output as a ResultWriter (distllama.results) for the prompts in order; with --resume, kept lines must hold
    this run's prompts (plain results by their index and input_ids, batch responses by their custom_id)."""
    if prompts.batch:
        index_of = {r.custom_id: i for i, r in enumerate(prompts.batch)}
        return ResultWriter(run.output, order=order, resume=run.resume, key=lambda rec: index_of.get(rec.get("custom_id")))

    def same_prompt(index: int, record: dict) -> str | None:
        if record.get("input_ids") != prompts.ids[index]:
            return (f"its input_ids are not those of prompt {index} in this run "
                    "(the prompts or the chat template changed)")
        return None
    return ResultWriter(run.output, order=order, resume=run.resume, check=same_prompt)


def check_kv_cache(run: RunConfig, options: GenerationOptions, requests: list[Request], stage: LlamaStage,
                   grid: Grid) -> None:
    """Before any step: the KV cache the run allocates, logged per rank by rank 0 and checked against every rank's
    free memory, so that a rank without room stops all of them at once with the numbers."""
    def plan():  # rank 0: (slots, positions) the engine or beam search will allocate
        if not grid.is_driver or not requests:
            return [0, 0]
        slots = options.num_beams if options.num_beams > 1 else min(batch_slots(run, grid), len(requests))
        return [slots, max(r.settings.max_length for r in requests) + 1]  # + the scratch column
    sizes = torch.tensor(on_every_rank(plan, grid), dtype=torch.int64, device=grid.comm_device)
    if grid.world_size > 1:
        torch.distributed.broadcast(sizes, src=0)
    slots, positions = sizes.tolist()
    needed = kv_cache_bytes(slots, positions, len(stage.layer_ids), stage.kv_heads_held, stage.config.head_dim,
                            stage.dtype)
    per_rank = torch.zeros(grid.world_size, dtype=torch.float64, device=grid.comm_device)
    per_rank[grid.rank] = needed
    if grid.world_size > 1:
        torch.distributed.all_reduce(per_rank)
    log.info("kv cache: %d slots x %d positions | per rank: %s", slots, positions,
             ", ".join(f"r{r} {size(int(b))}" for r, b in enumerate(per_rank.tolist())))
    on_every_rank(lambda: check_memory(needed, grid.device, f"the KV cache ({slots} sequences x {positions} "
                                                            f"positions, {len(stage.layer_ids)} layers)"), grid)


def open_checkpoint(model: str | None, revision: str | None, progress: bool) -> Checkpoint:
    """A folder or hub id; 'demo' (or nothing) is the bundled demo model, converted on first use."""
    if model in (None, "demo"):
        from distllama import demo  # imports gguf: only when the demo is asked for
        model = str(demo.demo_checkpoint(progress=progress))
    return resolve_checkpoint(model, revision)


def load_runner(config, ckpt: Checkpoint, grid: Grid, dtype, sdpa: bool = True, progress: bool = False,
                options: GenerationOptions | None = None, compile: bool = False,
                decode_kernel: bool = True, matmul_kernel: bool = True) -> tuple[StageRunner, LoadReport]:
    """This rank's stage, loaded on every rank before any goes on (see on_every_rank), its weights then packed for
    speed. options: what the last stage samples with (every rank parses the same). compile: see StageRunner.
    decode_kernel: decode steps may take distllama.decode_attention where it runs (not in compiled steps).
    matmul_kernel: float32 matmuls may take distllama.cpu_matmul where it runs (not in compiled steps)."""
    if grid.device.type == "cpu":
        keep_freed_memory()
    # The first stage may compute half of the lm_head (LlamaStage's split_head): measured on CPU; on GPUs (not
    # measured) and compiled, the last stage keeps the whole token choice.
    stage = LlamaStage(config, grid, dtype, sdpa=sdpa, split_head=grid.device.type == "cpu" and not compile,
                       decode_kernel=sdpa and decode_kernel and not compile)
    report = on_every_rank(lambda: load_stage(stage, ckpt, progress=progress), grid, "loading the weights")
    if compile:
        import torch._inductor.config as inductor

        inductor.freezing = True  # inductor packs the CPU weights itself when it may treat them as constants

    else:
        stage.pack(own_kernel=matmul_kernel)
    return StageRunner(stage, grid, options, compile), report


def make_requests(prompts: list[list[int]], options: GenerationOptions, config, tokenizer,
                  prompt_options: list[GenerationOptions] | None = None) -> list[Request]:
    """One request per prompt and returned sequence, each with the lengths Transformers' generate would give that
    prompt alone and its own seeded random stream. prompt_options: each prompt's own options (OpenAI batch lines),
    else the run's. Checks every prompt against its options before any model work."""
    prompt_options = prompt_options or [options] * len(prompts)
    vocab_bytes = None
    if any(o.stop_strings for o in prompt_options):
        vocab_bytes = token_bytes_from_vocab(tokenizer.get_vocab())
    stops = {}  # one StopCondition per distinct (eos, stop strings)
    # Unseeded sampling still gets one run seed, so every request has its own stream.
    run_seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(8), "little")
    requests, warned = [], False
    for index, (prompt, opts) in enumerate(zip(prompts, prompt_options, strict=True)):
        try:
            lengths = resolve_lengths(opts, len(prompt), config.max_position_embeddings)
        except ValueError as e:
            raise UsageError(f"prompt {index} ({len(prompt)} tokens): {e}") from None
        if lengths.max_length > config.max_position_embeddings and not warned:
            warned = True  # Transformers' own warning, once
            log.warning("This is a friendly reminder - the current text generation call will exceed the model's "
                        "predefined maximum length (%d). Depending on the model, you may observe exceptions, "
                        "performance degradation, or nothing at all.", config.max_position_embeddings)
        key = (tuple(opts.eos_token_id or ()), tuple(opts.stop_strings or ()))
        if key not in stops:
            stops[key] = StopCondition(opts.eos_token_id, opts.stop_strings, token_bytes=vocab_bytes)
        # a request's own seed (a batch line's) makes its stream independent of where it stands in the file
        seed, seed_index = (opts.seed, 0) if opts is not options and opts.seed is not None else (run_seed, index)
        samples = opts.num_return_sequences if opts.do_sample and opts.num_beams == 1 else 1
        for sample in range(samples):
            settings = SlotSettings.of(len(prompt), lengths.max_length, lengths.min_length,
                                       request_seed(seed, seed_index, sample), opts)
            requests.append(Request(index, prompt, settings, stops[key], sample=sample))
    return requests


def row_knobs(options: GenerationOptions, prompt_options: list[GenerationOptions] | None) -> frozenset:
    """The sampling knobs some prompt sets differently from the run (they are then applied row by row)."""
    if not prompt_options:
        return frozenset()
    knobs = {k for k in ROW_KNOBS if any(getattr(o, k) != getattr(options, k) for o in prompt_options)}
    if any((o.min_length, o.min_new_tokens) != (options.min_length, options.min_new_tokens) for o in prompt_options):
        knobs.add("min_length")
    return frozenset(knobs)


def generate_all(run: RunConfig, options: GenerationOptions, job: Job, pipeline: Pipeline, config, grid: Grid,
                 stop: StopRequest | None = None) -> None:
    """A replica driver's run: its requests through the engine (or beam search); the records go to rank 0, which
    writes and prints them in input order."""
    show_text = run.stream or job.writer is None  # results go to stdout unless they go to --output only
    # Tokens stream live when one engine makes them all (Transformers refuses a streamer with beams too); with
    # replicas the texts come out whole, in order.
    printer = None
    if run.stream and options.num_beams == 1 and grid.dp == 1:
        printer = StreamPrinter(job.tokenizer, job.requests)
    receiver = sender = None
    if grid.is_writer:
        emit = InOrder(job, echo=show_text and not printer)
        if grid.dp > 1:
            receiver = ResultReceiver(grid.results_group, grid.dp - 1)
    else:
        sender = ResultSender(grid.results_group)
        emit = sender.send
    results = Results(job, run.with_sequences, emit)
    try:
        if options.num_beams > 1:
            beam_all(options, job, pipeline, config, results)
        else:
            engine = Engine(pipeline, batch_slots(run, grid), run.max_prefill_tokens, micro_batches=grid.pp,
                            static_decode=run.compile, stop=stop)
            run_engine(engine, options, job, results, printer, receiver, emit)
    finally:
        if sender:
            sender.close()
        if receiver:  # the other replicas' results, to the last (each sends its end, stopped or not)
            receiver.wait(emit)


def run_engine(engine: Engine, options, job: Job, results: "Results", printer, receiver, emit) -> None:
    started = time.perf_counter()
    with Progress(len(job.order) if job.writer or receiver else len({r.index for r in job.requests})) as progress:
        if isinstance(emit, InOrder):
            emit.progress = progress
        for request in engine.generate(job.requests, on_token=printer.token if printer else None,
                                       per_row=row_knobs(options, job.prompt_options)):
            if printer:
                printer.finish(request)
            results.add(request)
            if receiver:
                receiver.drain(emit)
    elapsed = time.perf_counter() - started
    generated = sum(len(r.output_ids) for r in job.requests)
    log.info("prefill: %d prompt tokens of %d prompts", sum(len(r.prompt) for r in job.requests),
             len({r.index for r in job.requests}))
    log.info("decode: %d tokens in %.1f s (%.1f tokens/s), %d steps", generated, elapsed,
             generated / max(elapsed, 1e-9), engine.steps)


def beam_all(options, job: Job, pipeline, config, results) -> None:
    """Beam search, one prompt at a time (its beams fill the first slots)."""
    model = PipelineStepModel(pipeline, config.max_position_embeddings)
    vocab_bytes = token_bytes_from_vocab(job.tokenizer.get_vocab()) if job.tokenizer else None
    for request in job.requests:
        opts = job.prompt_options[request.index] if job.prompt_options else options
        prompt_options = resolve_lengths(opts, len(request.prompt), config.max_position_embeddings)
        processors = build_logits_processor(prompt_options, len(request.prompt))
        stopping = StopCondition(opts.eos_token_id, opts.stop_strings, token_bytes=vocab_bytes)
        generator = None
        if opts.do_sample:
            generator = torch.Generator().manual_seed(request.settings.seed & (2**63 - 1))
        ids = torch.tensor([request.prompt])
        [output] = beam.beam_search(model, ids, torch.ones_like(ids), prompt_options, processors, stopping, generator)
        results.add_output(request.index, output)


class Progress:
    """Rank 0's progress over prompts: a tqdm bar on a terminal, a log line every 30 s elsewhere (a Slurm log)."""

    def __init__(self, total: int, every_s: float = 30.0):
        self.total, self.every_s, self.done, self.tokens = total, every_s, 0, 0
        self.started = self.last_line = time.perf_counter()
        self.bar = tqdm(total=total, unit="prompt", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False,
                        dynamic_ncols=True)

    def prompt_done(self, generated: int) -> None:
        self.done += 1
        self.tokens += generated
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix_str(f"{rate:,.1f} tokens/s", refresh=False)
        if self.bar.disable and time.perf_counter() - self.last_line >= self.every_s:
            self.last_line = time.perf_counter()
            log.info("progress: %d of %d prompts, %d tokens generated, %.1f tokens/s", self.done, self.total,
                     self.tokens, rate)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


class Results:
    """Collects each prompt's finished sequences; once a prompt has all of them, its record goes to emit(index,
    record, generated tokens)."""

    def __init__(self, job: Job, with_sequences: bool, emit):
        self.job, self.with_sequences, self.emit = job, with_sequences, emit
        self.expected: dict[int, int] = {}
        for r in job.requests:
            self.expected[r.index] = self.expected.get(r.index, 0) + 1
        self.done: dict[int, list] = {}  # finished sequences of prompts not yet complete

    def add(self, request: Request) -> None:
        sequence = SequenceOutput(request.output_ids, request.finish_reason, request.token_logprobs)
        self.done.setdefault(request.index, []).append((request.sample, sequence))
        if len(self.done[request.index]) == self.expected[request.index]:
            self.add_output(request.index, PromptOutput([s for _, s in sorted(self.done.pop(request.index),
                                                                               key=lambda pair: pair[0])]))

    def add_output(self, index: int, output: PromptOutput) -> None:
        self.emit(index, self._record(index, output), sum(len(s.output_ids) for s in output.sequences))

    def _record(self, index: int, output: PromptOutput) -> dict:
        job = self.job
        prompt = job.prompts.ids[index]
        if not job.prompts.batch:
            return result_record(index, prompt, output, job.tokenizer, self.with_sequences)
        # OpenAI batch: the response line, its choices best first as for plain results
        best_first = result_record(index, prompt, output, job.tokenizer, with_sequences=True)
        choices = [batch_api.Choice(s["text"] or "", s["output_ids"], s["finish_reason"])
                   for s in best_first["sequences"]]
        return batch_api.response_line(job.prompts.batch[index], choices, prompt_tokens=len(prompt),
                                       model=job.model_name, stop_strings=job.prompt_options[index].stop_strings)


class InOrder:
    """Rank 0: every prompt's record, from its own replica or another, written (--output) and printed in input
    order."""

    def __init__(self, job: Job, echo: bool):
        self.job, self.echo = job, echo
        self.position = {index: i for i, index in enumerate(job.order)}
        self.ready: dict[int, dict] = {}
        self.next = 0  # position in job.order of the first record not yet handed on
        self.progress: Progress | None = None

    def __call__(self, index: int, record: dict, tokens: int) -> None:
        if self.progress:
            self.progress.prompt_done(tokens)
        self.job.prompts_done += 1
        self.job.tokens_done += tokens
        if self.job.writer:
            self.job.writer.add(index, record)  # the writer keeps the order itself
        self.ready[self.position[index]] = record
        while self.next in self.ready:
            shown = self.ready.pop(self.next)
            if self.echo:
                text = shown if self.job.prompts.batch else shown["text"] if self.job.tokenizer else \
                    shown["output_ids"]
                print(json_line(text) if isinstance(text, dict) else text, flush=True)
            self.next += 1


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
    """--stream: prints sequences in input order; the first unfinished one streams live, later ones are held until
    every earlier one has been printed (continuous batching finishes them in any order)."""

    def __init__(self, tokenizer: Tokenizer, requests: list[Request]):
        self.tokenizer = tokenizer
        self.rows = sorted((r.index, r.sample) for r in requests)
        self.row_of = {key: row for row, key in enumerate(self.rows)}
        self.decoders = [StreamDecoder(tokenizer) for _ in self.rows]
        self.pending = [""] * len(self.rows)
        self.done = [False] * len(self.rows)
        self.shown = 0  # rows before this one are printed in full

    def token(self, request: Request, token: int) -> None:
        row = self.row_of[(request.index, request.sample)]
        self.pending[row] += self.decoders[row].push([token])
        if row == self.shown:
            self._flush()

    def finish(self, request: Request) -> None:
        row = self.row_of[(request.index, request.sample)]
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


def setup_logging(level: str, rank: int) -> None:
    # Other ranks stay quiet (warnings only) unless debug was asked for.
    effective = level if rank == 0 or level == "debug" else "warning"
    logging.basicConfig(format="[distllama] %(message)s" if rank == 0 else f"[distllama rank {rank}] %(message)s",
                        stream=sys.stderr, force=True)
    log.setLevel(effective.upper())


if __name__ == "__main__":
    sys.exit(main())
