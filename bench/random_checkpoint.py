"""Write a Llama checkpoint of a given shape with random weights (safetensors shards + index), for benchmarks on
machines without a hub: distllama and Transformers then load the same weights from the same folder.

    python bench/random_checkpoint.py --shape llama3-8b --dtype bfloat16 --device cuda /tmp/llama3-8b-random
    python bench/random_checkpoint.py --shape tiny /tmp/tiny-random         # what the --dry-run of gpu_check uses
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # Meta-Llama-3-8B's config.json, weights aside
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                      rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001),
    # SmolLM2-135M (the demo) with 8 query / 4 kv heads instead of 9 / 3, so that tp 2 divides them
    "smollm2-135m-8h": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
                            rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2),
}


def tensors_of(shape: dict) -> dict[str, tuple[int, ...]]:
    d, ff, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = d // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    names = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        names.update({f"{p}.input_layernorm.weight": (d,), f"{p}.post_attention_layernorm.weight": (d,),
                      f"{p}.self_attn.q_proj.weight": (d, d), f"{p}.self_attn.k_proj.weight": (kv, d),
                      f"{p}.self_attn.v_proj.weight": (kv, d), f"{p}.self_attn.o_proj.weight": (d, d),
                      f"{p}.mlp.gate_proj.weight": (ff, d), f"{p}.mlp.up_proj.weight": (ff, d),
                      f"{p}.mlp.down_proj.weight": (d, ff)})
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--shape", choices=SHAPES, default="llama3-8b")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda is much faster)")
    p.add_argument("--shard-gb", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    weight_map, shard, shard_bytes, total, index = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        if shard:
            name = f"model-{index:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, shard_bytes, index = {}, 0, index + 1

    for name, size in tensors_of(shape).items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(size, dtype=dtype)
        else:  # Llama's initializer_range, so the activations stay in range over the layers
            tensor = (torch.randn(size, generator=generator, device=args.device) * 0.02).to(dtype).cpu()
        shard[name] = tensor
        shard_bytes += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if shard_bytes >= args.shard_gb * 2**30:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": args.dtype, **shape}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": shape["bos_token_id"], "eos_token_id": shape["eos_token_id"], "do_sample": False}))
    print(f"{folder}: {args.shape}, {args.dtype}, {total / 2**30:.2f} GiB in {index} shard(s)")


if __name__ == "__main__":
    main()
