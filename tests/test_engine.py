"""The engine (continuous batching) through the real runtime in one process, against Transformers' generate on each
prompt alone: the generate() options, slots reused as rows finish, chunked prefill, seeded sampling that does not
depend on the batch, the sampled distribution, stop strings and streaming."""

import itertools
import math
import random

import pytest
import torch
from transformers import AutoTokenizer
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from checkpoints import MIXED_PROMPTS as PROMPTS  # mixed lengths, a one-token prompt among them
from checkpoints import assert_matches_hf, build_checkpoint, hf_alone
from distllama.checkpoint import resolve_checkpoint
from distllama.config import load_config
from distllama.distributed import Grid, Launch, init_grid
from distllama.engine import Engine
from distllama.generate import load_runner, make_requests
from distllama.model import LlamaStage, StepBatch
from distllama.options import load_generation_defaults, resolve_options
from distllama.pipeline import Pipeline, StageRunner
from distllama.tokenizer import Tokenizer


class Runtime:
    """One loaded stage (world size 1); each run gets its own runner, as the CLI builds one per run."""

    def __init__(self, folder, decode_kernel=True, matmul_kernel=True):
        self.folder = folder
        self.ckpt = resolve_checkpoint(str(folder))
        self.config = load_config(self.ckpt.root)
        self.grid = init_grid(1, 1, "cpu")
        runner, _ = load_runner(self.config, self.ckpt, self.grid, torch.float32, decode_kernel=decode_kernel,
                                matmul_kernel=matmul_kernel)
        self.stage = runner.stage
        self.tokenizer = Tokenizer.from_folder(self.ckpt.root)
        self.plans = []  # every plan of the last run

    def options(self, **values):
        return resolve_options(load_generation_defaults(self.folder), {}, values)

    def run(self, prompts, max_batch_size=32, max_prefill_tokens=2048, on_token=None, engine_args=None, **values):
        """Each prompt's finished requests (one per returned sequence), in input order. engine_args: for Engine."""
        options = self.options(**values)
        pipeline = Pipeline(StageRunner(self.stage, self.grid, options))
        submit, self.plans = pipeline.submit, []
        pipeline.submit = lambda plan: (self.plans.append(plan), submit(plan))
        engine = Engine(pipeline, max_batch_size, max_prefill_tokens, **(engine_args or {}))
        plan, self.rows = engine._plan, []  # each step: the request behind each of its result rows

        def recorded(*args):
            planned = plan(*args)
            if planned is not None:
                self.rows.append([r for r in planned[1] if r is not None])
            return planned
        engine._plan = recorded
        requests = make_requests(prompts, options, self.config, self.tokenizer)
        finished = sorted(engine.generate(requests, on_token=on_token), key=lambda r: (r.index, r.sample))
        assert len(finished) == len(requests)
        return [[r for r in finished if r.index == i] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine") / "model"
    model = build_checkpoint(folder, seed=21)
    return Runtime(folder), model


@pytest.fixture(scope="module")
def sdpa_runtime(runtime):
    """The same checkpoint with SDPA for decode steps too (as on a GPU or a CPU without the decode kernel)."""
    return Runtime(runtime[0].folder, decode_kernel=False), runtime[1]


@pytest.fixture(scope="module")
def baseline(runtime):
    """Greedy output without eos, and two tokens the model really emits mid-sequence (used as eos ids so that
    rows end at different steps)."""
    _, model = runtime
    rows = [hf_alone(model, p, {"max_new_tokens": 12, "eos_token_id": None})[0]["output_ids"] for p in PROMPTS]
    fresh = sorted((step, t) for row in rows for step, t in enumerate(row) if step >= 2
                   and all(t not in other[:step] for other in rows))
    first_step, first = fresh[0]
    later = [t for step, t in fresh if t != first and step > first_step] or [fresh[-1][1]]
    return rows, [first, later[0]]


def greedy_cases(rows, eos_ids):
    first_tokens = [row[0] for row in rows]
    return {
        "plain": {},
        "repetition_penalty": dict(repetition_penalty=1.5),
        "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
        "bad_words_ids": dict(bad_words_ids=[[rows[0][0]], [rows[1][1], rows[1][2]]]),
        "suppress_tokens": dict(suppress_tokens=first_tokens[:3]),
        "begin_suppress_tokens": dict(begin_suppress_tokens=[first_tokens[0], first_tokens[2]]),
        "forced_eos_token_id": dict(forced_eos_token_id=5),
        "forced_bos_token_id": dict(forced_bos_token_id=11, begin_suppress_tokens=[3, 4]),  # the 1-token prompt
        "several_eos_ids": dict(eos_token_id=eos_ids),
        "min_new_tokens": dict(eos_token_id=eos_ids, min_new_tokens=6),
        "min_length": dict(eos_token_id=eos_ids, min_length=12),
        "exponential_decay": dict(eos_token_id=eos_ids, exponential_decay_length_penalty=(2, 3.0)),
        "max_length": dict(max_new_tokens=None, max_length=14),
        "max_new_tokens_wins": dict(max_new_tokens=4, max_length=18),
        "default_length": dict(max_new_tokens=None),  # Transformers: 20 new tokens
    }


CASES = list(greedy_cases([[0, 0, 0]] * 3, []))


@pytest.mark.parametrize("case", CASES)
def test_greedy_options_match_transformers(runtime, baseline, case):
    rt, model = runtime
    rows, eos_ids = baseline
    values = {"max_new_tokens": 12, **greedy_cases(rows, eos_ids)[case]}
    values = {k: v for k, v in values.items() if v is not None}
    # two slots for five prompts and three-token prefill chunks: slots are reused, prompts arrive in pieces
    ours = rt.run(PROMPTS, max_batch_size=2, max_prefill_tokens=3, **values)
    for i, prompt in enumerate(PROMPTS):
        [theirs] = hf_alone(model, prompt, values)
        [request] = ours[i]
        assert_matches_hf(vars(request), theirs, f"{case} prompt {i}")
        eos = set(values.get("eos_token_id", [2]))
        assert request.finish_reason == ("eos" if request.output_ids[-1] in eos else "length")
    if case in ("several_eos_ids", "exponential_decay"):
        assert any(r.finish_reason == "eos" for [r] in ours)


def test_the_cases_change_the_output(runtime, baseline):
    """The greedy cases test something only if banning / suppressing tokens changes what is generated."""
    rt, _ = runtime
    rows, eos_ids = baseline
    plain = [r.output_ids for [r] in rt.run(PROMPTS, max_new_tokens=12)]
    for case in ("repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                 "begin_suppress_tokens", "forced_bos_token_id"):
        changed = [r.output_ids for [r] in rt.run(PROMPTS, max_new_tokens=12, **greedy_cases(rows, eos_ids)[case])]
        assert changed != plain, case


@pytest.mark.parametrize("max_batch_size, max_prefill_tokens", [(1, 2048), (2, 4), (3, 1), (8, 7)])
def test_any_batch_gives_each_prompt_its_own_tokens(runtime, baseline, max_batch_size, max_prefill_tokens):
    rt, model = runtime
    _, eos_ids = baseline
    values = dict(max_new_tokens=10, eos_token_id=eos_ids, repetition_penalty=1.2)
    ours = rt.run(PROMPTS, max_batch_size=max_batch_size, max_prefill_tokens=max_prefill_tokens, **values)
    for i, prompt in enumerate(PROMPTS):
        assert_matches_hf(vars(ours[i][0]), hf_alone(model, prompt, values)[0], f"prompt {i}")


def test_a_freed_slot_takes_the_next_prompt_at_once(runtime, baseline):
    rt, _ = runtime
    _, eos_ids = baseline
    ours = rt.run(PROMPTS, max_batch_size=2, max_new_tokens=10, eos_token_id=eos_ids)
    lengths = [len(r.output_ids) for [r] in ours]
    assert len(set(lengths)) > 1  # rows end at different steps
    # every plan after the first admits a prompt exactly when a slot was freed by the previous step's result
    admitted = [len(plan.admissions) for plan in rt.plans]
    assert admitted[0] == 2 and sum(admitted) == len(PROMPTS)
    busy = [len(rows) for rows in rt.rows]
    last_admission = max(i for i, n in enumerate(admitted) if n)
    assert last_admission > 1
    assert all(b == 2 for b in busy[:last_admission + 1])  # both slots stay busy until the queue runs dry


def test_requests_added_while_others_run_get_their_own_tokens(runtime, baseline):
    """A started engine takes requests at any time (as a server would feed it): the ones added mid-run queue for a
    slot and still give what Transformers gives each prompt alone; two micro-batches of one slot each."""
    rt, model = runtime
    _, eos_ids = baseline
    values = dict(max_new_tokens=10, eos_token_id=eos_ids)
    options = rt.options(**values)
    engine = Engine(Pipeline(StageRunner(rt.stage, rt.grid, options)), 2, 3, micro_batches=2)
    requests = make_requests(PROMPTS, options, rt.config, None)
    engine.start(2, max(r.settings.max_length for r in requests))
    too_long = make_requests([PROMPTS[0]], rt.options(max_new_tokens=100), rt.config, None)[0]
    with pytest.raises(ValueError, match="started with"):
        engine.add(too_long)
    finished = []
    for request in requests[:2]:
        engine.add(request)
    while not requests[0].output_ids or not requests[1].output_ids:  # both running
        finished += engine.step()
    for request in requests[2:]:
        assert any(r.finish_reason is None for r in requests[:2])  # added while others decode
        engine.add(request)
        finished += engine.step()
    while not engine.idle:
        finished += engine.step()
    assert engine.step() == [] and engine.groups == 2
    assert sorted(r.index for r in finished) == list(range(len(PROMPTS)))
    for request, prompt in zip(requests, PROMPTS):
        assert_matches_hf(vars(request), hf_alone(model, prompt, values)[0], f"prompt {request.index}")


def test_long_prompts_are_prefilled_in_chunks_while_others_decode(runtime):
    rt, model = runtime
    long_prompt = [1] + list(range(20, 60))  # 41 tokens
    prompts = [[1, 17, 250], long_prompt]
    ours = rt.run(prompts, max_batch_size=2, max_prefill_tokens=8, max_new_tokens=6, eos_token_id=None)
    slot = next(a[0] for plan in rt.plans for a in plan.admissions if a[1] == len(long_prompt))  # where it went
    chunks = [c for plan in rt.plans for c in plan.chunks if c[0] == slot]
    assert [c[2] for c in chunks] == [5, 8, 8, 8, 8, 4]  # 8 per step after the short prompt's 3
    assert any(plan.n_decode and plan.chunks for plan in rt.plans)  # decode rows ran beside the prefill
    for i, prompt in enumerate(prompts):
        assert_matches_hf(vars(ours[i][0]), hf_alone(model, prompt, {"max_new_tokens": 6, "eos_token_id": None})[0])


SAMPLING = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.95, max_new_tokens=10)


def test_seeded_sampling_does_not_depend_on_the_batch(runtime, baseline):
    rt, _ = runtime
    _, eos_ids = baseline
    values = dict(SAMPLING, eos_token_id=eos_ids, num_return_sequences=2, seed=7)
    runs = [rt.run(PROMPTS, max_batch_size=b, max_prefill_tokens=p, **values) for b, p in [(32, 2048), (1, 3), (3, 5)]]
    tokens = [[[r.output_ids for r in prompt] for prompt in run] for run in runs]
    assert tokens[0] == tokens[1] == tokens[2]
    assert tokens[0] != [[r.output_ids for r in prompt] for prompt in rt.run(PROMPTS, **dict(values, seed=8))]
    assert all(a != b for a, b in tokens[0])  # the two sequences of a prompt draw differently


def test_sampled_tokens_are_allowed_by_transformers_processors(runtime):
    """Every sampled token survives Transformers' own processors and warpers for that prompt at that step."""
    rt, model = runtime
    values = dict(SAMPLING, repetition_penalty=1.3, seed=3, eos_token_id=None)
    ours = rt.run(PROMPTS, **values)
    for i, prompt in enumerate(PROMPTS):
        tokens = ours[i][0].output_ids
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1].float()
        processors = model._get_logits_processor(
            generation_config=model._prepare_generation_config(None, **values)[0], input_ids_seq_length=len(prompt),
            encoder_input_ids=ids[:, :len(prompt)], device="cpu", model_kwargs={})
        for step, token in enumerate(tokens):
            scores = processors(ids[:, :len(prompt) + step], logits[step:step + 1].clone())
            assert torch.isfinite(scores[0, token]), f"prompt {i} step {step}: token {token} is filtered out"


def test_first_token_histogram_matches_processed_softmax(runtime):
    rt, model = runtime
    prompt = [5, 17, 33, 2, 90, 64]
    n = 3000
    ours = rt.run([prompt], max_batch_size=256, do_sample=True, temperature=1.5, top_k=40, top_p=0.9,
                  max_new_tokens=1, eos_token_id=None, num_return_sequences=n, seed=3)
    counts = torch.bincount(torch.tensor([r.output_ids[0] for r in ours[0]]), minlength=model.config.vocab_size)

    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[:, -1].float()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(1.5), TopKLogitsWarper(40), TopPLogitsWarper(0.9)])
    probs = torch.softmax(warpers(None, logits.clone()), dim=-1)[0]
    statistic, dof = _chi_square(counts.double(), probs.double(), n)
    # generous: mean dof, sd sqrt(2 dof); a wrong distribution lands far beyond
    critical = dof + 6 * math.sqrt(2 * dof) + 10
    assert dof >= 5
    assert statistic < critical
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn

    # the test can fail: the same draws are far from the distribution without the temperature
    plain = torch.softmax(LogitsProcessorList([TopKLogitsWarper(40), TopPLogitsWarper(0.9)])(None, logits), -1)[0]
    wrong_statistic, wrong_dof = _chi_square(counts.double(), plain.double() + 1e-12, n)
    assert wrong_statistic > wrong_dof + 6 * math.sqrt(2 * wrong_dof) + 10


def _chi_square(counts: torch.Tensor, probs: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson's statistic over bins with expected count >= 5; the rare bins are merged into one."""
    expected = probs * n
    common = expected >= 5
    observed_bins = counts[common].tolist() + [counts[~common].sum().item()]
    expected_bins = expected[common].tolist() + [expected[~common].sum().item()]
    if expected_bins[-1] < 5:  # too rare to be a bin of its own: fold into the last common bin
        observed_bins[-2] += observed_bins.pop()
        expected_bins[-2] += expected_bins.pop()
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed_bins, expected_bins))
    return statistic, len(expected_bins) - 1


def test_stop_strings_match_transformers(runtime):
    rt, model = runtime
    tokenizer = AutoTokenizer.from_pretrained(rt.folder)
    baseline = hf_alone(model, PROMPTS[0], {"max_new_tokens": 12, "eos_token_id": None})[0]["output_ids"]
    # a stop string across a token boundary of what the prompt generates
    pieces = [tokenizer.decode([t]) for t in baseline]
    step = next(i for i in range(2, len(pieces) - 1) if all(p and p.isascii() for p in pieces[i:i + 2]))
    stop = pieces[step][-2:] + pieces[step + 1][:1]
    values = dict(max_new_tokens=12, eos_token_id=[2], stop_strings=[stop])
    ours = rt.run(PROMPTS, **values)
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), tokenizer=tokenizer, pad_token_id=0, **values)
        generated = out[0, len(prompt):].tolist()
        assert ours[i][0].output_ids == generated, i
    assert ours[0][0].finish_reason == "eos" and len(ours[0][0].output_ids) <= step + 2


def test_the_last_requests_move_down_so_decode_steps_shrink(runtime, baseline):
    """Once nobody waits, a request in a high slot moves to a free lower one (its cache and state with it): the decode
    steps of the job's tail cover fewer slots, and every prompt still gets its own tokens."""
    rt, model = runtime
    _, eos_ids = baseline
    values = dict(max_new_tokens=12, eos_token_id=eos_ids)
    ours = rt.run(PROMPTS, max_batch_size=4, **values)
    moves = [m for plan in rt.plans for m in plan.moves]
    assert moves and all(source > target for source, target in moves)
    assert min(plan.n_decode for plan in rt.plans if plan.n_decode) < 4
    for i, prompt in enumerate(PROMPTS):
        assert_matches_hf(vars(ours[i][0]), hf_alone(model, prompt, values)[0], f"prompt {i}")


def test_decode_rows_read_keys_in_runs_of_their_own_length(sdpa_runtime, baseline):
    """With SDPA, a decode step reads the cache in runs of consecutive slots, each only up to its own longest row
    (masked keys cost as much as the others): every prompt still gets its own tokens. Short buckets and free runs make
    the test's short prompts split."""
    rt, model = sdpa_runtime
    _, eos_ids = baseline
    values = dict(max_new_tokens=12, eos_token_id=eos_ids)
    for max_batch_size, micro_batches in ((3, 1), (8, 2)):  # (8, 2): 5 slots, the second micro-batch's from slot 2
        ours = rt.run(PROMPTS, max_batch_size=max_batch_size, **values,
                      engine_args=dict(kv_bucket=2, run_cost=0, micro_batches=micro_batches))
        split = [plan for plan in rt.plans if len({length for _, length in plan.kv_runs}) > 1]
        assert split and any(plan.decode_start > 0 for plan in split) == (micro_batches > 1)
        for i, prompt in enumerate(PROMPTS):
            assert_matches_hf(vars(ours[i][0]), hf_alone(model, prompt, values)[0], f"prompt {i}, {max_batch_size}")


def test_kv_runs_read_the_fewest_keys(sdpa_runtime):
    """The split of a step's decode rows into runs is the cheapest of all splits, at run_cost keys per run."""
    rt, _ = sdpa_runtime
    run_cost, gen = 7, random.Random(0)
    engine = Engine(Pipeline(StageRunner(rt.stage, rt.grid, rt.options())), 8, 16, run_cost=run_cost)

    def cost(needs, ends):  # rows [start, end) per run
        return sum(run_cost + (end - start) * max(needs[start:end]) for start, end in zip((0,) + ends, ends))

    for _ in range(300):
        needs = [gen.choice([0, 4, 8, 12, 40]) for _ in range(gen.randint(1, 8))]
        runs = engine._kv_runs(needs)
        ends = tuple(itertools.accumulate(rows for rows, _ in runs))
        assert ends[-1] == len(needs) and all(rows > 0 for rows, _ in runs)
        assert [length for _, length in runs] == [max(max(needs[s:e]), 1) for s, e in zip((0,) + ends, ends)]
        every_split = [cuts + (len(needs),) for k in range(len(needs))
                       for cuts in itertools.combinations(range(1, len(needs)), k)]
        assert cost(needs, ends) == min(cost(needs, split) for split in every_split), needs


def test_on_token_streams_every_token_in_order(runtime, baseline):
    rt, _ = runtime
    _, eos_ids = baseline
    streamed = {}
    ours = rt.run(PROMPTS, max_batch_size=2, max_new_tokens=10, eos_token_id=eos_ids,
                  on_token=lambda r, t: streamed.setdefault(r.index, []).append(t))
    assert [streamed[i] for i in range(len(PROMPTS))] == [r.output_ids for [r] in ours]


def test_a_compiled_step_leaves_the_received_hidden_states_alone(runtime):
    """CUDA graphs replay only a step whose sole written inputs are static (the KV cache): a later stage's compiled
    decode step must not add to the hidden states it received in place, as its eager step does."""
    rt, _ = runtime
    stage = LlamaStage(rt.config, Grid(Launch(rank=1, world_size=2), tp=1, pp=2, device=torch.device("cpu")),
                       torch.float32)
    for p in stage.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cache, n, kv_len = stage.new_cache(2, 16), 2, 8
    batch = StepBatch(positions=torch.tensor([3, 5]), slots=torch.arange(n), rope_lengths=None, n_decode=n,
                      decode_mask=torch.zeros(n, 1, 1, kv_len), kv_runs=((0, n, kv_len),))
    received = torch.randn(n, rt.config.hidden_size)
    compiled = torch.compile(stage.forward, backend="aot_eager", dynamic=False)  # inputs written as compiled code does
    with torch.inference_mode():
        for forward, writes in ((compiled, False), (stage.forward, True)):
            x = received.clone()
            forward(x, batch, cache)
            assert (not torch.equal(x, received)) == writes


def test_compiled_decode_gives_the_same_tokens_as_eager(runtime, baseline):
    """--compile: decode steps under torch.compile (inductor on the CPU; CUDA graphs on a GPU), static shapes."""
    rt, model = runtime
    _, eos_ids = baseline
    values = dict(max_new_tokens=10, eos_token_id=eos_ids)
    eager = rt.run(PROMPTS, max_batch_size=2, max_prefill_tokens=4, **values)
    options = rt.options(**values)
    runner, _ = load_runner(rt.config, rt.ckpt, rt.grid, torch.float32, options=options, compile=True)
    pipeline = Pipeline(runner)
    engine = Engine(pipeline, 2, 4, static_decode=True)
    compiled = sorted(engine.generate(make_requests(PROMPTS, options, rt.config, None)), key=lambda r: r.index)
    assert [r.output_ids for r in compiled] == [r.output_ids for [r] in eager]
    for r, [e] in zip(compiled, eager):
        assert max(abs(a - b) for a, b in zip(r.token_logprobs, e.token_logprobs)) < 1e-4


@pytest.mark.parametrize("decode_kernel,matmul_kernel", [(True, True), (False, True), (False, False)],
                         ids=["kernels", "sdpa", "sdpa_onednn"])
def test_a_prompt_gets_the_same_bits_alone_as_beside_others(tmp_path, decode_kernel, matmul_kernel):
    """A prompt's logprobs, bit for bit, decoded alone (one-row matmuls) and beside others, also with matmul rows
    longer than 1024 (intermediate_size 1100), for which oneDNN has a kernel of its own for a lone row."""
    build_checkpoint(tmp_path, seed=5, intermediate_size=1100)
    rt = Runtime(tmp_path, decode_kernel=decode_kernel, matmul_kernel=matmul_kernel)
    values = dict(max_new_tokens=8, eos_token_id=None)
    alone, together = (rt.run(PROMPTS, max_batch_size=size, **values) for size in (1, 8))
    assert max(plan.n_decode for plan in rt.plans) == len(PROMPTS)
    for i, ([a], [t]) in enumerate(zip(alone, together)):
        assert (a.output_ids, a.token_logprobs) == (t.output_ids, t.token_logprobs), f"prompt {i}"
