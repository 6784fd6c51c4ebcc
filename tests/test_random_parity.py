"""Random parity: per seed, a random Llama checkpoint (head counts, head_dim, biases, tied embeddings, every rope
type, one file or many shards), a random mixed-length prompts file (a third of the prompts up to 80 tokens long,
so that decode steps read the cache in runs of different lengths) and random greedy processors, run through the
command line with continuous batching at a random --max-batch-size and --max-prefill-tokens, with decode attention
in distllama's CPU kernel or in SDPA (--attn auto or sdpa) and matmuls in its CPU kernel or oneDNN (--matmul auto or
torch), against Transformers' generate on each prompt alone. The fixed cases of test_parallel_parity and
test_generation_parity cover the splits; this covers the combinations nobody listed.

48 seeds in the suite: each of three one-line bugs planted in rope and in the token history failed 2 to 7 of them.
PARITY_EXAMPLES=500 PARITY_SEED=1000 hunts with other seeds (a failure names its seed)."""

import json
import os
import random

import pytest

from checkpoints import BASE, assert_matches_hf, build_checkpoint, hf_alone
from distllama import generate

FIRST_SEED = int(os.environ.get("PARITY_SEED", "0"))
SEEDS = range(FIRST_SEED, FIRST_SEED + int(os.environ.get("PARITY_EXAMPLES", "48")))


def random_config(rng: random.Random) -> dict:
    """LlamaConfig overrides of BASE that Transformers accepts (hidden_size a multiple of the heads)."""
    heads = rng.choice([1, 2, 3, 4, 6])
    head_dim = rng.choice([8, 16])
    config = dict(num_attention_heads=heads, num_key_value_heads=rng.choice([k for k in range(1, heads + 1)
                                                                            if heads % k == 0]),
                  num_hidden_layers=rng.randint(1, 4), intermediate_size=rng.choice([16, 40, 90]),
                  vocab_size=rng.choice([301, 333]), rms_norm_eps=rng.choice([1e-5, 1e-6]),
                  tie_word_embeddings=rng.random() < 0.5, attention_bias=rng.random() < 0.3,
                  mlp_bias=rng.random() < 0.3, initializer_range=rng.choice([0.1, 0.2]),
                  hidden_size=heads * rng.choice([head_dim, 4, 12]), bos_token_id=BASE["bos_token_id"])
    if config["hidden_size"] != heads * head_dim:
        config["head_dim"] = head_dim
    theta, factor = rng.choice([10000.0, 500000.0]), rng.choice([2.0, 4.0])
    config["rope_parameters"] = rng.choice([
        {"rope_type": "default", "rope_theta": theta},
        {"rope_type": "linear", "rope_theta": theta, "factor": factor},
        {"rope_type": "dynamic", "rope_theta": theta, "factor": factor},
        {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": 16},
        {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 16},
        {"rope_type": "longrope", "rope_theta": theta, "original_max_position_embeddings": 16,
         "short_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
         "long_factor": [2.0 + 0.3 * i for i in range(head_dim // 2)]},
    ])
    # dynamic: sequences go past max_position_embeddings; longrope, yarn, llama3: past the original 16
    config["max_position_embeddings"] = 24 if config["rope_parameters"]["rope_type"] == "dynamic" else 64
    return config


def random_options(rng: random.Random, produced: list[int], longest: int) -> dict:
    """Up to three processors, with token ids the model really produces so that bans and eos ids change the output;
    always an extra eos id, so that rows end at different steps."""
    token = lambda: rng.choice(produced)  # noqa: E731
    choices = {
        "repetition_penalty": lambda: rng.choice([0.8, 1.5]), "no_repeat_ngram_size": lambda: rng.randint(1, 3),
        "bad_words_ids": lambda: [[token()], [token(), token()]], "suppress_tokens": lambda: [token()],
        "begin_suppress_tokens": lambda: [token()], "min_new_tokens": lambda: rng.randint(1, 6),
        "min_length": lambda: rng.randint(2, longest + 6), "forced_bos_token_id": token, "forced_eos_token_id": token,
        "exponential_decay_length_penalty": lambda: [rng.randint(1, 4), 1.5],
    }
    options = {name: choices[name]() for name in rng.sample(sorted(choices), rng.randint(0, 3))}
    if "forced_bos_token_id" in options or "forced_eos_token_id" in options:
        options.pop("suppress_tokens", None)  # Transformers refuses a forced token that is also suppressed
    options["eos_token_id"] = [BASE["eos_token_id"], token()]
    return options


@pytest.mark.parametrize("seed", SEEDS)
def test_random_checkpoint_and_options_match_transformers(seed, tmp_path):
    rng = random.Random(seed)
    config = random_config(rng)
    model = build_checkpoint(tmp_path / "model", seed=seed, shard_kb=rng.choice([20, 10**6]), **config)
    prompts = [[rng.randrange(3, config["vocab_size"]) for _ in range(rng.randint(1, rng.choice([30, 30, 80])))]
               for _ in range(rng.randint(2, 9))]
    new_tokens = rng.randint(1, 12)
    plain = [hf_alone(model, p, {"max_new_tokens": new_tokens})[0]["output_ids"] for p in prompts]
    options = {"max_new_tokens": new_tokens,
               **random_options(rng, sorted({t for row in plain for t in row}), max(map(len, prompts)))}
    expected = [hf_alone(model, p, options)[0] for p in prompts]

    prompts_file, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts_file.write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in prompts))
    argv = ["--model", str(tmp_path / "model"), "--device", "cpu", "--prompts-file", str(prompts_file),
            "--output", str(out), "--log-level", "error", "--max-batch-size", str(rng.randint(1, 5)),
            "--max-prefill-tokens", str(rng.choice([1, 5, 16, 2048])),
            *[arg for name, value in options.items() for arg in ("--" + name.replace("_", "-"), json.dumps(value))],
            "--attn", rng.choice(["auto", "sdpa"]),  # decode steps in the CPU kernel (where it runs) or in SDPA
            "--matmul", rng.choice(["auto", "torch"])]  # the CPU matmul kernel (where it runs) or oneDNN
    assert generate.main(argv) == 0, argv
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(prompts)))
    for i, (ours, theirs) in enumerate(zip(records, expected)):
        where = f"seed {seed}, prompt {i}: {' '.join(argv)}; config {config}"
        assert_matches_hf(ours, theirs, where)
        if ours["output_ids"] == theirs["output_ids"]:
            ended = bool(ours["output_ids"]) and ours["output_ids"][-1] in options["eos_token_id"]
            assert ours["finish_reason"] == ("eos" if ended else "length"), where
