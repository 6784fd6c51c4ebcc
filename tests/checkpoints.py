"""Tiny random Llama checkpoints written by Transformers (several safetensors shards + index + a tokenizer), and
the table of model variants the parity tests run over every (tp, pp) split."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 301  # divisible by neither 2, 3 nor 4: the vocab-parallel shards need padding
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
            eos_token_id=2, tie_word_embeddings=False)

# name -> LlamaConfig overrides. Every case holds 3+ layers so pp 2 and 3 apply; head counts decide which tp apply.
CASES = {
    "mha": dict(num_key_value_heads=4, num_hidden_layers=4),
    "gqa_tied": dict(tie_word_embeddings=True),
    "mqa": dict(num_key_value_heads=1),
    "kv_lt_tp": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64),  # tp 4 replicates kv heads
    "head_dim": dict(hidden_size=48, head_dim=16, num_hidden_layers=5),  # head_dim != hidden / heads; 5 layers
    # tp 2: each rank's 3 query heads read 2 of the 3 kv heads, one of them shared; MLP width 90 splits unevenly
    "kv_uneven": dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48, intermediate_size=90),
    "bias": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "rope_dynamic": dict(max_position_embeddings=12,  # prompts + new tokens go past it: frequencies regrow
                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    "rope_yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 64}),
    "rope_llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8}),
    "rope_longrope": dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 10,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)]}),
}

PROMPTS = [[1, 17, 250, 33, 9], [1, 5, 99, 120, 7, 64, 200, 13, 42], [1, 77, 3]]  # different lengths: left padding
# more prompts than the engine tests' slots: mixed lengths, a one-token prompt among them
MIXED_PROMPTS = [[1, 17, 250, 33, 9], [1, 5, 99, 120, 7, 64, 200, 13, 42, 11, 80], [1, 77, 3], [5],
                 [1, 40, 41, 42, 43, 44, 45, 46]]


def build_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE with <unk>=0, <s>=1, </s>=2, trained to fill the vocabulary, saved as Transformers does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog. " * 3, "Paris is the capital of France.",
              "def add(a, b):\n    return a + b\n", "1234567890 + 42 = 1234567932", "hello world, hello llama"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def build_checkpoint(folder, seed: int = 0, shard_kb: int = 40, **overrides) -> LlamaForCausalLM:
    """Save a seeded random float32 Llama (sharded, with an index) and a tokenizer into folder; return the model."""
    folder = Path(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**BASE, **overrides})).to(torch.float32).eval()
    model.save_pretrained(folder, max_shard_size=f"{shard_kb}KB")
    build_tokenizer(folder, model.config.vocab_size)
    return model


def hf_alone(model, prompt: list[int], options: dict) -> list[dict]:
    """Transformers' generate on one prompt on its own (no padding), with a fresh rotary state (dynamic rope keeps
    state across calls): its returned sequences, each with its generated ids (through eos), their raw-logit logprobs
    (not for beams), its score (beams only) and, per step, the gap between the two best processed scores."""
    options = dict(options)
    seed = options.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    rotary = model.model.rotary_emb
    if not hasattr(model, "_pristine_rotary"):
        model._pristine_rotary = {n: b.clone() for n, b in rotary.named_buffers()}, dict(vars(rotary))
    buffers, attributes = model._pristine_rotary
    for name, value in attributes.items():
        if not name.startswith("_"):
            setattr(rotary, name, value)
    for name, value in buffers.items():
        rotary.register_buffer(name, value.clone(), persistent=False)
    ids = torch.tensor([prompt], device=model.device)
    beams = options.get("num_beams", 1) > 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=0,
                             return_dict_in_generate=True, output_logits=not beams, output_scores=True, **options)
    eos = options.get("eos_token_id", model.generation_config.eos_token_id)
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    sequences = []
    for row in range(out.sequences.shape[0]):
        generated = out.sequences[row, len(prompt):].tolist()
        generated = generated[:next((i + 1 for i, t in enumerate(generated) if t in eos), len(generated))]
        entry = {"output_ids": generated, "token_logprobs": None, "gaps": None,
                 "score": out.sequences_scores[row].item() if beams else None}
        if not beams:
            logprobs = torch.stack(out.logits, dim=1)[row].float().log_softmax(-1)
            entry["token_logprobs"] = [logprobs[i, t].item() for i, t in enumerate(generated)]
            top2 = torch.stack(out.scores, dim=1)[row].float().topk(2, dim=-1).values
            entry["gaps"] = (top2[:, 0] - top2[:, 1]).tolist()
        sequences.append(entry)
    return sequences


def hf_greedy(model, prompts, max_new_tokens: int) -> list[dict]:
    """Transformers' greedy generate on each prompt on its own: one sequence per prompt."""
    return [hf_alone(model, p, {"max_new_tokens": max_new_tokens, "do_sample": False})[0] for p in prompts]


def assert_matches_hf(ours: dict, theirs: dict, where: str = "") -> None:
    """Greedy tokens identical to Transformers' and logprobs within 1e-4, except that from a step where
    Transformers' own two best (processed) scores are within 1e-4 of each other either token may follow; the rest
    of the sequence is then not compared."""
    for step, (a, b) in enumerate(zip(ours["output_ids"], theirs["output_ids"])):
        if a != b:
            assert theirs["gaps"][step] < 1e-4, f"{where}: token {step} is {a}, Transformers gives {b}"
            return
        assert abs(ours["token_logprobs"][step] - theirs["token_logprobs"][step]) < 1e-4, f"{where}: logprob {step}"
    assert len(ours["output_ids"]) == len(theirs["output_ids"]), f"{where}: lengths differ"


def write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj))


def run_split(root: Path, cases: list[dict], tp: int, pp: int) -> tuple[dict, list[dict]]:
    """Run tests/dist_worker.py over the cases with tp * pp real processes (torchrun; no launcher for one)."""
    here = Path(__file__).parent
    out = Path(root) / f"run-tp{tp}-pp{pp}"
    out.mkdir(exist_ok=True)
    plan = out / "plan.json"
    write_json(plan, {"tp": tp, "pp": pp, "cases": cases, "out": str(out)})
    world = tp * pp
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here)}
    if world == 1:
        cmd = [sys.executable, str(here / "dist_worker.py"), str(plan)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               str(here / "dist_worker.py"), str(plan)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return results, ranks


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache, repo_id, folder, files):
    """models--org--name/{blobs/<sha256>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in files:
        blob = hashlib.sha256((folder / file).read_bytes()).hexdigest()
        shutil.copy(folder / file, repo / "blobs" / blob)
        (snapshot / file).symlink_to(f"../../blobs/{blob}")
    return snapshot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
